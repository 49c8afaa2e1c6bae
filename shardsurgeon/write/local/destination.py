"""A local output folder as a destination of the run sequence: the claim, the staging folder, and
publishing by one rename.

Everything is written under a hidden sibling ``.NAME.shardsurgeon-partial`` (the staging folder)
and moved to NAME only when complete and fsynced (:mod:`publish`), so NAME never holds a partial
result. The staging folder belongs to one job (its key is in ``.shardsurgeon-resume``); shards
appear in it under their own names only once complete (runners write ``NAME.partial`` first).

Claiming the output: a run or a finalize takes the output's lock alone, recovers a commit a killed
run left half done, checks the output and the names beside it, and records what NAME holds (it
publishes only if NAME still holds that, or with ``force``). A run takes over a staging folder of
another job (it is removed: nothing of it can be kept); a finalize requires its own job's. The
writers of a distributed job share the lock with one another and create or join the staging
folder of their job, refusing another job's. Nothing a source is made of may be among what a
run writes, replaces or removes (:mod:`storage.overlap`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import DestinationError, OutputError, ShardSurgeonError, safe_text
from shardsurgeon.names import PARTIAL_SUFFIX, RESUME_NAME
from shardsurgeon.plan.job import Job
from shardsurgeon.plan.layout import CopyRun, PlacedPiece, ShardLayout
from shardsurgeon.plan.tensors import Zeros
from shardsurgeon.storage import fileio
from shardsurgeon.storage.overlap import SourceIdentities, check_outside_sources
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.storage.smallfile import read_small
from shardsurgeon.units import Progress, format_bytes
from shardsurgeon.write.destination import Part, ShardBegins, WriteOptions
from shardsurgeon.write.executor import Reflink, ShardStats, ShardWriter, check_reflink
from shardsurgeon.write.local import lock, publish

SMALL_FILES_ALLOWANCE = 64 << 20
"""Room kept free for the config, index, tokenizer and model card when checking disk space."""


def staging_folder(out: Path) -> Path:
    return publish.sibling(out, "partial")


def lock_file(out: Path) -> Path:
    """The lock file of ``out``: beside it and the staging folder, never inside a folder that moves."""
    return publish.sibling(out, "lock")


class LocalFolder:
    """A local output folder; ``out`` is named as given (``.`` and ``..`` become absolute paths)."""

    def __init__(self, out: Path):
        self.out = Path(os.path.abspath(out)) if out.name in ("", ".", "..") else out
        self.shown = str(self.out)

    @contextmanager
    def claim(self, job: Job, part: Part, options: WriteOptions) -> Iterator[LocalArea]:
        area = LocalArea(self.out, job, part, options)
        try:
            area.enter()
            yield area
        except BaseException as e:
            area.release(failed=True)
            if (noted := area.noted(e)) is e:
                raise
            raise noted from None
        area.release(failed=False)


@dataclass(frozen=True, slots=True)
class LocalShards:
    """Shards written into a staging folder, by any process of this machine or another that sees it."""

    staging: Path
    seen: publish.Identity | None
    dense: bool
    reflink: Reflink

    def write(self, shards: Sequence[ShardLayout], progress: Progress, begins: ShardBegins) -> ShardStats:
        """Each shard written as ``NAME`` + this process's tag + a partial suffix, fsynced, then
        renamed to ``NAME``: a shard file under its own name is always complete, whoever wrote it, and
        no two processes ever write one file (a writer of another run, one left by a killed run)."""
        total = ShardStats()
        tag = worker_tag()
        with (
            SourceFiles() as files,
            ShardWriter(files, dense=self.dense, reflink=self.reflink, progress=progress) as out,
        ):
            for shard in shards:
                begins(shard)
                partial = self.staging / f"{shard.name}{tag}{PARTIAL_SUFFIX}"
                check_staging(self.staging, self.seen)
                total += out.write(shard, partial)
                check_staging(self.staging, self.seen)
                partial.rename(self.staging / shard.name)
        return total


class LocalArea:
    """The output claimed for one part of one job: its lock, its staging folder, and the commit."""

    def __init__(self, out: Path, job: Job, part: Part, options: WriteOptions):
        self.out = out
        self.notes: tuple[str, ...] = ()
        self.stats = ShardStats()
        self.staging = staging_folder(out)
        self._job = job
        self._part = part
        self._options = options
        self._folders = [s.folder for s in job.sources.values() if isinstance(s.folder, Path)]
        self._files, self._lone_files = job.local_files()
        self._identities = SourceIdentities(self._folders, job.versions)
        self._created: list[Path] = []
        self._lock: lock.Lock | None = None
        self._at_start: publish.Identity | None = None
        self._seen: publish.Identity | None = None

    def enter(self) -> None:
        self._check()
        self._created = _make_parents(self.out)
        try:
            shown = f"--out {safe_text(self.out)}"
            self._lock = lock.acquire(lock_file(self.out), shown, shared=not self._part.exclusive)
            if not self._lock.held:  # a shared lock where there is none (no flock, Windows): nothing keeps out a run
                raise OutputError(
                    f"{shown}: files cannot be locked there (the filesystem or platform has no shared locks), so "
                    "writers of a plan (apply --shards) cannot be kept apart from a run or a finalize; write the "
                    "whole plan with apply PLAN OUT, or put the output on a filesystem with file locks"
                )
            if self._part.exclusive:
                self.notes = tuple(publish.recover(self.out, RESUME_NAME, self._guard))
            elif publish.sibling(self.out, "commit").exists():
                raise OutputError(
                    f"{shown}: a commit was interrupted here; run apply PLAN --finalize (or the run that made it) to "
                    "recover it first"
                )
            self._check()
            self._at_start = publish.folder_identity(self.out)
            check_reflink(self._job.layout.shards, self.out, self._options.reflink)
            self._open_staging()
            self._seen = publish.folder_identity(self.staging)
        except BaseException:
            self.release(failed=True)
            raise

    def _open_staging(self) -> None:
        """The staging folder of this job: a run takes over another job's (removing it), a writer
        creates or joins its job's and refuses another's, a finalize requires its job's."""
        key = self._job.key
        shown = f"--out {safe_text(self.out)}"
        if self._part.kind == "finalize":
            if not staging_matches(self.out, key):
                raise OutputError(
                    f"{shown}: no shards of this plan are waiting in {safe_text(self.staging.name)}; write them first "
                    "with apply PLAN --shards ..."
                )
            return
        try:
            if self._part.kind == "run" and os.path.lexists(self.staging) and not staging_matches(self.out, key):
                self._remove(self.staging)
            if self.staging.is_symlink():
                raise OutputError(
                    f"{shown}: {safe_text(self.staging.name)} is a link; the run writes its work only in a folder of "
                    "its own there: remove the link"
                )
            self.staging.mkdir(exist_ok=True)
            _mark(self.staging / RESUME_NAME, key)
        except OSError as e:
            raise OutputError(f"{safe_text(self.staging)}: cannot prepare the output: {e.strerror or e}") from None
        if not staging_matches(self.out, key):
            raise OutputError(
                f"{shown}: {safe_text(self.staging.name)} holds the shards of another plan or run; finalize or finish "
                "that one, or remove the folder, then write this plan's shards"
            )

    # --- what the run sequence asks -------------------------------------------------------------

    def finished(self, shard: ShardLayout) -> bool:
        path = self.staging / shard.name
        try:
            if os.lstat(path).st_size != shard.nbytes or path.is_symlink():
                return False
            with open(path, "rb") as f:
                return f.read(shard.header_nbytes) == shard.header
        except OSError:
            return False

    def recorded(self, shard: ShardLayout) -> bool:
        return False  # a file keeps no record a damaged byte would break: its bytes are compared

    def location(self, shard: ShardLayout) -> Path:
        return self.staging / shard.name

    def prepare(self, kept: Sequence[ShardLayout], todo: Sequence[ShardLayout], options: WriteOptions) -> None:
        check_staging(self.staging, self._seen)
        if self._part.exclusive:
            self._remove_strays({s.name for s in kept})
        shared = _shareable_sources(todo, self.staging) if options.reflink != "never" else set()
        needed = sum(_bytes_to_write(s, options.dense, shared) for s in todo)
        needed += SMALL_FILES_ALLOWANCE if self._part.publish and self._part.write else 0
        try:
            check_room(self.staging, needed)
        except OutputError:
            if self._part.kind == "run" and not kept:  # nothing worth keeping for a resume: leave nothing
                shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def target(self, todo: Sequence[ShardLayout], options: WriteOptions) -> LocalShards:
        return LocalShards(self.staging, self._seen, options.dense, options.reflink)

    @contextmanager
    def small_files(self) -> Iterator[Path]:
        """The staging folder itself: the small files are written beside the shards."""
        check_staging(self.staging, self._seen)
        yield self.staging

    def publish(self, small: Path, sources_unchanged: Callable[[], None]) -> None:
        """Commit the finished staging folder as ``out``, unless ``out`` changed without ``force``."""
        check_staging(self.staging, self._seen)
        sources_unchanged()
        now = publish.folder_identity(self.out)
        force = self._options.force
        if now is not None and now != self._at_start and not force:
            change = "a folder appeared there" if self._at_start is None else "the folder there was replaced"
            raise OutputError(self._changed(change))
        if now is not None and not force and _non_empty(self.out):
            raise OutputError(self._changed("the empty folder there was filled"))
        self._check()
        publish.commit(self.staging, self.out, RESUME_NAME, self._guard)

    # --- the claim ------------------------------------------------------------------------------

    def _remove_strays(self, keep: set[str]) -> None:
        """Delete what an earlier run left that this job does not keep (other shards, partial files)."""
        for entry in self.staging.iterdir():
            if entry.name not in keep and entry.name != RESUME_NAME:
                self._remove(entry)

    def _guard(self, path: Path) -> None:
        """Refuse to remove or replace ``path`` if it holds a source by device and inode."""
        self._identities.check_removable(path, "--out")

    def _remove(self, path: Path) -> None:
        """Remove what the run may remove: never a source, however it came to be there."""
        self._guard(path)
        _remove(path)

    def _changed(self, change: str) -> str:
        return (
            f"--out {safe_text(self.out)}: {change} during the run; it is left as it is, and the finished output "
            f"waits in {safe_text(self.staging.name)}: move that folder away and run the same command again to "
            "publish it, or pass --force to replace it"
        )

    def _check(self) -> None:
        beside = [publish.sibling(self.out, kind) for kind in ("partial", "old", "lock", "commit")]
        check_outside_sources(
            self.out, self._folders, "--out", files=self._files, lone_files=self._lone_files, beside=beside
        )
        if self._part.exclusive:
            check_destination(self.out, self._options.force)
            self._guard(self.out)

    def release(self, *, failed: bool) -> None:
        """Release the output's lock and, after a failure, remove the parent folders the claim
        created while they are empty (one that is not holds what a run leaves for a resume)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed:
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._created = []

    def noted(self, error: BaseException) -> BaseException:
        """A library error with the recovery notes added, so that they are not lost with the run."""
        if not self.notes or not isinstance(error, ShardSurgeonError):
            return error
        return type(error)(f"{error} (first, {'; '.join(self.notes)})")


def _mark(marker: Path, key: str) -> None:
    """Write the resume marker, appearing whole with its key or not at all (a writer starting at the
    same moment reads the key, never an empty file); an existing marker is left as it is."""
    partial = marker.with_name(f"{marker.name}{worker_tag()}{PARTIAL_SUFFIX}")
    fd = fileio.open_new(partial)
    try:
        fileio.write_all_at(fd, key.encode(), 0)
    finally:
        os.close(fd)
    try:
        os.link(partial, marker)
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some FUSE and network filesystems): create it in place
        with (
            contextlib.suppress(FileExistsError),
            os.fdopen(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f,
        ):
            f.write(key)
    finally:
        partial.unlink()


def worker_tag() -> str:
    """A partial-file tag unique to this process on this host, for writers that may overlap."""
    import socket

    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f".{host}-{os.getpid()}"


def check_staging(staging: Path, seen: publish.Identity | None) -> None:
    """Refuse to go on writing into ``staging`` when it is no longer the folder ``seen`` (its device
    and inode when the run began): a link put in its place would lead the writes elsewhere."""
    if seen is None or publish.folder_identity(staging) != seen or staging.is_symlink():
        raise OutputError(
            f"{safe_text(staging)}: the staging folder was replaced during the run (by a link or another "
            "folder); nothing more is written through it; run the same command again"
        )


def staging_matches(out: Path, key: str) -> bool:
    """Whether ``out``'s staging folder holds the work of the job ``key``."""
    marker = staging_folder(out) / RESUME_NAME
    if marker.is_symlink() or staging_folder(out).is_symlink():
        return False
    try:  # a regular file only, read without blocking: a FIFO put there is no marker
        return read_small(marker, len(key) + 1, OutputError, "a resume marker").decode() == key
    except (OutputError, UnicodeDecodeError):
        return False


