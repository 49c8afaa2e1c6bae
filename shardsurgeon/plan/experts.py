"""A change of the experts, applied to a plan's layers and config: upcycling and pruning.

Upcycling (:class:`~shardsurgeon.plan.recipe.Upcycle`) makes each dense MLP of the chosen layers
the experts of a mixture: every expert a copy of the MLP (a copy of the same source bytes, so it
shares blocks with the source on XFS and btrfs and is copied by the server on S3), and a router of
zeros (a hole), of seeded normal numbers, or read from a file (:mod:`plan.routers`). With a zero
router every expert is equally likely, the top-k weights are renormalised to 1/k each, and the
layer computes the dense MLP again: for top-k a power of two the sum is exact. Qwen2-MoE adds a
shared expert behind a sigmoid gate; its gate is zeros (a weight of exactly 1/2) and its routed
experts' down projections are halved (exact), so the two halves add up to the dense output.

Pruning (:class:`~shardsurgeon.plan.recipe.PruneExperts`) keeps some experts of each layer, in the
order given: one tensor per expert is renamed, a fused ``[E, ...]`` tensor and the router's rows
and routing bias become the kept rows (byte ranges of the source). Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shardsurgeon.errors import PlanError, RecipeError, safe_text
from shardsurgeon.format import DTYPES, numel
from shardsurgeon.model.arch import LayerStack
from shardsurgeon.model.moe import (
    DENSE_PROJECTIONS,
    EXPERT_COUNT_KEYS,
    MIXTRAL,
    MOE_KINDS,
    QWEN2_MOE,
    TOP_K_KEY,
    UPCYCLE_TARGETS,
    MoeKind,
    class_defaults,
    expert_tensor,
    layer_types,
    moe_kind,
)
from shardsurgeon.model.routerfile import RouterFile
from shardsurgeon.model.source import Source
from shardsurgeon.plan.dense import SharedExpert, dense_config, dense_layer, dense_recipe
from shardsurgeon.plan.recipe import MAX_EXPERTS, DenseExpert, ExpertChange, PruneExperts, Router, Upcycle
from shardsurgeon.plan.routers import planned_router, planned_shared_gate
from shardsurgeon.plan.tensors import Convert, Copy, Piece, Pieces, PlannedTensor, Zeros

DEFAULT_INITIALIZER_RANGE = 0.02
"""transformers' ``initializer_range`` default, the random router's standard deviation when the
config has none."""


def experts_kind(change: ExpertChange | None, config: Mapping[str, Any], stack: LayerStack) -> MoeKind | None:
    """The mixture-of-experts architecture ``change`` makes or reads (None without a change)."""
    match change:
        case None:
            return None
        case Upcycle():
            return upcycle_kind(config, stack)
        case PruneExperts() | DenseExpert():
            kind = moe_kind(config)
            if kind is None:
                raise RecipeError(
                    f"prune-experts: model_type {config.get('model_type')!r} is not a mixture of experts known to "
                    f"this tool; supported: {', '.join(sorted(MOE_KINDS))}"
                )
            return kind


def change_layer(
    change: ExpertChange, kind: MoeKind, stack: LayerStack, position: int, layer: int, tensors: list[PlannedTensor],
    config: Mapping[str, Any], layer_of: Callable[[str], list[PlannedTensor]], router_file: RouterFile | None = None,
) -> list[PlannedTensor]:  # fmt: skip
    """Output layer ``position`` (source layer ``layer``, whose planned ``tensors`` these are) with
    its experts changed; ``layer_of(model)`` plans another model's tensors of the same layer (the
    experts of a mergekit-moe config); ``router_file`` is the opened file of routers the change
    names, if it names one."""
    match change:
        case Upcycle():
            if change.layers is not None and layer not in change.layers:
                return tensors
            return _upcycled(change, kind, stack, position, tensors, config, layer_of, router_file)
        case PruneExperts(keep):
            kept = keep[layer]
            return tensors if kept is None else _pruned(kept, kind, stack, position, tensors)
        case DenseExpert():
            return dense_layer(change, kind, stack, position, layer, tensors)


def _dense_mlp(
    tensors: list[PlannedTensor], stack: LayerStack, position: int, kind: MoeKind
) -> dict[str, PlannedTensor]:
    """A layer's dense MLP weights by projection (``gate_proj``...): refused where it has others."""
    mlp = {f"mlp.{name}.weight": name for name in DENSE_PROJECTIONS}
    rests = {t.name: stack.split(t.name)[1] for t in tensors}  # type: ignore[index]
    found = {mlp[rests[t.name]]: t for t in tensors if rests[t.name] in mlp}
    if len(found) != len(mlp):
        missing = sorted(f"mlp.{name}.weight" for name in set(DENSE_PROJECTIONS) - set(found))
        raise PlanError(
            f"layer {position}: no dense MLP to upcycle ({', '.join(missing)} missing); upcycle takes a model whose "
            "layers each have mlp.gate_proj, mlp.up_proj and mlp.down_proj"
        )
    others = [t for t in tensors if rests[t.name].startswith("mlp.") and rests[t.name] not in mlp]
    if others:
        raise PlanError(
            f"tensor {others[0].name!r}: the dense MLP has tensors besides gate, up and down projection weights "
            f"(biases?); {kind.architecture} experts have none, so upcycling would drop them"
        )
    return found


