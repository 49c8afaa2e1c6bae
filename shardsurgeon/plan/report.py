"""Plans in words and as JSON: the dry run, ``--plan-json`` and the model card's description. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shardsurgeon import __version__
from shardsurgeon.format import TensorRef, torch_name
from shardsurgeon.plan.layout import Layout
from shardsurgeon.plan.planner import Plan
from shardsurgeon.plan.recipe import DenseExpert, LayerSource, NewRows, PruneExperts, ScaleRule, Upcycle
from shardsurgeon.plan.tensors import OP_KINDS, Convert, MeanRows, Normal, Piece, Pieces, Zeros, pieces_of
from shardsurgeon.storage.remote import file_name
from shardsurgeon.units import format_bytes


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Output layers ``first`` .. ``first + count - 1``, all from one model with one set of scale rules:
    source layers ``source.layer``, ``source.layer + step``, ... (``step`` 1: a run of layers, 0: copies)."""

    first: int
    source: LayerSource
    count: int = 1
    step: int = 1

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def layer_groups(layers: Sequence[LayerSource]) -> list[LayerGroup]:
    """Output layers grouped for reading: runs of consecutive source layers, and runs of copies of one.

    Greedy from the first layer: a group's second layer decides whether it is a run (the next
    source layer) or copies (the same one).
    """
    groups: list[LayerGroup] = []
    for position, source in enumerate(layers):
        assert source.layer is not None
        if groups and _continues(groups[-1], source):
            group = groups[-1]
            assert group.source.layer is not None
            step = source.layer - group.source.layer if group.count == 1 else group.step
            groups[-1] = replace(group, count=group.count + 1, step=step)
        else:
            groups.append(LayerGroup(position, source))
    return groups


def _continues(group: LayerGroup, source: LayerSource) -> bool:
    start = group.source
    if (start.model, start.scale, start.inserted) != (source.model, source.scale, source.inserted):
        return False
    assert start.layer is not None and source.layer is not None
    offset = source.layer - start.layer
    return offset in (0, 1) if group.count == 1 else offset == group.count * group.step


def describe_layers(plan: Plan) -> list[str]:
    """One line per group of output layers: ``output 32-43 <- 12 copies of layer 31 [o_proj, down_proj zero]``."""
    several_models = len(plan.recipe.models) > 1
    lines = []
    for group in layer_groups(plan.recipe.layers):
        layer = group.source.layer
        assert layer is not None
        outputs = f"{group.first}" if group.count == 1 else f"{group.first}-{group.last}"
        if group.count == 1:
            what = f"copy of layer {layer}" if group.source.inserted else f"layer {layer}"
        elif group.step == 0:
            what = f"{group.count} copies of layer {layer}"
        else:
            what = f"{'copies of ' if group.source.inserted else ''}layers {layer}-{layer + group.count - 1}"
        model = f" of {group.source.model}" if several_models else ""
        rules = describe_scale(group.source.scale)
        lines.append(f"output {outputs:>7} <- {what}{model}" + (f" [{rules}]" if rules else ""))
    return lines


def describe_scale(rules: Sequence[ScaleRule]) -> str:
    """Scale rules in words, in order, neighbours with one value sharing it: ``o_proj, down_proj zero; all x0.5``.

    Trailing rules of 1 are left out: a tensor they match is unchanged, as is one no rule matches.
    """
    kept = list(rules)
    while kept and kept[-1].value == 1:
        kept.pop()
    parts: list[tuple[list[str], float]] = []
    for rule in kept:
        name = rule.filter or "all"
        if parts and parts[-1][1] == rule.value:
            parts[-1][0].append(name)
        else:
            parts.append(([name], rule.value))
    return "; ".join(f"{', '.join(names)} {'zero' if value == 0 else f'x{value:g}'}" for names, value in parts)


def describe_expansion(plan: Plan, base_model: str, identity: bool = False) -> str:
    """The model card's words for ``expand``: the copies inserted and where, what they zero, and,
    when ``identity`` (every tensor of the copies that writes into the residual stream is zero, as
    the caller knows from the architecture), that the model's outputs are unchanged."""
    zeroed = sorted({r.filter for s in plan.recipe.layers if s.inserted for r in s.scale if r.filter})
    copies = [group for group in layer_groups(plan.recipe.layers) if group.source.inserted]
    text = (
        f"Expanded {base_model} from {plan.source_layers} to {plan.output_layers} layers by inserting "
        f"{_insertions(copies)}"
    )
    if zeroed:
        text += f", with every tensor of the copies whose name contains {' or '.join(zeroed)} set to zero"
    if zeroed and identity:
        text += (
            ", so each new block passes its input through unchanged and the model gives the same outputs as "
            "the original until it is fine-tuned (LLaMA Pro block expansion)"
        )
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {torch_name(plan.recipe.dtype)}"
    return text + "."


