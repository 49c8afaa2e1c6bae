"""`shardsurgeon expand` end to end through the CLI, every output byte checked against its origin."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import data_order, folder_bytes, read_tensors, run_cli, write_tiny_checkpoint
from safetensors import safe_open

PARTS = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]


def expected_tensors(
    data: dict[str, bytes], sources: list[int], inserted: set[int], zero: tuple[str, ...]
) -> dict[str, bytes]:
    """What the output must hold, derived here from the recipe's meaning, not from the plan."""
    expected = {"model.embed_tokens.weight": data["model.embed_tokens.weight"]}
    for out, src in enumerate(sources):
        for part in PARTS:
            blob = data[f"model.layers.{src}.{part}"]
            if out in inserted and any(z in part for z in zero):
                blob = bytes(len(blob))
            expected[f"model.layers.{out}.{part}"] = blob
    expected["model.norm.weight"] = data["model.norm.weight"]
    if "lm_head.weight" in data:
        expected["lm_head.weight"] = data["lm_head.weight"]
    return expected


def assert_holds(out: Path, expected: dict[str, bytes]) -> None:
    tensors = read_tensors(out)
    assert sorted(tensors) == sorted(expected)
    for name, blob in expected.items():
        assert tensors[name][0] == "BF16", name
        assert tensors[name][2] == blob, f"{name} holds the wrong bytes"


