"""An S3 folder (``--out s3://bucket/prefix``) as a destination of the run sequence: the claim, what
the folder may hold, shards uploaded under their final names, and publishing by writing the
completing files last.

S3 has no rename, so nothing can appear at once: shards are written under their final names (each
appears whole when its multipart upload completes), and the folder holds a checkpoint only once
``config.json`` is there with the index or the single shard. They are written last, after every
shard, and ``config.json`` with ``If-None-Match: *``, so of two runs racing to one folder only one
can publish. Claiming the folder for a job:

1. nothing the run may touch is a source: not the folder by any URL of the same store, and no object
   in it with a source file's size and ETag (:mod:`storage.overlap`);
2. the claim (:mod:`write.s3.claim`): alone for a run or a finalize, shared by a job's writers;
3. what the folder holds: a complete checkpoint, or any object not written by this tool (each
   object it writes carries its job's key in its metadata) and not listed by the resume record, is
   refused without ``force``; a job found published whose cleanup did not happen is finished.

Then, once the run sequence has proven what it keeps: with ``force`` the old ``config.json`` and
index go first (no reader sees old and new mixed), other jobs' objects are removed, a run alone
aborts the unfinished uploads under the folder, and the resume record names the job (and what is
being replaced). Each shard's upload, when complete, leaves a record of its ETag
(``.shardsurgeon-done/NAME``): that and the object's ETag now are a kept shard's proof. After
publishing: the run's own work objects are removed, and with ``force`` what is left of the replaced
checkpoint; nothing another client writes meanwhile.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from shardsurgeon.errors import DestinationError, OutputError, safe_text
from shardsurgeon.names import CONFIG_FILE, DONE_PREFIX, INDEX_FILE, RESUME_NAME, SINGLE_FILE, WORK_PREFIX, ZEROS_NAME
from shardsurgeon.plan.job import Job
from shardsurgeon.plan.layout import PlacedPiece, ShardLayout
from shardsurgeon.plan.tensors import Zeros
from shardsurgeon.storage import s3
from shardsurgeon.storage.overlap import check_folder_outside_sources, source_among
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.storage.s3 import S3Location
from shardsurgeon.units import Progress
from shardsurgeon.write.destination import Part, ShardBegins, WriteOptions
from shardsurgeon.write.executor import ShardStats
from shardsurgeon.write.s3.claim import ClaimToken, S3Claim
from shardsurgeon.write.s3.objects import ResumeRecord, S3Folder, check_bucket
from shardsurgeon.write.s3.parts import ZEROS_NBYTES
from shardsurgeon.write.s3.uploads import SCRATCH, S3ShardWriter

COMPLETING = (INDEX_FILE, SINGLE_FILE, CONFIG_FILE)
"""Files whose presence makes a folder a checkpoint; removed first when ``force`` replaces one."""
MAX_LISTED = 100_000
MAX_CHECKED = 1_000
"""Objects of a folder an unfinished run left whose metadata is read to tell the run's from others'."""


class S3Destination:
    """An S3 folder given as ``s3://bucket/prefix``."""

    def __init__(self, url: str):
        self.location = S3Location.parse(url).folder()
        self.out = self.shown = self.location.url

    @contextmanager
    def claim(self, job: Job, part: Part, options: WriteOptions) -> Iterator[S3Area]:
        client = s3.client()
        endpoint = client.meta.endpoint_url
        sources = [str(source.folder) for source in job.sources.values() if isinstance(source.folder, str)]
        check_folder_outside_sources(self.location.bucket, self.location.key, safe_text(self.shown), sources, endpoint)
        check_bucket(client, self.location)
        with S3Claim(client, self.location, job=job.key, shared=not part.exclusive) as claim:
            yield S3Area(S3Folder(client, self.location, job.key), job, part, options, claim)


