"""Open a Hugging Face checkpoint folder and index its tensors from the headers alone.

Accepts a folder holding ``model.safetensors.index.json`` and its shards, a folder with a single
``model.safetensors``, or a Hugging Face cache entry (``models--org--name``, or one of its snapshot
folders whose files are symlinks to blobs). Reads headers and JSON only, never tensor data, and
never writes anything.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, safe_text
from shardsurgeon.format import MAX_TENSORS, Header, TensorRef, read_header
from shardsurgeon.model.hfcache import snapshot
from shardsurgeon.model.index import Listing, index_names, listing, parse_json, read_index
from shardsurgeon.model.table import TensorTable
from shardsurgeon.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from shardsurgeon.storage.remote import RemoteFolder, file_name, is_url, normal_url
from shardsurgeon.storage.smallfile import MAX_CONFIG_BYTES, MAX_JSON_BYTES, read_small
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
    is a local folder or (a ``str``) a folder URL, ``fetched_nbytes`` what opening a URL fetched.
    An opened checkpoint's ``tensors`` are a compact :class:`TensorTable`; tests may give a dict."""

    folder: Path | str
    tensors: Mapping[str, TensorRef]
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
    headers = (_read_shard(root, shard_name) for shard_name in shard_names)
    index_path = root / INDEX_FILE

    def names() -> dict[str, set[str]]:
        return index_names(read_small(index_path, MAX_JSON_BYTES, CheckpointError, "JSON"), index_path)

    tensors, shards = _collect(str(root), index_path, shard_names, headers, names)
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
    shard_names: dict[str, Listing | None] = {SINGLE_FILE: None}
    if index is not None:
        shard_names = {**read_index(index, remote.where(INDEX_FILE))}
    missing = f"though {INDEX_FILE} lists it" if index is not None else f"and neither is {INDEX_FILE}"
    index = None  # 10 MB for 100,000 tensors: read again only to say what is wrong
    headers = (_read_remote_shard(remote, shard_name, missing) for shard_name in shard_names)

    def names() -> dict[str, set[str]]:
        raw = remote.read_small(INDEX_FILE, MAX_JSON_BYTES, "JSON") or b"{}"
        return index_names(raw, remote.where(INDEX_FILE))

    tensors, shards = _collect(remote.url, remote.where(INDEX_FILE), shard_names, headers, names)
    return Checkpoint(remote.url, tensors, shards, config, remote.fetched_nbytes)


def read_remote_shard(remote: RemoteFolder, shard_name: str, missing: str) -> tuple[Shard, list[TensorRef]]:
    """The file ``shard_name`` under ``remote`` and its tensors, from its header; ``missing`` ends the
    message when there is no such file."""
    shard, header = _read_remote_shard(remote, shard_name, missing)
    return shard, _refs(shard.path, header)


def _read_remote_shard(remote: RemoteFolder, shard_name: str, missing: str) -> tuple[Shard, Header]:
    where = remote.where(shard_name)
    found = remote.read_header(shard_name, missing)
    header = found.header
    version = SourceVersion(
        where, header.data_start + header.data_nbytes, found.sha256, validator=found.etag, modified=found.modified
    )
    return Shard(where, version), header


def _collect(
    root: str,
    index_path: Path | str,
    shard_names: dict[str, Listing | None],
    headers: Iterable[tuple[Shard, Header]],
    index_names: Callable[[], dict[str, set[str]]],
) -> tuple[TensorTable, tuple[Shard, ...]]:
    """Every shard's tensors in one table, checked against the index: no tensor twice, none missing.

    Each shard's names are checked by their count and the sum of their hashes; only where those
    differ is the index read again (``index_names``) to say which name is wrong.
    """
    tensors = TensorTable()
    shards = []
    for (shard_name, listed), (shard, header) in zip(shard_names.items(), headers, strict=True):
        shards.append(shard)
        if listed is not None and listed != listing(e.name for e in header.tensors):
            expected = index_names().get(shard_name, set())
            problem = _mismatch(root, index_path, shard_name, shard, header, tensors, expected)
            if problem is not None:  # else the index names a tensor twice, which json.loads forgives
                raise problem
        tensors.add_header(shard.path, header)
        if len(tensors) > MAX_TENSORS:
            raise CheckpointError(f"{root}: the shards hold more than the {MAX_TENSORS} tensors supported")
    if not tensors:
        names = ", ".join(file_name(s.path) for s in shards)
        raise CheckpointError(f"{root}: the checkpoint holds no tensors; expected at least one in {names}")
    return tensors, tuple(shards)


