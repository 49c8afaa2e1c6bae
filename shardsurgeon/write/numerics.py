"""Cast and scale float tensors chunk by chunk, bit for bit as mergekit (torch on CPU) does.

This module owns the numerics of the ``scale`` and ``cast`` operations (DESIGN.md, "Operations on
a tensor") among the safetensors float dtypes BF16, F16, F32 and F64:

- the cast comes first and rounds to nearest even (F64 to BF16 or F16 goes through F32, as torch
  does: two roundings);
- a scale k (k != 1) then multiplies in float32 for BF16, F16 and F32, ``float32(x) * float32(k)``
  rounded to nearest even back into the dtype, and in float64 for F64. k == 1 multiplies nothing.

NaN: a NaN stays a quiet NaN with its sign (through the cast and through a multiply, whatever the
sign of k, as the x86 multiply does); the payload is not kept. Torch keeps the sign too except when
it rounds to BF16, where its vectorised path writes 0xFFFF and its scalar path 0x7FC0; we write
0x7FC0 or 0xFFC0 after the sign of the NaN.

``reference`` is the plain, slow definition (numpy and ml_dtypes on whole arrays).
``ChunkConverter`` streams: buffers allocated once at construction (the output of one chunk plus
scratch for one cache-sized block: about 1.5 MiB for BF16 -> F16, at most ~4.5 MiB for F64 output),
every step a numpy ufunc with ``out=``, so converting a chunk allocates nothing:

- any 16-bit to 16-bit conversion (BF16 <-> F16, BF16 or F16 scale, both at once) and F16 -> F32 is
  a lookup table over the 65536 source bit patterns, computed once per (source, target, scale) with
  ``reference`` (128 or 256 KiB, cached, shared) and applied with ``np.take`` in a single pass;
- F32 -> BF16 rounds at the bit level, ``(bits + 0x7FFF + lsb) >> 16``; F32 -> F16 likewise, with
  a float32 ``+ 0.5`` that rounds the F16-subnormal range; a scale then goes through the table of the
  16-bit target (cast first, then scale, as mergekit does);
- BF16 -> F32 shifts the bits; F32 and F64 results multiply in place.

A block holding a NaN goes through ``reference`` (the integer rounding could carry a NaN into inf),
so the fast paths only see values they are exact for. A converter is not thread-safe; tables are
read-only. Pure: no files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from shardsurgeon.format import DTYPES, FLOAT_DTYPES

CHUNK_ELEMENTS = 1 << 19
"""Elements per chunk handed to ``convert``: 512 Ki, so 1-4 MiB of source bytes per read."""

BLOCK_ELEMENTS = 1 << 15
"""Elements per inner block: a block's scratch (<= 0.5 MiB) and a table stay in a 2 MiB L2 cache.

32 Ki and 64 Ki elements measure the same; 16 Ki pays more per-call overhead, 128 Ki spills."""

_NUMPY: dict[str, np.dtype] = {name: DTYPES[name].numpy for name in FLOAT_DTYPES}
_ITEMSIZE = {name: DTYPES[name].itemsize for name in FLOAT_DTYPES}
_BITS: dict[str, np.dtype] = {name: np.dtype(f"<u{size}") for name, size in _ITEMSIZE.items()}
"""Unsigned integers of each float dtype's width: the kernels work on bit patterns."""

# The clip ufunc itself: np.clip adds ~5 us of Python checks per call, more than the work on a block.
_clip: Callable[..., np.ndarray] = getattr(getattr(np, "_core", np).umath, "clip", np.clip)


def _u16(value: int) -> np.ndarray:
    return np.array(value, np.uint16)


def _u32(value: int) -> np.ndarray:
    return np.array(value, np.uint32)


# 0-d constants: a ufunc call with a 0-d array operand costs half as much as with a Python int.
_U16_SIGN = _u16(0x8000)
_U32_ONE, _U32_ROUND, _U32_ABS = _u32(1), _u32(0x7FFF), _u32(0x7FFFFFFF)
_U32_THIRTEEN, _U32_SIXTEEN = _u32(13), _u32(16)
_U32_F16_LO, _U32_F16_HI = _u32(0x38000000), _u32(0x47800000)  # 2**-15 and 65536
_U32_F16_SUB_LO, _U32_F16_SUB_HI = _u32(0x30000000), _u32(0x38800000)  # 2**-31 and 2**-14
_U32_F16_ROUND = _u32((0xFFF - 0x38000000) % (1 << 32))
_F32_HALF = np.array(0.5, np.float32)


def reference(raw: np.ndarray, src_dtype: str, dst_dtype: str, scale: float) -> np.ndarray:
    """The definition: convert the elements of ``raw`` (any array over the source bytes).

    Returns a new array of ``dst_dtype`` elements (ml_dtypes.bfloat16 for BF16). Slow and allocating:
    used for lookup tables, for blocks holding NaN, and as the specification the fast paths match.
    """
    x = np.ascontiguousarray(raw).view(_NUMPY[src_dtype])
    with np.errstate(all="ignore"):
        if dst_dtype in ("BF16", "F16") and src_dtype != dst_dtype:
            x = x.astype(np.float32).astype(_NUMPY[dst_dtype])  # F64 rounds twice, as in torch
        else:
            x = x.astype(_NUMPY[dst_dtype])
        if scale == 1.0:
            return x
        if dst_dtype == "F64":
            return x * np.float64(scale)
        product = x.astype(np.float32) * np.float32(scale)
        return product.astype(_NUMPY[dst_dtype])


def _table(src_dtype: str, dst_dtype: str, scale: float) -> np.ndarray:
    """Output bit patterns for the 65536 patterns of a 16-bit source dtype, read-only and shared."""
    return _cached_table(src_dtype, dst_dtype, float(scale).hex())  # hex: -0.0 and 0.0 differ


@functools.lru_cache(maxsize=16)
def _cached_table(src_dtype: str, dst_dtype: str, scale_hex: str) -> np.ndarray:
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    table = reference(patterns, src_dtype, dst_dtype, float.fromhex(scale_hex)).view(_BITS[dst_dtype])
    table.flags.writeable = False
    return table


class ChunkConverter:
    """Converts chunks of ``src_dtype`` bytes to ``dst_dtype`` bytes, scaled by ``scale``.

    ``convert`` takes at most ``chunk_src_bytes`` bytes and returns a view of a buffer owned by the
    converter, valid until the next call. Memory is fixed at construction (``nbytes``): the output
    buffer of one chunk plus scratch for one block, and a shared lookup table on the table paths.
    """

    def __init__(
        self,
        src_dtype: str,
        dst_dtype: str,
        scale: float,
        chunk_elements: int = CHUNK_ELEMENTS,
        block_elements: int = BLOCK_ELEMENTS,
    ) -> None:
        if src_dtype not in FLOAT_DTYPES or dst_dtype not in FLOAT_DTYPES:
            raise ValueError(f"cannot convert {src_dtype} to {dst_dtype}: only {sorted(FLOAT_DTYPES)}")
        if chunk_elements < 1 or block_elements < 1:
            raise ValueError("chunk_elements and block_elements must be positive")
        if not np.isfinite(scale):
            raise ValueError(f"scale must be finite, not {scale}")
        self.src_dtype, self.dst_dtype, self.scale = src_dtype, dst_dtype, float(scale)
        self.src_itemsize, self.dst_itemsize = _ITEMSIZE[src_dtype], _ITEMSIZE[dst_dtype]
        self.chunk_elements = chunk_elements
        self.block_elements = min(block_elements, chunk_elements)
        self._out = np.empty(chunk_elements * self.dst_itemsize, np.uint8)
        self._k32 = np.array(self.scale, np.float32)
        self._k64 = np.array(self.scale, np.float64)
        self._scratch: dict[str, np.ndarray] = {}
        self._table: np.ndarray | None = None
        self._kernel = self._choose_kernel()
        self.convert(bytes(self.block_elements * self.src_itemsize))  # allocates the scratch, once

    @property
    def chunk_src_bytes(self) -> int:
        return self.chunk_elements * self.src_itemsize

    @property
    def nbytes(self) -> int:
        """Bytes held by this converter's buffers (a lookup table, shared between converters, counts)."""
        held = self._out.nbytes + sum(buffer.nbytes for buffer in self._scratch.values())
        return held + (self._table.nbytes if self._table is not None else 0)

    def convert(self, src: memoryview | bytes | bytearray) -> memoryview:
        """Convert ``src`` (a whole number of source elements, at most one chunk); returns a view."""
        nbytes = memoryview(src).nbytes
        count, rest = divmod(nbytes, self.src_itemsize)
        if rest or count > self.chunk_elements:
            raise ValueError(
                f"{nbytes} bytes is not a whole number of {self.src_dtype} elements up to {self.chunk_elements}"
            )
        values = np.frombuffer(src, _BITS[self.src_dtype], count)
        out = self._out[: count * self.dst_itemsize].view(_BITS[self.dst_dtype])
        block = self.block_elements
        with np.errstate(all="ignore"):
            for start in range(0, count, block):
                self._kernel(values[start : start + block], out[start : start + block])
        return memoryview(self._out.data)[: count * self.dst_itemsize]

    # -- kernel selection -------------------------------------------------------------------------

    def _choose_kernel(self) -> Callable[[np.ndarray, np.ndarray], None]:
        src, dst, scaled = self.src_dtype, self.dst_dtype, self.scale != 1.0
        if src == dst and not scaled:
            return _copy
        if src in ("BF16", "F16") and (dst in ("BF16", "F16") or (src, dst) == ("F16", "F32")):
            self._table = _table(src, dst, self.scale)
            return self._lookup
        if src == "F16" and dst == "F64":
            self._table = _table("F16", "F32", 1.0)  # F16 -> float32 bits, then float64
        elif dst in ("BF16", "F16") and scaled:
            self._table = _table(dst, dst, self.scale)  # cast first, then scale the rounded values
        if dst == "F64":
            return self._to_f64
        if dst == "F32":
            return self._to_f32
        return self._to_bf16 if dst == "BF16" else self._to_f16

    # -- kernels: (source bits of one block, output bits of the same block) -----------------------

    def _scratch_for(self, name: str, dtype: type[np.generic] | np.dtype, count: int) -> np.ndarray:
        """Block-sized scratch buffer ``name`` (made on first use: the warm-up in ``__init__``)."""
        buffer = self._scratch.get(name)
        if buffer is None:
            buffer = self._scratch[name] = np.empty(self.block_elements, dtype)
        return buffer if count == len(buffer) else buffer[:count]

    def _slow(self, raw: np.ndarray, out: np.ndarray) -> None:
        out[...] = reference(raw, self.src_dtype, self.dst_dtype, self.scale).view(out.dtype)

    def _lookup(self, raw: np.ndarray, out: np.ndarray) -> None:
        """out = table[raw]: np.take wants intp indices, converted into a reused buffer."""
        assert self._table is not None
        index = self._scratch_for("index", np.intp, len(raw))
        np.copyto(index, raw)
        np.take(self._table, index, out=out, mode="wrap")  # "wrap" skips the bounds check of "raise"

    def _load_f32(self, raw: np.ndarray, wide: np.ndarray) -> None:
        """Source bits (BF16, F16 or F64) -> float32 bits; F64 rounds to nearest even."""
        if self.src_dtype == "BF16":
            np.copyto(wide, raw)
            np.left_shift(wide, _U32_SIXTEEN, out=wide)
        elif self.src_dtype == "F16":
            self._lookup(raw, wide)  # the F16 -> F32 table
        else:
            np.copyto(wide.view(np.float32), raw.view(np.float64), casting="same_kind")

    def _to_f32(self, raw: np.ndarray, out: np.ndarray) -> None:
        values = out.view(np.float32)
        if self.src_dtype == "F32":
            np.multiply(raw.view(np.float32), self._k32, out=values)  # F32 -> F32 is a scale
            return
        if self.src_dtype == "F64":
            np.copyto(values, raw.view(np.float64), casting="same_kind")
        else:
            self._load_f32(raw, out)  # BF16: exact; F16 goes through _lookup
        if self.scale != 1.0:
            np.multiply(values, self._k32, out=values)

    def _to_f64(self, raw: np.ndarray, out: np.ndarray) -> None:
        values = out.view(np.float64)
        if self.src_dtype == "F64":
            np.multiply(raw.view(np.float64), self._k64, out=values)  # F64 -> F64 is a scale
            return
        if self.src_dtype == "F32":
            np.copyto(values, raw.view(np.float32))
        else:
            wide = self._scratch_for("a32", np.uint32, len(raw))
            self._load_f32(raw, wide)
            np.copyto(values, wide.view(np.float32))
        if self.scale != 1.0:
            np.multiply(values, self._k64, out=values)

    def _as_f32_bits(self, raw: np.ndarray) -> np.ndarray:
        if self.src_dtype == "F32":
            return raw
        wide = self._scratch_for("a32", np.uint32, len(raw))
        self._load_f32(raw, wide)
        return wide

    def _to_bf16(self, raw: np.ndarray, out: np.ndarray) -> None:
        """F32 or F64 -> BF16 (F64 rounds to float32 first, as torch does), then the scale table."""
        if not self._round_to_bf16(self._as_f32_bits(raw), out):
            self._slow(raw, out)
        elif self._table is not None:
            self._lookup(out, out)

    def _round_to_bf16(self, bits: np.ndarray, out: np.ndarray) -> bool:
        """float32 bits -> BF16 bits, nearest even: (bits + 0x7FFF + lsb) >> 16. False if a NaN is present."""
        if np.isnan(np.maximum.reduce(bits.view(np.float32))):
            return False  # the integer rounding could carry a NaN into inf; reference() handles it
        rounded = self._scratch_for("b32", np.uint32, len(bits))
        np.right_shift(bits, _U32_SIXTEEN, out=rounded)
        np.bitwise_and(rounded, _U32_ONE, out=rounded)
        np.add(rounded, bits, out=rounded)
        np.add(rounded, _U32_ROUND, out=rounded)
        np.right_shift(rounded, _U32_SIXTEEN, out=rounded)
        np.copyto(out, rounded, casting="unsafe")
        return True

    def _to_f16(self, raw: np.ndarray, out: np.ndarray) -> None:
        """F32 or F64 -> F16 (F64 rounds to float32 first, as torch does), then the scale table."""
        bits = self._as_f32_bits(raw)
        if not self._round_to_f16(bits, out):
            self._slow(raw, out)
        elif self._table is not None:
            self._lookup(out, out)

    def _round_to_f16(self, bits: np.ndarray, out: np.ndarray) -> bool:
        """float32 bits -> F16 bits, nearest even, inf past 65520. False if a NaN is present.

        Normal range: ((|bits| - (112 << 23) + 0xFFF + lsb) >> 13), with |bits| clipped to [2**-15, 65536];
        subnormal range: |x| clipped to [2**-31, 2**-14], plus 0.5 in float32, whose low 16 bits are then
        |x| / 2**-24 rounded to nearest even. Each part is at most the other outside its own range, so
        the larger of the two is the answer; the sign goes back on last.
        """
        count = len(bits)
        if np.isnan(np.maximum.reduce(bits.view(np.float32))):
            return False
        magnitude = self._scratch_for("b32", np.uint32, count)
        normal = self._scratch_for("c32", np.uint32, count)
        lsb = self._scratch_for("d32", np.uint32, count)
        small = self._scratch_for("a16", np.uint16, count)
        np.bitwise_and(bits, _U32_ABS, out=magnitude)
        _clip(magnitude, _U32_F16_LO, _U32_F16_HI, out=normal)
        np.right_shift(normal, _U32_THIRTEEN, out=lsb)
        np.bitwise_and(lsb, _U32_ONE, out=lsb)
        np.add(normal, lsb, out=normal)
        np.add(normal, _U32_F16_ROUND, out=normal)  # wraps: adds 0xFFF and takes 112 << 23 off
        np.right_shift(normal, _U32_THIRTEEN, out=normal)
        np.copyto(out, normal, casting="unsafe")
        _clip(magnitude, _U32_F16_SUB_LO, _U32_F16_SUB_HI, out=magnitude)
        np.add(magnitude.view(np.float32), _F32_HALF, out=magnitude.view(np.float32))
        np.copyto(small, magnitude, casting="unsafe")
        np.maximum(out, small, out=out)
        np.right_shift(bits, _U32_SIXTEEN, out=lsb)
        np.copyto(small, lsb, casting="unsafe")
        np.bitwise_and(small, _U16_SIGN, out=small)
        np.bitwise_or(out, small, out=out)
        return True


def _copy(raw: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, raw)
