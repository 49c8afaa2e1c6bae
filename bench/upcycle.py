"""Benchmark of issue 19: ``shardsurgeon upcycle --experts 8 --top-k 2`` on a dense checkpoint.

Generates the synthetic bf16 checkpoint of ``--shape`` (``make_checkpoint.py``; ``1b`` is
TinyLlama-shaped, ``7b`` Mistral-7B-shaped) and upcycles it to 8 experts with a zero router, each
run a child process measured as ``bench/expand.py`` measures (wall time, its own peak RSS through
GNU time, the ``sync`` after it timed too).

- ``--fs ext4`` (the work folder's own filesystem): ``--pairs`` alternating pairs of ours and the
  yardstick, a dense ``cp -r --reflink=never --sparse=never`` of our output followed by ``sync``.
- ``--fs xfs``: the checkpoint is made inside an XFS image (``mkfs.xfs -m reflink=1``, sparse, on a
  loop device, sized for the source only) and every expert shares its blocks with the source: the
  extra disk (statvfs used bytes after minus before, settled) is printed against the output's
  logical size. No dense yardstick: 94 GB of output does not fit the disk densely.

Prints JSON lines (the medians last) and removes what it made.

    PYTHONPATH=. python bench/upcycle.py --shape 1b --fs ext4 [--pairs 3] [--workdir DIR]
    PYTHONPATH=. python bench/upcycle.py --shape 7b --fs xfs [--pairs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from expand import machine, remove, run_child, tree_bytes
from make_checkpoint import SHAPES, checkpoint_nbytes, make_checkpoint
from reflink import loop_mount, settled_used_bytes


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def ours(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "shardsurgeon", "upcycle", "--src", str(src), "--experts", "8", "--top-k", "2",
            "--out", str(out), "-q"]  # fmt: skip


def run_ours(src: Path, out: Path, run: str, fs_root: Path | None) -> dict[str, object]:
    remove(out)
    before = settled_used_bytes(fs_root) if fs_root else 0
    child = run_child(ours(src, out))
    if child.exit_code != 0:
        raise SystemExit(f"upcycle failed: {child.output_tail}")
    size, holes = tree_bytes(out)
    record: dict[str, object] = {
        "tool": "shardsurgeon upcycle", "run": run, "wall_s": round(child.wall_s, 2),
        "sync_s": round(child.sync_s, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
        "output_gb": round(size / 1e9, 2), "holes_mb": round(holes / 1e6, 1),
    }  # fmt: skip
    if fs_root:
        extra = settled_used_bytes(fs_root) - before
        record |= {"extra_disk_mb": round(extra / 1e6, 1), "extra_disk_fraction": round(extra / size, 5)}
    emit(record)
    return record


def run_copy(out: Path, copy: Path, run: str) -> dict[str, object]:
    remove(copy)
    child = run_child(["cp", "-r", "--reflink=never", "--sparse=never", str(out), str(copy)])
    record = {"tool": "cp dense + sync", "run": run, "wall_s": round(child.wall_s + child.sync_s, 2),
              "peak_rss_mb": round(child.peak_rss_mb, 1)}  # fmt: skip
    emit(record)
    remove(copy)
    return record


def median(records: list[dict[str, object]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in records), 5)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--fs", choices=("ext4", "xfs"), default="ext4")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=args.workdir))
    emit({"shape": shape.name, "fs": args.fs, "machine": machine(work)})
    try:
        with contextlib.ExitStack() as stack:
            root = work
            if args.fs == "xfs":
                root = stack.enter_context(loop_mount("xfs", work, int(checkpoint_nbytes(shape) * 1.3) + (2 << 30)))
            src = make_checkpoint(shape, root / "src")
            out, copy = root / "out", root / "copy"
            run_ours(src, out, "warm-up", root if args.fs == "xfs" else None)
            mine, theirs = [], []
            for pair in range(args.pairs):
                mine.append(run_ours(src, out, f"pair {pair + 1}", root if args.fs == "xfs" else None))
                if args.fs == "ext4":
                    theirs.append(run_copy(out, copy, f"pair {pair + 1}"))
            summary: dict[str, object] = {
                "summary": f"{shape.name} on {args.fs}, median of {args.pairs}",
                "ours_wall_s": median(mine, "wall_s"), "ours_peak_rss_mb": median(mine, "peak_rss_mb"),
                "output_gb": mine[0]["output_gb"],
            }  # fmt: skip
            if theirs:
                ratio = median(mine, "wall_s") / median(theirs, "wall_s")
                summary |= {"cp_wall_s": median(theirs, "wall_s"), "ratio_ours_to_cp": round(ratio, 2)}
            if args.fs == "xfs":
                summary |= {"extra_disk_mb": median(mine, "extra_disk_mb"),
                            "extra_disk_fraction": median(mine, "extra_disk_fraction")}  # fmt: skip
            emit(summary)
            remove(out)
            remove(src)
    finally:
        remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
