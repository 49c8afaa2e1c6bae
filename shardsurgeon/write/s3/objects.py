"""The objects of one S3 folder as one job sees them: listing, writing with the job's key in each
object's metadata, the resume record, the zeros object, the record of each finished shard (the ETag
its upload completed with), and whether a finished shard is this job's; every failure as one line.
Owns no policy: what to keep, refuse or remove is :mod:`write.s3.destination`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.format import MAX_HEADER_BYTES
from shardsurgeon.names import DONE_PREFIX, RESUME_NAME, ZEROS_NAME
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.storage.s3 import S3Location, describe, error_code, failed_condition
from shardsurgeon.write.s3.parts import ZEROS_NBYTES
from shardsurgeon.write.s3.uploads import RUN_METADATA_KEY, SCRATCH, ZerosReader

RECORD_MAX_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    """The resume record: the key of the job that left the folder unfinished, and with force what
    it holds of the checkpoint being replaced."""

    key: str
    replacing: tuple[str, ...] = ()


class S3Folder:
    """The objects under one S3 folder, by name relative to it, as one job writes them: each object
    written carries ``run_key`` in its metadata."""

    def __init__(self, client: Any, folder: S3Location, run_key: str):
        self.client = client
        self.folder = folder
        self.run_key = run_key

    def _call(self, name: str, doing: str, method: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.folder.child(name)
        try:
            return method(Bucket=where.bucket, Key=where.key, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise describe(where, doing, e) from None

    def names(self, under: str, limit: int | None = None) -> list[str]:
        """The objects under the folder whose names start with ``under``, in order; with ``limit``,
        only the first ``limit + 1`` are looked for."""
        return [name for name, _, _ in self.listing(under, limit)]

    def listing(self, under: str, limit: int | None = None) -> list[tuple[str, int, str]]:
        """:meth:`names` with each object's size and ETag, as the listing gives them."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = self.folder.key + under
        found: list[tuple[str, int, str]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.folder.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name = item["Key"].removeprefix(self.folder.key)
                    found.append((name, int(item.get("Size", 0)), str(item.get("ETag", ""))))
                if limit is not None and len(found) > limit:
                    break
        except (ClientError, BotoCoreError) as e:
            raise describe(self.folder, "listing the folder", e) from None
        return sorted(found)

    def abort_uploads(self) -> None:
        """Abort the unfinished multipart uploads a killed run left under the folder: of its shards
        and scratch objects (another tool's uploads there are none of its business)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.folder.bucket, Prefix=self.folder.key
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    name = str(upload["Key"]).removeprefix(self.folder.key)
                    if name.startswith(SCRATCH) or ("/" not in name and name.endswith(".safetensors")):
                        self.client.abort_multipart_upload(
                            Bucket=self.folder.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
        except (ClientError, BotoCoreError) as e:
            raise describe(self.folder, "aborting the unfinished uploads of an earlier run", e) from None

    def remove(self, names: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(names), 1000):
            batch = [{"Key": self.folder.key + name} for name in names[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.folder.bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as e:
                raise describe(self.folder, "removing objects", e) from None

    def put(self, name: str, data: bytes, create: bool = False) -> int:
        """Write the object ``name``; with ``create``, only if there is none (else another run published)."""
        from botocore.exceptions import ClientError

        where = self.folder.child(name)
        condition = {"IfNoneMatch": "*"} if create else {}
        try:
            self.client.put_object(
                Bucket=where.bucket, Key=where.key, Body=data, Metadata={RUN_METADATA_KEY: self.run_key}, **condition
            )
        except ClientError as e:
            if create and failed_condition(e):
                raise OutputError(
                    f"--out {safe_text(self.folder.url)}: another run published a checkpoint there during this one; "
                    "it is left as it is: pass --force to replace it"
                ) from None
            raise describe(where, f"writing {name}", e) from None
        return len(data)

    def run_of(self, name: str) -> str | None:
        """The run key ``name`` carries in its metadata: None for an object this tool did not write."""
        try:
            head = self._call(name, f"looking at {name}", self.client.head_object)
        except OutputError:
            return None
        run = head.get("Metadata", {}).get(RUN_METADATA_KEY)
        return str(run) if run else None

    def read_record(self) -> ResumeRecord | None:
        try:
            answer = self._call(RESUME_NAME, "reading the resume record", self.client.get_object)
            record = json.loads(answer["Body"].read(RECORD_MAX_BYTES))
            key, replacing = record["key"], record.get("replacing", [])
        except (OutputError, ValueError, TypeError, KeyError):
            return None
        if not isinstance(key, str) or not isinstance(replacing, list):
            return None
        return ResumeRecord(key, tuple(name for name in replacing if isinstance(name, str)))

    def write_record(self, record: ResumeRecord) -> None:
        self.put(RESUME_NAME, json.dumps({"key": record.key, "replacing": list(record.replacing)}).encode())

    def zeros_object(self) -> tuple[str, str]:
        """The all-zero object zero tensors are copied from: its URL and ETag."""
        where = self.folder.child(ZEROS_NAME)
        answer = self._call(
            ZEROS_NAME, "writing the zeros object", self.client.put_object, Body=ZerosReader(ZEROS_NBYTES)
        )
        return where.url, str(answer["ETag"])

    def exists(self, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.folder.child(name)
        try:
            self.client.head_object(Bucket=where.bucket, Key=where.key)
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise describe(where, f"looking for {name}", e) from None
        except BotoCoreError as e:
            raise describe(where, f"looking for {name}", e) from None
        return True

    def head(self, name: str) -> tuple[int, str, str | None] | None:
        """The object's size, ETag and the job key in its metadata; None when there is none."""
        try:
            head = self._call(name, f"looking at {name}", self.client.head_object)
        except OutputError:
            return None
        run = head.get("Metadata", {}).get(RUN_METADATA_KEY)
        return int(head["ContentLength"]), str(head["ETag"]), str(run) if run else None

    def holds(self, shard: ShardLayout) -> bool:
        """Whether the object of ``shard`` was written by a run of this very job (its metadata says
        so) and has the size and header the layout gives it."""
        found = self.head(shard.name)
        if found is None or found[0] != shard.nbytes or found[2] != self.run_key:
            return False
        try:
            answer = self._call(
                shard.name,
                "checking a finished shard",
                self.client.get_object,
                Range=f"bytes=0-{shard.header_nbytes - 1}",
            )
            return bool(answer["Body"].read() == shard.header)
        except OutputError:
            return False

    def header_digest(self, name: str, folder: str | None = None) -> str | None:
        """The SHA-256 of the object's safetensors header (its length field included), as a source's
        version records it; None when it holds no such header. ``folder``: a key prefix of the
        bucket to find ``name`` in, instead of this folder."""
        import hashlib
        import struct

        from botocore.exceptions import BotoCoreError, ClientError

        key = (self.folder.key if folder is None else folder) + name

        def get(span: str) -> bytes:
            return bytes(self.client.get_object(Bucket=self.folder.bucket, Key=key, Range=span)["Body"].read())

        try:
            first = get("bytes=0-7")
            (length,) = struct.unpack("<Q", first)
            if not 0 < length <= MAX_HEADER_BYTES:
                return None
            return hashlib.sha256(first + get(f"bytes=8-{7 + length}")).hexdigest()
        except (ClientError, BotoCoreError, struct.error):
            return None  # no header to compare: not a source's copy

    def folders_above(self) -> list[str]:
        """The key prefixes of the folders that hold this one, nearest first, the bucket's root last."""
        parts = self.folder.key.rstrip("/").split("/")[:-1] if self.folder.key else []
        return [*("/".join(parts[:n]) + "/" for n in range(len(parts), 0, -1)), *([""] if self.folder.key else [])]

    def listing_of(self, prefix: str, limit: int = 10_000) -> list[tuple[str, int, str]]:
        """The objects directly in the folder ``prefix`` of the bucket (not in its subfolders):
        name, size and ETag; at most about ``limit``."""
        from botocore.exceptions import BotoCoreError, ClientError

        found: list[tuple[str, int, str]] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.folder.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                found += [
                    (item["Key"].removeprefix(prefix), int(item.get("Size", 0)), str(item.get("ETag", "")))
                    for item in page.get("Contents", [])
                ]
                if len(found) > limit:
                    break
        except (ClientError, BotoCoreError) as e:
            raise describe(self.folder, "listing a folder above", e) from None
        return found

    def record_done(self, name: str, etag: str) -> None:
        """Record that this job's upload of ``name`` completed as the object of ``etag``."""
        self.put(DONE_PREFIX + name, json.dumps({"key": self.run_key, "etag": etag}).encode())

    def done_etag(self, name: str) -> str | None:
        """The ETag this job's writer recorded for ``name``, or None (no record, or another job's)."""
        try:
            answer = self._call(DONE_PREFIX + name, "reading a finished shard's record", self.client.get_object)
            record = json.loads(answer["Body"].read(RECORD_MAX_BYTES))
        except (OutputError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.run_key or not isinstance(record.get("etag"), str):
            return None
        return str(record["etag"])


def check_bucket(client: Any, folder: S3Location) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=folder.bucket)
    except ClientError as e:
        if error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise OutputError(
                f"--out {safe_text(folder.url)}: bucket {safe_text(folder.bucket)!r} not found; check the bucket name "
                "and AWS_ENDPOINT_URL, or create the bucket"
            ) from None
        raise describe(folder, "opening the bucket", e) from None
    except BotoCoreError as e:
        raise describe(folder, "opening the bucket", e) from None
