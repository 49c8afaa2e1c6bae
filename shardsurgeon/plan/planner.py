"""Recipe + sources -> Plan: every output tensor, its op and source, and the patched config.

All checks that can fail before a byte is written happen here or in the recipe builders. Pure: it
reads only the :class:`~shardsurgeon.source.Source` records, never tensor data, and writes nothing.

The tensors and ops it is made of are :mod:`plan.tensors`; a change of the experts is applied
to each layer by :mod:`plan.experts`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shardsurgeon import __version__
from shardsurgeon.errors import PlanError, RecipeError
from shardsurgeon.format import DTYPES, torch_name
from shardsurgeon.model.arch import LayerStack, SourceLayer, patch_config
from shardsurgeon.model.checkpoint import TensorRef
from shardsurgeon.model.routerfile import RouterFile
from shardsurgeon.model.source import Source
from shardsurgeon.plan.experts import change_layer, changed_config, experts_kind
from shardsurgeon.plan.recipe import LayerSource, Recipe
from shardsurgeon.plan.routers import check_every_tensor_used
from shardsurgeon.plan.tensors import (
    COPY,
    ZEROS,
    Convert,
    Copy,
    MeanRows,
    Normal,
    Piece,
    PieceOp,
    Pieces,
    PlannedTensor,
    Zeros,
)
from shardsurgeon.plan.vocab import VocabMatrices, change_vocab, check_rows, vocab_config, vocab_matrices


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the output will hold, decided before anything is written."""

    recipe: Recipe
    stack: LayerStack
    """The donor's stack, which names the output layers."""
    tensors: tuple[PlannedTensor, ...]
    config: dict[str, Any]
    fingerprint: str
    model_layers: dict[str, int]
    """Layer count of each model of the recipe."""
    source_vocab_rows: int | None = None
    """The rows of the source's vocabulary matrices, where the recipe changes them."""

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


def make_plan(recipe: Recipe, sources: Mapping[str, Source], router_file: RouterFile | None = None) -> Plan:
    """Plan the output of ``recipe``; ``sources`` maps each model of the recipe to its record, and
    ``router_file`` is the opened file of routers the recipe names, if it names one.

    The recipe's layer numbers are in range for these sources: its builders check that.
    """
    donor = sources[recipe.donor]
    _check_same_architecture(recipe, sources)
    matched: set[str] = set()
    tensors: list[PlannedTensor] = []
    for ref in sources[recipe.head.model].before:
        tensors.append(_planned(ref.name, ref, recipe.head, recipe, matched))
    kind = experts_kind(recipe.experts, donor.config, donor.stack)

    def planned_layer(at: LayerSource, position: int) -> list[PlannedTensor]:
        """Output layer ``position``, made from the layer ``at`` names (names reused where equal)."""
        source = sources[at.model]
        same_names = position == at.layer and source.stack.prefix == donor.stack.prefix
        return [
            _planned(t.ref.name if same_names else donor.stack.name(position, t.rest), t.ref, at, recipe, matched)
            for t in source.layers[at.layer or 0]
        ]

    for position, layer_source in enumerate(recipe.layers):
        assert layer_source.layer is not None
        layer = planned_layer(layer_source, position)
        if recipe.experts is not None and kind is not None:

            def same_layer_of(model: str, at: LayerSource = layer_source, here: int = position) -> list[PlannedTensor]:
                return planned_layer(dataclasses.replace(at, model=model), here)  # an expert's source

            change, stack, config = recipe.experts, donor.stack, donor.config
            layer = change_layer(
                change, kind, stack, position, layer_source.layer, layer, config, same_layer_of, router_file
            )
        tensors.extend(layer)
    for ref in sources[recipe.tail.model].after:
        tensors.append(_planned(ref.name, ref, recipe.tail, recipe, matched))
    vocab_rows = None
    if recipe.vocab is not None:
        head, tail = vocab_matrices(sources[recipe.head.model]), vocab_matrices(sources[recipe.tail.model])
        matrices = VocabMatrices(head.embedding, tail.heads)
        check_rows(recipe.vocab, matrices)
        tensors, vocab_rows = change_vocab(recipe.vocab, tensors, matrices), matrices.rows
    _check_filters(recipe, matched, sources)
    _check_unique_names(tensors)
    if router_file is not None:
        check_every_tensor_used(
            router_file, {t.name for t in tensors if t.source and t.source.path == router_file.shard.path}
        )
    layer_sources = [SourceLayer(sources[s.model].config, sources[s.model].stack, s.layer or 0) for s in recipe.layers]
    config = patch_config(donor.config, donor.stack, layer_sources)
    if recipe.experts is not None:
        config = changed_config(recipe.experts, config, donor.stack, len(recipe.layers))
    if recipe.vocab is not None:
        config = vocab_config(recipe.vocab, config, donor.stack)
    if recipe.output_dtype is not None:
        config = _set_dtype(config, donor.stack, torch_name(recipe.output_dtype))
    model_layers = {model: sources[model].layer_count for model in recipe.models}
    tokens = recipe.vocab.tokens if recipe.vocab is not None else ()
    fingerprint = _fingerprint(tensors, config, sources, router_file, tokens)
    return Plan(recipe, donor.stack, tuple(tensors), config, fingerprint, model_layers, vocab_rows)


