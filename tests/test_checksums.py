"""--checksums: every tensor's CRC-32 recorded with the output, so verify without the sources tells
a damaged byte; the record follows the bytes as written, whoever wrote them."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from conftest import read_tensors, run_cli

SHARDED = ["--dup", "3x1", "--zero", "o_proj", "--max-shard-size", "2KB"]


def expand(src: Path, out: Path, *args: str) -> Path:
    result = run_cli("expand", "--src", src, "--out", out, "-q", *args)
    assert result.exit_code == 0, result.output
    return out


def test_the_record_holds_each_tensors_crc_of_its_bytes(tmp_path, tiny):
    src, _ = tiny
    out = expand(src, tmp_path / "out", *SHARDED, "--checksums")
    record = json.loads((out / "shardsurgeon.checksums.json").read_text())
    assert record["algorithm"] == "crc32"
    expected = {}
    for name, (_, _, blob, shard, _) in read_tensors(out).items():
        expected.setdefault(shard, {})[name] = f"{zlib.crc32(blob):08x}"
    assert record["shards"] == expected
    result = run_cli("verify", out)
    assert result.exit_code == 0 and f"{len(read_tensors(out))} tensors checked against their recorded checksums" in (
        result.output
    )


def test_a_flipped_byte_is_caught_without_the_sources(tmp_path, tiny):
    src, _ = tiny
    out = expand(src, tmp_path / "out", *SHARDED, "--checksums")
    name, (_, _, blob, shard, offset) = next(
        (n, t) for n, t in read_tensors(out).items() if t[2].strip(b"\0") and n.endswith("up_proj.weight")
    )
    path = out / shard
    data = bytearray(path.read_bytes())
    data[offset + len(blob) - 1] ^= 0x01
    path.write_bytes(bytes(data))
    result = run_cli("verify", out)
    assert result.exit_code == 1
    assert f"{shard}: tensor {name!r}: CRC-32 is" in result.output and "its bytes changed since they were written" in (
        result.output
    )


def test_without_the_flag_there_is_no_record_and_the_bytes_are_the_same(tmp_path, tiny):
    src, _ = tiny
    plain = expand(src, tmp_path / "plain", *SHARDED)
    checked = expand(src, tmp_path / "checked", *SHARDED, "--checksums")
    assert not (plain / "shardsurgeon.checksums.json").exists()
    shards = sorted(p.name for p in plain.glob("*.safetensors"))
    assert shards == sorted(p.name for p in checked.glob("*.safetensors"))
    assert all((plain / s).read_bytes() == (checked / s).read_bytes() for s in shards)
