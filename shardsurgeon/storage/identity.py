"""Source files' identities, recorded before a run reads them and checked again before it publishes.

A file's identity is its device and inode, its size, and its modification and change times. A
shard truncated and regrown in place, or replaced by another file of the same size, changes it even
with its old mtime put back (``touch -d``, ``cp -p``): no tool can set the change time back. Reads
file metadata only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import CheckpointError, safe_text


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a source file was when recorded; the path is followed, so a symlink records its target."""

    path: Path
    device: int
    inode: int
    nbytes: int
    mtime_ns: int
    ctime_ns: int


def record(paths: Iterable[Path]) -> tuple[FileIdentity, ...]:
    """The identity of every file in ``paths`` (each once); raises CheckpointError for one missing."""
    return tuple(_identity(path) for path in dict.fromkeys(paths))


def check_unchanged(recorded: Iterable[FileIdentity]) -> None:
    """Raise CheckpointError naming the first file whose identity is no longer the recorded one."""
    for before in recorded:
        try:
            now = _identity(before.path)
        except CheckpointError:
            raise CheckpointError(
                f"{safe_text(before.path)}: source file removed during the run; the output was not "
                "published; put it back and run the same command again"
            ) from None
        if now != before:
            raise CheckpointError(
                f"{safe_text(before.path)}: source file changed during the run ({_describe(before, now)}); "
                "the output was not published; run the same command again once the source no longer changes"
            )


def _identity(path: Path) -> FileIdentity:
    try:
        stat = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{safe_text(path)}: cannot read the source file: {e.strerror or e}") from None
    return FileIdentity(path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _describe(before: FileIdentity, now: FileIdentity) -> str:
    if (now.device, now.inode) != (before.device, before.inode):
        return "replaced by another file"
    if now.nbytes != before.nbytes:
        return f"{before.nbytes} bytes, now {now.nbytes}"
    if now.mtime_ns != before.mtime_ns:
        return "rewritten in place"
    return "changed in place with its modification time put back, or its permissions changed"
