"""Open a Hugging Face checkpoint folder and index its tensors from the headers alone.

Accepts a folder holding ``model.safetensors.index.json`` and its shards, a folder with a single
``model.safetensors``, or a Hugging Face cache entry (``models--org--name``, or one of its snapshot
folders whose files are symlinks to blobs). Reads headers and JSON only, never tensor data, and
never writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError
from shardsurgeon.format import read_header
from shardsurgeon.hfcache import snapshot
from shardsurgeon.identity import FileIdentity, check_unchanged, record
from shardsurgeon.smallfile import MAX_JSON_BYTES, PARSE_ERRORS, read_small

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one source tensor's bytes live: ``data_start`` is an absolute offset in ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    data_start: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Shard:
    """One source shard file: its size, a digest of its header, which pins its layout, and the file's
    identity when its header was read, which a run checks again before it publishes."""

    path: Path
    nbytes: int
    header_sha256: str
    identity: FileIdentity | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A source checkpoint: tensors in source order (shard file name, then data offset)."""

    folder: Path
    tensors: dict[str, TensorRef]
    shards: tuple[Shard, ...]
    config: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Index the checkpoint in ``folder``; raises CheckpointError or FormatError with the file named."""
    root = resolve_cache_entry(Path(folder))
    if not root.exists():
        raise CheckpointError(f"{root}: no such folder; pass the folder that holds config.json and the shards")
    if not root.is_dir():
        raise CheckpointError(f"{root}: is a file, expected a checkpoint folder (with config.json and shards)")
    shard_names = _shard_names(root)
    tensors: dict[str, TensorRef] = {}
    shards = []
    for shard_name, expected in shard_names.items():
        shard, refs = _read_shard(root, shard_name)
        shards.append(shard)
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {ref.name!r} is in both {tensors[ref.name].path.name} and "
                    f"{shard_name}; the checkpoint is inconsistent"
                )
            if expected is not None and ref.name not in expected:
                raise CheckpointError(
                    f"{shard.path}: holds tensor {ref.name!r} that {INDEX_FILE} does not list; "
                    "the index and the shards disagree"
                )
            tensors[ref.name] = ref
        for name in sorted((expected or set()) - {r.name for r in refs}):
            raise CheckpointError(
                f"{root / INDEX_FILE}: maps tensor {name!r} to {shard_name}, which does not hold it; "
                "the index and the shards disagree"
            )
    if not tensors:
        names = ", ".join(s.path.name for s in shards)
        raise CheckpointError(f"{root}: the checkpoint holds no tensors; expected at least one in {names}")
    return Checkpoint(root, tensors, tuple(shards), _read_config(root))


def resolve_cache_entry(path: Path) -> Path:
    """Map a Hugging Face cache entry ``models--org--name`` to the snapshot its ``main`` ref names."""
    if (path / CONFIG_FILE).exists():
        return path
    return snapshot(path) or path


def _shard_names(root: Path) -> dict[str, set[str] | None]:
    """Shard file names in sorted order, each with the tensor names the index assigns to it."""
    index_path = root / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f'{index_path}: expected an object with a "weight_map" of tensor name to shard file; '
                "the index is corrupt"
            )
        if not weight_map:
            raise CheckpointError(f"{index_path}: weight_map is empty; the checkpoint holds no tensors")
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} maps to {shard!r}, expected a file name in the same folder"
                )
            by_shard.setdefault(shard, set()).add(name)
        return {shard: by_shard[shard] for shard in sorted(by_shard)}
    if (root / SINGLE_FILE).exists():
        return {SINGLE_FILE: None}
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))
    found = f"found only {', '.join(others)}" if others else "found no weights at all"
    raise CheckpointError(
        f"{root}: expected {INDEX_FILE} or {SINGLE_FILE}, {found}; pass a Hugging Face checkpoint "
        "folder with safetensors weights"
    )


def _read_shard(root: Path, shard_name: str) -> tuple[Shard, list[TensorRef]]:
    path = root / shard_name
    if not path.exists():
        raise CheckpointError(
            f"{path}: shard listed in {INDEX_FILE} is missing; download or copy the complete checkpoint"
        )
    (seen,) = record([path])
    header = read_header(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(header.data_start)).hexdigest()
    check_unchanged([seen])  # the header and the digest describe the file that ``seen`` names
    refs = [TensorRef(e.name, path, e.dtype, e.shape, header.data_start + e.begin, e.nbytes) for e in header.tensors]
    shard = Shard(path, header.data_start + header.data_nbytes, digest, seen)
    return shard, refs


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint needs its config.json to describe the layers"
        )
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _read_json(path: Path) -> Any:
    raw = read_small(path, MAX_JSON_BYTES, CheckpointError, "JSON")
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read JSON (nested too deeply); the file is corrupt") from None
    except PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read JSON ({_clip(str(e))}); the file is corrupt") from None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