def _planned(name: str, ref: TensorRef, source: LayerSource, recipe: Recipe, matched: set[str]) -> PlannedTensor:
    factor, _ = source.scale_for(ref.name)
    # every filter that names the tensor counts as used, even when an earlier one wins (--zero mlp,down_proj)
    matched.update(r.filter for r in source.scale if r.filter is not None and r.matches(ref.name))
    is_float = DTYPES[ref.dtype].is_float
    work = recipe.dtype if recipe.dtype is not None and is_float else ref.dtype
    final = recipe.output_dtype if recipe.output_dtype is not None and is_float else ref.dtype
    if factor == 0.0:
        return PlannedTensor(name, final, ref.shape, ZEROS, ref, source.model)
    if factor == 1.0 and work == ref.dtype == final:
        return PlannedTensor(name, final, ref.shape, COPY, ref, source.model)
    if factor != 1.0 and not is_float:
        raise PlanError(
            f"tensor {ref.name!r} of {source.model} is {ref.dtype}, which cannot be scaled by {factor:g}; "
            "only BF16, F16, F32 and F64 tensors can be scaled (0 and 1 work for any dtype)"
        )
    via = work if work != final else None
    return PlannedTensor(name, final, ref.shape, Convert(factor, via), ref, source.model)


def _check_unique_names(tensors: list[PlannedTensor]) -> None:
    """Two source tensors may never become one output name: the output header would lose one."""
    seen: dict[str, PlannedTensor] = {}
    for tensor in tensors:
        earlier = seen.setdefault(tensor.name, tensor)
        if earlier is not tensor:
            raise PlanError(
                f"output tensor {tensor.name!r} would be made from both {_origin(earlier)} and {_origin(tensor)} of "
                f"{tensor.model}; rename one of them in the source"
            )


def _origin(tensor: PlannedTensor) -> str:
    return repr(tensor.source.name) if tensor.source is not None else f"nothing ({tensor.op.kind})"


def _check_filters(recipe: Recipe, matched: set[str], sources: Mapping[str, Source]) -> None:
    for source in (recipe.head, recipe.tail, *recipe.layers):
        for rule in source.scale:
            if rule.filter is not None and rule.filter not in matched:
                names = sources[source.model].layer_rests(source.layer or 0)
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


