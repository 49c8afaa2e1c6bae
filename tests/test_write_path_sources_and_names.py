"""The one write path (write/run.py and its destinations) against hostile names, links, mounts,
servers and races: each test asserts what is promised, and each was first a finding of a red-team
pass (a strict xfail naming the cause) until the write path was fixed.

Promises attacked: a published checkpoint holds exactly the planned bytes; the source is never
modified, deleted or overwritten, however it is named; a failed run leaves nothing half written
under the output's name; errors are one line; of two runs racing to one output at most one
publishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SEED, objects, server_with_a_model
from _servers import upload_folder
from click.testing import CliRunner, Result
from conftest import folder_bytes, write_tiny_checkpoint

from shardsurgeon.cli import cli

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")


# --- shared ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[Any, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("redteam-write")) as served:
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


def reference(src: Path, out: Path, *flags: str) -> dict[str, bytes]:
    """What one uninterrupted local run writes (the card names the output's folder name)."""
    result = run("expand", "--src", src, *(flags or SEED), "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return folder_bytes(out)


def rewrite_keeping_times(path: Path, data: bytes) -> None:
    before = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def interrupted(*args: str | Path, after: int = 30_000_000) -> None:
    """The command run and stopped as by Ctrl-C once ``after`` tensor bytes are done."""
    done = []

    def stop(nbytes: int) -> None:
        done.append(nbytes)
        if sum(done) > after:
            raise KeyboardInterrupt

    from shardsurgeon.cli import write as write_command

    real = write_command.show.progress

    @contextlib.contextmanager
    def stopping(layout: Any, quiet: bool) -> Iterator[Any]:
        with real(layout, True) as (_, on_shard):
            yield stop, on_shard

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(write_command.show, "progress", stopping)
        result = run(*args)
        assert result.exit_code == 130, result.output


@contextlib.contextmanager
def web_server(root: Path, monkeypatch: Any, etag: Any) -> Iterator[str]:
    """The test web server (Range support) answering with ETags made by ``etag(path)``."""
    import _servers

    make = _servers._handler

    def handler(served: Path, log: Any) -> Any:
        base = make(served, log)

        class ETags(base):  # type: ignore[misc, valid-type]
            def _reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                if "ETag" in headers:
                    headers = headers | {"ETag": etag(served / self.path.lstrip("/").partition("/")[2])}
                super()._reply(status, data, headers, body)

        return ETags

    monkeypatch.setattr(_servers, "_handler", handler)
    with _servers.serve_http(root) as http:
        yield http.url


def starlette_etag(path: Path) -> str:
    """The ETag of Starlette's FileResponse (FastAPI's StaticFiles): an MD5, but of the file's
    modification time and size, not of its bytes (starlette/responses.py, set_stat_headers)."""
    stat = path.stat()
    return '"' + hashlib.md5(f"{stat.st_mtime}-{stat.st_size}".encode()).hexdigest() + '"'


LOCAL = ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "200KB")
"""A small job of several shards, where S3's part rules do not matter."""


def write_small(folder: Path) -> Path:
    write_tiny_checkpoint(folder, layers=3, shards=2, extra_files={"tokenizer_config.json": "{}"}, hidden=64,
                          intermediate=160, kv=16, vocab=300)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small(tmp_path_factory.mktemp("small") / "src")


# --- 1. published bytes: a source whose ETag looks like a digest but is not one -------------------


def test_a_resume_from_a_fastapi_static_server_does_not_mix_two_versions(s3, server, tmp_path, monkeypatch):
    _, src, src2 = server
    served = copy_tree(src, tmp_path / "served" / "m")
    with web_server(tmp_path / "served", monkeypatch, starlette_etag) as base:
        url = f"{base}/ok/m/"
        interrupted("expand", "--src", url, *SEED, "--out", "s3://out/starlette")
        for path in src2.iterdir():  # new weights: same sizes and headers, the old times put back
            rewrite_keeping_times(served / path.name, path.read_bytes())
        result = run("expand", "--src", url, *SEED, "--out", "s3://out/starlette")
        assert result.exit_code == 0, result.output
    want = reference(src2, tmp_path / "ref" / "starlette")
    got = objects(s3, "out", "starlette/")
    assert [name for name in want if got.get(name) != want[name]] == []


# --- 2. the source: the same store reached through another of its HTTP endpoints ------------------


def test_a_source_read_through_the_stores_filer_is_never_overwritten(s3, server):
    weed, src, _ = server  # shards uploaded in parts: the filer's ETag of such an object is not S3's
    upload_folder(weed.endpoint, "models", "filer", src)
    before = objects(s3, "models", "filer/")
    url = f"http://127.0.0.1:{weed.ports['filer']}/buckets/models/filer/"
    result = run("expand", "--src", url, *SEED, "--out", "s3://models/filer", "--force", "-q")
    assert result.exit_code == 2, result.output
    assert objects(s3, "models", "filer/") == before


# --- 3. the source: bind mounts and links among the output's sibling names ------------------------

needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="bind mounts need root and mount(8)"
)


