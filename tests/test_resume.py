"""Crash safety: a real ``python -m shardsurgeon expand`` killed with SIGKILL at chosen points.

The run kills itself through the wrapper ``_killable.py``, which hooks the progress callback from
outside the library: once N bytes of tensor data are done, or N = total + 1 for the point just
before the final rename. After each kill the output name does not exist (or still holds the
old folder), and running the same command again resumes, keeps exactly the shards completed before
the kill, and gives files byte-identical to an uninterrupted run. Leftovers of another recipe or of
another source are never reused.

The runs work on tmpfs (``/dev/shm``) when there is one, see ``_scratch``.

Every run uses ``--out out`` relative to its own working folder, so the command line recorded in the
model card, and so every output file, is the same for the crashed and for the reference run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _scratch import scratch_folder
from conftest import folder_bytes, read_tensors, write_tiny_checkpoint

from shardsurgeon import PARTIAL_SUFFIX
from shardsurgeon import RESUME_NAME as RESUME_FILE

RECIPE = ["--dup", "5x2", "--zero", "o_proj,down_proj", "--max-shard-size", "100KB"]
OTHER_RECIPE = ["--dup", "2x1,4x1", "--zero", "mlp", "--max-shard-size", "100KB"]
STAGING = ".out.shardsurgeon-partial"
LOCK = ".out.shardsurgeon-lock"
"""Left by a killed run (a lock no process holds any more); the next run takes it and removes it."""
KILLABLE = Path(__file__).with_name("_killable.py")


def make_source(folder: Path) -> None:
    """Six layers of about 70 kB, so the recipes above write 6 to 8 shards of a few tensors each."""
    write_tiny_checkpoint(folder, layers=6, shards=2, hidden=64, intermediate=128, kv=32, vocab=32)


def expand(cwd: Path, src: Path, recipe: list[str], *extra: str, kill_after: int | str | None = None):
    cwd.mkdir(exist_ok=True)
    runner = ["-m", "shardsurgeon"] if kill_after is None else [str(KILLABLE), str(kill_after)]
    command = [sys.executable, *runner, "expand", "--src", str(src), *recipe, "--out", "out", *extra]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its files, and its shards in order with their tensor bytes."""

    files: dict[str, bytes]
    shards: list[tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(nbytes for _, nbytes in self.shards)

    def before(self, count: int) -> int:
        """Tensor bytes of the first ``count`` shards."""
        return sum(nbytes for _, nbytes in self.shards[:count])


def reference_run(cwd: Path, src: Path, recipe: list[str]) -> Reference:
    result = expand(cwd, src, recipe, "-q")
    assert result.returncode == 0, result.stderr
    out = cwd / "out"
    sizes: dict[str, int] = {}
    for _, _, blob, shard, _ in read_tensors(out).values():
        sizes[shard] = sizes.get(shard, 0) + len(blob)
    return Reference(folder_bytes(out), sorted(sizes.items()))


@pytest.fixture
def scratch(tmp_path) -> Iterator[Path]:
    with scratch_folder(tmp_path) as folder:
        yield folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Iterator[tuple[Path, Reference]]:
    with scratch_folder(tmp_path_factory.mktemp("resume")) as root:
        make_source(root / "src")
        reference = reference_run(root / "reference", root / "src", RECIPE)
        assert len(reference.shards) >= 6, reference.shards
        yield root / "src", reference


def killed(cwd: Path, src: Path, recipe: list[str], kill_after: int, *extra: str) -> None:
    result = expand(cwd, src, recipe, *extra, kill_after=kill_after)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)


def resumed(cwd: Path, src: Path, recipe: list[str], *extra: str) -> str:
    """Run to completion; returns the summary line."""
    result = expand(cwd, src, recipe, *extra)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["out"], "nothing left beside the output"
    return result.stderr


def kept(summary: str) -> int:
    marker = " kept from an earlier run)"
    if marker not in summary:
        return 0
    return int(summary.split(marker)[0].rsplit("(", 1)[1])


