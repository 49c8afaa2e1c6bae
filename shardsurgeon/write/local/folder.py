"""The output folder's life: safety checks, the claim on it, the staging folder, and resume.

Everything is written under a hidden sibling ``.NAME.shardsurgeon-partial`` and moved to NAME only
when complete and fsynced (see :mod:`publish`), so NAME never holds a partial result. A run claims
its output with a :class:`Destination`: checked, locked against other runs, recovered from an
interrupted commit, and published only if NAME still holds what it held at the start (or
``force``). A staging folder left by an interrupted run is reused when its resume key (plan
fingerprint and source file identities) matches; its completed shards are then checked against the
layout before they are kept.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from shardsurgeon.errors import DestinationError, OutputError, ShardSurgeonError, safe_text
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.storage import fileio
from shardsurgeon.units import format_bytes
from shardsurgeon.write.local import lock, publish

RESUME_FILE = ".shardsurgeon-resume"
PARTIAL_SUFFIX = ".partial"


def staging_folder(out: Path) -> Path:
    return publish.sibling(out, "partial")


def lock_file(out: Path) -> Path:
    """The lock file of ``out``: beside it and the staging folder, never inside a folder that moves."""
    return publish.sibling(out, "lock")


class Destination:
    """An output folder claimed for one run; a context manager.

    Entering checks the destination, creates its missing parents, takes the output's lock (another
    run is refused, naming it), recovers from a commit a killed run left half done (saying so in
    :attr:`notes`), checks again under the lock and records what ``out`` holds. :meth:`commit`
    publishes only if ``out`` still holds that, or with ``force``. Exiting releases the lock and,
    after a failure, removes the parents it created if they are empty.
    """

    def __init__(self, out: Path, sources: Iterable[Path], force: bool, *, files: Iterable[Path] = ()):
        self.out = out
        self.notes: tuple[str, ...] = ()
        self._sources = list(sources)
        self._files = list(files)
        self._force = force
        self._created: list[Path] = []
        self._lock: lock.Lock | None = None
        self._at_start: publish.Identity | None = None

    def __enter__(self) -> Destination:
        self._check()
        self._created = _make_parents(self.out)
        try:
            self._lock = lock.acquire(lock_file(self.out), f"--out {safe_text(self.out)}")
            self.notes = tuple(publish.recover(self.out, RESUME_FILE))
            self._check()
            self._at_start = publish.folder_identity(self.out)
        except BaseException as e:
            self._release(failed=True)
            if (noted := self._noted(e)) is e:
                raise
            raise noted from None
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._release(failed=value is not None)
        if value is not None and (noted := self._noted(value)) is not value:
            raise noted from None

    def commit(self, staging: Path) -> None:
        """Publish the finished ``staging`` folder as ``out``, unless ``out`` changed without ``force``."""
        now = publish.folder_identity(self.out)
        if now is not None and now != self._at_start and not self._force:
            change = "a folder appeared there" if self._at_start is None else "the folder there was replaced"
            raise OutputError(self._changed(change, staging))
        if now is not None and not self._force and _non_empty(self.out):
            raise OutputError(self._changed("the empty folder there was filled", staging))
        self._check()
        publish.commit(staging, self.out, RESUME_FILE)

    def _changed(self, change: str, staging: Path) -> str:
        return (
            f"--out {safe_text(self.out)}: {change} during the run; it is left as it is, and the finished output "
            f"waits in {safe_text(staging.name)}: move that folder away and run the same command again to publish "
            "it, or pass --force to replace it"
        )

    def _check(self) -> None:
        check_destination(self.out, self._sources, self._force, files=self._files)

    def _release(self, *, failed: bool) -> None:
        _release(self._lock, self._created, failed)
        self._lock, self._created = None, []

    def _noted(self, error: BaseException) -> BaseException:
        """A library error with the recovery notes added, so that they are not lost with the run."""
        if not self.notes or not isinstance(error, ShardSurgeonError):
            return error
        return type(error)(f"{error} (first, {'; '.join(self.notes)})")


class Workers:
    """The output claimed by one of the writers of a distributed job (``apply --shards``); a context
    manager giving the staging folder of ``plan_key``.

    Writers share the output's lock with one another, which keeps out a run or a finalize (they
    take it alone). The staging folder is created for ``plan_key`` if there is none, and refused if
    it belongs to another plan or run: a writer never removes what it did not write. Nothing is
    published here.
    """

    def __init__(self, out: Path, sources: Iterable[Path], *, files: Iterable[Path] = (), plan_key: str):
        self.out = out
        self._sources = list(sources)
        self._files = list(files)
        self._key = plan_key
        self._created: list[Path] = []
        self._lock: lock.Lock | None = None

    def __enter__(self) -> Path:
        check_outside_sources(self.out, self._sources, "--out", files=self._files)
        self._created = _make_parents(self.out)
        try:
            self._lock = lock.acquire(lock_file(self.out), f"--out {safe_text(self.out)}", shared=True)
            if publish.sibling(self.out, "commit").exists():
                raise OutputError(
                    f"--out {safe_text(self.out)}: a commit was interrupted here; run apply PLAN --finalize "
                    "(or the run that made it) to recover it first"
                )
            return _claim_staging(self.out, self._key)
        except BaseException:
            self._release(failed=True)
            raise

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._release(failed=value is not None)

    def _release(self, *, failed: bool) -> None:
        _release(self._lock, self._created, failed)
        self._lock, self._created = None, []


def _claim_staging(out: Path, key: str) -> Path:
    """The staging folder of ``out`` for ``key``: made if missing, refused if another key's."""
    staging = staging_folder(out)
    marker = staging / RESUME_FILE
    try:
        staging.mkdir(exist_ok=True)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(key)
    except OSError as e:
        raise OutputError(f"{safe_text(staging)}: cannot prepare the output: {e.strerror or e}") from None
    if not staging_matches(out, key):
        raise OutputError(
            f"--out {safe_text(out)}: {safe_text(staging.name)} holds the shards of another plan or run; finalize "
            "or finish that one, or remove the folder, then write this plan's shards"
        )
    return staging


