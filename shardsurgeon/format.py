"""The safetensors file format: dtype table, header decoding with full validation, header encoding.

A file is an 8-byte little-endian header length N, N bytes of JSON (an object mapping tensor names
to ``{"dtype", "shape", "data_offsets"}`` plus an optional ``__metadata__`` of strings), then the
tensor data, whose offsets are relative to the end of the header. This module knows nothing about
checkpoints or layers and never reads tensor data.

Headers are untrusted: every rule the reference reader enforces is checked here, with a message that
names the file and the tensor.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon.errors import FormatError

MAX_HEADER_BYTES = 100_000_000
"""Same cap as the reference reader: a header longer than this is refused before it is read."""

HEADER_LENGTH_BYTES = 8
MAX_TENSOR_BYTES = 2**63 - 1
MAX_TENSORS = 500_000
"""Tensors in one checkpoint (DeepSeek-V3 has 92k): each costs about 0.3 kB while planned, its name
included (bench/RESULTS.md), so this bounds what a header can make the planner hold."""


@dataclass(frozen=True, slots=True)
class DType:
    """One safetensors dtype: its name in headers, its size in bits, and its numpy type if any.

    Float dtypes (``torch_name`` set) can be scaled and cast; ``cast_target`` marks the ones a
    user may cast to (``--dtype``, mergekit's ``dtype``/``out_dtype``), by their torch names.
    """

    name: str
    bits: int
    numpy_name: str | None
    torch_name: str | None = None
    aliases: tuple[str, ...] = ()
    cast_target: bool = False

    @property
    def is_float(self) -> bool:
        return self.torch_name is not None

    @property
    def itemsize(self) -> int:
        return self.bits // 8

    def nbytes(self, numel: int) -> int:
        return numel * self.bits // 8

    @property
    def numpy(self) -> Any:
        """The numpy dtype (from ml_dtypes for BF16 and FP8), or None.

        Imported on first use: numpy and ml_dtypes take over 100 ms to load, and only casts need them.
        """
        if self.numpy_name is None:
            return None
        module, _, attribute = self.numpy_name.rpartition(".")
        numpy = importlib.import_module("numpy")
        return numpy.dtype(getattr(importlib.import_module(module), attribute))


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, "numpy.bool_"),
        DType("U8", 8, "numpy.uint8"),
        DType("I8", 8, "numpy.int8"),
        DType("F8_E5M2", 8, "ml_dtypes.float8_e5m2"),
        DType("F8_E4M3", 8, "ml_dtypes.float8_e4m3fn"),
        DType("F8_E8M0", 8, "ml_dtypes.float8_e8m0fnu"),
        DType("I16", 16, "numpy.int16"),
        DType("U16", 16, "numpy.uint16"),
        DType("BF16", 16, "ml_dtypes.bfloat16", "bfloat16", ("bf16",), cast_target=True),
        DType("F16", 16, "numpy.float16", "float16", ("fp16", "half"), cast_target=True),
        DType("I32", 32, "numpy.int32"),
        DType("U32", 32, "numpy.uint32"),
        DType("F32", 32, "numpy.float32", "float32", ("fp32", "float"), cast_target=True),
        DType("F64", 64, "numpy.float64", "float64"),
        DType("I64", 64, "numpy.int64"),
        DType("U64", 64, "numpy.uint64"),
        DType("C64", 64, "numpy.complex64"),
        DType("F4", 4, None),
        DType("F6_E2M3", 6, None),
        DType("F6_E3M2", 6, None),
    )
}
"""Every dtype the reference reader knows; the float ones (BF16, F16, F32, F64) can be scaled."""

FLOAT_DTYPES = frozenset(name for name, d in DTYPES.items() if d.is_float)
CAST_TARGETS = tuple(d.torch_name for d in DTYPES.values() if d.cast_target and d.torch_name)
"""The torch names a user may cast to, as ``--dtype`` and mergekit configs spell them."""


def cast_target(name: str) -> str | None:
    """The safetensors name of a cast target given by a user (``bfloat16``, ``bf16``, ``BF16``), or None."""
    for dtype in DTYPES.values():
        if dtype.cast_target and name in (dtype.name, dtype.torch_name, *dtype.aliases):
            return dtype.name
    return None


def torch_name(dtype: str) -> str:
    """The torch name of a float dtype, as config.json and mergekit configs spell it."""
    name = DTYPES[dtype].torch_name
    if name is None:
        raise ValueError(f"{dtype} is not a float dtype")
    return name


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    """One tensor as a header describes it; offsets are relative to the start of the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded, validated header. ``tensors`` are in data order; ``data_start`` is absolute."""

    metadata: dict[str, str] | None
    tensors: tuple[HeaderEntry, ...]
    data_start: int
    data_nbytes: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one source tensor's bytes live: ``data_start`` is an absolute offset in ``path``, a local
    file or (a ``str``) the URL of a remote one."""

    name: str
    path: Path | str
    dtype: str
    shape: tuple[int, ...]
    data_start: int
    nbytes: int


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor; raises ValueError when the element count does not fill whole bytes."""
    bits = DTYPES[dtype].bits * numel(shape)
    if bits % 8:
        raise ValueError(f"{numel(shape)} elements of {dtype} do not fill whole bytes")
    return bits // 8


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int]],
    metadata: Mapping[str, str] | None,
    *,
    data_start: int | None = None,
) -> bytes:
    """Encode a header for tensors given as ``(name, dtype, shape, nbytes)`` in data order.

    Returns the 8-byte length followed by compact JSON padded with spaces so that the data starts
    at a multiple of 8, exactly as the reference writer lays it out; or, given ``data_start`` (a
    multiple of 8, at least that), with as many more spaces as make the data start there. Readers
    skip trailing spaces as JSON whitespace, so the extra padding is free placement.
    """
    # json.dumps of the header as a dict of dicts, written entry by entry: the dict of a shard of
    # thousands of tensors would cost a hundred times its text
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False))
    offset = 0
    for name, dtype, shape, nbytes in entries:
        dims = ",".join(map(str, shape))
        parts.append(
            f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":{json.dumps(dtype)},"shape":[{dims}],'
            f'"data_offsets":[{offset},{offset + nbytes}]}}'
        )
        offset += nbytes
    text = ("{" + ",".join(parts) + "}").encode()
    minimal = HEADER_LENGTH_BYTES + len(text) + (-len(text) % 8)
    return padded_header(struct.pack("<Q", len(text)) + text, minimal if data_start is None else data_start)


def padded_header(header: bytes, data_start: int) -> bytes:
    """``header`` (as :func:`encode_header` makes it) with spaces added so that the data starts at
    ``data_start``, a multiple of 8 at least as far as the header's JSON needs."""
    text = header[HEADER_LENGTH_BYTES:].rstrip(b" ")
    minimal = HEADER_LENGTH_BYTES + len(text) + (-len(text) % 8)
    if data_start < minimal or data_start % 8:
        raise ValueError(f"data start {data_start}: must be a multiple of 8 and at least {minimal}")
    text += b" " * (data_start - HEADER_LENGTH_BYTES - len(text))
    return struct.pack("<Q", len(text)) + text


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    try:
        # non-blocking: a FIFO in place of a shard must be refused, not waited on
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        with open(os.open(path, flags), "rb") as f:
            status = os.fstat(f.fileno())
            if stat.S_ISDIR(status.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(status.st_mode):
                raise FormatError(
                    f"{path}: is not a regular file (a FIFO, device or socket); expected a safetensors file"
                )
            file_nbytes = status.st_size
            if file_nbytes < HEADER_LENGTH_BYTES:
                raise FormatError(
                    f"{path}: file is {file_nbytes} bytes, too short for a safetensors header "
                    "(needs at least 8); the file is truncated or not a safetensors file"
                )
            (header_nbytes,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
            if header_nbytes > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length field says {header_nbytes} bytes, more than the "
                    f"{MAX_HEADER_BYTES} allowed; the file is corrupt or not a safetensors file"
                )
            if HEADER_LENGTH_BYTES + header_nbytes > file_nbytes:
                raise FormatError(
                    f"{path}: header length field says {header_nbytes} bytes but the file has only "
                    f"{file_nbytes - HEADER_LENGTH_BYTES} after it; the file is truncated"
                )
            raw = f.read(header_nbytes)
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return decode_header(raw, file_nbytes, str(path))


def decode_header(raw: bytes, file_nbytes: int, where: str) -> Header:
    """Validate header bytes ``raw`` of a file of ``file_nbytes`` bytes; ``where`` names the file."""
    data_start = HEADER_LENGTH_BYTES + len(raw)
    data_nbytes = file_nbytes - data_start
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{where}: header repeats the key {e.args[0]!r}; the file is corrupt") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: header is not valid UTF-8 JSON ({e}); the file is corrupt") from None
    if not isinstance(parsed, dict):
        raise FormatError(f"{where}: header must be a JSON object, found {type(parsed).__name__}; the file is corrupt")
    if len(parsed) > MAX_TENSORS:
        raise FormatError(f"{where}: header lists {len(parsed)} tensors, more than the {MAX_TENSORS} supported")
    metadata = _decode_metadata(parsed.pop("__metadata__", None), where)
    entries = sorted(
        (_decode_entry(name, value, where) for name, value in parsed.items()),
        key=lambda e: (e.begin, e.end),
    )
    expected_begin = 0
    for entry in entries:
        if entry.begin != expected_begin:
            problem = "overlaps the previous tensor" if entry.begin < expected_begin else "leaves a gap"
            raise FormatError(
                f"{where}: tensor {entry.name!r} starts at data offset {entry.begin}, expected "
                f"{expected_begin} ({problem}); the file is corrupt"
            )
        expected_begin = entry.end
    if expected_begin != data_nbytes:
        problem = "runs past the end of the file" if expected_begin > data_nbytes else "leaves trailing bytes"
        raise FormatError(
            f"{where}: tensors cover {expected_begin} data bytes but the file holds {data_nbytes} "
            f"after the header ({problem}); the file is truncated or corrupt"
        )
    return Header(metadata, tuple(entries), data_start, data_nbytes)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _decode_metadata(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(
            f"{where}: __metadata__ must map strings to strings, found {json.dumps(value)[:80]}; the file is corrupt"
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_entry(name: str, value: Any, where: str) -> HeaderEntry:
    def fail(what: str) -> FormatError:
        return FormatError(f"{where}: tensor {name!r}: {what}; the file is corrupt")

    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("the name is not valid Unicode (it holds a lone surrogate escape)") from None
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise fail(f"expected an object with dtype, shape and data_offsets, found {found}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise fail(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"shape must be a list of non-negative integers, found {json.dumps(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o <= MAX_TENSOR_BYTES for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise fail(f"data_offsets must be [begin, end] with 0 <= begin <= end, found {json.dumps(offsets)}")
    bits = numel(tuple(shape)) * DTYPES[dtype].bits
    if bits > MAX_TENSOR_BYTES * 8:
        raise fail(f"shape {shape} overflows: {bits // 8} bytes is more than a file can hold")
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise fail(
            f"shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}"
        )
    return HeaderEntry(name, _DTYPE_NAMES[dtype], _shared_shape(tuple(shape)), offsets[0], offsets[1])


_DTYPE_NAMES = {name: name for name in DTYPES}
"""Each dtype's one string: a header's 100,000 entries share it instead of holding a copy each."""
_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _shared_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One tuple per distinct shape (a model has a few dozen), bounded whatever a header holds."""
    if len(_SHAPES) > 4096:
        _SHAPES.clear()
    return _SHAPES.setdefault(shape, shape)
