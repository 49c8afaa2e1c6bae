"""Plan once, write shards anywhere: --jobs, plan files with apply --shards and --finalize, and Ray.

Every mode must give the bytes of a one-process run, file for file (the model card included, so
runs use the same --out text, relative to their own working folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _servers import kill_server, start_server
from conftest import folder_bytes, run_cli, write_tiny_checkpoint

from shardsurgeon import RecipeError, ShardLayout, WriteOptions, balanced_groups, select_shards
from shardsurgeon.write.local import destination as output
from shardsurgeon.write.local import lock

RECIPE = ["--dup", "5x2", "--zero", "o_proj,down_proj", "--dtype", "float16", "--max-shard-size", "40KB"]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    write_tiny_checkpoint(tmp_path / "src", layers=6, shards=2, hidden=64, intermediate=128, kv=32, vocab=32)
    return tmp_path / "src"


def cli_in(cwd: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A real ``shardsurgeon`` process in ``cwd`` (the plan file and --out are relative to it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "shardsurgeon", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def reference(tmp_path: Path, source: Path) -> dict[str, bytes]:
    """The files of a one-process run, made in this process (the same bytes as ``cli_in`` gives,
    without starting an interpreter that imports everything again)."""
    (tmp_path / "reference").mkdir()
    with contextlib.chdir(tmp_path / "reference"):  # --out is relative, as in the other runs
        result = run_cli("expand", "--src", source, *RECIPE, "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    files = folder_bytes(tmp_path / "reference" / "out")
    assert sum(name.endswith(".safetensors") for name in files) >= 4
    return files


def test_jobs_give_the_bytes_of_one_process(tmp_path, source, reference):
    result = cli_in(tmp_path / "jobs", "expand", "--src", source, *RECIPE, "--out", "out", "--jobs", "3")
    assert folder_bytes(tmp_path / "jobs" / "out") == reference
    assert "-> out" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["out"]


def test_a_plan_file_applied_whole_gives_the_same_bytes(tmp_path, source, reference):
    run = tmp_path / "apply"
    cli_in(run, "expand", "--src", source, *RECIPE, "--plan-json", "plan.json")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["job"]["command"].startswith("shardsurgeon expand --src") and "--out" not in plan["job"]["command"]
    cli_in(run, "apply", "plan.json", "out", "-q")
    assert folder_bytes(run / "out") == reference


def test_writers_in_parallel_then_finalize(tmp_path, source, reference):
    run = tmp_path / "array"
    cli_in(run, "expand", "--src", source, *RECIPE, "--plan-json", "plan.json")
    command = [sys.executable, "-m", "shardsurgeon", "apply", "plan.json", "out", "-q", "--shards"]
    writers = [subprocess.Popen([*command, f"{k}/3"], cwd=run, stderr=subprocess.PIPE, text=True) for k in (1, 2, 3)]
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read() if writer.stderr else ""
    assert not (run / "out").exists(), "writers publish nothing"
    again = cli_in(run, "apply", "plan.json", "out", "--shards", "1-2")
    assert "2 of" in again.stderr and "(2 already there)" in again.stderr and "--finalize" in again.stderr
    cli_in(run, "apply", "plan.json", "out", "--finalize", "-q")
    assert folder_bytes(run / "out") == reference
    assert sorted(p.name for p in run.iterdir()) == ["out", "plan.json"]


def test_finalize_before_every_shard_is_written_is_refused(tmp_path, source):
    run = tmp_path / "early"
    cli_in(run, "expand", "--src", source, *RECIPE, "--plan-json", "plan.json")
    result = cli_in(run, "apply", "plan.json", "out", "--finalize", check=False)
    assert result.returncode == 1 and "no shards of this plan are waiting" in result.stderr
    cli_in(run, "apply", "plan.json", "out", "--shards", "1/2", "-q")
    result = cli_in(run, "apply", "plan.json", "out", "--finalize", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert (
        "shards are missing, incomplete or not the planned bytes" in lines[0]
        and "write them with apply PLAN --shards" in lines[0]
    )
    assert not (run / "out").exists()


def test_a_source_changed_since_the_plan_is_refused(tmp_path, source):
    run = tmp_path / "changed"
    cli_in(run, "expand", "--src", source, *RECIPE, "--plan-json", "plan.json")
    shard = source / "model-00002-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    result = cli_in(run, "apply", "plan.json", "out", "--shards", "1/2", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shardsurgeon: error: {shard}: changed since the plan plan.json was made (rewritten in place); make the "
        "plan again"
    )
    assert not (run / "out").exists() and not any(p.name.startswith(".out") for p in run.iterdir())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "not a plan file: not JSON"),
        (json.dumps({"fingerprint": "x"}).encode(), "plan.json: job: missing; the file was edited"),
    ],
)
def test_a_damaged_plan_file_is_refused_in_one_line(tmp_path, content, message):
    (tmp_path / "plan.json").write_bytes(content)
    result = run_cli("apply", tmp_path / "plan.json", tmp_path / "out")
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_run_is_refused_while_writers_hold_the_output(tmp_path, source):
    out = tmp_path / "out"
    with lock.acquire(output.lock_file(out), "test writers", shared=True):
        result = run_cli("expand", "--src", source, "--dup", "1x1", "--out", out)
    assert result.exit_code == 1 and "another shardsurgeon run is writing it" in result.output
    assert not out.exists()


def fake_shards(sizes: list[int]) -> list[ShardLayout]:
    return [ShardLayout(f"model-{i:05d}-of-{len(sizes):05d}.safetensors", b"x" * n, ()) for i, n in enumerate(sizes, 1)]


@pytest.mark.parametrize("sizes", [[5, 5, 5, 5], [100, 1, 1, 1, 1, 50, 50], [7], [3, 9, 2, 8, 4, 4, 4, 1, 10]])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_k_of_n_covers_every_shard_once(sizes, parts):
    shards = fake_shards(sizes)
    chosen = [s.name for k in range(1, parts + 1) for s in select_shards(f"{k}/{parts}", shards)]
    assert sorted(chosen) == sorted(s.name for s in shards) and len(chosen) == len(set(chosen))
    groups = balanced_groups(shards, parts)
    assert sorted(s.name for g in groups for s in g) == sorted(s.name for s in shards)


def test_shard_lists_and_their_errors():
    shards = fake_shards([1] * 7)
    assert [s.name[6:11] for s in select_shards("1,3,5-7", shards)] == ["00001", "00003", "00005", "00006", "00007"]
    for bad, message in [
        ("0/2", "1 <= K <= N"),
        ("3/2", "found K=3, N=2"),
        ("x", "such as 1,3,5-7"),
        ("8", "numbered 1 to 7, found 8"),
        ("2-1", "found 2-1"),
        ("1/" + "9" * 50, "expected K/N"),
    ]:
        with pytest.raises(RecipeError, match=message):
            select_shards(bad, shards)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray head with two worker CPUs, started for these tests in a session of its own and
    stopped by SIGKILL to every process of that session (the head's, by the process id started):
    a SIGTERM makes each of Ray's processes shut down politely, for half a minute. If the test
    process dies first, the head gets SIGTERM from the kernel and takes its processes down."""
    pytest.importorskip("ray")
    ray_exe = Path(sys.executable).with_name("ray")
    if not ray_exe.exists():
        pytest.skip("the ray command is not installed beside this Python")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # A token in ~/.ray (left by any ray.init() on this machine) turns on token authentication,
    # under which this head is not reachable the way the test reaches it: a local cluster without.
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    command = [
        str(ray_exe), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
    ]  # fmt: skip
    head = start_server(command, temp / "head.log", new_session=True, death_signal=signal.SIGTERM)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a busy machine: CI saw more than 120 s once
        while subprocess.run([str(ray_exe), "status", f"--address={address}"], capture_output=True).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                log = (temp / "head.log").read_text(errors="replace")[-1500:]
                pytest.fail(f"the Ray head did not start (exit status {head.poll()}); its log ends: {log}")
            time.sleep(0.5)
        yield address
    finally:
        kill_server(head, session=True)
        shutil.rmtree(temp, ignore_errors=True)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode


def test_ray_tasks_give_the_bytes_of_one_process(tmp_path, source, reference, ray_cluster):
    run = tmp_path / "ray"
    result = cli_in(run, "expand", "--src", source, *RECIPE, "--out", "out", "--ray", ray_cluster)
    assert folder_bytes(run / "out") == reference, result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["out"]


def test_progress_of_processes_covers_the_whole_job(tmp_path, source):
    """Worker processes report their bytes and shards to the one progress of the run."""
    from shardsurgeon import Processes, plan_expand, run_job

    job = plan_expand(source, dups=[(5, 2)], zero=["o_proj"], dtype="float16", max_shard_bytes=40_000)
    done: list[int] = []
    started: list[tuple[str, int, int]] = []
    options = WriteOptions(
        progress=done.append, on_shard=lambda name, number, count: started.append((name, number, count)),
        runner=Processes(2),
    )  # fmt: skip
    result = run_job(job, tmp_path / "out", command="test", options=options)
    assert sum(done) == job.layout.total_size
    assert sorted(started) == [(s.name, n, len(job.layout.shards)) for n, s in enumerate(job.layout.shards, 1)]
    assert result.shards == len(job.layout.shards) and result.written > 0