def _upcycled(
    change: Upcycle, kind: MoeKind, stack: LayerStack, position: int, tensors: list[PlannedTensor],
    config: Mapping[str, Any], layer_of: Callable[[str], list[PlannedTensor]], router_file: RouterFile | None,
) -> list[PlannedTensor]:  # fmt: skip
    found = _dense_mlp(tensors, stack, position, kind)
    experts = [_dense_mlp(layer_of(model), stack, position, kind) for model in change.expert_models]
    experts = experts or [found] * change.experts
    shared = _dense_mlp(layer_of(change.shared_model), stack, position, kind) if change.shared_model else found
    gate = found["gate_proj"]
    hidden = gate.shape[1]
    model = gate.model
    std = config.get("initializer_range", DEFAULT_INITIALIZER_RANGE)
    if change.router.seed is not None and not (
        isinstance(std, int | float) and not isinstance(std, bool) and 0 < std < float("inf")
    ):
        raise PlanError(
            f"config.json: initializer_range {safe_text(std)}: expected a positive number (the router's std)"
        )
    router_name = stack.name(position, kind.router())
    shape = (change.experts, hidden)
    std = float(std) if change.router.seed is not None else DEFAULT_INITIALIZER_RANGE
    made = [planned_router(change.router, router_file, router_name, gate.dtype, shape, model, std)]
    shared_gate = None
    if kind.shared_gate is not None:
        name = stack.name(position, f"{kind.block}.{kind.shared_gate}.weight")
        shared_gate = planned_shared_gate(change.router, router_file, name, gate.dtype, (1, hidden), model)
    # copies of one MLP: the shared expert's gate of zeros weighs it by exactly 1/2, the routed half
    # is halved; experts of several models, and a layer whose shared gate a router file gives (trained
    # elsewhere: no identity to keep), are copied as they are (as mergekit-moe does)
    halve = shared_gate is not None and isinstance(shared_gate.op, Zeros) and not change.expert_models
    # halving is exact but for subnormal numbers, which float16 weights hold (below 6.1e-5): there the
    # routed experts stay whole copies and the shared expert's down projection is zeros instead
    zero_shared_down = halve and found["down_proj"].dtype == "F16"
    halve = halve and not zero_shared_down
    for index, mlp in enumerate(experts):
        for dense, projection in zip(DENSE_PROJECTIONS, kind.projections, strict=True):
            tensor = _halved(mlp[dense]) if halve and dense == "down_proj" else mlp[dense]
            made.append(dataclasses.replace(tensor, name=stack.name(position, kind.expert(index, projection))))
    if kind.shared is not None:
        for dense in DENSE_PROJECTIONS:
            name = stack.name(position, f"{kind.block}.{kind.shared}.{dense}.weight")
            tensor = dataclasses.replace(shared[dense], name=name)
            made.append(
                dataclasses.replace(tensor, op=Zeros()) if zero_shared_down and dense == "down_proj" else tensor
            )
    if shared_gate is not None:
        made.append(shared_gate)
    first = min(tensors.index(t) for t in found.values())
    rest = [t for t in tensors if t not in found.values()]
    return rest[:first] + made + rest[first:]


