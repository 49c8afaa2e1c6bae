"""``prune-experts --to-dense`` through the CLI: each dense MLP holds its expert's bytes (one tensor
per expert, or a byte range of a fused ``[E, ...]`` tensor), the layers without experts and every
other tensor are the source's, every refusal is one line with nothing written, and the rest of the
tool works on the recipe (dry run, plan files and apply, verify --src, the model card, resume after
a stop, S3 output byte-identical to local)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from _clikit import invoke, refused, tensors  # noqa: E402
from compat_models import _LLAMA_LIKE, save_tiny_model  # noqa: E402
from conftest import folder_bytes  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from shardsurgeon import WriteOptions, api  # noqa: E402

_QWEN2 = {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}


def fused(src: Path, dst: Path, block: str, projections: tuple[str, str, str]) -> Path:
    """``src`` with each layer's experts in one ``gate_up_proj`` ``[E, 2I, H]`` and one ``down_proj``
    ``[E, H, I]`` tensor, the form transformers holds in memory and mergekit-moe writes."""
    state = tensors(src)
    gate, up, down = projections
    for layer in range(4):
        prefix = f"model.layers.{layer}.{block}.experts"
        count = sum(1 for name in state if name.startswith(prefix) and name.endswith(f".{gate}.weight"))
        if not count:
            continue
        parts = [[state.pop(f"{prefix}.{e}.{p}.weight") for e in range(count)] for p in (gate, up, down)]
        state[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(*parts[:2], strict=True)])
        state[f"{prefix}.down_proj"] = np.stack(parts[2])
    dst.mkdir()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=6, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_LLAMA_LIKE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[2]
    ),
    "qwen3_moe_48": lambda: transformers.Qwen3MoeConfig(
        **_LLAMA_LIKE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[2]
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_QWEN2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=40
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4,
        qk_nope_head_dim=4, num_experts_per_tok=2,
    ),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
}  # fmt: skip
PROJECTIONS = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": ("mlp", ("gate_proj", "up_proj",
               "down_proj"))}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    made = {name: save_tiny_model(config(), root / name) for name, config in CONFIGS.items()}
    for name, (block, projections) in PROJECTIONS.items():
        made[f"{name}_fused"] = fused(made[name], root / f"{name}_fused", block, projections)
    return made


def test_each_dense_mlp_is_its_experts_bytes_and_the_rest_the_sources(models, tmp_path):
    out = tmp_path / "dense"
    result = invoke("prune-experts", "--src", models["mixtral"], "--keep", "4", "--to-dense", "--out", out)
    assert result.exit_code == 0, result.output
    assert "4 -> 4 layers, 39 tensors" in result.output
    before, after = tensors(models["mixtral"]), tensors(out)
    for layer in range(4):
        expert = f"model.layers.{layer}.block_sparse_moe.experts.4"
        for mine, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            got = after[f"model.layers.{layer}.mlp.{mine}.weight"]
            assert got.tobytes() == before[f"{expert}.{theirs}.weight"].tobytes(), (layer, mine)
    assert not [name for name in after if "block_sparse_moe" in name]
    others = {k: v.tobytes() for k, v in before.items() if "block_sparse_moe" not in k}
    assert {k: v.tobytes() for k, v in after.items() if ".mlp." not in k} == others
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])


@pytest.mark.parametrize("model, block", [("mixtral_fused", "block_sparse_moe"), ("qwen3_moe_fused", "mlp")])
def test_from_fused_experts_each_projection_is_the_experts_byte_range(models, tmp_path, model, block):
    out = tmp_path / "dense"
    keep = {"0": [5], "1": [0], "3": [2]} if model.startswith("qwen3") else {"0": [5], "1": [0], "2": [3], "3": [2]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    keep_file = tmp_path / "keep.json"
    result = invoke("prune-experts", "--src", models[model], "--keep", keep_file, "--to-dense", "--out", out)
    assert result.exit_code == 0, result.output
    before, after = tensors(models[model]), tensors(out)
    for layer, (expert,) in keep.items():
        gate_up = before[f"model.layers.{layer}.{block}.experts.gate_up_proj"][expert]
        gate, up = np.split(gate_up, 2)
        assert after[f"model.layers.{layer}.mlp.gate_proj.weight"].tobytes() == gate.tobytes()
        assert after[f"model.layers.{layer}.mlp.up_proj.weight"].tobytes() == up.tobytes()
        down = before[f"model.layers.{layer}.{block}.experts.down_proj"][expert]
        assert after[f"model.layers.{layer}.mlp.down_proj.weight"].tobytes() == down.tobytes()
    if model.startswith("qwen3"):  # mlp_only_layers: layer 2 was dense and stays as it was
        name = "model.layers.2.mlp.down_proj.weight"
        assert after[name].tobytes() == before[name].tobytes()
    checked = invoke("verify", out, "--src", models[model])
    assert checked.exit_code == 0 and "compared byte for byte" in checked.output, checked.output


@pytest.mark.parametrize("shared", ["drop", "take"])
def test_qwen2_moe_takes_the_kept_expert_or_the_shared_one(models, tmp_path, shared):
    out = tmp_path / "dense"
    keep = ["--keep", "3"] if shared == "drop" else []
    result = invoke(
        "prune-experts", "--src", models["qwen2_moe"], *keep, "--to-dense", "--shared-expert", shared, "--out", out
    )
    assert result.exit_code == 0, result.output
    before, after = tensors(models["qwen2_moe"]), tensors(out)
    origin = "experts.3" if shared == "drop" else "shared_expert"
    for layer in range(4):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            want = before[f"model.layers.{layer}.mlp.{origin}.{projection}.weight"]
            assert after[f"model.layers.{layer}.mlp.{projection}.weight"].tobytes() == want.tobytes()
    assert not [name for name in after if "expert" in name or ".gate." in name]
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == (48 if shared == "drop" else 40)
    assert config["model_type"] == "qwen2" and "shared_expert_intermediate_size" not in config


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("deepseek_v3", ("--keep", "1"), "--to-dense: transformers has no dense class for deepseek_v3"),
        ("mixtral", ("--keep", "0,1"), "layer 0 keeps 2 experts; a dense layer has one MLP"),
        ("mixtral", ("--keep", "6"), "layer 0 has experts 0..5, so expert 6 is none"),
        ("mixtral", (), "--keep: missing; give the expert that becomes each layer's dense MLP"),
        ("mixtral", ("--keep", "1", "--shared-expert", "drop"), "MixtralForCausalLM has no shared expert"),
        ("qwen2_moe", ("--keep", "1"), "say --shared-expert drop"),
        ("qwen2_moe", ("--keep", "1", "--shared-expert", "take"), "with --shared-expert take the dense MLP is"),
        ("qwen3_moe_48", ("--keep", "1"), "layer 2 is dense with intermediate_size 64 but the expert has "
                                          "moe_intermediate_size 48"),
        ("qwen3_moe", ("--keep", "1,x"), "expected expert numbers"),
        ("qwen3_moe", ("--keep", '{"0":[1],"2":[1],"1":[1],"3":[1]}'), "layer 2 has no experts"),
        ("mistral", ("--keep", "1"), "model_type 'mistral' is not a mixture of experts"),
    ],
)  # fmt: skip
def test_dense_refusals(models, tmp_path, model, args, message):
    refused(invoke("prune-experts", "--src", models[model], *args, "--to-dense", "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--keep", "1", "--shared-expert", "drop"), "--shared-expert: only with --to-dense"),
        ((), "--keep: missing; give the experts to keep"),
    ],
)
def test_pruning_without_to_dense_refuses_its_options(models, tmp_path, args, message):
    refused(invoke("prune-experts", "--src", models["qwen2_moe"], *args, "--out", tmp_path / "o"), message)


def test_a_dry_run_says_which_expert_each_layer_keeps(models):
    result = invoke("prune-experts", "--src", models["mixtral"], "--keep", "4", "--to-dense", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (
        "experts: the MLP of 4 layers with experts is one expert (expert 4), the router dropped (MistralForCausalLM)"
        in result.output
    )


def test_a_plan_file_applied_gives_the_bytes_of_a_run_and_verify_catches_a_damaged_byte(models, tmp_path):
    args = ("prune-experts", "--src", models["qwen3_moe_fused"], "--keep", "2", "--to-dense")
    assert invoke(*args, "--out", tmp_path / "run" / "out", "-q").exit_code == 0
    assert invoke(*args, "--plan-json", tmp_path / "plan.json").exit_code == 0
    assert invoke("apply", tmp_path / "plan.json", tmp_path / "applied" / "out", "-q").exit_code == 0
    assert folder_bytes(tmp_path / "applied" / "out") == folder_bytes(tmp_path / "run" / "out")
    out = tmp_path / "run" / "out"
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header])["model.layers.1.mlp.up_proj.weight"]["data_offsets"]
    data[8 + header + start] ^= 0x40
    shard.write_bytes(bytes(data))
    result = invoke("verify", out, "--src", models["qwen3_moe_fused"])
    assert result.exit_code != 0 and "model.layers.1.mlp.up_proj.weight" in result.output, result.output


def test_the_card_says_an_expert_was_extracted(models, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(models["mixtral"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "mistralai/Mixtral-8x7B-v0.1"}))
    out = tmp_path / "dense"
    assert invoke("prune-experts", "--src", src, "--keep", "4", "--to-dense", "--out", out, "-q").exit_code == 0
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
    assert front["base_model"] == "mistralai/Mixtral-8x7B-v0.1" and front["base_model_relation"] == "finetune"
    assert front["tags"] == ["shardsurgeon", "expert-extraction"]
    assert "Extracted a dense model from the mixture of experts" in text
    assert "shardsurgeon prune-experts --src mistralai/Mixtral-8x7B-v0.1 --keep 4 --to-dense --out dense" in text


def test_a_stopped_run_resumes_to_the_bytes_of_a_whole_run(models, tmp_path):
    from _s3kit import stop_after

    args = ("--keep", "1", "--to-dense", "--shared-expert", "drop", "--max-shard-size", "20KB")
    whole = invoke("prune-experts", "--src", models["qwen2_moe"], *args, "--out", tmp_path / "whole" / "out", "-q")
    assert whole.exit_code == 0, whole.output
    job = api.plan_dense_expert(models["qwen2_moe"], keep=[1], shared_expert="drop", max_shard_bytes=20_000)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, tmp_path / "out", command="dense", options=WriteOptions(progress=stop_after(60_000)))
    result = invoke("prune-experts", "--src", models["qwen2_moe"], *args, "--out", tmp_path / "out")
    assert result.exit_code == 0 and "kept from an earlier run" in result.output, result.output
    want = folder_bytes(tmp_path / "whole" / "out")
    assert folder_bytes(tmp_path / "out") == want


def test_to_s3_is_the_local_output(models, tmp_path, seaweed_session, monkeypatch):
    import boto3
    from _s3kit import objects_under, own_buckets
    from _servers import s3_environment, upload_folder

    weed = own_buckets(seaweed_session, "dense")
    for key, value in s3_environment(weed.endpoint).items():
        monkeypatch.setenv(key, value)
    upload_folder(weed.endpoint, "dense", "mixtral_fused", models["mixtral_fused"])
    args = ("--keep", "3", "--to-dense", "--max-shard-size", "40KB")
    local = invoke("prune-experts", "--src", models["mixtral_fused"], *args, "--out", tmp_path / "local", "-q")
    assert local.exit_code == 0, local.output
    result = invoke("prune-experts", "--src", "s3://dense/mixtral_fused", *args, "--out", "s3://dense/out")
    assert result.exit_code == 0, result.output
    remote = objects_under(boto3.client("s3"), "s3://dense/out")
    mine = folder_bytes(tmp_path / "local")
    assert sorted(remote) == sorted(mine)
    assert [name for name in mine if name != "README.md" and remote[name] != mine[name]] == []


def test_an_upcycled_models_expert_is_the_dense_model_again(models, tmp_path):
    """Upcycling and extraction read one table of class defaults, the two ways: a Mistral model made
    Mixtral and back has the Mistral's tensors, byte for byte, and every key of its config."""
    moe, dense = tmp_path / "moe", tmp_path / "dense"
    assert invoke("upcycle", "--src", models["mistral"], "--experts", "3", "--top-k", "1", "--out", moe).exit_code == 0
    assert invoke("prune-experts", "--src", moe, "--keep", "2", "--to-dense", "--out", dense).exit_code == 0
    before, after = tensors(models["mistral"]), tensors(dense)
    assert {k: v.tobytes() for k, v in after.items()} == {k: v.tobytes() for k, v in before.items()}
    original = json.loads((models["mistral"] / "config.json").read_text())
    again = json.loads((dense / "config.json").read_text())
    assert {k: again.get(k) for k in original} == original


