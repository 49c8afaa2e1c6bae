"""Whether something a run would write, replace or remove is part of a source: judged by identity,
never by how a path or URL is spelled. The one home of the rule "the source is never written to".

Local places are compared by their real paths (links and ``..`` resolved, Hugging Face cache
entries included) and by device and inode, which also sees a source reached through a bind mount
or a hard link: :func:`check_outside_sources` for an output folder or a file to write, and
:meth:`SourceIdentities.check_removable` for anything about to be removed or replaced.

Objects are compared by store, bucket and key: an ``s3://`` URL and the HTTP URLs of the same
endpoint (path-style ``http://HOST/BUCKET/KEY`` and virtual-host ``http://BUCKET.HOST/KEY``, any
spelling of the host that resolves to the same address, dot segments and doubled slashes folded,
percent-escapes decoded) name the same object (:func:`object_place`). And since a store reached
some other way (a CDN, a proxy) cannot be recognized by its address, an object about to be removed
or overwritten whose size and ETag are those of a source file is taken to be that file
(:func:`source_among`). Reads metadata only.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import posixpath
import re
import socket
from collections.abc import Callable, Iterable, Sequence
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
    lone_files: Iterable[Path] = (),
    beside: Sequence[Path] = (),
) -> None:
    """Refuse a ``path`` to write (an output folder, or some other ``what``) that is, holds or lies
    inside something a source is made of: the source folder, its Hugging Face cache entry, and every
    real file its top-level files (and ``files``) resolve to, with the folder holding it; and each
    of ``lone_files`` (a source file of no folder, such as a file of routers) by itself, its folder
    free to hold an output; by real path and by device and inode. ``beside`` are the names the run
    also writes, replaces or locks next to ``path`` (a local output's staging and lock siblings):
    none may be a source either."""
    real = _resolved(path, flag)
    shown = f"{flag} {safe_text(path)}"
    article = "an" if what[0] in "aeiou" else "a"
    protected = _protected(list(sources), files, lone_files)
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
    identities = {found: item for item in protected if (found := _identity(item.path)) is not None}
    for sibling in beside:
        real_sibling = _resolved(sibling, flag)
        for item in protected:
            inside = real_sibling.is_relative_to(item.path)
            if item.path == real_sibling or item.path.is_relative_to(real_sibling) or inside:
                where = "leads into" if inside and item.path != real_sibling else "is"
                raise DestinationError(
                    f"{shown}: {safe_text(sibling.name)}, which this output uses for its work and may remove, "
                    f"{where} {item}; move the source, or choose another output name"
                )
        same = _identity(sibling) if os.path.lexists(sibling) else None
        if same is not None and same in identities:
            raise DestinationError(
                f"{shown}: {safe_text(sibling.name)}, which this output uses for its work and may remove, is "
                f"{identities[same]} under another name (a bind mount or a hard link); move the source, or choose "
                "another output name"
            )


class SourceIdentities:
    """The source folders and files by device and inode: what no removal may take with it."""

    def __init__(self, folders: Iterable[Path], versions: Iterable[SourceVersion]):
        self._wanted: dict[tuple[int, int], str] = {}
        for folder in folders:
            if (found := _identity(folder)) is not None:
                self._wanted[found] = f"the source folder {safe_text(folder)}"
        for version in versions:
            if version.is_local and (found := _identity(Path(version.where))) is not None:
                self._wanted[found] = f"the source file {safe_text(version.where)}"

    def check_removable(self, path: Path, flag: str) -> None:
        """Refuse to remove or replace ``path`` when it, or anything in it, is by device and inode a
        source file or folder (a hard link, a bind mount): removing it would take the source along."""
        if not self._wanted or not os.path.lexists(path):
            return
        entries = [path]
        if os.path.isdir(path) and not os.path.islink(path):
            entries += [Path(here) / name for here, folders, names in os.walk(path) for name in [*folders, *names]]
        for entry in entries:
            found = _identity(entry, follow=False)
            if found in self._wanted:
                raise DestinationError(
                    f"{flag} {safe_text(path)}: {safe_text(entry)} is {self._wanted[found]} (the same by device and "
                    "inode: a hard link or a bind mount), and the run would remove it; take it out of there first"
                )


def _identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    try:
        stat = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _protected(sources: list[Path], files: Iterable[Path], lone_files: Iterable[Path] = ()) -> list[_Protected]:
    """The source folders, the Hugging Face cache entries (``models--org--name``) holding them, the
    real file behind each source file, with its folder, where that is somewhere else, and the real
    file behind each lone file, without its folder."""
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
    for file in lone_files:
        try:
            add(file.resolve(), f"the source file {safe_text(file.resolve())}")
        except (RuntimeError, OSError):
            continue
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
    """The addresses ``host`` resolves to, each as one spelling: an IPv4 address mapped into IPv6 as
    the IPv4 address, and every address of this machine (loopback, unspecified such as 0.0.0.0, an
    interface's) as ``this host``."""
    try:
        found = {str(info[4][0]).partition("%")[0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except (OSError, UnicodeError, ValueError):
        return frozenset()
    return frozenset(_canonical(address) for address in found)


def _canonical(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified or str(ip) in _local_addresses():
        return "this host"
    return str(ip)


@functools.lru_cache(maxsize=1)
def _local_addresses() -> frozenset[str]:
    """The addresses of this machine's interfaces, as its host name resolves them."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except (OSError, UnicodeError):
        return frozenset()


def _same_host(a: str, b: str) -> bool:
    """Whether two host names reach the same machine: the same name, or a shared address (all the
    addresses of this machine count as one: a server on one port of it is the same server)."""
    if a.strip("[]") == b.strip("[]"):
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


def source_among(
    objects: Iterable[tuple[str, int, str]],
    versions: Iterable[SourceVersion],
    header_digest: Callable[[str], str | None],
) -> tuple[str, SourceVersion] | None:
    """The first of ``objects`` (name, size, ETag) that holds a source file's bytes, with that
    source's version: the same size, and the same ETag or the same header (read by
    ``header_digest``, which pins every offset). Such an object is that file reached by another
    name (the store's filer or another address, a CDN, a FUSE mount of the bucket read as a local
    folder), or a copy of it; either way not the run's to remove or to write beside. Only objects of
    a source file's size are read."""
    by_size: dict[int, list[SourceVersion]] = {}
    for version in versions:
        by_size.setdefault(version.nbytes, []).append(version)
    for name, nbytes, etag in objects:
        candidates = by_size.get(nbytes, [])
        if not candidates:
            continue
        same = next((v for v in candidates if v.validator and _bare(v.validator) == _bare(etag)), None)
        if same is None:
            digest = header_digest(name)
            same = next((v for v in candidates if v.header_sha256 == digest), None)
        if same is not None:
            return name, same
    return None


def _bare(etag: str | None) -> str:
    return (etag or "").removeprefix("W/").strip('"')
