"""A checkpoint folder read file by file, local or by URL: the one seam :mod:`verify` reads through.

:func:`open_folder` gives a :class:`LocalFolder` for a path and a :class:`UrlFolder` for an
``s3://`` or ``https://`` folder. Both answer the same few questions: which shard files there are,
a small file's bytes, a shard's header, a file's SHA-256, and the path or URL a tensor's bytes are
read from (by :class:`~shardsurgeon.remote.SourceFiles`). A missing file is None, not an error; a
small file too large or not a regular file is a VerifyError, a corrupt header a FormatError (both
findings for verify); a server that cannot be reached is a CheckpointError. A web server lists
nothing, so its shards are the ones the index names, or ``model.safetensors`` without an index, as
:mod:`checkpoint` opens a model by URL; a stray shard beside them cannot be seen there. Reads only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shardsurgeon.errors import VerifyError
from shardsurgeon.format import Header, read_header
from shardsurgeon.model.checkpoint import SINGLE_FILE
from shardsurgeon.storage.remote import RemoteFolder, is_url
from shardsurgeon.storage.smallfile import read_small


class CheckpointFolder(Protocol):
    @property
    def shown(self) -> Path | str:
        """The folder as reports name it: its path, or its URL with one trailing slash."""

    def shard_names(self, indexed: Collection[str] | None) -> list[str]:
        """The safetensors files, hidden ones aside, in name order; where nothing can be listed, those
        of ``indexed`` (the index's shards; None when there is no index) that could be there."""

    def read_small(self, name: str, limit: int, what: str) -> bytes | None:
        """The whole file ``name``, or None when there is none; VerifyError past ``limit`` bytes."""

    def header(self, name: str) -> Header | None:
        """The validated header of the shard ``name``, or None when there is no such file."""

    def sha256(self, name: str) -> str | None:
        """The SHA-256 of the file ``name`` (read in chunks), or None when there is no such file."""

    def path(self, name: str) -> Path | str:
        """Where the file ``name`` is: a TensorRef's path."""


def open_folder(folder: str | os.PathLike[str]) -> CheckpointFolder:
    """The folder at a path or URL; VerifyError when a local one does not exist."""
    if isinstance(folder, str) and is_url(folder):
        return UrlFolder(RemoteFolder(folder))
    root = Path(folder)
    if not root.is_dir():
        raise VerifyError(f"{root}: no such folder; pass the checkpoint folder to verify")
    return LocalFolder(root)


@dataclass(frozen=True, slots=True)
class LocalFolder:
    root: Path

    @property
    def shown(self) -> Path:
        return self.root

    def shard_names(self, indexed: Collection[str] | None) -> list[str]:
        return _shards(entry.name for entry in self.root.iterdir())

    def read_small(self, name: str, limit: int, what: str) -> bytes | None:
        path = self.root / name
        return read_small(path, limit, VerifyError, what) if path.exists() else None

    def header(self, name: str) -> Header | None:
        return read_header(self.root / name)

    def sha256(self, name: str) -> str | None:
        path = self.root / name
        return file_sha256(path) if path.is_file() else None

    def path(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True, slots=True)
class UrlFolder:
    remote: RemoteFolder

    @property
    def shown(self) -> str:
        return self.remote.url

    def shard_names(self, indexed: Collection[str] | None) -> list[str]:
        guess = (SINGLE_FILE,) if indexed is None else tuple(indexed)
        return _shards(self.remote.file_names(otherwise=guess))

    def read_small(self, name: str, limit: int, what: str) -> bytes | None:
        return self.remote.read_small(name, limit, what, VerifyError)

    def header(self, name: str) -> Header | None:
        found = self.remote.find_header(name)
        return None if found is None else found.header

    def sha256(self, name: str) -> str | None:
        return self.remote.sha256(name)

    def path(self, name: str) -> str:
        return self.remote.where(name)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shards(names: Iterable[str]) -> list[str]:
    """Shard file names, not hidden, each once; plain names only (an index may name anything)."""
    return sorted({name for name in names if name.endswith(".safetensors") and _plain(name)})


def _plain(name: str) -> bool:
    return not name.startswith(".") and "/" not in name and "\\" not in name
