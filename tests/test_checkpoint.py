"""Opening checkpoint folders: single file, sharded with index, Hugging Face cache snapshots, and
every way a folder can be incomplete or inconsistent."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from _craft import make_checkpoint, raw_file, write_config, write_index, write_safetensors

from shardsurgeon import (
    Checkpoint,
    CheckpointError,
    FormatError,
    ShardSurgeonError,
    TensorRef,
    open_checkpoint,
    resolve_cache_entry,
)

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
TWO_SHARDS = {
    SHARD1: [
        ("model.embed_tokens.weight", "BF16", (8, 4)),
        ("model.layers.0.self_attn.o_proj.weight", "BF16", (4, 4)),
        ("model.layers.0.input_layernorm.weight", "F32", (4,)),
    ],
    SHARD2: [
        ("model.layers.1.self_attn.o_proj.weight", "BF16", (4, 4)),
        ("model.norm.weight", "F32", (4,)),
        ("lm_head.weight", "BF16", (8, 4)),
    ],
}


def fails(error: type[ShardSurgeonError], folder: Path, match: str) -> str:
    with pytest.raises(error, match=match) as info:
        open_checkpoint(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_refs_hold_their_bytes(checkpoint: Checkpoint, data: dict[str, bytes]) -> None:
    assert set(checkpoint.tensors) == set(data)
    for name, ref in checkpoint.tensors.items():
        assert ref.name == name
        with open(ref.path, "rb") as f:
            f.seek(ref.data_start)
            assert f.read(ref.nbytes) == data[name], name


# Valid folders


def test_single_file(tmp_path):
    specs = [("b.weight", "F32", (2, 3)), ("a.weight", "F16", (5,)), ("empty", "F32", (0,))]
    data = make_checkpoint(tmp_path, {"model.safetensors": specs})
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.folder == tmp_path
    assert checkpoint.config == {"num_hidden_layers": 2}
    assert list(checkpoint.tensors) == ["b.weight", "a.weight", "empty"]
    path = tmp_path / "model.safetensors"
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert checkpoint.tensors["b.weight"] == TensorRef("b.weight", path, "F32", (2, 3), data_start, 24)
    assert checkpoint.tensors["a.weight"] == TensorRef("a.weight", path, "F16", (5,), data_start + 24, 10)
    assert checkpoint.tensors["empty"] == TensorRef("empty", path, "F32", (0,), data_start + 34, 0)
    assert checkpoint.nbytes == 24 + 10
    assert_refs_hold_their_bytes(checkpoint, data)


def test_single_file_shard_record(tmp_path):
    make_checkpoint(tmp_path, {"model.safetensors": [("w", "U8", (3,))]})
    (shard,) = open_checkpoint(tmp_path).shards
    content = (tmp_path / "model.safetensors").read_bytes()
    assert shard.path == tmp_path / "model.safetensors"
    assert shard.nbytes == len(content)
    header_end = len(content) - 3
    assert shard.header_sha256 == hashlib.sha256(content[:header_end]).hexdigest()


def test_sharded_with_index(tmp_path):
    data = make_checkpoint(tmp_path, TWO_SHARDS)
    checkpoint = open_checkpoint(tmp_path)
    assert [s.path.name for s in checkpoint.shards] == [SHARD1, SHARD2]
    assert {n: r.path.name for n, r in checkpoint.tensors.items()} == {
        name: shard for shard, specs in TWO_SHARDS.items() for name, _, _ in specs
    }
    assert checkpoint.tensors["lm_head.weight"].dtype == "BF16"
    assert checkpoint.tensors["lm_head.weight"].shape == (8, 4)
    assert checkpoint.nbytes == sum(len(b) for b in data.values())
    assert_refs_hold_their_bytes(checkpoint, data)


def test_index_wins_over_a_stray_single_file(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    write_safetensors(tmp_path / "model.safetensors", [("stray", "U8", (1,))])
    assert "stray" not in open_checkpoint(tmp_path).tensors


def test_source_order_is_shard_file_name_then_data_offset(tmp_path):
    # The index lists shard 2 first and the headers list tensors against their data order: neither
    # may leak into the source order.
    tmp_path.joinpath("src").mkdir()
    folder = tmp_path / "src"
    write_config(folder)
    weight_map = {}
    for shard, names in [(SHARD2, ["d", "c"]), (SHARD1, ["b", "a"])]:
        header = {"__metadata__": {"format": "pt"}}
        # JSON key order: names[1] before names[0], yet names[0] comes first in the data.
        header[names[1]] = {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}
        header[names[0]] = {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}
        (folder / shard).write_bytes(raw_file(header, b"01234"))
        weight_map |= {names[1]: shard, names[0]: shard}
    write_index(folder, weight_map)
    checkpoint = open_checkpoint(folder)
    assert list(checkpoint.tensors) == ["b", "a", "d", "c"]
    refs = list(checkpoint.tensors.values())
    assert [(r.path.name, r.data_start - refs[0].data_start) for r in refs[:2]] == [(SHARD1, 0), (SHARD1, 3)]
    for ref in refs:
        with open(ref.path, "rb") as f:
            f.seek(ref.data_start)
            assert f.read(ref.nbytes) == (b"012" if ref.nbytes == 3 else b"34")


def test_string_path_is_accepted(tmp_path):
    make_checkpoint(tmp_path, {"model.safetensors": [("w", "U8", (1,))]})
    assert open_checkpoint(str(tmp_path)).folder == tmp_path


# Hugging Face cache layout


def make_cache_entry(cache: Path, shards: dict) -> tuple[Path, Path, dict[str, bytes]]:
    """models--org--name with blobs/, refs/main and snapshots/<hash>/ of relative symlinks."""
    staging = cache / "staging"
    data = make_checkpoint(staging, shards)
    entry = cache / "models--org--name"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = entry / "snapshots" / commit
    (entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    for file in sorted(staging.iterdir()):
        content = file.read_bytes()
        blob = hashlib.sha256(content).hexdigest()
        (entry / "blobs" / blob).write_bytes(content)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
        file.unlink()
    staging.rmdir()
    return entry, snapshot, data


def test_cache_snapshot_folder_with_symlinks(tmp_path):
    _, snapshot, data = make_cache_entry(tmp_path, TWO_SHARDS)
    assert (snapshot / SHARD1).is_symlink()
    checkpoint = open_checkpoint(snapshot)
    assert checkpoint.folder == snapshot
    assert [s.path for s in checkpoint.shards] == [snapshot / SHARD1, snapshot / SHARD2]
    assert_refs_hold_their_bytes(checkpoint, data)


def test_cache_entry_folder_resolves_to_main_snapshot(tmp_path):
    entry, snapshot, data = make_cache_entry(tmp_path, TWO_SHARDS)
    # An older snapshot that refs/main does not name must be ignored.
    (entry / "snapshots" / "old").mkdir()
    assert resolve_cache_entry(entry) == snapshot
    checkpoint = open_checkpoint(entry)
    assert checkpoint.folder == snapshot
    assert checkpoint.config == {"num_hidden_layers": 2}
    assert_refs_hold_their_bytes(checkpoint, data)


def test_cache_entry_without_refs_takes_newest_snapshot(tmp_path):
    entry, snapshot, _ = make_cache_entry(tmp_path, {"model.safetensors": [("w", "U8", (2,))]})
    (entry / "refs" / "main").unlink()
    older = entry / "snapshots" / "older"
    older.mkdir()
    os.utime(older, (0, 0))
    assert resolve_cache_entry(entry) == snapshot
    assert open_checkpoint(entry).folder == snapshot


def test_cache_snapshot_with_missing_blob(tmp_path):
    entry, snapshot, _ = make_cache_entry(tmp_path, TWO_SHARDS)
    os.unlink(snapshot / SHARD2)
    os.symlink("../../blobs/" + "0" * 64, snapshot / SHARD2)
    fails(CheckpointError, entry, match=re.escape(f"{snapshot / SHARD2}: shard listed in"))


# Index problems


def test_index_names_tensor_its_shard_lacks(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = SHARD2
    write_index(tmp_path, index["weight_map"])
    message = fails(CheckpointError, tmp_path, match=f"maps tensor 'model.layers.9.mlp.up_proj.weight' to {SHARD2}")
    assert "which does not hold it" in message
    assert message.startswith(str(tmp_path / "model.safetensors.index.json"))


def test_index_maps_tensor_to_the_wrong_shard(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = SHARD1
    write_index(tmp_path, index["weight_map"])
    fails(
        CheckpointError,
        tmp_path,
        match=f"maps tensor 'model.norm.weight' to {SHARD1}, which does not hold it",
    )


def test_shard_holds_tensor_index_does_not_list(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    write_index(tmp_path, index["weight_map"])
    message = fails(CheckpointError, tmp_path, match="holds tensor 'model.norm.weight' that .* does not list")
    assert message.startswith(f"{tmp_path / SHARD2}: ")


def test_tensor_in_two_shards(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    write_safetensors(tmp_path / SHARD2, [*TWO_SHARDS[SHARD2], ("model.embed_tokens.weight", "BF16", (8, 4))])
    fails(
        CheckpointError,
        tmp_path,
        match=f"tensor 'model.embed_tokens.weight' is in both {SHARD1} and {SHARD2}",
    )


def test_missing_shard(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / SHARD2).unlink()
    message = fails(CheckpointError, tmp_path, match="shard listed in model.safetensors.index.json is missing")
    assert message.startswith(f"{tmp_path / SHARD2}: ")


@pytest.mark.parametrize(
    "index",
    [
        {"metadata": {"total_size": 0}},
        {"weight_map": []},
        {"weight_map": "model.safetensors"},
        {"weight_map": {"w": 1}},
        {"weight_map": {"w": None}},
        [],
        "weight_map",
    ],
)
def test_weight_map_missing_or_not_an_object(tmp_path, index):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(CheckpointError, tmp_path, match='expected an object with a "weight_map" of tensor name to shard file')


def test_weight_map_empty(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    write_index(tmp_path, {})
    fails(CheckpointError, tmp_path, match="weight_map is empty")


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/x.safetensors", "/etc/passwd", "..", ".", "", "a\\b"])
def test_weight_map_path_outside_folder(tmp_path, shard):
    make_checkpoint(tmp_path, TWO_SHARDS)
    write_index(tmp_path, {"model.norm.weight": shard})
    fails(
        CheckpointError,
        tmp_path,
        match=re.escape(f"maps to {shard!r}, expected a file name in the same folder"),
    )


@pytest.mark.parametrize("text", ["", "{", '{"weight_map": {"a": "b",}}', "\xff"])
def test_broken_index_json(tmp_path, text):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / "model.safetensors.index.json").write_text(text, encoding="latin-1")
    message = fails(CheckpointError, tmp_path, match="cannot read JSON .* the file is corrupt")
    assert message.startswith(str(tmp_path / "model.safetensors.index.json"))


def test_corrupt_shard_header_is_format_error_naming_shard(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    with open(tmp_path / SHARD2, "ab") as f:
        f.write(b"\x00")
    message = fails(FormatError, tmp_path, match="leaves trailing bytes")
    assert message.startswith(f"{tmp_path / SHARD2}: ")


# config.json problems


def test_missing_config(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / "config.json").unlink()
    fails(CheckpointError, tmp_path, match=re.escape(f"{tmp_path / 'config.json'}: missing"))


def test_broken_config_json(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2')
    fails(CheckpointError, tmp_path, match=re.escape(f"{tmp_path / 'config.json'}: cannot read JSON"))


@pytest.mark.parametrize(("config", "found"), [([], "list"), (2, "int"), (None, "NoneType"), ("x", "str")])
def test_config_not_an_object(tmp_path, config, found):
    make_checkpoint(tmp_path, TWO_SHARDS)
    (tmp_path / "config.json").write_text(json.dumps(config))
    fails(CheckpointError, tmp_path, match=f"config.json: expected a JSON object, found {found}")


def test_config_key_order_kept(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    config = {"z": 1, "num_hidden_layers": 2, "a": [1, 2], "layer_types": ["full", "sliding"]}
    write_config(tmp_path, config)
    assert list(open_checkpoint(tmp_path).config) == list(config)


# Not a checkpoint folder


def test_folder_missing(tmp_path):
    fails(CheckpointError, tmp_path / "nope", match=re.escape(f"{tmp_path / 'nope'}: no such folder"))


def test_path_is_a_file(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", [("w", "U8", (1,))])
    fails(CheckpointError, tmp_path / "model.safetensors", match="is a file, expected a checkpoint folder")


def test_folder_with_only_pytorch_bin(tmp_path):
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK")
    fails(
        CheckpointError,
        tmp_path,
        match="expected model.safetensors.index.json or model.safetensors, found only pytorch_model.bin",
    )


def test_folder_with_shards_but_no_index(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS, index=False)
    fails(CheckpointError, tmp_path, match=f"found only {SHARD1}, {SHARD2}")


def test_folder_with_no_weights(tmp_path):
    write_config(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    fails(CheckpointError, tmp_path, match="found no weights at all")


def test_single_file_with_no_tensors(tmp_path):
    write_config(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", [], {"format": "pt"})
    fails(CheckpointError, tmp_path, match="the checkpoint holds no tensors")


def test_tensor_in_two_shards_that_an_index_lists_under_both(tmp_path):
    make_checkpoint(tmp_path, TWO_SHARDS)
    write_safetensors(tmp_path / SHARD2, [*TWO_SHARDS[SHARD2], ("model.embed_tokens.weight", "BF16", (8, 4))])
    entries = [f'"{name}": "{shard}"' for shard, specs in TWO_SHARDS.items() for name, _, _ in specs]
    entries.append(f'"model.embed_tokens.weight": "{SHARD2}"')  # the name again: json.loads keeps this one
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {' + ", ".join(entries) + "}}")
    message = fails(CheckpointError, tmp_path, match="holds tensor 'model.embed_tokens.weight' that .* does not list")
    assert message.startswith(f"{tmp_path / SHARD1}: ")
