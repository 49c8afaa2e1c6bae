"""`shardsurgeon merge CONFIG`: mergekit passthrough configs, tensor for tensor.

Expected tensors are derived here from the config's meaning; numerics are recomputed with
ml_dtypes in float32 (mergekit's torch computes round(float32(x) * float32(k)) in the tensor's
dtype, after casting to ``dtype``), independently of the code under test.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import folder_bytes, read_tensors, run_cli, write_tiny_checkpoint

SEED_YAML = """\
slices:
  - sources:
    - model: {model}
      layer_range: [0, 32]
{copies}merge_method: passthrough
dtype: bfloat16
"""
SEED_COPY = """\
  - sources:
    - model: {model}
      layer_range: [31, 32]
      parameters:
        scale:
          - filter: o_proj
            value: 0.0
          - filter: down_proj
            value: 0.0
          - value: 1.0
"""


def write_config(folder: Path, text: str) -> Path:
    path = folder / "merge.yml"
    path.write_text(textwrap.dedent(text))
    return path


def tensors_without_cards(folder: Path) -> dict[str, tuple]:
    return {name: value[:3] for name, value in read_tensors(folder).items()}


def test_seed_yaml_equals_expand(tmp_path):
    write_tiny_checkpoint(tmp_path / "openchat", layers=32, shards=3)
    config = write_config(tmp_path, SEED_YAML.format(model="openchat", copies=SEED_COPY.format(model="openchat") * 12))
    result = run_cli("merge", config, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "32 -> 44 layers" in result.output
    expand = ["expand", "--src", tmp_path / "openchat", "--dup", "31x12", "--zero", "o_proj,down_proj", "-q"]
    assert run_cli(*expand, "--out", tmp_path / "expanded").exit_code == 0
    assert tensors_without_cards(tmp_path / "merged") == tensors_without_cards(tmp_path / "expanded")
    merged, expanded = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("merged", "expanded"))
    assert merged == expanded
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.count("- model: acme/tiny-mistral\n") == 13, "the config is written back by the model's Hub id"
    assert "shardsurgeon merge merge.yml merged\n" in card and str(tmp_path) not in card
    assert "layers 32-43 are 12 copies of layer 31 of acme/tiny-mistral (o_proj, down_proj zero)" in card


def test_solar_style_depth_upscaling(tmp_path):
    data = write_tiny_checkpoint(tmp_path / "base", layers=8, shards=2)
    config = write_config(
        tmp_path,
        """\
        slices:
          - sources:
            - model: base
              layer_range: [0, 6]
          - sources:
            - model: base
              layer_range: [2, 8]
        merge_method: passthrough
        dtype: bfloat16
        """,
    )
    assert run_cli("merge", config, "--out", tmp_path / "out", "-q").exit_code == 0
    tensors = read_tensors(tmp_path / "out")
    sources = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    for out, src in enumerate(sources):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert tensors[f"model.layers.{out}.{part}"][2] == data[f"model.layers.{src}.{part}"]
    assert len(tensors) == 3 + 12 * 9
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 12


def bf16(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, ml_dtypes.bfloat16)


def test_two_models_scale_and_float16(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", layers=4, shards=1)
    original = write_tiny_checkpoint(tmp_path / "b", layers=4, shards=2)
    for shard in (tmp_path / "b").glob("*.safetensors"):  # same shapes, other bytes (still finite)
        raw = bytearray(shard.read_bytes())
        header_end = 8 + int.from_bytes(raw[:8], "little")
        raw[header_end:] = bytes(x ^ 0x01 for x in raw[header_end:])
        shard.write_bytes(raw)
    b = {name: bytes(x ^ 0x01 for x in blob) for name, blob in original.items()}
    config = write_config(
        tmp_path,
        """\
        slices:
          - sources:
            - model: a
              layer_range: [0, 2]
          - sources:
            - model: b
              layer_range: [2, 4]
        merge_method: passthrough
        parameters:
          scale:
            - filter: self_attn
              value: 0.7
        dtype: float16
        """,
    )
    assert run_cli("merge", config, "--out", tmp_path / "out", "-q").exit_code == 0
    tensors = read_tensors(tmp_path / "out")

    def expected(blob: bytes, scale: float) -> bytes:
        x = bf16(blob).astype(np.float16)
        if scale != 1.0:
            x = (x.astype(np.float32) * np.float32(scale)).astype(np.float16)
        return x.tobytes()

    assert tensors["model.embed_tokens.weight"][2] == expected(a["model.embed_tokens.weight"], 1.0)
    assert tensors["lm_head.weight"][2] == expected(b["lm_head.weight"], 1.0)
    assert tensors["model.norm.weight"][2] == expected(b["model.norm.weight"], 1.0)
    for out, (model, src) in enumerate([(a, 0), (a, 1), (b, 2), (b, 3)]):
        for part, scale in (
            ("self_attn.o_proj.weight", 0.7),
            ("self_attn.k_proj.weight", 0.7),
            ("mlp.up_proj.weight", 1.0),
        ):
            got = tensors[f"model.layers.{out}.{part}"]
            assert got[0] == "F16"
            assert got[2] == expected(model[f"model.layers.{src}.{part}"], scale), (out, part)
    config_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_out["torch_dtype"] == "float16"


def test_precedence_source_over_slice_over_top_level_and_out_dtype(tmp_path):
    data = write_tiny_checkpoint(tmp_path / "m", layers=2, shards=1)
    config = write_config(
        tmp_path,
        """\
        slices:
          - sources:
            - model: m
              layer_range: [0, 2]
              parameters:
                scale:
                  - filter: o_proj
                    value: 0.5
            parameters:
              scale:
                - filter: proj
                  value: 2.0
        merge_method: passthrough
        parameters:
          scale: 3.0
        dtype: float32
        out_dtype: bfloat16
        """,
    )
    assert run_cli("merge", config, "--out", tmp_path / "out", "-q").exit_code == 0
    tensors = read_tensors(tmp_path / "out")

    def scaled(name: str, k: float) -> bytes:
        return (bf16(data[name]).astype(np.float32) * np.float32(k)).astype(ml_dtypes.bfloat16).tobytes()

    assert tensors["model.layers.1.self_attn.o_proj.weight"][2] == scaled("model.layers.1.self_attn.o_proj.weight", 0.5)
    assert tensors["model.layers.1.mlp.up_proj.weight"][2] == scaled("model.layers.1.mlp.up_proj.weight", 2.0)
    assert tensors["model.layers.0.input_layernorm.weight"][2] == scaled("model.layers.0.input_layernorm.weight", 3.0)
    assert tensors["model.norm.weight"][2] == scaled("model.norm.weight", 3.0)
    assert all(t[0] == "BF16" for t in tensors.values())


def test_models_form_base_model_and_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "abc"
    data = write_tiny_checkpoint(snapshot, layers=3, shards=1, extra_files={"tokenizer.json": "{}"})
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = write_config(
        tmp_path,
        """\
        models:
          - model: acme/tiny
            parameters:
              scale:
                - filter: lm_head
                  value: 0.0
        merge_method: passthrough
        base_model: acme/tiny
        tokenizer_source: base
        """,
    )
    result = run_cli("merge", config, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    tensors = read_tensors(tmp_path / "out")
    assert tensors["lm_head.weight"][2] == bytes(len(data["lm_head.weight"]))
    assert tensors["model.layers.2.mlp.up_proj.weight"][2] == data["model.layers.2.mlp.up_proj.weight"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert "base_model: acme/tiny\n" in (tmp_path / "out" / "README.md").read_text()


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = write_config(
        tmp_path,
        """\
        slices:
          - sources:
            - model: acme/absent
              layer_range: [0, 2]
        merge_method: passthrough
        """,
    )
    result = run_cli("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "model 'acme/absent': not a folder" in result.output
    assert str(tmp_path / "hub" / "models--acme--absent") in result.output


def test_models_of_different_shapes_are_refused_before_writing(tmp_path):
    write_tiny_checkpoint(tmp_path / "a", layers=2, shards=1)
    write_tiny_checkpoint(tmp_path / "b", layers=2, shards=1, hidden=12)
    config = write_config(
        tmp_path,
        """\
        slices:
          - sources: [{model: a, layer_range: [0, 2]}]
          - sources: [{model: b, layer_range: [0, 2]}]
        merge_method: passthrough
        """,
    )
    result = run_cli("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "tensor 'lm_head.weight': a has BF16 [16, 8] but b has BF16 [16, 12]" in result.output
    assert not (tmp_path / "out").exists()


UNSUPPORTED = [
    ("merge_method: slerp", "merge_method 'slerp' is not supported"),
    ("merge_method: passthrough\nweight: 1", "weight: unknown or unsupported key"),
    (
        "merge_method: passthrough\nparameters: {scale: [0.0, 1.0]}",
        "a list of numbers (a gradient across layers), which shardsurgeon does not support",
    ),
    ("merge_method: passthrough\nparameters: {density: 0.5}", "parameters.density: unknown or unsupported key"),
    ("merge_method: passthrough\ndtype: int8", "dtype 'int8' is not supported"),
    ("merge_method: passthrough\ntokenizer_source: union", "tokenizer_source 'union' is not supported"),
    ("merge_method: [", "not valid YAML"),
    ("- a", "expected a mapping with slices and merge_method"),
]


@pytest.mark.parametrize(("extra", "message"), UNSUPPORTED)
def test_unsupported_configs_are_errors(tmp_path, extra, message):
    write_tiny_checkpoint(tmp_path / "m", layers=2, shards=1)
    slices = "slices:\n  - sources:\n    - model: m\n      layer_range: [0, 2]\n"
    text = extra if extra.startswith(("-", "merge_method: [")) else slices + extra + "\n"
    config = write_config(tmp_path, text)
    before = folder_bytes(tmp_path / "m")
    result = run_cli("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert folder_bytes(tmp_path / "m") == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ("- sources: [{model: m, layer_range: [0, 3]}]", "layer_range [0, 3] of m is out of range"),
        ("- sources: [{model: m, layer_range: [1, 1]}]", "layer_range [1, 1] of m is out of range"),
        ("- sources: [{model: m, layer_range: 2}]", "layer_range must be [start, end]"),
        (
            "- sources: [{model: m, layer_range: [0, 1]}, {model: m, layer_range: [1, 2]}]",
            "must list exactly one source for a passthrough merge",
        ),
        ("- sources: [{model: m+lora, layer_range: [0, 1]}]", "LoRA adapters"),
    ],
)
def test_bad_slices(tmp_path, slices, message):
    write_tiny_checkpoint(tmp_path / "m", layers=2, shards=1)
    config = write_config(tmp_path, f"slices:\n  {slices}\nmerge_method: passthrough\n")
    result = run_cli("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_config_that_is_not_text_or_has_infinite_scale(tmp_path):
    write_tiny_checkpoint(tmp_path / "m", layers=2, shards=1)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 8)
    result = run_cli("merge", binary, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "is not a text file" in result.output
    slices = "slices:\n  - sources:\n    - model: m\n      layer_range: [0, 2]\n"
    config = write_config(tmp_path, slices + "merge_method: passthrough\nparameters: {scale: .inf}\n")
    result = run_cli("merge", config, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "parameters.scale must be a number" in result.output
    assert not (tmp_path / "out").exists()


def test_card_yaml_of_expand_runs_as_the_same_merge(tmp_path):
    """The model card's mergekit config, run by `merge`, gives the same tensors as the `expand`."""
    write_tiny_checkpoint(tmp_path / "m", layers=3, shards=1)
    args = ["expand", "--src", tmp_path / "m", "--dup", "2x2", "--zero", "norm,o_proj", "--out", tmp_path / "e", "-q"]
    assert run_cli(*args).exit_code == 0
    card = (tmp_path / "e" / "README.md").read_text()
    yaml_text = card.split("```yaml\n")[1].split("```")[0].replace("acme/tiny-mistral", "m")
    assert "dtype" not in yaml_text, "no cast asked, so no dtype (which would cast float32 tensors too)"
    assert "{filter: model.norm.weight, value: 1.0}" in yaml_text, "the final norm keeps its values"
    config = write_config(tmp_path, yaml_text)
    assert run_cli("merge", config, "--out", tmp_path / "g", "-q").exit_code == 0
    assert tensors_without_cards(tmp_path / "g") == tensors_without_cards(tmp_path / "e")


def test_hub_ids_with_a_revision(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    entry = cache / "models--acme--tiny"
    old = write_tiny_checkpoint(entry / "snapshots" / "aaa111", layers=2, shards=1)
    new = write_tiny_checkpoint(entry / "snapshots" / "bbb222", layers=3, shards=1)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("bbb222")
    (entry / "refs" / "v1").write_text("aaa111")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for reference, data, layers in [("acme/tiny", new, 3), ("acme/tiny@v1", old, 2), ("acme/tiny@aaa", old, 2)]:
        config = write_config(tmp_path, f"models:\n  - model: {reference}\nmerge_method: passthrough\n")
        out = tmp_path / reference.replace("/", "_")
        assert run_cli("merge", config, "--out", out, "-q").exit_code == 0
        assert read_tensors(out)["lm_head.weight"][2] == data["lm_head.weight"]
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    config = write_config(tmp_path, "models:\n  - model: acme/tiny@nope\nmerge_method: passthrough\n")
    result = run_cli("merge", config, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "not in the Hugging Face cache" in result.output
