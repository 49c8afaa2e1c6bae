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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardsurgeon import hfdir, identity, output, publish
from shardsurgeon.checkpoint import TensorRef, check_remote_unchanged
from shardsurgeon.checksums import write_manifest
from shardsurgeon.errors import OutputError, safe_text
from shardsurgeon.execute import Reflink, ShardStats, check_reflink
from shardsurgeon.layout import Layout, PlacedTensor, ShardLayout
from shardsurgeon.plan import Plan, Zeros
from shardsurgeon.runners import InProcess, Runner, worker_tag, write_shards
from shardsurgeon.source import Source
from shardsurgeon.units import Progress, ShardStarted
from shardsurgeon.verify import shard_holds

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
    checksums: bool = False,
    progress: Progress | None = None,
    on_shard: ShardStarted | None = None,
    runner: Runner | None = None,
) -> RunResult:
    """Write the output of ``plan`` laid out as ``layout`` to ``out``, resuming an interrupted run.

    With ``checksums``, the output also holds every tensor's CRC-32 (:mod:`checksums`).

    ``progress`` counts tensor bytes (those of shards kept from an interrupted run first);
    ``on_shard`` is told each shard that is written, as it begins; ``runner`` writes the shards
    (default: this process). The output is claimed for the whole run (checked, locked, recovered:
    see ``output.Destination``) and published only if no source file changed meanwhile.
    """
    out = _named(out)
    with output.Destination(out, _folders(sources), force, files=_shard_paths(sources)) as destination:
        result = _write(
            plan, layout, destination, sources, model_card, dense, reflink, checksums, progress, on_shard, runner
        )  # fmt: skip
    return dataclasses.replace(result, notes=destination.notes)


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
        begins = _announcer(layout, on_shard)
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


def _announcer(layout: Layout, on_shard: ShardStarted | None) -> Callable[[ShardLayout], None]:
    numbers = {shard.name: number for number, shard in enumerate(layout.shards, start=1)}

    def begins(shard: ShardLayout) -> None:
        if on_shard is not None:
            on_shard(shard.name, numbers[shard.name], len(layout.shards))

    return begins


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
    staging, _ = output.open_staging(out, _resume_key(plan, layout, sources))
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
    stats = (runner or InProcess()).run(todo, staging, dense, reflink, progress, _announcer(layout, on_shard))
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
    _write_small_files(staging, plan, layout, sources[plan.recipe.donor].folder, model_card, checksums)
    output.check_staging(staging, seen)
    # as the plan saw them: a source that changed between planning and writing is caught too
    identity.check_unchanged(
        shard.identity or identity.record([shard.path])[0]
        for source in sources.values()
        for shard in source.checkpoint.shards
        if isinstance(shard.path, Path)
    )
    check_remote_unchanged([shard for source in sources.values() for shard in source.checkpoint.shards])
    destination.commit(staging)


def _write_small_files(
    staging: Path, plan: Plan, layout: Layout, donor: Path | str, model_card: str, checksums: bool
) -> None:
    """config.json, the index, the donor's other files, the model card and, with ``checksums``, the
    tensors' checksums, each fsynced."""

    def write_card() -> None:
        (staging / "README.md").write_text(model_card, encoding="utf-8")
        output.fsync_file(staging / "README.md")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("config.json", lambda: hfdir.write_json(staging / "config.json", plan.config)),
        ("the index", lambda: hfdir.write_index(staging, layout)),
        (f"the other files of {donor}", lambda: hfdir.copy_other_files(donor, staging)),
        ("README.md", write_card),
    ]
    if checksums:
        shards = {s.name: [_written(staging / s.name, placed) for placed in s.tensors] for s in layout.shards}
        steps.append(("the checksums", lambda: write_manifest(staging, shards)))
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OutputError(
                f"{staging}: cannot write {what}: {e.strerror or e}; fix that and run the same command again, "
                "the shards written are kept"
            ) from None


def _written(path: Path, placed: PlacedTensor) -> TensorRef:
    """Where a planned tensor is in the shard written at ``path``."""
    tensor = placed.tensor
    return TensorRef(tensor.name, path, tensor.dtype, tensor.shape, placed.offset, tensor.nbytes)


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
            if isinstance(source.path, str):  # by URL: the file's size and its header's digest
                digest.update(repr((source.path, source.nbytes, source.header_sha256)).encode())
                continue
            seen = source.identity or identity.record([source.path])[0]  # as the plan saw it
            described = (seen.path.resolve(), seen.nbytes, seen.mtime_ns, seen.device, seen.inode, seen.ctime_ns)
            digest.update(repr(described).encode())
    return digest.hexdigest()
