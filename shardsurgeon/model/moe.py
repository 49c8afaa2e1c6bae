"""What the tool knows of mixture-of-experts layers: where each architecture keeps its router,
experts and shared expert, and which config keys count and place them. Pure data and lookups.

Two forms of expert tensors are read. One tensor per expert and projection
(``{block}.experts.{e}.{projection}.weight``), which ``save_pretrained`` writes, and one fused
tensor per projection holding every expert (``{block}.experts.gate_up_proj``, ``[E, ...]``), which
transformers holds in memory and mergekit-moe writes; transformers loads both. Outputs made here
use the first form, as ``save_pretrained`` does; a pruned checkpoint keeps the form it had.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import RecipeError, safe_text

DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""A dense layer's gated MLP, as ``mlp.{name}.weight``: gate, up, down."""


@dataclass(frozen=True, slots=True)
class MoeKind:
    """One architecture's mixture-of-experts layer."""

    model_type: str
    architecture: str
    block: str
    """Where a layer keeps its router and experts: ``block_sparse_moe`` or ``mlp``."""
    projections: tuple[str, str, str]
    """An expert's gate, up and down projections as its tensors name them."""
    experts_key: str
    """The config key counting the routed experts."""
    dense_layers_key: str | None = None
    """The config key listing the layers that stay dense, where the architecture has one."""
    shared: str | None = None
    """The shared expert, which every token passes through (Qwen2-MoE, DeepSeek)."""
    shared_gate: str | None = None
    """The shared expert's sigmoid gate (Qwen2-MoE)."""
    top_k_normalised_key: str | None = None
    """The key saying whether the top-k routing weights are renormalised to sum to 1."""

    def router(self, block: str | None = None) -> str:
        return f"{block or self.block}.gate.weight"

    def expert(self, index: int, projection: str) -> str:
        return f"{self.block}.experts.{index}.{projection}.weight"


MIXTRAL = MoeKind("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts")
QWEN3_MOE = MoeKind(
    "qwen3_moe", "Qwen3MoeForCausalLM", "mlp", DENSE_PROJECTIONS, "num_experts", "mlp_only_layers",
    top_k_normalised_key="norm_topk_prob",
)  # fmt: skip
QWEN2_MOE = MoeKind(
    "qwen2_moe", "Qwen2MoeForCausalLM", "mlp", DENSE_PROJECTIONS, "num_experts", "mlp_only_layers",
    shared="shared_expert", shared_gate="shared_expert_gate", top_k_normalised_key="norm_topk_prob",
)  # fmt: skip
DEEPSEEK_V2 = MoeKind(
    "deepseek_v2", "DeepseekV2ForCausalLM", "mlp", DENSE_PROJECTIONS, "n_routed_experts", shared="shared_experts",
    top_k_normalised_key="norm_topk_prob",
)  # fmt: skip
DEEPSEEK_V3 = MoeKind(
    "deepseek_v3", "DeepseekV3ForCausalLM", "mlp", DENSE_PROJECTIONS, "n_routed_experts", shared="shared_experts",
    top_k_normalised_key="norm_topk_prob",
)  # fmt: skip

MOE_KINDS = {kind.model_type: kind for kind in (MIXTRAL, QWEN3_MOE, QWEN2_MOE, DEEPSEEK_V2, DEEPSEEK_V3)}
"""The mixture-of-experts architectures whose experts can be pruned, by ``model_type``."""

UPCYCLE_TARGETS = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen3": QWEN3_MOE, "qwen2": QWEN2_MOE}
"""The sparse architecture each dense one is upcycled to, by the dense ``model_type``."""

DENSE_TARGETS = {"mixtral": ("mistral", "MistralForCausalLM"), "qwen3_moe": ("qwen3", "Qwen3ForCausalLM"),
                 "qwen2_moe": ("qwen2", "Qwen2ForCausalLM")}  # fmt: skip
"""The dense architecture an expert of each sparse one becomes, by the sparse ``model_type``
(``model_type``, class). Mixtral's attention is Mistral's, sliding window included, so Mixtral
becomes Mistral, never Llama (which has no sliding window). DeepSeek has no dense class."""

