"""What identifies the bytes of one source file: recorded when its header is read, checked again
before anything made from it is kept or published. One record for every source, local or by URL,
and the one place that says whether a source is still the one a plan saw.

A local file is its device and inode, its size, its modification and change times, and the digest
of its header. No tool can set a change time back: a shard rewritten in place with its old mtime
put back (``cp -p``, ``rsync -a``, ``touch -r``) is another version. Device numbers belong to one
host; on a shared filesystem every machine sees the same inode and change time, so the device is
compared only on the host that recorded it.

A file by URL is its size, header digest and the validator its server gives: the ETag, else the
Last-Modified time. An ETag proves the bytes only where the server is known to make it from them:
an S3 store, read as ``s3://`` (an MD5, an MD5 of the parts' MD5s, or with KMS a new one on every
write), and the Hugging Face Hub (a SHA-256 of the content). Web servers make theirs from the
file's time and size (nginx and Apache in hex, FastAPI as an MD5 of them: it looks like a digest
and is none), and a weak ETag (``W/"..."``) or a Last-Modified time changes only when the server
sees a change: a file rewritten with its times put back keeps it. Such a version is recorded and
compared like any other, but :attr:`SourceVersion.proves_bytes` is False: what is kept from it is
checked against its bytes instead (``write.proof``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, safe_text

_HUB_ETAG = re.compile(r'"?(?:[0-9a-f]{40}|[0-9a-f]{64})"?')
"""The Hub's ETags: the SHA-256 of a large file's content, the git SHA-1 of a small one."""
MAX_VALIDATOR_CHARS = 512


@dataclass(frozen=True, slots=True)
class SourceVersion:
    """One source file as a plan saw it. ``where`` is its path (as opened) or its URL."""

    where: str
    nbytes: int
    header_sha256: str
    device: int = 0
    inode: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    host: str = ""
    """The host whose device numbers ``device`` is in (local files)."""
    validator: str | None = None
    """By URL: the ETag, else ``last-modified ...``; None when the server gave neither."""
    modified: str | None = None
    """By URL: the Last-Modified time too, where the server gives one."""
    racy: bool = False
    """A local file changed so shortly before it was recorded (within :data:`RACY_NS`) that a change
    in the same tick of a coarse clock (whole seconds on some filesystems) would leave its times as
    they are: recorded, but no proof of the bytes (as git's "racily clean" entries)."""

    @property
    def is_local(self) -> bool:
        return not self.where.startswith(("s3://", "http://", "https://"))

    @property
    def name(self) -> str:
        return self.where.rstrip("/").replace("\\", "/").rpartition("/")[2]

    @property
    def proves_bytes(self) -> bool:
        """Whether an unchanged version proves the bytes unchanged (see the module's docstring)."""
        return self.weakness is None

    @property
    def weakness(self) -> str | None:
        """Why this version does not prove the bytes, in words; None when it does."""
        if self.racy:
            return "it was changed less than 2 s before it was read, too recently for its times to tell a later change"
        if self.is_local:
            return None
        if self.validator is None:
            return "its server gives neither an ETag nor a Last-Modified time"
        if self.validator.startswith("last-modified "):
            return "its server gives only a Last-Modified time"
        if self.validator.startswith("W/"):
            return f"its ETag {safe_text(self.validator, 60)} is weak (W/)"
        if self.where.startswith("s3://"):
            return None
        from shardsurgeon.storage.remote import is_hub_url

        if is_hub_url(self.where) and _HUB_ETAG.fullmatch(self.validator):
            return None
        return (
            f"its ETag {safe_text(self.validator, 60)} is not known to be a digest of the content (web servers "
            "make theirs from the file's time and size)"
        )

    def key(self) -> str:
        """What a job key takes of this version: the same on every machine that sees the file."""
        fields = (self.name, self.nbytes, self.header_sha256, self.inode, self.mtime_ns, self.ctime_ns, self.validator)
        return repr(fields + ((self.modified,) if self.modified is not None else ()))

    def same_as(self, now: SourceVersion) -> bool:
        """Whether ``now`` is this version again: the device is compared on the recording host only."""
        same_device = self.device == now.device or self.host != now.host
        return same_device and self.key() == now.key()

    def as_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Any, shown: str) -> SourceVersion:
        """A version as a plan file records it; ValueError(field, problem) for a field that is wrong."""
        if not isinstance(record, dict):
            raise ValueError(shown, f"expected an object, found {_kind(record)}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            value = record.get(field.name, _OPTIONAL.get(field.name, ...))
            if value is ...:
                raise ValueError(f"{shown}.{field.name}", "missing")
            if field.name in ("where", "header_sha256", "host") and not isinstance(value, str):
                raise ValueError(f"{shown}.{field.name}", f"expected text, found {_kind(value)}")
            if field.name in ("validator", "modified") and not (value is None or isinstance(value, str)):
                raise ValueError(f"{shown}.{field.name}", f"expected text or null, found {_kind(value)}")
            whole = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64
            if field.name == "racy" and not isinstance(value, bool):
                raise ValueError(f"{shown}.{field.name}", f"expected true or false, found {_kind(value)}")
            if field.type == "int" and not whole:
                raise ValueError(
                    f"{shown}.{field.name}", f"expected a whole number from 0 to 2**64, found {_kind(value)}"
                )
            if isinstance(value, str) and len(value) > MAX_VALIDATOR_CHARS * 8:
                raise ValueError(f"{shown}.{field.name}", "longer than 4096 characters")
            values[field.name] = value
        return cls(**values)


_OPTIONAL: dict[str, Any] = {"validator": None, "modified": None, "racy": False}
RACY_NS = 2_000_000_000
"""A local file whose change time is this close to the moment it was recorded is racy (see
:attr:`SourceVersion.racy`): two seconds covers filesystems with whole-second times."""


def _kind(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return safe_text(repr(value), 40)
    return "null" if value is None else type(value).__name__


def local_version(path: Path, header_sha256: str) -> SourceVersion:
    """The version of the local file ``path`` now (links followed); CheckpointError when unreadable."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{safe_text(path)}: cannot read the source file: {e.strerror or e}") from None
    racy = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < RACY_NS
    return SourceVersion(
        str(path), stat.st_size, header_sha256, stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns,
        socket.gethostname(), racy=racy,
    )  # fmt: skip


def header_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_unchanged(
    versions: Iterable[SourceVersion], *, when: str = "during the run", before: str = "the output was not published"
) -> None:
    """Raise CheckpointError naming the first source that is no longer the version recorded: local
    files by a stat, files by URL by fetching their header again (a few kB each). ``when`` and
    ``before`` say since when, and what was not done because of it."""
    from shardsurgeon.storage.remote import RemoteFolder  # files by URL only: obstore loads then

    folders: dict[str, RemoteFolder] = {}
    for recorded in versions:
        if recorded.is_local:
            path = Path(recorded.where)
            try:
                now = local_version(path, recorded.header_sha256)
            except CheckpointError:
                raise CheckpointError(
                    f"{safe_text(path)}: source file removed {when}; {before}; put it back and run the same command "
                    "again"
                ) from None
        else:
            folder, _, name = recorded.where.rpartition("/")
            remote = folders.setdefault(folder, RemoteFolder(folder))
            found = remote.read_header(name, "")
            size = found.header.data_start + found.header.data_nbytes
            now = SourceVersion(recorded.where, size, found.sha256, validator=found.etag, modified=found.modified)
        if not recorded.same_as(now):
            change = describe_change(recorded, now)
            raise CheckpointError(
                f"{safe_text(recorded.where)}: source file changed {when} ({change}); {before}; run the same command "
                "again once the source no longer changes"
            )


def describe_change(before: SourceVersion, now: SourceVersion) -> str:
    if before.is_local and (now.device, now.inode) != (before.device, before.inode) and before.host == now.host:
        return "replaced by another file"
    if before.is_local and now.inode != before.inode:
        return "replaced by another file"
    if now.nbytes != before.nbytes:
        return f"{before.nbytes} bytes, now {now.nbytes}"
    if now.header_sha256 != before.header_sha256:
        return "another header"
    if not before.is_local:
        return f"its version was {safe_text(before.validator, 60)}, now {safe_text(now.validator, 60)}"
    if now.mtime_ns != before.mtime_ns:
        return "rewritten in place"
    return "changed in place with its modification time put back, or its permissions changed"


def weak_sources(versions: Iterable[SourceVersion]) -> dict[str, str]:
    """The sources whose version does not prove their bytes, each with why."""
    return {v.where: v.weakness for v in versions if v.weakness is not None}


def versions_by_place(versions: Iterable[SourceVersion]) -> Mapping[str, SourceVersion]:
    return {v.where: v for v in versions}
