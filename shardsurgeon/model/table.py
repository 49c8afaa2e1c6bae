"""A checkpoint's tensors held compactly: a name list and columns of numbers, not an object each.

A DeepSeek-V3-sized mixture of experts has about 90,000 tensors; a ``TensorRef`` and a dict entry
for each cost about 150 bytes beside its name. :class:`TensorTable` keeps each tensor as its name
(the string the header gave) and a few fixed-size numbers in arrays (file, dtype and shape as small
indexes into shared tuples, data start and size), and makes a :class:`TensorRef` when one is
asked for. It is a read-only ``Mapping`` of name to ``TensorRef`` in source order; looking a name
up builds a name index the first time (iterating never does). Pure: no files.
"""

from __future__ import annotations

from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from pathlib import Path

from shardsurgeon.format import DTYPES, Header, TensorRef

_DTYPE_NAMES = tuple(DTYPES)
_DTYPE_NUMBER = {name: number for number, name in enumerate(_DTYPE_NAMES)}


class TensorTable(Mapping[str, TensorRef]):
    """Tensors by name, in the order they were added (a checkpoint's source order)."""

    __slots__ = ("_dtype", "_file", "_names", "_nbytes", "_path_number", "_paths", "_positions", "_shape",
                 "_shape_number", "_shapes", "_start")  # fmt: skip

    def __init__(self, refs: Iterable[TensorRef] = ()) -> None:
        self._names: list[str] = []
        self._paths: list[Path | str] = []
        self._path_number: dict[Path | str, int] = {}
        self._file = array("I")
        self._dtype = array("B")
        self._shape = array("I")
        self._start = array("q")
        self._nbytes = array("q")
        self._shapes: list[tuple[int, ...]] = []
        self._shape_number: dict[tuple[int, ...], int] = {}
        self._positions: dict[str, int] | None = None
        for ref in refs:
            self._add(ref.name, self._file_number(ref.path), ref.dtype, ref.shape, ref.data_start, ref.nbytes)

    def add_header(self, path: Path | str, header: Header) -> None:
        """Add the tensors of the file at ``path``, whose decoded header is ``header``, in data order."""
        file = self._file_number(path)
        for e in header.tensors:
            self._add(e.name, file, e.dtype, e.shape, header.data_start + e.begin, e.nbytes)

    def name(self, position: int) -> str:
        return self._names[position]

    def ref(self, position: int) -> TensorRef:
        """The tensor added ``position``-th (from 0)."""
        return TensorRef(
            self._names[position],
            self._paths[self._file[position]],
            _DTYPE_NAMES[self._dtype[position]],
            self._shapes[self._shape[position]],
            self._start[position],
            self._nbytes[position],
        )

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __getitem__(self, name: str) -> TensorRef:
        if self._positions is None:
            self._positions = {n: position for position, n in enumerate(self._names)}
        return self.ref(self._positions[name])

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except (KeyError, TypeError):
            return False
        return True

    def values(self) -> ValuesView[TensorRef]:
        return _Values(self)

    def items(self) -> ItemsView[str, TensorRef]:
        return _Items(self)

    def __repr__(self) -> str:
        return f"TensorTable({len(self)} tensors)"

    def _add(self, name: str, file: int, dtype: str, shape: tuple[int, ...], data_start: int, nbytes: int) -> None:
        shape_number = self._shape_number.setdefault(shape, len(self._shapes))
        if shape_number == len(self._shapes):
            self._shapes.append(shape)
        self._names.append(name)
        self._file.append(file)
        self._dtype.append(_DTYPE_NUMBER[dtype])
        self._shape.append(shape_number)
        self._start.append(data_start)
        self._nbytes.append(nbytes)
        self._positions = None

    def _file_number(self, path: Path | str) -> int:
        number = self._path_number.setdefault(path, len(self._paths))
        if number == len(self._paths):
            self._paths.append(path)
        return number


class _Values(ValuesView[TensorRef]):
    _mapping: TensorTable

    def __iter__(self) -> Iterator[TensorRef]:
        return map(self._mapping.ref, range(len(self._mapping)))


class _Items(ItemsView[str, TensorRef]):
    _mapping: TensorTable

    def __iter__(self) -> Iterator[tuple[str, TensorRef]]:
        table = self._mapping
        return ((table.name(position), table.ref(position)) for position in range(len(table)))
