"""`shardsurgeon verify`: clean outputs pass; every kind of damage is listed, one line per tensor or file."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import read_tensors, run_cli, write_tiny_checkpoint

from shardsurgeon import verify_checkpoint

SHARDED = ["--dup", "3x2", "--zero", "o_proj", "--max-shard-size", "2KB"]


def expand(src: Path, out: Path, *args: str) -> Path:
    result = run_cli("expand", "--src", src, "--out", out, "-q", *args)
    assert result.exit_code == 0, result.output
    return out


def verify(folder: Path, *sources: Path) -> tuple[int, list[str]]:
    args: list[str | Path] = ["verify", folder]
    for source in sources:
        args += ["--src", source]
    result = run_cli(*args)
    assert "Traceback" not in result.output
    return result.exit_code, result.output.splitlines()


def problems(lines: list[str]) -> list[str]:
    """The mismatch lines, without the summary line."""
    assert lines[-1].startswith("shardsurgeon verify: ")
    return [line for line in lines[:-1] if not line.startswith("note: ")]


def rewrite_bytes(path: Path, tensor: str, change) -> None:
    """Apply ``change`` to the bytes of ``tensor`` in the safetensors file at ``path``, in place."""
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    begin, end = json.loads(blob[8 : 8 + n])[tensor]["data_offsets"]
    blob[8 + n + begin : 8 + n + end] = change(bytes(blob[8 + n + begin : 8 + n + end]))
    path.write_bytes(bytes(blob))


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / read_tensors(folder)[tensor][3]


@pytest.fixture
def made(tmp_path, tiny) -> tuple[Path, Path]:
    """A source and its expansion in four shards, with holes."""
    src, _ = tiny
    return src, expand(src, tmp_path / "out", *SHARDED)


@pytest.mark.parametrize(
    "args",
    [
        ["--dup", "3x1"],
        SHARDED,
        ["--every", "2", "--zero", "o_proj,down_proj", "--dtype", "float16"],
        ["--dup", "0x2", "--dtype", "float16", "--max-shard-size", "1KB"],
        ["--dup", "1x1", "--dtype", "float32", "--zero", "mlp", "--dense"],
    ],
    ids=["one-shard", "several-shards", "float16", "float16-several-shards", "float32-dense"],
)
def test_clean_outputs_pass(tmp_path, tiny, args):
    src, _ = tiny
    out = expand(src, tmp_path / "out", *args)
    count = len(read_tensors(out))
    code, lines = verify(out)
    assert code == 0, lines
    assert lines == [lines[-1]] and lines[-1].startswith(f"shardsurgeon verify: OK: {out}: ")
    assert f"{count} tensors" in lines[-1]
    code, lines = verify(out, src)
    assert code == 0, lines
    assert lines[-1].endswith(f"{count} tensors compared byte for byte with 1 source"), lines


def test_flipped_byte_is_caught_with_the_source(made):
    src, out = made
    name = "model.layers.2.mlp.up_proj.weight"
    rewrite_bytes(shard_of(out, name), name, lambda b: b[:5] + bytes([b[5] ^ 0x01]) + b[6:])
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines) == [
        f"{shard_of(out, name).name}: tensor {name!r}: differs from the source bytes "
        f"({name} of {src / read_tensors(src)[name][3]}) at byte 5 of the tensor"
    ]
    assert lines[-1].startswith(f"shardsurgeon verify: 1 problem: {out}")
    assert verify(out)[0] == 0, "without --src only the structure can be checked"


def test_byte_written_into_a_zero_tensor_is_caught(made):
    src, out = made
    name = "model.layers.4.self_attn.o_proj.weight"
    rewrite_bytes(shard_of(out, name), name, lambda b: b[:-1] + b"\x01")
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines) == [
        f"{shard_of(out, name).name}: tensor {name!r}: holds other bytes than the zeros the recipe gives "
        f"at byte {len(read_tensors(out)[name][2]) - 1} of the tensor"
    ]


def test_flipped_byte_in_a_cast_tensor_is_caught(tmp_path, tiny):
    src, _ = tiny
    out = expand(src, tmp_path / "out", "--dup", "3x1", "--dtype", "float16")
    name = "model.layers.4.mlp.gate_proj.weight"
    rewrite_bytes(shard_of(out, name), name, lambda b: bytes([b[0] ^ 0x80]) + b[1:])
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines) == [
        f"{shard_of(out, name).name}: tensor {name!r}: differs from model.layers.3.mlp.gate_proj.weight of "
        f"{src / read_tensors(src)['model.layers.3.mlp.gate_proj.weight'][3]} cast to F16 at byte 0 of the tensor"
    ]


def test_swapped_pair_of_tensors_is_caught(made):
    src, out = made
    first, second = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    tensors = read_tensors(out)
    assert tensors[first][:2] == tensors[second][:2], "same dtype and shape: the headers cannot tell"
    rewrite_bytes(shard_of(out, first), first, lambda b: tensors[second][2])
    rewrite_bytes(shard_of(out, second), second, lambda b: tensors[first][2])
    code, lines = verify(out, src)
    assert code == 1
    assert sorted(problems(lines)) == sorted(
        f"{shard_of(out, name).name}: tensor {name!r}: differs from the source bytes ({name} of "
        f"{src / read_tensors(src)[name][3]}) at byte 0 of the tensor"
        for name in (first, second)
    )


def test_truncated_shard(made):
    src, out = made
    shard = out / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    for sources in ((), (src,)):
        code, lines = verify(out, *sources)
        assert code == 1
        assert problems(lines) == [
            f"{shard}: tensors cover {shard.stat().st_size + 10 - 8 - _header_nbytes(shard)} data bytes but the "
            f"file holds {shard.stat().st_size - 8 - _header_nbytes(shard)} after the header (runs past the end "
            "of the file); the file is truncated or corrupt"
        ], "one line for the shard, none for each of its tensors"


def _header_nbytes(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_stray_shard_next_to_an_index(made):
    src, out = made
    shutil.copy(out / "model-00001-of-00004.safetensors", out / "model-00005-of-00005.safetensors")
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines) == [
        "model-00005-of-00005.safetensors: stray shard: model.safetensors.index.json maps no tensor to it; "
        "remove it or restore the index"
    ]


def test_stray_shard_next_to_a_single_file(tmp_path):
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=4, shards=1)  # one source file: one output file
    out = expand(src, tmp_path / "out", "--dup", "3x1")
    (out / "model-00001-of-00002.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    code, lines = verify(out)
    assert code == 1
    assert problems(lines) == [
        "model-00001-of-00002.safetensors: stray shard: there is no model.safetensors.index.json, so only "
        "model.safetensors belongs here"
    ]


def test_missing_shard(made):
    src, out = made
    (out / "model-00003-of-00004.safetensors").unlink()
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines)[0].startswith("model-00003-of-00004.safetensors: missing: model.safetensors.index.json")
    assert len(problems(lines)) == 1, "its tensors are not listed one by one"


def test_wrong_total_size(made):
    _, out = made
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 2
    index_path.write_text(json.dumps(index, indent=2))
    code, lines = verify(out)
    assert code == 1
    assert problems(lines) == [
        f"model.safetensors.index.json: metadata.total_size is {right + 2}, expected {right} (the shards' tensor bytes)"
    ]


def test_index_and_shards_disagree(made):
    _, out = made
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = "model.norm.weight"
    dropped = "model.layers.0.input_layernorm.weight"
    actual = index["weight_map"][moved]
    elsewhere = min(shard for shard in index["weight_map"].values() if shard != actual)
    index["weight_map"][moved] = elsewhere
    dropped_from = index["weight_map"].pop(dropped)
    index_path.write_text(json.dumps(index, indent=2))
    code, lines = verify(out)
    assert code == 1
    assert problems(lines) == [
        f"model.safetensors.index.json: tensor {moved!r}: mapped to {elsewhere}, which does "
        f"not hold it, it is in {actual}",
        f"{dropped_from}: tensor {dropped!r}: not listed in model.safetensors.index.json",
    ]


def test_config_layer_count_changed(made):
    src, out = made
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 7
    (out / "config.json").write_text(json.dumps(config))
    code, lines = verify(out)
    assert code == 1
    assert problems(lines) == [
        "config.json: num_hidden_layers is 7 but the tensors hold 6 layers under model.layers.N; "
        "the config does not describe these weights"
    ]
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines)[1] == (
        "config.json: differs from the config the recipe gives at 'num_hidden_layers': found 7, expected 6"
    )


def test_a_different_source_with_the_same_shapes_fails_every_copied_tensor(made, tmp_path):
    _, out = made
    other = tmp_path / "other"
    write_tiny_checkpoint(other, layers=4, shards=2)
    for path in other.glob("*.safetensors"):
        blob = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", blob[:8])
        blob[8 + n :] = bytes(b ^ 0x55 for b in blob[8 + n :])
        path.write_bytes(bytes(blob))
    code, lines = verify(out, other)
    assert code == 1
    zero_tensors = 2  # the o_proj of the two inserted copies
    assert len(problems(lines)) == len(read_tensors(out)) - zero_tensors


def test_resharded_source_is_noted_but_passes(made, tmp_path):
    _, out = made
    same_tensors = tmp_path / "one-file"
    write_tiny_checkpoint(same_tensors, layers=4, shards=1)
    code, lines = verify(out, same_tensors)
    assert code == 0, lines
    assert lines[0].startswith("note: the plan re-derived from --src has fingerprint")


def test_wrong_number_of_sources_is_a_usage_error(made):
    src, out = made
    result = run_cli("verify", out, "--src", src, "--src", src)
    assert result.exit_code == 2
    assert result.output == (
        "shardsurgeon: error: --src given 2 times but the output was made from 1 model (acme/tiny-mistral); "
        "give one --src per model, in this order\n"
    )


def test_a_checkpoint_not_written_by_shardsurgeon(tiny):
    src, _ = tiny
    assert verify(src)[0] == 0
    code, lines = verify(src, src)
    assert code == 1
    assert problems(lines) == ["cannot check against --src: the shards record no recipe (shardsurgeon_recipe)"]


def test_missing_folder(tmp_path):
    result = run_cli("verify", tmp_path / "nope")
    assert result.exit_code == 1
    assert (
        result.output
        == f"shardsurgeon: error: {tmp_path / 'nope'}: no such folder; pass the checkpoint folder to verify\n"
    )


def test_library_report(made):
    src, out = made
    report = verify_checkpoint(out, [src])
    assert report.ok and report.shards == 4 and report.layers == 6 and report.compared == report.tensors == 57
    assert report.nbytes == sum(len(t[2]) for t in read_tensors(out).values())


MERGE = """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
parameters:
  scale:
    - filter: self_attn
      value: 0.5
