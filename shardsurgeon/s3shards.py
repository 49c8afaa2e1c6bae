"""Write one shard of a Layout to S3 as a multipart upload: the S3 counterpart of :mod:`execute`.

The parts are :func:`parts.plan_parts`'s. A part made here is filled by :class:`ShardBytes` into one
reused buffer of at most a part's size and sent; a copied part is an ``UploadPartCopy`` of a range
of a source object (or of the zeros object), so its bytes never reach this machine; a joined part is
first assembled by the server as a scratch object (``.shardsurgeon-scratch/``), then copied whole.
Parts go out on a few threads at once. An upload that fails or is interrupted is aborted here; one
left by a killed process is aborted by the next run (:mod:`s3output`), so none stays to be billed.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import CheckpointError, safe_text
from shardsurgeon.execute import ShardStats, converters_for
from shardsurgeon.layout import CopyRun, PlacedTensor, ShardLayout
from shardsurgeon.parts import Copied, Joined, Made, Part, plan_parts, sent_nbytes
from shardsurgeon.plan import Convert, Zeros
from shardsurgeon.remote import SourceFiles
from shardsurgeon.s3 import S3Location, describe, error_code
from shardsurgeon.units import Progress

READ_BYTES = 4 << 20
"""Largest read of a source range into a part's buffer."""
THREADS = 4
"""Parts in flight at once: server-side copies are waits, not work."""
MADE_IN_FLIGHT = 2
"""Parts made here that exist at once: each holds a buffer of up to a part's size."""
SCRATCH = ".shardsurgeon-scratch/"
RUN_METADATA_KEY = "shardsurgeon-run"
"""User metadata of each shard object: the key of the run that wrote it (see finish.resume_key)."""


class ShardBytes:
    """Any byte range of a planned shard, made from the sources: the header, copies read by range,
    zeros, and casts and scales converted from the element range that covers it."""

    def __init__(self, shard: ShardLayout, sources: SourceFiles):
        self._shard = shard
        self._sources = sources
        self._segments = shard.segments()
        self._starts = [_span(segment)[0] for segment in self._segments]

    def fill(self, offset: int, view: memoryview) -> None:
        """Put the shard's bytes ``offset`` to ``offset + len(view)`` into ``view``."""
        end = offset + len(view)
        header = self._shard.header
        if offset < len(header):
            view[: min(end, len(header)) - offset] = header[offset : min(end, len(header))]
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for segment in self._segments[first:]:
            start, stop = _span(segment)
            if start >= end:
                break
            low, high = max(start, offset), min(stop, end)
            if low < high:
                self._fill_segment(segment, low - start, view[low - offset : high - offset])

    def _fill_segment(self, segment: PlacedTensor | CopyRun, skip: int, view: memoryview) -> None:
        match segment:
            case CopyRun():
                self._read(segment.path, segment.src_offset + skip, view)
            case PlacedTensor(tensor=tensor) if isinstance(tensor.op, Zeros):
                view[:] = bytes(len(view))
            case PlacedTensor(tensor=tensor) if isinstance(tensor.op, Convert):
                self._convert(segment, tensor.op, skip, view)
            case _:
                raise AssertionError(f"{segment}: a copy outside a copy run")

    def _read(self, path: Any, start: int, view: memoryview) -> None:
        for done in range(0, len(view), READ_BYTES):
            data = self._sources.read(path, start + done, min(READ_BYTES, len(view) - done))
            if len(data) != min(READ_BYTES, len(view) - done):
                raise CheckpointError(
                    f"{path}: ends at byte {start + done + len(data)}, before the data its header promises; the "
                    "source changed or was truncated while running"
                )
            view[done : done + len(data)] = data

    def _convert(self, placed: PlacedTensor, op: Convert, skip: int, view: memoryview) -> None:
        """The converted bytes ``skip`` to ``skip + len(view)`` of the tensor: the source elements
        that cover them are read and converted a chunk at a time."""
        tensor = placed.tensor
        stages = converters_for(tensor.source.dtype, tensor.dtype, op)
        src_size, dst_size = stages[0].src_itemsize, stages[-1].dst_itemsize
        first, last = skip // dst_size, -(-(skip + len(view)) // dst_size)
        step = stages[0].chunk_elements
        buffer = bytearray(min(step, last - first) * src_size)
        for element in range(first, last, step):
            count = min(step, last - element)
            chunk = memoryview(buffer)[: count * src_size]
            self._read(tensor.source.path, tensor.source.data_start + element * src_size, chunk)
            out: memoryview = chunk
            for stage in stages:
                out = stage.convert(out)
            low = max(skip, element * dst_size)
            high = min(skip + len(view), (element + count) * dst_size)
            view[low - skip : high - skip] = out[low - element * dst_size : high - element * dst_size]