def check_destination(out: Path, force: bool) -> None:
    """Refuse an output that cannot be renamed into place, or that is non-empty without ``force``
    (whether it touches a source is :func:`storage.overlap.check_outside_sources`'s)."""
    shown = safe_text(out)
    real_out = out.resolve()
    if out.is_symlink():
        raise DestinationError(
            f"--out {shown}: is a symbolic link; give the folder it points to, {safe_text(real_out)}"
        )
    if out.exists() and not out.is_dir():
        raise DestinationError(f"--out {shown}: exists and is a file; choose a folder name")
    if out.is_dir() and os.path.ismount(out):
        raise DestinationError(
            f"--out {shown}: is a mount point, which cannot be replaced by renaming; write to a folder inside it"
        )
    if Path.cwd().resolve().is_relative_to(real_out) and out.is_dir():
        raise DestinationError(f"--out {shown}: holds the current folder; run from elsewhere or choose another output")
    if out.is_dir() and _non_empty(out) and not force:
        raise DestinationError(f"--out {shown}: folder exists and is not empty; pass --force to replace it")


def _non_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of ``out``, outermost first; returns those created."""
    missing = []
    parent = out.absolute().parent
    while not parent.is_dir() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as e:
            for made in reversed(created):
                made.rmdir()
            raise OutputError(
                f"--out {safe_text(out)}: cannot create the folder {safe_text(folder)}: {e.strerror or e}"
            ) from None
        created.append(folder)
    return created


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_room(staging: Path, needed: int) -> None:
    available = free_bytes(staging)
    if needed > available:
        raise OutputError(
            f"{safe_text(staging.parent.resolve())}: needs {format_bytes(needed)} for the files still to write but "
            f"only {format_bytes(available)} is free; free some space or write elsewhere with --out"
        )


def _bytes_to_write(shard: ShardLayout, dense: bool, shared: set[Path | str]) -> int:
    """New disk ``shard`` takes: its bytes less its holes (unless ``dense``) and less the whole
    blocks of its copies from ``shared`` source files, which the filesystem shares instead."""
    segments = shard.segments()
    holes = sum(s.piece.nbytes for s in segments if isinstance(s, PlacedPiece) and isinstance(s.piece.op, Zeros))
    cloned = sum(s.shareable_bytes for s in segments if isinstance(s, CopyRun) and s.path in shared)
    return shard.nbytes - (0 if dense else holes) - cloned


def _shareable_sources(shards: Sequence[ShardLayout], staging: Path) -> set[Path | str]:
    """The source files that files in ``staging`` can share blocks with (one probe clone each)."""
    paths = dict.fromkeys(s.path for shard in shards for s in shard.segments() if isinstance(s, CopyRun))
    shared: set[Path | str] = set()
    for path in paths:
        with contextlib.suppress(OSError):
            if isinstance(path, Path) and fileio.can_reflink(path, staging):
                shared.add(path)
    return shared


__all__ = ["PARTIAL_SUFFIX", "LocalArea", "LocalFolder", "LocalShards", "check_staging", "staging_folder"]
