"""File I/O at offsets, range copies, holes and durability: one layer, the same bytes on every platform.

Owns every system call that moves file bytes or makes them durable, and the choice, per platform,
between a fast path and a portable one. Each capability is looked up when it is called, never at
import, so tests can hide the Linux-only calls and run the portable paths on Linux:

============  ==========================================  ==============================================
what          fast path (where it exists)                  portable path (needs only file descriptors)
============  ==========================================  ==============================================
read          ``os.preadv``, else ``os.pread``             lock + ``lseek`` + ``FileIO.readinto``
write         ``os.pwrite``                                lock + ``lseek`` + ``os.write``
copy          ``os.copy_file_range`` (clones on XFS and    chunked read and write through one reused
              btrfs when offsets are block-congruent)      buffer of ``CHUNK_BYTES``
durable sync  ``fcntl(F_FULLFSYNC)`` on macOS              ``os.fsync`` (``FlushFileBuffers`` on Windows)
file size     ``SetFileInformationByHandle`` on a file     ``os.ftruncate``
              marked sparse (Windows)
============  ==========================================  ==============================================

Holes: a file extended by :func:`set_size` reads back as zeros on every platform, so a tensor
that is never written reads as zeros. POSIX requires it of ``ftruncate`` (Linux, macOS: APFS keeps
a hole, HFS+ writes the zeros). Windows documents an extension by end-of-file as "not defined",
but no Windows filesystem returns old disk contents without the privileged ``SetFileValidData``:
NTFS and exFAT read zeros past a file's valid data length, and sparse ranges read as zeros.

Must not: know about tensors, safetensors or checkpoints; hold a buffer larger than a chunk; write
to a file it was not asked to write. Errors are plain ``OSError`` (and :class:`SourceEnded`), which
the executor turns into messages that name the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from shardsurgeon.names import CHUNK_BYTES

KERNEL_CALL_BYTES = 64 << 20
"""Largest single ``copy_file_range`` call: keeps progress smooth and Ctrl-C prompt. A multiple of
every block size, so a body split into calls stays aligned."""
BLOCK_BYTES = 4096
"""Block size assumed where the filesystem does not say (the usual size on ext4, XFS, btrfs, APFS, NTFS)."""

_KERNEL_REFUSALS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM})
"""Errors that mean "this kernel or filesystem pair cannot copy_file_range", not "the copy failed"."""
_NO_ANSWER = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})

# Linux ioctls, from <linux/fs.h> and <linux/fiemap.h>.
FICLONERANGE = 0x4020940D
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, _
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_BATCH = 256
_FILE_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset

_SEEK_LOCKS = tuple(threading.Lock() for _ in range(64))
"""Where there is no pread/pwrite, a read or write is a seek then a transfer on the descriptor's one
shared file position, which another thread could move in between. Locks are striped by descriptor
number: a fixed set, so nothing grows or needs cleaning, and two descriptors sharing a stripe only
wait for each other. Descriptors made by ``os.dup`` share the position but not the number: do not
use duplicates of one descriptor from two threads on the portable path."""


class SourceEnded(EOFError):
    """The file ended before the range asked for: it was truncated or replaced while being read."""

    def __init__(self, fd: int, offset: int) -> None:
        super().__init__(f"file descriptor {fd} ends at byte {offset}")
        self.fd = fd
        self.offset = offset


# --- opening ------------------------------------------------------------------------------------


def _open_flags() -> int:
    """O_BINARY matters on Windows, where the CRT would otherwise translate newlines in file data."""
    return getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)


def open_read(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, binary and not inherited by child processes."""
    return os.open(path, os.O_RDONLY | _open_flags())