def _span(segment: PlacedTensor | CopyRun) -> tuple[int, int]:
    nbytes = segment.nbytes if isinstance(segment, CopyRun) else segment.tensor.nbytes
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
        self._progress = progress
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="shardsurgeon-s3")
        self._buffers = threading.Semaphore(MADE_IN_FLIGHT)

    def write(self, shard: ShardLayout, check: Callable[[], None], confirm: Callable[[], None]) -> ShardStats:
        """Upload ``shard``; ``check`` is called before each part and ``confirm`` before the upload
        completes (they raise if the run must stop: another run took the folder over)."""
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
            upload.complete([future.result() for future in futures])
        except BaseException:
            upload.abort()
            raise
        finally:
            self._remove(scratch)
        sent = sum(sent_nbytes(part) for part in parts)
        return ShardStats(
            written=shard.nbytes,
            copied=sum(s.nbytes for s in shard.segments() if isinstance(s, CopyRun)),
            converted=sum(p.tensor.nbytes for p in shard.tensors if isinstance(p.tensor.op, Convert)),
            fetched=self._sources.remote.fetched_nbytes - fetched_before,
            sent=sent,
            server_copied=shard.nbytes - sent,
        )

    def _send(
        self, upload: _Upload, number: int, part: Part, made: ShardBytes, shard: ShardLayout,
        scratch: list[S3Location], check: Callable[[], None],
    ) -> _Uploaded:  # fmt: skip
        check()
        if isinstance(part, Joined):
            source = self._assemble(part, f"{shard.name}.{number}", scratch, made)
            uploaded = upload.copy(number, source, 0, part.nbytes, what="a part assembled")
        else:
            uploaded = self._put(upload, number, part, made)
        header = len(shard.header)
        self._progress(part.nbytes - max(0, min(part.offset + part.nbytes, header) - part.offset))
        return uploaded

    def _put(self, upload: _Upload, number: int, part: Made | Copied, made: ShardBytes) -> _Uploaded:
        if isinstance(part, Copied):
            source = S3Location.parse(part.url)
            return upload.copy(number, source, part.src_offset, part.nbytes, if_match=self._etags.get(part.url))
        with self._buffers:
            buffer = bytearray(part.nbytes)
            made.fill(part.offset, memoryview(buffer))
            return upload.send(number, buffer)

    def _assemble(self, joined: Joined, name: str, scratch: list[S3Location], made: ShardBytes) -> S3Location:
        """The object ``joined`` stands for, assembled by the server under a scratch name."""
        target = self._folder.child(f"{SCRATCH}{name}")
        upload = _Upload(self._client, target, self._folder.child(name.partition(".safetensors")[0] + ".safetensors"))
        try:
            upload.complete([self._put(upload, 1, joined.base, made), self._put(upload, 2, joined.tail, made)])
        except BaseException:
            upload.abort()
            raise
        with self._lock:
            scratch.append(target)
        return target

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

    def send(self, number: int, data: bytearray) -> _Uploaded:
        answer = self._call(
            f"sending part {number}", self._client.upload_part, Body=data, PartNumber=number,
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
            if if_match and error_code(e) in ("PreconditionFailed", "412"):
                raise CheckpointError(
                    f"{safe_text(source.url)}: changed during the run (its ETag is no longer {safe_text(if_match)}); "
                    "nothing was published: run the same command again"
                ) from None
            raise describe(self._shown, f"copying {what or source.url} into part {number} on the server", e) from None
        return _Uploaded(number, answer["CopyPartResult"]["ETag"])

    def complete(self, parts: list[_Uploaded]) -> None:
        done = [{"PartNumber": part.number, "ETag": part.etag} for part in sorted(parts, key=lambda p: p.number)]
        self._call(
            "completing the upload", self._client.complete_multipart_upload,
            MultipartUpload={"Parts": done}, UploadId=self._upload_id(),
        )  # fmt: skip

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


def _wait_all(futures: list[Future[_Uploaded]]) -> None:
    """Wait for every part; on the first failure, cancel those not started and raise it."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for future in done:
        if future.exception() is not None:
            for other in pending:
                other.cancel()
            wait(pending)
            raise future.exception()  # type: ignore[misc]
