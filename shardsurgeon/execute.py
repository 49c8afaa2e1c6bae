"""Write one shard of a Layout: the only module that writes tensor bytes.

The file is sized to its final length first, so a zero tensor is a hole that is never written
(``dense`` writes real zeros). Copies go through ``os.copy_file_range`` and stay in the kernel,
with a chunked ``pread``/``pwrite`` fallback where the kernel or filesystem refuses. Casts and
scales stream through fixed-size reused buffers. No buffer ever has the size of a tensor.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from shardsurgeon.errors import CheckpointError, OutputError
from shardsurgeon.layout import PlacedTensor, ShardLayout
from shardsurgeon.plan import Convert, Copy, PlannedTensor, Zeros
from shardsurgeon.units import Progress

if TYPE_CHECKING:
    from shardsurgeon.numerics import ChunkConverter

COPY_CALL_BYTES = 64 << 20
"""Largest single copy_file_range call: keeps progress smooth and Ctrl-C prompt."""
CHUNK_BYTES = 4 << 20
KEPT_CONVERTERS = 8
"""Converter sets kept for reuse (two lanes each): about 1-4 MiB apiece."""
_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM})


@dataclass(frozen=True, slots=True)
class ShardStats:
    """What writing one shard did, in bytes."""

    written: int
    holes: int


class SourceFiles:
    """Read-only descriptors of source shards, opened on first use and closed on exit."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open source shard: {e.strerror}") from None
        return self._fds[path]

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardWriter:
    """Writes shards; owns the reused buffers, converters and the write-behind thread of casts.

    Remembers whether copy_file_range works so it is not retried per tensor.
    """

    def __init__(self, sources: SourceFiles, *, dense: bool = False, progress: Progress | None = None):
        self._sources = sources
        self._dense = dense
        self._progress = progress or (lambda nbytes: None)
        self._kernel_copy = True
        self._buffer = bytearray(CHUNK_BYTES)
        self._converters: dict[tuple[str, str, float, str | None, int], list[ChunkConverter]] = {}
        self._io_thread: ThreadPoolExecutor | None = None
        self._read_buffers = (bytearray(0), bytearray(0))

    def write(self, shard: ShardLayout, path: Path) -> ShardStats:
        """Write ``shard`` to ``path`` (created or truncated), fsynced; returns the byte counts."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create shard: {e.strerror}") from None
        written = holes = 0
        try:
            os.ftruncate(fd, shard.nbytes)
            _pwrite_all(fd, shard.header, 0)
            written += len(shard.header)
            for placed in shard.tensors:
                if isinstance(placed.tensor.op, Zeros) and not self._dense:
                    holes += placed.tensor.nbytes
                    self._progress(placed.tensor.nbytes)
                    continue
                self._write_tensor(placed, fd)
                written += placed.tensor.nbytes
            os.fsync(fd)
        except OSError as e:
            raise OutputError(_describe_write_error(path, e)) from None
        finally:
            self._drain_io()
            os.close(fd)
        return ShardStats(written, holes)

    def _drain_io(self) -> None:
        """Wait until the I/O thread has nothing left for this shard, even through Ctrl-C.

        Runs before the shard's fd is closed: a write still queued would otherwise land on a
        closed descriptor, or on another file that reused its number.
        """
        if self._io_thread is None:
            return
        barrier = self._io_thread.submit(lambda: None)  # the thread runs jobs in order
        while True:
            try:
                wait([barrier])
                return
            except KeyboardInterrupt:
                continue

    def _wrote(self, fd: int, offset: int, nbytes: int) -> None:
        """Bytes are in the page cache: start their writeback now, so the final fsync finds little
        left to do, and report progress."""
        start_writeback(fd, offset, nbytes)
        self._progress(nbytes)

    def _write_tensor(self, placed: PlacedTensor, fd: int) -> None:
        tensor = placed.tensor
        match tensor.op:
            case Zeros():
                self._write_zeros(fd, placed.offset, tensor.nbytes)
            case Copy():
                src = self._sources.fd(tensor.source.path)
                self._copy(src, tensor.source.data_start, fd, placed.offset, tensor.nbytes)
            case Convert() as op:
                self._convert(placed, op, fd)

    def _copy(self, src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
        done = 0
        while done < nbytes and self._kernel_copy:
            want = min(nbytes - done, COPY_CALL_BYTES)
            try:
                got = os.copy_file_range(src, dst, want, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self._kernel_copy = False
                break
            if got == 0:
                raise _source_truncated(src, src_offset + done)
            self._wrote(dst, dst_offset + done, got)
            done += got
        while done < nbytes:
            view = memoryview(self._buffer)[: min(nbytes - done, CHUNK_BYTES)]
            got = os.preadv(src, [view], src_offset + done)
            if got == 0:
                raise _source_truncated(src, src_offset + done)
            _pwrite_all(dst, view[:got], dst_offset + done)
            self._wrote(dst, dst_offset + done, got)
            done += got

    def _write_zeros(self, fd: int, offset: int, nbytes: int) -> None:
        zeros = memoryview(bytes(min(nbytes, CHUNK_BYTES)))
        for start in range(0, nbytes, CHUNK_BYTES):
            count = min(CHUNK_BYTES, nbytes - start)
            _pwrite_all(fd, zeros[:count], offset + start)
            self._wrote(fd, offset + start, count)

    def _convert(self, placed: PlacedTensor, op: Convert, fd: int) -> None:
        """Read, convert and write in chunks, with the I/O of neighbouring chunks overlapping.

        While the main thread converts chunk k, the I/O thread writes chunk k-1 and reads chunk k+1.
        Two lanes of buffers and converters alternate, so no buffer is filled while in use; numpy,
        pread and pwrite all release the GIL, so the two cores share the work.
        """
        tensor = placed.tensor
        lanes = [self._lane(tensor, op, lane) for lane in (0, 1)]
        src = self._sources.fd(tensor.source.path)
        chunk = lanes[0][0].chunk_src_bytes
        if len(self._read_buffers[0]) < chunk:
            self._read_buffers = (bytearray(chunk), bytearray(chunk))
        starts = range(0, tensor.source.nbytes, chunk)

        def read(number: int) -> memoryview:
            start = starts[number]
            view = memoryview(self._read_buffers[number % 2])[: min(chunk, tensor.source.nbytes - start)]
            got = os.preadv(src, [view], tensor.source.data_start + start)
            if got != len(view):
                raise _source_truncated(src, tensor.source.data_start + start + got)
            return view

        # On an error or interrupt, write() drains the I/O thread before the buffers or fd go away.
        io = self._io()
        dst_offset = placed.offset
        written: tuple[Future[Any], int, int] | None = None
        reading = io.submit(read, 0)
        for number in range(len(starts)):
            out = reading.result()
            if number + 1 < len(starts):
                reading = io.submit(read, number + 1)
            for converter in lanes[number % 2]:
                out = converter.convert(out)
            self._finish(written, fd)
            written = (io.submit(_pwrite_all, fd, out, dst_offset), dst_offset, len(out))
            dst_offset += len(out)
        self._finish(written, fd)

    def _lane(self, tensor: PlannedTensor, op: Convert, lane: int) -> list[ChunkConverter]:
        """The converters of one lane, reused across tensors; only the few most recent are kept, so
        memory does not grow with the number of distinct scales in a merge."""
        key = (tensor.source.dtype, tensor.dtype, op.scale, op.via, lane)
        if key in self._converters:
            self._converters[key] = self._converters.pop(key)  # most recently used last
        else:
            if len(self._converters) >= KEPT_CONVERTERS:
                del self._converters[next(iter(self._converters))]
            self._converters[key] = _converters(tensor.source.dtype, tensor.dtype, op)
        return self._converters[key]

    def _finish(self, pending: tuple[Future[Any], int, int] | None, fd: int) -> None:
        if pending is not None:
            future, offset, nbytes = pending
            future.result()
            self._wrote(fd, offset, nbytes)

    def _io(self) -> ThreadPoolExecutor:
        if self._io_thread is None:
            self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="shardsurgeon-write")
        return self._io_thread

    def close(self) -> None:
        if self._io_thread is not None:
            self._io_thread.shutdown()
            self._io_thread = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
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
    """Ask the kernel to start writing these bytes to disk without waiting (Linux; else nothing).

    Writeback then overlaps the copying instead of all happening in the final fsync, and dirty
    pages stay few. Failures are ignored: this is a hint; fsync still guarantees durability.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _converters(src_dtype: str, dst_dtype: str, op: Convert) -> list[ChunkConverter]:
    """The cast-and-scale stages of a conversion: to its working dtype, then to the output's."""
    from shardsurgeon.numerics import ChunkConverter  # numpy loads only when a run converts

    if op.via is None:
        return [ChunkConverter(src_dtype, dst_dtype, op.scale)]
    return [ChunkConverter(src_dtype, op.via, op.scale), ChunkConverter(op.via, dst_dtype, 1.0)]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _source_truncated(fd: int, offset: int) -> CheckpointError:
    path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else f"fd {fd}"
    return CheckpointError(
        f"{path}: ends at byte {offset}, before the data its header promises; the source changed or "
        "was truncated while running"
    )


def _describe_write_error(path: Path, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return (
            f"{path}: no space left on device; free some space and run the same command again, "
            "completed shards will be kept"
        )
    return f"{path}: write failed: {error.strerror or error}"
