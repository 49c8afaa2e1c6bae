"""Mean rows for the writers: computed by the one definition (:func:`plan.expected.mean_row`),
and the last one kept, since the new rows of a vocabulary change are often all one mean and a part
of an S3 upload may ask for a row another part began. One row: kilobytes."""

from __future__ import annotations

from typing import Any

from shardsurgeon.plan.expected import Read, mean_row
from shardsurgeon.plan.tensors import MeanRows, Piece


class RowMeans:
    """Safe to share between threads: the last (key, row) is one object, read and replaced whole."""

    def __init__(self) -> None:
        self._last: tuple[tuple[Any, ...] | None, bytes] = (None, b"")

    def row(self, op: MeanRows, piece: Piece, dtype: str, read: Read) -> bytes:
        """The bytes of ``piece``, the mean ``op`` of rows of its source, in ``dtype``."""
        assert piece.source is not None
        key = (op, piece.source, dtype)
        last_key, row = self._last
        if key != last_key:
            row = mean_row(op, piece.source, dtype, read)
            self._last = (key, row)
        return row