@contextlib.contextmanager
def bind_mounted(folder: Path, at: Path) -> Iterator[None]:
    at.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(folder), str(at)], capture_output=True).returncode:
        pytest.skip("mount --bind is not permitted here")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.fixture
def local_src(tmp_path) -> Path:
    return write_small(tmp_path / "src")


def plan_of(src: Path | str, plan: Path, *flags: str) -> Path:
    result = run("expand", "--src", src, *(flags or LOCAL), "--plan-json", plan)
    assert result.exit_code == 0, result.output
    return plan


@needs_mount
def test_a_source_bind_mounted_as_the_staging_folder_is_never_written(tmp_path, local_src):
    plan = plan_of(local_src, tmp_path / "plan.json")
    before = folder_bytes(local_src)
    out = tmp_path / "out"
    with bind_mounted(local_src, tmp_path / ".out.shardsurgeon-partial"):
        results = [run("apply", plan, out, "--shards", part, "-q") for part in ("1/2", "2/2")]
        results.append(run("apply", plan, out, "--finalize", "-q"))
        after = folder_bytes(local_src)
    assert after == before, [r.output for r in results]
    assert not any(name.startswith(".shardsurgeon") for name in os.listdir(local_src))


@needs_mount
def test_a_source_bind_mounted_inside_this_jobs_staging_folder_is_never_removed(tmp_path, local_src):
    plan = plan_of(local_src, tmp_path / "plan.json")
    out = tmp_path / "out"
    assert run("apply", plan, out, "--shards", "1/2", "-q").exit_code == 0
    before = folder_bytes(local_src)
    with bind_mounted(local_src, tmp_path / ".out.shardsurgeon-partial" / "mirror"):
        result = run("apply", plan, out)
        after = folder_bytes(local_src)
    assert after == before, result.output
    one_line_error(result, 2, "a hard link or a bind mount")


@needs_mount
def test_a_source_bind_mounted_inside_the_old_sibling_is_never_removed(tmp_path, local_src):
    out = tmp_path / "out"
    out.mkdir()
    before = folder_bytes(local_src)
    with bind_mounted(local_src, tmp_path / ".out.shardsurgeon-old" / "mirror"):
        result = run("expand", "--src", local_src, *LOCAL, "--out", out, "-q")
        after = folder_bytes(local_src)
    assert after == before, result.output
    one_line_error(result, 2, "a hard link or a bind mount")


def test_a_staging_name_linked_into_the_source_writes_nothing_there(tmp_path, local_src):
    (local_src / "original").mkdir()  # as many Hub repositories have
    plan = plan_of(local_src, tmp_path / "plan.json")
    (tmp_path / ".out.shardsurgeon-partial").symlink_to(local_src / "original")
    result = run("apply", plan, tmp_path / "out", "--shards", "1/2", "-q")
    assert os.listdir(local_src / "original") == [], result.output
    one_line_error(result, 2, ".out.shardsurgeon-partial", "leads into the source")


# --- 4. published bytes: S3 writers of two plans sharing one folder -------------------------------


SOURCES_OF_TWO_PLANS = ("s3://models/src", "s3://models/twoplans-new")


