"""Build raw safetensors bytes and tiny checkpoint folders for tests.

``raw_file`` writes the bytes exactly as given (any JSON, any length field), so malformed files can
be crafted without going through the code under test. ``tensor_bytes`` fills each tensor from a hash
of its own name, so a misplaced byte is caught.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from shardsurgeon import encode_header, tensor_nbytes

Spec = tuple[str, str, tuple[int, ...]]
"""A tensor to write: ``(name, dtype, shape)``."""


def tensor_bytes(name: str, nbytes: int) -> bytes:
    """Deterministic bytes that say which tensor they belong to."""
    return hashlib.shake_256(name.encode()).digest(nbytes)


def header_json(header: Any) -> bytes:
    """Compact JSON, as the reference writer emits it, without padding."""
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def raw_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """8-byte length, header (an object to dump as JSON, or raw bytes), then ``data``.

    ``length`` overrides the length field, to craft files that lie about their header size.
    """
    text = header if isinstance(header, bytes) else header_json(header)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_safetensors(path: Path, specs: list[Spec], metadata: dict[str, str] | None = None) -> dict[str, bytes]:
    """Write a valid file with ``encode_header`` and return each tensor's bytes by name."""
    data = {name: tensor_bytes(name, tensor_nbytes(dtype, shape)) for name, dtype, shape in specs}
    entries = [(name, dtype, shape, len(data[name])) for name, dtype, shape in specs]
    path.write_bytes(encode_header(entries, metadata) + b"".join(data.values()))
    return data


def write_index(folder: Path, weight_map: dict[str, str], total_size: int = 0) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return path


def write_config(folder: Path, config: dict[str, Any] | None = None) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(config if config is not None else {"num_hidden_layers": 2}))
    return path


def make_checkpoint(folder: Path, shards: dict[str, list[Spec]], *, index: bool | None = None) -> dict[str, bytes]:
    """A checkpoint folder with config.json, the given shards and (by default when there are
    several shards) an index mapping every tensor to its shard. Returns tensor bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder)
    data: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for shard_name, specs in shards.items():
        data |= write_safetensors(folder / shard_name, specs, {"format": "pt"})
        weight_map |= {name: shard_name for name, _, _ in specs}
    if index if index is not None else len(shards) > 1:
        write_index(folder, weight_map, sum(len(b) for b in data.values()))
    return data
