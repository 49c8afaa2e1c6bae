"""Plans in words and as JSON: the dry run, ``--plan-json`` and the model card's description. Pure."""

from __future__ import annotations

from typing import Any

import orjson

from shardsurgeon import __version__
from shardsurgeon.layout import Layout
from shardsurgeon.plan import OP_KINDS, Convert, Plan
from shardsurgeon.recipe import LayerSource
from shardsurgeon.units import format_bytes


def layer_runs(plan: Plan) -> list[tuple[int, int, LayerSource, int]]:
    """Output layers grouped in runs: (first output, last output, first source, length)."""
    runs: list[tuple[int, int, LayerSource, int]] = []
    for position, source in enumerate(plan.recipe.layers):
        if runs:
            first, _, start, length = runs[-1]
            if (
                start.model == source.model
                and start.scale == source.scale
                and start.inserted == source.inserted
                and start.layer is not None
                and source.layer == start.layer + length
                and not source.inserted
            ):
                runs[-1] = (first, position, start, length + 1)
                continue
        runs.append((position, position, source, 1))
    return runs


def describe_layers(plan: Plan, model_name: str | None = None) -> list[str]:
    lines = []
    for first, last, source, length in layer_runs(plan):
        assert source.layer is not None
        outs = f"{first}" if first == last else f"{first}-{last}"
        ins = f"{source.layer}" if length == 1 else f"{source.layer}-{source.layer + length - 1}"
        label = "copy of layer" if source.inserted else "layer" if length == 1 else "layers"
        model = f" of {model_name or source.model}" if len(plan.recipe.models) > 1 or model_name else ""
        rules = ", ".join(f"{r.filter or 'all'} {'zero' if r.value == 0 else f'x{r.value:g}'}" for r in source.scale)
        lines.append(f"output {outs:>7} <- {label} {ins}{model}" + (f"  [{rules}]" if rules else ""))
    return lines


def describe_expansion(plan: Plan, base_model: str) -> str:
    inserted = [i for i, s in enumerate(plan.recipe.layers) if s.inserted]
    zeroed = sorted({r.filter for s in plan.recipe.layers if s.inserted for r in s.scale if r.filter})
    text = (
        f"Expanded {base_model} from {plan.source_layers} to {plan.output_layers} layers. "
        f"{len(inserted)} inserted layers (output indices {_ranges(inserted)}) copy the layer just before them"
    )
    if zeroed:
        text += (
            f", with every tensor whose name contains {' or '.join(zeroed)} set to zero, so each new block "
            "passes its input through unchanged and the model gives the same outputs as the original "
            "until it is fine-tuned (LLaMA Pro block expansion)"
        )
    if plan.recipe.dtype:
        text += f". Floating-point tensors were cast to {plan.recipe.dtype}"
    return text + "."


def describe_merge(plan: Plan, names: dict[str, str]) -> str:
    """The model card's words for a mergekit passthrough merge."""
    runs = []
    for first, last, source, length in layer_runs(plan):
        assert source.layer is not None
        runs.append(
            f"layers {first}-{last} from {names[source.model]} layers {source.layer}-{source.layer + length - 1}"
            if length > 1
            else f"layer {first} from {names[source.model]} layer {source.layer}"
        )
    text = f"A passthrough merge of {plan.output_layers} layers: " + "; ".join(runs) + "."
    if plan.recipe.output_dtype:
        text += f" Floating-point tensors are {plan.recipe.output_dtype}."
    return text


def _ranges(values: list[int]) -> str:
    parts: list[str] = []
    for value in values:
        if parts and value == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{value}"
        else:
            parts.append(str(value))
    return ", ".join(parts)


def op_bytes(plan: Plan) -> dict[str, int]:
    """Output tensor bytes by op kind."""
    totals = dict.fromkeys(OP_KINDS, 0)
    for tensor in plan.tensors:
        totals[tensor.op.kind] += tensor.nbytes
    return totals


def dry_run_text(plan: Plan, layout: Layout) -> str:
    totals = op_bytes(plan)
    lines = [
        f"layers: {plan.layers_in} -> {plan.output_layers} (stack {plan.stack.prefix}.N, "
        f"config {plan.stack.count_path})",
        *describe_layers(plan),
        f"tensors: {len(plan.tensors)}: {format_bytes(totals['copy'])} copied, {format_bytes(totals['zeros'])} zeros "
        f"(holes, not written), {format_bytes(totals['convert'])} converted",
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
                "source": {
                    "model": t.model,
                    "name": t.source.name,
                    "file": t.source.path.name,
                    "dtype": t.source.dtype,
                    "offset": t.source.data_start,
                },
                "shard": shard_of[t.name][0],
                "offset": shard_of[t.name][1],
            }
            for t in plan.tensors
        ],
        "shards": [{"name": s.name, "nbytes": s.nbytes, "tensors": len(s.tensors)} for s in layout.shards],
        "total_size": layout.total_size,
        "config": plan.config,
    }


def plan_json(plan: Plan, layout: Layout) -> bytes:
    return orjson.dumps(plan_dict(plan, layout), option=orjson.OPT_INDENT_2) + b"\n"
