"""The S3 client that writes: one boto3 client per run, configured the standard way, and its errors.

boto3 (in the ``remote`` extra, imported only when an ``s3://`` output is given) resolves endpoint,
region and credentials as every AWS tool does: the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...), then ``~/.aws/config`` and ``~/.aws/credentials``, then
the instance's role. Nothing of them is ever taken from a command line or written anywhere.
obstore, which reads, gets the same credentials and endpoint from here (:func:`obstore_config`).

Owns turning a botocore failure into one line that names the object: unknown bucket, access
denied, a lost connection (retried by botocore with backoff a bounded number of times first).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import DestinationError, OutputError, safe_text

EXTRA_HINT = "writing to S3 needs the remote extra: pip install 'shardsurgeon[remote]'"
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
"""S3's bucket names, with the capitals and underscores of old us-east-1 buckets."""
MAX_ATTEMPTS = 6
"""Attempts of one request (botocore's standard retry mode: exponential backoff with jitter)."""


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/key``: an object, or with a trailing ``/`` a folder (a key prefix)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``url`` split into bucket and key; a folder name that is empty, ``.`` or ``..`` is refused:
        S3-compatible stores disagree on what such keys mean (SeaweedFS stores ``a//b`` as ``a/b``)."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise DestinationError(f"{safe_text(url)}: no bucket in the URL; write s3://BUCKET/FOLDER")
        if not BUCKET_NAME.fullmatch(bucket):
            raise DestinationError(
                f"{safe_text(url)}: {safe_text(bucket, 80)!r} is not a bucket name (letters, digits, dots, "
                "hyphens; 3 to 63 of them on AWS today)"
            )
        if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")[: None if key.strip("/") else 0]):
            raise DestinationError(
                f"{safe_text(url)}: a folder name in the URL is empty, '.' or '..'; write s3://BUCKET/FOLDER/SUBFOLDER"
            )
        return cls(bucket, key)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def folder(self) -> S3Location:
        """This location as a folder: the key ends with one ``/`` (the bucket's root has none)."""
        return S3Location(self.bucket, self.key.rstrip("/") + "/" if self.key.strip("/") else "")

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, self.folder().key + name)


def endpoint_from_environment() -> str | None:
    """The endpoint the environment names for S3 (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``),
    as every AWS tool reads it; None when it names none (a profile may still: see :func:`client`)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def boto3_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("boto3") is not None


def client() -> Any:
    """A boto3 S3 client with bounded retries and timeouts; checksums only where a request needs
    them, which S3-compatible stores (MinIO, Ceph, R2, SeaweedFS) all accept. One per process and
    AWS configuration (a session and its client cost about 15 MB); boto3's clients are thread-safe."""
    return _resolved(_aws_environment())[1]


def obstore_config() -> tuple[dict[str, str], Any]:
    """What obstore needs to read from the same store as boto3 writes to: the endpoint (from the
    environment or a profile's ``endpoint_url``), the region, and a credential provider when boto3
    finds credentials (None: obstore's own search of the environment). Without boto3: nothing."""
    if not boto3_available():
        return {}, None
    session, s3_client = _resolved(_aws_environment())
    config: dict[str, str] = {}
    endpoint = s3_client.meta.endpoint_url
    if endpoint and "amazonaws.com" not in endpoint:
        config["endpoint"] = endpoint
    if session.region_name:
        config["region"] = session.region_name
    if session.get_credentials() is None:
        return config, None
    from obstore.auth.boto3 import Boto3CredentialProvider

    return config, Boto3CredentialProvider(session)


def _aws_environment() -> tuple[object, ...]:
    """What boto3 reads its configuration from, as a cache key: the AWS_* environment and the
    config and credentials files' times (keys rotated in a file make a new session)."""
    variables = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == "HOME"))
    files = (
        os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config",
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
    )
    stamps: list[int | None] = []
    for path in files:
        try:
            stamps.append(os.stat(os.path.expanduser(path)).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return (*variables, *stamps)


@functools.lru_cache(maxsize=2)
def _resolved(environment: tuple[object, ...]) -> tuple[Any, Any]:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise OutputError(EXTRA_HINT) from None
    config = Config(
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=10,
        read_timeout=300,  # a server-side copy of a large part answers only when done
        max_pool_connections=16,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    try:
        return session, session.client("s3", config=config)
    except ValueError as e:  # botocore's word for an endpoint URL it cannot use
        endpoint = endpoint_from_environment() or "the endpoint_url"
        raise DestinationError(
            f"AWS_ENDPOINT_URL {safe_text(endpoint)}: not a usable endpoint ({safe_text(e, 120)}); write it as "
            "http://HOST:PORT or https://HOST"
        ) from None


def error_code(error: Exception) -> str:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``PreconditionFailed``...), else ``""``."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def failed_condition(error: Exception) -> bool:
    """Whether a conditional request (If-Match, If-None-Match, x-amz-copy-source-if-match) was
    refused because the object is not as the condition says (412; 409 when two such writes race)."""
    return error_code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def describe(where: S3Location, doing: str, error: Exception) -> OutputError:
    """``error`` (from boto3) of ``doing`` at ``where`` as one line that says what to do."""
    code = error_code(error)
    place = safe_text(where.url)
    if code in ("NoSuchBucket",):
        return OutputError(
            f"{place}: bucket {safe_text(where.bucket)!r} not found (while {doing}); check the bucket name and "
            "AWS_ENDPOINT_URL, or create the bucket"
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return OutputError(
            f"{place}: access denied ({code}) while {doing}; check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and that the bucket exists and its policy allows writing"
        )
    from botocore.exceptions import ConnectionError as LostConnection
    from botocore.exceptions import NoCredentialsError, ParamValidationError

    if isinstance(error, NoCredentialsError):
        return OutputError(
            f"{place}: no AWS credentials found (while {doing}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE with ~/.aws/credentials"
        )
    if isinstance(error, ParamValidationError):
        first = safe_text(" ".join(str(error).split()), 160)
        return OutputError(f"{place}: {doing}: the request was not sent, boto3 refused it: {first}; check the URL")
    if isinstance(error, LostConnection):
        from urllib.parse import urlsplit

        url = urlsplit(str(getattr(error, "kwargs", {}).get("endpoint_url") or ""))
        endpoint = safe_text(f"{url.scheme}://{url.netloc}" if url.netloc else "the S3 endpoint")
        return OutputError(
            f"{place}: {doing} failed: cannot reach {endpoint} (connection refused, lost or timed out, retried "
            f"{MAX_ATTEMPTS - 1} times with backoff); when the server is back, run the same command again to resume, "
            "finished shards are kept"
        )
    detail = safe_text(" ".join(str(error).split()), 300)
    status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    retried = (isinstance(status, int) and status >= 500) or code in ("SlowDown", "RequestTimeout", "Throttling")
    if not retried:  # a refusal, or boto3's own error before sending: retrying would not help
        return OutputError(f"{place}: {doing} failed: {detail}; the server refused the request: check the URL")
    return OutputError(
        f"{place}: {doing} failed: {detail}; requests were retried {MAX_ATTEMPTS - 1} times with backoff; run the "
        "same command again to resume, finished shards are kept"
    )
