"""The bytes a planned tensor must hold, by definition, and where a file differs from them.

The definition of every op (DESIGN.md): a copy is the source's bytes; zeros are +0.0; a convert is
the source cast to its working dtype with round to nearest even (a 16-bit target through float32,
so float64 rounds twice, as torch does), scaled in float32 (float64 for F64) and cast to the
output dtype. Plain numpy and ml_dtypes on one chunk at a time: the specification, never the
executor's fast converters, so a bug in those cannot pass. Both the write path (a kept shard's
proof) and ``verify`` use it; it reads only through the reader its caller gives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError
from shardsurgeon.format import DTYPES, TensorRef, numel
from shardsurgeon.names import CHUNK_BYTES
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.plan.tensors import Convert, Copy, MeanRows, Normal, Pieces, PlannedTensor, Zeros, pieces_of
from shardsurgeon.units import Progress

Read = Callable[[Path | str, int, int], bytes]
"""Bytes ``offset`` to ``offset + nbytes`` of the file at a path or URL; fewer only past its end."""
CHUNK_ELEMENTS = 1 << 19
_ZEROS = bytes(CHUNK_BYTES)


def _ignore(nbytes: int) -> None:
    pass


def expected_chunks(tensor: PlannedTensor, read: Read) -> Iterator[bytes | memoryview]:
    """The bytes ``tensor`` must hold, in chunks of at most a few MiB, piece after piece."""
    out_itemsize = DTYPES[tensor.dtype].itemsize
    means: tuple[Any, bytes] = (None, b"")
    for piece in pieces_of(tensor):
        match piece.op:
            case Zeros():
                for start in range(0, piece.nbytes, CHUNK_BYTES):
                    yield memoryview(_ZEROS)[: min(CHUNK_BYTES, piece.nbytes - start)]
            case Copy():
                assert piece.source is not None
                first = piece.source.data_start + piece.first * DTYPES[piece.source.dtype].itemsize
                for start in range(0, piece.nbytes, CHUNK_BYTES):
                    yield read(piece.source.path, first + start, min(CHUNK_BYTES, piece.nbytes - start))
            case Convert() as op:
                source = piece.source
                assert source is not None
                itemsize = DTYPES[source.dtype].itemsize
                first, count = source.data_start + piece.first * itemsize, piece.nbytes // out_itemsize
                for start in range(0, count, CHUNK_ELEMENTS):
                    raw = read(source.path, first + start * itemsize, min(CHUNK_ELEMENTS, count - start) * itemsize)
                    yield by_definition(raw, source.dtype, op, tensor.dtype).tobytes()
            case Normal() as op:
                count = piece.nbytes // out_itemsize
                for start in range(0, count, CHUNK_ELEMENTS):
                    yield generated_bytes(op, tensor.dtype, piece.first + start, min(CHUNK_ELEMENTS, count - start))
            case MeanRows() as op:
                assert piece.source is not None
                if means[0] != (op, piece.source):  # new rows of one init are one mean: computed once
                    means = ((op, piece.source), mean_row(op, piece.source, tensor.dtype, read))
                yield means[1]
            case Pieces():
                raise AssertionError(f"{tensor.name}: pieces inside a piece")


GENERATOR_BLOCK = 4096
"""Elements drawn from one seeding of the generator: element i of a stream is in block i // 4096."""


def generated_bytes(op: Normal, dtype: str, first: int, count: int) -> bytes:
    """Elements ``first`` to ``first + count`` of ``op``'s stream, rounded to ``dtype``.

    The rule, the same on every machine: the stream's block b (elements 4096 b to 4096 b + 4095) is
    ``numpy.random.Generator(PCG64(SeedSequence([seed, S, b]))).standard_normal(4096, float32)``,
    where S is the first 8 bytes (little-endian) of the SHA-256 of the stream's name; each value is
    multiplied by ``float32(std)`` and rounded to nearest even into ``dtype``.
    """
    import numpy as np

    stream = int.from_bytes(hashlib.sha256(op.stream.encode()).digest()[:8], "little")
    values = np.empty(count, np.float32)
    done = 0
    while done < count:
        block, skip = divmod(first + done, GENERATOR_BLOCK)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([op.seed, stream, block])))
        drawn = rng.standard_normal(GENERATOR_BLOCK, dtype=np.float32)
        take = min(GENERATOR_BLOCK - skip, count - done)
        values[done : done + take] = drawn[skip : skip + take]
        done += take
    values *= np.float32(op.std)
    return bytes(values.astype(DTYPES[dtype].numpy).tobytes())


