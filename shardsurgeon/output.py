"""The output folder's life: safety checks, the staging folder, resume, and the atomic commit.

Everything is written under a hidden sibling ``.NAME.shardsurgeon-partial`` and renamed to NAME
only when complete and fsynced, so NAME never holds a partial result. A staging folder left by an
interrupted run is reused when its resume key (plan fingerprint and source file identities)
matches; its completed shards are then checked against the layout before they are kept.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from shardsurgeon import fileio
from shardsurgeon.errors import DestinationError, OutputError
from shardsurgeon.layout import ShardLayout
from shardsurgeon.units import format_bytes

RESUME_FILE = ".shardsurgeon-resume"
PARTIAL_SUFFIX = ".partial"


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.shardsurgeon-partial"


def check_destination(out: Path, sources: Iterable[Path], force: bool) -> None:
    """Refuse an output that is, holds or lies inside a source (or the Hugging Face cache entry it
    comes from), that cannot be renamed into place, or that is non-empty without ``force``."""
    check_outside_sources(out, sources, "--out")
    real_out = out.resolve()
    if out.is_symlink():
        raise DestinationError(f"--out {out}: is a symbolic link; give the folder it points to, {real_out}")
    if out.exists() and not out.is_dir():
        raise DestinationError(f"--out {out}: exists and is a file; choose a folder name")
    if out.is_dir() and os.path.ismount(out):
        raise DestinationError(
            f"--out {out}: is a mount point, which cannot be replaced by renaming; write to a folder inside it"
        )
    if Path.cwd().resolve().is_relative_to(real_out) and out.is_dir():
        raise DestinationError(f"--out {out}: holds the current folder; run from elsewhere or choose another output")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DestinationError(f"--out {out}: folder exists and is not empty; pass --force to replace it")


def check_outside_sources(path: Path, sources: Iterable[Path], flag: str, what: str = "output folder") -> None:
    """Refuse a ``path`` to write (an output folder, or some other ``what``) that is, holds or lies
    inside a source or its Hugging Face cache entry."""
    real = path.resolve()
    article = "an" if what[0] in "aeiou" else "a"
    for source in sources:
        for protected in _protected(source):
            if real == protected:
                raise DestinationError(
                    f"{flag} {path}: is the source folder; the source is never written to, choose another {what}"
                )
            if real.is_relative_to(protected):
                raise DestinationError(
                    f"{flag} {path}: is inside the source {protected}; the source is never written to, "
                    f"choose {article} {what} outside it"
                )
            if protected.is_relative_to(real):
                raise DestinationError(f"{flag} {path}: contains the source {source}; choose another {what}")


def _protected(source: Path) -> list[Path]:
    """The source folder, and the Hugging Face cache entry (``models--org--name``) holding it."""
    real = source.resolve()
    entries = [parent for parent in real.parents if parent.name.startswith("models--")]
    return [real, *entries[:1]]


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
        raise OutputError(f"{staging}: cannot prepare the output: {e.strerror or e}") from None
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
            f"{staging.parent.resolve()}: needs {format_bytes(needed)} for the files still to write but only "
            f"{format_bytes(available)} is free; free some space or write elsewhere with --out"
        )


def commit(staging: Path, out: Path) -> None:
    """Fsync the staging folder and move it to ``out``, replacing an empty or forced ``out``."""
    old = out.parent / f".{out.name}.shardsurgeon-old"
    try:
        (staging / RESUME_FILE).unlink(missing_ok=True)
        _fsync_dir(staging)
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(out, old)
        os.rename(staging, out)
        _fsync_dir(out.parent)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        raise OutputError(f"{out}: cannot move the finished output into place: {e.strerror or e}") from None


def fsync_file(path: Path) -> None:
    fileio.sync_file(path)


def _fsync_dir(folder: Path) -> None:
    fileio.sync_dir(folder)
