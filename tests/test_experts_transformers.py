"""Upcycling and expert pruning, judged by transformers: the outputs load without a missing or
unexpected weight, an upcycled model with a zero router computes the dense model's logits bit for
bit (float32 and bfloat16, top-k 1, 2 and 4 of 4 experts; Qwen2-MoE with its shared expert), and a
pruned model computes the original's logits with the dropped experts' router logits set to minus
infinity (within 1e-6 in float32: a router over fewer rows rounds differently)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from compat_models import (  # noqa: E402
    _LLAMA_LIKE,
    logits_with_routers_masked,
    save_tiny_model,
)
from compat_models import load_checked as load  # noqa: E402
from compat_models import logits_of as logits  # noqa: E402
from compat_models import run_ok as run  # noqa: E402
from safetensors import safe_open  # noqa: E402

from shardsurgeon.cli import cli  # noqa: E402

pytestmark = pytest.mark.compat

DENSE = {
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=3),
    "llama": lambda: transformers.LlamaConfig(**{**_LLAMA_LIKE, "rms_norm_eps": 1e-6}),
    "qwen2": lambda: transformers.Qwen2Config(
        **{k: v for k, v in _LLAMA_LIKE.items() if k not in ("head_dim", "tie_word_embeddings")},
        tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=3, max_window_layers=2,
        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    ),
    "qwen3": lambda: transformers.Qwen3Config(**{**_LLAMA_LIKE, "head_dim": 16, "tie_word_embeddings": True}),
}  # fmt: skip
SPARSE = {"mistral": "MixtralForCausalLM", "llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
          "qwen3": "Qwen3MoeForCausalLM"}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    made: dict[tuple[str, str], tuple[Path, torch.Tensor]] = {}

    def get(arch: str, dtype: str) -> tuple[Path, torch.Tensor]:
        if (arch, dtype) not in made:
            path = save_tiny_model(DENSE[arch](), tmp_path_factory.mktemp(f"{arch}-{dtype}"), dtype=DTYPES[dtype])
            made[arch, dtype] = path, logits(load(path, DTYPES[dtype]))
        return made[arch, dtype]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("arch", DENSE)
def test_a_zero_router_gives_the_dense_models_logits(dense, tmp_path, arch, top_k, dtype):
    src, want = dense(arch, dtype)
    run("upcycle", "--src", src, "--experts", "4", "--top-k", top_k, "--out", tmp_path / "moe", "-q")
    model = load(tmp_path / "moe", DTYPES[dtype])
    assert type(model).__name__ == SPARSE[arch]
    assert torch.equal(logits(model), want)


def test_the_config_keeps_what_the_dense_model_computed_with(dense, tmp_path):
    src, _ = dense("mistral", "float32")
    run("upcycle", "--src", src, "--experts", "8", "--top-k", "2", "--out", tmp_path / "moe", "-q")
    dense_config = json.loads((src / "config.json").read_text())
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    for key in ("sliding_window", "rms_norm_eps", "rope_parameters", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert config[key] == dense_config[key], key


def test_a_seeded_router_is_the_same_on_every_run_and_differs_by_seed(dense, tmp_path):
    src, _ = dense("qwen3", "float32")
    routers = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--router", f"random:{seed}",
            "--out", tmp_path / name, "-q")  # fmt: skip
        state = load(tmp_path / name, torch.float32).state_dict()
        routers.append(state["model.layers.1.mlp.gate.weight"])
    assert torch.equal(routers[0], routers[1]) and not torch.equal(routers[0], routers[2])
    assert 0.01 < float(routers[0].std()) < 0.04  # initializer_range 0.02


def test_some_layers_upcycled_the_others_dense(dense, tmp_path):
    src, want = dense("qwen3", "float32")
    run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--layers", "1,3", "--out", tmp_path / "m", "-q")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0, 2]
    assert torch.equal(logits(load(tmp_path / "m", torch.float32)), want)


def test_mixtral_has_no_key_for_dense_layers(dense, tmp_path):
    src, _ = dense("mistral", "float32")
    result = CliRunner().invoke(
        cli, ["upcycle", "--src", str(src), "--experts", "4", "--top-k", "2", "--layers", "1", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "MixtralForCausalLM has no config key" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "arch, router, shared_gate",
    [
        ("mistral", "model.layers.{}.block_sparse_moe.gate.weight", None),
        ("qwen2", "model.layers.{}.mlp.gate.weight", "model.layers.{}.mlp.shared_expert_gate.weight"),
    ],
)
def test_routers_from_a_file_are_the_loaded_models_routers(dense, tmp_path, arch, router, shared_gate):
    """A file of float32 routers, the output in bfloat16: transformers holds the file's values rounded."""
    from safetensors.numpy import save_file

    src, _ = dense(arch, "bfloat16")
    rng = np.random.default_rng(5)
    values = {router.format(layer): rng.standard_normal((4, 32)).astype(np.float32) for layer in range(4)}
    if shared_gate is not None:
        values[shared_gate.format(1)] = rng.standard_normal((1, 32)).astype(np.float32)
    save_file(values, str(tmp_path / "routers.safetensors"))
    run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--router", tmp_path / "routers.safetensors",
        "--out", tmp_path / "moe", "-q")  # fmt: skip
    state = load(tmp_path / "moe", torch.bfloat16).state_dict()
    for name, value in values.items():
        loaded = state[name.replace("block_sparse_moe.", "mlp.")]  # transformers 5 names Mixtral's block mlp
        assert torch.equal(loaded, torch.from_numpy(value).to(torch.bfloat16)), name
    if shared_gate is not None:
        assert not state[shared_gate.format(0)].any()


