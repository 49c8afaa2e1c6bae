"""Write a planned checkpoint to an S3 folder (``--out s3://bucket/prefix``): claim, resume, shards,
the small files, and publishing by writing the completing files last.

S3 has no rename, so nothing can appear at once: shards are written under their final names (each
appears whole when its multipart upload completes), and the folder holds a checkpoint only once
``config.json`` is there with the index or the single shard. They are written last, after every
shard, and ``config.json`` with ``If-None-Match: *``, so of two runs racing to one folder only one
can publish. A run:

1. claims the folder (:mod:`s3lock`);
2. looks at what the folder holds: a complete checkpoint, or anything else not left by an
   unfinished run of shardsurgeon, is refused without ``force`` (with it, the old ``config.json``
   and index go first, so that no reader sees old and new mixed); an unfinished run's shards are
   kept if its resume record names this very run and each one's size and header are right, else
   removed; unfinished multipart uploads under the folder are aborted;
3. writes the resume record ``.shardsurgeon-resume``, then the missing shards (:mod:`s3shards`);
4. uploads the small files, checks that no source changed, writes the index, then ``config.json``;
5. removes what is not part of the output: the record, the zeros and scratch objects, and with
   ``force`` what is left of the old checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon import s3
from shardsurgeon.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, Shard
from shardsurgeon.errors import DestinationError, OutputError, safe_text
from shardsurgeon.execute import ShardStats
from shardsurgeon.finish import RunResult, announcer, check_sources_unchanged, write_small_files
from shardsurgeon.layout import Layout, ShardLayout
from shardsurgeon.parts import ZEROS_NBYTES
from shardsurgeon.plan import Plan, Zeros
from shardsurgeon.remote import SourceFiles
from shardsurgeon.s3 import S3Location, describe, error_code, failed_condition
from shardsurgeon.s3lock import LOCK_NAME, S3Claim
from shardsurgeon.s3shards import RUN_METADATA_KEY, SCRATCH, S3ShardWriter, ZerosReader
from shardsurgeon.source import Source
from shardsurgeon.units import Progress, ShardStarted

RESUME_NAME = ".shardsurgeon-resume"
ZEROS_NAME = ".shardsurgeon-zeros"
COMPLETING = (INDEX_FILE, SINGLE_FILE, CONFIG_FILE)
"""Files whose presence makes a folder a checkpoint; removed first when ``force`` replaces one."""
MAX_LISTED = 100_000
MAX_CHECKED = 1_000
"""Objects of a folder an unfinished run left whose metadata is read to tell the run's from others'."""
RECORD_MAX_BYTES = 16 << 20


def write_checkpoint_s3(
    plan: Plan,
    layout: Layout,
    out: str,
    sources: Mapping[str, Source],
    *,
    resume_key: str,
    model_card: str,
    force: bool = False,
    checksums: bool = False,
    progress: Progress | None = None,
    on_shard: ShardStarted | None = None,
) -> RunResult:
    """Write ``plan`` laid out as ``layout`` to the S3 folder ``out``, resuming an interrupted run
    whose resume record is ``resume_key``."""
    started = time.monotonic()
    progress = progress or (lambda nbytes: None)
    folder = S3Location.parse(out).folder()
    _check_outside_sources(folder, sources)
    client = s3.client()
    _check_bucket(client, folder)
    notes: tuple[str, ...] = ()
    unpinned = sorted({str(s.path) for src in sources.values() for s in src.checkpoint.shards if _unpinned(s)})
    if unpinned:  # their content may change unseen: no shard of an earlier run can be trusted
        resume_key += ":" + uuid.uuid4().hex
        notes += (
            f"{safe_text(unpinned[0])} and the like give no ETag nor Last-Modified: a rerun cannot tell whether they "
            "changed, so it keeps no shard of this one",
        )
    with S3Claim(client, folder) as claim:
        store = _Folder(client, folder, resume_key)
        start = _prepare(store, layout, force)
        done = [s for s in layout.shards if s.name in start.kept and store.holds(s)]
        for shard in done:
            progress(shard.nbytes - len(shard.header))
        stats = ShardStats()
        if start.published:
            notes += ("this job was published by an earlier run that stopped before its cleanup; finished it",)
        else:
            todo = [s for s in layout.shards if s not in done]
            stats = _write_shards(store, todo, layout, sources, claim, progress, on_shard)
        published, sent = _publish(store, plan, layout, sources, model_card, checksums, claim, start.published)
        stats += ShardStats(sent=sent)
        # the run's work objects, and with force what is left of the checkpoint it replaced; nothing
        # that someone else writes into the folder meanwhile
        store.remove([RESUME_NAME, ZEROS_NAME, *store.names(SCRATCH), *(start.replacing - published)])
    return RunResult(
        folder.url, len(plan.tensors), len(layout.shards), len(done), stats.written, 0, time.monotonic() - started,
        notes, stats,
    )  # fmt: skip


def _unpinned(shard: Shard) -> bool:
    return isinstance(shard.path, str) and shard.etag is None


def _write_shards(
    store: _Folder,
    todo: list[ShardLayout],
    layout: Layout,
    sources: Mapping[str, Source],
    claim: S3Claim,
    progress: Progress,
    on_shard: ShardStarted | None,
) -> ShardStats:
    etags = {
        shard.path: shard.etag
        for source in sources.values()
        for shard in source.checkpoint.shards
        if isinstance(shard.path, str) and shard.etag
    }
    zeros = None
    if any(isinstance(p.tensor.op, Zeros) for s in todo for p in s.tensors):
        zeros, etags[zeros] = store.zeros_object()
    stats = ShardStats(sent=ZEROS_NBYTES if zeros else 0)
    begins = announcer(layout, on_shard)
    with (
        SourceFiles() as files,
        S3ShardWriter(
            store.client, store.folder, files, zeros_url=zeros, etags=etags, run_key=store.run_key, progress=progress
        ) as writer,
    ):
        for shard in todo:
            claim.check()
            begins(shard)
            stats += writer.write(shard, claim.check, claim.confirm)
    return stats


@dataclass(frozen=True, slots=True)
class _Start:
    kept: frozenset[str] = frozenset()
    """Shards an unfinished run of this very job left: kept once checked."""
    replacing: frozenset[str] = frozenset()
    """With force, what the folder held of another checkpoint: removed once the new one is published."""
    published: bool = False
    """This job is published already (every shard checked): a run stopped after config.json,
    before its cleanup; the small files are written again (``--checksums`` may differ), no shard."""


def _prepare(store: _Folder, layout: Layout, force: bool) -> _Start:
    """Check the folder and ready it for this run. What is this tool's is known by the resume
    record (a run that did not finish its cleanup) and the run key every object written carries in
    its metadata; anything else is another's: refused without ``force``, replaced with it."""
    names = store.names("", limit=MAX_LISTED)
    work = {LOCK_NAME, RESUME_NAME, ZEROS_NAME}
    others = [name for name in names if name not in work and not name.startswith(SCRATCH)]
    # asked one by one, not read from a listing that may be cut short
    complete = store.exists(CONFIG_FILE) and (store.exists(INDEX_FILE) or store.exists(SINGLE_FILE))
    record = store.read_record() if RESUME_NAME in names else None
    replacing = frozenset(record.replacing) if record is not None else frozenset()
    written = {name: store.run_of(name) for name in others[:MAX_CHECKED]} if record is not None else {}
    ours = {name for name, run in written.items() if run is not None}
    foreign = [name for name in others if name not in ours and name not in replacing]
    if complete and record is not None and not foreign and all(store.holds(s) for s in layout.shards):
        return _Start(frozenset(s.name for s in layout.shards), replacing, published=True)
    if (foreign or complete) and not force:
        shown = ", ".join(safe_text(name, 60) for name in (foreign or others)[:3])
        shown += ", ..." if len(foreign or others) > 3 else ""
        what = "a checkpoint" if complete else f"{len(foreign)}{'+' if len(names) > MAX_LISTED else ''} objects"
        raise OutputError(
            f"--out {safe_text(store.folder.url)}: already holds {what} ({shown}); pass --force to replace it, or "
            "choose an empty folder"
        )
    shard_names = {s.name for s in layout.shards}
    kept = frozenset(name for name in ours if written[name] == store.run_key and name in shard_names)
    replacing |= frozenset(foreign) | (frozenset(others) if complete else frozenset())
    store.remove([name for name in COMPLETING if name not in kept])  # no reader sees a checkpoint here now
    store.remove(sorted(name for name in ours - kept if name not in replacing))  # an earlier job's own work
    store.abort_uploads()
    store.write_record(_Record(store.run_key, tuple(sorted(replacing - kept))))
    return _Start(kept, replacing - kept)


