"""The one run sequence: every way of writing a checkpoint, to every destination, goes through it.

    claim the output -> keep finished shards that are proven -> write the rest -> small files
      -> sources unchanged? -> publish -> clean up

A whole run does every step; a writer of a distributed job (``apply --shards``) stops after its
shards; the finalize (``apply --finalize``) writes nothing and requires every shard finished and
proven. Any runner (this process, ``--jobs``, Ray) writes the shards; the destination (a local
folder, an S3 folder: :mod:`write.local.destination`, :mod:`write.s3.destination`) decides only how
the output is claimed, where shards wait and how it is published. The rules between the steps
live here and in :mod:`write.proof`, once:

- the sources are the versions the plan saw: checked as each writer starts, and right before
  anything is published (:mod:`storage.versions`);
- a finished shard is kept only when proven to hold exactly the planned bytes (:mod:`write.proof`);
- nothing that is a source is written, replaced or removed (each destination's claim asks
  :mod:`storage.overlap` before it touches anything).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.plan.job import Job
from shardsurgeon.plan.layout import Layout, ShardLayout
from shardsurgeon.storage.versions import check_unchanged, weak_sources
from shardsurgeon.units import ShardStarted
from shardsurgeon.write.destination import WHOLE, Destination, Part, RunResult, WriteOptions
from shardsurgeon.write.executor import ShardStats
from shardsurgeon.write.proof import proven_shards
from shardsurgeon.write.runners import InProcess
from shardsurgeon.write.smallfiles import write_small_files


def write_job(
    job: Job, destination: Destination, *, model_card: str, part: Part = WHOLE, options: WriteOptions | None = None
) -> RunResult:
    """Do ``part`` of ``job`` at ``destination``; ``model_card`` is the output's README.md."""
    options = options or WriteOptions()
    started = time.monotonic()
    progress = options.progress or (lambda nbytes: None)
    if part.kind == "writer":  # each writer, wherever and whenever it starts, sees the planned sources
        check_unchanged(job.versions, when="since the plan was made", before="nothing was written")
    with destination.claim(job, part, options) as area:
        wanted = part.wanted(job.layout.shards)
        kept, unproven = proven_shards(area, wanted, job)
        if not part.write and len(kept) < len(wanted):
            raise OutputError(_missing(destination.shown, [s for s in wanted if s not in kept], len(wanted)))
        todo = [s for s in wanted if s not in kept] if part.write else []
        area.prepare(kept, todo, options)
        for shard in kept:
            progress(shard.nbytes - shard.header_nbytes)
        stats = ShardStats()
        if todo:
            runner = options.runner or InProcess()
            stats = runner.run(todo, area.target(todo, options), progress, announcer(job.layout, options.on_shard))
        if part.publish:
            with area.small_files() as folder:
                write_small_files(folder, job, model_card, options.checksums, area.location)
                area.publish(folder, lambda: check_unchanged(job.versions))
    notes = area.notes + _weak_notes(job, unproven)
    stats += area.stats
    return RunResult(
        out=destination.out, tensors=sum(len(s.tensors) for s in wanted), shards=len(wanted), shards_reused=len(kept),
        written=stats.written, holes=stats.holes, seconds=time.monotonic() - started, notes=notes, stats=stats,
    )  # fmt: skip


def _missing(shown: str, missing: list[ShardLayout], count: int) -> str:
    names = ", ".join(s.name for s in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (
        f"--out {safe_text(shown)}: {len(missing)} of {count} shards are missing, incomplete or not the planned bytes "
        f"({names}); write them with apply PLAN --shards, then finalize again"
    )


def _weak_notes(job: Job, unproven: set[str]) -> tuple[str, ...]:
    """Say which sources' versions prove nothing of their bytes: those by URL always (a finished
    output is best checked against them), and any that made a kept shard be compared byte for byte."""
    weak = weak_sources(v for v in job.versions if not v.is_local or v.where in unproven)
    if not weak:
        return ()
    where, why = next(iter(weak.items()))
    others = f" (and {len(weak) - 1} more source files)" if len(weak) > 1 else ""
    checked = "; the shards kept were compared with it byte for byte" if unproven else ""
    return (
        f"{safe_text(where)}{others}: {why}, which does not prove its bytes unchanged{checked}; "
        "verify --src checks a finished output against it",
    )


def announcer(layout: Layout, on_shard: ShardStarted | None) -> Callable[[ShardLayout], None]:
    numbers = {shard.name: number for number, shard in enumerate(layout.shards, start=1)}

    def begins(shard: ShardLayout) -> None:
        if on_shard is not None:
            on_shard(shard.name, numbers[shard.name], len(layout.shards))

    return begins