# --- pruning ------------------------------------------------------------------------------------

MOE = {
    "mixtral": lambda: transformers.MixtralConfig(
        **_LLAMA_LIKE, num_local_experts=6, num_experts_per_tok=2, sliding_window=None
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_LLAMA_LIKE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[2],
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=40, norm_topk_prob=False,
    ),
}  # fmt: skip
KEEP = [5, 0, 3]


def masked_logits(path: Path, keep: list[int], experts: int) -> torch.Tensor:
    """The original model's logits with every dropped expert's router logit set to minus infinity."""
    model = load(path, torch.float32)
    dropped = [e for e in range(experts) if e not in keep]
    routers = {
        id(m.weight) for name, m in model.named_modules() if name.endswith(".gate") and m.weight.shape[0] == experts
    }
    return logits_with_routers_masked(model, routers, lambda e: e not in dropped)


@pytest.mark.parametrize("arch", MOE)
def test_a_pruned_model_is_the_original_with_the_dropped_experts_never_chosen(tmp_path, arch):
    src = save_tiny_model(MOE[arch](), tmp_path / "src")
    run("prune-experts", "--src", src, "--keep", ",".join(map(str, KEEP)), "--out", tmp_path / "out", "-q")
    pruned = load(tmp_path / "out", torch.float32)
    assert torch.allclose(logits(pruned), masked_logits(src, KEEP, 6), rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [config[k] for k in ("num_local_experts", "num_experts") if k in config] == [3]


def test_a_fused_checkpoint_is_pruned_by_byte_ranges(tmp_path):
    """The form mergekit-moe writes (one [E, ...] tensor per projection), written here from the
    model's own state dict: the pruned tensors are the kept experts' slices, in the kept order."""
    from safetensors.torch import save_file

    src = save_tiny_model(MOE["qwen3_moe"](), tmp_path / "per-expert")
    model = load(src, torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"} | {
        "lm_head.weight": model.state_dict()["lm_head.weight"].clone()}, fused / "model.safetensors",
        metadata={"format": "pt"})  # fmt: skip
    (fused / "config.json").write_text((src / "config.json").read_text())
    run("prune-experts", "--src", fused, "--keep", ",".join(map(str, KEEP)), "--out", tmp_path / "out", "-q")
    with (
        safe_open(fused / "model.safetensors", "pt") as before,
        safe_open(tmp_path / "out" / "model.safetensors", "pt") as after,
    ):
        name = "model.layers.0.mlp.experts.gate_up_proj"
        assert torch.equal(after.get_tensor(name), before.get_tensor(name)[KEEP])
        router = "model.layers.0.mlp.gate.weight"
        assert torch.equal(after.get_tensor(router), before.get_tensor(router)[KEEP])
    pruned = load(tmp_path / "out", torch.float32)
    assert torch.allclose(logits(pruned), masked_logits(src, KEEP, 6), rtol=0, atol=1e-6)