def check_staging(staging: Path, seen: publish.Identity | None) -> None:
    """Refuse to go on writing into ``staging`` when it is no longer the folder ``seen`` (its device
    and inode when the run began): a link put in its place would lead the writes elsewhere."""
    if seen is None or publish.folder_identity(staging) != seen or staging.is_symlink():
        raise OutputError(
            f"{safe_text(staging)}: the staging folder was replaced during the run (by a link or another "
            "folder); nothing more is written through it; run the same command again"
        )


def staging_matches(out: Path, key: str) -> bool:
    """Whether ``out``'s staging folder holds the work of ``key`` (a plan, or a run's resume key)."""
    try:
        return (staging_folder(out) / RESUME_FILE).read_text() == key
    except (OSError, UnicodeDecodeError):
        return False


def _release(held: lock.Lock | None, created: list[Path], failed: bool) -> None:
    """Release the output's lock and, after a failure, remove the parent folders the claim created
    while they are empty (one that is not holds what a run leaves for a resume)."""
    if held is not None:
        held.release()
    if failed:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break


def check_destination(out: Path, sources: Iterable[Path], force: bool, *, files: Iterable[Path] = ()) -> None:
    """Refuse an output that is, holds or lies inside a source or a folder its files live in (see
    :func:`check_outside_sources`), that cannot be renamed into place, or that is non-empty without
    ``force``."""
    check_outside_sources(out, sources, "--out", files=files)
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


def check_outside_sources(
    path: Path, sources: Iterable[Path], flag: str, what: str = "output folder", *, files: Iterable[Path] = ()
) -> None:
    """Refuse a ``path`` to write (an output folder, or some other ``what``) that is, holds or lies
    inside something a source is made of: the source folder, its Hugging Face cache entry, and every
    real file its top-level files (and ``files``) resolve to, with the folder holding it. So shards
    that are links into another folder (git-annex, DVC, a cache) are protected where they live."""
    real = _resolved(path, flag)
    shown = f"{flag} {safe_text(path)}"
    article = "an" if what[0] in "aeiou" else "a"
    protected = _protected(list(sources), files)
    if flag == "--out":  # the run also writes, replaces or locks these names beside the output
        for kind in ("partial", "old", "lock", "commit"):
            sibling = _resolved(publish.sibling(path, kind), flag)
            for item in protected:
                if item.path == sibling or item.path.is_relative_to(sibling):
                    raise DestinationError(
                        f"{shown}: {item} is {safe_text(sibling.name)}, which this output uses for its work and "
                        "may remove; move the source, or choose another output name"
                    )
    for item in protected:
        if real == item.path and item.is_folder_of_source:
            raise DestinationError(
                f"{shown}: is the source folder; the source is never written to, choose another {what}"
            )
        if real == item.path:
            raise DestinationError(f"{shown}: is {item}; the source is never written to, choose another {what}")
    holders = [item for item in protected if real.is_relative_to(item.path)]
    if holders:
        nearest = max(holders, key=lambda item: len(item.path.parts))
        raise DestinationError(
            f"{shown}: is inside {nearest}; the source is never written to, choose {article} {what} outside it"
        )
    for item in protected:
        if item.path.is_relative_to(real):
            raise DestinationError(f"{shown}: contains {item}; choose another {what}")