def _check_same_architecture(recipe: Recipe, sources: Mapping[str, Source]) -> None:
    reference = sources[recipe.head.model]
    ref_shapes = _shapes_by_role(reference)
    for model in recipe.models:
        other = sources[model]
        if other is reference:
            continue
        if other.stack.prefix != reference.stack.prefix:
            raise PlanError(
                f"{model}: layers are under {other.stack.prefix}.N but {reference.reference} has them under "
                f"{reference.stack.prefix}.N; models of one merge must share an architecture"
            )
        shapes = _shapes_by_role(other)
        for key in sorted(set(ref_shapes) | set(shapes)):
            if ref_shapes.get(key) != shapes.get(key):
                raise PlanError(
                    f"tensor {key!r}: {reference.reference} has {_describe(ref_shapes.get(key))} but {model} has "
                    f"{_describe(shapes.get(key))}; models of one merge must share tensor names and shapes"
                )


def _shapes_by_role(source: Source) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Dtype and shape by name, with layer tensors keyed by ``N.rest`` over layer 0 only."""
    shapes = {ref.name: (ref.dtype, ref.shape) for ref in source.outside}
    for tensor in source.layers[0]:
        shapes[source.stack.name(0, tensor.rest)] = (tensor.ref.dtype, tensor.ref.shape)
    return shapes


def _describe(entry: tuple[str, tuple[int, ...]] | None) -> str:
    return "no such tensor" if entry is None else f"{entry[0]} {list(entry[1])}"


def _set_dtype(config: dict[str, Any], stack: LayerStack, name: str) -> dict[str, Any]:
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    config = {**config, **dict.fromkeys(keys, name)}
    section = config
    for key in stack.config_section:
        section[key] = section = {**section[key]}
        for k in ("torch_dtype", "dtype"):
            if k in section:
                section[k] = name
    return config


def _fingerprint(
    tensors: list[PlannedTensor],
    config: dict[str, Any],
    sources: Mapping[str, Source],
    router_file: RouterFile | None,
    tokens: Sequence[Any] = (),
) -> str:
    """A digest of the plan that changes with anything that changes the output bytes.

    Sources (and a file of routers) enter by their header digest and offsets, not their paths, so
    the output does not depend on where the source lives.
    """
    shards = [s for source in sources.values() for s in source.checkpoint.shards]
    headers = {str(s.path): s.header_sha256 for s in [*shards, *([router_file.shard] if router_file else [])]}
    # the digest of orjson.dumps({"version", "tensors": [...], "config", "tokens"?}), made one tensor at a time:
    # the whole payload of 100,000 tensors would be 15 MB at once
    digest = hashlib.sha256(b'{"version":' + orjson.dumps(__version__) + b',"tensors":[')
    for number, t in enumerate(tensors):
        entry: list[Any] = [t.name, t.dtype, t.shape]
        if isinstance(t.op, Pieces):
            entry += [[_piece_fields(p, headers) for p in t.op.parts]]
        else:
            entry += [*_op_fields(t.op), *(_source_fields(t.source, headers) if t.source is not None else ("", 0))]
        digest.update(b"," + orjson.dumps(entry) if number else orjson.dumps(entry))
    digest.update(b'],"config":' + orjson.dumps(config))
    if tokens:  # the tokens a vocabulary change adds make the output's token files
        digest.update(b',"tokens":' + orjson.dumps([[t.content, t.id, t.special] for t in tokens]))
    digest.update(b"}")
    return digest.hexdigest()[:32]


def _source_fields(ref: TensorRef, headers: Mapping[str, str]) -> tuple[str, int]:
    return headers.get(str(ref.path), str(ref.path)), ref.data_start


def _piece_fields(piece: Piece, headers: Mapping[str, str]) -> list[Any]:
    origin = _source_fields(piece.source, headers) if piece.source is not None else ("", 0)
    return [*_op_fields(piece.op), *origin, piece.first, piece.nbytes]


def _op_fields(op: PieceOp) -> tuple[Any, ...]:
    """The op as the fingerprint has always described it: kind, scale, working dtype (and a
    generator's own fields)."""
    match op:
        case Convert(scale, via):
            return op.kind, scale, via
        case Copy() | Zeros():
            return op.kind, 1.0, None
        case Normal(seed, std, stream):
            return op.kind, std, None, seed, stream
        case MeanRows(rows):
            return op.kind, 1.0, None, ["range", rows.start, rows.stop] if isinstance(rows, range) else list(rows)
