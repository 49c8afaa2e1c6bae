"""An expert extracted as a dense model (``prune-experts --to-dense``), judged by transformers: the
dense model loads without a missing or unexpected weight as the dense class, and computes the logits
of the mixture routed to that one expert alone (top-k 1, every other router logit minus infinity,
so its weight is exactly 1.0), bit for bit in float32 and bfloat16. Qwen2-MoE: with
``--shared-expert drop`` the mixture's shared expert weighed 0 (its gate minus infinity), with
``take`` the shared expert alone (its gate plus infinity, the routed expert's down projection zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from compat_models import (  # noqa: E402
    _LLAMA_LIKE,
    logits_with_routers_masked,
    save_tiny_model,
)
from compat_models import load_checked as load  # noqa: E402
from compat_models import logits_of as logits  # noqa: E402
from compat_models import run_ok as run  # noqa: E402

from shardsurgeon.model.moe import CLASS_DEFAULTS  # noqa: E402

pytestmark = pytest.mark.compat

EXPERTS = 6
MOE = {
    "mixtral": lambda: transformers.MixtralConfig(
        **_LLAMA_LIKE, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=3
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **{**_LLAMA_LIKE, "tie_word_embeddings": True}, num_experts=EXPERTS, num_experts_per_tok=2,
        moe_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[2], rms_norm_eps=1e-5,
        use_sliding_window=True, sliding_window=3,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}, num_experts=EXPERTS, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=96, norm_topk_prob=False,
        use_sliding_window=True, sliding_window=3, max_window_layers=3,
    ),
}  # fmt: skip
DENSE_CLASS = {"mixtral": "MistralForCausalLM", "qwen3_moe": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Constant(torch.nn.Module):
    """A shared expert's gate that always says ``value`` (sigmoid of -inf is 0, of +inf is 1)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((*x.shape[:-1], 1), self.value, dtype=x.dtype)


def routed_to_one(path: Path, expert: int, dtype: torch.dtype, shared: str | None = None) -> torch.Tensor:
    """The mixture's logits with top-k 1 and every router logit but ``expert``'s minus infinity;
    the shared expert weighed 0 (``drop``) or alone (``take``: the routed expert's output zero)."""
    model = load(path, dtype, num_experts_per_tok=1)
    routers = {id(m.weight) for name, m in model.named_modules() if name.endswith(".gate") and hasattr(m, "weight")}
    for name, module in model.named_modules():
        if name.endswith(".shared_expert_gate"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            parent.shared_expert_gate = Constant(float("-inf") if shared == "drop" else float("inf"))
        if shared == "take" and name.endswith(".experts") and hasattr(module, "down_proj"):
            with torch.no_grad():
                module.down_proj[expert].zero_()
    return logits_with_routers_masked(model, routers, lambda e: e == expert)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            made[arch, dtype] = save_tiny_model(MOE[arch](), folder, dtype=DTYPES[dtype])
        return made[arch, dtype]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "arch, expert, shared",
    [("mixtral", 4, None), ("mixtral", 0, None), ("qwen3_moe", 2, None), ("qwen2_moe", 5, "drop"),
     ("qwen2_moe", 0, "take")],
)  # fmt: skip
def test_the_dense_model_is_the_mixture_routed_to_that_expert(moe, tmp_path, arch, expert, shared, dtype):
    src = moe(arch, dtype)
    args = ["--keep", str(expert)] if shared != "take" else []
    args += ["--shared-expert", shared] if shared else []
    run("prune-experts", "--src", src, *args, "--to-dense", "--out", tmp_path / "dense", "-q")
    dense = load(tmp_path / "dense", DTYPES[dtype])
    assert type(dense).__name__ == DENSE_CLASS[arch]
    assert torch.equal(logits(dense), routed_to_one(src, expert, DTYPES[dtype], shared))


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_expert_size_not_a_multiple_of_32_differs_by_roundings_of_transformers_own(tmp_path, dtype):
    """transformers computes an expert's gate and up projections as one matmul and applies SiLU to
    the gate half, a strided view; torch's vectorised SiLU rounds a row's tail of a strided view
    otherwise than a contiguous one's (sizes of 32, 64, 96 agree; 24, 40, 48 do not). The dense
    model's bytes are still the expert's: the logits differ by at most a few ulps of float32."""
    config = MOE["qwen3_moe"]()
    config.moe_intermediate_size, config.mlp_only_layers = 48, []
    src = save_tiny_model(config, tmp_path / "src", dtype=DTYPES[dtype])
    run("prune-experts", "--src", src, "--keep", "3", "--to-dense", "--out", tmp_path / "d", "-q")
    difference = (logits(load(tmp_path / "d", DTYPES[dtype])) - routed_to_one(src, 3, DTYPES[dtype])).abs().max()
    print(f"{dtype}: largest logit difference {float(difference):.3g}")
    assert float(difference) <= {"float32": 2e-6, "bfloat16": 0.05}[dtype]


