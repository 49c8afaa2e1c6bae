"""The S3 output at its edges (sources, resume, two runs, parts, odd URLs), from a red-team pass on
``--out s3://...``: each test asserts a promise of the S3 output (DESIGN.md and the issue). Each
finding of the pass (F1-F13) failed here before its fix; they now guard against its return.

Against a real SeaweedFS started here (tests/_servers.py). Each test uses buckets or prefixes of its
own, so a test that destroys data (the findings) cannot disturb another.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SEED, SHAPE, server_with_a_model, stop_after
from _s3kit import objects as all_objects
from _servers import SeaweedFS, create_bucket, s3_environment, upload_folder
from click.testing import CliRunner, Result
from conftest import write_tiny_checkpoint

from shardsurgeon import (
    CheckpointError,
    Copy,
    OutputError,
    PlacedTensor,
    PlannedTensor,
    ShardLayout,
    TensorRef,
    WriteOptions,
    api,
)
from shardsurgeon.cli import cli
from shardsurgeon.write import run as run_module
from shardsurgeon.write.s3 import destination as s3output
from shardsurgeon.write.s3 import objects as s3folder
from shardsurgeon.write.s3.parts import MADE_PART_BYTES, MIN_PART_BYTES, Copied, Joined, Made, plan_parts, sent_nbytes

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")

TESTS = Path(__file__).parent
MiB = 1 << 20

objects = functools.partial(all_objects, keep_prefix=True)
"""Objects by their whole key."""


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[SeaweedFS, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("s3red")) as served:
        yield served


def bucket(server: Any, name: str, uploads: dict[str, Path] | None = None) -> str:
    """A fresh bucket ``name`` holding ``uploads`` (prefix -> local folder)."""
    endpoint = server[0].endpoint
    create_bucket(endpoint, name)
    for prefix, folder in (uploads or {}).items():
        upload_folder(endpoint, name, prefix, folder)
    return name


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def uploads(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def local_shards(src: Path, flags: tuple[str, ...], out: Path) -> dict[str, bytes]:
    assert run("expand", "--src", src, *flags, "--out", out, "-q").exit_code == 0
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}


# --- the source is written to: found on eb84dbf (F1, F2), fixed on main by 35a27fb meanwhile ---


def test_force_onto_the_source_prefix_is_refused_and_the_source_kept(s3, server, tmp_path):
    """F1 on eb84dbf: _prepare removed the source's config.json and model.safetensors, then the copy
    from it failed with NoSuchKey: the source was destroyed."""
    single = tmp_path / "single"
    write_tiny_checkpoint(single, layers=2, shards=1, **SHAPE)
    name = bucket(server, "same", {"m": single})
    before = objects(s3, name)
    result = run("expand", "--src", f"s3://{name}/m", "--dup", "1x1", "--out", f"s3://{name}/m", "--force")
    assert objects(s3, name) == before
    assert result.exit_code != 0 and "source" in result.output


@pytest.mark.parametrize("out", ["s3://{b}/team", "s3://{b}"])
def test_an_output_containing_the_source_is_refused(s3, server, src, out):
    """F1 on eb84dbf: the final cleanup removed every listed object not published: the source, and
    with the bucket root every object of the bucket."""
    name = bucket(server, "contains" + str(len(out)), {"team/src": src})
    s3.put_object(Bucket=name, Key="team/notes/precious.txt", Body=b"someone's work")
    before = objects(s3, name)
    result = run("expand", "--src", f"s3://{name}/team/src", *SEED, "--out", out.format(b=name), "--force")
    assert objects(s3, name) == before
    assert result.exit_code != 0 and "source" in result.output


def test_an_output_inside_the_source_is_refused(s3, server, src):
    """F2 on eb84dbf: written inside the source prefix."""
    name = bucket(server, "inside", {"src": src})
    result = run("expand", "--src", f"s3://{name}/src", *SEED, "--out", f"s3://{name}/src/expanded")
    assert result.exit_code != 0 and "inside the source" in result.output
    assert not [key for key in objects(s3, name) if key.startswith("src/expanded/")]


# --- findings: resume keeps shards that are not this run's ------------------------------------


def test_force_interrupted_then_rerun_does_not_keep_the_replaced_checkpoints_shards(s3, src, src2, tmp_path):
    url = "s3://out/forced"
    first = api.plan_expand(src, dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    api.run_job(first, url, command="expand")
    second = api.plan_expand(src2, dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(second, url, command="expand", options=WriteOptions(force=True, progress=stop_after(1)))
    api.run_job(second, url, command="expand", options=WriteOptions(force=True))
    want = local_shards(src2, SEED, tmp_path / "want")
    got = objects(s3, "out", "forced/")
    assert [name for name in want if got[f"forced/{name}"] != want[name]] == []


def test_an_s3_source_replaced_between_runs_is_not_mixed_into_the_output(s3, server, src, src2, tmp_path):
    name = bucket(server, "finetune", {"m": src})
    url = "s3://out/fine-tuned"
    job = api.plan_expand(f"s3://{name}/m", dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, url, command="expand", options=WriteOptions(progress=stop_after(60_000_000)))
    upload_folder(server[0].endpoint, name, "m", src2)  # the newer weights, same shapes
    job = api.plan_expand(f"s3://{name}/m", dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    api.run_job(job, url, command="expand")
    want = local_shards(src2, SEED, tmp_path / "want")
    got = objects(s3, "out", "fine-tuned/")
    assert [name for name in want if got[f"fine-tuned/{name}"] != want[name]] == []


# --- findings: two runs, one folder -----------------------------------------------------------


def test_a_run_taken_over_while_writing_its_small_files_leaves_the_winners_files_alone(s3, src, monkeypatch):
    """Another run takes the claim over (as after a stall longer than the lease, or a holder whose pid
    it cannot see: tests below) and publishes while this one is in write_small_files."""
    job = api.plan_expand(src, dups=[(1, 2)], max_shard_bytes=30_000_000)
    winner = {
        "raced2/config.json": b'{"winner": true}',
        "raced2/model.safetensors.index.json": b'{"winner": true}',
        "raced2/README.md": b"the winner's card",
    }
    write_small_files = run_module.write_small_files

    def taken_over_meanwhile(*args: Any, **kwargs: Any) -> None:
        claim = {"run": "the-other-run", "host": "elsewhere", "pid": 1, "renewed": "now"}
        s3.put_object(Bucket="out", Key="raced2/.shardsurgeon-lock", Body=json.dumps(claim).encode())
        for key, body in winner.items():
            s3.put_object(Bucket="out", Key=key, Body=body)
        write_small_files(*args, **kwargs)

    monkeypatch.setattr(run_module, "write_small_files", taken_over_meanwhile)
    with pytest.raises(OutputError, match="another run"):
        api.run_job(job, "s3://out/raced2", command="expand")
    left = objects(s3, "out", "raced2/")
    assert {key: left.get(key) for key in winner} == winner


def test_a_live_claim_of_another_pid_namespace_on_this_host_is_not_taken_over(s3, src):
    from shardsurgeon.write.s3 import claim as s3lock

    claim = {"run": "live-elsewhere", "host": s3lock.socket.gethostname(), "pid": 4_000_000, "renewed": "now"}
    s3.put_object(Bucket="out", Key="pidns/.shardsurgeon-lock", Body=json.dumps(claim).encode())
    result = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/pidns")
    assert result.exit_code == 1 and "another shardsurgeon run" in result.output


# --- findings: a refused run has side effects -------------------------------------------------


def test_a_refused_run_leaves_other_tools_uploads_alone(s3, src):
    s3.put_object(Bucket="out", Key="busy/notes.txt", Body=b"mine")
    upload = s3.create_multipart_upload(Bucket="out", Key="busy/video.bin")
    s3.upload_part(Bucket="out", Key="busy/video.bin", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * MiB)
    result = run("expand", "--src", src, *SEED, "--out", "s3://out/busy")
    assert result.exit_code == 1 and "already holds 1 objects" in result.output
    assert uploads(s3, "out", "busy/") == ["busy/video.bin"]


# --- findings: parts ----------------------------------------------------------------------------


def small_tensor_source(folder: Path) -> Path:
    """Tensors all under 5 MiB (SmolLM-135M-like widths): the pieces between zeros are all small."""
    write_tiny_checkpoint(folder, layers=2, shards=1, hidden=576, intermediate=1536, kv=192, vocab=4000)
    return folder


def test_parts_made_here_stay_bounded(tmp_path):
    src = small_tensor_source(tmp_path / "small")
    job = api.plan_expand(src, dups=[(1, 60)], zero=["o_proj", "down_proj"], max_shard_bytes=5_000_000_000)
    largest = max(p.nbytes for s in job.layout.shards for p in plan_parts(s, "s3://o/z/.zeros") if isinstance(p, Made))
    assert largest <= MADE_PART_BYTES + MIN_PART_BYTES, f"a made part of {largest / MiB:.0f} MiB"


def s3_copies(sizes: list[int]) -> ShardLayout:
    """A shard of copies from an S3 source, each its own range (the source has gaps between them)."""
    placed, offset, start = [], 1000, 8
    for number, nbytes in enumerate(sizes):
        ref = TensorRef(f"t{number}", "s3://m/src/model.safetensors", "U8", (nbytes,), start, nbytes)
        placed.append(PlacedTensor(PlannedTensor(f"t{number}", "U8", (nbytes,), Copy(), ref, "m"), offset))
        offset, start = offset + nbytes, start + nbytes + 8
    return ShardLayout("model.safetensors", b" " * 1000, tuple(placed))


def server_copied(part: Any) -> int:
    """Bytes the server copies to produce ``part``: a joined part is assembled level by level, each
    level copying the whole object below it (iterative: chains are deep)."""
    total = part.nbytes if isinstance(part, Copied | Joined) else 0
    while isinstance(part, Joined):
        total += part.tail.nbytes if isinstance(part.tail, Copied) else 0
        part = part.base
        total += part.nbytes if isinstance(part, Copied | Joined) else 0
    return total


def test_server_side_copy_stays_linear_in_the_shard_size():
    shard = s3_copies([12 * MiB] + [256 << 10] * 200)
    copied = sum(server_copied(p) for p in plan_parts(shard, None))
    assert copied <= 3 * shard.nbytes, f"{copied / shard.nbytes:.0f} times the shard"


def test_many_small_copies_do_not_hit_the_recursion_limit():
    """One level of joining (F8 was a chain of 1,500): small pieces past the first are sent, no more."""
    small = [64 << 10] * 1500
    parts = plan_parts(s3_copies([12 * MiB, *small]), None)
    assert sum(sent_nbytes(p) for p in parts) <= sum(small) + 2 * MIN_PART_BYTES
    assert all(not isinstance(p, Joined) or isinstance(p.base, Copied) for p in parts)


# --- findings: odd URLs, listing, leftovers, messages -----------------------------------------


def test_a_url_with_an_empty_segment_is_refused_or_kept_clean(s3, src):
    first = run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/a//b", "-q")
    if first.exit_code != 0:  # refused up front: fine, and nothing written
        assert objects(s3, "out", "a/") == {} and objects(s3, "out", "a//") == {}
        return
    assert ".shardsurgeon-resume" not in "".join(objects(s3, "out", "a/"))
    index = objects(s3, "out", "a/b/")["a/b/model.safetensors.index.json"]
    second = run("expand", "--src", src, "--dup", "1x3", "--out", "s3://out/a//b")
    assert second.exit_code == 1 and "already holds a checkpoint" in second.output
    assert objects(s3, "out", "a/b/")["a/b/model.safetensors.index.json"] == index


def test_force_over_a_crowded_prefix_replaces_it(s3, src, monkeypatch):
    monkeypatch.setattr(s3output, "MAX_LISTED", 10)  # stands for 100,000: the listing's first page is 1,000
    assert run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/crowded", "-q").exit_code == 0
    for number in range(1005):
        s3.put_object(Bucket="out", Key=f"crowded/a/{number:05}", Body=b"")
    result = run("expand", "--src", src, *SEED, "--out", "s3://out/crowded", "--force")
    assert result.exit_code == 0, result.output


def test_verify_takes_the_s3_output_it_wrote(s3, src):
    """F11 on eb84dbf: 's3:/out/ck: no such folder' (the URL made a Path); main has verify by URL (d7067c3)."""
    assert run("expand", "--src", src, *SEED, "--checksums", "--out", "s3://out/ck", "-q").exit_code == 0
    result = run("verify", "s3://out/ck")
    assert "s3:/out" not in result.output
    assert result.exit_code == 0, result.output


def test_a_garbage_claim_is_one_line(s3, src):
    holder = {"host": os.uname().nodename, "pid": 10**20}
    s3.put_object(Bucket="out", Key="garbage/.shardsurgeon-lock", Body=json.dumps(holder).encode())
    result = CliRunner().invoke(cli, ["expand", "--src", str(src), "--dup", "0x1", "--out", "s3://out/garbage"])
    assert result.exit_code == 1
    assert "internal error" not in result.output and "another shardsurgeon run" in result.output


def test_a_run_stopped_right_after_publishing_leaves_nothing_after_a_rerun(s3, src, monkeypatch):
    put = s3folder.S3Folder.put

    def stop_after_config(self: Any, name: str, data: bytes, create: bool = False) -> int:
        sent = put(self, name, data, create)
        if name == "config.json":
            raise KeyboardInterrupt
        return sent

    monkeypatch.setattr(s3folder.S3Folder, "put", stop_after_config)
    job = api.plan_expand(src, dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://out/stopped-late", command="expand")
    monkeypatch.setattr(s3folder.S3Folder, "put", put)
    run("expand", "--src", src, *SEED, "--out", "s3://out/stopped-late")
    assert [key for key in objects(s3, "out", "stopped-late/") if "/.shardsurgeon" in key] == []


# --- what held up (regression guards) -----------------------------------------------------------


def test_a_sibling_prefix_that_extends_the_name_is_untouched(s3, src):
    """s3://out/pfx must not see, refuse for, remove or abort anything of s3://out/pfx2/."""
    assert run("expand", "--src", src, *SEED, "--out", "s3://out/pfx2", "-q").exit_code == 0
    upload = s3.create_multipart_upload(Bucket="out", Key="pfx2/inflight.bin")
    s3.put_object(Bucket="out", Key="pfx.txt", Body=b"a sibling file")
    before = objects(s3, "out", "pfx2/") | objects(s3, "out", "pfx.txt")
    assert run("expand", "--src", src, "--dup", "0x1", "--out", "s3://out/pfx", "-q").exit_code == 0
    assert objects(s3, "out", "pfx2/") | objects(s3, "out", "pfx.txt") == before
    assert uploads(s3, "out", "pfx2/") == ["pfx2/inflight.bin"]
    s3.abort_multipart_upload(Bucket="out", Key="pfx2/inflight.bin", UploadId=upload["UploadId"])