def describe_upcycle(plan: Plan, base_model: str, names: Mapping[str, str] | None = None) -> str:
    """The model card's words for ``upcycle`` and ``moe``: what the experts are and how the router
    starts; ``names`` are the card names of the expert models, if they are others."""
    change = plan.recipe.experts
    assert isinstance(change, Upcycle)
    layers = "every layer" if change.layers is None else f"layers {_and([str(n) for n in change.layers])}"
    architecture = plan.config.get("architectures", ["?"])[0]
    if change.expert_models:
        names = names or {}
        models = _and([names.get(m, m) for m in change.expert_models])
        text = (
            f"Made a mixture of experts ({architecture}) from {base_model}: the MLP of {layers} became "
            f"{change.experts} experts, the MLPs of {models} in that order, {change.top_k} of them chosen per token"
        )
        if change.shared_model:
            text += f"; the shared expert is the MLP of {names.get(change.shared_model, change.shared_model)}"
    else:
        text = (
            f"Upcycled {base_model} into a mixture of experts ({architecture}): the MLP of {layers} became "
            f"{change.experts} experts, each a copy of it, {change.top_k} of them chosen per token"
        )
    if change.router.file is not None:
        text += f", behind routers read from the file {file_name(change.router.file)} (computed or trained elsewhere)"
    elif change.expert_models:
        text += f", behind routers of normal numbers drawn with seed {change.router.seed}"
    elif change.router.seed is None:
        text += (
            ", behind a router of zeros, so every expert is equally likely and the model gives the same outputs as "
            "the original until it is trained (sparse upcycling)"
        )
    else:
        text += f", behind a router of normal numbers drawn with seed {change.router.seed}"
    if "shared_expert_intermediate_size" in plan.config and not change.expert_models:
        halved = not any(isinstance(t.op, Zeros) and "shared_expert.down_proj" in t.name for t in plan.tensors)
        gate = "its gate zeros (a weight of 1/2)"
        if change.router.file is not None:
            gate = "its gate the file's, or zeros (a weight of 1/2) where the file holds none"
        where = " where the gate is zeros" if change.router.file is not None else ""
        text += (
            f". The shared expert is a copy of the MLP too, {gate}, and the routed experts' down projections are "
            f"halved{where}, so with a zero gate the two halves add up to the original MLP"
            if halved
            else f". The shared expert is a copy of the MLP too, {gate}, and its down projection zeros (float16 "
            "weights cannot all be halved exactly), so the routed copies alone give the original MLP"
        )
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {torch_name(plan.recipe.dtype)}"
    return text + "."


def describe_pruning(plan: Plan, base_model: str) -> str:
    """The model card's words for ``prune-experts``: which experts each layer kept."""
    change = plan.recipe.experts
    assert isinstance(change, PruneExperts)
    kept = [(layer, k) for layer, k in enumerate(change.keep) if k is not None]
    lists = {k for _, k in kept}
    if len(lists) == 1:
        (only,) = lists
        which = f"experts {_and([str(e) for e in only])} of every layer with experts"
    else:
        which = "; ".join(f"layer {layer}: experts {', '.join(map(str, k))}" for layer, k in kept)
    text = (
        f"Pruned the experts of {base_model}, keeping {len(kept[0][1])} per layer ({which}), renumbered in that order"
    )
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {torch_name(plan.recipe.dtype)}"
    return text + "."


def describe_vocab(plan: Plan, base_model: str, rows: int, untied_head: bool) -> str:
    """The model card's words for ``vocab``: the rows before and after, the tokens added and how
    their rows start, and whether the ids moved."""
    change = plan.recipe.vocab
    assert change is not None
    text = f"Changed the vocabulary of {base_model} from {rows} to {change.size} rows"
    if change.tokens:
        ids = [t.id for t in change.tokens]
        special = sum(t.special for t in change.tokens)
        text += (
            f": added {len(change.tokens)} token{'s' if len(ids) > 1 else ''} ({_id_span(ids)}"
            f"{', special' if special == len(ids) else ''})"
        )
        first = next(run for run in change.rows if isinstance(run, NewRows))
        text += f" whose input embedding rows are {first.init.text}"
        if untied_head:
            text += f" and output head rows {first.head.text}"
    if change.moves_ids():
        text += "; token ids moved as the remap file says, the tokenizer files to match"
    elif change.kept < rows and not change.tokens:  # added tokens take unused rows in place: none dropped
        text += f"; rows {change.kept} and on dropped"
    padding = [run for run in change.rows if isinstance(run, NewRows) and run.init.kind == "zero"]
    if padding and not change.tokens:
        text += "; the rows added are zeros"
    text += ". Every other tensor is the source's, byte for byte"
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {torch_name(plan.recipe.dtype)}"
    return text + "."


