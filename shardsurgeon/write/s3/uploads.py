"""Write one shard of a Layout to S3 as a multipart upload: the S3 counterpart of :mod:`execute`.

The parts are :func:`parts.plan_parts`'s. A part made here is filled by :class:`ShardBytes` into the
buffer of one of two :class:`Workspace` objects, reused, and sent from there; a copied part is an
``UploadPartCopy`` of a range of a source object (or of the zeros object), so its bytes never reach
this machine; a joined part is first assembled by the server as a scratch object
(``.shardsurgeon-scratch/``), then copied whole. Parts go out on a few threads at once. An upload
that fails or is interrupted is aborted here; one left by a killed process is aborted by the next
run (:mod:`s3output`), so none stays to be billed.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardsurgeon.errors import CheckpointError, safe_text
from shardsurgeon.format import DTYPES
from shardsurgeon.names import SCRATCH_PREFIX
from shardsurgeon.plan.layout import CopyRun, PlacedPiece, ShardLayout
from shardsurgeon.plan.tensors import Convert, MeanRows, Normal, Piece, Zeros
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.storage.s3 import S3Location, describe, failed_condition
from shardsurgeon.units import Progress
from shardsurgeon.write.executor import KEPT_CONVERTERS, ShardStats, converters_for
from shardsurgeon.write.means import RowMeans
from shardsurgeon.write.s3.parts import Copied, Joined, Made, Part, plan_parts, sent_nbytes

if TYPE_CHECKING:
    from shardsurgeon.write.numerics import ChunkConverter

READ_BYTES = 4 << 20
"""Largest read of a source range into a part's buffer."""
THREADS = 4
"""Parts in flight at once: server-side copies are waits, not work."""
MADE_IN_FLIGHT = 2
"""Parts made here at once: each holds a :class:`Workspace` (a buffer of a part's size)."""
ZERO_CHUNK = bytes(1 << 20)
SCRATCH = SCRATCH_PREFIX
RUN_METADATA_KEY = "shardsurgeon-run"
"""User metadata of each object the tool writes: the key of the job that wrote it (plan.job.Job.key)."""


class Workspace:
    """What making one part needs, allocated once and reused: the part's buffer, the converters
    and their source chunk. A part made here takes a workspace for as long as it is made and sent."""

    def __init__(self) -> None:
        self.buffer = bytearray(0)
        """Grown to the largest part made so far: at most :data:`parts.MADE_PART_BYTES`."""
        self.chunk = bytearray(0)
        self.converters: dict[tuple[str, str, float, str | None], list[ChunkConverter]] = {}

    def stages(self, src_dtype: str, dst_dtype: str, op: Convert) -> list[ChunkConverter]:
        key = (src_dtype, dst_dtype, op.scale, op.via)
        if key not in self.converters:
            if len(self.converters) >= KEPT_CONVERTERS:
                del self.converters[next(iter(self.converters))]
            self.converters[key] = converters_for(src_dtype, dst_dtype, op)
        return self.converters[key]