@dataclass(frozen=True, slots=True)
class S3Shards:
    """Shards uploaded into an S3 folder by any process that reaches the store: each upload completes
    only while the run's claim holds, and leaves the record of its ETag."""

    folder: S3Location
    key: str
    claim: ClaimToken
    zeros_url: str | None
    etags: dict[str, str] = field(default_factory=dict)
    """The versions of the objects copied from (sources, the zeros object) as the run saw them."""

    def write(self, shards: Sequence[ShardLayout], progress: Progress, begins: ShardBegins) -> ShardStats:
        client = s3.client()
        store = S3Folder(client, self.folder, self.key)
        total = ShardStats()

        def confirm() -> None:
            self.claim.confirm(client)

        with (
            SourceFiles() as files,
            S3ShardWriter(
                client, self.folder, files, zeros_url=self.zeros_url, etags=self.etags, run_key=self.key,
                progress=progress,
            ) as writer,
        ):  # fmt: skip
            for shard in shards:
                begins(shard)
                stats, etag = writer.write(shard, lambda: None, confirm)
                store.record_done(shard.name, etag)
                total += stats
        return total


class S3Area:
    """The S3 folder claimed for one part of one job."""

    def __init__(self, store: S3Folder, job: Job, part: Part, options: WriteOptions, claim: S3Claim):
        self.notes: tuple[str, ...] = ()
        self._store = store
        self._job = job
        self._part = part
        self._options = options
        self._claim = claim
        self._heads: dict[str, tuple[int, str, str | None] | None] = {}
        self.stats = ShardStats()
        """What the area itself sent: the zeros object and the small files."""
        self._look()

    def _look(self) -> None:
        """What the folder holds: refused without ``force`` unless it is this tool's unfinished work;
        this job found published and not cleaned up."""
        store, shards = self._store, self._job.layout.shards
        listing = store.listing("", limit=MAX_LISTED)
        names = [name for name, _, _ in listing]
        touched = [item for item in listing if not item[0].startswith(WORK_PREFIX)]
        self._check_no_source_at_or_above(touched)
        others = [name for name, _, _ in touched]
        # asked one by one, not read from a listing that may be cut short
        self._complete = store.exists(CONFIG_FILE) and (store.exists(INDEX_FILE) or store.exists(SINGLE_FILE))
        record = store.read_record() if RESUME_NAME in names else None
        if record is not None and record.key != store.run_key and not self._part.exclusive:
            raise OutputError(
                f"--out {safe_text(store.folder.url)}: holds the unfinished work of another plan or run; finalize "
                "or finish that one, or run this whole plan there (apply PLAN OUT) to replace it, then write this "
                "plan's shards"
            )
        self._replacing = frozenset(record.replacing) if record is not None else frozenset()
        written = {name: store.run_of(name) for name in others[:MAX_CHECKED]} if record is not None else {}
        self._ours = {name for name, run in written.items() if run is not None}
        self._mine = {name for name in self._ours if written[name] == store.run_key}
        foreign = [name for name in others if name not in self._ours and name not in self._replacing]
        self._published = bool(
            self._complete and record is not None and record.key == store.run_key and not foreign
            and all(self.finished(s) for s in shards)
        )  # fmt: skip
        if (foreign or self._complete) and not self._published and not self._options.force:
            shown = ", ".join(safe_text(name, 60) for name in (foreign or others)[:3])
            shown += ", ..." if len(foreign or others) > 3 else ""
            what = (
                "a checkpoint" if self._complete else f"{len(foreign)}{'+' if len(names) > MAX_LISTED else ''} objects"
            )
            raise OutputError(
                f"--out {safe_text(store.folder.url)}: already holds {what} ({shown}); pass --force to replace it, or "
                "choose an empty folder"
            )
        self._replacing |= frozenset(foreign) | (frozenset(others) if self._complete and not self._published else set())
        self._replacing -= self._mine

    def _check_no_source_at_or_above(self, touched: list[tuple[str, int, str]]) -> None:
        """Refuse when an object in the folder (which the run may remove or overwrite), or directly in
        a folder above it (which would then hold the output), holds a source file's bytes, however
        the source was named."""
        store, versions = self._store, self._job.versions
        shown = safe_text(store.folder.url)
        if (found := source_among(touched, versions, store.header_digest)) is not None:
            name, version = found
            raise DestinationError(
                f"--out {shown}: {safe_text(name)} there holds the bytes of the source file {safe_text(version.where)} "
                "(the same size and header): it is that file under another name, or a copy of it, and the run would "
                "remove or overwrite it; choose another output"
            )
        for above in store.folders_above():
            found = source_among(store.listing_of(above), versions, partial(store.header_digest, folder=above))
            if found is not None:
                raise DestinationError(
                    f"--out {shown}: lies inside s3://{store.folder.bucket}/{safe_text(above)}, which holds the bytes "
                    f"of the source file {safe_text(found[1].where)}: the source folder under another name; the "
                    "source is never written to, choose an output folder outside it"
                )

    # --- what the run sequence asks -------------------------------------------------------------

    def _head(self, name: str) -> tuple[int, str, str | None] | None:
        if name not in self._heads:
            self._heads[name] = self._store.head(name)
        return self._heads[name]

    def finished(self, shard: ShardLayout) -> bool:
        found = self._head(shard.name)
        if found is None or found[0] != shard.nbytes or found[2] != self._store.run_key:
            return False
        return self._store.holds(shard)

    def recorded(self, shard: ShardLayout) -> bool:
        found = self._head(shard.name)
        return found is not None and self._store.done_etag(shard.name) == found[1]

    def location(self, shard: ShardLayout) -> str:
        return self._store.folder.child(shard.name).url

    def prepare(self, kept: Sequence[ShardLayout], todo: Sequence[ShardLayout], options: WriteOptions) -> None:
        store = self._store
        self._claim.confirm()
        if self._published and not todo:
            self.notes += ("this job was published by an earlier run that stopped before its cleanup; finished it",)
            return
        self._published = False
        keep = {s.name for s in kept}
        if self._part.exclusive:
            store.remove([name for name in COMPLETING if name not in keep])  # no reader sees a checkpoint here now
            store.remove(sorted(name for name in self._ours - keep if name not in self._replacing))
            store.abort_uploads()
        else:  # a writer: never what another writer of this job wrote or is writing
            store.remove([name for name in COMPLETING if name not in keep and name not in self._mine])
            store.remove(sorted(name for name in self._ours - self._mine if name not in self._replacing))
        store.write_record(ResumeRecord(store.run_key, tuple(sorted(self._replacing))))

    def target(self, todo: Sequence[ShardLayout], options: WriteOptions) -> S3Shards:
        etags = {v.where: v.validator for v in self._job.versions if not v.is_local and v.validator}
        zeros = None
        if any(
            isinstance(s, PlacedPiece) and isinstance(s.piece.op, Zeros) for shard in todo for s in shard.segments()
        ):
            zeros, etags[zeros] = self._store.zeros_object()
            self.stats += ShardStats(sent=ZEROS_NBYTES)
        return S3Shards(self._store.folder, self._store.run_key, self._claim.token, zeros, etags)

    @contextmanager
    def small_files(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="shardsurgeon-") as scratch:
            yield Path(scratch)

    def publish(self, small: Path, sources_unchanged: Callable[[], None]) -> None:
        """The small files, then the index, then config.json: the folder is a checkpoint from then
        on; then the run's own work objects go, and with force what is left of the replaced one."""
        store = self._store
        last = [name for name in (INDEX_FILE, CONFIG_FILE) if (small / name).exists()]
        self._claim.confirm()  # nothing of the publishing is written by a run that lost the folder
        for shard in self._job.layout.shards:  # still what was proven or written: no late upload replaced one
            found, seen = store.head(shard.name), self._heads.get(shard.name)
            expected = store.done_etag(shard.name) or (seen[1] if seen is not None else None)
            if found is None or found[1] != expected:
                raise OutputError(
                    f"--out {safe_text(store.folder.url)}: {shard.name} was replaced while this run was finishing "
                    "(another run's late upload?); nothing was published: run the same command again"
                )
        sent = 0
        for path in sorted(small.iterdir()):
            if path.name not in last:
                sent += store.put(path.name, path.read_bytes())
        sources_unchanged()
        self._claim.confirm()
        for name in last:
            sent += store.put(name, (small / name).read_bytes(), create=name == CONFIG_FILE and not self._published)
        self.stats += ShardStats(sent=sent)
        published = {s.name for s in self._job.layout.shards} | {path.name for path in small.iterdir()}
        work = [RESUME_NAME, ZEROS_NAME, *store.names(SCRATCH), *store.names(DONE_PREFIX)]
        store.remove([*work, *sorted(self._replacing - published)])
