"""Who writes the shards of one output: this process, several processes, or tasks elsewhere.

A runner is given the shards to write and a :class:`~shardsurgeon.write.destination.ShardTarget`
(where they go: a staging folder, an S3 folder), and hands each of its processes a share to write
there. Every target makes a shard appear whole or not at all, so runners need no coordination
beyond the disjoint lists they are given (and two writers of one shard write the same bytes). The
bytes of a shard do not depend on the runner: the layout fixed them. Runners report progress in
bytes, and each shard as it begins.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from shardsurgeon.errors import RecipeError
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.units import Progress
from shardsurgeon.write.destination import ShardBegins, ShardTarget
from shardsurgeon.write.executor import ShardStats


class Runner(Protocol):
    def run(
        self, shards: Sequence[ShardLayout], target: ShardTarget, progress: Progress, begins: ShardBegins
    ) -> ShardStats: ...


@dataclass(frozen=True, slots=True)
class InProcess:
    """One writer, here."""

    def run(
        self, shards: Sequence[ShardLayout], target: ShardTarget, progress: Progress, begins: ShardBegins
    ) -> ShardStats:
        return target.write(shards, progress, begins)


def balanced_groups(shards: Sequence[ShardLayout], count: int) -> list[list[ShardLayout]]:
    """``shards`` dealt into at most ``count`` groups of about equal bytes: largest first, each to the
    lightest group so far (ties to the lowest number), then each group in layout order. Deterministic."""
    count = max(1, min(count, len(shards)))
    loads = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    order = sorted(range(len(shards)), key=lambda i: (-shards[i].nbytes, i))
    for index in order:
        lightest = min(range(count), key=lambda g: (loads[g], g))
        loads[lightest] += shards[index].nbytes
        members[lightest].append(index)
    return [[shards[i] for i in sorted(group)] for group in members if group]


@dataclass(frozen=True, slots=True)
class Processes:
    """``jobs`` writer processes on this machine, each with its own share of the shards."""

    jobs: int

    def run(
        self, shards: Sequence[ShardLayout], target: ShardTarget, progress: Progress, begins: ShardBegins
    ) -> ShardStats:
        groups = balanced_groups(shards, self.jobs)
        if len(groups) <= 1:
            return target.write(shards, progress, begins)
        context = multiprocessing.get_context("spawn")  # no fork of a process that has threads
        events: Any = context.Queue()
        by_name = {shard.name: shard for shard in shards}
        relay = threading.Thread(target=_relay, args=(events, progress, begins, by_name), daemon=True)
        relay.start()
        total = ShardStats()
        try:
            with ProcessPoolExecutor(
                len(groups), mp_context=context, initializer=_child_init, initargs=(events, os.getpid())
            ) as pool:
                futures = [pool.submit(_child_write, group, target) for group in groups]
                for future in as_completed(futures):
                    total += future.result()
        finally:
            events.put(None)
            relay.join()
        return total


_events: Any = None


def _child_init(events: Any, parent: int) -> None:
    global _events  # the one queue of this worker process, set once when it starts
    _events = events
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the run that started this writer dies (``kill -9``, the OOM killer),
    rather than write on unseen beside its rerun."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _child_write(shards: Sequence[ShardLayout], target: ShardTarget) -> ShardStats:
    pending = 0

    def progress(nbytes: int) -> None:
        nonlocal pending
        pending += nbytes
        if pending >= 16 << 20:  # batched: a queue message per 16 MiB, not per chunk
            _events.put(("bytes", pending))
            pending = 0

    def begins(shard: ShardLayout) -> None:
        _events.put(("shard", shard.name))

    try:
        return target.write(shards, progress, begins)
    finally:
        if pending:
            _events.put(("bytes", pending))


def _relay(events: Any, progress: Progress, begins: ShardBegins, by_name: dict[str, ShardLayout]) -> None:
    """Hand the children's reports to this process's callbacks, until ``None``."""
    while True:
        try:
            event = events.get()
        except (EOFError, OSError, queue.Empty):
            return
        if event is None:
            return
        kind, value = event
        if kind == "bytes":
            progress(value)
        else:
            begins(by_name[value])


def select_shards(spec: str, shards: Sequence[ShardLayout]) -> list[ShardLayout]:
    """The shards ``--shards`` names: ``K/N`` (the K-th of N runs of consecutive shards of about
    equal bytes, so N writers given 1/N .. N/N cover every shard once) or numbers and ranges from 1,
    such as ``1,3,5-7``."""
    text = spec.strip()
    count = len(shards)
    if "/" in text:
        part, _, parts = text.partition("/")
        if not (part.isdecimal() and parts.isdecimal() and len(part) < 7 and len(parts) < 7):
            raise RecipeError(f"--shards {_shown(spec)}: expected K/N with 1 <= K <= N, such as 2/8")
        k, n = int(part), int(parts)
        if not 1 <= k <= n:
            raise RecipeError(f"--shards {_shown(spec)}: expected K/N with 1 <= K <= N, found K={k}, N={n}")
        total = sum(s.nbytes for s in shards) or 1
        chosen, start = [], 0
        for shard in shards:
            if min(n - 1, (2 * start + shard.nbytes) * n // (2 * total)) == k - 1:  # by its middle byte
                chosen.append(shard)
            start += shard.nbytes
        return chosen
    numbers: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not first.isdecimal() or (dash and not last.isdecimal()) or len(first) > 6 or len(last) > 6:
            raise RecipeError(f"--shards {_shown(spec)}: expected K/N, or shard numbers and ranges such as 1,3,5-7")
        low, high = int(first), int(last) if dash else int(first)
        if not 1 <= low <= high <= count:
            raise RecipeError(f"--shards {_shown(spec)}: shards are numbered 1 to {count}, found {item.strip()}")
        numbers.update(range(low, high + 1))
    return [shard for number, shard in enumerate(shards, start=1) if number in numbers]


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")