class ShardBytes:
    """Any byte range of a planned shard, made from the sources: the header, copies read by range,
    zeros, and casts and scales converted from the element range that covers it."""

    def __init__(self, shard: ShardLayout, sources: SourceFiles):
        self._shard = shard
        self._sources = sources
        self._segments = shard.segments()
        self._means = RowMeans()
        self._starts = [_span(segment)[0] for segment in self._segments]

    def fill(self, offset: int, view: memoryview, workspace: Workspace) -> None:
        """Put the shard's bytes ``offset`` to ``offset + len(view)`` into ``view``."""
        end = offset + len(view)
        if offset < self._shard.header_nbytes:
            header = self._shard.header
            view[: min(end, len(header)) - offset] = header[offset : min(end, len(header))]
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for segment in self._segments[first:]:
            start, stop = _span(segment)
            if start >= end:
                break
            low, high = max(start, offset), min(stop, end)
            if low < high:
                self._fill_segment(segment, low - start, view[low - offset : high - offset], workspace)

    def _fill_segment(self, segment: PlacedPiece | CopyRun, skip: int, view: memoryview, workspace: Workspace) -> None:
        match segment:
            case CopyRun():
                self._read(segment.path, segment.src_offset + skip, view)
            case PlacedPiece(piece=Piece(op=Zeros())):
                for start in range(0, len(view), len(ZERO_CHUNK)):
                    piece = view[start : start + len(ZERO_CHUNK)]
                    piece[:] = ZERO_CHUNK[: len(piece)]
            case PlacedPiece(piece=Piece(op=Convert() as op)):
                self._convert(segment, op, skip, view, workspace)
            case PlacedPiece(piece=Piece(op=Normal() as op)):
                self._generate(segment, op, skip, view)
            case PlacedPiece(piece=Piece(op=MeanRows() as op)):
                row = self._means.row(op, segment.piece, segment.tensor.dtype, self._sources.read)
                view[:] = row[skip : skip + len(view)]
            case _:
                raise AssertionError(f"{segment}: a copy outside a copy run")

    def _read(self, path: Any, start: int, view: memoryview) -> None:
        for done in range(0, len(view), READ_BYTES):
            piece = view[done : done + READ_BYTES]
            got = self._sources.read_into(path, start + done, piece)
            if got != len(piece):
                raise CheckpointError(
                    f"{path}: ends at byte {start + done + got}, before the data its header promises; the "
                    "source changed or was truncated while running"
                )

    def _generate(self, placed: PlacedPiece, op: Normal, skip: int, view: memoryview) -> None:
        """Bytes ``skip`` to ``skip + len(view)`` of generated numbers, by the one definition."""
        from shardsurgeon.plan.expected import generated_bytes

        size = DTYPES[placed.tensor.dtype].itemsize
        first, last = skip // size, -(-(skip + len(view)) // size)
        data = generated_bytes(op, placed.tensor.dtype, placed.piece.first + first, last - first)
        view[:] = data[skip - first * size : skip - first * size + len(view)]

    def _convert(self, placed: PlacedPiece, op: Convert, skip: int, view: memoryview, workspace: Workspace) -> None:
        """The converted bytes ``skip`` to ``skip + len(view)`` of the piece: the source elements
        that cover them are read and converted a chunk at a time."""
        tensor, source = placed.tensor, placed.piece.source
        assert source is not None
        stages = workspace.stages(source.dtype, tensor.dtype, op)
        src_size, dst_size = stages[0].src_itemsize, stages[-1].dst_itemsize
        first, last = skip // dst_size, -(-(skip + len(view)) // dst_size)
        step = stages[0].chunk_elements
        if len(workspace.chunk) < step * src_size:
            workspace.chunk = bytearray(step * src_size)
        for element in range(first, last, step):
            count = min(step, last - element)
            chunk = memoryview(workspace.chunk)[: count * src_size]
            self._read(source.path, source.data_start + (placed.piece.first + element) * src_size, chunk)
            out: memoryview = chunk
            for stage in stages:
                out = stage.convert(out)
            low = max(skip, element * dst_size)
            high = min(skip + len(view), (element + count) * dst_size)
            view[low - skip : high - skip] = out[low - element * dst_size : high - element * dst_size]


def _span(segment: PlacedPiece | CopyRun) -> tuple[int, int]:
    nbytes = segment.nbytes if isinstance(segment, CopyRun) else segment.piece.nbytes
    return segment.offset, segment.offset + nbytes


@dataclass(frozen=True, slots=True)
class _Uploaded:
    number: int
    etag: str


