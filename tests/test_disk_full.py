"""A real full disk and a real read-only destination, on small tmpfs mounts the tests make.

Mounting needs root (or CAP_SYS_ADMIN); elsewhere these tests are skipped with that reason. The
source always lives outside the mount, on the test's ordinary temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import folder_bytes, run_cli, write_tiny_checkpoint

from shardsurgeon.write.local import destination as output

RECIPE = ["--dup", "7x1", "--max-shard-size", "300KB"]
"""About 2.6 MB in ten shards: more than the 2 MiB disk below holds."""

Mount = Callable[[str, str], Path]


@pytest.fixture
def mount_tmpfs(tmp_path) -> Iterator[Mount]:
    """Mounts a tmpfs with the options given at ``tmp_path / name``; unmounts it afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a small filesystem to fill")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip()}); run as root to test a real full disk")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def source(tmp_path) -> Path:
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=8, shards=2, hidden=128, intermediate=256, kv=64, vocab=64)
    return src


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def expand_in(monkeypatch, cwd: Path, src: Path, *extra: str):
    """Run ``expand ... --out out`` from ``cwd``, so the recorded command is the same everywhere."""
    monkeypatch.chdir(cwd)
    return run_cli("expand", "--src", src, *RECIPE, "--out", "out", *extra)


def test_not_enough_room_is_refused_up_front_with_the_figures(mount_tmpfs, source, monkeypatch):
    disk = mount_tmpfs("disk", "size=2m")
    before = folder_bytes(source)
    result = expand_in(monkeypatch, disk, source)
    assert result.exit_code == 1
    message = one_line(result.output)
    assert re.fullmatch(
        f"shardsurgeon: error: {re.escape(str(disk))}: needs 6[0-9].[0-9][0-9] MB for the files still to write "
        r"but only 2.[0-9][0-9] MB is free; free some space or write elsewhere with --out",
        message,
    ), message
    assert folder_bytes(source) == before
    assert list(disk.iterdir()) == [], "nothing left behind"


def test_disk_filling_up_while_writing_then_resume_after_freeing_space(tmp_path, mount_tmpfs, source, monkeypatch):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    assert expand_in(monkeypatch, reference_dir, source, "-q").exit_code == 0
    reference = folder_bytes(reference_dir / "out")
    before = folder_bytes(source)

    disk = mount_tmpfs("disk", "size=2m")
    monkeypatch.setattr(output, "check_room", lambda staging, needed: None)  # the free space "lied"
    result = expand_in(monkeypatch, disk, source)
    assert result.exit_code == 1
    message = one_line(result.output)
    staging = disk / ".out.shardsurgeon-partial"
    assert message.startswith("shardsurgeon: error: .out.shardsurgeon-partial/model-0000"), "--out as given"
    assert re.search(  # the shard being written: NAME.HOST-PID.partial, its writer's own file
        r"\.safetensors\.[^ /]+\.partial: no space left on device; free some space and run the same command "
        r"again, completed shards will be kept$",
        message,
    ), message
    assert sorted(p.name for p in disk.iterdir()) == [staging.name], "no output under the output name"
    assert folder_bytes(source) == before
    completed = [p for p in staging.iterdir() if p.name.endswith(".safetensors")]
    assert len(completed) >= 3

    monkeypatch.undo()
    subprocess.run(["mount", "-o", "remount,size=100m", str(disk)], check=True)
    result = expand_in(monkeypatch, disk, source)
    assert result.exit_code == 0, result.output
    assert f"({len(completed)} kept from an earlier run)" in result.output
    assert folder_bytes(disk / "out") == reference
    assert sorted(p.name for p in disk.iterdir()) == ["out"]
    assert folder_bytes(source) == before


def test_disk_full_after_the_shards_while_writing_the_small_files(tmp_path, mount_tmpfs, source, monkeypatch):
    """The shards fit exactly; config.json, the index or the model card do not."""
    disk = mount_tmpfs("disk", "size=80m")  # room for the shards and the small files allowance
    assert expand_in(monkeypatch, disk, source, "-q").exit_code == 0
    shard_bytes = sum(p.stat().st_blocks * 512 for p in (disk / "out").glob("*.safetensors"))
    reference = folder_bytes(disk / "out")
    shutil.rmtree(disk / "out")

    def leave_room_for_the_shards_only(staging: Path, needed: int) -> None:
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, output.free_bytes(staging) - shard_bytes)

    monkeypatch.setattr(output, "check_room", leave_room_for_the_shards_only)
    result = expand_in(monkeypatch, disk, source)
    assert result.exit_code == 1
    message = one_line(result.output)
    assert message == (
        "shardsurgeon: error: .out.shardsurgeon-partial: cannot write config.json: No space left on device; "
        "fix that and run the same command again, the shards written are kept"
    )
    assert not (disk / "out").exists()

    monkeypatch.undo()
    (disk / "filler").unlink()
    result = expand_in(monkeypatch, disk, source)
    assert result.exit_code == 0, result.output
    assert "(10 kept from an earlier run), 0 B written" in result.output
    assert folder_bytes(disk / "out") == reference


def test_read_only_destination(tmp_path, mount_tmpfs, source, monkeypatch):
    readonly = mount_tmpfs("readonly", "size=1m,ro")
    before = folder_bytes(source)
    result = expand_in(monkeypatch, readonly, source)
    assert result.exit_code == 1
    message = one_line(result.output)
    assert message == (
        "shardsurgeon: error: --out out: cannot create the lock file .out.shardsurgeon-lock: Read-only file system"
    )
    assert list(readonly.iterdir()) == []
    assert folder_bytes(source) == before
    nested = run_cli("expand", "--src", source, *RECIPE, "--out", readonly / "a" / "b")
    assert nested.exit_code == 1
    assert "Read-only file system" in one_line(nested.output)
