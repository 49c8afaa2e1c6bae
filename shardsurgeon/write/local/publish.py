"""Publishing a finished output folder: the names beside it, the crash-safe move into place, and the
recovery of a move that a killed run left half done.

Beside an output NAME live only hidden siblings ``.NAME.shardsurgeon-KIND``: ``partial`` (the
staging folder), ``lock``, ``commit`` (the journal of a move in progress) and ``old`` (an output
being replaced). A name that would pass the filesystem's 255 bytes is shortened with a hash of NAME,
the same every time, so a resume finds it.

A move writes the journal (the staging folder's device and inode, and its resume key) before any
rename. On Linux, ``renameat2`` publishes with ``RENAME_NOREPLACE`` and replaces with
``RENAME_EXCHANGE``: one atomic step, NAME is never missing. Elsewhere a replacement takes two
renames, NAME to ``old`` then staging to NAME. :func:`recover` runs under the output's lock before
anything else: if a journal shows that NAME already is the folder being published, it removes what
was replaced; if not, it puts the old NAME back and leaves the staging folder resumable. It returns
a note for each thing it did. Touches nothing but the output and its siblings.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.storage import fileio

NAME_MAX_BYTES = 255
"""Longest file name on the filesystems in use (ext4, XFS, btrfs, APFS, NTFS, tmpfs)."""
JOURNAL_MAX_BYTES = 4096
Identity = tuple[int, int]
"""A folder's device and inode: which folder a name holds, wherever it was moved."""


def sibling(out: Path, kind: str) -> Path:
    """The hidden sibling ``.NAME.shardsurgeon-KIND`` of ``out``, shortened with a hash if too long."""
    name = f".{out.name}.shardsurgeon-{kind}"
    if len(os.fsencode(name)) <= NAME_MAX_BYTES:
        return out.parent / name
    suffix = f"~{hashlib.sha256(os.fsencode(out.name)).hexdigest()[:16]}.shardsurgeon-{kind}"
    stem = out.name
    while len(os.fsencode(f".{stem}{suffix}")) > NAME_MAX_BYTES:
        stem = stem[:-1]
    return out.parent / f".{stem}{suffix}"


def folder_identity(path: Path) -> Identity | None:
    """What ``path`` itself is (a link is not followed); None when nothing is there."""
    try:
        stat = os.lstat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


Guard = Callable[[Path], None]
"""Called with each folder about to be removed; raises to keep it (it holds a source)."""


def _no_guard(path: Path) -> None:
    pass