class S3ShardWriter:
    """Uploads shards under one S3 folder; owns the threads that send parts and their buffers."""

    def __init__(
        self,
        client: Any,
        folder: S3Location,
        sources: SourceFiles,
        *,
        zeros_url: str | None,
        etags: Mapping[str, str],
        run_key: str,
        progress: Progress,
    ):
        """``etags`` are the versions of the objects copied from (sources, zeros) as the run saw
        them: a copy from one that changed since fails. ``run_key`` is recorded in each shard's
        metadata, so that a later run keeps only shards written by a run of the very same job."""
        self._client = client
        self._folder = folder
        self._sources = sources
        self._zeros_url = zeros_url
        self._etags = etags
        self._metadata = {RUN_METADATA_KEY: run_key}
        self._scratch_tag = uuid.uuid4().hex
        self._progress = progress
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="shardsurgeon-s3")
        self._workspaces: queue.SimpleQueue[Workspace] = queue.SimpleQueue()
        for _ in range(MADE_IN_FLIGHT):
            self._workspaces.put(Workspace())

    def write(
        self, shard: ShardLayout, check: Callable[[], None], confirm: Callable[[], None]
    ) -> tuple[ShardStats, str]:
        """Upload ``shard``; ``check`` is called before each part and ``confirm`` before the upload
        completes (they raise if the run must stop: another run took the folder over). Returns what
        it did and the ETag of the object completed."""
        parts = plan_parts(shard, self._zeros_url)
        target = self._folder.child(shard.name)
        fetched_before = self._sources.remote.fetched_nbytes
        made = ShardBytes(shard, self._sources)
        upload = _Upload(self._client, target, metadata=self._metadata)
        scratch: list[S3Location] = []
        try:
            futures = [
                self._pool.submit(self._send, upload, number, part, made, shard, scratch, check)
                for number, part in enumerate(parts, start=1)
            ]
            _wait_all(futures)
            confirm()
            etag = upload.complete([future.result() for future in futures])
        except BaseException:
            upload.abort()
            raise
        finally:
            self._remove(scratch)
        sent = sum(sent_nbytes(part) for part in parts)
        stats = ShardStats(
            written=shard.nbytes,
            copied=sum(s.nbytes for s in shard.segments() if isinstance(s, CopyRun)),
            converted=sum(
                s.piece.nbytes
                for s in shard.segments()
                if isinstance(s, PlacedPiece) and not isinstance(s.piece.op, Zeros)
            ),
            fetched=self._sources.remote.fetched_nbytes - fetched_before,
            sent=sent,
            server_copied=shard.nbytes - sent,
        )
        return stats, etag

    def _send(
        self, upload: _Upload, number: int, part: Part, made: ShardBytes, shard: ShardLayout,
        scratch: list[S3Location], check: Callable[[], None],
    ) -> _Uploaded:  # fmt: skip
        check()
        if isinstance(part, Joined):
            source, etag = self._assemble(part, f"{shard.name}.{number}", scratch, made)
            uploaded = upload.copy(number, source, 0, part.nbytes, what="a part assembled", if_match=etag)
        else:
            uploaded = self._put(upload, number, part, made)
        header = shard.header_nbytes
        with self._lock:  # the caller's callback runs in one thread at a time, as in a local run
            self._progress(part.nbytes - max(0, min(part.offset + part.nbytes, header) - part.offset))
        return uploaded

    def _put(self, upload: _Upload, number: int, part: Made | Copied, made: ShardBytes) -> _Uploaded:
        if isinstance(part, Copied):
            source = S3Location.parse(part.url)
            return upload.copy(number, source, part.src_offset, part.nbytes, if_match=self._etags.get(part.url))
        workspace = self._workspaces.get()  # waits while the others are in use
        try:
            if len(workspace.buffer) < part.nbytes:
                workspace.buffer = bytearray(part.nbytes)
            view = memoryview(workspace.buffer)[: part.nbytes]
            made.fill(part.offset, view, workspace)
            return upload.send(number, view)
        finally:
            self._workspaces.put(workspace)

    def _assemble(
        self, joined: Joined, name: str, scratch: list[S3Location], made: ShardBytes
    ) -> tuple[S3Location, str]:
        """The object ``joined`` stands for, assembled by the server under a scratch name of this
        writer's own (another writer's never collides with it), and its ETag, which the copy of it
        names: nothing but what was assembled here can be copied into the shard."""
        target = self._folder.child(f"{SCRATCH}{self._scratch_tag}/{name}")
        upload = _Upload(self._client, target, self._folder.child(name.partition(".safetensors")[0] + ".safetensors"))
        try:
            etag = upload.complete([self._put(upload, 1, joined.base, made), self._put(upload, 2, joined.tail, made)])
        except BaseException:
            upload.abort()
            raise
        with self._lock:
            scratch.append(target)
        return target, etag

    def _remove(self, scratch: list[S3Location]) -> None:
        for location in scratch:
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=location.bucket, Key=location.key)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> S3ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Upload:
    """One multipart upload, created on first use; errors name ``shown`` (the shard a scratch object
    is for)."""

    def __init__(
        self,
        client: Any,
        target: S3Location,
        shown: S3Location | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        self._client = client
        self._target = target
        self._shown = shown or target
        self._metadata = dict(metadata or {})
        self._id: str | None = None
        self._lock = threading.Lock()

    def _upload_id(self) -> str:
        with self._lock:
            if self._id is None:
                start = self._client.create_multipart_upload
                self._id = self._call("starting the upload", start, Metadata=self._metadata)["UploadId"]
            return self._id

    def send(self, number: int, data: memoryview) -> _Uploaded:
        answer = self._call(
            f"sending part {number}", self._client.upload_part, Body=_ViewReader(data), PartNumber=number,
            UploadId=self._upload_id(),
        )  # fmt: skip
        return _Uploaded(number, answer["ETag"])

    def copy(
        self, number: int, source: S3Location, start: int, nbytes: int, *, what: str = "", if_match: str | None = None
    ) -> _Uploaded:
        from botocore.exceptions import ClientError

        condition = {"CopySourceIfMatch": if_match} if if_match else {}
        try:
            answer = self._call(
                f"copying {what or source.url} into part {number} on the server", self._client.upload_part_copy,
                CopySource={"Bucket": source.bucket, "Key": source.key}, PartNumber=number,
                CopySourceRange=f"bytes={start}-{start + nbytes - 1}", UploadId=self._upload_id(), raw=True,
                **condition,
            )  # fmt: skip
        except ClientError as e:
            if if_match and failed_condition(e):
                raise CheckpointError(
                    f"{safe_text(source.url)}: changed during the run (its ETag is no longer {safe_text(if_match)}); "
                    "nothing was published: run the same command again"
                ) from None
            raise describe(self._shown, f"copying {what or source.url} into part {number} on the server", e) from None
        return _Uploaded(number, answer["CopyPartResult"]["ETag"])

    def complete(self, parts: list[_Uploaded]) -> str:
        """Complete the upload; returns the ETag of the object it made."""
        done = [{"PartNumber": part.number, "ETag": part.etag} for part in sorted(parts, key=lambda p: p.number)]
        answer = self._call(
            "completing the upload", self._client.complete_multipart_upload,
            MultipartUpload={"Parts": done}, UploadId=self._upload_id(),
        )  # fmt: skip
        return str(answer["ETag"])

    def abort(self) -> None:
        """Abort the upload (it would be billed otherwise); a failure here is left to the next run."""
        if self._id is None:
            return
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(Bucket=self._target.bucket, Key=self._target.key, UploadId=self._id)

    def _call(self, doing: str, method: Callable[..., Any], raw: bool = False, **kwargs: Any) -> Any:
        """``method`` on this upload's object; errors as one line, or with ``raw`` a ClientError as it is."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(Bucket=self._target.bucket, Key=self._target.key, **kwargs)
        except ClientError as e:
            if raw:
                raise
            raise describe(self._shown, doing, e) from None
        except BotoCoreError as e:
            raise describe(self._shown, doing, e) from None


class _ViewReader(io.RawIOBase):
    """A workspace's buffer as the file-like body boto3 takes (bytes would be a copy of it):
    seekable, so that a request can be signed and retried."""

    def __init__(self, view: memoryview):
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), len(self._view) - self._position))
        buffer[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


class ZerosReader(_ViewReader):
    """``nbytes`` zeros as a request body, from one small zero block (the zeros object's content)."""

    def __init__(self, nbytes: int):
        super().__init__(memoryview(ZERO_CHUNK))
        self._nbytes = nbytes

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), len(ZERO_CHUNK), self._nbytes - self._position))
        buffer[:count] = ZERO_CHUNK[:count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._nbytes}[whence]
        self._position = max(0, base + offset)
        return self._position


def _wait_all(futures: list[Future[_Uploaded]]) -> None:
    """Wait for every part; on the first failure, cancel those not started and raise it."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for future in done:
        if future.exception() is not None:
            for other in pending:
                other.cancel()
            wait(pending)
            raise future.exception()  # type: ignore[misc]
