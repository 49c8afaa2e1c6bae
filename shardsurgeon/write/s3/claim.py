"""A claim on an S3 folder: held alone by a run or a finalize, or shared by the writers of one
distributed job; kept alive as a lease.

S3 has no file locks, and a process that dies holds nothing. A claim is an object naming its run,
host and process, rewritten every :data:`RENEW_SECONDS` by a thread of the holder with ``If-Match``
on its own last version:

- held alone: the object ``.shardsurgeon-lock``, created with ``If-None-Match: *`` (S3, MinIO, R2 and
  SeaweedFS refuse the second creator); then the writers' leases are listed, and a live one makes
  the claimer step back;
- shared: each writer's own object under ``.shardsurgeon-writers/``; then the lock is read, and a
  live one makes the writer step back.

Each side writes its own object before it looks for the other's, so of a run and a writer starting
together at least one sees the other (S3 reads its own writes). A claim whose last renewal is older
than :data:`LEASE_SECONDS` by the server's clock, or whose holder is a process of this host (and
pid namespace) that is gone, is stale: a lock is taken over (with ``If-Match``, so two takers cannot
both win), a writer's lease removed. A holder that finds its claim taken over stops before it
writes again (:meth:`ClaimToken.confirm`, which any process of the run can call).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.names import HOLDER_MAX_BYTES, LOCK_NAME, WRITERS_PREFIX
from shardsurgeon.storage.s3 import S3Location, describe, error_code, failed_condition

LEASE_SECONDS = 120.0
RENEW_SECONDS = 20.0


def _pid_namespace() -> str | None:
    """This process's process-id namespace (Linux), so that a pid is compared only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class ClaimToken:
    """A run's claim as any of its processes can check it: the claim object and the run's id."""

    where: S3Location
    run: str

    def confirm(self, client: Any) -> None:
        """Raise unless the claim object still names this run: before what must not happen twice (a
        shard's upload completing, the checkpoint published)."""
        holder, _, _ = read_holder(client, self.where)
        if holder.get("run") != self.run:
            raise OutputError(
                f"--out {safe_text(self.where.url.rpartition('/')[0])}: another run took over this run's claim on the "
                "folder; this run stopped, its finished shards are kept"
            )


