"""Throughput of the chunked cast and scale (``numerics.ChunkConverter``) in memory, no file I/O.

Drives a converter the way ``execute`` does (a reused source buffer, one chunk at a time) over
256 MB of weight-like values and prints one JSON line per conversion: MB/s of source bytes by wall
time and by the thread's CPU time (steadier when other processes share the cores), best of 5.
End-to-end casts, with reading and fsynced writing, are measured by ``expand.py --shape wide``.

    python bench/cast.py [--mb 256] [--append-results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from shardsurgeon.write.numerics import ChunkConverter

CASES = [
    ("BF16", "F16", 1.0),
    ("BF16", "BF16", 0.7),
    ("BF16", "F16", 0.7),
    ("F16", "BF16", 1.0),
    ("BF16", "F32", 1.0),
    ("F32", "BF16", 1.0),
    ("F32", "F16", 1.0),
]
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def source_bytes(dtype: str, nbytes: int) -> bytes:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(nbytes // 2, dtype=np.float32) * np.float32(0.02)  # weight-like
    numpy_type = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[dtype]
    return values.astype(numpy_type).tobytes()[:nbytes]


def measure(src: str, dst: str, scale: float, data: bytes) -> dict[str, object]:
    converter = ChunkConverter(src, dst, scale)
    step = converter.chunk_src_bytes
    buffer = bytearray(step)
    raw = memoryview(data)
    best_wall = best_cpu = float("inf")
    for _ in range(5):
        wall = cpu = 0.0
        for start in range(0, len(raw), step):
            view = memoryview(buffer)[: min(step, len(raw) - start)]
            view[:] = raw[start : start + len(view)]  # stands in for the pread into the reused buffer
            wall_start, cpu_start = time.perf_counter(), time.thread_time()
            converter.convert(view)
            wall += time.perf_counter() - wall_start
            cpu += time.thread_time() - cpu_start
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    return {
        "conversion": f"{src}->{dst}" + ("" if scale == 1.0 else f" x{scale:g}"),
        "source_mb": round(len(raw) / 1e6),
        "wall_mb_per_s": round(len(raw) / best_wall / 1e6),
        "cpu_mb_per_s": round(len(raw) / best_cpu / 1e6),
        "converter_mib": round(converter.nbytes / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="source megabytes per conversion")
    parser.add_argument("--append-results", action="store_true", help="append a table to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for src, dst, scale in CASES:
        row = measure(src, dst, scale, source_bytes(src, args.mb * 10**6))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.append_results:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"\n## chunked cast in memory (`bench/cast.py`), {stamp}\n", "", "| " + " | ".join(rows[0]) + " |"]
        lines.append("|" + " --- |" * len(rows[0]))
        lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
        with RESULTS_PATH.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
