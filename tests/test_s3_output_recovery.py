"""The S3 output's recovery, cleanup, one-line errors and sources without a usable ETag: a second
red-team pass on ``--out s3://...`` (the fixes of the first, tests/test_s3_output_edges.py, and
what is near them). Each test states a promise; those that failed (findings G1-G9) were fixed and
now guard against their return, beside those that held up.

Against a real SeaweedFS started here (tests/_servers.py); each test uses a prefix of its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SEED, SHAPE, objects, server_with_a_model, stop_after
from _servers import SeaweedFS, s3_environment
from click.testing import CliRunner, Result
from conftest import write_tiny_checkpoint

from shardsurgeon import CHECKSUMS_FILE, OutputError, WriteOptions, api
from shardsurgeon.cli import cli
from shardsurgeon.storage import s3
from shardsurgeon.write.s3 import destination as s3output
from shardsurgeon.write.s3 import objects as s3folder
from shardsurgeon.write.s3 import uploads as s3shards

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")

SEED_KW: dict[str, Any] = {"dups": [(1, 2)], "zero": ["o_proj", "down_proj"], "max_shard_bytes": 30_000_000}


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[SeaweedFS, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("s3red2")) as served:
        yield served


@pytest.fixture
def s3c(server, monkeypatch) -> Any:
    import boto3

    for key, value in s3_environment(server[0].endpoint).items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3")


def run(*args: str | Path, catch: bool = False) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)


def local_output(src: Path | str, flags: tuple[str, ...], out: Path) -> dict[str, bytes]:
    """The local output's files but README.md (the card names the output folder and the command)."""
    result = run("expand", "--src", src, *flags, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"}


def same(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """The S3 folder holds exactly the local output (README.md aside), byte for byte."""
    got = {name: data for name, data in got.items() if name != "README.md"}
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


def stop_after_config(monkeypatch) -> Any:
    """Make _Folder.put raise KeyboardInterrupt right after config.json is written (published, not
    cleaned up); returns the original to restore."""
    put = s3folder.S3Folder.put

    def put_then_stop(self: Any, name: str, data: bytes, create: bool = False) -> int:
        sent = put(self, name, data, create)
        if name == "config.json":
            raise KeyboardInterrupt
        return sent

    monkeypatch.setattr(s3folder.S3Folder, "put", put_then_stop)
    return put


def one_line_error(result: Result, status: int) -> None:
    """Exit ``status``: 1 for what went wrong, 2 for what the user typed wrong (a URL, an endpoint)."""
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output


# --- the published-but-not-cleaned path (_Start.published) -------------------------------------


def test_a_rerun_with_checksums_after_a_stopped_publish_writes_the_manifest(s3c, src, monkeypatch):
    put = stop_after_config(monkeypatch)
    job = api.plan_expand(src, **SEED_KW)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/g1", command="expand")
    monkeypatch.setattr(s3folder.S3Folder, "put", put)
    result = api.run_job(job, "s3://out/g1", command="expand", options=WriteOptions(checksums=True))
    assert result.notes  # "this job was published by an earlier run..."
    assert CHECKSUMS_FILE in objects(s3c, "out", "g1/")


def test_a_rerun_with_another_layout_of_the_same_names_is_refused_then_forced(s3c, src, monkeypatch, tmp_path):
    """G2: the folder holds a published checkpoint of another layout (same names): not this job's
    output, so refused as any checkpoint is without --force, and replaced whole with it."""
    put = stop_after_config(monkeypatch)
    first = api.plan_expand(src, dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    second = api.plan_expand(src, dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=26_000_000)
    assert [s.name for s in first.layout.shards] == [s.name for s in second.layout.shards]
    assert [s.nbytes for s in first.layout.shards] != [s.nbytes for s in second.layout.shards]
    with pytest.raises(KeyboardInterrupt):
        api.run_job(first, "s3://out/g2", command="expand")
    monkeypatch.setattr(s3folder.S3Folder, "put", put)
    with pytest.raises(OutputError, match="already holds a checkpoint"):
        api.run_job(second, "s3://out/g2", command="expand")
    api.run_job(second, "s3://out/g2", command="expand", options=WriteOptions(force=True))
    got = objects(s3c, "out", "g2/")
    want = local_output(src, ("--dup", "1x2", "--zero", "o_proj,down_proj", "--max-shard-size", "26MB"), tmp_path / "w")
    assert [n for n in want if n.endswith(".safetensors") and got.get(n) != want[n]] == []
    assert not [n for n in got if n.startswith(".shardsurgeon")]


def test_force_stopped_after_publish_then_rerun_leaves_no_old_shards(s3c, src, monkeypatch):
    old = api.plan_expand(src, dups=[(1, 2)], max_shard_bytes=40_000_000)  # three shards
    api.run_job(old, "s3://out/g3", command="expand")
    put = stop_after_config(monkeypatch)
    new = api.plan_expand(src, **SEED_KW)  # five shards: other names
    with pytest.raises(KeyboardInterrupt):
        api.run_job(new, "s3://out/g3", command="expand", options=WriteOptions(force=True))
    monkeypatch.setattr(s3folder.S3Folder, "put", put)
    api.run_job(new, "s3://out/g3", command="expand")
    left = sorted(n for n in objects(s3c, "out", "g3/") if n.endswith(".safetensors"))
    assert left == sorted(s.name for s in new.layout.shards)


# --- objects the run did not write ------------------------------------------------------------


def test_an_object_written_by_someone_else_during_the_run_is_kept(s3c, src):
    job = api.plan_expand(src, **SEED_KW)
    written = False

    def someone_writes(nbytes: int) -> None:
        nonlocal written
        if not written:
            written = True
            s3c.put_object(Bucket="out", Key="g4/eval/results.json", Body=b'{"mmlu": 0.61}')

    api.run_job(job, "s3://out/g4", command="expand", options=WriteOptions(progress=someone_writes))
    assert objects(s3c, "out", "g4/eval/") == {"results.json": b'{"mmlu": 0.61}'}


def test_an_unfinished_runs_folder_keeps_objects_others_added_without_force(s3c, src):
    job = api.plan_expand(src, **SEED_KW)

    def stop(nbytes: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/g4b", command="expand", options=WriteOptions(progress=stop))
    s3c.put_object(Bucket="out", Key="g4b/notes.txt", Body=b"someone's notes")
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/g4b", "-q")  # another job
    assert result.exit_code == 1 or objects(s3c, "out", "g4b/").get("notes.txt") == b"someone's notes"


# --- the cached client ------------------------------------------------------------------------


def test_credentials_rotated_in_the_credentials_file_are_used_by_the_next_run(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    credentials = tmp_path / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    credentials.write_text("[default]\naws_access_key_id = OLDKEY\naws_secret_access_key = old\n")
    assert s3.client()._request_signer._credentials.access_key == "OLDKEY"
    credentials.write_text("[default]\naws_access_key_id = NEWKEY\naws_secret_access_key = new\n")
    assert s3.client()._request_signer._credentials.access_key == "NEWKEY"


def test_two_runs_in_one_process_with_different_endpoints_write_where_each_says(s3c, src, monkeypatch):
    """Library use: run_job to one store, then with AWS_ENDPOINT_URL changed (here to a closed port):
    the second run goes to the new endpoint, not to the cached client's."""
    job = api.plan_expand(src, dups=[(0, 1)])
    api.run_job(job, "s3://out/endpoint-a", command="expand")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(OutputError, match=r"cannot reach http://127\.0\.0\.1:1"):
        api.run_job(job, "s3://out/endpoint-b", command="expand")
    assert objects(s3c, "out", "endpoint-b/") == {}


# --- one-line errors --------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["localhost:8333", "http://[::1", "not a url"])
def test_a_malformed_endpoint_url_is_one_line(src, monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/malformed", catch=True)
    one_line_error(result, 2)
    assert "AWS_ENDPOINT_URL" in result.output


def no_credentials(tmp_path: Path, monkeypatch, endpoint: str) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def test_no_credentials_at_all_is_one_line(server, src, tmp_path, monkeypatch):
    no_credentials(tmp_path, monkeypatch, server[0].endpoint)
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/nocreds", catch=True)
    one_line_error(result, 1)


def test_no_credentials_at_all_says_what_to_set(server, src, tmp_path, monkeypatch):
    no_credentials(tmp_path, monkeypatch, server[0].endpoint)
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/nocreds", catch=True)
    assert "retried" not in result.output and "AWS_ACCESS_KEY_ID" in result.output, result.output


def test_an_invalid_bucket_name_is_one_line(s3c, src):
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://Bad_Bucket!/x", catch=True)
    one_line_error(result, 2)


def test_an_invalid_bucket_name_is_not_called_a_retried_failure(s3c, src):
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://Bad_Bucket!/x", catch=True)
    assert "retried" not in result.output and "resume" not in result.output, result.output


# --- sources by HTTP without a usable ETag --------------------------------------------------------


@contextlib.contextmanager
def http_without_etag(root: Path, monkeypatch, weak: bool = False, dated: bool = True) -> Iterator[str]:
    """The test web server, its ETag dropped (or with ``weak``, made weak: W/"..."), and without
    ``dated`` its Last-Modified too."""
    import _servers

    make = _servers._handler

    def handler(*args: Any) -> Any:
        base = make(*args)

        class NoETag(base):  # type: ignore[misc, valid-type]
            def _reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                changed = {k: v for k, v in headers.items() if k != "ETag" and (dated or k != "Last-Modified")}
                if weak and "ETag" in headers:
                    changed["ETag"] = f"W/{headers['ETag']}"
                super()._reply(status, data, changed, body)

        return NoETag

    monkeypatch.setattr(_servers, "_handler", handler)
    with _servers.serve_http(root) as http:
        yield http.url


def test_an_http_source_without_etag_replaced_between_runs_is_not_mixed(s3c, src, src2, tmp_path, monkeypatch):
    served = tmp_path / "served" / "m"
    served.mkdir(parents=True)
    for path in src.iterdir():
        (served / path.name).write_bytes(path.read_bytes())
    with http_without_etag(tmp_path / "served", monkeypatch) as base:
        url = f"{base}/ok/m/"
        job = api.plan_expand(url, **SEED_KW)
        versions = {v.validator for v in job.versions}
        assert all(v is not None and v.startswith("last-modified ") for v in versions), versions
        done = 0

        def stop_late(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if done >= 60_000_000:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            api.run_job(job, "s3://out/g7", command="expand", options=WriteOptions(progress=stop_late))
        time.sleep(1.1)  # a new Last-Modified second
        for path in src2.iterdir():
            (served / path.name).write_bytes(path.read_bytes())
        job = api.plan_expand(url, **SEED_KW)
        api.run_job(job, "s3://out/g7", command="expand")
    want = local_output(src2, SEED, tmp_path / "want")
    got = objects(s3c, "out", "g7/")
    assert [n for n in want if n.endswith(".safetensors") and got[n] != want[n]] == []


def test_an_http_source_with_weak_etags_writes_and_resumes(s3c, src, tmp_path, monkeypatch):
    served = tmp_path / "served" / "m"
    served.mkdir(parents=True)
    for path in src.iterdir():
        (served / path.name).write_bytes(path.read_bytes())
    with http_without_etag(tmp_path / "served", monkeypatch, weak=True) as base:
        job = api.plan_expand(f"{base}/ok/m/", **SEED_KW)
        assert all(v.validator is not None and v.validator.startswith("W/") for v in job.versions)
        done: list[int] = []

        def stop_late(nbytes: int) -> None:
            done.append(nbytes)
            if sum(done) >= 60_000_000:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            api.run_job(job, "s3://out/weak", command="expand", options=WriteOptions(progress=stop_late))
        assert api.run_job(job, "s3://out/weak", command="expand").shards_reused > 0
    same(objects(s3c, "out", "weak/"), local_output(src, SEED, tmp_path / "want"))


# --- progress from the S3 writer ----------------------------------------------------------------


def test_progress_sums_to_the_total_size_with_kept_shards(s3c, src):
    job = api.plan_expand(src, **SEED_KW)
    total = job.layout.total_size
    first: list[int] = []

    def stop_late(nbytes: int) -> None:
        first.append(nbytes)
        if sum(first) >= 60_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/totals", command="expand", options=WriteOptions(progress=stop_late))
    counted: list[int] = []
    lock = threading.Lock()

    def count(nbytes: int) -> None:
        with lock:
            counted.append(nbytes)

    result = api.run_job(job, "s3://out/totals", command="expand", options=WriteOptions(progress=count))
    assert result.shards_reused > 0
    assert sum(counted) == total


def test_the_progress_callback_is_never_called_concurrently(s3c, src):
    job = api.plan_expand(src, dups=[(0, 1)], dtype="float32", max_shard_bytes=60_000_000)
    active, most = 0, 0
    guard = threading.Lock()

    def slow(nbytes: int) -> None:
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        time.sleep(0.05)
        with guard:
            active -= 1

    api.run_job(job, "s3://out/g8", command="expand", options=WriteOptions(progress=slow))
    assert most == 1


# --- what held up -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin, flags",
    [
        ("local", ("--every", "1", "--dtype", "float32", "--max-shard-size", "12MB")),
        ("s3", ("--dup", "1x2", "--zero", "o_proj", "--dtype", "float16", "--max-shard-size", "7MB")),
    ],
)  # each origin and each cast once (all four pairs took 20 s of the suite)
def test_casts_in_many_small_made_parts_are_byte_identical(s3c, src, tmp_path, flags, origin, monkeypatch):
    """Two workspaces shared by 4 threads, converters per workspace: many casts made at once."""
    monkeypatch.setattr(s3shards, "READ_BYTES", 1 << 20)  # more, smaller reads interleaved
    want = local_output(src, flags, tmp_path / "want")
    prefix = f"casts-{origin}-{flags[-3]}/"
    result = run("expand", "--src", src if origin == "local" else "s3://models/src", *flags, "--out",
                 f"s3://out/{prefix}", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    same(objects(s3c, "out", prefix), want)


def test_a_single_shard_output_resumes(s3c, tmp_path, monkeypatch):
    src = tmp_path / "single"
    write_tiny_checkpoint(src, layers=2, shards=1, **SHAPE)
    job = api.plan_expand(src, dups=[(0, 1)], max_shard_bytes=5_000_000_000)
    assert [s.name for s in job.layout.shards] == ["model.safetensors"]

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(s3output.S3Area, "publish", stop)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/single", command="expand")
    assert "config.json" not in objects(s3c, "out", "single/")
    monkeypatch.undo()
    for key, value in s3_environment(s3c.meta.endpoint_url).items():
        monkeypatch.setenv(key, value)
    result = api.run_job(job, "s3://out/single", command="expand")
    assert result.shards_reused == 1
    want = local_output(src, ("--dup", "0x1", "--max-shard-size", "5GB"), tmp_path / "want")
    got = objects(s3c, "out", "single/")
    same(got, want)


def test_killed_between_the_zeros_object_and_the_first_shard_resumes(s3c, src, tmp_path, monkeypatch):
    job = api.plan_expand(src, **SEED_KW)
    write = s3shards.S3ShardWriter.write

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(s3shards.S3ShardWriter, "write", stop)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/zeros-first", command="expand")
    assert ".shardsurgeon-zeros" in objects(s3c, "out", "zeros-first/")
    monkeypatch.setattr(s3shards.S3ShardWriter, "write", write)
    api.run_job(job, "s3://out/zeros-first", command="expand")
    want = local_output(src, SEED, tmp_path / "want")
    got = objects(s3c, "out", "zeros-first/")
    same(got, want)


def test_force_onto_this_jobs_own_checkpoint_rewrites_it_identically(s3c, src, tmp_path):
    assert run("expand", "--src", src, *SEED, "--out", "s3://out/own", "-q").exit_code == 0
    refused = run("expand", "--src", src, *SEED, "--out", "s3://out/own")
    assert refused.exit_code == 1 and "already holds a checkpoint" in refused.output
    again = run("expand", "--src", src, *SEED, "--out", "s3://out/own", "--force", "-q")
    assert again.exit_code == 0, again.output
    want = local_output(src, SEED, tmp_path / "want")
    got = objects(s3c, "out", "own/")
    same(got, want)


def test_readers_never_see_a_complete_checkpoint_while_force_replaces_one(s3c, src, src2):
    """While a --force run replaces a checkpoint, config.json is absent until the new one is whole."""
    api.run_job(api.plan_expand(src, dups=[(1, 2)], max_shard_bytes=40_000_000), "s3://out/readers", command="e")
    seen: list[bool] = []
    lock = threading.Lock()

    def look(nbytes: int) -> None:
        with lock:
            listed = objects(s3c, "out", "readers/")
            seen.append("config.json" in listed or "model.safetensors.index.json" in listed)

    job = api.plan_expand(src2, **SEED_KW)
    api.run_job(job, "s3://out/readers", command="expand", options=WriteOptions(force=True, progress=look))
    assert seen and not any(seen)


def test_an_s3_source_in_another_bucket_with_weak_looking_etags_holds(s3c, server, src, tmp_path):
    """Cross-bucket UploadPartCopy with CopySourceIfMatch: byte-identical, resumable."""
    job = api.plan_expand("s3://models/src", **SEED_KW)
    etags = {v.validator for v in job.versions}
    assert None not in etags and all(e.startswith('"') for e in etags)  # type: ignore[union-attr]

    def stop_late(nbytes: int, done: list[int] = []) -> None:  # noqa: B006
        done.append(nbytes)
        if sum(done) >= 60_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/xbucket", command="expand", options=WriteOptions(progress=stop_late))
    result = api.run_job(job, "s3://out/xbucket", command="expand")
    assert result.shards_reused > 0
    want = local_output(src, SEED, tmp_path / "want")
    got = objects(s3c, "out", "xbucket/")
    same(got, want)


def test_shards_carry_the_run_metadata_in_lower_case(s3c, src):
    api.run_job(api.plan_expand(src, dups=[(0, 1)]), "s3://out/meta", command="expand")
    names = [n for n in objects(s3c, "out", "meta/") if n.endswith(".safetensors")]
    head = s3c.head_object(Bucket="out", Key=f"meta/{names[0]}")
    assert set(head["Metadata"]) == {s3shards.RUN_METADATA_KEY}


def test_inspect_of_the_folder_mid_run_is_not_a_checkpoint(s3c, src):
    """`inspect` of the output during a fresh run: refused (no config.json), never a partial model."""
    results: list[Result] = []

    def inspect_once(nbytes: int) -> None:
        if not results:
            results.append(CliRunner().invoke(cli, ["inspect", "s3://out/midinspect"]))

    api.run_job(
        api.plan_expand(src, **SEED_KW),
        "s3://out/midinspect",
        command="expand",
        options=WriteOptions(progress=inspect_once),
    )
    assert results[0].exit_code != 0, results[0].output
    assert "Traceback" not in results[0].output


def test_an_http_source_with_no_version_at_all_is_checked_by_its_bytes(s3c, src, src2, tmp_path, monkeypatch):
    """Neither ETag nor Last-Modified: a rerun cannot tell a changed source by its version, so it
    compares each kept shard with the source's bytes (and says why): none of the interrupted run's
    shards holds the new weights, so none is kept, and the output is the new weights'."""
    served = tmp_path / "served" / "m"
    served.mkdir(parents=True)
    for path in src.iterdir():
        (served / path.name).write_bytes(path.read_bytes())
    with http_without_etag(tmp_path / "served", monkeypatch, dated=False) as base:
        url = f"{base}/ok/m/"
        job = api.plan_expand(url, **SEED_KW)
        assert {v.validator for v in job.versions} == {None}
        with pytest.raises(KeyboardInterrupt):
            api.run_job(job, "s3://out/g7b", command="expand", options=WriteOptions(progress=stop_after(60_000_000)))
        for path in src2.iterdir():
            (served / path.name).write_bytes(path.read_bytes())
        result = api.run_job(api.plan_expand(url, **SEED_KW), "s3://out/g7b", command="expand")
    assert result.shards_reused == 0
    assert any("gives neither an ETag nor a Last-Modified time" in note for note in result.notes), result.notes
    want = local_output(src2, SEED, tmp_path / "want")
    got = objects(s3c, "out", "g7b/")
    assert [n for n in want if n.endswith(".safetensors") and got[n] != want[n]] == []