def _halved(tensor: PlannedTensor) -> PlannedTensor:
    match tensor.op:
        case Copy():
            return dataclasses.replace(tensor, op=Convert(0.5))
        case Convert(scale, via):
            return dataclasses.replace(tensor, op=Convert(scale * 0.5, via))
        case _:
            return tensor


def _pruned(
    keep: Sequence[int], kind: MoeKind, stack: LayerStack, position: int, tensors: list[PlannedTensor]
) -> list[PlannedTensor]:
    out: list[PlannedTensor] = []
    new_index = {old: new for new, old in enumerate(keep)}
    for tensor in tensors:
        rest = stack.split(tensor.name)[1]  # type: ignore[index]
        found = expert_tensor(rest)
        if found is None:
            out.append(tensor)
        elif found.index is not None:
            if found.index in new_index:
                name = stack.name(position, f"{found.block}.experts.{new_index[found.index]}.{found.tail}")
                out.append(tensor if name == tensor.name else dataclasses.replace(tensor, name=name))
        else:
            out.append(_rows(tensor, keep))
    return out


def _rows(tensor: PlannedTensor, keep: Sequence[int]) -> PlannedTensor:
    """``tensor`` (``[E, ...]``) with the rows ``keep``, in that order: runs of consecutive rows
    are one piece each."""
    count = tensor.shape[0]
    bad = [e for e in keep if e >= count]
    if bad:
        raise PlanError(
            f"tensor {tensor.name!r} holds {count} experts (its first dimension), so expert {bad[0]} cannot be kept"
        )
    assert tensor.source is not None
    row_elements = numel(tensor.shape[1:])
    row_bytes = DTYPES[tensor.dtype].bits * row_elements // 8
    runs: list[list[int]] = []
    for e in keep:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    if runs == [[0, count]]:
        return tensor  # every row, in order
    op = tensor.op
    assert isinstance(op, Copy | Convert | Zeros)
    parts = tuple(
        Piece(op, row_bytes * length, None if isinstance(op, Zeros) else tensor.source, start * row_elements)
        for start, length in runs
    )
    return dataclasses.replace(tensor, shape=(len(keep), *tensor.shape[1:]), op=Pieces(parts))


def changed_config(
    change: ExpertChange, config: Mapping[str, Any], stack: LayerStack, num_layers: int
) -> dict[str, Any]:
    """``config`` for the output of ``change`` (the layers themselves are unchanged in number)."""
    match change:
        case Upcycle():
            return upcycled_config(change, config, stack, num_layers)
        case PruneExperts(keep):
            return pruned_config(keep, config)
        case DenseExpert():
            return dense_config(change, config, num_layers)


def upcycled_config(change: Upcycle, config: Mapping[str, Any], stack: LayerStack, num_layers: int) -> dict[str, Any]:
    dense_type = str(config.get("model_type"))
    kind = upcycle_kind(config, stack)
    dropped = ("attention_bias", "mlp_bias", "pretraining_tp") if kind is MIXTRAL else ("pretraining_tp",)
    out = {key: value for key, value in config.items() if key not in dropped}
    out.update(class_defaults(config, dense_type))
    out["model_type"] = kind.model_type
    out["architectures"] = [kind.architecture]
    out[kind.experts_key] = change.experts
    out[TOP_K_KEY] = change.top_k
    out["output_router_logits"] = False
    if kind is MIXTRAL:
        out["router_jitter_noise"] = 0.0
    else:
        out["moe_intermediate_size"] = out["intermediate_size"]
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [] if change.layers is None else sorted(set(range(num_layers)) - set(change.layers))
    if kind.top_k_normalised_key is not None:
        out[kind.top_k_normalised_key] = True  # a zero router then weighs each of the k copies 1/k: the dense MLP
    if kind is QWEN2_MOE:
        out["shared_expert_intermediate_size"] = out["intermediate_size"]
        out["qkv_bias"] = True
        out["layer_types"] = layer_types(config, num_layers, "qwen2")  # Qwen2-MoE's own rule differs from Qwen2's
    if kind.model_type == "qwen3_moe":
        types = set(layer_types(config, num_layers, "qwen2"))
        out["use_sliding_window"] = types == {"sliding_attention"}  # Qwen3-MoE slides every layer or none
        out.pop("layer_types", None)
        out.pop("max_window_layers", None)
    return out