def _publish(
    store: _Folder,
    plan: Plan,
    layout: Layout,
    sources: Mapping[str, Source],
    model_card: str,
    checksums: bool,
    claim: S3Claim,
    again: bool,
) -> tuple[frozenset[str], int]:
    """The small files, then the index, then config.json: the folder is a checkpoint from then on
    (``again``: this job's config.json is there already, and is written over). Returns the names of
    the output's files and the bytes sent."""
    donor = sources[plan.recipe.donor].folder
    sent = 0
    with tempfile.TemporaryDirectory(prefix="shardsurgeon-") as scratch:
        local = Path(scratch)
        write_small_files(local, plan, layout, donor, model_card, checksums, lambda name: store.folder.child(name).url)
        last = [name for name in (INDEX_FILE, CONFIG_FILE) if (local / name).exists()]
        claim.confirm()  # nothing of the publishing is written by a run that lost the folder
        for path in sorted(local.iterdir()):
            if path.name not in last:
                sent += store.put(path.name, path.read_bytes())
        check_sources_unchanged(sources)
        claim.confirm()
        for name in last:
            sent += store.put(name, (local / name).read_bytes(), create=name == CONFIG_FILE and not again)
        return frozenset({s.name for s in layout.shards} | {path.name for path in local.iterdir()}), sent