def test_seed_recipe_appends_identity_copies_of_the_last_layer(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_tiny_checkpoint(src, layers=32, shards=3)
    result = run_cli("expand", "--src", src, "--dup", "31x12", "--zero", "o_proj,down_proj", "--out", out)
    assert result.exit_code == 0, result.output
    sources = list(range(32)) + [31] * 12
    assert_holds(out, expected_tensors(data, sources, set(range(32, 44)), ("o_proj", "down_proj")))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 44
    assert list(config) == list(json.loads((src / "config.json").read_text())), "key order kept"
    assert "32 -> 44 layers" in result.output


def test_every_gives_llama_pro_layout(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_tiny_checkpoint(src, layers=32, shards=2)
    result = run_cli("expand", "--src", src, "--every", "4", "--zero", "o_proj,down_proj", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    sources, inserted = [], set()
    for layer in range(32):
        sources.append(layer)
        if layer % 4 == 3:
            inserted.add(len(sources))
            sources.append(layer)
    assert sorted(inserted) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert_holds(out, expected_tensors(data, sources, inserted, ("o_proj", "down_proj")))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 40


def test_dup_in_the_middle_repeated_and_comma_separated(tmp_path, tiny):
    src, data = tiny
    out = tmp_path / "out"
    result = run_cli("expand", "--src", src, "--dup", "0x1,2x1", "--dup", "2x1", "--zero", "mlp", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert_holds(out, expected_tensors(data, [0, 0, 1, 2, 2, 2, 3], {1, 4, 5}, ("mlp",)))


def test_data_follows_the_source_files_and_the_index_follows_the_data(tmp_path, tiny):
    """Data order: each source file's tensors as it holds them (the embeddings' file first), its
    inserted copies after it, copy after copy; so copies can share blocks with their source (see
    test_layout.py and test_reflink.py). The index lists tensors in that order."""
    src, data = tiny
    out = tmp_path / "out"
    result = run_cli("expand", "--src", src, "--dup", "3x2", "--max-shard-size", "2KB", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    source = read_tensors(src)
    files = sorted({t[3] for t in source.values()}, key=lambda f: f != source["model.embed_tokens.weight"][3])
    expected = []
    for file in files:
        names = sorted((n for n in source if source[n][3] == file), key=lambda n: source[n][4])
        expected += names
        for copy in (4, 5):
            expected += [f"model.layers.{copy}.{n.split('.', 3)[3]}" for n in names if n.startswith("model.layers.3.")]
    assert data_order(out) == expected
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == expected
    assert_holds(out, expected_tensors(data, [0, 1, 2, 3, 3, 3], set(), ()))


def test_output_folder_files(tmp_path, tiny):
    src, _ = tiny
    out = tmp_path / "out"
    assert run_cli("expand", "--src", src, "--dup", "3x2", "--zero", "o_proj", "--out", out, "-q").exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert (out / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: acme/tiny-mistral\nlibrary_name: transformers\n")
    assert "shardsurgeon expand --src" in card and "--dup 3x2 --zero o_proj" in card
    assert "merge_method: passthrough" in card and "layer_range: [3, 4]" in card
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert len(list(f.keys())) == 3 + 6 * 9


def test_a_single_source_file_gives_a_single_output_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tiny_checkpoint(src, layers=2, shards=1)
    assert run_cli("expand", "--src", src, "--dup", "1x3", "--out", out, "-q").exit_code == 0
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]


def test_sharded_output_has_index_and_loads_with_reference_reader(tmp_path, tiny):
    src, _data = tiny
    out = tmp_path / "out"
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--max-shard-size", "1KB", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    tensors = read_tensors(out)
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "numpy") as f:
            loaded = f.get_tensor(name)
        assert loaded.dtype == ml_dtypes.bfloat16
        assert loaded.tobytes() == tensors[name][2]
    by_shard: dict[str, list[int]] = {}
    for _, _, blob, shard, _ in tensors.values():
        by_shard.setdefault(shard, []).append(len(blob))
    assert all(sum(sizes) <= 1000 or len(sizes) == 1 for sizes in by_shard.values())


def test_two_runs_give_byte_identical_folders(tmp_path, tiny):
    src, _ = tiny
    args = ["expand", "--src", src, "--every", "2", "--zero", "o_proj,down_proj", "--max-shard-size", "2KB", "-q"]
    assert run_cli(*args, "--out", tmp_path / "a").exit_code == 0
    assert run_cli(*args, "--out", tmp_path / "b").exit_code == 0
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    a["README.md"] = a["README.md"].replace(b"--out a\n", b"--out b\n")
    assert a == b


@pytest.mark.parametrize("extra", [["--zero", "o_proj"], ["--dtype", "float16", "--dense"]], ids=["copy", "cast"])
def test_the_same_bytes_on_every_platform_path(tmp_path, tiny, monkeypatch, extra):
    """As on macOS (no copy_file_range) and as on Windows (no pread/pwrite either), the portable
    paths write exactly the bytes of the Linux path."""
    from _platforms import MODES, emulated  # a plugin of conftest: imported once, asserts rewritten

    src, _ = tiny
    outputs = {}
    for mode in MODES:
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)  # the same --out text, so the same model card
        with emulated(mode):
            result = run_cli("expand", "--src", src, "--dup", "3x2", *extra, "--max-shard-size", "2KB", "--out", "out")
        assert result.exit_code == 0, result.output
        outputs[mode] = folder_bytes(tmp_path / mode / "out")
    assert outputs["macos"] == outputs["linux"] and outputs["windows"] == outputs["linux"]


def test_source_is_never_modified(tmp_path, tiny):
    src, _ = tiny

    def digest() -> str:
        h = hashlib.sha256()
        for path in sorted(src.rglob("*")):
            h.update(path.name.encode() + path.read_bytes() + str(path.stat().st_mtime_ns).encode())
        return h.hexdigest()

    before = digest()
    assert run_cli("expand", "--src", src, "--dup", "3x1", "--out", tmp_path / "out", "-q").exit_code == 0
    assert digest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "nothing left beside the output"


def test_zeros_are_holes_unless_dense(tmp_path):
    src = tmp_path / "src"
    data = write_tiny_checkpoint(src, layers=2, shards=1, hidden=128, intermediate=256, kv=64)
    args = ["expand", "--src", src, "--dup", "1x4", "--zero", "o_proj,down_proj", "-q"]
    assert run_cli(*args, "--out", tmp_path / "sparse").exit_code == 0
    assert run_cli(*args, "--dense", "--out", tmp_path / "dense").exit_code == 0
    sparse, dense = tmp_path / "sparse" / "model.safetensors", tmp_path / "dense" / "model.safetensors"
    assert sparse.read_bytes() == dense.read_bytes()
    zero_bytes = 4 * 2 * (128 * 128 + 128 * 256)
    assert (dense.stat().st_blocks - sparse.stat().st_blocks) * 512 >= zero_bytes // 2
    expected = expected_tensors(data, [0, 1, 1, 1, 1, 1], {2, 3, 4, 5}, ("o_proj", "down_proj"))
    assert_holds(tmp_path / "sparse", expected)


def test_cast_to_float16(tmp_path, tiny):
    src, data = tiny
    out = tmp_path / "out"
    assert run_cli("expand", "--src", src, "--dup", "3x1", "--dtype", "float16", "--out", out, "-q").exit_code == 0
    tensors = read_tensors(out)
    name = "model.layers.4.mlp.up_proj.weight"
    assert tensors[name][0] == "F16"
    source = np.frombuffer(data["model.layers.3.mlp.up_proj.weight"], ml_dtypes.bfloat16)
    assert tensors[name][2] == source.astype(np.float32).astype(np.float16).tobytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_per_layer_config_lists_follow_their_source_layer(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    config = {
        "architectures": ["MistralForCausalLM"],
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "chunked"],
        "other": [1, 2],
        "text_config": {"unrelated": [1, 2, 3, 4]},
    }
    write_tiny_checkpoint(src, layers=4, shards=1, config=config)
    assert run_cli("expand", "--src", src, "--dup", "1x2,3x1", "--out", out, "-q").exit_code == 0
    patched = json.loads((out / "config.json").read_text())
    assert patched["num_hidden_layers"] == 7
    assert patched["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "full_attention",
        "full_attention",
        "sliding_attention",
        "chunked",
        "chunked",
    ]
    assert patched["other"] == [1, 2] and patched["text_config"] == {"unrelated": [1, 2, 3, 4]}
    assert patched["architectures"] == ["MistralForCausalLM"]


def test_tied_embeddings_stay_tied(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_tiny_checkpoint(src, layers=2, shards=1, lm_head=False)
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--out", out, "-q").exit_code == 0
    tensors = read_tensors(out)
    assert "lm_head.weight" not in tensors
    assert_holds(out, expected_tensors(data, [0, 1, 1], set(), ()))


needs_kernel_copy = pytest.mark.skipif(
    not hasattr(os, "copy_file_range"), reason="os.copy_file_range is hidden (emulating macOS or Windows) or absent"
)


@needs_kernel_copy
@pytest.mark.parametrize("failing_errno", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM])
def test_copy_falls_back_to_pread_pwrite(tmp_path, tiny, monkeypatch, failing_errno):
    src, data = tiny

    def refuse(*args, **kwargs):
        raise OSError(failing_errno, os.strerror(failing_errno))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert run_cli("expand", "--src", src, "--dup", "3x1", "--zero", "o_proj", "--out", tmp_path / "out").exit_code == 0
    assert_holds(tmp_path / "out", expected_tensors(data, [0, 1, 2, 3, 3], {4}, ("o_proj",)))


@needs_kernel_copy
def test_short_copies_are_continued(tmp_path, tiny, monkeypatch):
    src, data = tiny
    real = os.copy_file_range

    def short(src_fd, dst_fd, count, offset_src, offset_dst):
        return real(src_fd, dst_fd, min(count, 7), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", short)
    assert run_cli("expand", "--src", src, "--dup", "2x1", "--out", tmp_path / "out", "-q").exit_code == 0
    assert_holds(tmp_path / "out", expected_tensors(data, [0, 1, 2, 2, 3], set(), ()))


def test_dry_run_and_plan_json_write_nothing(tmp_path, tiny):
    src, _ = tiny
    out = tmp_path / "out"
    result = run_cli("expand", "--src", src, "--dup", "3x2", "--zero", "o_proj", "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "layers: 4 -> 6" in result.output and "4-5 <- 2 copies of layer 3 [o_proj zero]" in result.output
    assert "dry run: nothing written" in result.output
    assert not out.exists()
    result = run_cli("expand", "--src", src, "--dup", "3x2", "--zero", "o_proj", "--plan-json", "-")
    plan = json.loads(result.output)
    zeros = [t["name"] for t in plan["tensors"] if t["op"] == "zeros"]
    assert zeros == ["model.layers.4.self_attn.o_proj.weight", "model.layers.5.self_attn.o_proj.weight"]
    assert plan["layers"][5] == {
        "output": 5,
        "model": str(src),
        "source": 3,
        "inserted": True,
        "scale": [{"filter": "o_proj", "value": 0.0}],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_hugging_face_cache_snapshot_as_source(tmp_path):
    cache = tmp_path / "models--acme--tiny"
    blobs, snapshot = cache / "blobs", cache / "snapshots" / "abc123"
    staging = tmp_path / "staging"
    data = write_tiny_checkpoint(staging, layers=2, shards=2)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in staging.iterdir():
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    out = tmp_path / "out"
    assert run_cli("expand", "--src", cache, "--dup", "1x1", "--out", out, "-q").exit_code == 0
    assert_holds(out, expected_tensors(data, [0, 1, 1], set(), ()))
    assert "base_model: acme/tiny" in (out / "README.md").read_text()
    assert not any(p.is_symlink() for p in out.iterdir())


def test_demo_runs_and_checks_itself():
    result = run_cli("demo", "-q")
    assert result.exit_code == 0, result.output
    assert "checked: all 399 tensors" in result.output


def test_inspect_describes_the_stack(tiny):
    src, _ = tiny
    result = run_cli("inspect", src)
    assert result.exit_code == 0, result.output
    assert "layer stack: model.layers.N, 4 layers (config num_hidden_layers)" in result.output
    assert "MistralForCausalLM" in result.output and "self_attn.o_proj.weight" in result.output