@dataclass(frozen=True, slots=True)
class _Protected:
    """A real path a source is made of, and how a message names it."""

    path: Path
    name: str
    is_folder_of_source: bool = False

    def __str__(self) -> str:
        return self.name


def _protected(sources: list[Path], files: Iterable[Path]) -> list[_Protected]:
    """The source folders, the Hugging Face cache entries (``models--org--name``) holding them, and
    the real file behind each source file, with its folder, where that is somewhere else."""
    found: dict[Path, _Protected] = {}

    def add(path: Path, name: str, is_folder_of_source: bool = False) -> None:
        found.setdefault(path, _Protected(path, name, is_folder_of_source))

    for source in sources:
        real = _resolved(source, "--src")
        add(real, f"the source {safe_text(source if real == source else real)}", is_folder_of_source=True)
        entries = [parent for parent in real.parents if parent.name.startswith("models--")]
        for entry in entries[:1]:
            add(entry, f"the source {safe_text(entry)}")
    folders = list(found)
    for file in [*files, *(entry for source in sources for entry in _top_level_files(source))]:
        try:
            real = file.resolve()
        except (RuntimeError, OSError):
            continue  # a loop of links holds no bytes to protect
        if any(real.is_relative_to(folder) for folder in folders):
            continue  # protected with the folder it is in
        add(real, f"the source file {safe_text(real)}")
        add(real.parent, f"{safe_text(real.parent)}, which holds the source file {safe_text(real.name)}")
    return list(found.values())


def _resolved(path: Path, flag: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a loop of links, a name too long
        problem = "is a loop of symbolic links" if isinstance(e, RuntimeError) else (e.strerror or str(e))
        raise DestinationError(f"{flag} {safe_text(path)}: {problem}; give another path") from None


def _top_level_files(folder: Path) -> list[Path]:
    """Files directly in a source folder (links followed), which is where a checkpoint's files are."""
    try:
        return sorted(entry for entry in folder.iterdir() if entry.is_file())
    except OSError:
        return []


def _non_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


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


def open_staging(out: Path, resume_key: str) -> tuple[Path, bool]:
    """Create or reuse the staging folder; returns it and whether a matching earlier run was found."""
    staging = staging_folder(out)
    marker = staging / RESUME_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        resumed = marker.is_file() and marker.read_text() == resume_key
        if staging.exists() and not resumed:
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        if not resumed:
            marker.write_text(resume_key)
    except OSError as e:
        raise OutputError(f"{safe_text(staging)}: cannot prepare the output: {e.strerror or e}") from None
    return staging, resumed


def completed_shard(path: Path, shard: ShardLayout) -> bool:
    """True when ``path`` is a finished shard of this layout: right size and identical header."""
    try:
        if path.stat().st_size != shard.nbytes:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except OSError:
        return False


def remove_strays(staging: Path, keep: set[str]) -> None:
    """Delete files of an earlier run that this layout does not produce (other shard names)."""
    for entry in staging.iterdir():
        if entry.name not in keep and entry.name != RESUME_FILE:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_room(staging: Path, needed: int) -> None:
    available = free_bytes(staging)
    if needed > available:
        raise OutputError(
            f"{safe_text(staging.parent.resolve())}: needs {format_bytes(needed)} for the files still to write but "
            f"only {format_bytes(available)} is free; free some space or write elsewhere with --out"
        )


def fsync_file(path: Path) -> None:
    fileio.sync_file(path)
