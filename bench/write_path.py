"""Benchmark of issue 18 (one write path): the same run before and after, and what the kept-shard
proof costs.

Part 1, **before and after**: the seed recipe (``--dup LASTx12 --zero o_proj,down_proj``) written by
the code of ``--before`` (default: the last commit before the write path was unified) and by the
code here, in alternating pairs after a warm-up of each; wall time (with the ``sync`` after it),
peak RSS of the child alone (GNU time), and the outputs compared file by file (SHA-256): the bytes
must not change, only who decides them.

Part 2, **the kept-shard proof**: a plan written by two ``apply --shards`` writers, then ``apply
--finalize`` timed, which proves every staged shard by comparing each of its bytes with the plan's
definition (reading the shard and its sources back) before it publishes; the yardstick, alternating
with it, is a dense copy of the same shards (``cp --reflink=never --sparse=never``, then ``sync``).
Between pairs the published output is put back as the staging folder of the job, so each finalize
proves the same shards.

Prints one JSON line per run and a summary per part, appends a section to ``bench/RESULTS.md``, and
removes what it generated (``--keep`` keeps the source checkpoint).

    python bench/write_path.py --shape 1b [--pairs 3] [--before COMMIT] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from expand import COPIES, RESULTS_PATH, machine, remove, run_child
from make_checkpoint import SHAPES, Shape, check_free_space, checkpoint_nbytes, layer_nbytes, make_checkpoint

import shardsurgeon

BEFORE = "f9983d7"
"""The last commit before issue 18: the three copies of the write path."""
ROOT = Path(__file__).resolve().parent.parent


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def seed(shape: Shape) -> list[str]:
    return ["--dup", f"{shape.num_hidden_layers - 1}x{COPIES}", "--zero", "o_proj,down_proj"]


def digests(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            found[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return found


def code_of(commit: str, into: Path) -> Path:
    """The package as it was at ``commit``, unpacked into ``into`` (a PYTHONPATH entry)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "shardsurgeon"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def command(code: Path, *args: str | Path) -> list[str]:
    """``python -m shardsurgeon ARGS`` with the package of ``code`` first on the path."""
    return ["env", f"PYTHONPATH={code}", sys.executable, "-m", "shardsurgeon", *map(str, args)]


def timed(name: str, cmd: list[str], run: str, **extra: object) -> dict[str, float]:
    child = run_child(cmd)
    if child.exit_code != 0:
        raise SystemExit(f"{name} failed ({child.exit_code}): {child.output_tail[-500:]}")
    record = {"tool": name, "run": run, "wall_s": round(child.wall_s, 3), "sync_s": round(child.sync_s, 3),
              "peak_rss_mb": round(child.peak_rss_mb, 1), **extra}  # fmt: skip
    emit(record)
    return {"wall": child.wall_s + child.sync_s, "rss": child.peak_rss_mb}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def before_and_after(shape: Shape, src: Path, work: Path, before: Path, pairs: int) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    out = work / "out"  # one name for both: the model card records it
    found: dict[str, dict[str, str]] = {}
    for index in range(pairs + 1):
        run = "warmup" if index == 0 else f"pair{index}"
        for tool, code in (("before", before), ("after", ROOT)):
            remove(out)  # neither run starts with the other's output in the page cache
            got = timed(tool, command(code, "expand", "--src", src, *seed(shape), "--out", out, "-q"), run)
            if index:
                runs[tool].append(got)
            else:
                found[tool] = digests(out)
    remove(out)
    identical = found["before"] == found["after"]
    emit({"check": "byte-identical" if identical else "DIFFERENT", "files": len(found["before"])})
    if not identical:
        raise SystemExit("the outputs before and after differ")
    walls = {tool: [r["wall"] for r in found_runs] for tool, found_runs in runs.items()}
    summary = {
        "part": "before/after", "shape": shape.name, "pairs": pairs,
        "ratio_wall_after_before": median([a / b for a, b in zip(walls["after"], walls["before"], strict=True)]),
        "before_wall_s": median(walls["before"]), "after_wall_s": median(walls["after"]),
        "before_peak_rss_mb": round(max(r["rss"] for r in runs["before"]), 1),
        "after_peak_rss_mb": round(max(r["rss"] for r in runs["after"]), 1),
        "before_runs": [round(w, 2) for w in walls["before"]], "after_runs": [round(w, 2) for w in walls["after"]],
    }  # fmt: skip
    emit(summary)
    return summary