def test_writers_of_two_plans_in_one_s3_folder_never_mix_their_bytes(s3, server, tmp_path):
    """A writer of another plan (the source uploaded again, the same layout) is refused while this
    plan's writer is at work in the folder, and refused after it (the folder holds this plan's
    unfinished work); this plan is then finished and published with its own bytes only."""
    import threading

    from shardsurgeon import OutputError, WriteOptions, load_plan_file, run_job, writer

    weed, src, src2 = server
    upload_folder(weed.endpoint, "models", "twoplans-new", src2)  # the source uploaded again, new weights
    plans = [plan_of(url, tmp_path / f"{n}.json", *SEED) for n, url in enumerate(SOURCES_OF_TWO_PLANS)]
    jobs = [load_plan_file(plan).job for plan in plans]
    first = jobs[0].layout.shards[0].name
    paused, go = threading.Event(), threading.Event()

    def pause(nbytes: int) -> None:
        paused.set()
        go.wait(60)

    errors: list[BaseException] = []

    def write_first() -> None:
        try:
            options = WriteOptions(progress=pause)
            run_job(jobs[0], "s3://out/twoplans", command="shardsurgeon expand", part=writer([first]), options=options)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=write_first)
    thread.start()
    assert paused.wait(60)
    try:
        with pytest.raises(OutputError, match="a writer of another plan"):
            run_job(jobs[1], "s3://out/twoplans", command="shardsurgeon expand", part=writer([first]))
    finally:
        go.set()
        thread.join(120)
    assert errors == []
    with pytest.raises(OutputError, match="holds the unfinished work of another plan"):
        run_job(jobs[1], "s3://out/twoplans", command="shardsurgeon expand", part=writer([first]))
    others = ",".join(str(n) for n, s in enumerate(jobs[0].layout.shards, start=1) if s.name != first)
    assert run("apply", plans[0], "s3://out/twoplans", "--shards", others, "-q").exit_code == 0
    assert run("apply", plans[0], "s3://out/twoplans", "--finalize", "-q").exit_code == 0
    want = reference(src, tmp_path / "ref" / "twoplans", *SEED)
    got = objects(s3, "out", "twoplans/")
    assert [name for name in want if got.get(name) != want[name]] == [] and sorted(got) == sorted(want)


# --- 5. the source: a local path that is an object of the output's store --------------------------


@contextlib.contextmanager
def weed_mount(weed: Any, bucket: str, at: Path) -> Iterator[Path]:
    """``bucket`` of the SeaweedFS mounted at ``at`` by FUSE (``weed mount``), as mountpoint-s3,
    s3fs or goofys mount a bucket; unmounted and its process stopped (by its id) at exit."""
    import time

    from _servers import weed_binary

    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("FUSE mounts need /dev/fuse and root")
    at.mkdir(parents=True)
    filer = f"127.0.0.1:{weed.ports['filer']}.{weed.ports['filer.grpc']}"
    log = open(at.parent / "mount.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(weed_binary()), "mount", f"-filer={filer}", f"-filer.path=/buckets/{bucket}", f"-dir={at}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(at):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("weed mount did not come up")
            time.sleep(0.2)
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False, capture_output=True)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_a_source_read_through_a_fuse_mount_of_the_bucket_is_never_overwritten(s3, server, small, tmp_path):
    weed = server[0]
    upload_folder(weed.endpoint, "models", "fused", small)
    before = objects(s3, "models", "fused/")
    with weed_mount(weed, "models", tmp_path / "mnt") as mounted:
        result = run("expand", "--src", mounted / "fused", *LOCAL, "--out", "s3://models/fused", "--force", "-q")
    assert objects(s3, "models", "fused/") == before, result.output
    one_line_error(result, 2)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::ffff:127.0.0.1]"])
def test_a_source_named_by_another_address_of_the_store_is_never_written_into(s3, server, small, host):
    weed = server[0]
    name = "addr" + str(abs(hash(host)) % 10_000)
    upload_folder(weed.endpoint, "models", name, small)
    before = objects(s3, "models", f"{name}/")
    url = f"http://{host}:{weed.endpoint.rpartition(':')[2]}/models/{name}/"
    result = run("expand", "--src", url, *LOCAL, "--out", f"s3://models/{name}/inside", "-q")
    assert objects(s3, "models", f"{name}/") == before, result.output
    one_line_error(result, 2, "the source is never written to")