def open_new(path: str | os.PathLike[str]) -> int:
    """A write-only descriptor of a new, empty file at ``path``, binary, not inherited. Whatever stood
    at that name (a file, a link to one) is unlinked first, never truncated or written through: a
    name that is a hard or symbolic link to a source file cannot lead a write into it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _open_flags(), 0o644)


# --- positional read and write ------------------------------------------------------------------


def read_at(fd: int, view: bytearray | memoryview, offset: int) -> int:
    """Fill ``view`` with the file's bytes from ``offset``; returns how many were read.

    Fewer than ``len(view)`` only at the end of the file. Safe to call from several threads on the
    same descriptor; on the portable path it moves the descriptor's file position (see _SEEK_LOCKS).
    """
    target = memoryview(view).cast("B")
    done = 0
    while done < len(target):
        got = _read_once(fd, target[done:], offset + done)
        if got == 0:
            break
        done += got
    return done


def read_bytes_at(fd: int, nbytes: int, offset: int) -> bytes:
    """Up to ``nbytes`` from ``offset`` as a new bytes object (shorter only at the end of the file),
    for callers that compare rather than stream; like ``os.pread``, which Windows lacks."""
    buffer = bytearray(nbytes)
    return bytes(memoryview(buffer)[: read_at(fd, buffer, offset)])


def _read_once(fd: int, view: memoryview, offset: int) -> int:
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return int(preadv(fd, [view], offset))
    pread = getattr(os, "pread", None)
    if pread is not None:  # macOS before 11 has pread but no preadv
        data = pread(fd, len(view), offset)
        view[: len(data)] = data
        return len(data)
    with _SEEK_LOCKS[fd % len(_SEEK_LOCKS)]:
        os.lseek(fd, offset, os.SEEK_SET)
        return io.FileIO(fd, "r", closefd=False).readinto(view) or 0


def write_all_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``, however many calls it takes. Thread-safe like read_at."""
    view = memoryview(data).cast("B")
    pwrite = getattr(os, "pwrite", None)
    if pwrite is not None:
        while view:
            written = _advanced(pwrite(fd, view, offset))
            view, offset = view[written:], offset + written
        return
    with _SEEK_LOCKS[fd % len(_SEEK_LOCKS)]:
        os.lseek(fd, offset, os.SEEK_SET)
        while view:
            view = view[_advanced(os.write(fd, view)) :]


def _advanced(written: int) -> int:
    if written <= 0:  # a regular file never does this; looping on it would never end
        raise OSError(errno.EIO, "write made no progress")
    return written


# --- range copies -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """A piece of a range copy, relative to the start of the range."""

    start: int
    nbytes: int
    aligned: bool
    """Starts and ends on block boundaries in both files: a reflink filesystem can share it."""


def split_for_clone(src_offset: int, dst_offset: int, nbytes: int, block_bytes: int = BLOCK_BYTES) -> list[Span]:
    """Split a copy into an unaligned head, a block-aligned body and a tail.

    A filesystem can clone only whole blocks, and ``copy_file_range`` clones nothing when a call
    starts off a block boundary, so the body must be a call of its own. When the offsets differ
    modulo the block size no block lines up: the whole range is one unaligned span.
    """
    if nbytes <= 0:
        return []
    if (src_offset - dst_offset) % block_bytes:
        return [Span(0, nbytes, False)]
    head = min(-dst_offset % block_bytes, nbytes)
    body = (nbytes - head) // block_bytes * block_bytes
    spans = [Span(0, head, False), Span(head, body, True), Span(head + body, nbytes - head - body, False)]
    return [span for span in spans if span.nbytes]


Route = Literal["kernel", "user"]


@dataclass(frozen=True, slots=True)
class CopiedPiece:
    """Bytes that have just landed in the destination, for progress and writeback hints."""

    dst_offset: int
    nbytes: int
    route: Route
    """``kernel``: moved by copy_file_range; ``user``: read into the chunk buffer and written back."""
    aligned: bool


@dataclass(frozen=True, slots=True)
class CopyCounts:
    """What copies did, in bytes. ``aligned_kernel_bytes`` is what a reflink filesystem can share;
    whether it did is for :func:`shared_bytes` to say."""

    kernel_bytes: int = 0
    aligned_kernel_bytes: int = 0
    """Part of ``kernel_bytes``: block-aligned spans at congruent offsets."""
    user_bytes: int = 0

    def __add__(self, other: CopyCounts) -> CopyCounts:
        return CopyCounts(
            self.kernel_bytes + other.kernel_bytes,
            self.aligned_kernel_bytes + other.aligned_kernel_bytes,
            self.user_bytes + other.user_bytes,
        )

    @property
    def nbytes(self) -> int:
        return self.kernel_bytes + self.user_bytes