def describe_dense(plan: Plan, base_model: str) -> str:
    """The model card's words for ``prune-experts --to-dense``: which expert each layer's MLP is."""
    text = f"Extracted a dense model from the mixture of experts {base_model}: {_dense_words(plan)}"
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {torch_name(plan.recipe.dtype)}"
    return text + "."


def _id_span(ids: Sequence[int]) -> str:
    if len(ids) == 1:
        return f"id {ids[0]}"
    if list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"ids {ids[0]}-{ids[-1]}"
    return f"ids {', '.join(map(str, ids))}"


def _dense_words(plan: Plan) -> str:
    change = plan.recipe.experts
    assert isinstance(change, DenseExpert)
    architecture = plan.config.get("architectures", ["?"])[0]
    if change.shared:
        return f"the MLP of each layer with experts is its shared expert ({architecture})"
    kept = [(layer, e) for layer, e in enumerate(change.expert) if e is not None]
    experts = {e for _, e in kept}
    which = (
        f"expert {kept[0][1]}" if len(experts) == 1 else "; ".join(f"layer {layer}: expert {e}" for layer, e in kept)
    )
    return f"the MLP of {len(kept)} layers with experts is one expert ({which}), the router dropped ({architecture})"


def _insertions(copies: Sequence[LayerGroup]) -> str:
    """``12 copies of layer 31 after it (output layers 32-43)``; single copies of several layers in one list."""
    if len(copies) > 1 and all(group.count == 1 for group in copies):
        layers = _and([str(group.source.layer) for group in copies])
        outputs = _and([str(group.first) for group in copies])
        return f"after each of layers {layers} a copy of it (output layers {outputs})"
    return "; ".join(
        f"a copy of layer {group.source.layer} after it (output layer {group.first})"
        if group.count == 1
        else f"{group.count} copies of layer {group.source.layer} after it (output layers {group.first}-{group.last})"
        for group in copies
    )


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def describe_merge(plan: Plan, names: Mapping[str, str], config_name: str | None = None) -> str:
    """The model card's words for a mergekit passthrough merge: output layers by group, where the
    tensors outside the stack and the config come from, and the file name the card's command reads
    its config from (``config_name``)."""
    parts = []
    for group in layer_groups(plan.recipe.layers):
        layer, model = group.source.layer, names[group.source.model]
        outputs = f"layer {group.first} is" if group.count == 1 else f"layers {group.first}-{group.last} are"
        if group.count == 1:
            what = f"layer {layer} of {model}"
        elif group.step == 0:
            what = f"{group.count} copies of layer {layer} of {model}"
        else:
            assert layer is not None
            what = f"layers {layer}-{layer + group.count - 1} of {model}"
        rules = describe_scale(group.source.scale)
        parts.append(f"{outputs} {what}" + (f" ({rules})" if rules else ""))
    text = f"A passthrough merge into {plan.output_layers} layers: " + "; ".join(parts) + "."
    recipe = plan.recipe
    if len(recipe.models) > 1:
        text += (
            f" The tensors before the layers (embeddings) come from {names[recipe.head.model]}, those after them "
            f"(final norm, output head) from {names[recipe.tail.model]}, and config.json and the tokenizer from "
            f"{names[recipe.donor]}."
        )
    if recipe.output_dtype:
        text += f" Floating-point tensors are {torch_name(recipe.output_dtype)}."
    if config_name is not None:
        text += f" The command below reads the mergekit config at the end of this card, saved as {config_name}."
    return text


def op_bytes(plan: Plan) -> dict[str, int]:
    """Output tensor bytes by op kind."""
    totals = dict.fromkeys(OP_KINDS, 0)
    for tensor in plan.tensors:
        for piece in pieces_of(tensor):
            totals[piece.op.kind] += piece.nbytes
    return totals


def experts_lines(plan: Plan) -> list[str]:
    """The change of the experts in a line, if the plan makes one."""
    match plan.recipe.experts:
        case None:
            return []
        case Upcycle(experts, top_k, router, layers):
            where = "every layer" if layers is None else f"layers {','.join(map(str, layers))}"
            architecture = plan.config.get("architectures", ["?"])[0]
            words = router.text if router.file is None else f"from the file {router.file}"
            return [f"experts: {where} -> {experts} experts (top {top_k}), router {words} ({architecture})"]
        case PruneExperts(keep):
            kept = [k for k in keep if k is not None]
            which = ",".join(map(str, kept[0])) if len(set(kept)) == 1 else "a list per layer"
            return [f"experts: {len(kept)} layers keep {len(kept[0])} experts each ({which})"]
        case DenseExpert():
            return [f"experts: {_dense_words(plan)}"]