@dataclass(frozen=True, slots=True)
class _Record:
    """The resume record: the key of the job that left the folder unfinished, and with force what
    it holds of the checkpoint being replaced."""

    key: str
    replacing: tuple[str, ...] = ()


class _Folder:
    """The objects under one S3 folder, by name relative to it, as one job writes them: each object
    written carries ``run_key`` in its metadata."""

    def __init__(self, client: Any, folder: S3Location, run_key: str):
        self.client = client
        self.folder = folder
        self.run_key = run_key

    def _call(self, name: str, doing: str, method: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.folder.child(name)
        try:
            return method(Bucket=where.bucket, Key=where.key, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise describe(where, doing, e) from None

    def names(self, under: str, limit: int | None = None) -> list[str]:
        """The objects under the folder whose names start with ``under``, in order; with ``limit``,
        only the first ``limit + 1`` are looked for."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = self.folder.key + under
        names: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.folder.bucket, Prefix=prefix):
                names += [item["Key"].removeprefix(self.folder.key) for item in page.get("Contents", [])]
                if limit is not None and len(names) > limit:
                    break
        except (ClientError, BotoCoreError) as e:
            raise describe(self.folder, "listing the folder", e) from None
        return sorted(names)

    def abort_uploads(self) -> None:
        """Abort the unfinished multipart uploads a killed run left under the folder: of its shards
        and scratch objects (another tool's uploads there are none of its business)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.folder.bucket, Prefix=self.folder.key
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    name = str(upload["Key"]).removeprefix(self.folder.key)
                    if name.startswith(SCRATCH) or ("/" not in name and name.endswith(".safetensors")):
                        self.client.abort_multipart_upload(
                            Bucket=self.folder.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
        except (ClientError, BotoCoreError) as e:
            raise describe(self.folder, "aborting the unfinished uploads of an earlier run", e) from None

    def remove(self, names: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(names), 1000):
            batch = [{"Key": self.folder.key + name} for name in names[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.folder.bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as e:
                raise describe(self.folder, "removing objects", e) from None

    def put(self, name: str, data: bytes, create: bool = False) -> int:
        """Write the object ``name``; with ``create``, only if there is none (else another run published)."""
        from botocore.exceptions import ClientError

        where = self.folder.child(name)
        condition = {"IfNoneMatch": "*"} if create else {}
        try:
            self.client.put_object(
                Bucket=where.bucket, Key=where.key, Body=data, Metadata={RUN_METADATA_KEY: self.run_key}, **condition
            )
        except ClientError as e:
            if create and failed_condition(e):
                raise OutputError(
                    f"--out {safe_text(self.folder.url)}: another run published a checkpoint there during this one; "
                    "it is left as it is: pass --force to replace it"
                ) from None
            raise describe(where, f"writing {name}", e) from None
        return len(data)

    def run_of(self, name: str) -> str | None:
        """The run key ``name`` carries in its metadata: None for an object this tool did not write."""
        try:
            head = self._call(name, f"looking at {name}", self.client.head_object)
        except OutputError:
            return None
        run = head.get("Metadata", {}).get(RUN_METADATA_KEY)
        return str(run) if run else None

    def read_record(self) -> _Record | None:
        try:
            answer = self._call(RESUME_NAME, "reading the resume record", self.client.get_object)
            record = json.loads(answer["Body"].read(RECORD_MAX_BYTES))
            key, replacing = record["key"], record.get("replacing", [])
        except (OutputError, ValueError, TypeError, KeyError):
            return None
        if not isinstance(key, str) or not isinstance(replacing, list):
            return None
        return _Record(key, tuple(name for name in replacing if isinstance(name, str)))

    def write_record(self, record: _Record) -> None:
        self.put(RESUME_NAME, json.dumps({"key": record.key, "replacing": list(record.replacing)}).encode())

    def zeros_object(self) -> tuple[str, str]:
        """The all-zero object zero tensors are copied from: its URL and ETag."""
        where = self.folder.child(ZEROS_NAME)
        answer = self._call(
            ZEROS_NAME, "writing the zeros object", self.client.put_object, Body=ZerosReader(ZEROS_NBYTES)
        )
        return where.url, str(answer["ETag"])

    def exists(self, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.folder.child(name)
        try:
            self.client.head_object(Bucket=where.bucket, Key=where.key)
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise describe(where, f"looking for {name}", e) from None
        except BotoCoreError as e:
            raise describe(where, f"looking for {name}", e) from None
        return True

    def holds(self, shard: ShardLayout) -> bool:
        """Whether the object of ``shard`` was written by a run of this very job (its metadata says
        so) and has the size and header the layout gives it."""
        try:
            head = self._call(shard.name, "checking a finished shard", self.client.head_object)
            if head["ContentLength"] != shard.nbytes or head.get("Metadata", {}).get(RUN_METADATA_KEY) != self.run_key:
                return False
            answer = self._call(
                shard.name,
                "checking a finished shard",
                self.client.get_object,
                Range=f"bytes=0-{len(shard.header) - 1}",
            )
            return bool(answer["Body"].read() == shard.header)
        except OutputError:
            return False


def _check_outside_sources(folder: S3Location, sources: Mapping[str, Source]) -> None:
    """Refuse an output folder that is, holds or lies inside a source folder in S3: the source is
    never written to (a run removes what is not its output)."""
    for source in sources.values():
        if not (isinstance(source.folder, str) and source.folder.startswith("s3://")):
            continue
        other = S3Location.parse(source.folder).folder()
        if other.bucket != folder.bucket:
            continue
        shown = f"--out {safe_text(folder.url)}"
        if other.key == folder.key:
            raise DestinationError(f"{shown}: is the source folder; the source is never written to, choose another")
        if folder.key.startswith(other.key):
            raise DestinationError(
                f"{shown}: is inside the source folder {safe_text(other.url)}; the source is never written to, choose "
                "an output folder outside it"
            )
        if other.key.startswith(folder.key):
            raise DestinationError(f"{shown}: contains the source folder {safe_text(other.url)}; choose another")


def _check_bucket(client: Any, folder: S3Location) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=folder.bucket)
    except ClientError as e:
        if error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise OutputError(
                f"--out {safe_text(folder.url)}: bucket {safe_text(folder.bucket)!r} not found; check the bucket name "
                "and AWS_ENDPOINT_URL, or create the bucket"
            ) from None
        raise describe(folder, "opening the bucket", e) from None
    except BotoCoreError as e:
        raise describe(folder, "opening the bucket", e) from None