def upcycle_kind(config: Mapping[str, Any], stack: LayerStack) -> MoeKind:
    """The sparse architecture the dense model of ``config`` becomes; refused in one line where
    there is none, or where it would compute something else."""
    dense_type = config.get("model_type")
    if stack.config_section:
        raise RecipeError(
            f"upcycle: the layers of this model are described under {'.'.join(stack.config_section)} in config.json; "
            "upcycling supports text models with the layer keys at the top (llama, mistral, qwen2, qwen3)"
        )
    kind = UPCYCLE_TARGETS.get(str(dense_type))
    if kind is None:
        raise RecipeError(
            f"upcycle: model_type {dense_type!r} has no sparse counterpart known to this tool; supported: "
            f"{', '.join(sorted(UPCYCLE_TARGETS))} (to mixtral, qwen3_moe, qwen2_moe)"
        )
    if kind is MIXTRAL and (config.get("attention_bias") or config.get("mlp_bias")):
        raise RecipeError(
            f"upcycle: this {dense_type} model has biases in its attention or MLP (attention_bias/mlp_bias in "
            "config.json), which Mixtral has no place for"
        )
    if kind.model_type == "qwen3_moe" and len(set(layer_types(config, stack.count, "qwen3"))) > 1:
        raise RecipeError(
            "upcycle: this qwen3 model mixes sliding and full attention across layers (layer_types in config.json); "
            "Qwen3-MoE gives every layer the same attention, so its outputs would differ"
        )
    return kind


def check_upcycle(change: Upcycle, kind: MoeKind, num_layers: int) -> None:
    if change.layers is not None:
        if kind.dense_layers_key is None:
            raise RecipeError(
                f"--layers: {kind.architecture} has no config key for layers that stay dense; upcycle every layer "
                "(leave out --layers) or choose a model that becomes Qwen2-MoE or Qwen3-MoE"
            )
        bad = [layer for layer in change.layers if not 0 <= layer < num_layers]
        if bad:
            raise RecipeError(f"--layers: layer {bad[0]} is out of range, the model has layers 0..{num_layers - 1}")


def pruned_config(keep: Sequence[Sequence[int] | None], config: Mapping[str, Any]) -> dict[str, Any]:
    kind = moe_kind(config)
    assert kind is not None
    counts = {len(k) for k in keep if k is not None}
    (count,) = counts
    out = dict(config)
    present = [key for key in EXPERT_COUNT_KEYS if key in config] or [kind.experts_key]
    out.update(dict.fromkeys(present, count))
    return out


KeepSpec = Sequence[int] | Mapping[int, Sequence[int]] | Sequence[Sequence[int] | None]
"""Which experts to keep: one list for every layer with experts, a list per layer (None or an
empty entry for a layer without experts), or a mapping of layer numbers to lists."""


def upcycle_change(
    experts: int, top_k: int, router: Router, layers: Sequence[int] | None, config: Mapping[str, Any],
    stack: LayerStack, expert_models: Sequence[str] = (), shared_model: str | None = None,
) -> Upcycle:  # fmt: skip
    """The :class:`Upcycle` of the user's numbers, checked against the model."""
    if not 1 <= experts <= MAX_EXPERTS:
        raise RecipeError(f"--experts {experts}: expected between 1 and {MAX_EXPERTS}")
    if not 1 <= top_k <= experts:
        raise RecipeError(f"--top-k {top_k}: expected between 1 and the number of experts ({experts})")
    if router.seed is not None and not 0 <= router.seed < 1 << 64:
        raise RecipeError(f"--router random:{router.seed}: expected a seed between 0 and 2**64-1")
    if router.seed is not None and router.file is not None:
        raise RecipeError(f"--router {safe_text(router.file)}: a file of routers takes no seed; give one or the other")
    kind = upcycle_kind(config, stack)
    chosen = None if layers is None else tuple(sorted(set(layers)))
    change = Upcycle(experts, top_k, router, chosen, tuple(expert_models), shared_model)
    check_upcycle(change, kind, stack.count)
    return change


