"""Open a Hugging Face checkpoint folder and index its tensors from the headers alone.

Accepts a folder holding ``model.safetensors.index.json`` and its shards, a folder with a single
``model.safetensors``, or a Hugging Face cache entry (``models--org--name``, or one of its snapshot
folders whose files are symlinks to blobs). Reads headers and JSON only, never tensor data, and
never writes anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, safe_text
from shardsurgeon.format import MAX_TENSORS, TensorRef, read_header
from shardsurgeon.model.hfcache import snapshot
from shardsurgeon.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from shardsurgeon.storage.remote import RemoteFolder, file_name, is_url, normal_url
from shardsurgeon.storage.smallfile import MAX_CONFIG_BYTES, MAX_JSON_BYTES, PARSE_ERRORS, read_small
from shardsurgeon.storage.versions import SourceVersion, describe_change, local_version


@dataclass(frozen=True, slots=True)
class Shard:
    """One source shard file, and its version when its header was read: what a run checks again
    before it keeps or publishes anything made from it."""

    path: Path | str
    version: SourceVersion

    @property
    def nbytes(self) -> int:
        return self.version.nbytes

    @property
    def header_sha256(self) -> str:
        """The digest of its header, which pins the file's layout."""
        return self.version.header_sha256


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A source checkpoint: tensors in source order (shard file name, then data offset); ``folder``
    is a local folder or (a ``str``) a folder URL, ``fetched_nbytes`` what opening a URL fetched."""

    folder: Path | str
    tensors: dict[str, TensorRef]
    shards: tuple[Shard, ...]
    config: dict[str, Any]
    fetched_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Index the checkpoint in ``folder`` (a path, or an ``s3://``/``https://`` folder URL, whose
    index, config and shard headers are read by range requests); raises CheckpointError or
    FormatError with the file named."""
    if is_url(folder):
        return _open_remote(RemoteFolder(normal_url(str(folder))))
    root = resolve_cache_entry(Path(folder))
    if not root.exists():
        raise CheckpointError(f"{root}: no such folder; pass the folder that holds config.json and the shards")
    if not root.is_dir():
        raise CheckpointError(f"{root}: is a file, expected a checkpoint folder (with config.json and shards)")
    shard_names = _shard_names(root)
    shards_refs = (_read_shard(root, shard_name) for shard_name in shard_names)
    tensors, shards = _collect(str(root), root / INDEX_FILE, shard_names, shards_refs)
    return Checkpoint(root, tensors, shards, _read_config(root))


def _open_remote(remote: RemoteFolder) -> Checkpoint:
    """The checkpoint under a folder URL: a server lists no folders, so the index (or else the single
    file) is asked for by name; the config first, so that a wrong URL fails on it."""
    index = remote.read_small(INDEX_FILE, MAX_JSON_BYTES, "JSON")
    raw_config = remote.read_small(CONFIG_FILE, MAX_CONFIG_BYTES, "JSON")
    if raw_config is None:
        raise CheckpointError(
            f"{safe_text(remote.where(CONFIG_FILE))}: not found (404); pass the folder URL of a Hugging Face "
            "checkpoint, under which config.json and the weights sit (Hub: https://huggingface.co/ORG/NAME/resolve/main/)"
        )
    config = _config_of(raw_config, remote.where(CONFIG_FILE))
    if index is not None:
        shard_names = _index_shards(_parse_json(index, remote.where(INDEX_FILE)), remote.where(INDEX_FILE))
    else:
        shard_names = {SINGLE_FILE: None}
    missing = f"though {INDEX_FILE} lists it" if index is not None else f"and neither is {INDEX_FILE}"
    shards_refs = (read_remote_shard(remote, shard_name, missing) for shard_name in shard_names)
    tensors, shards = _collect(remote.url, remote.where(INDEX_FILE), shard_names, shards_refs)
    return Checkpoint(remote.url, tensors, shards, config, remote.fetched_nbytes)


def read_remote_shard(remote: RemoteFolder, shard_name: str, missing: str) -> tuple[Shard, list[TensorRef]]:
    """The file ``shard_name`` under ``remote`` and its tensors, from its header; ``missing`` ends the
    message when there is no such file."""
    where = remote.where(shard_name)
    found = remote.read_header(shard_name, missing)
    header = found.header
    refs = [TensorRef(e.name, where, e.dtype, e.shape, header.data_start + e.begin, e.nbytes) for e in header.tensors]
    version = SourceVersion(
        where, header.data_start + header.data_nbytes, found.sha256, validator=found.etag, modified=found.modified
    )
    return Shard(where, version), refs