class RangeCopier:
    """Copies byte ranges between files; owns the chunk buffer and what it learnt about the kernel.

    A pair of filesystems (by device) on which ``copy_file_range`` failed is not tried again, so a
    refusal costs one failed call per pair, not one per tensor. ``use_kernel=False`` copies every
    byte through the buffer: on XFS and btrfs ``copy_file_range`` clones whatever it can, so that is
    the only way to honour ``--reflink never``. One copier per thread: the buffer is not shared.
    """

    def __init__(
        self, *, use_kernel: bool = True, block_bytes: int = BLOCK_BYTES, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self._use_kernel = use_kernel
        self._block_bytes = block_bytes
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray(0)  # made on first use: the kernel path never needs it
        self._refused: set[tuple[int, int]] = set()

    def copy_range(
        self,
        src_fd: int,
        src_offset: int,
        dst_fd: int,
        dst_offset: int,
        nbytes: int,
        on_piece: Callable[[CopiedPiece], None] | None = None,
    ) -> CopyCounts:
        """Copy ``nbytes`` from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``.

        Raises :class:`SourceEnded` if the source is shorter than the range. ``on_piece`` hears of
        every piece as it lands (at most ``KERNEL_CALL_BYTES`` or ``CHUNK_BYTES`` each).
        """
        report = on_piece or (lambda piece: None)
        devices = self._devices(src_fd, dst_fd)
        counts = CopyCounts()
        for span in split_for_clone(src_offset, dst_offset, nbytes, self._block_bytes):
            src, dst = src_offset + span.start, dst_offset + span.start
            kernel = self._kernel_copy(src_fd, src, dst_fd, dst, span.nbytes, devices, span.aligned, report)
            done = kernel.kernel_bytes
            user = self._user_copy(src_fd, src + done, dst_fd, dst + done, span.nbytes - done, report)
            counts += kernel + CopyCounts(user_bytes=user)
        return counts

    def _devices(self, src_fd: int, dst_fd: int) -> tuple[int, int] | None:
        """The device pair, or None when the kernel path is off or absent for it."""
        if not self._use_kernel or getattr(os, "copy_file_range", None) is None:
            return None
        devices = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
        return None if devices in self._refused else devices

    def _kernel_copy(
        self,
        src_fd: int,
        src_offset: int,
        dst_fd: int,
        dst_offset: int,
        nbytes: int,
        devices: tuple[int, int] | None,
        aligned: bool,
        report: Callable[[CopiedPiece], None],
    ) -> CopyCounts:
        """Copy what the kernel will: all of it, unless it refuses."""
        done = aligned_done = 0
        while devices is not None and devices not in self._refused and done < nbytes:
            want = min(nbytes - done, KERNEL_CALL_BYTES)
            try:
                got = os.copy_file_range(src_fd, dst_fd, want, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in _KERNEL_REFUSALS:
                    raise
                got = 0
            if got == 0:  # a refusal, or a filesystem that reports 0 before the end: read it ourselves
                self._refused.add(devices)
                break
            aligned = aligned and got % self._block_bytes == 0  # after a short call, nothing more lines up
            report(CopiedPiece(dst_offset + done, got, "kernel", aligned))
            done += got
            aligned_done += got if aligned else 0
        return CopyCounts(kernel_bytes=done, aligned_kernel_bytes=aligned_done)

    def _user_copy(
        self,
        src_fd: int,
        src_offset: int,
        dst_fd: int,
        dst_offset: int,
        nbytes: int,
        report: Callable[[CopiedPiece], None],
    ) -> int:
        done = 0
        if nbytes and not self._buffer:
            self._buffer = bytearray(self._chunk_bytes)
        while done < nbytes:
            view = memoryview(self._buffer)[: min(nbytes - done, len(self._buffer))]
            got = read_at(src_fd, view, src_offset + done)
            if got == 0:
                raise SourceEnded(src_fd, src_offset + done)
            write_all_at(dst_fd, view[:got], dst_offset + done)
            report(CopiedPiece(dst_offset + done, got, "user", False))
            done += got
        return done


# --- size, holes and durability -----------------------------------------------------------------


def set_size(fd: int, nbytes: int) -> None:
    """Make the file ``nbytes`` long without writing data: an extension is a hole that reads as zeros.

    Not ``os.ftruncate`` on Windows: CPython calls the CRT's ``_chsize_s`` there, which extends a
    file by writing the zeros itself, so a 5 GB shard would be written twice and never be sparse.
    """
    if sys.platform == "win32":
        ensure_sparse(fd)
        _windows_set_end_of_file(fd, nbytes)
    else:
        os.ftruncate(fd, nbytes)


def ensure_sparse(fd: int) -> None:
    """Let ranges that are never written take no disk space.

    Windows (NTFS, ReFS) needs a file marked sparse, else a write past a gap fills the gap with
    real zeros; filesystems that cannot be sparse (FAT) refuse, which is harmless: the gap still
    reads as zeros. POSIX filesystems make holes by themselves: nothing to do.
    """
    if sys.platform == "win32":
        _windows_mark_sparse(fd)


def durable_sync(fd: int) -> None:
    """Return only when the file's data has reached stable storage, as far as the platform can promise.

    On macOS ``fsync`` only hands the data to the drive, whose cache may lose it on power loss;
    ``F_FULLFSYNC`` flushes that cache too. As SQLite does, fall back to ``fsync`` when a
    filesystem refuses it (network and some external drives).
    """
    try:
        import fcntl
    except ImportError:  # Windows: os.fsync is FlushFileBuffers, which does reach the disk
        os.fsync(fd)
        return
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass
    os.fsync(fd)


def sync_file(path: str | os.PathLike[str]) -> None:
    """:func:`durable_sync` of a file by its path (one written earlier, or by another tool).

    Opened for writing on Windows, where ``FlushFileBuffers`` refuses a read-only handle (so
    ``os.fsync`` of a read-only descriptor fails there); read-only elsewhere.
    """
    fd = os.open(path, (os.O_RDWR if sys.platform == "win32" else os.O_RDONLY) | _open_flags())
    try:
        durable_sync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | os.PathLike[str]) -> None:
    """Make the creations and renames in the folder ``path`` durable, where the platform allows it.

    Windows has no way to open a folder through the C runtime and NTFS journals renames itself:
    nothing to do there. Some filesystems (and FUSE mounts) refuse to sync a folder (EINVAL): as
    nothing better exists, that is not an error.
    """
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        durable_sync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk without waiting (Linux; elsewhere nothing).

    A hint: failures are ignored, :func:`durable_sync` still decides durability.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


# --- what the filesystem can share ----------------------------------------------------------------


def block_size(path: str | os.PathLike[str]) -> int:
    """The filesystem's block size at ``path``: the granule of holes and of cloning.

    ``statvfs`` ``f_frsize`` (the fundamental block), not ``st_blksize``, which is a preferred I/O
    size and can be larger (XFS ``largeio``, network filesystems). ``BLOCK_BYTES`` where unknown.
    """
    statvfs = getattr(os, "statvfs", None)
    if statvfs is not None:
        info = statvfs(path)
        return int(info.f_frsize or info.f_bsize or BLOCK_BYTES)
    return BLOCK_BYTES


def can_reflink(src_path: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> bool:
    """Whether files written in ``dst_dir`` can share blocks with ``src_path``, by trying it.

    Clones the first block of the source into a temporary file in ``dst_dir`` with the
    ``FICLONERANGE`` ioctl, which fails instead of copying: on another filesystem (EXDEV), on one
    without reflink (EOPNOTSUPP: ext4, tmpfs, overlayfs) and off Linux (no ioctl). It is the
    operation ``copy_file_range`` tries first, so the answer holds for the copies that follow. No
    st_dev comparison: btrfs subvolumes differ in st_dev and still share. The source's data is only
    read (XFS does flag the source inode as having shared blocks); the temporary file is removed.
    Raises ``OSError`` only when ``src_path`` cannot be read or ``dst_dir`` cannot hold a new file.
    """
    try:
        import fcntl
    except ImportError:
        return False
    if not sys.platform.startswith("linux"):
        return False  # macOS clones whole files only (clonefile), which cannot build a shard
    src_fd = open_read(src_path)
    try:
        block = block_size(dst_dir)
        clone_nbytes = block if os.fstat(src_fd).st_size >= block else 0  # 0: to the end of the source
        tmp_fd, tmp_path = tempfile.mkstemp(prefix=".shardsurgeon-reflink-probe-", dir=dst_dir)
        try:
            fcntl.ioctl(tmp_fd, FICLONERANGE, _FILE_CLONE_RANGE.pack(src_fd, 0, clone_nbytes, 0))
            return True
        except OSError:
            return False
        finally:
            os.close(tmp_fd)
            os.unlink(tmp_path)
    finally:
        os.close(src_fd)


def shared_bytes(path: str | os.PathLike[str], offset: int = 0, nbytes: int | None = None) -> int | None:
    """How many bytes of ``path`` in ``[offset, offset + nbytes)`` lie in extents shared with
    another file (FIEMAP ``FIEMAP_EXTENT_SHARED``); None where the platform or filesystem cannot tell.

    Dirty data is flushed first (``FIEMAP_FLAG_SYNC``) so delayed allocations have their real extents.
    """
    try:
        import fcntl
    except ImportError:
        return None
    if not sys.platform.startswith("linux"):
        return None
    fd = open_read(path)
    try:
        end = os.fstat(fd).st_size if nbytes is None else offset + nbytes
        return _shared_in(fcntl.ioctl, fd, offset, end)
    except OSError as e:
        if e.errno in _NO_ANSWER:
            return None
        raise
    finally:
        os.close(fd)


def _shared_in(ioctl: Callable[[int, int, bytearray, bool], int], fd: int, start: int, end: int) -> int:
    request = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
    shared = 0
    while start < end:
        _FIEMAP_HEAD.pack_into(request, 0, start, end - start, FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        ioctl(fd, FS_IOC_FIEMAP, request, True)
        mapped = _FIEMAP_HEAD.unpack_from(request)[3]
        if mapped == 0:
            break  # the rest is a hole
        for number in range(mapped):
            logical, _, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                request, _FIEMAP_HEAD.size + number * _FIEMAP_EXTENT.size
            )
            if flags & FIEMAP_EXTENT_SHARED:
                shared += max(0, min(end, logical + length) - max(start, logical))
        if flags & FIEMAP_EXTENT_LAST or logical + length <= start:
            break
        start = logical + length
    return shared


# --- Windows ------------------------------------------------------------------------------------
# Reached only on Windows; covered by reasoning, not by tests run here.

_FSCTL_SET_SPARSE = 0x000900C4
_FILE_END_OF_FILE_INFO_CLASS = 6


def _windows_mark_sparse(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        returned = wintypes.DWORD()
        # A refusal (FAT, exFAT) leaves a dense file whose gaps still read as zeros: ignored.
        kernel32.DeviceIoControl(
            wintypes.HANDLE(msvcrt.get_osfhandle(fd)), _FSCTL_SET_SPARSE, None, 0, None, 0, ctypes.byref(returned), None
        )


def _windows_set_end_of_file(fd: int, nbytes: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        end_of_file = ctypes.c_longlong(nbytes)  # FILE_END_OF_FILE_INFO is one LARGE_INTEGER
        if not kernel32.SetFileInformationByHandle(
            wintypes.HANDLE(msvcrt.get_osfhandle(fd)),
            _FILE_END_OF_FILE_INFO_CLASS,
            ctypes.byref(end_of_file),
            ctypes.sizeof(end_of_file),
        ):
            raise ctypes.WinError(ctypes.get_last_error())