def test_an_s3_writer_of_another_plan_refuses_like_a_local_one(s3, tmp_path, local_src):
    other = write_small(tmp_path / "other")
    first = plan_of(local_src, tmp_path / "first.json")
    second = plan_of(other, tmp_path / "second.json", "--dup", "1x1", "--max-shard-size", "200KB")
    local = tmp_path / "local"
    assert run("apply", first, local, "--shards", "1/2", "-q").exit_code == 0
    one_line_error(run("apply", second, local, "--shards", "2/2", "-q"), 1, "another plan")
    assert run("apply", first, "s3://out/otherplan", "--shards", "1/2", "-q").exit_code == 0
    before = {k: v for k, v in objects(s3, "out", "otherplan/").items() if k.endswith(".safetensors")}
    result = run("apply", second, "s3://out/otherplan", "--shards", "2/2", "-q")
    after = objects(s3, "out", "otherplan/")
    assert all(after.get(name) == data for name, data in before.items()), result.output
    one_line_error(result, 1, "another plan")


# --- 6. odd paths and URLs: one line, never a hang --------------------------------------------------


def test_a_fifo_as_the_resume_marker_is_no_marker_and_no_hang(tmp_path, local_src):
    """A FIFO is not read (it would block): the staging folder holds no marker of this job, so the
    run takes it over as another run's and writes the output."""
    staging = tmp_path / ".out.shardsurgeon-partial"
    staging.mkdir()
    os.mkfifo(staging / ".shardsurgeon-resume")
    command = [sys.executable, "-m", "shardsurgeon", "expand", "--src", str(local_src), *LOCAL, "--out", "out", "-q"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on the FIFO")
    assert done.returncode == 0, done.stderr
    assert folder_bytes(tmp_path / "out") == reference(local_src, tmp_path / "ref" / "out", *LOCAL)


def test_an_s3_url_in_capitals_is_the_bucket(s3, tmp_path, local_src, monkeypatch):
    """URL schemes are case-insensitive: ``S3://`` is the bucket, never a local folder named ``S3:``."""
    monkeypatch.chdir(tmp_path)
    result = run("expand", "--src", local_src, *LOCAL, "--out", "S3://out/capitals", "-q")
    assert result.exit_code == 0 and not (tmp_path / "S3:").exists(), result.output
    assert "config.json" in objects(s3, "out", "capitals/")


# --- 7. published bytes: a rerun while the writer processes of a killed run still write -------------


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


ORPHAN_HOOK = """
import os, time
from pathlib import Path
if os.environ.get("REDTEAM_ORPHAN"):
    from shardsurgeon.storage import fileio
    from shardsurgeon.write import executor
    control, real_write, real_size = Path(os.environ["REDTEAM_ORPHAN"]), executor.ShardWriter.write, fileio.set_size

    def write(self, shard, path):  # each writer process waits for the go, as a slow disk would
        (control / f"waiting-{os.getpid()}").touch()
        while not (control / "go").exists():
            time.sleep(0.05)
        return real_write(self, shard, path)

    def set_size(fd, nbytes):  # then writes slowly: the file is sized, its bytes come later
        real_size(fd, nbytes)
        time.sleep(8)

    executor.ShardWriter.write, fileio.set_size = write, set_size
"""


def test_a_rerun_after_kill_9_of_a_jobs_run_publishes_only_finished_shards(tmp_path, local_src):
    import signal
    import time

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(ORPHAN_HOOK)
    control = tmp_path / "control"
    control.mkdir()
    out = tmp_path / "out"
    repo = str(Path(__file__).parents[1])
    env = os.environ | {"PYTHONPATH": f"{tmp_path / 'inject'}:{repo}", "REDTEAM_ORPHAN": str(control)}
    command = [sys.executable, "-m", "shardsurgeon", "expand", "--src", str(local_src), *LOCAL, "--jobs", "2"]
    first = subprocess.Popen([*command, "--out", str(out), "-q"], env=env, stdin=subprocess.DEVNULL)
    orphans: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(orphans := [int(p.name.split("-")[1]) for p in control.glob("waiting-*")]) < 2:
            assert time.monotonic() < deadline and first.poll() is None, "the writer processes did not start"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # the run alone, as the OOM killer or kill -9 PID does
        first.wait(10)

        from shardsurgeon.write import executor

        real_write, seen = executor.ShardWriter.write, []

        def write(self, shard, path):  # the rerun's first shard, written, is renamed once an orphan starts it
            stats = real_write(self, shard, path)
            if not seen:
                seen.append(os.open(path, os.O_RDONLY))  # held open: its inode number is not reused
                (control / "go").touch()
                until = time.monotonic() + 20
                while time.monotonic() < until and any(map(alive, orphans)):
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(path).st_ino != os.fstat(seen[0]).st_ino:
                            break
                    time.sleep(0.02)
                os.close(seen[0])
            return stats

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(executor.ShardWriter, "write", write)
            result = run("expand", "--src", local_src, *LOCAL, "--out", out, "-q")
        published = folder_bytes(out) if result.exit_code == 0 else None
    finally:
        for pid in orphans:  # the writer processes of the killed run, started by this test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
            first.wait(10)
    if published is not None:
        want = reference(local_src, tmp_path / "ref" / "out", *LOCAL)
        assert [name for name in want if published.get(name) != want[name]] == []
        assert sorted(published) == sorted(want)


# --- attacks that held (coverage beyond tests/test_published_bytes.py) -----------------------------


def test_a_commit_journal_linked_to_a_source_file_is_refused_and_never_followed(tmp_path, local_src):
    """A name beside the output that leads into a source is refused before anything is read or
    written through it (the tool never makes such a link; someone put it there)."""
    shard = sorted(local_src.glob("*.safetensors"))[0]
    before = folder_bytes(local_src)
    (tmp_path / ".out.shardsurgeon-commit").symlink_to(shard)
    result = run("expand", "--src", local_src, *LOCAL, "--out", tmp_path / "out", "-q")
    one_line_error(result, 2, ".out.shardsurgeon-commit", "leads into the source")
    assert folder_bytes(local_src) == before and not (tmp_path / "out").exists()


def test_a_plan_file_pointed_at_a_copy_of_its_source_is_refused(tmp_path, local_src):
    plan = plan_of(local_src, tmp_path / "plan.json")
    copy = copy_tree(local_src, tmp_path / "copy")
    for path in copy.iterdir():  # the very bytes and times: only the files' identities differ
        stat = (local_src / path.name).stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    record = json.loads(plan.read_text())
    record["job"]["sources"][0]["folder"] = str(copy)
    plan.write_text(json.dumps(record))
    one_line_error(run("apply", plan, tmp_path / "out"), 1, "changed since the plan", "replaced by another file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spelling",
    [
        "http://LOCALHOST:{port}/models//{name}/",
        "http://127.1:{port}/models/./{name}/",
        "http://127.0.0.1:{port}/models/{name}//",
        "http://127.0.0.1:{port}/models/%7B{name}/../{name}/",
    ],
)
def test_more_spellings_of_the_stores_url_are_never_the_output(s3, server, small, spelling):
    weed = server[0]
    name = "spell" + str(abs(hash(spelling)) % 10_000)
    upload_folder(weed.endpoint, "models", name, small)
    before = objects(s3, "models", f"{name}/")
    url = spelling.format(port=weed.endpoint.rpartition(":")[2], name=name)
    for out in (f"s3://models/{name}", f"s3://models/{name}/inside", "s3://models"):
        one_line_error(run("expand", "--src", url, *LOCAL, "--out", out, "--force"), 2)
    assert objects(s3, "models", f"{name}/") == before


def test_an_s3_writer_and_a_finalize_of_one_plan_exclude_each_other(s3, tmp_path, local_src, monkeypatch):
    """A finalize started while a writer holds its lease steps back, and the other way round."""
    from shardsurgeon import FINALIZE, load_plan_file, run_job, writer
    from shardsurgeon.write.s3 import destination

    plan = plan_of(local_src, tmp_path / "plan.json")
    job = load_plan_file(plan).job
    url = "s3://out/exclude"
    assert run("apply", plan, url, "--shards", "1/2", "-q").exit_code == 0
    real_claim = destination.S3Destination.claim
    results: list[Result] = []

    @contextlib.contextmanager
    def claim(self, job_, part, options):
        with real_claim(self, job_, part, options) as area:
            if not results:  # while this one holds its claim, the other kind of run starts
                other = ("--finalize",) if part.kind == "writer" else ("--shards", "2/2")
                results.append(run("apply", plan, url, *other, "-q"))
            yield area

    monkeypatch.setattr(destination.S3Destination, "claim", claim)
    run_job(job, url, command="shardsurgeon expand", part=writer([job.layout.shards[-1].name]))
    one_line_error(results.pop(), 1, "is writing there")
    names = [s.name for s in job.layout.shards if s.name != job.layout.shards[-1].name]
    run_job(job, url, command="shardsurgeon expand", part=writer(names))
    run_job(job, url, command="shardsurgeon expand", part=FINALIZE)
    one_line_error(results.pop(), 1, "is writing there")