def test_a_cast_takes_the_experts_range_of_a_fused_tensor_and_rounds_it(models, tmp_path):
    import ml_dtypes

    out = tmp_path / "dense"
    args = ("--keep", "4", "--to-dense", "--dtype", "bfloat16", "--out", out)
    assert invoke("prune-experts", "--src", models["qwen3_moe_fused"], *args).exit_code == 0
    up = tensors(models["qwen3_moe_fused"])["model.layers.1.mlp.experts.gate_up_proj"][4][64:]
    got = tensors(out)["model.layers.1.mlp.up_proj.weight"]
    assert got.view(np.uint16).tobytes() == up.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes()
    checked = invoke("verify", out, "--src", models["qwen3_moe_fused"])
    assert checked.exit_code == 0 and "compared byte for byte" in checked.output, checked.output


def test_a_plan_file_leaving_a_layer_with_experts_without_its_expert_is_refused(models, tmp_path):
    args = ("prune-experts", "--src", models["mixtral"], "--keep", "4", "--to-dense")
    assert invoke(*args, "--plan-json", tmp_path / "plan.json").exit_code == 0
    text = (tmp_path / "plan.json").read_text()
    edited = text.replace('\\"expert\\":[4,4,4,4]', '\\"expert\\":[null,4,4,4]')
    assert edited != text
    (tmp_path / "plan.json").write_text(edited)
    result = invoke("apply", tmp_path / "plan.json", tmp_path / "out")
    refused(result, "layer 0 has experts but the recipe names none to become its MLP")
    assert not (tmp_path / "out").exists()
