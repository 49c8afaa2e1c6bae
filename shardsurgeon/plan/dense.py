"""An expert of a mixture extracted as a dense model (:class:`~shardsurgeon.plan.recipe.DenseExpert`).

Each layer with experts becomes a dense layer whose MLP is one of its experts: the expert's
gate, up and down projections renamed ``mlp.{gate,up,down}_proj.weight`` (a copy of the same
source bytes), or, from a fused ``[E, ...]`` tensor, the expert's byte range of it. The router,
the other experts and (Qwen2-MoE) the shared expert and its gate are dropped; with ``shared`` the
shared expert is the MLP instead. Layers without experts stay as they are. The config is the
source's own with the mixture's keys removed and every default the sparse class assumed written
out (:func:`~shardsurgeon.model.moe.class_defaults`, the rule upcycling uses the other way). Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from shardsurgeon.errors import PlanError, RecipeError, safe_text
from shardsurgeon.format import DTYPES, numel
from shardsurgeon.model.arch import LayerStack
from shardsurgeon.model.moe import (
    DENSE_PROJECTIONS,
    DENSE_TARGETS,
    MOE_CONFIG_KEYS,
    QWEN2_MOE,
    MoeKind,
    class_defaults,
    expert_tensor,
    layer_types,
    moe_kind,
)
from shardsurgeon.plan.recipe import DenseExpert
from shardsurgeon.plan.tensors import Convert, Copy, Piece, Pieces, PlannedTensor, Zeros

SharedExpert = Literal["drop", "take"]
"""What becomes of a shared expert: dropped (the routed expert is the MLP), or taken as the MLP."""


def check_dense_target(kind: MoeKind) -> None:
    """Refuse an architecture whose experts have no dense class in transformers to become."""
    if kind.model_type not in DENSE_TARGETS:
        raise RecipeError(
            f"--to-dense: transformers has no dense class for {kind.model_type} ({kind.architecture} is its only "
            "one), so an expert cannot become a dense model; prune the experts instead (leave out --to-dense)"
        )


def dense_recipe(
    kind: MoeKind, keep: Mapping[int, tuple[int, ...]] | None, counts: Mapping[int, int],
    config: Mapping[str, Any], num_layers: int, shared: SharedExpert | None,
) -> DenseExpert:  # fmt: skip
    """The :class:`DenseExpert` of the one expert ``keep`` names for each layer with experts
    (``counts``: their expert counts), or of the shared expert: every refusal in one line."""
    check_dense_target(kind)
    if kind.shared is None and shared is not None:
        raise RecipeError(f"--shared-expert: {kind.architecture} has no shared expert; leave it out")
    if kind.shared is not None and shared is None:
        raise RecipeError(
            f"--to-dense: each {kind.architecture} layer adds a shared expert, behind a gate computed from the input, "
            "to its routed experts, which one dense MLP cannot compute; say --shared-expert drop (the kept expert "
            "becomes the MLP) or --shared-expert take (the shared expert does)"
        )
    if shared == "take" and keep is not None:
        raise RecipeError("--keep: with --shared-expert take the dense MLP is the shared expert; leave --keep out")
    if shared != "take" and keep is None:
        raise RecipeError("--keep: missing; give the expert that becomes each layer's dense MLP (such as --keep 3)")
    for layer, kept in (keep or {}).items():
        if len(kept) != 1:
            raise RecipeError(
                f"--to-dense: layer {layer} keeps {len(kept)} experts; a dense layer has one MLP, so keep one expert "
                "per layer"
            )
        if not 0 <= kept[0] < counts[layer]:
            raise RecipeError(f"--keep: layer {layer} has experts 0..{counts[layer] - 1}, so expert {kept[0]} is none")
    _check_one_mlp_size(kind, config, counts, num_layers, shared == "take")
    if kind is QWEN2_MOE and config.get("qkv_bias") is False:
        raise RecipeError(
            "--to-dense: this qwen2_moe model has no q/k/v biases (qkv_bias false in config.json) and Qwen2 always "
            "has them"
        )
    if shared == "take":
        return DenseExpert((None,) * num_layers, shared=True)
    assert keep is not None
    return DenseExpert(tuple(keep[layer][0] if layer in keep else None for layer in range(num_layers)))


def _mlp_size_key(kind: MoeKind, take_shared: bool) -> str:
    """The config key of the size of the MLP that a layer with experts becomes."""
    if take_shared:
        return "shared_expert_intermediate_size"
    return "intermediate_size" if kind.model_type == "mixtral" else "moe_intermediate_size"


def _check_one_mlp_size(
    kind: MoeKind, config: Mapping[str, Any], counts: Mapping[int, int], num_layers: int, take_shared: bool
) -> None:
    """Dense classes have one ``intermediate_size``: the layers that had no experts must have the size
    the others' MLP gets."""
    known = {**class_defaults(config, kind.model_type), **config}
    key = _mlp_size_key(kind, take_shared)
    dense = [layer for layer in range(num_layers) if layer not in counts]
    if dense and key != "intermediate_size" and known[key] != known["intermediate_size"]:
        shown = ", ".join(map(str, dense))
        target = DENSE_TARGETS[kind.model_type][1]
        raise RecipeError(
            f"--to-dense: layer {shown} {'is' if len(dense) == 1 else 'are'} dense with intermediate_size "
            f"{safe_text(known['intermediate_size'])} but the expert has {key} {safe_text(known[key])}; {target} "
            "has one intermediate_size for every layer"
        )


