"""What is published is what was planned, on every destination and in every mode: the sources are
the versions the plan saw, a kept shard is proven to hold the planned bytes, and nothing that is a
source is written or removed, however it is named.

Through the CLI against real servers: a SeaweedFS (S3, and its plain-HTTP URLs) and a web server
whose ETags are made from a file's time and size, as nginx makes them. Each scenario is one a user
or an attacker can produce: a source rewritten in place with its times put back (``rsync -a``,
``cp -p``, ``touch -r``) or uploaded again between two writers, a byte damaged in a staged shard, a
source named by another spelling of the output's URL or path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3kit import SMALL_SEED as SEED
from _s3kit import SMALL_SHAPE, objects, server_with_a_model
from _servers import upload_folder
from click.testing import CliRunner, Result
from conftest import folder_bytes

from shardsurgeon import SourceVersion
from shardsurgeon.cli import cli

pytest.importorskip("boto3", reason="the remote extra (boto3) is not installed")


@pytest.fixture(scope="module")
def server(seaweed_session, tmp_path_factory) -> Iterator[tuple[Any, Path, Path]]:
    with server_with_a_model(seaweed_session, tmp_path_factory.mktemp("published"), SMALL_SHAPE) as served:
        yield served


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result: Result, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in result.output, result.output


def reference(src: Path, out: Path) -> dict[str, bytes]:
    """What one process writes to a local folder named as the output is (the card names it)."""
    assert run("expand", "--src", src, *SEED, "--out", out, "-q").exit_code == 0
    return folder_bytes(out)


def rewrite_keeping_times(path: Path, data: bytes) -> None:
    """``path`` given other bytes of the same size, its access and modification times put back."""
    before = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def first_shard_of(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


# --- what a version proves ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "validator", "proves"),
    [
        ("/models/m/model.safetensors", None, True),
        ("s3://models/m/model.safetensors", '"0cc175b9c0f1b6a831c399e269772661"', True),
        ("s3://models/m/model.safetensors", '"7b1f0b5c1b9c4c6ca2f8d3fa5e2ad2d1-12"', True),
        ("s3://models/m/model.safetensors", '"opaque-kms-etag"', True),
        ("https://huggingface.co/o/n/resolve/main/model.safetensors", f'"{"ab" * 32}"', True),
        ("https://huggingface.co/o/n/resolve/main/model.safetensors", '"5f1e2d3c-2a3b4c"', False),
        ("https://host/m/model.safetensors", '"0cc175b9c0f1b6a831c399e269772661"', False),  # FastAPI: md5(mtime-size)
        ("https://host/m/model.safetensors", '"5f1e2d3c-2a3b4c"', False),  # nginx: mtime-size in hex
        ("https://host/m/model.safetensors", '"2a3b4c-5f1e2d3c5e7a0"', False),  # Apache: size-mtime
        ("https://host/m/model.safetensors", 'W/"0cc175b9c0f1b6a831c399e269772661"', False),
        ("https://host/m/model.safetensors", "last-modified 2026-01-01T00:00:00+00:00", False),
        ("https://host/m/model.safetensors", None, False),
        ("s3://models/m/model.safetensors", 'W/"abc"', False),
    ],
)
def test_a_version_proves_the_bytes_only_by_a_content_digest(where, validator, proves):
    version = SourceVersion(where, 100, "0" * 64, validator=validator)
    assert version.proves_bytes is proves
    assert (version.weakness is None) is proves


# --- sources are the versions planned, for every writer -----------------------------------------


@pytest.mark.parametrize(
    ("change", "said"),
    [("rewritten in place", "modification time put back"), ("replaced by another file", "replaced by another file")],
)
def test_a_local_source_changed_with_its_times_put_back_between_writers_is_refused(tmp_path, server, change, said):
    src = tmp_path / "src"
    shutil.copytree(server[1], src)
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    assert run("expand", "--src", src, *SEED, "--plan-json", plan).exit_code == 0
    assert run("apply", plan, out, "--shards", "1/2", "-q").exit_code == 0
    shard = first_shard_of(src)
    other = bytes(b ^ 1 if i > 4096 else b for i, b in enumerate(shard.read_bytes()))  # header kept
    if change == "rewritten in place":
        rewrite_keeping_times(shard, other)
    else:  # rsync -a: a new file renamed over the old one, with its times
        stat = shard.stat()
        (tmp_path / "new").write_bytes(other)
        os.utime(tmp_path / "new", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(tmp_path / "new", shard)
    one_line_error(run("apply", plan, out, "--shards", "2/2"), f"{shard.name}: changed since the plan", said)
    one_line_error(run("apply", plan, out, "--finalize"), f"{shard.name}: changed since the plan")
    assert not out.exists()


def test_an_s3_source_uploaded_again_between_writers_is_refused(s3, server, tmp_path):
    weed, src, src2 = server
    upload_folder(weed.endpoint, "models", "again", src)
    plan = tmp_path / "plan.json"
    assert run("expand", "--src", "s3://models/again", *SEED, "--plan-json", plan).exit_code == 0
    assert run("apply", plan, "s3://out/again", "--shards", "1/2", "-q").exit_code == 0
    upload_folder(weed.endpoint, "models", "again", src2)  # the same names, sizes and headers
    one_line_error(run("apply", plan, "s3://out/again", "--shards", "2/2"), "changed since the plan")
    one_line_error(run("apply", plan, "s3://out/again", "--finalize"), "changed since the plan")
    assert "config.json" not in objects(s3, "out", "again/")


# --- a source by URL whose ETag is only its time and size ---------------------------------------


@contextlib.contextmanager
def nginx_like(root: Path, monkeypatch: Any) -> Iterator[str]:
    """The test web server answering with ETags as nginx makes them: mtime and size in hex."""
    import _servers

    make = _servers._handler

    def handler(served: Path, log: Any) -> Any:
        base = make(served, log)

        class NginxETags(base):  # type: ignore[misc, valid-type]
            def _reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                if "ETag" in headers:
                    path = served / self.path.lstrip("/").partition("/")[2]
                    stat = path.stat()
                    headers = headers | {"ETag": f'"{int(stat.st_mtime):x}-{stat.st_size:x}"'}
                super()._reply(status, data, headers, body)

        return NginxETags

    monkeypatch.setattr(_servers, "_handler", handler)
    with _servers.serve_http(root) as http:
        yield http.url


def interrupted(*args: str | Path) -> None:
    """The command run and stopped as by Ctrl-C once a third of its bytes are written."""
    done = []

    def stop(nbytes: int) -> None:
        done.append(nbytes)
        if sum(done) > 120_000:
            raise KeyboardInterrupt

    from shardsurgeon.cli import write as write_command

    real = write_command.show.progress

    @contextlib.contextmanager
    def stopping(layout: Any, quiet: bool) -> Iterator[Any]:
        with real(layout, True) as (_, on_shard):
            yield stop, on_shard

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(write_command.show, "progress", stopping)
        assert run(*args).exit_code == 130


@pytest.mark.parametrize("out_kind", ["local", "s3"])
def test_a_resume_from_a_source_with_time_and_size_etags_checks_its_bytes(s3, server, tmp_path, monkeypatch, out_kind):
    """A rerun after the source was rewritten with its times put back (its ETag unchanged) keeps no
    shard made from the old bytes; one after no change keeps them, having compared them."""
    _, src, src2 = server
    served = tmp_path / "served" / "m"
    shutil.copytree(src, served)
    out = tmp_path / "out" if out_kind == "local" else f"s3://out/nginx-{out_kind}"
    with nginx_like(tmp_path / "served", monkeypatch) as base:
        url = f"{base}/ok/m/"
        interrupted("expand", "--src", url, *SEED, "--out", out)
        for path in src2.iterdir():  # the new weights, same sizes, the old times
            rewrite_keeping_times(served / path.name, path.read_bytes())
        result = run("expand", "--src", url, *SEED, "--out", out)
        assert result.exit_code == 0, result.output
        assert "kept" not in result.output.splitlines()[-1]
        assert "is not known to be a digest of the content" in result.output
    want = reference(src2, tmp_path / "ref" / ("out" if out_kind == "local" else f"nginx-{out_kind}"))
    got = folder_bytes(Path(out)) if out_kind == "local" else objects(s3, "out", f"nginx-{out_kind}/")
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


def test_a_resume_from_an_unchanged_source_with_time_and_size_etags_keeps_its_shards(s3, server, tmp_path, monkeypatch):
    _, src, _ = server
    shutil.copytree(src, tmp_path / "served" / "m")
    with nginx_like(tmp_path / "served", monkeypatch) as base:
        interrupted("expand", "--src", f"{base}/ok/m/", *SEED, "--out", "s3://out/nginx-same")
        result = run("expand", "--src", f"{base}/ok/m/", *SEED, "--out", "s3://out/nginx-same")
    assert result.exit_code == 0 and "kept" in result.output.splitlines()[-1], result.output
    assert "were compared with it byte for byte" in result.output
    want = reference(src, tmp_path / "ref" / "nginx-same")
    assert objects(s3, "out", "nginx-same/") == want


# --- a kept shard is proven, in every mode ------------------------------------------------------


def damage_one_byte(path: Path) -> None:
    """One byte of tensor data changed, the size, header and times left as they were."""
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x40
    rewrite_keeping_times(path, bytes(data))


def test_a_staged_shard_damaged_before_finalize_is_not_published(server, tmp_path):
    src = server[1]
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    assert run("expand", "--src", src, *SEED, "--plan-json", plan).exit_code == 0
    for part in ("1/2", "2/2"):
        assert run("apply", plan, out, "--shards", part, "-q").exit_code == 0
    staged = first_shard_of(tmp_path / ".out.shardsurgeon-partial")
    damage_one_byte(staged)
    one_line_error(run("apply", plan, out, "--finalize"), "1 of", "not the planned bytes", staged.name)
    assert not out.exists()
    again = run("apply", plan, out, "--shards", "1/2")  # the writer run again finds the damage and rewrites
    assert again.exit_code == 0, again.output
    assert run("apply", plan, out, "--finalize", "-q").exit_code == 0
    assert folder_bytes(out) == reference(src, tmp_path / "ref" / "out")


def test_an_s3_shard_replaced_before_finalize_is_not_published(s3, server, tmp_path):
    """An object replaced under a finished shard's name, with its size, header and metadata, is not
    the one its writer recorded: finalize refuses it, a writer run again writes it anew."""
    src = server[1]
    plan, url = tmp_path / "plan.json", "s3://out/replaced"
    assert run("expand", "--src", src, *SEED, "--plan-json", plan).exit_code == 0
    for part in ("1/2", "2/2"):
        assert run("apply", plan, url, "--shards", part, "-q").exit_code == 0
    name = sorted(n for n in objects(s3, "out", "replaced/") if "/" not in n and n.endswith(".safetensors"))[0]
    head = s3.head_object(Bucket="out", Key=f"replaced/{name}")
    data = bytearray(s3.get_object(Bucket="out", Key=f"replaced/{name}")["Body"].read())
    data[-1000] ^= 0x40
    s3.put_object(Bucket="out", Key=f"replaced/{name}", Body=bytes(data), Metadata=head["Metadata"])
    one_line_error(run("apply", plan, url, "--finalize"), "not the planned bytes", name)
    assert "config.json" not in objects(s3, "out", "replaced/")
    assert run("apply", plan, url, "--shards", "1/2", "-q").exit_code == 0
    assert run("apply", plan, url, "--shards", "2/2", "-q").exit_code == 0
    assert run("apply", plan, url, "--finalize", "-q").exit_code == 0
    assert objects(s3, "out", "replaced/") == reference(src, tmp_path / "ref" / "replaced")


def test_a_whole_run_keeps_what_writers_of_the_same_plan_proved(server, tmp_path):
    src = server[1]
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    assert run("expand", "--src", src, *SEED, "--plan-json", plan).exit_code == 0
    assert run("apply", plan, out, "--shards", "1/2", "-q").exit_code == 0
    result = run("apply", plan, out)
    assert result.exit_code == 0 and "kept" in result.output.splitlines()[-1], result.output
    assert folder_bytes(out) == reference(src, tmp_path / "ref" / "out")


# --- nothing that is a source is touched, however it is named -----------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "http://127.0.0.1:{port}/models/{name}/",
        "http://localhost:{port}/models/{name}/",
        "http://127.0.0.1:{port}/models/other/../{name}/",
        "http://127.0.0.1:{port}/mod%65ls/{name}/",
    ],
)
def test_a_source_named_by_the_stores_http_url_is_never_the_output(s3, server, spelling):
    weed, src, _ = server
    name = "spelt" + str(abs(hash(spelling)) % 10_000)
    upload_folder(weed.endpoint, "models", name, src)
    before = objects(s3, "models", f"{name}/")
    url = spelling.format(port=weed.endpoint.rpartition(":")[2], name=name)
    for out in (f"s3://models/{name}", f"s3://models/{name}/inside", "s3://models"):
        result = run("expand", "--src", url, *SEED, "--out", out, "--force")
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "the source is never written to" in result.output or "contains the source folder" in result.output
    assert objects(s3, "models", f"{name}/") == before


def test_an_object_with_a_source_files_size_and_etag_is_never_removed(s3, server):
    """A source reached under another name (a CDN, a proxy) cannot be recognized by its address:
    an object about to be replaced whose size and ETag are a source file's is taken to be it."""
    weed, src, _ = server
    upload_folder(weed.endpoint, "out", "mirror", src)  # the output folder holds the very shard objects
    before = objects(s3, "out", "mirror/")
    result = run("expand", "--src", "s3://models/src", *SEED, "--out", "s3://out/mirror", "--force")
    assert result.exit_code == 2 and "holds the bytes of the source file" in result.output, result.output
    assert objects(s3, "out", "mirror/") == before