MOE_CONFIG_KEYS = (
    "num_local_experts", "num_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "router_z_loss_coef", "moe_intermediate_size", "shared_expert_intermediate_size",
    "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "qkv_bias",
)  # fmt: skip
"""Keys of a sparse config that its dense class has no use for (Qwen2 always has q/k/v biases)."""

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "intermediate_size": 11008},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "hidden_size": 4096,
        "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_window_layers": 28,
    },
    "qwen3": {
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "head_dim": 128,
        "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "max_window_layers": 28,
    },
    "mixtral": {
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072, "sliding_window": None,
        "intermediate_size": 14336, "num_key_value_heads": 8,
    },
    "qwen3_moe": {
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 24, "num_key_value_heads": 4, "moe_intermediate_size": 768,
    },
    "qwen2_moe": {
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_window_layers": 28, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "qkv_bias": True,
    },
}  # fmt: skip
"""What transformers assumes for a key a config leaves out, by ``model_type``, where a dense class
and its sparse counterpart assume differently (Mixtral's eps is 1e-5 and its rope theta 1e6,
Mistral's 1e-6 and 1e4; Qwen3-MoE's head size is hidden/heads, Qwen3's 128; sizes and head
counts): :func:`class_defaults` writes them out, so a model made into the other class computes
what it did. A Llama config without ``num_key_value_heads`` has as many as attention heads."""


def class_defaults(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The keys ``config`` (of ``model_type``) leaves out, with the values its class gives them:
    rope theta as ``rope_parameters``, the head size as hidden size over heads where unknown."""
    out: dict[str, Any] = {}
    for key, value in CLASS_DEFAULTS[model_type].items():
        if key == "rope_theta":
            if "rope_theta" not in config and "rope_parameters" not in config and "rope_scaling" not in config:
                out["rope_parameters"] = {"rope_type": "default", "rope_theta": value}
        elif key not in config:
            out[key] = value
    if model_type == "llama" and "num_key_value_heads" not in config and "num_attention_heads" in config:
        out["num_key_value_heads"] = config["num_attention_heads"]
    known = {**config, **out}
    if "head_dim" not in known and "hidden_size" in known and "num_attention_heads" in known:
        out["head_dim"] = int(known["hidden_size"]) // int(known["num_attention_heads"])
    return out


TOP_K_KEY = "num_experts_per_tok"
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
"""Every key a config may count routed experts by: transformers 5 saves Qwen3-MoE's count as
``num_local_experts`` (an alias of ``num_experts``), configs of the Hub use the class's own key."""

_PER_EXPERT = re.compile(r"^(?P<block>block_sparse_moe|mlp)\.experts\.(?P<index>[0-9]{1,6})\.(?P<tail>.+)$")
_FUSED = re.compile(r"^(?P<block>block_sparse_moe|mlp)\.experts\.(?P<name>[A-Za-z_][^.]*)$")
_ROUTER = re.compile(r"^(?P<block>block_sparse_moe|mlp)\.gate\.(?P<name>weight|bias|e_score_correction_bias)$")


@dataclass(frozen=True, slots=True)
class ExpertTensor:
    """A layer tensor that holds experts: one expert's (``index``), or every expert's along its
    first dimension (``index`` None: a fused tensor, or a router's rows and routing bias)."""

    rest: str
    index: int | None
    block: str
    tail: str
    """The name after ``experts.{index}.``, after ``experts.``, or after ``gate.``."""
    router: bool = False


def expert_tensor(rest: str) -> ExpertTensor | None:
    """What ``rest`` (a layer tensor's name) holds of the experts, None for any other tensor."""
    if match := _PER_EXPERT.match(rest):
        return ExpertTensor(rest, int(match["index"]), match["block"], match["tail"])
    if match := _FUSED.match(rest):
        return ExpertTensor(rest, None, match["block"], match["name"])
    if match := _ROUTER.match(rest):
        return ExpertTensor(rest, None, match["block"], match["name"], router=True)
    return None


def moe_kind(config: Mapping[str, Any]) -> MoeKind | None:
    return MOE_KINDS.get(str(config.get("model_type", "")))


def layer_types(config: Mapping[str, Any], num_layers: int, model_type: str) -> list[str]:
    """The attention of each layer of a Qwen2, Qwen3 or Qwen2-MoE model, as its class decides it:
    the config's ``layer_types``, else the class's rule where a sliding window is used: Qwen2 and
    Qwen3 slide from ``max_window_layers`` on, Qwen2-MoE in every other layer below it."""
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers and all(isinstance(t, str) for t in types):
        return list(types)
    if types is not None:
        raise RecipeError(
            f"config.json: layer_types: expected one name per layer ({num_layers}), found {safe_text(types)}"
        )
    first = config.get("max_window_layers", 28)
    if model_type == "qwen2_moe":
        slides = bool(config.get("use_sliding_window"))
        return [
            "sliding_attention" if slides and (i + 1) % 2 and i < first else "full_attention" for i in range(num_layers)
        ]
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(num_layers)]