def dense_layer(
    change: DenseExpert, kind: MoeKind, stack: LayerStack, position: int, layer: int, tensors: list[PlannedTensor]
) -> list[PlannedTensor]:
    """Output layer ``position`` (source layer ``layer``) with its experts made one dense MLP."""
    expert = change.expert[layer]
    rests = {t.name: stack.split(t.name)[1] for t in tensors}  # type: ignore[index]
    has_router = any((found := expert_tensor(rest)) is not None and found.router for rest in rests.values())
    if not has_router:
        return tensors
    if expert is None and not change.shared:  # a recorded recipe can be edited
        raise PlanError(
            f"layer {layer} has experts but the recipe names none to become its MLP; plan it again from this source"
        )
    mlp: dict[str, PlannedTensor] = {}
    out: list[PlannedTensor] = []
    first = None
    for tensor in tensors:
        made = _dense_parts(change, kind, expert, tensor, rests[tensor.name])
        if made is None:
            out.append(tensor)
            continue
        first = len(out) if first is None else first
        mlp.update(made)
    missing = [name for name in DENSE_PROJECTIONS if name not in mlp]
    if missing or first is None:
        which = "the shared expert" if change.shared else f"expert {expert}"
        raise PlanError(f"layer {layer}: {which} has no {', '.join(missing)} weight; the checkpoint is incomplete")
    made_mlp = [
        dataclasses.replace(mlp[name], name=stack.name(position, f"mlp.{name}.weight")) for name in DENSE_PROJECTIONS
    ]
    return out[:first] + made_mlp + out[first:]


def _dense_parts(
    change: DenseExpert, kind: MoeKind, expert: int | None, tensor: PlannedTensor, rest: str
) -> dict[str, PlannedTensor] | None:
    """What ``tensor`` gives the dense MLP, by projection (empty: it is dropped); None: it stays."""
    if kind.shared_gate is not None and rest.startswith(f"{kind.block}.{kind.shared_gate}."):
        return {}
    shared = f"{kind.block}.{kind.shared}."
    if kind.shared is not None and rest.startswith(shared):
        return _projection(tensor, rest[len(shared) :], DENSE_PROJECTIONS) if change.shared else {}
    found = expert_tensor(rest)
    if found is None:
        return None
    if found.router or change.shared or (found.index is not None and found.index != expert):
        return {}
    if found.index is not None:
        return _projection(tensor, found.tail, kind.projections)
    assert expert is not None
    return _fused_rows(tensor, found.tail, expert, kind)


