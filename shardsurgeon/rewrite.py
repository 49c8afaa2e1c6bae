"""Write a planned checkpoint: staging, resume, shards, the other files, and the atomic commit.

This is the library's entry point for writing; it sequences :mod:`output`, :mod:`execute` and
:mod:`hfdir` and reports progress through a callback. The CLI calls it; so can any program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardsurgeon import hfdir, identity, output
from shardsurgeon.errors import OutputError
from shardsurgeon.execute import Reflink, ShardStats, ShardWriter, SourceFiles, check_reflink
from shardsurgeon.layout import Layout, ShardLayout
from shardsurgeon.plan import Plan, Zeros
from shardsurgeon.source import Source
from shardsurgeon.units import Progress, ShardStarted

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
    notes: tuple[str, ...] = ()
    """What was done beyond the run itself, such as recovering from an interrupted commit."""
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
    on_shard: ShardStarted | None = None,
) -> RunResult:
    """Write the output of ``plan`` laid out as ``layout`` to ``out``, resuming an interrupted run.

    ``progress`` counts tensor bytes (those of shards kept from an interrupted run first);
    ``on_shard`` is told each shard that is written, as it begins. The output is claimed for the
    whole run (checked, locked, recovered: see ``output.Destination``) and published only if no
    source file changed meanwhile.
    """
    if out.name in ("", ".", ".."):  # no name to give the staging sibling: use the absolute path
        out = Path(os.path.abspath(out))
    shard_paths = [shard.path for source in sources.values() for shard in source.checkpoint.shards]
    folders = [source.folder for source in sources.values()]
    with output.Destination(out, folders, force, files=shard_paths) as destination:
        result = _write(plan, layout, destination, sources, model_card, dense, progress, on_shard, reflink)
    return dataclasses.replace(result, notes=destination.notes)


def _write(
    plan: Plan,
    layout: Layout,
    destination: output.Destination,
    sources: Mapping[str, Source],
    model_card: str,
    dense: bool,
    progress: Progress | None,
    on_shard: ShardStarted | None,
    reflink: Reflink,
) -> RunResult:
    started = time.monotonic()
    out = destination.out
    progress = progress or (lambda nbytes: None)
    donor = sources[plan.recipe.donor]
    check_reflink(layout, out, reflink)
    # as the plan saw them: a source that changed between planning and writing is caught too
    sources_seen = [
        shard.identity or identity.record([shard.path])[0]
        for source in sources.values()
        for shard in source.checkpoint.shards
    ]
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
            if on_shard is not None:
                on_shard(shard.name, layout.shards.index(shard) + 1, len(layout.shards))
            partial = staging / (shard.name + output.PARTIAL_SUFFIX)
            stats += writer.write(shard, partial)
            partial.rename(staging / shard.name)
    _write_small_files(staging, plan, layout, donor.folder, model_card)
    identity.check_unchanged(sources_seen)
    destination.commit(staging)
    seconds = time.monotonic() - started
    return RunResult(
        out, len(plan.tensors), len(layout.shards), len(done), stats.written, stats.holes, seconds, stats=stats
    )


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
            seen = (  # not named identity: that is the module
                source.path.resolve(),
                stat.st_size,
                stat.st_mtime_ns,
                stat.st_dev,
                stat.st_ino,
                stat.st_ctime_ns,
            )
            digest.update(repr(seen).encode())
    return digest.hexdigest()
