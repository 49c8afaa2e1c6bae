"""Write one shard of a Layout: the only module that writes tensor bytes.

The file is sized to its final length first, so a zero tensor is a hole that is never written
(``dense`` writes real zeros). Copies are ranges of the layout (tensors that lie one after the other
in both files are one range) handed to :class:`fileio.RangeCopier`: in the kernel where it can
(``copy_file_range``, which shares blocks on XFS and btrfs), through one reused buffer elsewhere
or with ``reflink="never"``. Casts and scales stream through fixed-size reused buffers. No buffer
ever has the size of a tensor. Every system call goes through :mod:`fileio`, so the same bytes come
out on Linux, macOS and Windows.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from shardsurgeon.errors import CheckpointError, DestinationError, OutputError
from shardsurgeon.format import DTYPES
from shardsurgeon.names import CHUNK_BYTES
from shardsurgeon.plan.layout import CopyRun, PlacedPiece, ShardLayout
from shardsurgeon.plan.tensors import Convert, Copy, MeanRows, Normal, Pieces, Zeros
from shardsurgeon.storage import fileio
from shardsurgeon.storage.fileio import CopiedPiece, CopyCounts
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.units import Progress
from shardsurgeon.write.means import RowMeans

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from shardsurgeon.write.numerics import ChunkConverter

KEPT_CONVERTERS = 8
"""Converter sets kept for reuse (two lanes each): about 1-4 MiB apiece."""

Reflink = Literal["auto", "always", "never"]
REFLINK_MODES: tuple[Reflink, ...] = ("auto", "always", "never")
"""As GNU cp's ``--reflink``: share blocks with the source where the filesystem can (auto); refuse
to run unless it can (always); copy every byte (never)."""


@dataclass(frozen=True, slots=True)
class ShardStats:
    """What writing shards did, in bytes. ``written`` counts every byte put in a file (headers, copies
    and conversions; zeros too with ``dense``); ``copied`` and ``converted`` the tensor bytes by op."""

    written: int = 0
    holes: int = 0
    copied: int = 0
    converted: int = 0
    copies: CopyCounts = field(default_factory=CopyCounts)
    """How the copies went: in the kernel (block-aligned or not) or through user space."""
    shared: int | None = 0
    """Bytes of the shards in extents shared with another file, as the filesystem reports them
    (FIEMAP); None where the platform cannot tell."""
    fetched: int = 0
    """Source bytes read by ranged GETs from sources by URL."""
    sent: int = 0
    """Bytes uploaded to an object store by this process."""
    server_copied: int = 0
    """Bytes of the output an object store copied itself (``UploadPartCopy``): none passed through here."""

    def __add__(self, other: ShardStats) -> ShardStats:
        return ShardStats(
            self.written + other.written,
            self.holes + other.holes,
            self.copied + other.copied,
            self.converted + other.converted,
            self.copies + other.copies,
            None if self.shared is None or other.shared is None else self.shared + other.shared,
            self.fetched + other.fetched,
            self.sent + other.sent,
            self.server_copied + other.server_copied,
        )


def check_reflink(shards: Sequence[ShardLayout], out: Path, reflink: Reflink) -> None:
    """With ``reflink="always"``, refuse before anything is written unless files written beside
    ``out`` can share blocks with every source file ``shards`` copy from (one probe clone each)."""
    if reflink != "always":
        return
    folder = out.parent.absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent  # the output's parents are made later: probe where they will be
    paths = dict.fromkeys(s.path for shard in shards for s in shard.segments() if isinstance(s, CopyRun))
    for path in paths:
        try:
            shares = fileio.can_reflink(path, folder)
        except OSError as e:
            raise DestinationError(
                f"--reflink always: cannot test whether {folder} can share blocks with {path}: {e.strerror or e}; "
                "make the folder writable, or pass --reflink auto"
            ) from None
        if not shares:
            raise DestinationError(
                f"--reflink always: files in {folder} cannot share blocks with the source file {path} (another "
                "filesystem, or one without reflink such as ext4, tmpfs or overlayfs); write the output on the "
                "source's XFS or btrfs filesystem, or pass --reflink auto to copy what cannot be shared"
            )


class ShardWriter:
    """Writes shards; owns the range copier, the reused buffers, converters and the write-behind
    thread of casts."""

    def __init__(
        self,
        sources: SourceFiles,
        *,
        dense: bool = False,
        reflink: Reflink = "auto",
        progress: Progress | None = None,
    ):
        self._sources = sources
        self._dense = dense
        self._progress = progress or (lambda nbytes: None)
        self._copier = fileio.RangeCopier(use_kernel=reflink != "never", chunk_bytes=CHUNK_BYTES)
        self._converters: dict[tuple[str, str, float, str | None, int], list[ChunkConverter]] = {}
        self._io_thread: ThreadPoolExecutor | None = None
        self._read_buffers = (bytearray(0), bytearray(0))
        self._means = RowMeans()

    def write(self, shard: ShardLayout, path: Path) -> ShardStats:
        """Write ``shard`` to ``path`` (created or truncated), durably synced; returns what it did."""
        try:
            fd = fileio.open_new(path)
        except OSError as e:
            raise OutputError(f"{path}: cannot create shard: {e.strerror}") from None
        stats = ShardStats(written=shard.header_nbytes)
        try:
            fileio.set_size(fd, shard.nbytes)
            fileio.write_all_at(fd, shard.header, 0)
            for segment in shard.segments():
                match segment:
                    case CopyRun() as run:
                        stats += self._copy(run, fd)
                    case PlacedPiece() as placed:
                        stats += self._write_piece(placed, fd)
            fileio.durable_sync(fd)
        except OSError as e:
            raise OutputError(_describe_write_error(path, e)) from None
        finally:
            try:
                self._drain_io()
            finally:
                os.close(fd)
        return replace(stats, shared=_shared_bytes(path))

    def _drain_io(self) -> None:
        """Wait until the I/O thread has nothing left for this shard, even through Ctrl-C, then
        raise the Ctrl-C that came meanwhile.

        Runs before the shard's fd is closed: a write still queued would otherwise land on a
        closed descriptor, or on another file that reused its number. The interrupt is kept, not
        dropped: a Ctrl-C that arrives while this waits (the I/O thread's progress may be what
        reported the last bytes) still stops the run.
        """
        if self._io_thread is None:
            return
        from concurrent.futures import wait

        barrier = self._io_thread.submit(lambda: None)  # the thread runs jobs in order
        interrupted = False
        while True:
            try:
                wait([barrier])
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def _wrote(self, fd: int, offset: int, nbytes: int) -> None:
        """Bytes are in the page cache: start their writeback now, so the final sync finds little
        left to do, and report progress."""
        fileio.start_writeback(fd, offset, nbytes)
        self._progress(nbytes)

    def _write_piece(self, placed: PlacedPiece, fd: int) -> ShardStats:
        piece = placed.piece
        match piece.op:
            case Zeros() if not self._dense:
                self._progress(piece.nbytes)
                return ShardStats(holes=piece.nbytes)
            case Zeros():
                self._write_zeros(fd, placed.offset, piece.nbytes)
                return ShardStats(written=piece.nbytes)
            case Convert() as op:
                assert piece.source is not None
                fetched = self._convert(placed, op, fd)
                return ShardStats(written=piece.nbytes, converted=piece.nbytes, fetched=fetched)
            case Normal() as op:
                self._generate(placed, op, fd)
                return ShardStats(written=piece.nbytes, converted=piece.nbytes)
            case MeanRows() as op:
                data = self._means.row(op, piece, placed.tensor.dtype, self._sources.read)
                fileio.write_all_at(fd, data, placed.offset)
                self._wrote(fd, placed.offset, len(data))
                return ShardStats(written=piece.nbytes, converted=piece.nbytes)
            case Copy() | Pieces():
                raise AssertionError(f"{placed.tensor.name}: a copy outside a copy run, or pieces in a piece")

    def _copy(self, run: CopyRun, fd: int) -> ShardStats:
        if isinstance(run.path, str):
            return self._copy_remote(run, run.path, fd)

        def landed(piece: CopiedPiece) -> None:
            self._wrote(fd, piece.dst_offset, piece.nbytes)

        src = self._sources.fd(run.path)
        try:
            counts = self._copier.copy_range(src, run.src_offset, fd, run.offset, run.nbytes, landed)
        except fileio.SourceEnded as e:
            raise _source_truncated(run.path, e.offset) from None
        return ShardStats(written=run.nbytes, copied=run.nbytes, copies=counts)

    def _copy_remote(self, run: CopyRun, url: str, fd: int) -> ShardStats:
        """A copy from a source by URL: ranged GETs of one chunk each, written as they arrive."""
        for start in range(0, run.nbytes, CHUNK_BYTES):
            count = min(CHUNK_BYTES, run.nbytes - start)
            fileio.write_all_at(fd, self._sources.remote.read(url, run.src_offset + start, count), run.offset + start)
            self._wrote(fd, run.offset + start, count)
        copies = CopyCounts(user_bytes=run.nbytes)
        return ShardStats(written=run.nbytes, copied=run.nbytes, copies=copies, fetched=run.nbytes)

    def _write_zeros(self, fd: int, offset: int, nbytes: int) -> None:
        zeros = memoryview(bytes(min(nbytes, CHUNK_BYTES)))
        for start in range(0, nbytes, CHUNK_BYTES):
            count = min(CHUNK_BYTES, nbytes - start)
            fileio.write_all_at(fd, zeros[:count], offset + start)
            self._wrote(fd, offset + start, count)

    def _convert(self, placed: PlacedPiece, op: Convert, fd: int) -> int:
        """Read, convert and write in chunks, with the I/O of neighbouring chunks overlapping;
        returns the source bytes fetched by URL.

        While the main thread converts chunk k, the I/O thread writes chunk k-1 and reads chunk k+1.
        Two lanes of buffers and converters alternate, so no buffer is filled while in use; numpy,
        pread and pwrite all release the GIL, so the two cores share the work.
        """
        tensor, piece = placed.tensor, placed.piece
        source = piece.source
        assert source is not None
        lanes = [self._lane(source.dtype, tensor.dtype, op, lane) for lane in (0, 1)]
        url = source.path if isinstance(source.path, str) else None
        src = -1 if url is not None else self._sources.fd(source.path)
        chunk = lanes[0][0].chunk_src_bytes
        if len(self._read_buffers[0]) < chunk:
            self._read_buffers = (bytearray(chunk), bytearray(chunk))
        itemsize = DTYPES[source.dtype].itemsize
        first = source.data_start + piece.first * itemsize
        src_nbytes = piece.nbytes // DTYPES[tensor.dtype].itemsize * itemsize
        starts = range(0, src_nbytes, chunk)

        def read(number: int) -> memoryview:
            start = starts[number]
            view = memoryview(self._read_buffers[number % 2])[: min(chunk, src_nbytes - start)]
            if url is not None:
                view[:] = self._sources.remote.read(url, first + start, len(view))
                return view
            got = fileio.read_at(src, view, first + start)
            if got != len(view):
                raise _source_truncated(source.path, first + start + got)
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
            written = (io.submit(fileio.write_all_at, fd, out, dst_offset), dst_offset, len(out))
            dst_offset += len(out)
        self._finish(written, fd)
        return src_nbytes if url is not None else 0

    def _generate(self, placed: PlacedPiece, op: Normal, fd: int) -> None:
        """Numbers drawn by ``op``'s rule (plan/expected.py, the one definition), a chunk at a time."""
        from shardsurgeon.plan.expected import generated_bytes  # numpy loads only when a run generates

        itemsize = DTYPES[placed.tensor.dtype].itemsize
        count, step = placed.piece.nbytes // itemsize, CHUNK_BYTES // itemsize
        for start in range(0, count, step):
            data = generated_bytes(op, placed.tensor.dtype, placed.piece.first + start, min(step, count - start))
            fileio.write_all_at(fd, data, placed.offset + start * itemsize)
            self._wrote(fd, placed.offset + start * itemsize, len(data))

    def _lane(self, src_dtype: str, dst_dtype: str, op: Convert, lane: int) -> list[ChunkConverter]:
        """The converters of one lane, reused across tensors; only the few most recent are kept, so
        memory does not grow with the number of distinct scales in a merge."""
        key = (src_dtype, dst_dtype, op.scale, op.via, lane)
        if key in self._converters:
            self._converters[key] = self._converters.pop(key)  # most recently used last
        else:
            if len(self._converters) >= KEPT_CONVERTERS:
                del self._converters[next(iter(self._converters))]
            self._converters[key] = converters_for(src_dtype, dst_dtype, op)
        return self._converters[key]

    def _finish(self, pending: tuple[Future[Any], int, int] | None, fd: int) -> None:
        if pending is not None:
            future, offset, nbytes = pending
            future.result()
            self._wrote(fd, offset, nbytes)

    def _io(self) -> ThreadPoolExecutor:
        """The write-behind thread, started by the first conversion (copies never need it)."""
        if self._io_thread is None:
            from concurrent.futures import ThreadPoolExecutor

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


def converters_for(src_dtype: str, dst_dtype: str, op: Convert) -> list[ChunkConverter]:
    """The cast-and-scale stages of a conversion: to its working dtype, then to the output's."""
    from shardsurgeon.write.numerics import ChunkConverter  # numpy loads only when a run converts

    if op.via is None:
        return [ChunkConverter(src_dtype, dst_dtype, op.scale)]
    return [ChunkConverter(src_dtype, op.via, op.scale), ChunkConverter(op.via, dst_dtype, 1.0)]


def _source_truncated(path: Path | str, offset: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: ends at byte {offset}, before the data its header promises; the source changed or "
        "was truncated while running"
    )


def _shared_bytes(path: Path) -> int | None:
    """What the filesystem says of the finished shard at ``path``; a measurement, never an error."""
    try:
        return fileio.shared_bytes(path)
    except OSError:
        return None


def _describe_write_error(path: Path, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return (
            f"{path}: no space left on device; free some space and run the same command again, "
            "completed shards will be kept"
        )
    return f"{path}: write failed: {error.strerror or error}"