def _projection(tensor: PlannedTensor, tail: str, projections: tuple[str, ...]) -> dict[str, PlannedTensor]:
    names = {f"{name}.weight": dense for name, dense in zip(projections, DENSE_PROJECTIONS, strict=True)}
    if tail not in names:
        raise PlanError(
            f"tensor {tensor.name!r}: an expert tensor besides the gate, up and down projection weights (a bias?); "
            "the dense MLP has no place for it"
        )
    return {names[tail]: tensor}


def _fused_rows(tensor: PlannedTensor, tail: str, expert: int, kind: MoeKind) -> dict[str, PlannedTensor]:
    """Expert ``expert``'s projections out of a fused ``[E, ...]`` tensor: ``gate_up_proj`` holds the
    gate's rows and then the up projection's; one of ``gate_proj``, ``up_proj``, ``down_proj`` (or
    the architecture's own names) holds one projection."""
    if tail == "gate_up_proj":
        if len(tensor.shape) != 3 or tensor.shape[1] % 2:
            raise PlanError(f"tensor {tensor.name!r} is {list(tensor.shape)}; expected [experts, 2 x size, hidden]")
        half = (tensor.shape[1] // 2, tensor.shape[2])
        return {
            "gate_proj": _slice(tensor, expert, 0, half),
            "up_proj": _slice(tensor, expert, numel(half), half),
        }
    names = dict(zip(kind.projections, DENSE_PROJECTIONS, strict=True)) | {p: p for p in DENSE_PROJECTIONS}
    if tail not in names or len(tensor.shape) != 3:
        raise PlanError(
            f"tensor {tensor.name!r} ({list(tensor.shape)}): a fused expert tensor of an unknown form; expected "
            "gate_up_proj or down_proj, [experts, rows, columns]"
        )
    return {names[tail]: _slice(tensor, expert, 0, tensor.shape[1:])}


def _slice(tensor: PlannedTensor, expert: int, skip: int, shape: tuple[int, ...]) -> PlannedTensor:
    """Elements ``skip`` on of row ``expert`` of ``tensor``, as a tensor of ``shape``: a byte range."""
    if expert >= tensor.shape[0]:
        raise PlanError(f"tensor {tensor.name!r} holds {tensor.shape[0]} experts, so it has no expert {expert}")
    assert tensor.source is not None
    op = tensor.op
    assert isinstance(op, Copy | Convert | Zeros)
    first = expert * numel(tensor.shape[1:]) + skip
    nbytes = DTYPES[tensor.dtype].bits * numel(shape) // 8
    piece = Piece(op, nbytes, None if isinstance(op, Zeros) else tensor.source, first)
    return dataclasses.replace(tensor, shape=shape, op=Pieces((piece,)))


def dense_config(change: DenseExpert, config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """``config`` of a mixture for the dense model of ``change``: the source's own keys but the
    mixture's, the sparse class's defaults written out, the dense class's name and MLP size."""
    kind = moe_kind(config)
    assert kind is not None
    dense_type, architecture = DENSE_TARGETS[kind.model_type]
    out = {**config, **class_defaults(config, kind.model_type)}
    size = out[_mlp_size_key(kind, change.shared)]
    out = {key: value for key, value in out.items() if key not in MOE_CONFIG_KEYS}
    out["model_type"] = dense_type
    out["architectures"] = [architecture]
    out["intermediate_size"] = size
    if kind is QWEN2_MOE:
        out["layer_types"] = layer_types(config, num_layers, "qwen2_moe")
    if kind.model_type == "qwen3_moe":
        slides = bool(config.get("use_sliding_window")) and config.get("sliding_window", 4096) is not None
        out["layer_types"] = ["sliding_attention" if slides else "full_attention"] * num_layers
    return out