class S3Claim:
    """The claim of one run on an S3 folder; a context manager that renews it until exit."""

    def __init__(self, client: Any, folder: S3Location, *, job: str, shared: bool = False):
        self._client = client
        self._folder = folder
        self._job = job
        self._shared = shared
        self._run = uuid.uuid4().hex
        self._where = folder.child(WRITERS_PREFIX + self._run if shared else LOCK_NAME)
        self._etag = ""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def token(self) -> ClaimToken:
        return ClaimToken(self._where, self._run)

    def __enter__(self) -> S3Claim:
        if self._shared:
            self._join()
        else:
            self._acquire()
        self._renewer = threading.Thread(target=self._renew, name="shardsurgeon-claim", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._lost is None:
            with contextlib.suppress(Exception):
                self._release()

    def check(self) -> None:
        """Raise if another run took this claim over (this run stalled longer than a lease)."""
        if self._lost is not None:
            raise OutputError(
                f"--out {safe_text(self._folder.url)}: {self._lost}; this run stopped, its finished shards are kept"
            )

    def confirm(self) -> None:
        """:meth:`check`, and read the claim back to be sure it is still this run's."""
        self.check()
        try:
            self.token.confirm(self._client)
        except OutputError:
            self._lost = "another run took over its claim on the folder"
            raise

    def _body(self) -> bytes:
        renewed = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        holder = {
            "run": self._run, "job": self._job, "host": socket.gethostname(), "pid": os.getpid(),
            "pidns": _pid_namespace(),
        }  # fmt: skip
        return json.dumps(holder | {"renewed": renewed}).encode()

    def _put(self, **condition: str) -> bool:
        """Write the claim under ``condition``; False when the condition fails (someone else's claim)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.put_object(
                Bucket=self._where.bucket, Key=self._where.key, Body=self._body(), **condition
            )
        except ClientError as e:
            if failed_condition(e):
                return False
            raise describe(self._where, "claiming the folder", e) from None
        except BotoCoreError as e:
            raise describe(self._where, "claiming the folder", e) from None
        self._etag = answer["ETag"]
        return True

    def _acquire(self) -> None:
        """Take the lock alone, then make sure no writer of a distributed job is at work."""
        if not self._put(IfNoneMatch="*"):
            holder, etag, age = read_holder(self._client, self._where)
            if not (etag and _stale(holder, age) and self._put(IfMatch=etag)):
                raise OutputError(self._busy(holder, age, "another shardsurgeon run"))
        for lease in self._names(WRITERS_PREFIX):
            where = self._folder.child(lease)
            holder, etag, age = read_holder(self._client, where)
            if not etag:
                continue
            if _stale(holder, age):
                with contextlib.suppress(Exception):
                    self._client.delete_object(Bucket=where.bucket, Key=where.key)
                continue
            with contextlib.suppress(Exception):
                self._release()
            raise OutputError(self._busy(holder, age, "a writer of a distributed job (apply --shards)"))

    def _join(self) -> None:
        """Write this writer's lease, then make sure no run holds the folder alone and no writer of
        another job is at work there (the writers of one job share a folder, never two jobs)."""
        self._put()
        lock = self._folder.child(LOCK_NAME)
        holder, etag, age = read_holder(self._client, lock)
        if etag and not _stale(holder, age):
            with contextlib.suppress(Exception):
                self._release()
            raise OutputError(self._busy(holder, age, "another shardsurgeon run"))
        if etag and not self._break(lock, etag):  # a stale lock's holder must not wake up to publish
            with contextlib.suppress(Exception):
                self._release()
            raise OutputError(self._busy(holder, age, "another shardsurgeon run"))
        for lease in self._names(WRITERS_PREFIX):
            where = self._folder.child(lease)
            if where == self._where:
                continue
            holder, etag, age = read_holder(self._client, where)
            if etag and holder.get("job") != self._job and not _stale(holder, age):
                with contextlib.suppress(Exception):
                    self._release()
                raise OutputError(self._busy(holder, age, "a writer of another plan (apply --shards)"))

    def _break(self, lock: S3Location, etag: str) -> bool:
        """Take a stale lock away from its holder (which then finds it gone when it next confirms),
        conditionally: False when it was renewed or taken meanwhile."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=lock.bucket, Key=lock.key, Body=b'{"run": "broken"}', IfMatch=etag)
            self._client.delete_object(Bucket=lock.bucket, Key=lock.key)
        except ClientError as e:
            if failed_condition(e):
                return False
            raise describe(lock, "taking over a stale claim", e) from None
        except BotoCoreError as e:
            raise describe(lock, "taking over a stale claim", e) from None
        return True

    def _busy(self, holder: dict[str, Any], age: float | None, who: str) -> str:
        process = f"pid {holder.get('pid')} on {safe_text(holder.get('host'))}" if holder else "unknown"
        wait = max(0, int(LEASE_SECONDS - age)) if age is not None else int(LEASE_SECONDS)
        return (
            f"--out {safe_text(self._folder.url)}: {who} ({process}) is writing there, its claim renewed "
            f"{int(age or 0)} s ago; wait for it to finish, or if it was stopped, run again in {wait} s when its claim "
            "expires"
        )

    def _names(self, under: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._folder.bucket, Prefix=self._folder.key + under
            )
            return [item["Key"].removeprefix(self._folder.key) for page in pages for item in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as e:
            raise describe(self._folder, "listing the claims on the folder", e) from None

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(RENEW_SECONDS):
            try:
                if not self._put(IfMatch=self._etag):
                    self._lost = "another run took over its claim on the folder"
                    return
                last = time.monotonic()
            except OutputError:
                if time.monotonic() - last > LEASE_SECONDS:
                    self._lost = "its claim on the folder could not be renewed for longer than the lease"
                    return

    def _release(self) -> None:
        holder, etag, _ = read_holder(self._client, self._where)
        if holder.get("run") == self._run and etag:
            self._client.delete_object(Bucket=self._where.bucket, Key=self._where.key)


def read_holder(client: Any, where: S3Location) -> tuple[dict[str, Any], str, float | None]:
    """The claim's content, its ETag and its age in seconds by the server's clock ('' if gone)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = client.get_object(Bucket=where.bucket, Key=where.key)
        data = answer["Body"].read(HOLDER_MAX_BYTES)
    except ClientError as e:
        if error_code(e) in ("NoSuchKey", "404"):
            return {}, "", None
        raise describe(where, "reading the claim", e) from None
    except BotoCoreError as e:
        raise describe(where, "reading the claim", e) from None
    try:
        holder = json.loads(data)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:
        holder = {}
    served = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    age = None
    if served:
        from email.utils import parsedate_to_datetime

        age = (parsedate_to_datetime(served) - answer["LastModified"]).total_seconds()
    return holder, answer["ETag"], age


def _stale(holder: dict[str, Any], age: float | None) -> bool:
    """Whether a claim can be taken over: not renewed for a lease, or its process is known gone (the
    same host and the same process-id namespace: containers share host names)."""
    if age is not None and age > LEASE_SECONDS:
        return True
    pid, namespace = holder.get("pid"), _pid_namespace()
    same_space = holder.get("host") == socket.gethostname() and namespace and holder.get("pidns") == namespace
    if not same_space or not isinstance(pid, int) or not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # its process is gone: it can renew no more
    except OSError:
        return False
    return False