dtype: float16
"""


def test_merge_of_two_models_with_the_same_name(tmp_path):
    """Both sources call themselves acme/tiny-mistral: the record keeps them apart, in order."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_checkpoint(a, layers=4, shards=1)
    write_tiny_checkpoint(b, layers=4, shards=2)
    for path in b.glob("*.safetensors"):
        blob = bytearray(path.read_bytes())
        data_start = 8 + struct.unpack("<Q", blob[:8])[0]
        blob[data_start:] = bytes(x ^ 0x01 for x in blob[data_start:])
        path.write_bytes(bytes(blob))
    config = tmp_path / "merge.yml"
    config.write_text(MERGE.format(a=a, b=b))
    out = tmp_path / "out"
    assert run_cli("merge", config, "--out", out, "-q").exit_code == 0
    code, lines = verify(out, a, b)
    assert code == 0, lines
    assert lines[-1].endswith("compared byte for byte with 2 sources")
    code, lines = verify(out, b, a)
    assert code == 1 and len(problems(lines)) > 10
    result = run_cli("verify", out, "--src", a)
    assert result.exit_code == 2
    assert "the output was made from 2 models (acme/tiny-mistral, acme/tiny-mistral)" in result.output


def test_merge_computed_in_one_dtype_and_written_in_another(tmp_path):
    """dtype float16, out_dtype float32: each value rounded to float16, scaled there, widened."""
    src = tmp_path / "m"
    write_tiny_checkpoint(src, layers=2, shards=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        f"slices:\n  - sources:\n    - model: {src}\n      layer_range: [0, 2]\n"
        "merge_method: passthrough\nparameters:\n  scale: 0.3\ndtype: float16\nout_dtype: float32\n"
    )
    out = tmp_path / "out"
    assert run_cli("merge", config, "--out", out, "-q").exit_code == 0
    code, lines = verify(out, src)
    assert code == 0, lines
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_bytes(out / "model.safetensors", name, lambda b: b[:-1] + bytes([b[-1] ^ 0x04]))
    code, lines = verify(out, src)
    assert code == 1
    assert problems(lines) == [
        f"model.safetensors: tensor {name!r}: differs from {name} of {src / 'model.safetensors'} cast to F16 "
        f"scaled by 0.3, then to F32 at byte {len(read_tensors(out)[name][2]) - 1} of the tensor"
    ]


def test_a_converter_bug_does_not_pass_verification(tmp_path, tiny, monkeypatch):
    """verify recomputes casts by the definition, not with the executor's converters: a wrong
    rounding in ChunkConverter (here, the last bit of every converted value flipped) is caught."""
    from shardsurgeon.write import numerics

    src, _ = tiny
    real = numerics.ChunkConverter.convert

    def off_by_one_bit(self, chunk):
        out = real(self, chunk)
        out.cast("B")[0::2] = bytes(b ^ 1 for b in out.cast("B")[0::2])
        return out

    monkeypatch.setattr(numerics.ChunkConverter, "convert", off_by_one_bit)
    out = expand(src, tmp_path / "out", "--dup", "3x1", "--dtype", "float16")
    monkeypatch.undo()
    code, lines = verify(out, src)
    assert code == 1
    found = problems(lines)
    assert found and all("differs from" in line and "cast to F16 at byte 0 of the tensor" in line for line in found)
    assert len(found) == len(read_tensors(out))