def _collect(
    root: str,
    index_path: Path | str,
    shard_names: dict[str, set[str] | None],
    shards_refs: Iterable[tuple[Shard, list[TensorRef]]],
) -> tuple[dict[str, TensorRef], tuple[Shard, ...]]:
    """Every shard's tensors in one map, checked against the index: no tensor twice, none missing."""
    tensors: dict[str, TensorRef] = {}
    shards = []
    for (shard_name, expected), (shard, refs) in zip(shard_names.items(), shards_refs, strict=True):
        shards.append(shard)
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {ref.name!r} is in both {file_name(tensors[ref.name].path)} and "
                    f"{shard_name}; the checkpoint is inconsistent"
                )
            if expected is not None and ref.name not in expected:
                raise CheckpointError(
                    f"{shard.path}: holds tensor {ref.name!r} that {INDEX_FILE} does not list; "
                    "the index and the shards disagree"
                )
            tensors[ref.name] = ref
        if len(tensors) > MAX_TENSORS:
            raise CheckpointError(f"{root}: the shards hold more than the {MAX_TENSORS} tensors supported")
        for name in sorted((expected or set()) - {r.name for r in refs}):
            raise CheckpointError(
                f"{index_path}: maps tensor {name!r} to {shard_name}, which does not hold it; "
                "the index and the shards disagree"
            )
    if not tensors:
        names = ", ".join(file_name(s.path) for s in shards)
        raise CheckpointError(f"{root}: the checkpoint holds no tensors; expected at least one in {names}")
    return tensors, tuple(shards)


def resolve_cache_entry(path: Path) -> Path:
    """Map a Hugging Face cache entry ``models--org--name`` to the snapshot its ``main`` ref names."""
    if (path / CONFIG_FILE).exists():
        return path
    return snapshot(path) or path


def _shard_names(root: Path) -> dict[str, set[str] | None]:
    """Shard file names in sorted order, each with the tensor names the index assigns to it."""
    index_path = root / INDEX_FILE
    if index_path.exists():
        return _index_shards(_read_json(index_path, MAX_JSON_BYTES), index_path)
    if os.path.lexists(root / SINGLE_FILE):  # a broken link too: reading it then says what is wrong
        return {SINGLE_FILE: None}
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))
    found = f"found only {', '.join(others)}" if others else "found no weights at all"
    raise CheckpointError(
        f"{root}: expected {INDEX_FILE} or {SINGLE_FILE}, {found}; pass a Hugging Face checkpoint "
        "folder with safetensors weights"
    )


def _index_shards(index: Any, index_path: Path | str) -> dict[str, set[str] | None]:
    """The shards an index names, sorted, each with the tensor names it assigns to that shard."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f'{index_path}: expected an object with a "weight_map" of tensor name to shard file; the index is corrupt'
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


def _read_shard(root: Path, shard_name: str) -> tuple[Shard, list[TensorRef]]:
    path = root / shard_name
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a loop of symbolic links, expected a safetensors file") from None
        raise CheckpointError(
            f"{path}: shard listed in {INDEX_FILE} is missing; download or copy the complete checkpoint"
        ) from None
    return read_shard(path)


def read_shard(path: Path) -> tuple[Shard, list[TensorRef]]:
    """The local safetensors file at ``path`` and its tensors, from its header: its version is the
    one the header was read from."""
    seen = local_version(path, "")
    header = read_header(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(header.data_start)).hexdigest()
    now = local_version(path, "")
    if not seen.same_as(now):  # the header and its digest must describe the file that ``seen`` names
        raise CheckpointError(
            f"{safe_text(path)}: source file changed while its header was read ({describe_change(seen, now)}); "
            "run again once the source no longer changes"
        )
    refs = [TensorRef(e.name, path, e.dtype, e.shape, header.data_start + e.begin, e.nbytes) for e in header.tensors]
    return Shard(path, replace(seen, header_sha256=digest)), refs  # the header pins the size: the file's


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint needs its config.json to describe the layers"
        )
    return _config_of(read_small(path, MAX_CONFIG_BYTES, CheckpointError, "JSON"), path)


def _config_of(raw: bytes | None, path: Path | str) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint needs its config.json to describe the layers"
        )
    config = _parse_json(raw, path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _read_json(path: Path, limit: int) -> Any:
    return _parse_json(read_small(path, limit, CheckpointError, "JSON"), path)


def _parse_json(raw: bytes, path: Path | str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read JSON (nested too deeply); the file is corrupt") from None
    except PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read JSON ({_clip(str(e))}); the file is corrupt") from None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
