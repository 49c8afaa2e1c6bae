"""A change of the vocabulary applied to a plan: the rows of its matrices and its config.

The vocabulary matrices are the input embedding and an untied output head (and its bias): their
rows are token ids. A :class:`~shardsurgeon.plan.recipe.VocabChange` says, run by run, which source
rows each output row is, and what new rows start as: zeros (a hole), a copy of one row, or the
mean of rows (:class:`~shardsurgeon.plan.tensors.MeanRows`). Every other tensor is copied
as it is. Kept rows are byte ranges of the source, so they copy, share blocks and verify like any
copy. The token files are made to match by :mod:`plan.token_files`; the change is built from the
user's terms by :mod:`plan.vocab_terms`. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import PlanError, safe_text
from shardsurgeon.format import DTYPES, numel
from shardsurgeon.model.arch import INPUT_EMBEDDING_MARKERS, LayerStack, outside_rank
from shardsurgeon.model.checkpoint import TensorRef
from shardsurgeon.model.source import Source
from shardsurgeon.model.tokenizer import (
    moved_ids,
)
from shardsurgeon.plan.recipe import (
    RowRun,
    SourceRows,
    VocabChange,
)
from shardsurgeon.plan.tensors import Convert, Copy, MeanRows, Piece, Pieces, PlannedTensor, Zeros


@dataclass(frozen=True, slots=True)
class VocabMatrices:
    """A model's vocabulary matrices: the input embedding, and the tensors after the stack whose
    rows are token ids (an untied head, its bias); ``rows`` is their row count."""

    embedding: TensorRef
    heads: tuple[TensorRef, ...]

    @property
    def rows(self) -> int:
        return self.embedding.shape[0]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(ref.name for ref in (self.embedding, *self.heads))


def vocab_matrices(source: Source) -> VocabMatrices:
    """The vocabulary matrices of ``source``; a one-line refusal where it has no input embedding."""
    embeddings = [
        ref
        for ref in source.before
        if len(ref.shape) == 2
        and any(marker in ref.name for marker in INPUT_EMBEDDING_MARKERS)
        and "position" not in ref.name
    ]
    if len(embeddings) != 1:
        found = ", ".join(ref.name for ref in embeddings) or "none"
        raise PlanError(
            f"{safe_text(source.reference)}: expected one input embedding (a matrix named *embed_tokens*, *wte*, "
            f"*word_embeddings* or *embed_in* before the layers), found {safe_text(found, 120)}; its vocabulary "
            "cannot be changed by this tool"
        )
    (embedding,) = embeddings
    heads = tuple(
        ref for ref in source.after if outside_rank(ref.name) == (1, 1) and ref.shape[:1] == embedding.shape[:1]
    )
    for ref in (embedding, *heads):
        if not DTYPES[ref.dtype].is_float:
            raise PlanError(f"tensor {ref.name!r} is {ref.dtype}; only float vocabulary matrices can gain or lose rows")
    return VocabMatrices(embedding, heads)


def change_vocab(change: VocabChange, tensors: Sequence[PlannedTensor], matrices: VocabMatrices) -> list[PlannedTensor]:
    """``tensors`` with each vocabulary matrix made of the rows ``change`` gives."""
    head_names = {ref.name for ref in matrices.heads}
    return [
        _resized(t, change, t.source.name in head_names)
        if t.source is not None and t.source.name in matrices.names
        else t
        for t in tensors
    ]


def _resized(tensor: PlannedTensor, change: VocabChange, head: bool) -> PlannedTensor:
    ref = tensor.source
    assert ref is not None
    width = numel(ref.shape[1:])
    row_bytes = width * DTYPES[tensor.dtype].itemsize
    kept = tensor.op if isinstance(tensor.op, Copy | Convert | Zeros) else Copy()
    parts: list[Piece] = []

    def add(piece: Piece) -> None:
        last = parts[-1] if parts else None
        if last is not None and isinstance(piece.op, Zeros) and isinstance(last.op, Zeros):
            parts[-1] = Piece(Zeros(), last.nbytes + piece.nbytes)
        else:
            parts.append(piece)

    for run in change.rows:
        if isinstance(run, SourceRows):
            add(Piece(kept, run.count * row_bytes, None if isinstance(kept, Zeros) else ref, run.first * width))
            continue
        init = run.head if head else run.init
        for _ in range(run.count if init.kind != "zero" else 1):
            match init.kind:
                case "zero":
                    add(Piece(Zeros(), run.count * row_bytes))
                case "copy":
                    add(Piece(Convert() if isinstance(kept, Zeros) else kept, row_bytes, ref, init.rows[0] * width))
                case _:
                    add(Piece(MeanRows(init.rows), row_bytes, ref))
    shape = (change.size, *ref.shape[1:])
    return PlannedTensor(tensor.name, tensor.dtype, shape, Pieces(tuple(parts)), ref, tensor.model)


def check_rows(change: VocabChange, matrices: VocabMatrices) -> None:
    """Every source row ``change`` names is a row of the matrices (a recorded recipe can be edited)."""
    for ref in (matrices.embedding, *matrices.heads):
        if ref.shape[0] != matrices.rows:
            raise PlanError(
                f"tensor {ref.name!r} has {ref.shape[0]} rows but the input embedding has {matrices.rows}; "
                "the vocabulary matrices of the models disagree"
            )
    for run in change.rows:
        for row in _named_rows(run):
            if not 0 <= row < matrices.rows:
                raise PlanError(
                    f"vocabulary change: source row {row} does not exist ({matrices.embedding.name!r} has "
                    f"{matrices.rows} rows); plan it again from this source"
                )


def _named_rows(run: RowRun) -> list[int]:
    """The lowest and highest source row a run reads."""
    if isinstance(run, SourceRows):
        return [run.first, run.first + run.count - 1]
    named = []
    for init in (run.init, run.head):
        if isinstance(init.rows, range):
            named += [init.rows.start, init.rows.stop - 1]
        elif init.rows:
            named += [min(init.rows), max(init.rows)]
    return named


def vocab_config(change: VocabChange, config: Mapping[str, Any], stack: LayerStack) -> dict[str, Any]:
    """The config with ``vocab_size`` (top level and the layers' section) and its token ids moved."""
    moved = change.id_map() if change.moves_ids() else None

    def patched(section: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(section)
        if "vocab_size" in out or section is config:
            out["vocab_size"] = change.size
        if moved is not None:
            out.update(moved_ids(out, moved))
        return out

    result = patched(config)
    if stack.config_section:
        node = result
        for key in stack.config_section[:-1]:
            node[key] = node = dict(node[key])
        last = stack.config_section[-1]
        node[last] = patched(node[last])
    return result
