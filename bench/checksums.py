"""What ``--checksums`` costs: the seed recipe with and without it, alternating, medians of pairs.

    python bench/checksums.py --shape 1b [--pairs 3] [--workdir DIR]

Generates the shape's source (make_checkpoint.py), then runs ``shardsurgeon expand`` with the seed
recipe into a fresh output, once plain and once with ``--checksums``, alternating, after a warm-up
of each. Each run is a child measured by expand.py's ``run_child`` (wall time, its own peak RSS, the
timed sync after it). Prints one JSON line per run and a summary line, and removes what it made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from expand import default_exe, run_child
from make_checkpoint import SHAPES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "shardsurgeon-bench-crc")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "src"
    try:
        maker = [sys.executable, str(Path(__file__).with_name("make_checkpoint.py")), "--shape", args.shape]
        subprocess.run([*maker, "--out", str(src)], check=True)
        layers = SHAPES[args.shape].num_hidden_layers
        base = [default_exe(), "expand", "--src", str(src), "--dup", f"{layers - 1}x12", "--zero", "o_proj,down_proj"]
        walls: dict[str, list[float]] = {"plain": [], "checksums": []}
        for number in range(args.pairs + 1):  # the first pair warms the page cache
            for kind in ("plain", "checksums"):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                extra = ["--checksums"] if kind == "checksums" else []
                child = run_child([*base, "--out", str(out), "-q", *extra])
                if child.exit_code != 0:
                    print(child.output_tail, file=sys.stderr)
                    return 1
                record = {
                    "run": number,
                    "kind": kind,
                    "wall_s": round(child.wall_s, 3),
                    "peak_rss_mb": child.peak_rss_mb,
                }
                print(json.dumps(record), flush=True)
                if number:
                    walls[kind].append(child.wall_s)
        plain, checked = statistics.median(walls["plain"]), statistics.median(walls["checksums"])
        ratios = [c / p for p, c in zip(walls["plain"], walls["checksums"], strict=True)]
        summary = {
            "shape": args.shape,
            "pairs": args.pairs,
            "plain_s": round(plain, 2),
            "checksums_s": round(checked, 2),
            "ratio_median": round(statistics.median(ratios), 3),
        }
        print(json.dumps(summary), flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
