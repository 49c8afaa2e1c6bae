"""mergekit-moe configs: the YAML ``mergekit-moe`` reads, parsed into what ``moe`` plans.

A config names a base model (attention, norms, embeddings and the config), the experts (each the
MLPs of a model of the same architecture, a fine-tune of the base), optionally shared experts
(Qwen2-MoE), the gate mode, the output dtype and the experts per token. The experts are copies of
each model's MLP, which is what mergekit-moe 0.1.5 writes too. Gates: ``random`` is a seeded
router here (mergekit-moe's own draw depends on torch's generator and cannot be reproduced);
``hidden`` and ``cheap_embed`` compute gates from the prompts with a forward pass through the
models, which this tool does not do, and are refused in one line that names ``--router FILE``: a
file of routers computed elsewhere replaces the gate mode, whichever it is. Pure: no files are
read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import RecipeError, safe_text
from shardsurgeon.format import cast_target

GATE_MODES_NEEDING_A_FORWARD_PASS = ("hidden", "cheap_embed")
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
CONFIG_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""mergekit-moe's ``architecture`` values, by the model_type each gives."""


@dataclass(frozen=True, slots=True)
class MoeConfig:
    base: str
    experts: tuple[str, ...]
    shared: str | None
    gate_mode: str
    dtype: str | None
    top_k: int
    architecture: str | None
    """The model_type the config asks for (None: the one the base model's type becomes)."""


def parse_moe_config(text: str, where: str, *, router_file: bool = False) -> MoeConfig:
    """The mergekit-moe config in ``text`` (from the file ``where``), checked key by key; with
    ``router_file`` (routers come from a file) any of mergekit-moe's gate modes is accepted."""
    import yaml

    try:
        record = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({safe_text(' '.join(str(e).split()), 120)})") from None
    if not isinstance(record, dict):
        raise RecipeError(f"{where}: expected a mergekit-moe config (a mapping with base_model and experts)")
    unknown = sorted(set(map(str, record)) - CONFIG_KEYS)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {safe_text(unknown[0])}; mergekit-moe reads {', '.join(sorted(CONFIG_KEYS))}"
        )
    base = _model(record.get("base_model"), f"{where}: base_model")
    experts = record.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError(f"{where}: experts: expected a list of experts, each with a source_model")
    gate_mode = record.get("gate_mode", "hidden")
    if gate_mode in GATE_MODES_NEEDING_A_FORWARD_PASS and not router_file:
        raise RecipeError(
            f"{where}: gate_mode {gate_mode}: its gates come from running the prompts through the models, a forward "
            "pass this tool does not do; compute the routers elsewhere and pass them with --router FILE (a "
            "safetensors file, docs/routers.md), or use gate_mode: random (a seeded router, --seed)"
        )
    if gate_mode not in ("random", *GATE_MODES_NEEDING_A_FORWARD_PASS):
        raise RecipeError(
            f"{where}: gate_mode {safe_text(gate_mode)}: expected random, hidden or cheap_embed (hidden and "
            "cheap_embed with --router FILE)"
        )
    top_k = record.get("experts_per_token", 2)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(experts):
        raise RecipeError(
            f"{where}: experts_per_token {safe_text(top_k)}: expected between 1 and the number of experts "
            f"({len(experts)})"
        )
    dtype = record.get("dtype")
    if dtype is not None and cast_target(str(dtype)) is None:
        raise RecipeError(f"{where}: dtype {safe_text(dtype)}: expected float32, float16 or bfloat16")
    shared = record.get("shared_experts") or []
    if not isinstance(shared, list) or len(shared) > 1:
        raise RecipeError(f"{where}: shared_experts: expected at most one (Qwen2-MoE has one shared expert)")
    architecture = record.get("architecture")
    if architecture is not None and (not isinstance(architecture, str) or architecture not in ARCHITECTURES):
        raise RecipeError(
            f"{where}: architecture {safe_text(architecture)}: expected one of {', '.join(sorted(ARCHITECTURES))}"
        )
    return MoeConfig(
        base,
        tuple(_expert(e, f"{where}: experts[{i}]") for i, e in enumerate(experts)),
        _expert(shared[0], f"{where}: shared_experts[0]") if shared else None,
        gate_mode,
        None if dtype is None else cast_target(str(dtype)),
        top_k,
        None if architecture is None else ARCHITECTURES[architecture],
    )


def _model(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a model (a folder or a Hugging Face id)")
    if "+" in value:
        raise RecipeError(
            f"{where}: {safe_text(value)}: a model with a LoRA applied (+) is not supported; merge it first"
        )
    return value


def _expert(value: Any, where: str) -> str:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping with source_model")
    unknown = sorted(set(map(str, value)) - EXPERT_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key {safe_text(unknown[0])}")
    if value.get("noise_scale") not in (None, 0, 0.0):
        raise RecipeError(f"{where}: noise_scale adds random noise to the expert; not supported (leave it out)")
    if value.get("residual_scale") not in (None, 1, 1.0):
        raise RecipeError(f"{where}: residual_scale is not supported (leave it out)")
    return _model(value.get("source_model"), f"{where}.source_model")
