"""Checkpoint files behind a URL: ``s3://bucket/prefix`` or ``https://host/folder/``, read by range.

Owns the client that reads from object stores and web servers (obstore, an optional extra
imported only when a URL is opened; writing to S3 is :mod:`s3output`'s, with boto3) and turns its
errors into one-line CheckpointErrors. Reads only: a small file whole, a byte range of a large
one, or a file streamed through a digest, each counted in ``fetched_nbytes``. Never writes.

S3 endpoints and credentials come from where the AWS tools read them: the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ...) and, with
boto3 installed (the ``remote`` extra has it), ``AWS_PROFILE`` and the ``~/.aws`` files, resolved by
:func:`s3.obstore_config`; never from a command line.

Redirects (the Hub's ``resolve/`` URLs answer 302 to a CDN) are followed; a server that answers a
range request with the whole file (200 instead of 206) is refused, so a 70B shard is never
downloaded by accident. Requests that fail for a dropped connection or a 5xx are
retried with exponential backoff a bounded number of times.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, FormatError, ShardSurgeonError, safe_text
from shardsurgeon.format import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, Header, decode_header
from shardsurgeon.names import CHUNK_BYTES
from shardsurgeon.storage import fileio
from shardsurgeon.units import format_bytes

URL_SCHEMES = ("s3://", "http://", "https://")
EXTRA_HINT = "reading models by URL needs the remote extra: pip install 'shardsurgeon[remote]'"
MAX_RETRIES = 4
"""Retries of one request after a dropped connection, a timeout or a 5xx, with backoff 0.1 s to 2 s."""
RETRY_TIMEOUT = timedelta(seconds=30)
STREAM_CHUNK_BYTES = CHUNK_BYTES
"""What a whole file read without keeping it (:meth:`RemoteFolder.sha256`) holds in memory at once."""
_NOT_FOUND = FileNotFoundError
"""What obstore raises for a missing object (its NotFoundError surfaces as Python's FileNotFoundError)."""


def is_url(value: object) -> bool:
    """Whether ``value`` names a remote folder (``s3://``, ``http://``, ``https://``, in any case, as
    schemes are) rather than a path."""
    return isinstance(value, str) and value[:8].lower().startswith(URL_SCHEMES)


def normal_url(value: str) -> str:
    """``value`` with the scheme of a URL in lower case (``S3://b/k`` is ``s3://b/k``); a path as it is."""
    if not is_url(value):
        return value
    scheme, _, rest = value.partition("://")
    return f"{scheme.lower()}://{rest}"


def file_name(where: Path | str) -> str:
    """The last part of a path or URL: a shard's file name."""
    return where.name if isinstance(where, Path) else where.rstrip("/").rpartition("/")[2]


def join_name(folder: Path | str, name: str) -> Path | str:
    """The file ``name`` in a local folder or under a folder URL."""
    return folder / name if isinstance(folder, Path) else folder_url(folder) + name


def folder_url(url: str) -> str:
    """``url`` as a folder: one trailing slash."""
    return url.rstrip("/") + "/"


def obstore_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("obstore") is not None


@dataclass(frozen=True, slots=True)
class RemoteHeader:
    """A shard's header read by URL: validated, the SHA-256 of its bytes, and the file's version
    (its ETag, else its Last-Modified time; None when the server gives neither) with its
    Last-Modified time when the server gives one."""

    header: Header
    sha256: str
    etag: str | None
    modified: str | None = None


def check_url(url: str) -> None:
    """Refuse, in one line, a URL no client could use (no host or bucket, a bad port or address)
    before any client sees it: a client may fail on such a URL in ways that are not errors."""
    from urllib.parse import urlsplit

    from shardsurgeon.storage.s3 import BUCKET_NAME

    shown = safe_text(url)
    if url.startswith("s3://"):
        bucket = url.removeprefix("s3://").partition("/")[0]
        if not BUCKET_NAME.fullmatch(bucket):
            raise CheckpointError(f"{shown}: {safe_text(bucket, 80)!r} is not a bucket name; write s3://BUCKET/FOLDER")
        return
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # the port is checked when read
        (host or "").encode("idna")
    except (ValueError, UnicodeError) as e:
        problem = safe_text(e, 80)
        raise CheckpointError(f"{shown}: not a usable URL ({problem}); write it as https://HOST/FOLDER/") from None
    if not host or any(c.isspace() or c in "\\<>^`{|}" for c in host):
        raise CheckpointError(f"{shown}: no usable host in the URL; write it as https://HOST/FOLDER/")


class RemoteFolder:
    """The files under one folder URL; counts the bytes fetched. Holds a client, no open files."""

    def __init__(self, url: str):
        try:
            import obstore  # noqa: F401  (optional extra: imported only when a URL is opened)
        except ImportError:
            raise CheckpointError(f"{safe_text(url)}: {EXTRA_HINT}") from None
        url = normal_url(url)
        check_url(url)
        self.url = folder_url(url)
        self.fetched_nbytes = 0
        self._counting = threading.Lock()  # the S3 writer reads from several threads
        self._store = _store_for(self.url)

    def where(self, name: str) -> str:
        return self.url + name

    def read_small(
        self, name: str, limit: int, what: str, error: type[ShardSurgeonError] = CheckpointError
    ) -> bytes | None:
        """The whole file ``name`` (at most ``limit`` bytes, else ``error``), or None when there is no
        such file."""
        import obstore

        try:
            result = obstore.get(self._store, name)
            size = int(result.meta["size"])
            if size > limit:
                raise error(
                    f"{safe_text(self.where(name))}: is {format_bytes(size)}, larger than {format_bytes(limit)}, "
                    f"too large for {what}; is it the right file?"
                )
            data = bytes(result.bytes())
        except _NOT_FOUND:
            self._check_folder(name)
            return None
        except (obstore.exceptions.BaseError, OSError) as e:
            raise self._error(name, e) from None
        self._count(len(data))
        return data

    def _count(self, nbytes: int) -> None:
        with self._counting:
            self.fetched_nbytes += nbytes

    def file_names(self, otherwise: tuple[str, ...]) -> list[str]:
        """The file names directly under an S3 prefix; for a web server, which cannot list, ``otherwise``."""
        if not self.url.startswith("s3://"):
            return list(otherwise)
        import obstore

        try:
            listed = obstore.list_with_delimiter(self._store, None)
        except (obstore.exceptions.BaseError, OSError) as e:
            raise self._error("", e, "the listing") from None
        return sorted(str(entry["path"]).rpartition("/")[2] for entry in listed["objects"])

    def read_header(self, name: str, missing: str) -> RemoteHeader:
        """The validated safetensors header of ``name``, the SHA-256 of its bytes (length field
        included) and the file's ETag: the length, then the header, by two range reads.
        ``missing`` ends the message when there is no such file."""
        found = self.find_header(name)
        if found is None:
            raise self._not_found(name, missing)
        return found

    def find_header(self, name: str) -> RemoteHeader | None:
        """What :meth:`read_header` gives, or None when there is no such file."""
        where = self.where(name)
        first = self._get(name, 0, HEADER_LENGTH_BYTES, want_size=True)
        if first is None:
            return None
        prefix, file_nbytes, (etag, modified) = first
        (header_nbytes,) = struct.unpack("<Q", prefix)
        if header_nbytes > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_nbytes > file_nbytes:
            raise FormatError(
                f"{safe_text(where)}: header length field says {header_nbytes} bytes, the file holds "
                f"{file_nbytes} (at most {MAX_HEADER_BYTES} allowed); the file is truncated or not safetensors"
            )
        raw = self.read_range(name, HEADER_LENGTH_BYTES, HEADER_LENGTH_BYTES + header_nbytes)
        header = decode_header(raw, file_nbytes, safe_text(where))
        return RemoteHeader(header, hashlib.sha256(prefix + raw).hexdigest(), etag, modified)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of ``name``."""
        got = self._get(name, start, end, want_size=False)
        if got is None:
            raise self._not_found(name, "")
        return got[0]

    def read_range_into(self, name: str, start: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``name`` from ``start``, exactly: the client's own buffer
        is copied into it, with no Python bytes object in between."""
        import obstore

        try:
            data = memoryview(obstore.get_range(self._store, name, start=start, length=len(view)))
        except _NOT_FOUND:
            self._check_folder(name)
            raise self._not_found(name, "") from None
        except (obstore.exceptions.BaseError, OSError) as e:
            raise self._error(name, e, f"bytes {start}-{start + len(view) - 1}") from None
        self._count(len(data))
        if len(data) != len(view):
            raise CheckpointError(
                f"{safe_text(self.where(name))}: asked for bytes {start}-{start + len(view) - 1}, received "
                f"{len(data)} bytes; the file is shorter than its header says, or the server does not honour Range "
                "requests"
            )
        view[:] = data

    def sha256(self, name: str) -> str | None:
        """The SHA-256 of the file ``name``, streamed in chunks, or None when there is no such file."""
        import obstore

        digest = hashlib.sha256()
        try:
            for chunk in obstore.get(self._store, name).stream(min_chunk_size=STREAM_CHUNK_BYTES):
                digest.update(chunk)
                self.fetched_nbytes += len(chunk)
        except _NOT_FOUND:
            self._check_folder(name)
            return None
        except (obstore.exceptions.BaseError, OSError) as e:
            raise self._error(name, e) from None
        return digest.hexdigest()

    def _not_found(self, name: str, missing: str) -> CheckpointError:
        return CheckpointError(
            f"{safe_text(self.where(name))}: not found (404){', ' + missing if missing else ''}; the server "
            "does not have this shard: check the URL and that the upload is complete"
        )

    def _get(
        self, name: str, start: int, end: int, want_size: bool
    ) -> tuple[bytes, int, tuple[str | None, str | None]] | None:
        """Bytes ``start`` to ``end`` of ``name`` and, with ``want_size``, the file's size and its
        versions (see :func:`_versions`; else -1 and Nones); None when there is no such file."""
        import obstore

        try:
            if want_size:
                result = obstore.get(self._store, name, options={"range": (start, end)})
                size, etag = int(result.meta["size"]), _versions(result.meta)
                data = bytes(result.bytes())
            else:
                data, size, etag = bytes(obstore.get_range(self._store, name, start=start, end=end)), -1, (None, None)
        except _NOT_FOUND:
            self._check_folder(name)
            return None
        except (obstore.exceptions.BaseError, OSError) as e:
            raise self._error(name, e, f"bytes {start}-{end - 1}") from None
        self._count(len(data))
        if len(data) != end - start:
            raise CheckpointError(
                f"{safe_text(self.where(name))}: asked for bytes {start}-{end - 1}, received {len(data)} bytes; "
                "the file is shorter than its header says, or the server does not honour Range requests"
            )
        return data, size, etag

    def _check_folder(self, name: str) -> None:
        """For S3, after a file was not found: raise the clearer error when the bucket itself cannot
        be listed (S3 answers NoSuchBucket with the same 404 as a missing file)."""
        if not self.url.startswith("s3://"):
            return
        import obstore

        try:
            obstore.list_with_delimiter(self._store, None)
        except (obstore.exceptions.BaseError, OSError):
            bucket = self.url.removeprefix("s3://").partition("/")[0]
            from shardsurgeon.storage.s3 import endpoint_from_environment

            endpoint = endpoint_from_environment() or "AWS"
            raise CheckpointError(
                f"{safe_text(self.url)}: bucket {safe_text(bucket)!r} not found at {safe_text(endpoint)} "
                f"({safe_text(name)} is not there and the bucket cannot be listed); check the bucket name and "
                "AWS_ENDPOINT_URL"
            ) from None

    def _error(self, name: str, error: Exception, what: str = "") -> CheckpointError:
        import obstore

        where = safe_text(self.where(name))
        if isinstance(
            error, PermissionError | obstore.exceptions.PermissionDeniedError | obstore.exceptions.UnauthenticatedError
        ) and not self.url.startswith("s3://"):
            return CheckpointError(
                f"{where}: access denied (401/403); a gated or private model on the Hugging Face Hub needs a token: "
                "set HF_TOKEN (or run hf auth login), and accept the model's terms on its page"
            )
        if isinstance(
            error, PermissionError | obstore.exceptions.PermissionDeniedError | obstore.exceptions.UnauthenticatedError
        ):
            return CheckpointError(
                f"{where}: access denied; check the credentials in the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and the bucket's policy"
            )
        if isinstance(error, obstore.exceptions.NotSupportedError):
            return CheckpointError(
                f"{where}: the server ignores Range requests (it answered {what} with the whole file, 200 instead of "
                "206 Partial Content), so reading only the headers is impossible; serve the model from a server "
                "that supports ranges (S3, the Hugging Face Hub, nginx)"
            )
        reading = f"reading {what}" if what else "reading"
        detail = safe_text(" ".join(str(error).split()), 300)
        return CheckpointError(
            f"{where}: {reading} failed: {detail}; dropped connections, timeouts and 5xx answers were retried "
            f"{MAX_RETRIES} times with backoff"
        )


def _store_for(url: str) -> Any:
    from obstore.store import HTTPStore, S3Store

    retry: Any = {
        "max_retries": MAX_RETRIES,
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
        "retry_timeout": RETRY_TIMEOUT,
    }
    options: Any = {"connect_timeout": "10s", "timeout": "60s"}
    if url.startswith("s3://"):
        from shardsurgeon.storage.s3 import endpoint_from_environment, obstore_config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        config: Any
        config, credentials = obstore_config()  # with boto3 installed: profiles and config files too
        config = dict(config)  # the resolution is shared: this store's changes stay its own
        endpoint = endpoint_from_environment() or config.get("endpoint")
        if endpoint:
            config["endpoint"] = endpoint
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        return S3Store(
            bucket, prefix=prefix.rstrip("/") or None, config=config, client_options=options, retry_config=retry,
            credential_provider=credentials,
        )  # fmt: skip
    if url.startswith("http://"):
        options["allow_http"] = True
    if token := hub_token(url):  # the client drops it on a redirect to another host (the Hub's CDN)
        options["default_headers"] = {"Authorization": f"Bearer {token}"}
    return HTTPStore.from_url(url.rstrip("/"), client_options=options, retry_config=retry)


def _versions(meta: Any) -> tuple[str | None, str | None]:
    """What tells one version of a file from another: its ETag, else its Last-Modified time; and
    the Last-Modified time itself, where the server gives one (a store whose ETag stays when the
    object is changed some other way, through its filer or a FUSE mount, still moves that)."""
    last = meta.get("last_modified")  # obstore says 1970 when the server gave none
    modified = last.isoformat() if last is not None and last.timestamp() > 0 else None
    if meta.get("e_tag"):
        return str(meta["e_tag"]), modified
    return (f"last-modified {modified}" if modified else None), modified


def is_hub_url(url: str) -> bool:
    """Whether ``url`` is on the Hugging Face Hub: the host of ``HF_ENDPOINT``, else huggingface.co."""
    from urllib.parse import urlsplit

    hub = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        return (urlsplit(url).scheme, urlsplit(url).netloc) == (hub.scheme, hub.netloc)
    except ValueError:
        return False


def hub_token(url: str) -> str | None:
    """The Hugging Face token for a URL on the Hub (the host of ``HF_ENDPOINT``, else
    huggingface.co), as the Hub's own tools find it: ``HF_TOKEN``, else the file ``hf auth login``
    writes (``HF_TOKEN_PATH``, else ``HF_HOME/token``). None for any other host: a token is never
    sent to a server it was not made for."""
    if not is_hub_url(url):
        return None
    if token := os.environ.get("HF_TOKEN", "").strip():
        return token
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or home / "token")
    try:
        return path.read_text(encoding="utf-8").strip()[:1000] or None
    except (OSError, UnicodeDecodeError):
        return None