def proof_cost(shape: Shape, src: Path, work: Path, pairs: int) -> dict[str, object]:
    plan, out, copy = work / "plan.json", work / "out", work / "copy"
    staging = work / ".out.shardsurgeon-partial"
    subprocess.run(command(ROOT, "expand", "--src", src, *seed(shape), "--plan-json", plan, "-q"), check=True)
    key = shardsurgeon.load_plan_file(plan).job.key
    for part in ("1/2", "2/2"):
        subprocess.run(command(ROOT, "apply", plan, out, "--shards", part, "-q"), check=True)
    shards = sorted(p.name for p in staging.glob("*.safetensors"))
    nbytes = sum((staging / name).stat().st_size for name in shards)
    runs: dict[str, list[dict[str, float]]] = {"finalize": [], "cp": []}
    for index in range(pairs + 1):
        run = "warmup" if index == 0 else f"pair{index}"
        got = timed("finalize", command(ROOT, "apply", plan, out, "--finalize", "-q"), run, shard_bytes=nbytes)
        out.rename(staging)  # back to the staging folder of the job, to be proven again
        (staging / shardsurgeon.RESUME_NAME).write_text(key)
        remove(copy)
        copy.mkdir()
        cp = ["cp", "--reflink=never", "--sparse=never", *(str(staging / name) for name in shards), str(copy)]
        yard = timed("cp", cp, run, shard_bytes=nbytes)
        remove(copy)
        if index:
            runs["finalize"].append(got)
            runs["cp"].append(yard)
    remove(staging)
    walls = {tool: [r["wall"] for r in found_runs] for tool, found_runs in runs.items()}
    summary = {
        "part": "proof", "shape": shape.name, "pairs": pairs, "shard_bytes": nbytes,
        "ratio_wall_finalize_cp": median([f / c for f, c in zip(walls["finalize"], walls["cp"], strict=True)]),
        "finalize_wall_s": median(walls["finalize"]), "cp_wall_s": median(walls["cp"]),
        "finalize_peak_rss_mb": round(max(r["rss"] for r in runs["finalize"]), 1),
        "proof_mb_per_s": round(nbytes / median(walls["finalize"]) / 1e6, 1),
        "finalize_runs": [round(w, 2) for w in walls["finalize"]], "cp_runs": [round(w, 2) for w in walls["cp"]],
    }  # fmt: skip
    emit(summary)
    return summary


def append_results(shape: Shape, before: str, parts: list[dict[str, object]], where: dict[str, object]) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    one, two = parts
    lines = [
        f"\n## Issue 18 (one write path): `{shape.name}`, {stamp}\n",
        f"`bench/write_path.py --shape {shape.name} --pairs {one['pairs']}`; machine: {where}.\n",
        f"- The seed recipe, code of {before} (three copies of the write path) against this code, alternating: "
        f"{one['before_wall_s']} s before, {one['after_wall_s']} s after (wall time with the sync after it, median; "
        f"ratio after/before {one['ratio_wall_after_before']}); peak RSS {one['before_peak_rss_mb']} MB before, "
        f"{one['after_peak_rss_mb']} MB after; the outputs byte-identical. Runs: before {one['before_runs']}, "
        f"after {one['after_runs']}.",
        f"- The kept-shard proof: `apply --finalize` of {two['shard_bytes'] / 1e9:.2f} GB of staged shards, each byte "
        f"compared with the plan's definition before publishing: {two['finalize_wall_s']} s "
        f"({two['proof_mb_per_s']} MB/s of shards, peak RSS {two['finalize_peak_rss_mb']} MB) against "
        f"{two['cp_wall_s']} s for a dense copy of the same shards with its sync (ratio "
        f"{two['ratio_wall_finalize_cp']}). Runs: finalize {two['finalize_runs']}, cp {two['cp_runs']}.\n",
    ]
    with open(RESULTS_PATH, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the source checkpoint for the next run")
    parser.add_argument("--skip-before", action="store_true", help="only the proof's cost")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    work = args.workdir / f"shardsurgeon-write-path-{shape.name}"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    output = checkpoint_nbytes(shape) + COPIES * layer_nbytes(shape)
    check_free_space(work, (0 if src.exists() else checkpoint_nbytes(shape)) + 2 * output, "the benchmark")
    if not src.exists():
        make_checkpoint(shape, src)
    where = machine(work)
    emit({"machine": where, "shape": shape.name, "before": args.before})
    try:
        parts = []
        if not args.skip_before:
            parts.append(before_and_after(shape, src, work, code_of(args.before, work / "before"), args.pairs))
        parts.append(proof_cost(shape, src, work, args.pairs))
        if len(parts) == 2:
            append_results(shape, args.before, parts, where)
    finally:
        for entry in list(work.iterdir()):
            if entry.name != "src" or not args.keep:
                remove(entry)
        if not args.keep:
            remove(work)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
