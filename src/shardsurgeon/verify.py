"""Check a written checkpoint against the plan that made it, streaming, in fixed-size chunks.

Each output tensor is compared with what its op says it must hold: the source bytes (copy), zeros,
or the source recomputed through the same cast and scale (convert). Reads only; writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.format import read_header
from shardsurgeon.layout import Layout, PlacedTensor
from shardsurgeon.numerics import ChunkConverter

CHUNK_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Mismatch:
    shard: str
    tensor: str
    problem: str


def compare_with_plan(layout: Layout, folder: Path) -> list[Mismatch]:
    """Every way the shards in ``folder`` differ from ``layout``; empty when they match exactly."""
    mismatches: list[Mismatch] = []
    for shard in layout.shards:
        path = folder / shard.name
        if not path.is_file():
            mismatches.append(Mismatch(shard.name, "", "shard file is missing"))
            continue
        header = read_header(path)
        with open(path, "rb") as f:
            if f.read(len(shard.header)) != shard.header:
                mismatches.append(Mismatch(shard.name, "", "header differs from the plan's"))
                continue
        assert header.data_start == len(shard.header)
        out_fd = os.open(path, os.O_RDONLY)
        try:
            for placed in shard.tensors:
                if not _tensor_matches(placed, out_fd):
                    what = {"copy": "source bytes", "zeros": "zeros", "convert": "converted source"}
                    mismatches.append(
                        Mismatch(shard.name, placed.tensor.name, f"bytes differ from the {what[placed.tensor.op]}")
                    )
        finally:
            os.close(out_fd)
    return mismatches


def _tensor_matches(placed: PlacedTensor, out_fd: int) -> bool:
    tensor = placed.tensor
    expected = _expected_chunks(placed)
    offset = placed.offset
    for chunk in expected:
        if os.pread(out_fd, len(chunk), offset) != chunk:
            return False
        offset += len(chunk)
    return offset == placed.offset + tensor.nbytes


def _expected_chunks(placed: PlacedTensor) -> Iterator[bytes]:
    tensor = placed.tensor
    if tensor.op == "zeros":
        for start in range(0, tensor.nbytes, CHUNK_BYTES):
            yield bytes(min(CHUNK_BYTES, tensor.nbytes - start))
        return
    src_fd = os.open(tensor.source.path, os.O_RDONLY)
    try:
        if tensor.op == "copy":
            for start in range(0, tensor.nbytes, CHUNK_BYTES):
                yield os.pread(src_fd, min(CHUNK_BYTES, tensor.nbytes - start), tensor.source.data_start + start)
            return
        converter = ChunkConverter(tensor.source.dtype, tensor.dtype, tensor.scale)
        step = converter.chunk_src_bytes
        for start in range(0, tensor.source.nbytes, step):
            raw = os.pread(src_fd, min(step, tensor.source.nbytes - start), tensor.source.data_start + start)
            yield bytes(converter.convert(memoryview(raw)))
    finally:
        os.close(src_fd)
