"""Bytes fetched to plan from a model behind a URL, against the model's size.

Builds a Mistral-7B-shaped checkpoint (32 layers, 2 shards, real names, shapes and headers) whose
tensor data are holes (sparse files: no disk used), serves it with the tests' range-honouring HTTP
server on 127.0.0.1, and prints what ``inspect`` and the seed recipe's ``expand --dry-run`` fetch.

    PYTHONPATH=. python bench/remote_headers.py
"""

from __future__ import annotations

import json
import math
import struct
import sys
import tempfile
import time
from pathlib import Path

from shardsurgeon.demo import mistral_config
from shardsurgeon.model.checkpoint import open_checkpoint
from shardsurgeon.units import format_bytes
from tests._servers import serve_http
from tests.conftest import tiny_specs

SHAPE = {"hidden": 4096, "intermediate": 14336, "kv": 1024, "vocab": 32000}
LAYERS = 32


def sparse_checkpoint(folder: Path, shards: int = 2) -> int:
    """Headers as the reference writer lays them out; data as holes. Returns the checkpoint's bytes."""
    specs = tiny_specs(LAYERS, **SHAPE)
    groups = [specs[i * len(specs) // shards : (i + 1) * len(specs) // shards] for i in range(shards)]
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor, dims in group:
            nbytes = 2 * math.prod(dims)
            header[tensor] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor] = name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)
        total += 8 + len(text) + offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = mistral_config(LAYERS, SHAPE["hidden"], SHAPE["intermediate"], 32, 8, SHAPE["vocab"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> None:
    from shardsurgeon.api import plan_expand

    with tempfile.TemporaryDirectory(prefix="shardsurgeon-remote-bench-") as scratch:
        folder = Path(scratch)
        size = sparse_checkpoint(folder)
        with serve_http(folder) as server:
            url = f"{server.url}/hub/"
            started = time.perf_counter()
            checkpoint = open_checkpoint(url)
            seconds = time.perf_counter() - started
            requests = len(server.requests)
            job = plan_expand(url, dups=[(31, 12)], zero=("o_proj", "down_proj"))
            fetched_plan = job.sources[url].checkpoint.fetched_nbytes
        print(f"checkpoint: Mistral-7B shape, {len(checkpoint.shards)} shards, {format_bytes(size)}")
        print(
            f"inspect by URL: fetched {format_bytes(checkpoint.fetched_nbytes)} in {seconds:.2f} s "
            f"({checkpoint.fetched_nbytes / size:.6%} of the checkpoint), {requests} requests"
        )
        print(f"expand --dup 31x12 --dry-run by URL: fetched {format_bytes(fetched_plan)}")


if __name__ == "__main__":
    sys.exit(main())
