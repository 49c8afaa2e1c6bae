"""Write a planned checkpoint: staging, resume, shards, the other files, and the atomic commit.

This is the library's entry point for writing; it sequences :mod:`output`, :mod:`execute` and
:mod:`hfdir` and reports progress through a callback. The CLI calls it; so can any program.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardsurgeon import hfdir, output
from shardsurgeon.errors import OutputError
from shardsurgeon.execute import Reflink, ShardStats, ShardWriter, SourceFiles, check_reflink
from shardsurgeon.layout import Layout, ShardLayout
from shardsurgeon.plan import Plan, Zeros
from shardsurgeon.source import Source
from shardsurgeon.units import Progress

SMALL_FILES_ALLOWANCE = 64 << 20
"""Room kept free for the config, index, tokenizer and model card when checking disk space."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run did; bytes are file bytes (headers included), holes are zeros left unwritten."""

    out: Path
    tensors: int
    shards: int
    shards_reused: int
    written: int
    holes: int
    seconds: float
    stats: ShardStats = field(default_factory=ShardStats)
    """What writing the shards of this run did: bytes copied, converted, shared with the source."""


def write_checkpoint(
    plan: Plan,
    layout: Layout,
    out: Path,
    sources: Mapping[str, Source],
    *,
    model_card: str,
    force: bool = False,
    dense: bool = False,
    reflink: Reflink = "auto",
    progress: Progress | None = None,
) -> RunResult:
    """Write the output of ``plan`` laid out as ``layout`` to ``out``, resuming an interrupted run."""
    started = time.monotonic()
    if out.name in ("", ".", ".."):  # no name to give the staging sibling: use the absolute path
        out = Path(os.path.abspath(out))
    progress = progress or (lambda nbytes: None)
    donor = sources[plan.recipe.donor]
    output.check_destination(out, [s.folder for s in sources.values()], force)
    check_reflink(layout, out, reflink)
    staging, _ = output.open_staging(out, _resume_key(plan, layout, sources))
    done = {s.name for s in layout.shards if output.completed_shard(staging / s.name, s)}
    output.remove_strays(staging, done)
    todo = [s for s in layout.shards if s.name not in done]
    try:
        output.check_room(staging, sum(_bytes_to_write(s, dense) for s in todo) + SMALL_FILES_ALLOWANCE)
    except OutputError:
        if not done:  # nothing worth keeping for a resume: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for shard in layout.shards:
        if shard.name in done:
            progress(shard.nbytes - len(shard.header))
    stats = ShardStats()
    with SourceFiles() as files, ShardWriter(files, dense=dense, reflink=reflink, progress=progress) as writer:
        for shard in todo:
            partial = staging / (shard.name + output.PARTIAL_SUFFIX)
            stats += writer.write(shard, partial)
            partial.rename(staging / shard.name)
    _write_small_files(staging, plan, layout, donor.folder, model_card)
    output.commit(staging, out)
    seconds = time.monotonic() - started
    return RunResult(out, len(plan.tensors), len(layout.shards), len(done), stats.written, stats.holes, seconds, stats)


def _write_small_files(staging: Path, plan: Plan, layout: Layout, donor: Path, model_card: str) -> None:
    """config.json, the index, the donor's other files and the model card, each fsynced."""

    def write_card() -> None:
        (staging / "README.md").write_text(model_card, encoding="utf-8")
        output.fsync_file(staging / "README.md")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("config.json", lambda: hfdir.write_json(staging / "config.json", plan.config)),
        ("the index", lambda: hfdir.write_index(staging, layout)),
        (f"the other files of {donor}", lambda: hfdir.copy_other_files(donor, staging)),
        ("README.md", write_card),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OutputError(
                f"{staging}: cannot write {what}: {e.strerror or e}; fix that and run the same command again, "
                "the shards written are kept"
            ) from None


def _bytes_to_write(shard: ShardLayout, dense: bool) -> int:
    return len(shard.header) + sum(
        p.tensor.nbytes for p in shard.tensors if dense or not isinstance(p.tensor.op, Zeros)
    )


def _resume_key(plan: Plan, layout: Layout, sources: Mapping[str, Source]) -> str:
    """Identifies a run: the plan, the shard names, and the exact source files.

    A source file is its path, size, mtime, and inode number and ctime, which no tool can set back:
    a source rewritten in place with its old mtime (``cp -p``, ``rsync``) is a different run.
    """
    digest = hashlib.sha256(plan.fingerprint.encode())
    for shard in layout.shards:
        digest.update(shard.name.encode())
    for model in sources.values():
        for source in model.checkpoint.shards:
            stat = source.path.stat()
            identity = (
                source.path.resolve(),
                stat.st_size,
                stat.st_mtime_ns,
                stat.st_dev,
                stat.st_ino,
                stat.st_ctime_ns,
            )
            digest.update(repr(identity).encode())
    return digest.hexdigest()