def local_path(where: Path | str) -> Path:
    """``where`` as a local path; a URL, whose tensor bytes this version cannot read yet, is refused."""
    if isinstance(where, Path):
        return where
    raise CheckpointError(
        f"{safe_text(where)}: writing a checkpoint from a model read by URL is not supported yet; plan it with "
        "--dry-run or --plan-json, or download the model and pass its folder"
    )


class RemoteFiles:
    """Files by URL for the code that reads tensor bytes (the executor, verify): one client per
    folder, kept for the run; every read a ranged GET of at most the caller's chunk."""

    def __init__(self) -> None:
        self._folders: dict[str, RemoteFolder] = {}
        self._opening = threading.Lock()

    def read(self, url: str, start: int, nbytes: int) -> bytes:
        """Bytes ``start`` to ``start + nbytes`` of the file at ``url``, exactly (else CheckpointError)."""
        folder, name = self._folder_of(url)
        return folder.read_range(name, start, start + nbytes) if nbytes else b""

    def read_into(self, url: str, start: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of the file at ``url`` from ``start``, exactly."""
        folder, name = self._folder_of(url)
        if len(view):
            folder.read_range_into(name, start, view)

    def _folder_of(self, url: str) -> tuple[RemoteFolder, str]:
        """The client of the folder holding ``url`` (made once, by whichever thread asks first) and the file's name."""
        folder, _, name = url.rpartition("/")
        with self._opening:
            if folder not in self._folders:
                self._folders[folder] = RemoteFolder(folder)
            return self._folders[folder], name

    @property
    def fetched_nbytes(self) -> int:
        return sum(folder.fetched_nbytes for folder in self._folders.values())


class SourceFiles:
    """The files a run or a verify reads tensor bytes from: local ones as read-only descriptors,
    opened on first use and closed on exit; files by URL (a ``str`` path) through :attr:`remote`."""

    def __init__(self) -> None:
        self._fds: dict[Path | str, int] = {}
        self._opening = threading.Lock()
        self.remote = RemoteFiles()

    def fd(self, path: Path | str) -> int:
        with self._opening:  # the S3 writer reads from several threads: each file opened once
            if path not in self._fds:
                try:
                    self._fds[path] = fileio.open_read(local_path(path))
                except OSError as e:
                    raise CheckpointError(f"{safe_text(path)}: cannot open: {e.strerror}") from None
            return self._fds[path]

    def read(self, path: Path | str, offset: int, nbytes: int) -> bytes:
        """``nbytes`` of the file at ``path`` from ``offset``; short only past a local file's end."""
        if isinstance(path, str):
            return self.remote.read(path, offset, nbytes)
        return fileio.read_bytes_at(self.fd(path), nbytes, offset)

    def read_into(self, path: Path | str, offset: int, view: memoryview) -> int:
        """Fill ``view`` from the file at ``path`` at ``offset`` (a local file straight into it, with
        no buffer of its own); returns the bytes read, fewer only past a local file's end."""
        if isinstance(path, str):
            self.remote.read_into(path, offset, view)
            return len(view)
        return fileio.read_at(self.fd(path), view, offset)

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
