"""What a run shows on stderr: progress (a bar on a terminal, a line every few seconds in a job's
log) and the one-line summary."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from time import monotonic

import click

from shardsurgeon import Checkpoint, Layout, Plan, Progress, RunResult, ShardStarted, format_bytes, safe_text
from shardsurgeon.cli.progress import LINE_INTERVAL_SECONDS, advance, begin_shard, figures, start_tally


def report(plan: Plan, result: RunResult, quiet: bool) -> None:
    if not quiet:
        for note in result.notes:
            click.echo(f"shardsurgeon: note: {note}", err=True)
        click.echo(summary(plan, result), err=True)


@contextmanager
def progress(
    layout: Layout, quiet: bool, interval: float = LINE_INTERVAL_SECONDS
) -> Iterator[tuple[Progress | None, ShardStarted | None]]:
    """The library's two callbacks, drawing on stderr: a bar on a terminal; elsewhere (a job's log)
    a line every ``interval`` seconds and at each shard's end once the run is that long; with
    ``quiet``, nothing."""
    if quiet:
        yield None, None
        return
    shard_bytes = {s.name: s.nbytes - s.header_nbytes for s in layout.shards}
    tally = start_tally(layout.total_size, monotonic())

    def info(_: int | None) -> str:
        return figures(tally.done, tally.total, tally.rate(monotonic()))

    bar = None
    if sys.stderr.isatty():
        bar = click.progressbar(
            length=layout.total_size,
            label="writing",
            file=sys.stderr,
            width=0,
            show_percent=False,
            show_eta=False,
            item_show_func=info,
        )

    def progress(nbytes: int) -> None:
        nonlocal tally
        # on a terminal the bar shows the figures, so no line is ever due there
        tally, line = advance(tally, nbytes, monotonic(), interval if bar is None else math.inf)
        if bar is not None:
            bar.update(nbytes)
        elif line is not None:
            click.echo(line, err=True)

    def on_shard(name: str, number: int, count: int) -> None:
        nonlocal tally
        tally = begin_shard(tally, name, shard_bytes[name], monotonic())
        if bar is not None:
            bar.label = f"shard {number} of {count}"

    with bar if bar is not None else nullcontext():
        yield progress, on_shard


def summary(plan: Plan, result: RunResult) -> str:
    reused = f" ({result.shards_reused} kept from an earlier run)" if result.shards_reused else ""
    shards = "1 shard" if result.shards == 1 else f"{result.shards} shards"
    if isinstance(result.out, str):  # an object store: no holes, and the bytes that crossed the network
        stats = result.stats
        return (
            f"shardsurgeon: {plan.layers_in} -> {plan.output_layers} layers, {result.tensors} tensors, "
            f"{shards}{reused}, {format_bytes(result.written)} written ({format_bytes(stats.server_copied)} copied "
            f"by the server, {format_bytes(stats.sent)} sent{fetched(result)}), {result.seconds:.1f} s -> {result.out}"
        )
    return (
        f"shardsurgeon: {plan.layers_in} -> {plan.output_layers} layers, {result.tensors} tensors, "
        f"{shards}{reused}, {format_bytes(result.written)} written ({bytes_by_kind(result)}), "
        f"{format_bytes(result.holes)} left as holes{fetched(result)}, {result.seconds:.1f} s -> {result.out}"
    )


def fetched(result: RunResult) -> str:
    """Tensor bytes read from sources by URL, when there are any."""
    return f", {format_bytes(result.stats.fetched)} fetched by URL" if result.stats.fetched else ""


def bytes_by_kind(result: RunResult) -> str:
    """Shared as the filesystem reports it; where it cannot tell, what the kernel could have cloned."""
    stats = result.stats
    shared, kind = (
        (stats.copies.aligned_kernel_bytes, "clone-eligible")
        if stats.shared is None
        else (stats.shared, "shared with the source")
    )
    return (
        f"{format_bytes(shared)} {kind}, {format_bytes(max(0, stats.copied - shared))} copied, "
        f"{format_bytes(stats.converted)} converted"
    )


def report_fetched(checkpoints: list[Checkpoint]) -> None:
    """For each checkpoint read by URL, what opening it fetched, on stderr."""
    for checkpoint in checkpoints:
        if isinstance(checkpoint.folder, str):
            click.echo(
                f"fetched {format_bytes(checkpoint.fetched_nbytes)} from {safe_text(checkpoint.folder)}", err=True
            )