def test_keeping_fewer_experts_than_the_top_k_is_refused(tmp_path):
    src = save_tiny_model(MOE["mixtral"](), tmp_path / "src")
    result = CliRunner().invoke(cli, ["prune-experts", "--src", str(src), "--keep", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "fewer than the 2 each token is routed to" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_float16_qwen2_with_subnormal_weights_is_exact(tmp_path):
    """float16 weights hold subnormal numbers, which halving rounds: the shared expert's down
    projection is zeros instead, and the routed copies give the dense logits bit for bit."""
    src = save_tiny_model(DENSE["qwen2"](), tmp_path / "dense", dtype=torch.float16)
    from safetensors.torch import load_file, save_file

    for shard in src.glob("*.safetensors"):  # put subnormals in every down projection
        state = load_file(shard)
        for name, value in state.items():
            if "down_proj" in name:
                value.view(-1)[::7] = torch.tensor(3e-6, dtype=torch.float16)
        save_file(state, shard, metadata={"format": "pt"})
    want = logits(load(src, torch.float16))
    run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe", "-q")
    assert torch.equal(logits(load(tmp_path / "moe", torch.float16)), want)


# --- configs the red-team pass found mishandled ------------------------------------------------


@pytest.mark.parametrize(
    "name, make",
    [
        ("qwen3 with attention biases", lambda: transformers.Qwen3Config(**_LLAMA_LIKE, attention_bias=True)),
        ("qwen3 sliding from layer 28 of 4", lambda: transformers.Qwen3Config(
            **_LLAMA_LIKE, use_sliding_window=True, sliding_window=3, max_window_layers=28)),
        ("qwen2 without layer_types", lambda: transformers.Qwen2Config(
            **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}, use_sliding_window=True, sliding_window=3,
            max_window_layers=2)),
    ],
)  # fmt: skip
def test_dense_configs_whose_sparse_class_reads_them_otherwise(tmp_path, name, make):
    src = save_tiny_model(make(), tmp_path / "dense")
    config = json.loads((src / "config.json").read_text())
    if name == "qwen2 without layer_types":
        del config["layer_types"]  # Qwen2 decides them by its own rule, Qwen2-MoE by another
        (src / "config.json").write_text(json.dumps(config))
    want = logits(load(src, torch.float32))
    run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe", "-q")
    assert torch.equal(logits(load(tmp_path / "moe", torch.float32)), want), name


def test_a_llama_config_without_kv_heads_has_as_many_as_attention_heads(tmp_path):
    src = save_tiny_model(transformers.LlamaConfig(**{**_LLAMA_LIKE, "num_key_value_heads": 4}), tmp_path / "dense")
    config = json.loads((src / "config.json").read_text())
    del config["num_key_value_heads"]  # Llama-1 configs leave it out
    (src / "config.json").write_text(json.dumps(config))
    want = logits(load(src, torch.float32))
    run("upcycle", "--src", src, "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe", "-q")
    assert torch.equal(logits(load(tmp_path / "moe", torch.float32)), want)


def test_a_pruned_deepseek_v3_keeps_its_routing_groups(tmp_path):
    """Group-limited routing (n_group 2, the best group chosen by its two best experts): keeping as
    many experts of each group gives the masked original's logits."""
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4,
        qk_nope_head_dim=4, n_group=2, topk_group=1, num_experts_per_tok=2,
    )  # fmt: skip
    src = save_tiny_model(config, tmp_path / "src")
    keep = [0, 2, 5, 7]
    run("prune-experts", "--src", src, "--keep", ",".join(map(str, keep)), "--out", tmp_path / "out", "-q")
    pruned = load(tmp_path / "out", torch.float32)
    assert torch.allclose(logits(pruned), masked_logits(src, keep, 8), rtol=0, atol=1e-6)
