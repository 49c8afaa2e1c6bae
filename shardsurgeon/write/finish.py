"""What every destination does around the shards: names a run for resuming, writes the small
files (config, index, the donor's other files, model card, checksums) into a local folder for the
destination to publish, checks that no source changed, and reports what was done.

Shared by the local folder (:mod:`rewrite`) and S3 (:mod:`s3output`); writes only into the folder
it is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardsurgeon.errors import OutputError
from shardsurgeon.model.checkpoint import TensorRef, check_remote_unchanged
from shardsurgeon.model.source import Source
from shardsurgeon.plan.layout import Layout, PlacedTensor, ShardLayout
from shardsurgeon.plan.planner import Plan
from shardsurgeon.storage import identity
from shardsurgeon.storage.checksums import write_manifest
from shardsurgeon.units import ShardStarted
from shardsurgeon.write import smallfiles as hfdir
from shardsurgeon.write.executor import ShardStats
from shardsurgeon.write.local.folder import fsync_file


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run did; bytes are file bytes (headers included), holes are zeros left unwritten."""

    out: Path | str
    tensors: int
    shards: int
    shards_reused: int
    written: int
    holes: int
    seconds: float
    notes: tuple[str, ...] = ()
    """What was done beyond the run itself, such as recovering from an interrupted commit."""
    stats: ShardStats = field(default_factory=ShardStats)
    """What writing the shards of this run did: bytes copied, converted, shared with the source."""


def write_small_files(
    folder: Path,
    plan: Plan,
    layout: Layout,
    donor: Path | str,
    model_card: str,
    checksums: bool,
    shard_path: Callable[[str], Path | str],
) -> None:
    """config.json, the index, the donor's other files, the model card and, with ``checksums``, the
    tensors' checksums (read back from the shards written, found by ``shard_path``), each fsynced."""

    def write_card() -> None:
        (folder / "README.md").write_text(model_card, encoding="utf-8")
        fsync_file(folder / "README.md")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("config.json", lambda: hfdir.write_json(folder / "config.json", plan.config)),
        ("the index", lambda: hfdir.write_index(folder, layout)),
        (f"the other files of {donor}", lambda: hfdir.copy_other_files(donor, folder)),
        ("README.md", write_card),
    ]
    if checksums:
        shards = {s.name: [_written(shard_path(s.name), placed) for placed in s.tensors] for s in layout.shards}
        steps.append(("the checksums", lambda: write_manifest(folder, shards)))
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OutputError(
                f"{folder}: cannot write {what}: {e.strerror or e}; fix that and run the same command again, "
                "the shards written are kept"
            ) from None


def _written(path: Path | str, placed: PlacedTensor) -> TensorRef:
    """Where a planned tensor is in the shard written at ``path``."""
    tensor = placed.tensor
    return TensorRef(tensor.name, path, tensor.dtype, tensor.shape, placed.offset, tensor.nbytes)


def check_sources_unchanged(sources: Mapping[str, Source]) -> None:
    """Raise unless every source file is still what the plan read: local ones by identity, those
    by URL by size and header."""
    identity.check_unchanged(
        shard.identity or identity.record([shard.path])[0]
        for source in sources.values()
        for shard in source.checkpoint.shards
        if isinstance(shard.path, Path)
    )
    check_remote_unchanged([shard for source in sources.values() for shard in source.checkpoint.shards])


def resume_key(plan: Plan, layout: Layout, sources: Mapping[str, Source]) -> str:
    """Identifies a run: the plan, the shard names, and the exact source files.

    A source file is its path, size, mtime, and inode number and ctime, which no tool can set back:
    a source rewritten in place with its old mtime (``cp -p``, ``rsync``) is a different run. A file
    by URL is its size, header and ETag: a model uploaded again with new weights is another run.
    """
    digest = hashlib.sha256(plan.fingerprint.encode())
    for shard in layout.shards:
        digest.update(shard.name.encode())
    for model in sources.values():
        for source in model.checkpoint.shards:
            if isinstance(source.path, str):  # by URL: the file's size, its header's digest and its ETag
                digest.update(repr((source.path, source.nbytes, source.header_sha256, source.etag)).encode())
                continue
            seen = source.identity or identity.record([source.path])[0]  # as the plan saw it
            described = (seen.path.resolve(), seen.nbytes, seen.mtime_ns, seen.device, seen.inode, seen.ctime_ns)
            digest.update(repr(described).encode())
    return digest.hexdigest()


def announcer(layout: Layout, on_shard: ShardStarted | None) -> Callable[[ShardLayout], None]:
    numbers = {shard.name: number for number, shard in enumerate(layout.shards, start=1)}

    def begins(shard: ShardLayout) -> None:
        if on_shard is not None:
            on_shard(shard.name, numbers[shard.name], len(layout.shards))

    return begins