def commit(staging: Path, out: Path, marker: str, guard: Guard = _no_guard) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing whatever ``out`` holds.

    ``marker`` names the staging folder's resume file: its key moves into the journal, so the
    published folder never holds it and an interrupted move can still be resumed. ``guard`` sees
    the replaced folder before it is removed.
    """
    journal, old = sibling(out, "commit"), sibling(out, "old")
    try:
        key = _read_small(staging / marker) if (staging / marker).is_file() else ""
        _write_journal(journal, staging, key)
        (staging / marker).unlink(missing_ok=True)
        fsync_dir(staging)
        if not os.path.lexists(out):
            _rename_no_replace(staging, out)
        elif _renameat2(staging, out, _RENAME_EXCHANGE):
            fsync_dir(out.parent)
            guard(staging)
            shutil.rmtree(staging)  # the staging name now holds what was at out
        else:
            os.rename(out, old)
            os.rename(staging, out)
            fsync_dir(out.parent)
            guard(old)
            shutil.rmtree(old)
        fsync_dir(out.parent)
        journal.unlink()
        fsync_dir(out.parent)
    except FileExistsError:
        raise OutputError(
            f"--out {safe_text(out)}: a folder appeared there while the run was finishing; it is left as it is, "
            f"and the finished output waits in {safe_text(staging.name)}: move that folder away and run the "
            "same command again to publish it"
        ) from None
    except OSError as e:
        raise OutputError(
            f"--out {safe_text(out)}: cannot move the finished output into place: {e.strerror or e}; "
            "run the same command again to finish"
        ) from None


def recover(out: Path, marker: str, guard: Guard = _no_guard) -> list[str]:
    """Finish or undo a move that a killed run left half done; returns what was done, in words.
    ``guard`` sees each folder before it is removed."""
    try:
        return _recover(out, marker, guard)
    except OSError as e:
        raise OutputError(
            f"--out {safe_text(out)}: cannot recover from an interrupted run: {e.strerror or e}; "
            f"see {safe_text(sibling(out, 'commit').name)} and {safe_text(sibling(out, 'old').name)} beside it"
        ) from None


def _recover(out: Path, marker: str, guard: Guard) -> list[str]:
    staging, old, journal = sibling(out, "partial"), sibling(out, "old"), sibling(out, "commit")
    if not os.path.lexists(journal):
        if not os.path.lexists(old):
            return []
        # A replacement without a journal (an earlier version): NAME missing means it was cut short.
        return [_restore(old, out)] if not os.path.lexists(out) else [_remove_replaced(old, out, guard)]
    published, key = _read_journal(journal)
    notes = []
    if published is None:  # torn while being written: no rename had started
        pass
    elif folder_identity(out) == published:
        notes += [_remove_replaced(leftover, out, guard) for leftover in (staging, old) if os.path.lexists(leftover)]
    elif os.path.lexists(old):
        if os.path.lexists(out):
            raise OutputError(
                f"--out {safe_text(out)}: both it and {safe_text(old.name)}, the folder an interrupted run was "
                f"replacing, exist; keep the one you want as {safe_text(out.name)}, delete the other, and run again"
            )
        notes.append(_restore(old, out))
    if published is not None and folder_identity(staging) == published and key is not None:
        (staging / marker).write_text(key)  # resumable again: its shards are kept if the plan is the same
    journal.unlink()
    fsync_dir(out.parent)
    return notes


def _restore(old: Path, out: Path) -> str:
    os.rename(old, out)
    fsync_dir(out.parent)
    return (
        f"put back {safe_text(out)} from {safe_text(old.name)}: an earlier run was stopped while replacing it, "
        "before the new output was in place"
    )


def _remove_replaced(leftover: Path, out: Path, guard: Guard) -> str:
    guard(leftover)
    if os.path.isdir(leftover) and not os.path.islink(leftover):
        shutil.rmtree(leftover)
    else:
        leftover.unlink()
    return (
        f"removed {safe_text(leftover.name)}: the folder that an earlier --force run replaced with "
        f"{safe_text(out)}, left there when that run was stopped just after publishing"
    )


def _write_journal(journal: Path, staging: Path, key: str) -> None:
    stat = os.stat(staging)
    record = json.dumps({"staging": [stat.st_dev, stat.st_ino], "resume": key}).encode()
    fd = fileio.open_new(journal)  # never written through whatever stood at that name
    try:
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view) :]
        fileio.durable_sync(fd)
    finally:
        os.close(fd)
    fsync_dir(journal.parent)


def _read_journal(journal: Path) -> tuple[Identity | None, str | None]:
    """The published folder's identity and resume key; (None, None) for a torn or foreign file."""
    try:
        record = json.loads(_read_small(journal))
        device, inode = record["staging"]
        key = record["resume"]
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None, None
    if not (isinstance(device, int) and isinstance(inode, int) and isinstance(key, str)):
        return None, None
    return (device, inode), key


def _read_small(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        return os.read(fd, JOURNAL_MAX_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries durable (POSIX; Windows cannot open folders and needs no such call)."""
    fileio.sync_dir(folder)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None  # glibc before 2.28, or another libc without it
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_RENAMEAT2 = _load_renameat2()


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """One atomic rename with ``flags``; False when the kernel or filesystem does not offer it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename, failing with FileExistsError if ``target`` appeared (atomically so on Linux)."""
    if not _renameat2(source, target, _RENAME_NOREPLACE):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        os.rename(source, target)