def test_a_keep_per_layer_takes_each_layers_own_expert(moe, tmp_path):
    src = moe("mixtral", "float32")
    keep = [1, 5, 0, 3]
    (tmp_path / "keep.json").write_text(json.dumps([[e] for e in keep]))
    run("prune-experts", "--src", src, "--keep", tmp_path / "keep.json", "--to-dense", "--out", tmp_path / "d", "-q")
    want = load(src, torch.float32).state_dict()
    got = load(tmp_path / "d", torch.float32).state_dict()
    for layer, e in enumerate(keep):
        fused = want[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
        gate, up = fused.chunk(2)
        assert torch.equal(got[f"model.layers.{layer}.mlp.gate_proj.weight"], gate)
        assert torch.equal(got[f"model.layers.{layer}.mlp.up_proj.weight"], up)
        down = want[f"model.layers.{layer}.mlp.experts.down_proj"][e]
        assert torch.equal(got[f"model.layers.{layer}.mlp.down_proj.weight"], down)


@pytest.mark.parametrize("arch", MOE)
def test_the_config_keeps_what_the_mixture_computed_with(moe, tmp_path, arch):
    src = moe(arch, "float32")
    args = ["--shared-expert", "drop"] if arch == "qwen2_moe" else []
    run("prune-experts", "--src", src, "--keep", "1", "--to-dense", *args, "--out", tmp_path / "d", "-q")
    before = json.loads((src / "config.json").read_text())
    after = json.loads((tmp_path / "d" / "config.json").read_text())
    for key in ("rope_parameters", "rms_norm_eps", "head_dim", "tie_word_embeddings", "vocab_size", "hidden_size"):
        if key in before:
            assert after[key] == before[key], key
    assert not {"num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size"} & set(after)
    if arch == "mixtral":
        assert after["sliding_window"] == 3
    else:
        assert after["intermediate_size"] == before["moe_intermediate_size"]
        assert len(after["layer_types"]) == 4


@pytest.mark.parametrize("model_type", CLASS_DEFAULTS)
def test_the_class_defaults_are_transformers_own(model_type):
    """The table both directions read (dense to sparse, sparse to dense) holds what each config class
    of transformers assumes for a key left out."""
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in CLASS_DEFAULTS[model_type].items():
        if key == "rope_theta":
            assert config.rope_parameters["rope_theta"] == value, key
        else:
            assert getattr(config, key) == value, key


def test_a_mixtral_config_that_leaves_out_its_defaults_gives_the_same_logits(tmp_path):
    """Mixtral's eps (1e-5), rope theta (1e6) and sliding window (none) differ from Mistral's: a
    Mixtral config without them still gives a dense model that computes what the mixture did."""
    src = save_tiny_model(MOE["mixtral"](), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_parameters", "sliding_window", "head_dim"):
        config.pop(key, None)
    (src / "config.json").write_text(json.dumps(config))
    run("prune-experts", "--src", src, "--keep", "2", "--to-dense", "--out", tmp_path / "d", "-q")
    assert torch.equal(logits(load(tmp_path / "d", torch.float32)), routed_to_one(src, 2, torch.float32))