def staging_names(cwd: Path) -> list[str]:
    return sorted(p.name for p in (cwd / STAGING).iterdir())


@pytest.mark.parametrize(
    ("point", "shards_done"),
    [
        ("first tensor", 0),
        ("middle of shard 2", 1),
        ("last tensor of shard 3", 2),
        ("first tensor of shard 4", 3),
        ("last tensor of the last shard", None),
        ("before the final rename", None),
    ],
)
def test_killed_run_leaves_no_output_and_resumes_byte_identical(scratch, source, point, shards_done):
    src, reference = source
    count = len(reference.shards)
    kill_after = {
        "first tensor": 1,
        "middle of shard 2": reference.before(1) + reference.shards[1][1] // 2,
        "last tensor of shard 3": reference.before(3),
        "first tensor of shard 4": reference.before(3) + 1,
        "last tensor of the last shard": reference.total,
        "before the final rename": reference.total + 1,
    }[point]
    if shards_done is None:
        shards_done = count - 1 if point == "last tensor of the last shard" else count
    run = scratch / "run"
    killed(run, src, RECIPE, kill_after)
    assert sorted(p.name for p in run.iterdir()) == [LOCK, STAGING], "the output name does not exist"
    complete = [name for name, _ in reference.shards[:shards_done]]
    if shards_done < count:  # the shard in progress is NAME.HOST-PID.partial: its writer's own file
        names = staging_names(run)
        partial = [name for name in names if name.endswith(PARTIAL_SUFFIX)]
        assert len(partial) == 1 and partial[0].startswith(reference.shards[shards_done][0] + "."), names
        assert sorted(set(names) - set(partial)) == sorted([RESUME_FILE, *complete])
    else:
        assert set(staging_names(run)) == {RESUME_FILE, *reference.files}, "all written, not yet moved"
    summary = resumed(run, src, RECIPE)
    assert kept(summary) == shards_done, summary
    assert folder_bytes(run / "out") == reference.files


def test_killed_twice_then_resumed(scratch, source):
    src, reference = source
    run = scratch / "run"
    killed(run, src, RECIPE, reference.before(2) + 1)
    killed(run, src, RECIPE, reference.before(5) + 1)  # counts the two kept shards' bytes too
    summary = resumed(run, src, RECIPE)
    assert kept(summary) == 5
    assert folder_bytes(run / "out") == reference.files


def test_a_different_recipe_after_a_killed_run_reuses_nothing(scratch, source):
    src, _ = source
    other = reference_run(scratch / "reference", src, OTHER_RECIPE)
    run = scratch / "run"
    killed(run, src, RECIPE, 400_000)
    assert len([n for n in staging_names(run) if n.endswith(".safetensors")]) >= 3
    summary = resumed(run, src, OTHER_RECIPE)
    assert kept(summary) == 0, summary
    assert folder_bytes(run / "out") == other.files
    (run / "out").rename(scratch / "other")
    killed(run, src, OTHER_RECIPE, other.before(3) + 1)
    summary = resumed(run, src, RECIPE, "-q")
    assert folder_bytes(run / "out") == source[1].files


def test_killed_run_with_force_keeps_the_old_output(scratch, source):
    src, reference = source
    run = scratch / "run"
    assert expand(run, src, OTHER_RECIPE, "-q").returncode == 0
    old = folder_bytes(run / "out")
    for point in (reference.before(2) + 1, reference.total + 1):
        killed(run, src, RECIPE, point, "--force")
        assert sorted(p.name for p in run.iterdir()) == [LOCK, STAGING, "out"]
        assert folder_bytes(run / "out") == old, "the old output is untouched until the final rename"
    summary = resumed(run, src, RECIPE, "--force")
    assert kept(summary) == len(reference.shards)
    assert folder_bytes(run / "out") == reference.files


