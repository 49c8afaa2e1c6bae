"""Per-tensor checksums of an output (``--checksums``), so that ``verify`` without the sources can
still tell a damaged byte.

``shardsurgeon.checksums.json`` maps each shard to its tensors' CRC-32 (zlib's, hex), computed
after every shard is written and fsynced, by reading the shards back in fixed-size chunks: the
written bytes, not the intended ones, so a write that went wrong is caught by the next verify
rather than vouched for. Reading back costs a pass over the output (a download of it, for an
output on S3) (from the page cache when it
fits); copies the filesystem shared stay shared (reading does not unshare). Off by default: see
bench/RESULTS.md for what it costs. CRC-32 finds accidental damage, not tampering.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

from shardsurgeon.format import TensorRef
from shardsurgeon.names import CHECKSUMS_FILE, CHUNK_BYTES
from shardsurgeon.storage import fileio
from shardsurgeon.storage.remote import SourceFiles

ALGORITHM = "crc32"


def tensor_crcs(refs: Iterable[TensorRef]) -> list[str]:
    """The CRC-32 (hex) of each tensor's bytes as they are in its file, in order, read with one
    reused buffer."""
    buffer = bytearray(CHUNK_BYTES)
    crcs = []
    with SourceFiles() as files:
        for ref in refs:
            crc, done = 0, 0
            while done < ref.nbytes:
                view = memoryview(buffer)[: min(CHUNK_BYTES, ref.nbytes - done)]
                if isinstance(ref.path, str):  # by URL: one ranged GET of the chunk
                    data = files.read(ref.path, ref.data_start + done, len(view))
                    view[: len(data)], got = data, len(data)
                else:
                    got = fileio.read_at(files.fd(ref.path), view, ref.data_start + done)
                if got == 0:
                    break  # a short file: the CRC of what is there differs from the recorded one
                crc = zlib.crc32(view[:got], crc)
                done += got
            crcs.append(f"{crc:08x}")
    return crcs


def manifest(shards: dict[str, list[TensorRef]]) -> dict[str, object]:
    """The checksums record of shards given as ``{file name: its tensors}``."""
    records = {name: dict(zip((r.name for r in refs), tensor_crcs(refs), strict=True)) for name, refs in shards.items()}
    return {"algorithm": ALGORITHM, "shards": records}


def write_manifest(folder: Path, shards: dict[str, list[TensorRef]]) -> None:
    path = folder / CHECKSUMS_FILE
    path.write_text(json.dumps(manifest(shards), indent=2) + "\n", encoding="utf-8")
    fileio.sync_file(path)