def prune_change(keep: KeepSpec, source: Source) -> PruneExperts:
    """The :class:`PruneExperts` of ``keep`` for ``source``, checked: every layer with experts gets
    a list, each expert in range and named once, the same count in every layer (transformers reads
    one count), no fewer than the top-k, and DeepSeek's expert groups kept whole in number."""
    kind, counts = _routed_layers(source)
    per_layer = _keep_per_layer(keep, counts, source.layer_count)
    for layer, kept in per_layer.items():
        if not kept:
            raise RecipeError(f"--keep: layer {layer} would keep no expert; keep at least the top-k")
        if len(set(kept)) != len(kept):
            twice = next(e for e in kept if kept.count(e) > 1)
            raise RecipeError(f"--keep: layer {layer} names expert {twice} twice")
        if bad := [e for e in kept if not 0 <= e < counts[layer]]:
            raise RecipeError(
                f"--keep: layer {layer} has experts 0..{counts[layer] - 1}, so expert {bad[0]} cannot be kept"
            )
    sizes = {len(kept) for kept in per_layer.values()}
    if len(sizes) > 1:
        raise RecipeError(
            f"--keep: layers keep {' and '.join(map(str, sorted(sizes)))} experts; {kind.architecture} has one "
            f"count for every layer ({kind.experts_key}), so keep as many in each"
        )
    (count,) = sizes
    top_k = source.config.get(TOP_K_KEY)
    if isinstance(top_k, int) and top_k > count:
        raise RecipeError(
            f"--keep: {count} experts kept per layer, fewer than the {top_k} each token is routed to "
            f"({TOP_K_KEY} in config.json); keep at least {top_k}"
        )
    _check_groups(per_layer, counts, source.config)
    return PruneExperts(tuple(per_layer.get(layer) for layer in range(source.layer_count)))


def dense_change(keep: KeepSpec | None, shared: SharedExpert | None, source: Source) -> DenseExpert:
    """The :class:`DenseExpert` of ``keep`` (one expert for every layer with experts, or one per
    layer) or, with ``shared`` take, of the shared expert, checked against ``source``."""
    kind, counts = _routed_layers(source)
    per_layer = None if keep is None else _keep_per_layer(keep, counts, source.layer_count)
    return dense_recipe(kind, per_layer, counts, source.config, source.layer_count, shared)


def _routed_layers(source: Source) -> tuple[MoeKind, dict[int, int]]:
    """The mixture's architecture and the expert count of each layer with a router; refused where
    the model is no mixture or no layer has a router."""
    kind = experts_kind(PruneExperts(()), source.config, source.stack)
    assert kind is not None
    counts = _expert_counts(source)
    if not counts:
        raise RecipeError(f"prune-experts: {source.reference} has no layer with a router ({kind.router()})")
    return kind, counts


def _expert_counts(source: Source) -> dict[int, int]:
    """The routed expert count of each layer that has a router: its weight's rows."""
    counts = {}
    for layer, tensors in enumerate(source.layers):
        has_experts = False
        for tensor in tensors:
            found = expert_tensor(tensor.rest)
            if found is not None and found.router and found.tail == "weight" and len(tensor.ref.shape) == 2:
                counts[layer] = tensor.ref.shape[0]
            has_experts |= found is not None and not found.router
        if has_experts and layer not in counts:
            raise RecipeError(
                f"{source.reference}: layer {layer} has experts but no router (a 2-D gate.weight); the checkpoint is "
                "incomplete or of an unknown layout"
            )
    return counts


