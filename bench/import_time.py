"""Wall time and peak RSS of importing what a run loads, each in a fresh interpreter.

A job of a few GB is seconds of I/O; an import that costs seconds is a real share of it (ml_dtypes
0.7.0 took 5-6 s on the benchmark machine, 0.6.0 0.4 s). For each Python given (default: this
one), ``--runs`` fresh processes per module, alternating between the Pythons, medians printed as
JSON lines, with the module's version.

    python bench/import_time.py [--python /path/to/python ...] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from expand import run_child

MODULES = ("numpy", "ml_dtypes", "tokenizers", "shardsurgeon.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    pythons = args.python or [sys.executable]
    for module in MODULES:
        times: dict[str, list[tuple[float, float]]] = {p: [] for p in pythons}
        versions = {}
        for _ in range(args.runs):
            for python in pythons:
                code = f"import {module}, importlib.metadata as m; print(m.version('{module.split('.')[0]}'))"
                child = run_child([python, "-c", code])
                if child.exit_code != 0:
                    versions[python] = "not installed"
                    continue
                versions[python] = child.output_tail.splitlines()[-1]
                times[python].append((child.wall_s, child.peak_rss_mb))
        for python, runs in times.items():
            if runs:
                print(json.dumps({
                    "python": python, "module": module, "version": versions[python],
                    "wall_s": round(statistics.median(w for w, _ in runs), 2),
                    "peak_rss_mb": round(statistics.median(r for _, r in runs), 1), "runs": len(runs),
                }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
