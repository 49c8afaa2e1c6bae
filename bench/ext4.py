"""Issue 9 part 3: where the seed recipe's time goes on ext4, and whether an I/O knob changes it.

For each VARIANT of ``bench/phases.py`` (the CLI with its file-system calls timed, one knob
changed), alternating with the yardstick: ours writes OUT (``expand --src SRC --dup LASTx12 --zero
o_proj,down_proj -q``), then ``cp -r --sparse=never OUT COPY`` copies the same bytes densely. Rounds
go variant by variant (ours, cp, ours, cp, ...), so every variant has its own cp measured right
after it; ``--pairs`` rounds after one untimed warm-up round. Wall time and peak RSS come from
``bench/expand.py``'s ``run_child`` (GNU time; untimed ``sync`` before, timed ``sync`` after).

Prints a JSON line per run and a markdown table of medians per variant (wall, ratio to cp, ratio
counting each tool's ``sync``, and the median seconds in each call). Removes OUT and COPY at the
end; the source is never touched (make it with ``python bench/expand.py --shape 7b --keep``).

    PYTHONPATH=. python bench/ext4.py --src /tmp/shardsurgeon-bench/src-7b [--variants as-is,no-hint] [--pairs 3]
    PYTHONPATH=. python bench/ext4.py --table-from LOG    (the table again, from the JSON lines it printed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from expand import emit, machine, remove, run_child, tree_bytes
from phases import VARIANTS

HERE = Path(__file__).resolve().parent


def resident_gb(folder: Path) -> float:
    """How much of the shards under ``folder`` is in the page cache (util-linux ``fincore``)."""
    files = [str(p) for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        return 0.0
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    return round(sum(int(x) for x in result.stdout.split()) / 1e9, 2) if result.returncode == 0 else -1.0


def layers(src: Path) -> int:
    config = json.loads((src / "config.json").read_text())
    return int(config["num_hidden_layers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path)
    parser.add_argument("--variants", default="as-is,no-hint,call-1g,end-sync")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--workdir", type=Path, default=None, help="default: the source's parent")
    parser.add_argument("--table-from", type=Path, help="only print the table of the JSON lines of an earlier run")
    args = parser.parse_args(argv)
    if args.table_from is not None:
        logged: dict[str, list[dict[str, object]]] = {}
        for line in args.table_from.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if "variant" in record and "phases" in record and record.get("run") != "warmup":
                logged.setdefault(str(record["variant"]), []).append(record)
        print(table(logged))
        return 0
    if args.src is None:
        parser.error("--src is required")
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: a comma-separated subset of {','.join(VARIANTS)}")
    src = args.src.absolute()
    workdir = (args.workdir or src.parent).absolute()
    out, copy = workdir / "ext4-out", workdir / "ext4-copy"
    seed = ["--dup", f"{layers(src) - 1}x12", "--zero", "o_proj,down_proj"]
    emit({"machine": machine(workdir), "variants": variants, "pairs": args.pairs})
    runs: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    try:
        for number in range(args.warmup + args.pairs):
            label = "warmup" if number < args.warmup else f"pair{number - args.warmup + 1}"
            for variant in variants:
                remove(out)
                remove(copy)
                src_cached = resident_gb(src)
                with tempfile.NamedTemporaryFile(suffix=".json") as phases_file:
                    cmd = [
                        sys.executable,
                        str(HERE / "phases.py"),
                        variant,
                        phases_file.name,
                        "--",
                        "expand",
                        "--src",
                        str(src),
                        *seed,
                        "--out",
                        str(out),
                        "-q",
                    ]
                    ours = run_child(cmd)
                    if ours.exit_code != 0:
                        emit({"variant": variant, "error": ours.output_tail[-500:]})
                        return 1
                    phases = json.loads(Path(phases_file.name).read_text())
                size, holes = tree_bytes(out)
                out_cached = resident_gb(out)
                cp = run_child(["cp", "-r", "--sparse=never", str(out), str(copy)])
                record = {
                    "variant": variant,
                    "run": label,
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                    "ours_wall_s": round(ours.wall_s, 3),
                    "ours_sync_s": round(ours.sync_s, 3),
                    "ours_peak_rss_mb": round(ours.peak_rss_mb, 1),
                    "cp_wall_s": round(cp.wall_s, 3),
                    "cp_sync_s": round(cp.sync_s, 3),
                    "src_cached_gb": src_cached,
                    "out_cached_gb_before_cp": out_cached,
                    "output_bytes": size,
                    "holes_bytes": holes,
                    "phases": phases,
                }
                emit(record)
                if number >= args.warmup:
                    runs[variant].append(record)
    finally:
        remove(out)
        remove(copy)
    print(table(runs))
    return 0


def table(runs: dict[str, list[dict[str, object]]]) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    calls = sorted({name for rs in runs.values() for r in rs for name in r["phases"]["spent_s"]})  # type: ignore[index]
    head = [
        "variant",
        "pairs",
        "ours wall s",
        "cp wall s",
        "ratio",
        "ratio incl. sync",
        "ours sync after s",
        "ours user+sys s",
        "source cached GB before ours",
        "output cached GB before cp",
        *[f"in {c} s" for c in calls],
        "ours peak RSS MB",
        "load avg",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, rs in runs.items():
        if not rs:
            continue
        ratio = med([r["ours_wall_s"] / r["cp_wall_s"] for r in rs])  # type: ignore[operator]
        ratio_sync = med([(r["ours_wall_s"] + r["ours_sync_s"]) / (r["cp_wall_s"] + r["cp_sync_s"]) for r in rs])  # type: ignore[operator]
        spent = [med([r["phases"]["spent_s"].get(c, 0.0) for r in rs]) for c in calls]  # type: ignore[index]
        cpu = med([r["phases"]["user_s"] + r["phases"]["sys_s"] for r in rs])  # type: ignore[index]
        loads = [r["loadavg_1m"] for r in rs]
        cells = [
            variant,
            len(rs),
            f"{med([r['ours_wall_s'] for r in rs]):.2f}",  # type: ignore[misc]
            f"{med([r['cp_wall_s'] for r in rs]):.2f}",
            f"{ratio:.3f}",
            f"{ratio_sync:.3f}",  # type: ignore[misc]
            f"{med([r['ours_sync_s'] for r in rs]):.2f}",
            f"{cpu:.2f}",  # type: ignore[misc]
            f"{med([r['src_cached_gb'] for r in rs]):.1f}",  # type: ignore[misc]
            f"{med([r['out_cached_gb_before_cp'] for r in rs]):.1f}",  # type: ignore[misc]
            *[f"{s:.2f}" for s in spent],
            max(r["ours_peak_rss_mb"] for r in rs),  # type: ignore[type-var]
            f"{min(loads)}-{max(loads)}",
        ]  # type: ignore[type-var]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