def _mismatch(
    root: str, index_path: Path | str, shard_name: str, shard: Shard, header: Header, earlier: TensorTable,
    expected: set[str],
) -> CheckpointError | None:  # fmt: skip
    """What is wrong with a shard whose names differ from its index's: the first tensor found in an
    earlier shard too, or one the index does not list, else the first the index lists that it lacks."""
    earlier_names = set(earlier)
    for entry in header.tensors:
        if entry.name in earlier_names:
            return CheckpointError(
                f"{root}: tensor {entry.name!r} is in both {file_name(earlier[entry.name].path)} and "
                f"{shard_name}; the checkpoint is inconsistent"
            )
        if entry.name not in expected:
            return CheckpointError(
                f"{shard.path}: holds tensor {entry.name!r} that {INDEX_FILE} does not list; "
                "the index and the shards disagree"
            )
    for name in sorted(expected - {e.name for e in header.tensors}):
        return CheckpointError(
            f"{index_path}: maps tensor {name!r} to {shard_name}, which does not hold it; "
            "the index and the shards disagree"
        )
    return None


def resolve_cache_entry(path: Path) -> Path:
    """Map a Hugging Face cache entry ``models--org--name`` to the snapshot its ``main`` ref names."""
    if (path / CONFIG_FILE).exists():
        return path
    return snapshot(path) or path


def _shard_names(root: Path) -> dict[str, Listing | None]:
    """Shard file names in sorted order, each with the tensor names the index assigns to it."""
    index_path = root / INDEX_FILE
    if index_path.exists():
        return {**read_index(read_small(index_path, MAX_JSON_BYTES, CheckpointError, "JSON"), index_path)}
    if os.path.lexists(root / SINGLE_FILE):  # a broken link too: reading it then says what is wrong
        return {SINGLE_FILE: None}
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))
    found = f"found only {', '.join(others)}" if others else "found no weights at all"
    raise CheckpointError(
        f"{root}: expected {INDEX_FILE} or {SINGLE_FILE}, {found}; pass a Hugging Face checkpoint "
        "folder with safetensors weights"
    )


def _read_shard(root: Path, shard_name: str) -> tuple[Shard, Header]:
    path = root / shard_name
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a loop of symbolic links, expected a safetensors file") from None
        raise CheckpointError(
            f"{path}: shard listed in {INDEX_FILE} is missing; download or copy the complete checkpoint"
        ) from None
    return _shard_header(path)


def read_shard(path: Path) -> tuple[Shard, list[TensorRef]]:
    """The local safetensors file at ``path`` and its tensors, from its header: its version is the
    one the header was read from."""
    shard, header = _shard_header(path)
    return shard, _refs(path, header)


def _refs(path: Path | str, header: Header) -> list[TensorRef]:
    return [TensorRef(e.name, path, e.dtype, e.shape, header.data_start + e.begin, e.nbytes) for e in header.tensors]


def _shard_header(path: Path) -> tuple[Shard, Header]:
    """The local safetensors file at ``path`` and its decoded header, with the version the header
    was read from."""
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
    return Shard(path, replace(seen, header_sha256=digest)), header  # the header pins the size: the file's


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
    config = parse_json(raw, path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config
