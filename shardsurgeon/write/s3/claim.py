"""A claim on an S3 folder for one run: a lock object created only if absent, kept alive as a lease.

S3 has no file locks, and a process that dies holds nothing: the claim is the object
``.shardsurgeon-lock``, created with ``If-None-Match: *`` (S3, MinIO, R2 and SeaweedFS refuse the
second creator), naming its run, host and process, and rewritten every :data:`RENEW_SECONDS` by a
thread of the holder with ``If-Match`` on its own last version. A claim whose last renewal is older
than :data:`LEASE_SECONDS` by the server's clock, or whose holder is a process of this host that is
gone, is stale: the next run takes it over, again with ``If-Match``, so two takers cannot both win.
A holder that finds its claim taken over stops before it writes again (:meth:`S3Claim.check`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.storage.s3 import S3Location, describe, error_code, failed_condition

LOCK_NAME = ".shardsurgeon-lock"
LEASE_SECONDS = 120.0
RENEW_SECONDS = 20.0
HOLDER_MAX_BYTES = 4096


def _pid_namespace() -> str | None:
    """This process's process-id namespace (Linux), so that a pid is compared only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class S3Claim:
    """The claim of one run on an S3 folder; a context manager that renews it until exit."""

    def __init__(self, client: Any, folder: S3Location):
        self._client = client
        self._where = folder.child(LOCK_NAME)
        self._folder = folder
        self._run = uuid.uuid4().hex
        self._etag = ""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> S3Claim:
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
        """:meth:`check`, and read the claim back to be sure it is still this run's: before what
        must not happen twice (a shard's upload completing, the checkpoint published)."""
        self.check()
        holder, _, _ = self._holder()
        if holder.get("run") != self._run:
            self._lost = "another run took over its claim on the folder"
            self.check()

    def _body(self) -> bytes:
        renewed = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        holder = {"run": self._run, "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace()}
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
        if self._put(IfNoneMatch="*"):
            return
        holder, etag, age = self._holder()
        if etag and self._stale(holder, age) and self._put(IfMatch=etag):
            return
        who = f"pid {holder.get('pid')} on {safe_text(holder.get('host'))}" if holder else "another run"
        wait = max(0, int(LEASE_SECONDS - age)) if age is not None else int(LEASE_SECONDS)
        raise OutputError(
            f"--out {safe_text(self._folder.url)}: another shardsurgeon run ({who}) is writing there, its claim "
            f"renewed {int(age or 0)} s ago; wait for it to finish, or if it was stopped, run again in {wait} s "
            "when its claim expires"
        )

    def _holder(self) -> tuple[dict[str, Any], str, float | None]:
        """The claim's content, its ETag and its age in seconds by the server's clock ('' if gone)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.get_object(Bucket=self._where.bucket, Key=self._where.key)
            data = answer["Body"].read(HOLDER_MAX_BYTES)
        except ClientError as e:
            if error_code(e) in ("NoSuchKey", "404"):
                return {}, "", None
            raise describe(self._where, "reading the claim", e) from None
        except BotoCoreError as e:
            raise describe(self._where, "reading the claim", e) from None
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

    @staticmethod
    def _stale(holder: dict[str, Any], age: float | None) -> bool:
        """Whether the claim can be taken over: not renewed for a lease, or its process is known
        gone (same host and the same process-id namespace: containers share host names)."""
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
        holder, etag, _ = self._holder()
        if holder.get("run") == self._run and etag:
            self._client.delete_object(Bucket=self._where.bucket, Key=self._where.key)