def test_a_source_file_hard_linked_into_the_output_is_never_removed(tmp_path, server):
    src = tmp_path / "src"
    shutil.copytree(server[1], src)
    out = tmp_path / "out"
    out.mkdir()
    shard = first_shard_of(src)
    os.link(shard, out / "old.safetensors")
    before = shard.read_bytes()
    result = run("expand", "--src", src, *SEED, "--out", out, "--force")
    assert result.exit_code == 2 and "a hard link or a bind mount" in result.output, result.output
    assert (out / "old.safetensors").exists() and shard.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="bind mounts need root")
def test_a_source_folder_bind_mounted_into_the_output_is_never_removed(tmp_path, server):
    src = tmp_path / "src"
    shutil.copytree(server[1], src)
    out = tmp_path / "out"
    (out / "mirror").mkdir(parents=True)
    before = folder_bytes(src)
    if subprocess.run(["mount", "--bind", src, out / "mirror"], capture_output=True).returncode:
        pytest.skip("mount --bind is not permitted here")
    try:
        result = run("expand", "--src", src, *SEED, "--out", out, "--force")
        assert result.exit_code == 2 and "a hard link or a bind mount" in result.output, result.output
    finally:
        subprocess.run(["umount", out / "mirror"], check=True)
    assert folder_bytes(src) == before