def mean_row(op: MeanRows, source: TensorRef, dtype: str, read: Read) -> bytes:
    """The mean of rows ``op.rows`` of the matrix ``source``, one row of ``dtype``.

    The rule: each element is the float64 sum of the rows' elements (each exactly in float64),
    added one row after another in the order given, divided by the number of rows in float64, then
    rounded once, to nearest even, into ``dtype``. Consecutive rows are read a quarter MiB at a time.
    """
    import numpy as np

    width = numel(source.shape[1:])
    row_bytes = width * DTYPES[source.dtype].itemsize
    step = max(1, MEAN_READ_BYTES // max(row_bytes, 1))
    rows = op.rows
    total = np.zeros(width, np.float64)
    at = 0
    while at < len(rows):
        first, count = rows[at], 1
        while count < step and at + count < len(rows) and rows[at + count] == first + count:
            count += 1
        raw = read(source.path, source.data_start + first * row_bytes, count * row_bytes)
        if len(raw) != count * row_bytes:
            raise CheckpointError(f"{source.path}: ends inside {source.name!r}; the source changed while running")
        block = np.frombuffer(raw, DTYPES[source.dtype].numpy).reshape(count, width)
        for row in block:
            np.add(total, row, out=total)  # each element cast exactly to float64, then added
        at += count
    with np.errstate(all="ignore"):
        total /= np.float64(len(rows))
        return bytes(total.astype(DTYPES[dtype].numpy).tobytes())


MEAN_READ_BYTES = 256 << 10
"""Rows read at once for a mean: a quarter MiB, so memory stays flat whatever the matrix."""


def first_difference(
    tensor: PlannedTensor, read: Read, out_path: Path | str, out_offset: int, progress: Progress = _ignore
) -> int | None:
    """The first byte of the tensor at ``out_offset`` of the file at ``out_path`` that differs from
    what ``tensor`` must hold, or None."""
    done = 0
    for expected in expected_chunks(tensor, read):
        actual = read(out_path, out_offset + done, len(expected))
        if actual != expected:
            return done + _first_unequal(actual, bytes(expected))
        done += len(expected)
        progress(len(expected))
    return None if done == tensor.nbytes else done


def differing_tensors(shard: ShardLayout, read: Read, where: Path | str, *, first_only: bool) -> list[PlannedTensor]:
    """The tensors of ``shard`` whose bytes in the file at ``where`` differ from the definition (the
    header and size are the caller's to check); with ``first_only``, stops at the first."""
    differing = []
    for placed in shard.tensors:
        if first_difference(placed.tensor, read, where, placed.offset) is not None:
            differing.append(placed.tensor)
            if first_only:
                break
    return differing


def describe_expected(tensor: PlannedTensor, at: int | None = None) -> str:
    """How ``tensor``'s bytes differ from what they must be, in words; for a tensor made of pieces,
    the piece that holds byte ``at`` of it."""
    source = f"{tensor.source.name} of {tensor.source.path}" if tensor.source is not None else ""
    match tensor.op:
        case Zeros():
            return "holds other bytes than the zeros the recipe gives"
        case Copy():
            return f"differs from the source bytes ({source})"
        case Convert(scale, via):
            scaled = f" scaled by {scale:g}" if scale != 1.0 else ""
            if via is not None:
                return f"differs from {source} cast to {via}{scaled}, then to {tensor.dtype}"
            return f"differs from {source} cast to {tensor.dtype}{scaled}"
        case Normal(seed, std, stream):
            return f"differs from the numbers drawn with seed {seed} for {stream} (std {std:g})"
        case MeanRows(rows):
            return f"differs from the mean of {len(rows)} rows of {source}"
        case Pieces(parts):
            start = 0
            for number, piece in enumerate(parts, start=1):
                if at is not None and start <= at < start + piece.nbytes:
                    one = PlannedTensor(
                        tensor.name, tensor.dtype, (piece.nbytes,), piece.op, piece.source, tensor.model
                    )
                    return f"in piece {number} of {len(parts)}: {describe_expected(one)}"
                start += piece.nbytes
            return f"differs from the {len(parts)} pieces the plan makes it of"


def _first_unequal(a: bytes, b: bytes) -> int:
    """The first index where ``a`` and ``b`` differ, by bisection: a few compares in C, no loop per byte."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[lo:hi] != b[lo:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def by_definition(raw: bytes, src_dtype: str, op: Convert, dst_dtype: str) -> Any:
    """``raw`` elements of ``src_dtype`` converted as DESIGN.md defines it, as a numpy array.

    Cast to the working dtype (``op.via``, else the output dtype), rounding to nearest even; a
    16-bit target is reached through float32, so float64 rounds twice, as torch does. Then the scale:
    float64 arithmetic for F64, else ``float32(x) * float32(k)`` rounded back. Then the cast to the
    output dtype. Plain numpy and ml_dtypes on one chunk: the specification, not the fast path.
    """
    import numpy as np

    def cast(values: Any, dtype: str) -> Any:
        target = DTYPES[dtype].numpy
        if dtype in ("BF16", "F16") and values.dtype != target:
            values = values.astype(np.float32)
        return values.astype(target)

    work = op.via or dst_dtype
    with np.errstate(all="ignore"):
        values = cast(np.frombuffer(raw, DTYPES[src_dtype].numpy), work)
        if op.scale != 1.0 and work == "F64":
            values = values * np.float64(op.scale)
        elif op.scale != 1.0:
            values = (values.astype(np.float32) * np.float32(op.scale)).astype(DTYPES[work].numpy)
        return cast(values, dst_dtype) if op.via is not None else values
