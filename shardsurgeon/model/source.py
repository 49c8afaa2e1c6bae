"""A model of a recipe, resolved once: its checkpoint, layer stack, per-layer tensors and the rest.

:func:`open_source` is the front door for every model the tool reads: it opens the checkpoint
(headers and JSON only), finds the layer stack once, with the user's ``StackHint`` when detection
needs help, and sorts every tensor into its layer or into the tensors before and after the stack,
in one pass over the names. The planner, ``inspect``, ``verify`` and the mergekit YAML writer all
consume this record; nothing downstream sees the hint or splits a name again. Never reads tensor
data and never writes.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from shardsurgeon.model.arch import NO_HINT, LayerStack, StackHint, find_layer_stack, outside_rank
from shardsurgeon.model.checkpoint import Checkpoint, TensorRef, open_checkpoint
from shardsurgeon.model.hfcache import base_model_id, card_names
from shardsurgeon.model.table import TensorTable


@dataclass(frozen=True, slots=True)
class LayerTensor:
    """A tensor of the stack: ``rest`` is its name after ``{prefix}.{layer}.`` (made when asked
    for: a model of 100,000 tensors would otherwise hold each name twice)."""

    start: int
    """Where ``rest`` begins in the tensor's name."""
    ref: TensorRef

    @property
    def rest(self) -> str:
        return self.ref.name[self.start :]


class Layers(Sequence[tuple[LayerTensor, ...]]):
    """The stack's tensors by layer, each layer's made when asked for from the checkpoint's table:
    the table holds each tensor once, compactly, and a layer is a row of positions in it."""

    __slots__ = ("_positions", "_prefix", "_table")

    def __init__(self, table: TensorTable, prefix: str, positions: Sequence[array[int]]) -> None:
        self._table = table
        self._prefix = prefix
        self._positions = tuple(positions)

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, layer: int) -> tuple[LayerTensor, ...]: ...
    @overload
    def __getitem__(self, layer: slice) -> Sequence[tuple[LayerTensor, ...]]: ...
    def __getitem__(self, layer: int | slice) -> tuple[LayerTensor, ...] | Sequence[tuple[LayerTensor, ...]]:
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self))[layer]]
        positions = self._positions[layer]
        start = len(self._prefix) + len(str(range(len(self))[layer])) + 2  # after "{prefix}.{layer}."
        return tuple(LayerTensor(start, self._table.ref(position)) for position in positions)


@dataclass(frozen=True, slots=True)
class Source:
    """One model: ``layers[i]`` holds layer i's tensors in source order; ``before`` and ``after``
    hold the tensors outside the stack in output order (embeddings first; final norm, then head)."""

    reference: str
    """The model as the recipe names it: a path or a Hugging Face id."""
    checkpoint: Checkpoint
    stack: LayerStack
    layers: Sequence[tuple[LayerTensor, ...]]
    before: tuple[TensorRef, ...]
    after: tuple[TensorRef, ...]
    published_name: str
    """The name a model card gives it: the Hugging Face id where known, else the folder name."""

    @property
    def folder(self) -> Path | str:
        return self.checkpoint.folder

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint.config

    @property
    def layer_count(self) -> int:
        return self.stack.count

    @property
    def outside(self) -> tuple[TensorRef, ...]:
        return self.before + self.after

    def layer_rests(self, layer: int = 0) -> list[str]:
        return [t.rest for t in self.layers[layer]]


def open_source(folder: str | os.PathLike[str], hint: StackHint = NO_HINT, reference: str | None = None) -> Source:
    """Open the checkpoint in ``folder`` and resolve its layer stack; ``reference`` defaults to the path."""
    checkpoint = open_checkpoint(folder)
    return resolve(checkpoint, hint, str(folder) if reference is None else reference)


def resolve(checkpoint: Checkpoint, hint: StackHint, reference: str) -> Source:
    """The :class:`Source` of an opened checkpoint (no files read: tests build checkpoints by hand)."""
    table = checkpoint.tensors
    if not isinstance(table, TensorTable):  # a checkpoint built by hand
        table = TensorTable(table.values())
    stack = find_layer_stack(table, checkpoint.config, hint)
    layers = [array("I") for _ in range(stack.count)]
    outside: list[TensorRef] = []
    for position, name in enumerate(table):
        split = stack.split(name)
        if split is None:
            outside.append(table.ref(position))
        else:
            layers[split[0]].append(position)
    ranked = sorted(enumerate(outside), key=lambda item: (outside_rank(item[1].name), item[0]))
    before = tuple(ref for _, ref in ranked if outside_rank(ref.name)[0] == 0)
    after = tuple(ref for _, ref in ranked if outside_rank(ref.name)[0] != 0)
    return Source(
        reference,
        checkpoint,
        stack,
        Layers(table, stack.prefix, layers),
        before,
        after,
        base_model_id(checkpoint.folder, checkpoint.config),
    )


def card_names_of(sources: Mapping[str, Source]) -> dict[str, str]:
    """The name the model card, its command and its mergekit config give each model reference: its
    Hugging Face id where known, else its folder's name (never a path)."""
    folders = {ref: s.folder.resolve() if isinstance(s.folder, Path) else s.folder for ref, s in sources.items()}
    return card_names([(ref, folders[ref], source.published_name) for ref, source in sources.items()])
