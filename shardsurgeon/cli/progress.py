"""A run's progress in words: the line a log gets every few seconds while a checkpoint is written.

Pure: the caller reads the clock and passes the time in. A :class:`Tally` is where a run is;
:func:`begin_shard` and :func:`advance` return the next one (``advance`` with the line that is
due, if any); :func:`progress_line` formats a line. The CLI feeds them from the library's callbacks
and prints the lines when stderr is not a terminal (a cloud job's log), where a bar would be noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shardsurgeon import format_bytes

LINE_INTERVAL_SECONDS = 5.0
"""Often enough that a long job's log shows it moving; rare enough that a 20-minute job logs a few hundred lines."""


@dataclass(frozen=True, slots=True)
class Tally:
    """Bytes done of ``total``; the shard being written and the count at which its bytes are all done;
    the time and count the rate is measured from; when the run started and when it last gave a line."""

    total: int
    started: float
    last_line: float
    done: int = 0
    shard: str | None = None
    shard_end: int = 0
    rate_origin: tuple[float, int] | None = None

    def rate(self, now: float) -> float | None:
        """Bytes per second since the first shard began, or None before there is one to tell."""
        if self.rate_origin is None:
            return None
        since, done = self.rate_origin
        return (self.done - done) / (now - since) if now > since else None


def start_tally(total: int, now: float) -> Tally:
    return Tally(total, now, now)


def begin_shard(tally: Tally, name: str, nbytes: int, now: float) -> Tally:
    """Writing shard ``name`` of ``nbytes`` tensor bytes begins.

    The rate is measured from the first shard written: shards kept from an earlier run are
    counted as done before it, in no time, and would make the rate a fiction.
    """
    origin = tally.rate_origin or (now, tally.done)
    return replace(tally, shard=name, shard_end=tally.done + nbytes, rate_origin=origin)


def advance(tally: Tally, nbytes: int, now: float, interval: float = LINE_INTERVAL_SECONDS) -> tuple[Tally, str | None]:
    """``nbytes`` more are done: the new tally, and a line when one is due.

    A line is due ``interval`` seconds after the last (or after the start), and when a shard's
    bytes are all done once the run has lasted ``interval``: a long run's log shows every shard,
    a short one's shows only the summary the CLI prints at the end.
    """
    shard_done = tally.shard is not None and tally.done < tally.shard_end <= tally.done + nbytes
    tally = replace(tally, done=tally.done + nbytes)
    due = now - tally.last_line >= interval or (shard_done and now - tally.started >= interval)
    if not due or tally.shard is None:
        return tally, None
    return replace(tally, last_line=now), progress_line(tally.shard, tally.done, tally.total, tally.rate(now))


def progress_line(shard: str, done: int, total: int, rate: float | None) -> str:
    """``writing model-00003-of-00009.safetensors: 4.21 GB of 17.10 GB (24%), 812 MB/s, 16 s left``."""
    return f"writing {shard}: {figures(done, total, rate)}"


def figures(done: int, total: int, rate: float | None) -> str:
    """Bytes done of total, percent (100 only when all are done), and the rate and time left when known."""
    percent = done * 100 // total if total else 100
    text = f"{format_bytes(done)} of {format_bytes(total)} ({percent}%)"
    if rate:
        text += f", {format_rate(rate)}"
        if done < total:
            text += f", {format_duration((total - done) / rate)} left"
    return text


def format_rate(bytes_per_second: float) -> str:
    """Three significant figures in decimal units: ``812 MB/s``, ``1.23 GB/s``."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if bytes_per_second >= size:
            value = bytes_per_second / size
            return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}/s"
    return f"{bytes_per_second:.0f} B/s"


def format_duration(seconds: float) -> str:
    """Rounded up, so that "0 s left" is never said of work still to do: ``16 s``, ``3 min 20 s``, ``2 h 3 min``."""
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
