"""Whether something a run would write, replace or remove is part of a source: judged by identity,
never by how a path or URL is spelled. The one home of the rule "the source is never written to".

Local places are compared by their real paths (links and ``..`` resolved, Hugging Face cache
entries included) and by device and inode, which also sees a source reached through a bind mount
or a hard link: :func:`check_outside_sources` for an output folder or a file to write, and
:func:`check_tree_holds_no_source` for a folder about to be removed or replaced.

Objects are compared by store, bucket and key: an ``s3://`` URL and the HTTP URLs of the same
endpoint (path-style ``http://HOST/BUCKET/KEY`` and virtual-host ``http://BUCKET.HOST/KEY``, any
spelling of the host that resolves to the same address, dot segments and doubled slashes folded,
percent-escapes decoded) name the same object (:func:`object_place`). And since a store reached
some other way (a CDN, a proxy) cannot be recognized by its address, an object about to be removed
or overwritten whose size and ETag are those of a source file is taken to be that file
(:func:`check_objects_hold_no_source`). Reads metadata only.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shardsurgeon.errors import DestinationError, safe_text
from shardsurgeon.storage.versions import SourceVersion

_AWS_HOST = re.compile(r"^(?:(?P<bucket>.+)\.)?s3(?:[.-](?:dualstack\.)?[a-z0-9-]+)?\.amazonaws\.com(?:\.cn)?$")
"""The S3 hosts of AWS, path-style or with the bucket as the first labels (any region)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- local places -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Protected:
    """A real path a source is made of, and how a message names it."""

    path: Path
    name: str
    is_folder_of_source: bool = False

    def __str__(self) -> str:
        return self.name


def check_outside_sources(
    path: Path,
    sources: Iterable[Path],
    flag: str,
    what: str = "output folder",
    *,
    files: Iterable[Path] = (),
    beside: Sequence[Path] = (),
) -> None:
    """Refuse a ``path`` to write (an output folder, or some other ``what``) that is, holds or lies
    inside something a source is made of: the source folder, its Hugging Face cache entry, and every
    real file its top-level files (and ``files``) resolve to, with the folder holding it; by real
    path and by device and inode. ``beside`` are the names the run also writes, replaces or locks
    next to ``path`` (a local output's staging and lock siblings): none may be a source either."""
    real = _resolved(path, flag)
    shown = f"{flag} {safe_text(path)}"
    article = "an" if what[0] in "aeiou" else "a"
    protected = _protected(list(sources), files)
    for sibling in beside:
        real_sibling = _resolved(sibling, flag)
        for item in protected:
            if item.path == real_sibling or item.path.is_relative_to(real_sibling):
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
    same = _identity(real)
    for item in protected:
        if same is not None and same == _identity(item.path):
            raise DestinationError(
                f"{shown}: is {item} under another name (the same folder or file by device and inode: a bind mount "
                f"or a hard link); the source is never written to, choose another {what}"
            )


def check_tree_holds_no_source(
    tree: Path, sources: Iterable[Path], versions: Iterable[SourceVersion], flag: str
) -> None:
    """Refuse to remove or replace ``tree`` when anything in it is, by device and inode, a source
    file or folder (a hard link, a bind mount): removing it would take the source with it."""
    wanted: dict[tuple[int, int], str] = {}
    for folder in sources:
        if (found := _identity(folder)) is not None:
            wanted[found] = f"the source folder {safe_text(folder)}"
    for version in versions:
        if version.is_local and (found := _identity(Path(version.where))) is not None:
            wanted[found] = f"the source file {safe_text(version.where)}"
    if not wanted or not os.path.isdir(tree) or os.path.islink(tree):
        return
    for here, subfolders, names in os.walk(tree):
        for name in [*subfolders, *names]:
            entry = Path(here) / name
            found = _identity(entry, follow=False)
            if found in wanted:
                raise DestinationError(
                    f"{flag} {safe_text(tree)}: {safe_text(entry)} is {wanted[found]} (the same by device and inode: a "
                    "hard link or a bind mount), and the run would remove it; take it out of there first"
                )


def _identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    try:
        stat = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


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


