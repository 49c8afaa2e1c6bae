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

import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import DestinationError, OutputError, safe_text
from shardsurgeon.model.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, Shard
from shardsurgeon.model.source import Source
from shardsurgeon.plan.layout import Layout, ShardLayout
from shardsurgeon.plan.planner import Plan, Zeros
from shardsurgeon.storage import s3
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.storage.s3 import S3Location
from shardsurgeon.units import Progress, ShardStarted
from shardsurgeon.write.executor import ShardStats
from shardsurgeon.write.finish import RunResult, announcer, check_sources_unchanged, write_small_files
from shardsurgeon.write.s3.claim import LOCK_NAME, S3Claim
from shardsurgeon.write.s3.objects import RESUME_NAME, ZEROS_NAME, ResumeRecord, S3Folder, check_bucket
from shardsurgeon.write.s3.parts import ZEROS_NBYTES
from shardsurgeon.write.s3.uploads import SCRATCH, S3ShardWriter

COMPLETING = (INDEX_FILE, SINGLE_FILE, CONFIG_FILE)
"""Files whose presence makes a folder a checkpoint; removed first when ``force`` replaces one."""
MAX_LISTED = 100_000
MAX_CHECKED = 1_000
"""Objects of a folder an unfinished run left whose metadata is read to tell the run's from others'."""


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
    check_bucket(client, folder)
    notes: tuple[str, ...] = ()
    unpinned = sorted({str(s.path) for src in sources.values() for s in src.checkpoint.shards if _unpinned(s)})
    if unpinned:  # their content may change unseen: no shard of an earlier run can be trusted
        resume_key += ":" + uuid.uuid4().hex
        notes += (
            f"{safe_text(unpinned[0])} and the like give no ETag nor Last-Modified: a rerun cannot tell whether they "
            "changed, so it keeps no shard of this one",
        )
    with S3Claim(client, folder) as claim:
        store = S3Folder(client, folder, resume_key)
        start = _prepare(store, layout, force)
        # a published job's shards were all checked already: not fetched twice
        done = (
            list(layout.shards)
            if start.published
            else [s for s in layout.shards if s.name in start.kept and store.holds(s)]
        )
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
    store: S3Folder,
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


def _prepare(store: S3Folder, layout: Layout, force: bool) -> _Start:
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
    store.write_record(ResumeRecord(store.run_key, tuple(sorted(replacing - kept))))
    return _Start(kept, replacing - kept)


def _publish(
    store: S3Folder,
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