def test_two_processes_started_together_one_publishes_the_other_is_refused(s3, server, src, tmp_path):
    env = {**os.environ, **s3_environment(server[0].endpoint)}
    recipes = [[*SEED], ["--dup", "0x3", "--max-shard-size", "20MB"]]
    command = [sys.executable, "-m", "shardsurgeon", "expand", "--src", str(src)]
    processes = [
        subprocess.Popen([*command, *flags, "--out", "s3://out/both", "-q"], env=env, stderr=subprocess.PIPE, text=True)
        for flags in recipes
    ]
    results = [(p.wait(600), p.stderr.read()) for p in processes]  # type: ignore[union-attr]
    assert sorted(code for code, _ in results) == [0, 1], results
    winner = recipes[[code for code, _ in results].index(0)]
    want = local_shards(src, tuple(winner), tmp_path / "want")
    got = {k.removeprefix("both/"): v for k, v in objects(s3, "out", "both/").items() if k.endswith(".safetensors")}
    assert got == want
    assert "another shardsurgeon run" in next(err for code, err in results if code == 1)


CASTS = [("--every", "1", "--dtype", "float32", "--max-shard-size", "40MB"), ("--dup", "0x1", "--dtype", "float16")]


@pytest.mark.parametrize("flags", CASTS)
def test_cast_parts_split_mid_element_are_exact(s3, src, tmp_path, flags):
    """ShardBytes.fill of arbitrary ranges (part boundaries fall mid-element) equals the local output."""
    import random

    from shardsurgeon.storage.remote import SourceFiles
    from shardsurgeon.write.s3.uploads import ShardBytes, Workspace

    out = tmp_path / "local"
    assert run("expand", "--src", src, *flags, "--out", out, "-q").exit_code == 0
    kwargs: dict[str, Any] = {"dtype": flags[flags.index("--dtype") + 1]}
    kwargs |= {"every": 1, "max_shard_bytes": 40_000_000} if "--every" in flags else {"dups": [(0, 1)]}
    job = api.plan_expand(src, **kwargs)
    rng = random.Random(7)
    with SourceFiles() as files:
        for shard in job.layout.shards:
            data, made = (out / shard.name).read_bytes(), ShardBytes(shard, files)
            for _ in range(100):
                start = rng.randrange(shard.nbytes)
                view = bytearray(rng.randrange(1, min(shard.nbytes - start, 3_000_000) + 1))
                made.fill(start, memoryview(view), Workspace())
                assert view == data[start : start + len(view)], (shard.name, start, len(view))


def test_an_s3_source_replaced_during_a_run_stops_it_before_anything_mixed_is_published(s3, server, src, src2):
    """Each server-side copy names the source's ETag as the plan read it: the first copy after the
    new upload fails, in one line, and the rerun (a new job: new ETags) writes the new weights."""
    name = bucket(server, "midrun", {"m": src})
    url = "s3://out/midrun"
    job = api.plan_expand(f"s3://{name}/m", dups=[(1, 2)], zero=["o_proj", "down_proj"], max_shard_bytes=30_000_000)
    replaced = False

    def upload_new_weights(nbytes: int) -> None:
        nonlocal replaced
        if not replaced:
            replaced = True
            upload_folder(server[0].endpoint, name, "m", src2)

    with pytest.raises(
        CheckpointError, match=r"s3://midrun/m/model-0000\d-of-00002\.safetensors: changed during the run"
    ):
        api.run_job(job, url, command="expand", options=WriteOptions(progress=upload_new_weights))
    assert "config.json" not in objects(s3, "out", "midrun/") and uploads(s3, "out", "midrun/") == []