def _keep_per_layer(keep: KeepSpec, counts: Mapping[int, int], num_layers: int) -> dict[int, tuple[int, ...]]:
    if isinstance(keep, Mapping):
        listed = {int(layer): tuple(kept) for layer, kept in keep.items() if kept}  # []: a layer without experts
    elif all(isinstance(e, int) for e in keep):
        return {layer: tuple(keep) for layer in counts}  # type: ignore[arg-type]
    else:
        if len(keep) != num_layers:
            raise RecipeError(f"--keep: {len(keep)} lists for a model of {num_layers} layers; give one per layer")
        listed = {layer: tuple(kept) for layer, kept in enumerate(keep) if kept}  # type: ignore[arg-type]
    for layer in listed:
        if layer not in counts:
            raise RecipeError(f"--keep: layer {layer} has no experts (no router), so it keeps none")
    for layer in counts:
        if layer not in listed:
            raise RecipeError(f"--keep: layer {layer} has experts but no list of those to keep; give one for it")
    return listed


def _check_groups(per_layer: Mapping[int, Sequence[int]], counts: Mapping[int, int], config: Mapping[str, Any]) -> None:
    """DeepSeek routes within ``n_group`` contiguous groups of experts: each group must keep as many
    experts as the others, so that the kept ones form groups of the same experts."""
    groups = config.get("n_group")
    if not isinstance(groups, int) or groups <= 1:
        return
    top_k, topk_group = config.get(TOP_K_KEY), config.get("topk_group")
    for layer, kept in per_layer.items():
        size = counts[layer] // groups
        if size == 0:
            raise RecipeError(
                f"config.json: n_group {groups} is more than the {counts[layer]} experts of layer {layer}; "
                "the config is inconsistent"
            )
        per_group = len(kept) // groups
        scored_by_two = config.get("model_type") == "deepseek_v3"  # a group's score: its two best experts
        scoring = "each scored by its two best experts, " if scored_by_two else ""
        if per_group < (2 if scored_by_two else 1) or (
            isinstance(top_k, int) and isinstance(topk_group, int) and topk_group * per_group < top_k
        ):
            raise RecipeError(
                f"--keep: layer {layer} would keep {per_group} experts in each of its {groups} routing groups; "
                f"DeepSeek routes to the best {topk_group} groups ({scoring}{top_k} experts per token), so keep "
                "more per group"
            )
        in_group = [sum(1 for e in kept if e // size == g) for g in range(groups)]
        ordered = list(kept) == sorted(kept)
        if len(set(in_group)) > 1 or not ordered:
            raise RecipeError(
                f"--keep: layer {layer} keeps {in_group} experts of its {groups} routing groups (n_group in "
                "config.json); keep as many of each group, in ascending order, so the groups stay whole"
            )


def parse_keep(text: str, where: str = "--keep") -> KeepSpec:
    """``--keep``: a comma list (``0,3,5``) or the JSON of a keep file (a list, a list of lists, or an
    object of layer numbers to lists)."""
    import json

    stripped = text.strip()
    if stripped[:1] not in ("[", "{"):
        try:
            return [int(part) for part in stripped.split(",")]
        except ValueError:
            raise RecipeError(
                f"{where}: expected expert numbers such as 0,3,5 or a JSON file of them, found {safe_text(text, 60)}"
            ) from None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError) as e:
        raise RecipeError(f"{where}: not valid JSON ({safe_text(str(e), 80)})") from None

    def numbers(item: Any) -> list[int]:
        if not isinstance(item, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in item):
            raise RecipeError(f"{where}: expected lists of expert numbers, found {safe_text(json.dumps(item), 60)}")
        return item

    if isinstance(value, dict):
        try:
            layers = {int(layer): numbers(kept) for layer, kept in value.items()}
        except ValueError:
            raise RecipeError(f"{where}: the keys of the JSON object must be layer numbers") from None
        if len(layers) != len(value):
            raise RecipeError(f"{where}: a layer is named twice among the keys ({', '.join(map(str, value))[:80]})")
        return layers
    if isinstance(value, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in value):
        return value
    if isinstance(value, list):
        return [None if kept is None else numbers(kept) for kept in value]
    raise RecipeError(f"{where}: expected a JSON list or object, found {type(value).__name__}")