def test_staging_from_another_source_folder_with_the_same_shapes_is_not_reused(scratch, source):
    src, _ = source
    twin = scratch / "twin"
    make_source(twin)
    scramble(twin)
    twin_reference = reference_run(scratch / "reference", twin, RECIPE)
    run = scratch / "run"
    killed(run, src, RECIPE, 400_000)
    summary = resumed(run, twin, RECIPE)
    assert kept(summary) == 0, summary
    assert folder_bytes(run / "out") == twin_reference.files


def test_source_rewritten_in_place_with_its_old_mtime_is_not_reused(scratch):
    """Same path, same size, same mtime, same shapes, other bytes (``cp -p``, ``rsync -t``)."""
    src = scratch / "src"
    make_source(src)
    run = scratch / "run"
    killed(run, src, RECIPE, 400_000)
    stats = {p: p.stat() for p in src.iterdir()}
    scramble(src)
    for path, stat in stats.items():
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    summary = resumed(run, src, RECIPE)
    assert kept(summary) == 0, summary
    reference = reference_run(scratch / "reference", src, RECIPE)
    assert folder_bytes(run / "out") == reference.files


def scramble(folder: Path) -> None:
    """Change every data byte of every shard in place, headers kept."""
    for path in folder.glob("*.safetensors"):
        blob = bytearray(path.read_bytes())
        header_end = 8 + int.from_bytes(blob[:8], "little")
        blob[header_end:] = bytes(b ^ 0x11 for b in blob[header_end:])
        with open(path, "r+b") as f:
            f.write(blob)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "header byte", "wrong size"],
)
def test_damaged_completed_shard_is_rewritten_not_trusted(scratch, source, damage):
    src, reference = source
    run = scratch / "run"
    killed(run, src, RECIPE, reference.before(3) + 1)
    shard = run / STAGING / reference.shards[1][0]
    blob = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(blob[: len(blob) // 2])
    elif damage == "header byte":
        at = blob.index(b'"format"')
        shard.write_bytes(blob[:at] + b"'" + blob[at + 1 :])
    else:
        shard.write_bytes(blob + b"\0")
    summary = resumed(run, src, RECIPE)
    assert kept(summary) == 2, summary
    assert folder_bytes(run / "out") == reference.files


def test_staging_of_another_output_is_left_alone(scratch, source):
    """Unrelated folders are left alone: resume state lives only in the output's own sibling."""
    src, reference = source
    run = scratch / "run"
    killed(run, src, RECIPE, reference.before(2) + 1)
    other = scratch / "elsewhere"
    assert expand(other, src, RECIPE, "-q").returncode == 0
    assert folder_bytes(other / "out") == reference.files
    assert (run / STAGING).is_dir(), "another output's staging folder is not touched"
    assert kept(resumed(run, src, RECIPE)) == 2


def test_ctrl_c_stops_with_one_line_and_resumes(scratch, source):
    src, reference = source
    run = scratch / "run"
    result = expand(run, src, RECIPE, kill_after=f"{reference.before(2) + 1}:SIGINT")
    assert result.returncode == 130, result.stderr
    assert result.stderr == "shardsurgeon: interrupted; run the same command again to resume\n"
    assert sorted(p.name for p in run.iterdir()) == [STAGING]
    assert kept(resumed(run, src, RECIPE)) == 2
    assert folder_bytes(run / "out") == reference.files


def test_a_ctrl_c_that_arrives_while_a_cast_drains_its_writes_stops_the_run(tmp_path, monkeypatch):
    """Casts are written by a thread of their own, which the run waits for at the end of each
    shard; a Ctrl-C that lands in that wait (here: the wait's first call raises it, as the signal
    would) is kept and stops the run once the thread is done, never swallowed (CI saw a run that
    exited 0 after its Ctrl-C)."""
    import concurrent.futures

    from shardsurgeon import WriteOptions, api

    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=2, shards=1, hidden=256, intermediate=512, kv=64, vocab=300)
    job = api.plan_expand(src, dups=[(1, 1)], dtype="float16")
    real_wait, interrupted = concurrent.futures.wait, []

    def wait(*args, **kwargs):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, tmp_path / "out", command="expand", options=WriteOptions())
    assert interrupted and not (tmp_path / "out").exists()
