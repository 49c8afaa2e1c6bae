"""Recipe + checkpoints -> Plan: every output tensor, its op and source, and the patched config.

All checks that can fail before a byte is written happen here. Pure: it reads only the indexes
that :mod:`shardsurgeon.checkpoint` built, never tensor data, and writes nothing.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from shardsurgeon import __version__
from shardsurgeon.arch import LayerStack, SourceLayer, find_layer_stack, outside_rank, patch_config
from shardsurgeon.checkpoint import Checkpoint, TensorRef
from shardsurgeon.errors import PlanError, RecipeError
from shardsurgeon.format import DTYPES, TORCH_DTYPE_NAMES, tensor_nbytes
from shardsurgeon.recipe import LayerSource, Recipe

Op = Literal["copy", "zeros", "convert"]


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """One output tensor.

    ``convert`` casts the source to ``via`` (default: ``dtype``), multiplies by ``scale`` there,
    then casts to ``dtype``: mergekit's ``dtype`` / ``out_dtype`` sequence.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Op
    source: TensorRef
    model: str
    scale: float = 1.0
    via: str | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the output will hold, decided before anything is written."""

    recipe: Recipe
    stack: LayerStack
    tensors: tuple[PlannedTensor, ...]
    config: dict[str, Any]
    fingerprint: str
    model_layers: dict[str, int]
    """Layer count of each model of the recipe."""

    @property
    def source_layers(self) -> int:
        return self.stack.count

    @property
    def layers_in(self) -> str:
        """The source layer counts in words: ``32``, or ``a: 24, b: 32`` for several models."""
        if len(self.model_layers) == 1:
            return str(self.source_layers)
        return ", ".join(f"{model}: {count}" for model, count in self.model_layers.items())

    @property
    def output_layers(self) -> int:
        return len(self.recipe.layers)


def make_plan(
    recipe: Recipe,
    checkpoints: Mapping[str, Checkpoint],
    *,
    layer_prefix: str | None = None,
    layers_key: str | None = None,
) -> Plan:
    """Plan the output of ``recipe``; ``checkpoints`` maps each model of the recipe to its index."""
    stacks = {
        model: find_layer_stack(checkpoints[model].tensors, checkpoints[model].config, layer_prefix, layers_key)
        for model in recipe.models
    }
    donor = recipe.donor
    stack = stacks[donor]
    _check_same_architecture(recipe, checkpoints, stacks)
    for position, source in enumerate(recipe.layers):
        if source.layer is None or not 0 <= source.layer < stacks[source.model].count:
            raise RecipeError(
                f"output layer {position}: source layer {source.layer} of {source.model} is out of range, "
                f"the model has layers 0..{stacks[source.model].count - 1}"
            )
    layers = {model: _layer_tensors(checkpoints[model], stacks[model]) for model in recipe.models}
    matched: set[str] = set()
    tensors: list[PlannedTensor] = []
    for ref in _outside(checkpoints[recipe.head.model], stacks[recipe.head.model], before=True):
        tensors.append(_planned(ref.name, ref, recipe.head, recipe, matched))
    for position, source in enumerate(recipe.layers):
        assert source.layer is not None
        for rest, ref in layers[source.model][source.layer]:
            tensors.append(_planned(stack.name(position, rest), ref, source, recipe, matched))
    for ref in _outside(checkpoints[recipe.tail.model], stacks[recipe.tail.model], before=False):
        tensors.append(_planned(ref.name, ref, recipe.tail, recipe, matched))
    _check_filters(recipe, matched, layers)
    sources = [
        SourceLayer(checkpoints[s.model].config, stacks[s.model], s.layer) for s in recipe.layers if s.layer is not None
    ]
    config = patch_config(checkpoints[donor].config, stack, sources)
    if recipe.output_dtype is not None:
        config = _set_dtype(config, stack, TORCH_DTYPE_NAMES[recipe.output_dtype])
    fingerprint = _fingerprint(tensors, config, checkpoints)
    model_layers = {model: stacks[model].count for model in recipe.models}
    return Plan(recipe, stack, tuple(tensors), config, fingerprint, model_layers)


def _layer_tensors(checkpoint: Checkpoint, stack: LayerStack) -> list[list[tuple[str, TensorRef]]]:
    per_layer: list[list[tuple[str, TensorRef]]] = [[] for _ in range(stack.count)]
    for name, ref in checkpoint.tensors.items():
        split = stack.split(name)
        if split is not None:
            per_layer[split[0]].append((split[1], ref))
    return per_layer


def _outside(checkpoint: Checkpoint, stack: LayerStack, before: bool) -> list[TensorRef]:
    refs = [ref for name, ref in checkpoint.tensors.items() if stack.split(name) is None]
    ranked = [(outside_rank(ref.name), position, ref) for position, ref in enumerate(refs)]
    return [ref for rank, _, ref in sorted(ranked, key=lambda r: r[:2]) if (rank[0] == 0) == before]


def _planned(name: str, ref: TensorRef, source: LayerSource, recipe: Recipe, matched: set[str]) -> PlannedTensor:
    factor, _ = source.scale_for(ref.name)
    # every filter that names the tensor counts as used, even when an earlier one wins (--zero mlp,down_proj)
    matched.update(r.filter for r in source.scale if r.filter is not None and r.matches(ref.name))
    is_float = DTYPES[ref.dtype].is_float
    work = recipe.dtype if recipe.dtype is not None and is_float else ref.dtype
    final = recipe.output_dtype if recipe.output_dtype is not None and is_float else ref.dtype
    if factor == 0.0:
        return PlannedTensor(name, final, ref.shape, "zeros", ref, source.model)
    if factor == 1.0 and work == ref.dtype == final:
        return PlannedTensor(name, final, ref.shape, "copy", ref, source.model)
    if factor != 1.0 and not is_float:
        raise PlanError(
            f"tensor {ref.name!r} of {source.model} is {ref.dtype}, which cannot be scaled by {factor:g}; "
            "only BF16, F16, F32 and F64 tensors can be scaled (0 and 1 work for any dtype)"
        )
    via = work if work != final else None
    return PlannedTensor(name, final, ref.shape, "convert", ref, source.model, factor, via)


def _check_filters(recipe: Recipe, matched: set[str], layers: Mapping[str, Any]) -> None:
    sources = (recipe.head, recipe.tail, *recipe.layers)
    for source in sources:
        for rule in source.scale:
            if rule.filter is not None and rule.filter not in matched:
                names = [rest for rest, _ in layers[source.model][source.layer or 0]]
                flag = "--zero" if source.inserted else "scale filter"
                raise RecipeError(
                    f"{flag} {rule.filter!r} matches no tensor it applies to (layer tensors: "
                    f"{_some(names)}); {_spelling_hint(rule.filter, names)}"
                )


def _some(names: list[str], shown: int = 4) -> str:
    """A few names, so that a message stays one short line even for a layer of many experts."""
    more = f", ... {len(names)} in all" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _spelling_hint(text: str, names: list[str]) -> str:
    parts = sorted({part for name in names for part in (name, *name.split("."))})
    close = difflib.get_close_matches(text, parts, n=1)
    return f"did you mean {close[0]!r}?" if close else "check the spelling"


def _check_same_architecture(
    recipe: Recipe, checkpoints: Mapping[str, Checkpoint], stacks: Mapping[str, LayerStack]
) -> None:
    reference = recipe.head.model
    ref_stack = stacks[reference]
    ref_shapes = _shapes_by_role(checkpoints[reference], ref_stack)
    for model in recipe.models:
        if model == reference:
            continue
        if stacks[model].prefix != ref_stack.prefix:
            raise PlanError(
                f"{model}: layers are under {stacks[model].prefix}.N but {reference} has them under "
                f"{ref_stack.prefix}.N; models of one merge must share an architecture"
            )
        shapes = _shapes_by_role(checkpoints[model], stacks[model])
        for key in sorted(set(ref_shapes) | set(shapes)):
            if ref_shapes.get(key) != shapes.get(key):
                raise PlanError(
                    f"tensor {key!r}: {reference} has {_describe(ref_shapes.get(key))} but {model} has "
                    f"{_describe(shapes.get(key))}; models of one merge must share tensor names and shapes"
                )


def _shapes_by_role(checkpoint: Checkpoint, stack: LayerStack) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Dtype and shape by name, with layer tensors keyed by ``N.rest`` over layer 0 only."""
    shapes = {}
    for name, ref in checkpoint.tensors.items():
        split = stack.split(name)
        if split is None:
            shapes[name] = (ref.dtype, ref.shape)
        elif split[0] == 0:
            shapes[stack.name(0, split[1])] = (ref.dtype, ref.shape)
    return shapes


def _describe(entry: tuple[str, tuple[int, ...]] | None) -> str:
    return "no such tensor" if entry is None else f"{entry[0]} {list(entry[1])}"


def _set_dtype(config: dict[str, Any], stack: LayerStack, torch_name: str) -> dict[str, Any]:
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    config = {**config, **dict.fromkeys(keys, torch_name)}
    section = config
    for key in stack.config_section:
        section[key] = section = {**section[key]}
        for k in ("torch_dtype", "dtype"):
            if k in section:
                section[k] = torch_name
    return config


def _fingerprint(tensors: list[PlannedTensor], config: dict[str, Any], checkpoints: Mapping[str, Checkpoint]) -> str:
    """A digest of the plan that changes with anything that changes the output bytes.

    Sources enter by their header digest and offsets, not their paths, so the output does not
    depend on where the source lives.
    """
    headers = {str(s.path): s.header_sha256 for c in checkpoints.values() for s in c.shards}
    described = [
        [t.name, t.dtype, t.shape, t.op, t.scale, t.via, headers[str(t.source.path)], t.source.data_start]
        for t in tensors
    ]
    payload = orjson.dumps({"version": __version__, "tensors": described, "config": config})
    return hashlib.sha256(payload).hexdigest()[:32]
