"""Write a planned checkpoint: staging, resume, shards, the other files, and the atomic commit.

This is the library's entry point for writing; it sequences :mod:`output`, :mod:`execute` and
:mod:`hfdir` and reports progress through a callback. The CLI calls it; so can any program.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from shardsurgeon.errors import DestinationError, OutputError, safe_text
from shardsurgeon.model.source import Source
from shardsurgeon.plan.layout import Layout, ShardLayout
from shardsurgeon.plan.planner import Plan, Zeros
from shardsurgeon.units import Progress, ShardStarted
from shardsurgeon.verify.checker import shard_holds
from shardsurgeon.write.executor import Reflink, check_reflink
from shardsurgeon.write.finish import RunResult, announcer, check_sources_unchanged, resume_key, write_small_files
from shardsurgeon.write.local import folder as output
from shardsurgeon.write.local import publish
from shardsurgeon.write.runners import InProcess, Runner, worker_tag, write_shards

SMALL_FILES_ALLOWANCE = 64 << 20
"""Room kept free for the config, index, tokenizer and model card when checking disk space."""


def write_checkpoint(
    plan: Plan,
    layout: Layout,
    out: Path | str,
    sources: Mapping[str, Source],
    *,
    model_card: str,
    force: bool = False,
    dense: bool = False,
    reflink: Reflink = "auto",
    checksums: bool = False,
    progress: Progress | None = None,
    on_shard: ShardStarted | None = None,
    runner: Runner | None = None,
) -> RunResult:
    """Write the output of ``plan`` laid out as ``layout`` to ``out``, resuming an interrupted run.

    ``out`` is a local folder, or an S3 folder given as an ``s3://`` URL (:mod:`s3output`; there a
    zero tensor is never a hole, ``dense`` changes nothing, and ``runner`` must be None).

    With ``checksums``, the output also holds every tensor's CRC-32 (:mod:`checksums`).

    ``progress`` counts tensor bytes (those of shards kept from an interrupted run first);
    ``on_shard`` is told each shard that is written, as it begins; ``runner`` writes the shards
    (default: this process). The output is claimed for the whole run (checked, locked, recovered:
    see ``output.Destination``) and published only if no source file changed meanwhile.
    """
    if isinstance(out, str):
        return _write_s3(plan, layout, out, sources, model_card, force, reflink, checksums, progress, on_shard, runner)
    out = _named(out)
    with output.Destination(out, _folders(sources), force, files=_shard_paths(sources)) as destination:
        result = _write(
            plan, layout, destination, sources, model_card, dense, reflink, checksums, progress, on_shard, runner
        )  # fmt: skip
    return dataclasses.replace(result, notes=destination.notes)


def _write_s3(
    plan: Plan,
    layout: Layout,
    out: str,
    sources: Mapping[str, Source],
    model_card: str,
    force: bool,
    reflink: Reflink,
    checksums: bool,
    progress: Progress | None,
    on_shard: ShardStarted | None,
    runner: Runner | None,
) -> RunResult:
    if not out.startswith("s3://"):
        raise DestinationError(
            f"--out {safe_text(out)}: a web server is read-only; write to a local folder or to s3://BUCKET/FOLDER"
        )
    if runner is not None and not isinstance(runner, InProcess):
        raise DestinationError(
            f"--out {safe_text(out)}: parallel writers (--jobs, --ray) write to a local folder; on S3 one process "
            "already sends several parts at once: drop the flag"
        )
    if reflink == "always":
        raise DestinationError(f"--out {safe_text(out)}: --reflink always needs a local XFS or btrfs folder")
    from shardsurgeon.write.s3.destination import write_checkpoint_s3  # boto3 loads only for an S3 output

    return write_checkpoint_s3(
        plan, layout, out, sources, resume_key=resume_key(plan, layout, sources), model_card=model_card,
        force=force, checksums=checksums, progress=progress, on_shard=on_shard,
    )  # fmt: skip


def write_some_shards(
    layout: Layout,
    out: Path,
    sources: Mapping[str, Source],
    names: Sequence[str],
    *,
    plan_key: str,
    dense: bool = False,
    reflink: Reflink = "auto",
    progress: Progress | None = None,
    on_shard: ShardStarted | None = None,
) -> RunResult:
    """Write the shards ``names`` of ``layout`` into ``out``'s staging folder, for a later
    :func:`finalize_checkpoint`; shards already complete there are kept.

    One of many writers of a distributed job, on this machine or another sharing the folder: it
    takes the output's lock shared with the others (a run or a finalize, which lock it alone, is
    refused meanwhile), and its staging folder is the one of ``plan_key``, the same on every
    machine. Nothing is published.
    """
    out = _named(out)
    started = time.monotonic()
    progress = progress or (lambda nbytes: None)
    with output.Workers(out, _folders(sources), files=_shard_paths(sources), plan_key=plan_key) as staging:
        check_reflink(layout, out, reflink)
        wanted = [shard for shard in layout.shards if shard.name in set(names)]
        done = [s for s in wanted if output.completed_shard(staging / s.name, s)]
        todo = [s for s in wanted if s not in done]
        output.check_room(staging, sum(_bytes_to_write(s, dense) for s in todo))
        for shard in done:
            progress(shard.nbytes - len(shard.header))
        begins = announcer(layout, on_shard)
        stats = write_shards(todo, staging, dense, reflink, progress, begins, worker_tag())
    return RunResult(
        out, sum(len(s.tensors) for s in wanted), len(wanted), len(done), stats.written, stats.holes,
        time.monotonic() - started, stats=stats,
    )  # fmt: skip


def finalize_checkpoint(
    plan: Plan,
    layout: Layout,
    out: Path,
    sources: Mapping[str, Source],
    *,
    plan_key: str,
    model_card: str,
    force: bool = False,
    checksums: bool = False,
) -> RunResult:
    """Publish what :func:`write_some_shards` wrote under ``plan_key``: every shard must be there,
    complete; then the small files are written and the folder is moved into place as a run would."""
    out = _named(out)
    started = time.monotonic()
    with output.Destination(out, _folders(sources), force, files=_shard_paths(sources)) as destination:
        staging = output.staging_folder(out)
        if not output.staging_matches(out, plan_key):
            raise OutputError(
                f"--out {safe_text(out)}: no shards of this plan are waiting in {safe_text(staging.name)}; "
                "write them first with apply PLAN --shards ..."
            )
        missing = [s.name for s in layout.shards if not output.completed_shard(staging / s.name, s)]
        if missing:
            raise OutputError(
                f"--out {safe_text(out)}: {len(missing)} of {len(layout.shards)} shards are missing or incomplete "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); write them with apply PLAN "
                "--shards, then finalize again"
            )
        seen = publish.folder_identity(staging)
        output.remove_strays(staging, {s.name for s in layout.shards})
        _publish(plan, layout, destination, staging, sources, model_card, seen, checksums)
    return RunResult(
        out, len(plan.tensors), len(layout.shards), len(layout.shards), 0, 0, time.monotonic() - started,
        destination.notes,
    )  # fmt: skip


def _named(out: Path) -> Path:
    """``out`` with a name to give its siblings (``.`` and ``..`` become absolute paths)."""
    return Path(os.path.abspath(out)) if out.name in ("", ".", "..") else out


def _folders(sources: Mapping[str, Source]) -> list[Path]:
    """The local source folders, which the output must stay out of (a URL has no such place)."""
    return [source.folder for source in sources.values() if isinstance(source.folder, Path)]


def _shard_paths(sources: Mapping[str, Source]) -> list[Path]:
    return [
        shard.path for source in sources.values() for shard in source.checkpoint.shards if isinstance(shard.path, Path)
    ]


def _write(
    plan: Plan,
    layout: Layout,
    destination: output.Destination,
    sources: Mapping[str, Source],
    model_card: str,
    dense: bool,
    reflink: Reflink,
    checksums: bool,
    progress: Progress | None,
    on_shard: ShardStarted | None,
    runner: Runner | None,
) -> RunResult:
    started = time.monotonic()
    out = destination.out
    progress = progress or (lambda nbytes: None)
    check_reflink(layout, out, reflink)
    staging, _ = output.open_staging(out, resume_key(plan, layout, sources))
    seen = publish.folder_identity(staging)
    # a shard an interrupted run finished is kept only if every byte is what the plan says: checked
    # against the sources, not trusted by its size and header (a disk error, a stray edit)
    done = {
        s.name
        for s in layout.shards
        if output.completed_shard(staging / s.name, s) and shard_holds(s, staging / s.name)
    }
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
    stats = (runner or InProcess()).run(todo, staging, dense, reflink, progress, announcer(layout, on_shard))
    _publish(plan, layout, destination, staging, sources, model_card, seen, checksums)
    return RunResult(
        out, len(plan.tensors), len(layout.shards), len(done), stats.written, stats.holes,
        time.monotonic() - started, stats=stats,
    )  # fmt: skip


def _publish(
    plan: Plan,
    layout: Layout,
    destination: output.Destination,
    staging: Path,
    sources: Mapping[str, Source],
    model_card: str,
    seen: publish.Identity | None,
    checksums: bool,
) -> None:
    """The small files, a last check that no source changed since it was read, and the commit; the
    staging folder must still be the one ``seen`` when the run took it."""
    output.check_staging(staging, seen)
    donor = sources[plan.recipe.donor].folder
    write_small_files(staging, plan, layout, donor, model_card, checksums, lambda name: staging / name)
    output.check_staging(staging, seen)
    # as the plan saw them: a source that changed between planning and writing is caught too
    check_sources_unchanged(sources)
    destination.commit(staging)


def _bytes_to_write(shard: ShardLayout, dense: bool) -> int:
    return len(shard.header) + sum(
        p.tensor.nbytes for p in shard.tensors if dense or not isinstance(p.tensor.op, Zeros)
    )
