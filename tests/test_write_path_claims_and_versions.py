"""A second red-team pass on the one write path (write/run.py and its destinations): the fixes of the
first pass (tests/test_write_path_sources_and_names.py) and what is near them. Each finding was a strict xfail
asserting the promised behaviour, its reason naming what breaks and where; attacks that held are
plain tests.

Promises attacked: a published checkpoint holds exactly the planned bytes; the source is never
modified, deleted or overwritten, and nothing is written inside it; an interrupted run leaves no
half-written output and resumes byte-identically; errors are one line; of two runs racing to one
output at most one publishes, and writers and runs or finalizes exclude each other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SMALL_SHAPE, objects, server_with_a_model
from _servers import upload_folder
from click.testing import CliRunner, Result
from conftest import folder_bytes, write_tiny_checkpoint

from shardsurgeon.cli import cli

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")


# --- shared ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[Any, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("redteam-write-2"), SMALL_SHAPE) as served:
        yield served


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result: Result, status: int, *parts: str) -> None:
    assert result.exit_code == status, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("shardsurgeon: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "internal error" not in result.output, result.output
    for part in parts:
        assert part in result.output, result.output


LOCAL = ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "200KB")
"""A small job of four shards, where S3's part rules do not matter."""


def write_small(folder: Path) -> Path:
    write_tiny_checkpoint(folder, layers=3, shards=2, extra_files={"tokenizer_config.json": "{}"}, hidden=64,
                          intermediate=160, kv=16, vocab=300)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small(tmp_path_factory.mktemp("small") / "src")


@pytest.fixture
def local_src(tmp_path) -> Path:
    return write_small(tmp_path / "src")


def plan_of(src: Path | str, plan: Path, *flags: str) -> Path:
    result = run("expand", "--src", src, *(flags or LOCAL), "--plan-json", plan)
    assert result.exit_code == 0, result.output
    return plan