# --- objects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectPlace:
    """A key (or a folder: a prefix ending in ``/``) in a bucket of the store writes go to."""

    bucket: str
    key: str


def object_place(url: str, endpoint: str | None) -> ObjectPlace | None:
    """Where ``url`` is in the store at ``endpoint`` (the client's endpoint URL; None or an AWS host:
    AWS, whose S3 hosts all reach one store), or None when it is elsewhere."""
    if url.startswith("s3://"):
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return ObjectPlace(bucket, _normal_key(key))
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host, port = parts.hostname.rstrip(".").lower(), parts.port or _DEFAULT_PORTS[parts.scheme]
    path = unquote(parts.path)
    store = urlsplit(endpoint or "https://s3.amazonaws.com")
    if _AWS_HOST.match((store.hostname or "").lower()):
        aws = _AWS_HOST.match(host)
        if aws is None:
            return None
        if aws["bucket"]:
            return ObjectPlace(aws["bucket"], _normal_key(path))
        bucket, _, key = path.lstrip("/").partition("/")
        return ObjectPlace(bucket, _normal_key(key))
    store_host = (store.hostname or "").rstrip(".").lower()
    store_port = store.port or _DEFAULT_PORTS.get(store.scheme, 0)
    if port != store_port:
        return None
    if _same_host(host, store_host):
        bucket, _, key = path.lstrip("/").partition("/")
        return ObjectPlace(bucket, _normal_key(key))
    label, _, rest = host.partition(".")
    if rest and _same_host(rest, store_host):
        return ObjectPlace(label, _normal_key(path))
    return None


def _normal_key(key: str) -> str:
    """A key as a server reaches it: dot segments removed, doubled slashes folded, no leading slash."""
    folder = key.endswith("/")
    normal = posixpath.normpath("/" + key).lstrip("/")
    normal = re.sub("/+", "/", normal)
    return "" if normal in ("", ".") else normal + ("/" if folder else "")


@functools.lru_cache(maxsize=64)
def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except (OSError, UnicodeError):
        return frozenset()


def _same_host(a: str, b: str) -> bool:
    """Whether two host names reach the same machine: the same name, or a shared address."""
    if a == b:
        return True
    return bool(_addresses(a) & _addresses(b))


def check_folder_outside_sources(
    bucket: str, key: str, shown: str, sources: Iterable[str], endpoint: str | None
) -> None:
    """Refuse an S3 output folder (``key`` ends with ``/``, or is the bucket's root ``""``) that is,
    holds or lies inside a source folder by URL in the same store, however the URL spells it."""
    for source in sources:
        place = object_place(source.rstrip("/") + "/", endpoint)
        if place is None or place.bucket != bucket:
            continue
        other = place.key
        name = safe_text(source)
        if other == key:
            raise DestinationError(
                f"--out {shown}: is the source folder; the source is never written to, choose another (the source is "
                f"given as {name})"
            )
        if key.startswith(other):
            raise DestinationError(
                f"--out {shown}: is inside the source folder {name}; the source is never written to, choose an "
                "output folder outside it"
            )
        if other.startswith(key):
            raise DestinationError(f"--out {shown}: contains the source folder {name}; choose another")


def check_objects_hold_no_source(
    objects: Iterable[tuple[str, int, str]], versions: Iterable[SourceVersion], shown: str
) -> None:
    """Refuse when an object about to be removed or overwritten (name, size, ETag) is, by its size and
    ETag, a source file read by URL: the same object reached under another name (a CDN, a proxy)."""
    by_content = {
        (v.nbytes, _bare(v.validator)): v.where for v in versions if not v.is_local and v.validator is not None
    }
    for name, nbytes, etag in objects:
        source = by_content.get((nbytes, _bare(etag)))
        if source is not None:
            raise DestinationError(
                f"--out {shown}: {safe_text(name)} there has the size and ETag of the source file {safe_text(source)}: "
                "it is that file under another URL, and the run would remove or overwrite it; choose another output"
            )


def _bare(etag: str | None) -> str:
    return (etag or "").removeprefix("W/").strip('"')