def vocab_lines(plan: Plan) -> list[str]:
    """The change of the vocabulary in a line or two, if the plan makes one."""
    change = plan.recipe.vocab
    if change is None:
        return []
    lines = [f"vocab: {plan.source_vocab_rows} -> {change.size} rows"]
    if change.tokens:
        new = next(run for run in change.rows if isinstance(run, NewRows))
        special = " special" if all(t.special for t in change.tokens) else ""
        lines.append(
            f"  {len(change.tokens)}{special} tokens added ({_id_span([t.id for t in change.tokens])}): embedding rows "
            f"{new.init.text}, output head rows {new.head.text}"
        )
    if change.moves_ids():
        lines.append(f"  ids moved: {change.kept} rows kept, the tokenizer files and config ids to match")
    return lines


def dry_run_text(plan: Plan, layout: Layout) -> str:
    totals = op_bytes(plan)
    lines = [
        f"layers: {plan.layers_in} -> {plan.output_layers} (stack {plan.stack.prefix}.N, "
        f"config {plan.stack.count_path})",
        *describe_layers(plan),
        *experts_lines(plan),
        *vocab_lines(plan),
        f"tensors: {len(plan.tensors)}: {format_bytes(totals['copy'])} copied, {format_bytes(totals['zeros'])} zeros "
        f"(holes, not written), {format_bytes(totals['convert'])} converted"
        + (f", {format_bytes(totals['normal'])} generated (random router)" if totals["normal"] else "")
        + (f", {format_bytes(totals['mean'])} mean rows" if totals["mean"] else ""),
        f"shards: {len(layout.shards)}, {format_bytes(layout.nbytes)} in all",
    ]
    lines += [f"  {s.name}  {len(s.tensors)} tensors  {format_bytes(s.nbytes)}" for s in layout.shards]
    lines.append("dry run: nothing written")
    return "\n".join(lines)


def plan_dict(plan: Plan, layout: Layout) -> dict[str, Any]:
    shard_of = {p.tensor.name: (s.name, p.offset) for s in layout.shards for p in s.tensors}
    return {
        "shardsurgeon": __version__,
        "fingerprint": plan.fingerprint,
        "stack": {
            "prefix": plan.stack.prefix,
            "source_layers": plan.source_layers,
            "output_layers": plan.output_layers,
        },
        "layers": [
            {
                "output": i,
                "model": s.model,
                "source": s.layer,
                "inserted": s.inserted,
                "scale": [{"filter": r.filter, "value": r.value} for r in s.scale],
            }
            for i, s in enumerate(plan.recipe.layers)
        ],
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
                "op": t.op.kind,
                "scale": t.op.scale if isinstance(t.op, Convert) else 1.0,
                "source": _source_dict(t.model, t.source),
                **({"pieces": [_piece_dict(p) for p in t.op.parts]} if isinstance(t.op, Pieces) else {}),
                "shard": shard_of[t.name][0],
                "offset": shard_of[t.name][1],
            }
            for t in plan.tensors
        ],
        "shards": [{"name": s.name, "nbytes": s.nbytes, "tensors": len(s.tensors)} for s in layout.shards],
        "total_size": layout.total_size,
        "config": plan.config,
    }


def _source_dict(model: str, ref: TensorRef | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    return {"model": model, "name": ref.name, "file": file_name(ref.path), "dtype": ref.dtype, "offset": ref.data_start}


def _piece_dict(piece: Piece) -> dict[str, Any]:
    record: dict[str, Any] = {"op": piece.op.kind, "nbytes": piece.nbytes}
    if piece.source is not None and not isinstance(piece.op, Zeros):
        record |= {"source": piece.source.name, "file": file_name(piece.source.path), "first_element": piece.first}
    if isinstance(piece.op, Convert):
        record |= {"scale": piece.op.scale}
    if isinstance(piece.op, MeanRows):
        rows = piece.op.rows
        record |= {"rows": {"range": [rows.start, rows.stop]} if isinstance(rows, range) else list(rows)}
    if isinstance(piece.op, Normal):
        record |= {"seed": piece.op.seed, "std": piece.op.std, "stream": piece.op.stream, "first_element": piece.first}
    return record