def reference(src: Path, out: Path, *flags: str) -> dict[str, bytes]:
    """What one uninterrupted local run writes (the card names the output's folder name)."""
    result = run("expand", "--src", src, *(flags or LOCAL), "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return folder_bytes(out)


# --- 1. the source: an S3 output inside a source folder reached some other way -------------------


def test_an_s3_output_inside_a_source_read_through_the_stores_filer_writes_nothing_there(s3, server, small):
    """As a local ``--out SRC/inside`` is refused, so is the same place named as an S3 folder when the
    source is read through the store's filer: the objects of the folders above the output hold the
    source files' bytes (the size and ETag or header the first pass already compares)."""
    weed = server[0]
    upload_folder(weed.endpoint, "models", "filerin", small)
    before = objects(s3, "models", "filerin/")
    url = f"http://127.0.0.1:{weed.ports['filer']}/buckets/models/filerin/"
    result = run("expand", "--src", url, *LOCAL, "--out", "s3://models/filerin/inside", "-q")
    after = objects(s3, "models", "filerin/")
    assert sorted(after) == sorted(before), result.output
    one_line_error(result, 2)


def test_an_s3_output_inside_a_source_read_through_a_fuse_mount_writes_nothing_there(s3, server, small, tmp_path):
    """mountpoint-s3, s3fs or goofys users read the model from the mount and write the new one to the
    bucket: ``--out /mnt/b/m/inside`` is refused as inside the source, ``s3://b/m/inside`` is not."""
    from test_write_path_sources_and_names import weed_mount

    weed = server[0]
    upload_folder(weed.endpoint, "models", "fusedin", small)
    before = objects(s3, "models", "fusedin/")
    with weed_mount(weed, "models", tmp_path / "mnt") as mounted:
        local = run("expand", "--src", mounted / "fusedin", *LOCAL, "--out", mounted / "fusedin" / "inside", "-q")
        one_line_error(local, 2, "inside")
        result = run("expand", "--src", mounted / "fusedin", *LOCAL, "--out", "s3://models/fusedin/inside", "-q")
    after = objects(s3, "models", "fusedin/")
    assert sorted(after) == sorted(before), result.output
    one_line_error(result, 2)


# --- 2. S3 claims: a writer beside a run whose lock went stale while it was stopped ---------------


@contextlib.contextmanager
def held_in_prepare(monkeypatch: Any) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The first S3 area to reach ``prepare`` waits there until ``go`` (having set ``paused``): a run
    stopped between its claim and its first write, as by Ctrl-Z or a paused VM."""
    from shardsurgeon.write.s3 import destination

    real, paused, go, first = destination.S3Area.prepare, threading.Event(), threading.Event(), []

    def prepare(self, kept, todo, options):
        if not first:
            first.append(self)
            paused.set()
            assert go.wait(60)
        return real(self, kept, todo, options)

    monkeypatch.setattr(destination.S3Area, "prepare", prepare)
    try:
        yield paused, go
    finally:
        go.set()


def test_a_writer_and_a_run_whose_lock_went_stale_never_both_go_on(s3, tmp_path, local_src, monkeypatch):
    from shardsurgeon import load_plan_file, run_job
    from shardsurgeon.write.s3 import claim

    monkeypatch.setattr(claim, "LEASE_SECONDS", 3.0)  # two minutes, shortened: the run stays stopped past it
    monkeypatch.setattr(claim, "RENEW_SECONDS", 3600.0)  # a stopped process renews nothing
    plan = plan_of(local_src, tmp_path / "plan.json")
    job = load_plan_file(plan).job
    url = "s3://out/stalelock"
    outcome: list[BaseException | None] = []

    def whole_run() -> None:
        try:
            run_job(job, url, command="shardsurgeon expand")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    with held_in_prepare(monkeypatch) as (paused, go):
        thread = threading.Thread(target=whole_run)
        thread.start()
        assert paused.wait(60)
        time.sleep(4.5)  # the server's clock, in whole seconds, sees the lock older than the lease
        writer = run("apply", plan, url, "--shards", "1/2", "-q")
        go.set()
        thread.join(120)
    run_went_on = outcome == [None]
    assert not (writer.exit_code == 0 and run_went_on), (writer.output, outcome)


# --- 3. local locks where flock is missing: Windows, and filesystems that refuse it ----------------


def test_a_run_never_takes_the_output_while_a_writer_is_at_work(tmp_path, local_src):
    from shardsurgeon import WriteOptions, load_plan_file, run_job, select_shards, writer

    plan = plan_of(local_src, tmp_path / "plan.json")
    out = tmp_path / "out"
    job = load_plan_file(plan).job
    assert run("apply", plan, out, "--shards", "1/2", "-q").exit_code == 0
    names = [s.name for s in select_shards("2/2", job.layout.shards)]
    paused, go, errors = threading.Event(), threading.Event(), []

    def pause(nbytes: int) -> None:
        paused.set()
        go.wait(60)

    def write_second_half() -> None:
        try:
            options = WriteOptions(progress=pause)
            run_job(job, out, command="shardsurgeon expand", part=writer(names), options=options)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=write_second_half)
    thread.start()
    try:
        assert paused.wait(60)
        result = run("apply", plan, out)
    finally:
        go.set()
        thread.join(60)
    one_line_error(result, 1, "is writing")
    assert errors == [] and not out.exists()


def test_writers_are_refused_where_files_cannot_be_locked(tmp_path, local_src):
    """Where there is no shared lock (Windows, a filesystem without flock) nothing would keep a run
    or a finalize away from the writers of a plan: they are refused in one line, and the whole plan
    is written by one run as ever."""
    from _platforms import emulated

    plan = plan_of(local_src, tmp_path / "plan.json")
    out = tmp_path / "out"
    with emulated("windows"):
        one_line_error(run("apply", plan, out, "--shards", "1/2"), 1, "files cannot be locked there")
        assert not os.path.lexists(tmp_path / ".out.shardsurgeon-partial")
        assert run("apply", plan, out, "-q").exit_code == 0
    assert folder_bytes(out) == reference(local_src, tmp_path / "ref" / "out")


# --- 4. source versions on a filesystem whose times are whole seconds ----------------------------


@contextlib.contextmanager
def coarse_filesystem(image: Path, at: Path) -> Iterator[Path]:
    """An ext4 with 128-byte inodes (as ext3, and ext4 volumes made by old tools or for many small
    files, ``mkfs.ext4 -I 128``): its modification and change times are whole seconds. On a loop
    device this fixture attaches, detached by its name at exit."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("a loop-mounted ext4 needs root, mkfs.ext4 and losetup")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    attached = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if attached.returncode:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        at.mkdir(parents=True)
        if subprocess.run(["mount", device, str(at)], capture_output=True).returncode:
            pytest.skip("mounting the loop device is refused here")
        try:
            yield at
        finally:
            subprocess.run(["umount", str(at)], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes written over the old in the same file (as ``safetensors.save_file`` or ``cp`` do)."""
    with open(path, "r+b") as f:
        f.write(data)


def test_a_source_rewritten_in_the_second_of_its_version_is_never_mixed_into_an_s3_output(s3, tmp_path, small):
    from _s3kit import other_weights

    new = other_weights(small, tmp_path / "new")
    with coarse_filesystem(tmp_path / "ext4.img", tmp_path / "coarse") as mounted:
        for attempt in range(8):  # all of it within one second of the clock: again when a second turns
            while time.time() % 1 > 0.05:
                time.sleep(0.01)
            src, url = mounted / f"src{attempt}", f"s3://out/coarse{attempt}"
            shutil.copytree(small, src, copy_function=shutil.copyfile)  # written now, as a download is
            plan = plan_of(src, tmp_path / f"plan{attempt}.json")
            assert run("apply", plan, url, "--shards", "1/2", "-q").exit_code == 0
            for path in sorted(src.glob("*.safetensors")):
                rewrite_in_place(path, (new / path.name).read_bytes())
            if run("apply", plan, url, "--shards", "2/2", "-q").exit_code == 0:  # the change went unseen
                break
        else:
            pytest.skip("could not plan, write and rewrite within one second here")
        result = run("apply", plan, url, "--finalize", "-q")
    published = objects(s3, "out", f"coarse{attempt}/") if result.exit_code == 0 else {}
    want = reference(new, tmp_path / "ref" / f"coarse{attempt}")
    if published:
        assert [name for name in want if published.get(name) != want[name]] == [], result.output


# --- 5. source versions: an S3 ETag that is not a digest of the object's bytes now ---------------


def test_an_s3_source_rewritten_through_a_fuse_mount_is_never_mixed_into_the_output(s3, server, small, tmp_path):
    from _s3kit import other_weights
    from test_write_path_sources_and_names import weed_mount

    weed = server[0]
    new = other_weights(small, tmp_path / "new")
    upload_folder(weed.endpoint, "models", "inplace", small)
    plan = plan_of("s3://models/inplace", tmp_path / "plan.json")
    url = "s3://out/inplace"
    assert run("apply", plan, url, "--shards", "1/2", "-q").exit_code == 0
    with weed_mount(weed, "models", tmp_path / "mnt") as mounted:  # a training job saving through the mount
        for path in sorted(new.glob("*.safetensors")):
            rewrite_in_place(mounted / "inplace" / path.name, path.read_bytes())
    assert objects(s3, "models", "inplace/") == folder_bytes(new)
    results = [run("apply", plan, url, "--shards", "2/2", "-q"), run("apply", plan, url, "--finalize", "-q")]
    published = objects(s3, "out", "inplace/") if results[-1].exit_code == 0 else {}
    want = reference(new, tmp_path / "ref" / "inplace")
    assert [name for name in want if name in published and published[name] != want[name]] == [], results


# --- attacks that held ------------------------------------------------------------------------------


def test_a_writer_resumes_over_a_partial_file_of_its_own_name_left_by_a_killed_one(tmp_path, local_src):
    """In a container a restarted writer has the host name and pid of the one killed (pid 1 of the
    same pod): the NAME.HOST-PID.partial it left is its own name now, and is replaced, not refused."""
    from shardsurgeon import load_plan_file, select_shards
    from shardsurgeon.write.local.destination import worker_tag

    plan = plan_of(local_src, tmp_path / "plan.json")
    out = tmp_path / "out"
    assert run("apply", plan, out, "--shards", "1/2", "-q").exit_code == 0
    job = load_plan_file(plan).job
    staging = tmp_path / ".out.shardsurgeon-partial"
    for shard in select_shards("2/2", job.layout.shards):
        (staging / f"{shard.name}{worker_tag()}.partial").write_bytes(b"\0" * 1000)
    assert run("apply", plan, out, "--shards", "2/2", "-q").exit_code == 0
    assert run("apply", plan, out, "--finalize", "-q").exit_code == 0
    assert folder_bytes(out) == reference(local_src, tmp_path / "ref" / "out")


@pytest.mark.parametrize(
    "spelling",
    [
        "http://user@127.0.0.1:{port}/models/{name}/",
        "http://user:secret@LocalHost:{port}/models/{name}/",
        "http://127.0.0.1:0{port}/models/{name}/",
        "http://[::ffff:7f00:1]:{port}/models/{name}/",
        "HTTP://127.0.0.1:{port}/models/{name}",
    ],
)
def test_userinfo_trailing_dots_and_port_spellings_of_the_store_are_never_the_output(s3, server, small, spelling):
    weed = server[0]
    name = "userinfo" + str(abs(hash(spelling)) % 10_000)
    upload_folder(weed.endpoint, "models", name, small)
    before = objects(s3, "models", f"{name}/")
    url = spelling.format(port=weed.endpoint.rpartition(":")[2], name=name)
    for out in (f"s3://models/{name}", f"s3://models/{name}/inside"):
        one_line_error(run("expand", "--src", url, *LOCAL, "--out", out, "--force"), 2)
    assert objects(s3, "models", f"{name}/") == before


def test_an_output_named_like_the_source_with_a_longer_last_name_is_written(s3, server, small, tmp_path):
    """s3://models/pfx and s3://models/pfx2 are two folders: the output is neither refused nor mixed."""
    weed = server[0]
    upload_folder(weed.endpoint, "models", "pfx", small)
    before = objects(s3, "models", "pfx/")
    result = run("expand", "--src", "s3://models/pfx", *LOCAL, "--out", "s3://models/pfx2", "-q")
    assert result.exit_code == 0, result.output
    assert objects(s3, "models", "pfx/") == before
    assert objects(s3, "models", "pfx2/") == reference(small, tmp_path / "ref" / "pfx2")


def test_an_s3_finalize_stopped_before_its_cleanup_is_finished_and_late_writers_change_nothing(
    s3, tmp_path, local_src, monkeypatch
):
    """Killed after config.json went up, before its work objects went: the finalize run again only
    cleans up; a writer run again after that finds the checkpoint and leaves it as it is."""
    from shardsurgeon.write.s3 import objects as s3_objects

    plan = plan_of(local_src, tmp_path / "plan.json")
    url = "s3://out/cleanup"
    for part in ("1/2", "2/2"):
        assert run("apply", plan, url, "--shards", part, "-q").exit_code == 0
    real_remove = s3_objects.S3Folder.remove

    def killed(self, names):
        if any(name.startswith(".shardsurgeon-done/") for name in names):
            raise KeyboardInterrupt
        return real_remove(self, names)

    with monkeypatch.context() as patch:
        patch.setattr(s3_objects.S3Folder, "remove", killed)
        assert run("apply", plan, url, "--finalize", "-q").exit_code == 130
    want = reference(local_src, tmp_path / "ref" / "cleanup")
    assert {k: v for k, v in objects(s3, "out", "cleanup/").items() if not k.startswith(".")} == want
    again = run("apply", plan, url, "--finalize")
    assert again.exit_code == 0 and "published by an earlier run" in again.output, again.output
    assert objects(s3, "out", "cleanup/") == want
    late = run("apply", plan, url, "--shards", "1/2")  # a published folder is no writer's to add to
    assert late.exit_code == 1 and "already holds a checkpoint" in late.output, late.output
    assert objects(s3, "out", "cleanup/") == want


def test_a_run_that_takes_over_a_stale_s3_lock_stops_the_run_that_held_it(s3, tmp_path, local_src, monkeypatch):
    """The counterpart of the stale-lock finding: a run (not a writer) takes the lock over with
    If-Match, and the stopped run, once it runs again, finds its claim gone and writes nothing."""
    from shardsurgeon import OutputError, load_plan_file, run_job
    from shardsurgeon.write.s3 import claim

    monkeypatch.setattr(claim, "LEASE_SECONDS", 3.0)
    monkeypatch.setattr(claim, "RENEW_SECONDS", 3600.0)
    plan = plan_of(local_src, tmp_path / "plan.json")
    job = load_plan_file(plan).job
    url = "s3://out/takeover"
    outcome: list[BaseException | None] = []

    def whole_run() -> None:
        try:
            run_job(job, url, command="shardsurgeon expand")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    with held_in_prepare(monkeypatch) as (paused, go):
        thread = threading.Thread(target=whole_run)
        thread.start()
        assert paused.wait(60)
        time.sleep(4.5)
        other = run("apply", plan, url, "-q")
        go.set()
        thread.join(120)
    assert other.exit_code == 0, other.output
    assert len(outcome) == 1 and isinstance(outcome[0], OutputError) and "took over" in str(outcome[0])
    assert objects(s3, "out", "takeover/") == reference(local_src, tmp_path / "ref" / "takeover")
