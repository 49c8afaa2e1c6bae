"""Progress in words: the pure formatter and line rule with fake times, then the CLI on a non-terminal."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from conftest import write_tiny_checkpoint

from shardsurgeon import cli as cli_module
from shardsurgeon.cli.progress import (
    Tally,
    advance,
    begin_shard,
    format_duration,
    format_rate,
    progress_line,
    start_tally,
)

GB = 10**9


def test_the_line_names_the_shard_bytes_rate_and_time_left():
    line = progress_line("model-00003-of-00009.safetensors", 4_210_000_000, 17_100_000_000, 812e6)
    assert line == "writing model-00003-of-00009.safetensors: 4.21 GB of 17.10 GB (24%), 812 MB/s, 16 s left"


@pytest.mark.parametrize(
    ("done", "rate", "line"),
    [
        (0, None, "writing s: 0 B of 10.00 GB (0%)"),
        (GB, 0.0, "writing s: 1.00 GB of 10.00 GB (10%)"),
        (9_999_999_999, 1e9, "writing s: 10.00 GB of 10.00 GB (99%), 1.00 GB/s, 1 s left"),
        (10 * GB, 1e9, "writing s: 10.00 GB of 10.00 GB (100%), 1.00 GB/s"),
    ],
)
def test_line_before_a_rate_is_known_and_at_the_end(done, rate, line):
    assert progress_line("s", done, 10 * GB, rate) == line


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "1 s"), (59.0, "59 s"), (59.5, "1 min 0 s"), (200, "3 min 20 s"), (3600, "1 h 0 min"), (7385, "2 h 3 min")],
)
def test_durations_round_up(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("rate", "text"), [(812e6, "812 MB/s"), (1.234e9, "1.23 GB/s"), (45.6e6, "45.6 MB/s"), (999, "999 B/s")]
)
def test_rates_in_three_figures(rate, text):
    assert format_rate(rate) == text


def feed(tally: Tally, events, interval: float = 5.0) -> list[tuple[float, str]]:
    """Run ``(time, shard name and bytes | byte count)`` events; the lines printed, with their times."""
    lines = []
    for now, event in events:
        if isinstance(event, tuple):
            tally = begin_shard(tally, *event, now)
            continue
        tally, line = advance(tally, event, now, interval)
        if line is not None:
            lines.append((now, line))
    return lines


def test_a_line_every_interval_and_at_each_shard_end_once_the_run_is_long():
    tally = start_tally(total=4 * GB, now=100.0)
    events = [(100.0, ("a", 2 * GB))]
    events += [(100.0 + second, GB // 4) for second in range(1, 9)]  # shard a: 250 MB/s, done at 108 s
    events += [(108.0, ("b", 2 * GB))]
    events += [(108.0 + second, GB // 2) for second in range(1, 5)]  # shard b: 500 MB/s
    lines = feed(tally, events)
    assert lines == [
        (105.0, "writing a: 1.25 GB of 4.00 GB (31%), 250 MB/s, 11 s left"),
        (108.0, "writing a: 2.00 GB of 4.00 GB (50%), 250 MB/s, 8 s left"),
        (112.0, "writing b: 4.00 GB of 4.00 GB (100%), 333 MB/s"),
    ]


def test_a_short_run_prints_nothing():
    """Under one interval no line is due, not even at a shard's end: the summary says it all."""
    tally = start_tally(total=2 * GB, now=0.0)
    events = [(0.0, ("a", GB)), (1.0, GB), (1.0, ("b", GB)), (4.9, GB)]
    assert feed(tally, events) == []


def test_shards_kept_from_an_interrupted_run_count_as_done_but_not_in_the_rate():
    tally = start_tally(total=4 * GB, now=0.0)
    events = [(0.0, 3 * GB), (0.5, ("d", GB)), (5.5, GB // 2), (10.5, GB // 2)]
    assert feed(tally, events) == [
        (5.5, "writing d: 3.50 GB of 4.00 GB (87%), 100 MB/s, 5 s left"),
        (10.5, "writing d: 4.00 GB of 4.00 GB (100%), 100 MB/s"),
    ]


def test_interval_is_a_parameter():
    tally = start_tally(total=2 * GB, now=0.0)
    events = [(0.0, ("a", 2 * GB)), (1.0, GB), (2.0, GB)]
    assert [now for now, _ in feed(tally, events, interval=1.0)] == [1.0, 2.0]


LINE = re.compile(
    r"^writing (model-0000[1-9]-of-0000[1-9]\.safetensors): [0-9.]+ kB of [0-9.]+ kB \(([0-9]+)%\), [0-9.]+ "
    r"[kMG]?B/s(, [0-9]+ (s|min [0-9]+ s) left)?$"
)


@pytest.fixture
def source(tmp_path):
    write_tiny_checkpoint(tmp_path / "src", layers=4, shards=2, hidden=32, intermediate=64, kv=16, vocab=32)
    return tmp_path / "src"


def expand(source, out, *extra):
    args = ["expand", "--src", source, "--dup", "3x2", "--zero", "o_proj", "--max-shard-size", "20KB"]
    return CliRunner().invoke(cli_module.cli, [str(a) for a in [*args, "--out", out, *extra]], catch_exceptions=False)


def test_a_log_gets_lines_while_a_long_run_writes(tmp_path, source, monkeypatch):
    """The CLI on a non-terminal stderr (click's runner), with a clock that makes every reading two seconds
    later (copies of neighbouring tensors are one range, reported in a few pieces)."""
    readings = iter(range(0, 2 * 10**6, 2))
    monkeypatch.setattr(cli_module.show, "monotonic", lambda: float(next(readings)))
    result = expand(source, tmp_path / "out")
    assert result.exit_code == 0, result.output
    *lines, summary = result.stderr.splitlines()
    assert summary.startswith("shardsurgeon: 4 -> 6 layers")
    assert lines and result.stdout == ""
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert [m[1] for m in parsed] == sorted(m[1] for m in parsed), "shards in order"
    assert set(shards) <= {m[1] for m in parsed}, "every shard's end is a line once the run is long"
    assert [int(m[2]) for m in parsed] == sorted(int(m[2]) for m in parsed)
    assert parsed[-1][1] == shards[-1] and parsed[-1][2] == "100" and " left" not in lines[-1]


def test_a_quick_run_prints_only_its_summary_and_quiet_nothing(tmp_path, source):
    result = expand(source, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("shardsurgeon: 4 -> 6 layers")
    quiet = expand(source, tmp_path / "out2", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_quiet_silences_the_lines_of_a_long_run(tmp_path, source, monkeypatch):
    readings = iter(range(10**6))
    monkeypatch.setattr(cli_module.show, "monotonic", lambda: float(next(readings)))
    result = expand(source, tmp_path / "out", "-q")
    assert result.exit_code == 0 and result.output == ""
