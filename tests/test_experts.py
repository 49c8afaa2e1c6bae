"""upcycle and prune-experts through the CLI: the bytes of each output tensor by where they came
from, the refusals (one line each, nothing written), and the rest of the tool on these recipes
(plan files and apply, verify --src, S3 output byte-identical to local, resume after a stop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _clikit import invoke, refused  # noqa: E402
from compat_models import _LLAMA_LIKE, save_tiny_model  # noqa: E402
from conftest import folder_bytes  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402


def tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {
        "mistral": save_tiny_model(transformers.MistralConfig(**_LLAMA_LIKE), root / "mistral"),
        "qwen2": save_tiny_model(
            transformers.Qwen2Config(**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}), root / "qwen2"
        ),
        "gpt2": save_tiny_model(
            transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32), root / "gpt2"
        ),
        "mixtral": save_tiny_model(
            transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=6, num_experts_per_tok=2), root / "mixtral"
        ),
        "qwen3_moe": save_tiny_model(
            transformers.Qwen3MoeConfig(
                **_LLAMA_LIKE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[2]
            ),
            root / "qwen3_moe",
        ),
        "deepseek_v3": save_tiny_model(
            transformers.DeepseekV3Config(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=2,
                n_routed_experts=8,
                n_shared_experts=1,
                first_k_dense_replace=1,
                kv_lora_rank=8,
                q_lora_rank=8,
                qk_rope_head_dim=4,
                v_head_dim=4,
                qk_nope_head_dim=4,
                n_group=2,
                topk_group=1,
                num_experts_per_tok=2,
            ),
            root / "deepseek_v3",
        ),
    }


def test_every_expert_is_the_dense_mlp_and_the_router_a_hole(models, tmp_path):
    out = tmp_path / "moe"
    assert invoke("upcycle", "--src", models["mistral"], "--experts", "3", "--top-k", "2", "--out", out).exit_code == 0
    dense, sparse = tensors(models["mistral"]), tensors(out)
    for layer in range(4):
        block = f"model.layers.{layer}.block_sparse_moe"
        assert not sparse[f"{block}.gate.weight"].any() and sparse[f"{block}.gate.weight"].shape == (3, 32)
        for e in range(3):
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                want = dense[f"model.layers.{layer}.mlp.{theirs}.weight"]
                assert sparse[f"{block}.experts.{e}.{mine}.weight"].tobytes() == want.tobytes()
        assert not any(name.startswith(f"model.layers.{layer}.mlp.") for name in sparse)
    assert {k: v.tobytes() for k, v in dense.items() if ".mlp." not in k} == {
        k: v.tobytes() for k, v in sparse.items() if "block_sparse_moe" not in k
    }


def test_qwen2_moe_halves_the_routed_down_projections_and_copies_the_shared_expert(models, tmp_path):
    out = tmp_path / "moe"
    assert invoke("upcycle", "--src", models["qwen2"], "--experts", "2", "--top-k", "1", "--out", out).exit_code == 0
    dense, sparse = tensors(models["qwen2"]), tensors(out)
    down = dense["model.layers.1.mlp.down_proj.weight"]
    assert sparse["model.layers.1.mlp.experts.1.down_proj.weight"].tobytes() == (down * 0.5).tobytes()
    assert sparse["model.layers.1.mlp.shared_expert.down_proj.weight"].tobytes() == down.tobytes()
    assert not sparse["model.layers.1.mlp.shared_expert_gate.weight"].any()
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["moe_intermediate_size"] == 64


def test_pruning_keeps_the_rows_and_experts_named_in_that_order(models, tmp_path):
    out = tmp_path / "pruned"
    keep = {"1": [7, 6, 0, 1], "2": [2, 3, 4, 5]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    result = invoke("prune-experts", "--src", models["deepseek_v3"], "--keep", tmp_path / "keep.json", "--out", out)
    refused(result, "layer 1 keeps [2, 2] experts of its 2 routing groups", "in ascending order")
    keep = {"1": [0, 7], "2": [2, 5]}  # one per group: DeepSeek-V3 scores a group by its two best experts
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    result = invoke("prune-experts", "--src", models["deepseek_v3"], "--keep", tmp_path / "keep.json", "--out", out)
    refused(result, "would keep 1 experts in each of its 2 routing groups")
    keep = {"1": [0, 1, 4, 7], "2": [2, 3, 5, 6]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    result = invoke("prune-experts", "--src", models["deepseek_v3"], "--keep", tmp_path / "keep.json", "--out", out)
    assert result.exit_code == 0, result.output
    before, after = tensors(models["deepseek_v3"]), tensors(out)
    for layer, kept in keep.items():
        gate = f"model.layers.{layer}.mlp.gate"
        assert after[f"{gate}.weight"].tobytes() == before[f"{gate}.weight"][kept].tobytes()
        bias = f"{gate}.e_score_correction_bias"
        assert after[bias].tobytes() == before[bias][kept].tobytes()
        for new, old in enumerate(kept):
            name = f"model.layers.{layer}.mlp.experts.{{}}.up_proj.weight"
            assert after[name.format(new)].tobytes() == before[name.format(old)].tobytes()
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 4
    assert "model.layers.0.mlp.gate_proj.weight" in after  # first_k_dense_replace: a dense layer, untouched
    checked = invoke("verify", out, "--src", models["deepseek_v3"])
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("gpt2", ("--experts", "4", "--top-k", "2"), "model_type 'gpt2' has no sparse counterpart"),
        ("mistral", ("--experts", "2", "--top-k", "3"), "--top-k 3: expected between 1 and the number of experts"),
        ("mistral", ("--experts", "4", "--top-k", "2", "--router", "random"), "expected zeros, random:SEED"),
        ("qwen2", ("--experts", "4", "--top-k", "2", "--layers", "9"), "--layers: layer 9 is out of range"),
        ("mixtral", ("--experts", "4", "--top-k", "2"), "model_type 'mixtral' has no sparse counterpart"),
    ],
)
def test_upcycle_refusals(models, tmp_path, model, args, message):
    refused(invoke("upcycle", "--src", models[model], *args, "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "model, keep, message",
    [
        ("mixtral", "0,6", "has experts 0..5, so expert 6 cannot be kept"),
        ("mixtral", "1,1,2", "names expert 1 twice"),
        ("mixtral", "1", "fewer than the 2 each token is routed to"),
        ("qwen3_moe", '{"0":[0,1],"1":[0,1],"2":[0,1],"3":[0,1]}', "layer 2 has no experts"),
        ("qwen3_moe", '{"0":[0,1],"1":[0,1,2],"3":[0,1]}', "layers keep 2 and 3 experts"),
        ("qwen3_moe", '{"0":[0,1],"3":[0,1]}', "layer 1 has experts but no list"),
        ("qwen3_moe", "[[0,1],[0,1]]", "2 lists for a model of 4 layers"),
        ("qwen3_moe", "0,x", "expected expert numbers such as 0,3,5"),
        ("qwen3_moe", "missing.json", "missing.json"),
        ("mistral", "0,1", "model_type 'mistral' is not a mixture of experts"),
    ],
)
def test_prune_refusals(models, tmp_path, model, keep, message):
    refused(invoke("prune-experts", "--src", models[model], "--keep", keep, "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


def test_a_plan_file_applied_gives_the_bytes_of_a_run(models, tmp_path):
    args = ("upcycle", "--src", models["qwen2"], "--experts", "3", "--top-k", "2", "--router", "random:5")
    assert invoke(*args, "--out", tmp_path / "run" / "out", "-q").exit_code == 0
    assert invoke(*args, "--plan-json", tmp_path / "plan.json").exit_code == 0
    assert invoke("apply", tmp_path / "plan.json", tmp_path / "applied" / "out", "-q").exit_code == 0
    assert folder_bytes(tmp_path / "applied" / "out") == folder_bytes(tmp_path / "run" / "out")
    checked = invoke("verify", tmp_path / "run" / "out", "--src", models["qwen2"])
    assert checked.exit_code == 0 and "compared byte for byte" in checked.output, checked.output


def test_a_damaged_router_fails_verify(models, tmp_path):
    out = tmp_path / "run"
    args = ("--experts", "3", "--top-k", "2", "--router", "random:5")
    assert invoke("upcycle", "--src", models["qwen2"], *args, "--out", out, "-q").exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = out / index["model.layers.2.mlp.gate.weight"]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header])
    start, _ = meta["model.layers.2.mlp.gate.weight"]["data_offsets"]
    data[8 + header + start] ^= 0x40
    shard.write_bytes(bytes(data))
    result = invoke("verify", out, "--src", models["qwen2"])
    assert result.exit_code != 0 and "model.layers.2.mlp.gate.weight" in result.output, result.output


def test_from_s3_to_s3_resumed_after_a_stop_is_the_local_output(models, tmp_path, seaweed_session, monkeypatch):
    """The experts are copied by the server; a run stopped half way and run again keeps what it
    finished and publishes the bytes of a local run."""
    import boto3
    from _s3kit import objects_under, own_buckets, stop_after
    from _servers import s3_environment, upload_folder

    from shardsurgeon import WriteOptions, api

    weed = own_buckets(seaweed_session, "experts")
    for key, value in s3_environment(weed.endpoint).items():
        monkeypatch.setenv(key, value)
    upload_folder(weed.endpoint, "experts", "mixtral", models["mixtral"])
    args = ("--keep", "4,1,3", "--max-shard-size", "40KB")
    assert invoke("prune-experts", "--src", models["mixtral"], *args, "--out", tmp_path / "pruned", "-q").exit_code == 0
    job = api.plan_prune_experts("s3://experts/mixtral", keep=[4, 1, 3], max_shard_bytes=40_000)
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, "s3://experts/pruned", command="prune", options=WriteOptions(progress=stop_after(60_000)))
    result = invoke("prune-experts", "--src", "s3://experts/mixtral", *args, "--out", "s3://experts/pruned")
    assert result.exit_code == 0 and "kept" in result.output, result.output
    remote = objects_under(boto3.client("s3"), "s3://experts/pruned")
    local = folder_bytes(tmp_path / "pruned")
    assert sorted(remote) == sorted(local)
    assert [name for name in local if name != "README.md" and remote[name] != local[name]] == []


# --- mergekit-moe configs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """A Mistral-shaped base and two "fine-tunes" of it (the same config, other weights)."""
    root = tmp_path_factory.mktemp("moe-config")
    config = transformers.MistralConfig(**_LLAMA_LIKE)
    for name, seed in (("base", 0), ("coder", 1), ("writer", 2)):
        save_tiny_model(config, root / name, seed=seed)
    return root


def test_a_mergekit_moe_config_takes_each_experts_mlp_from_its_model(fine_tunes, tmp_path):
    (fine_tunes / "clowncar.yml").write_text(
        "base_model: ./base\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n"
        "  - source_model: ./coder\n    positive_prompts: [code]\n  - source_model: ./writer\n"
        "  - source_model: ./base\n"
    )
    out = tmp_path / "clowncar"
    result = invoke("moe", fine_tunes / "clowncar.yml", out, "--seed", "3")
    assert result.exit_code == 0, result.output
    merged = tensors(out)
    for index, model in enumerate(("coder", "writer", "base")):
        dense = tensors(fine_tunes / model)
        for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            want = dense[f"model.layers.2.mlp.{theirs}.weight"].astype(merged["model.embed_tokens.weight"].dtype)
            got = merged[f"model.layers.2.block_sparse_moe.experts.{index}.{mine}.weight"]
            assert got.tobytes() == want.tobytes(), (model, mine)
    base = tensors(fine_tunes / "base")
    assert (
        merged["model.layers.2.self_attn.q_proj.weight"].tobytes()
        == base["model.layers.2.self_attn.q_proj.weight"].astype(merged["model.embed_tokens.weight"].dtype).tobytes()
    )
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    assert "the MLPs of coder, writer and base in that order" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("base_model: ./base\ngate_mode: hidden\nexperts:\n  - source_model: ./coder\n",
         "gate_mode hidden: its gates come from running the prompts through the models"),
        ("base_model: ./base\ngate_mode: random\nexperts_per_token: 3\nexperts:\n  - source_model: ./coder\n",
         "experts_per_token 3: expected between 1 and the number of experts (1)"),
        ("base_model: ./base\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: ./coder\n"
         "    noise_scale: 0.1\n",
         "noise_scale adds random noise"),
        ("base_model: ./base\ngate_mode: random\nexperts: []\n", "experts: expected a list of experts"),
        ("base_model: ./base\ngate_mode: random\nslices: []\nexperts:\n  - source_model: ./coder\n",
         "unknown key slices"),
        ("base_model: ./base\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: ./nowhere\n",
         "nowhere"),
    ],
)  # fmt: skip
def test_mergekit_moe_refusals(fine_tunes, tmp_path, text, message):
    config = fine_tunes / f"bad-{abs(hash(text))}.yml"
    config.write_text(text)
    refused(invoke("moe", config, tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


def test_a_qwen2_moe_config_with_a_shared_expert_loads(tmp_path):
    config = transformers.Qwen2Config(**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"})
    for name, seed in (("base", 0), ("math", 1), ("chat", 2)):
        save_tiny_model(config, tmp_path / name, seed=seed)
    (tmp_path / "qwen.yml").write_text(
        "base_model: ./base\ngate_mode: random\narchitecture: qwen\nexperts_per_token: 1\nexperts:\n"
        "  - source_model: ./math\n  - source_model: ./chat\nshared_experts:\n  - source_model: ./base\n"
    )
    result = invoke("moe", tmp_path / "qwen.yml", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    made, chat = tensors(tmp_path / "out"), tensors(tmp_path / "chat")
    assert made["model.layers.3.mlp.experts.1.down_proj.weight"].tobytes() == (
        chat["model.layers.3.mlp.down_proj.weight"].tobytes()
    )  # copied as it is: no halving with experts of several models
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    assert type(model).__name__ == "Qwen2MoeForCausalLM"


def test_a_layer_with_experts_but_no_router_is_refused(models, tmp_path):
    import shutil

    src = tmp_path / "mixtral"
    shutil.copytree(models["mixtral"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"]
    from safetensors.numpy import load_file as load
    from safetensors.numpy import save_file as save

    state = load(shard)
    del state["model.layers.1.block_sparse_moe.gate.weight"]
    save(state, shard, metadata={"format": "pt"})
    del index["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(
        invoke("prune-experts", "--src", src, "--keep", "0,1", "--out", tmp_path / "o"),
        "layer 1 has experts but no router",
    )


def test_shared_experts_for_an_architecture_without_one_are_refused(fine_tunes, tmp_path):
    (fine_tunes / "shared.yml").write_text(
        "base_model: ./base\ngate_mode: random\nexperts:\n  - source_model: ./coder\n  - source_model: ./writer\n"
        "shared_experts:\n  - source_model: ./base\n"
    )
    refused(invoke("moe", fine_tunes / "shared.yml", tmp_path / "o"), "MixtralForCausalLM has no shared expert")


@pytest.mark.parametrize("experts", [[1, 2], "x", 3, {"prune": {"keep": [[0, 1], [0, 1, 2], None, None]}},
                                     {"prune": {"keep": [None, None, None, None]}}])  # fmt: skip
def test_a_plan_files_recorded_experts_edited_is_one_line(models, tmp_path, experts):
    plan = tmp_path / "plan.json"
    assert invoke("prune-experts", "--src", models["mixtral"], "--keep", "0,1", "--plan-json", plan).exit_code == 0
    record = json.loads(plan.read_text())
    recipe = json.loads(record["job"]["recipe"])
    recipe["experts"] = experts
    record["job"]["recipe"] = json.dumps(recipe)
    plan.write_text(json.dumps(record))
    refused(invoke("apply", plan, tmp_path / "o"), "recorded recipe is unreadable")
