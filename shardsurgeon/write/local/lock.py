"""A non-blocking lock held through a lock file: exclusive, naming its holder, or shared.

Shared locks let the writers of one distributed job (``apply --shards``) work side by side while
keeping out any exclusive holder (a run, a finalize), and the other way round. A shared holder
never removes the file nor writes its name in it; where the filesystem cannot lock, a shared lock
is only best effort (no lock) and says so through :attr:`Lock.held`.

Locks with ``flock`` where the filesystem supports it (the kernel drops the lock when its process
dies, however it dies), with ``msvcrt.locking`` on Windows, and else by creating the file with
``O_EXCL``; such a file left by a dead process on this host is stale and taken over. The file holds
the holder's pid, host and start time, so that a refused process can say who holds the lock, and
is removed on release. Owns nothing but the lock file it is given.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.names import HOLDER_MAX_BYTES

_NO_LOCKING = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock: a process on a host, since ``started`` (local time, ISO 8601)."""

    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {safe_text(self.host, 64)}, started {safe_text(self.started, 32)}"


class Lock:
    """A held lock; a context manager that releases it (and removes its file) on exit."""

    def __init__(self, path: Path, fd: int | None, *, shared: bool = False, held: bool = True):
        self.path = path
        self.held = held
        self._fd = fd
        """The locked descriptor (``flock``, ``msvcrt``); None when the lock is the file's existence."""
        self._identity = None if shared else _identity(path)

    def release(self) -> None:
        """Remove the lock file if it is still ours, then unlock: a process that opened the file just
        before sees it gone when it gets the lock, and tries again on a fresh one."""
        if self._identity is not None and _identity(self.path) == self._identity:
            with contextlib.suppress(OSError):  # Windows cannot remove a locked file: the next holder reuses it
                self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)
        self._identity = self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def acquire(path: Path, what: str, *, shared: bool = False) -> Lock:
    """Take the lock of ``path`` or raise OutputError naming ``what`` is locked and by whom."""
    for _ in range(_ATTEMPTS):
        existed = os.path.lexists(path)
        fd = _open_lock_file(path, what)
        try:
            if not _lock_fd(fd, shared):
                created = not existed and _identity_fd(fd) == _identity(path)
                os.close(fd)
                if created:  # the empty file just made would otherwise read as a lock of unknown holder
                    path.unlink(missing_ok=True)
                if shared:
                    return Lock(path, None, shared=True, held=False)
                return _acquire_by_creation(path, what)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(_busy(what, holder, path, stale_hint=False)) from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"{what}: cannot lock {safe_text(path)}: {e.strerror or e}") from None
        if _identity_fd(fd) == _identity(path):  # else the holder removed it while we waited: retry
            if shared:
                return Lock(path, fd, shared=True)
            try:
                _write_holder(fd)
            except OSError as e:
                if _identity_fd(fd) == _identity(path):
                    path.unlink(missing_ok=True)  # the empty file this run made: nothing is left behind
                os.close(fd)
                raise OutputError(f"{what}: cannot write the lock file {safe_text(path)}: {e.strerror or e}") from None
            return Lock(path, fd)
        os.close(fd)
    raise OutputError(f"{what}: cannot lock {safe_text(path)}: it keeps being replaced; run again")


def _open_lock_file(path: Path, what: str) -> int:
    """The lock file, opened without following a link and only if it is a regular file: whatever
    stands at its name, a run never writes through it."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(
                f"{what}: the lock file {safe_text(path)} is a symbolic link; remove it and run again"
            ) from None
        raise OutputError(f"{what}: cannot create the lock file {safe_text(path)}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{what}: the lock file {safe_text(path)} is not a regular file; remove it and run again")
    return fd


def _lock_fd(fd: int, shared: bool = False) -> bool:
    """Lock ``fd`` without waiting; False when this filesystem cannot lock files at all (or, on
    Windows, for a shared lock, which ``msvcrt`` cannot take)."""
    if sys.platform == "win32":
        if shared:
            return False
        import msvcrt

        try:  # a byte past the holder record, which other processes can then still read
            os.lseek(fd, HOLDER_MAX_BYTES, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            raise BlockingIOError(e.errno, e.strerror) from None
        return True
    try:
        import fcntl
    except ImportError:  # no flock here: the lock is the file's existence (see _acquire_by_creation)
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _NO_LOCKING:
            return False
        raise
    return True


def _acquire_by_creation(path: Path, what: str) -> Lock:
    """The fallback: the lock is the file's existence. A file whose holder is a dead process of this
    host is removed first (checked by its identity just before, so only that file is removed)."""
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            seen = _identity(path)
            holder = _read_holder_of(path)
            if holder is None or not _is_dead(holder):
                raise OutputError(_busy(what, holder, path, stale_hint=True)) from None
            if _identity(path) == seen:
                path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise OutputError(f"{what}: cannot create the lock file {safe_text(path)}: {e.strerror or e}") from None
        try:
            _write_holder(fd)
        finally:
            os.close(fd)
        return Lock(path, None)
    raise OutputError(f"{what}: cannot lock {safe_text(path)}: it keeps being replaced; run again")


def _busy(what: str, holder: Holder | None, path: Path, *, stale_hint: bool) -> str:
    who = str(holder) if holder is not None else f"or its apply --shards writers; lock file {safe_text(path)}"
    advice = "wait for it to finish, or stop it and run the same command again to resume"
    if stale_hint:
        advice += f"; if no such run exists, delete {safe_text(path)}"
    return f"{what}: another shardsurgeon run is writing it ({who}); {advice}"


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, record)


def _read_holder(fd: int) -> Holder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return _parse_holder(os.read(fd, HOLDER_MAX_BYTES))
    except OSError:
        return None


def _read_holder_of(path: Path) -> Holder | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _parse_holder(data: bytes) -> Holder | None:
    try:
        record = json.loads(data)
        pid, host, started = record["pid"], record["host"], record["started"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not (isinstance(pid, int) and isinstance(host, str) and isinstance(started, str)):
        return None
    return Holder(pid, host, started)


def _is_dead(holder: Holder) -> bool:
    """True only when the holder surely is gone: a process of this host that no longer exists."""
    if holder.host != socket.gethostname() or holder.pid <= 0 or sys.platform == "win32":
        return False  # os.kill on Windows would terminate the process instead of probing it
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _identity_fd(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino
