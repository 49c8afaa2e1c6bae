"""Cast and scale float tensors chunk by chunk, with the same rounding as mergekit (torch).

Casts round to nearest even. A scale k is applied after the cast: for BF16 and F16 as
``round(float32(x) * float32(k))`` back into the dtype, for F32 in float32, for F64 in float64.
BF16 is handled at the bit level through uint16/uint32 views, which is several times faster than
numpy's generic ``astype`` through ml_dtypes. Buffers are allocated once per converter and reused,
so memory stays at a few chunk sizes whatever the tensor size. Pure: no files.
"""

from __future__ import annotations

import numpy as np

CHUNK_ELEMENTS = 1 << 19
"""Elements per chunk: 512 Ki, so 1-4 MiB per buffer."""

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
FLOAT_DTYPES = frozenset(_ITEMSIZE)


class ChunkConverter:
    """Converts chunks of ``src_dtype`` bytes to ``dst_dtype`` bytes, scaled by ``scale``."""

    def __init__(self, src_dtype: str, dst_dtype: str, scale: float, chunk_elements: int = CHUNK_ELEMENTS):
        if src_dtype not in FLOAT_DTYPES or dst_dtype not in FLOAT_DTYPES:
            raise ValueError(f"cannot convert {src_dtype} to {dst_dtype}: only {sorted(FLOAT_DTYPES)}")
        self.src_dtype, self.dst_dtype, self.scale = src_dtype, dst_dtype, scale
        self.src_itemsize, self.dst_itemsize = _ITEMSIZE[src_dtype], _ITEMSIZE[dst_dtype]
        self.chunk_elements = chunk_elements
        wide = np.float64 if "F64" in (src_dtype, dst_dtype) else np.float32
        self._wide = np.empty(chunk_elements, wide)
        self._bits = np.empty(chunk_elements, np.uint32)
        self._out = np.empty(chunk_elements * self.dst_itemsize, np.uint8)

    @property
    def chunk_src_bytes(self) -> int:
        return self.chunk_elements * self.src_itemsize

    def convert(self, src: memoryview) -> memoryview:
        """Convert ``src`` (a whole number of source elements, at most one chunk); returns a view."""
        count = len(src) // self.src_itemsize
        wide = self._wide[:count]
        self._load(np.frombuffer(src, np.uint8, count * self.src_itemsize), wide)
        if self.scale != 1.0:
            if self.dst_dtype != self.src_dtype:
                self._store(wide, count)  # mergekit casts first: round to the new dtype, then scale
                self._load(self._out[: count * self.dst_itemsize], wide, self.dst_dtype)
            # float32(k) unless the result is F64; a product of two float32 values is exact in float64
            factor = np.float64(self.scale) if self.dst_dtype == "F64" else np.float32(self.scale)
            wide *= wide.dtype.type(factor)
        self._store(wide, count)
        return memoryview(self._out)[: count * self.dst_itemsize]

    def _load(self, raw: np.ndarray, wide: np.ndarray, dtype: str | None = None) -> None:
        dtype = dtype or self.src_dtype
        if dtype == "BF16":
            bits = self._bits[: len(wide)]
            np.copyto(bits, raw.view(np.uint16), casting="safe")
            bits <<= 16
            np.copyto(wide, bits.view(np.float32), casting="same_kind")
        else:
            np.copyto(wide, raw.view(_NUMPY[dtype]), casting="unsafe")

    def _store(self, wide: np.ndarray, count: int) -> None:
        out = self._out[: count * self.dst_itemsize]
        if self.dst_dtype == "BF16":
            narrow = wide.astype(np.float32) if wide.dtype == np.float64 else wide
            _round_to_bf16(narrow.view(np.uint32), self._bits[:count], out.view(np.uint16))
        else:
            np.copyto(out.view(_NUMPY[self.dst_dtype]), wide, casting="unsafe")


_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _round_to_bf16(f32_bits: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """Round float32 bit patterns to bfloat16, nearest even; NaNs stay NaN with their sign."""
    np.right_shift(f32_bits, 16, out=scratch)
    scratch &= 1
    scratch += 0x7FFF
    scratch += f32_bits
    scratch >>= 16
    np.copyto(out, scratch, casting="unsafe")
    nan = (f32_bits & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        out[nan] = (f32_bits[nan] >> 16).astype(np.uint16) | 0x0040
