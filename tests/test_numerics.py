"""ChunkConverter numerics: bit for bit against torch (what mergekit runs) and against ml_dtypes.

Every (source, target) pair of BF16, F16, F32, F64 with every scale in SCALES is checked on inputs that
cover all 65536 BF16/F16 bit patterns, random float32/float64 values and bit patterns, rounding ties,
values around each overflow threshold, subnormals, +-0, +-inf and NaNs. Expected values come from:

- torch 2.13.0, ``x.to(dst) * k`` on CPU (skipped without torch);
- ml_dtypes/numpy in float32, written out below without using shardsurgeon's code;
- a few values worked out by hand.

NaN policy (numerics.py): a NaN gives a NaN of the same sign. Torch keeps the sign too, except when it
rounds to BF16 (its vectorised loop writes 0xFFFF whatever the sign), so against torch the sign is
compared for every target but BF16, where it is compared with the source NaN instead.
"""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from shardsurgeon import FLOAT_DTYPES, Convert, by_definition
from shardsurgeon.write.numerics import CHUNK_ELEMENTS, ChunkConverter

DTYPES = ("BF16", "F16", "F32", "F64")
SCALES = (1.0, 0.7, 1e-3, -2.5, 3.0)
BITS = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}
SIGN = {"BF16": 1 << 15, "F16": 1 << 15, "F32": 1 << 31, "F64": 1 << 63}
NUMPY = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
CASES = [(src, dst, k) for src in DTYPES for dst in DTYPES for k in SCALES]


def _ids(case: tuple[str, str, float]) -> str:
    src, dst, k = case
    return f"{src}-{dst}-x{k}"


# -- inputs ---------------------------------------------------------------------------------------


def _f32_inputs() -> np.ndarray:
    rng = np.random.default_rng(32)
    every16 = np.arange(1 << 16, dtype=np.uint32)
    bf16_exact = every16 << 16
    f16_exact = every16.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    normal_f16 = f16_exact[(f16_exact & 0x7F800000) != 0x7F800000]
    ties = [
        bf16_exact | 0x8000,  # exactly halfway between two BF16 values, odd and even
        bf16_exact | 0x8001,
        bf16_exact | 0x7FFF,
        bf16_exact | rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint32),
        normal_f16 | 0x1000,  # halfway between two F16 values (normal range)
        normal_f16 | 0x0FFF,
        normal_f16 ^ rng.integers(0, 1 << 13, len(normal_f16), dtype=np.uint32),
    ]
    subnormal_ties = ((np.arange(2048, dtype=np.float32) + 0.5) * np.float32(2.0**-24)).view(np.uint32)
    edges = np.array(
        [65504, 65519, 65519.99, 65520, 65520.01, 65535, 65536, 2.0**-14, 2.0**-15, 2.0**-24, 2.0**-25, 3e-8],
        np.float32,
    ).view(np.uint32)
    specials = np.array(
        [0, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
         0x7F7F0000, 0x00000001, 0x007FFFFF, 0x00800000, 0x00010000, 0x00008000, 0x3F800000],
        np.uint32,
    )  # fmt: skip
    magnitudes = rng.standard_normal(80_000).astype(np.float32) * np.float32(10.0) ** rng.uniform(-45, 39, 80_000)
    parts = [
        bf16_exact,
        f16_exact,
        *ties,
        subnormal_ties,
        edges,
        specials,
        rng.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32),
        magnitudes.astype(np.float32).view(np.uint32),
        (rng.standard_normal(100_000, dtype=np.float32) * np.float32(0.02)).view(np.uint32),
    ]
    positive = np.concatenate(parts)
    return np.concatenate([positive, positive | np.uint32(1 << 31)])


def _f64_inputs() -> np.ndarray:
    rng = np.random.default_rng(64)
    f32 = _f32_inputs()[::3].view(np.float32)
    with np.errstate(all="ignore"):
        exact = f32.astype(np.float64)
        nudged = [exact * (1 + 2.0**-40), exact * (1 - 2.0**-40), exact * (1 + 2.0**-30)]  # double rounding
    halfway_bf16 = (np.arange(1 << 15, dtype=np.uint64) << np.uint64(48)) | np.uint64(1 << 47)
    halfway_f16 = ((np.arange(1 << 15, dtype=np.uint32).astype(np.uint16).view(np.float16)).astype(np.float64)).view(
        np.uint64
    ) | np.uint64(1 << 41)
    edges = np.array(
        [3.4028234663852886e38, 3.4028235677973366e38, 3.5e38, 1e300, 1e-46, 7e-46, 1.5e-45, 2.0**-149 * 0.75,
         1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-8 + 2.0**-40, 65520.0 - 2.0**-30, 65520.0, 5e-324, 0.0, np.inf],
        np.float64,
    ).view(np.uint64)  # fmt: skip
    specials = np.array([0x7FF8000000000000, 0x7FF0000000000001, 0x7FFFFFFFFFFFFFFF], np.uint64)
    parts = [
        *(part.view(np.uint64) for part in nudged),
        exact.view(np.uint64),
        halfway_bf16[(halfway_bf16 >> np.uint64(52)) != 0x7FF],
        halfway_f16,
        edges,
        specials,
        rng.integers(0, 1 << 63, 60_000, dtype=np.uint64),
        (rng.standard_normal(60_000) * 10.0 ** rng.uniform(-330, 310, 60_000)).view(np.uint64),
    ]
    positive = np.concatenate(parts) & np.uint64((1 << 63) - 1)
    return np.concatenate([positive, positive | np.uint64(1 << 63)])


_INPUT_CACHE: dict[str, np.ndarray] = {}


def inputs(dtype: str) -> np.ndarray:
    """Source bit patterns for ``dtype``: every pattern for 16-bit types, a broad sample for wider ones."""
    if dtype not in _INPUT_CACHE:
        if dtype in ("BF16", "F16"):
            _INPUT_CACHE[dtype] = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        else:
            with np.errstate(all="ignore"):  # overflow to inf and signalling NaNs are intended
                raw = _f32_inputs() if dtype == "F32" else _f64_inputs()
                nan = np.isnan(raw.view(NUMPY[dtype]))
            # NaNs last: a block holding a NaN goes through the slow path, the others through the fast one.
            _INPUT_CACHE[dtype] = np.concatenate([raw[~nan], raw[nan]])
    return _INPUT_CACHE[dtype]


def convert_all(raw: np.ndarray, src: str, dst: str, k: float, **sizes: int) -> np.ndarray:
    """Stream ``raw`` through one ChunkConverter, chunk by chunk as execute.py does; output bits."""
    converter = ChunkConverter(src, dst, k, **sizes)
    data = memoryview(raw.tobytes())
    step = converter.chunk_src_bytes
    out = bytearray()
    for start in range(0, len(data), step):
        out += converter.convert(data[start : start + step])
    return np.frombuffer(bytes(out), BITS[dst])


def assert_same_bits(got: np.ndarray, want: np.ndarray, dst: str, nan_sign: np.ndarray | None = None) -> None:
    """Equal bit patterns, except that any NaN matches any NaN of the right sign.

    ``nan_sign``: the sign bits NaNs must have (default: those of ``want``).
    """
    assert got.shape == want.shape
    with np.errstate(invalid="ignore"):  # isnan of a signalling NaN raises the invalid flag
        got_nan, want_nan = np.isnan(got.view(NUMPY[dst])), np.isnan(want.view(NUMPY[dst]))
    np.testing.assert_array_equal(got_nan, want_nan, err_msg="NaN positions differ")
    sign = BITS[dst](SIGN[dst])
    expected_sign = (want if nan_sign is None else nan_sign) & sign
    np.testing.assert_array_equal(got[got_nan] & sign, expected_sign[got_nan], err_msg="NaN signs differ")
    bad = np.flatnonzero((got != want) & ~got_nan)
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[:5]}: got {got[bad[:5]]}, want {want[bad[:5]]}"


def source_nan_sign(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Sign bit of each source value, moved to the position of ``dst``'s sign bit."""
    negative = (raw & BITS[src](SIGN[src])) != 0
    return np.where(negative, BITS[dst](SIGN[dst]), BITS[dst](0)).astype(BITS[dst])


# -- against torch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_result(torch, raw: np.ndarray, src: str, dst: str, k: float) -> np.ndarray:
    """``x.to(dst) * k`` on CPU, as bits: what mergekit computes."""
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    bits = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32, "F64": torch.int64}
    x = torch.from_numpy(raw.view({2: np.int16, 4: np.int32, 8: np.int64}[raw.itemsize]).copy())
    y = x.view(dtypes[src]).to(dtypes[dst])
    return (y * k if k != 1.0 else y).view(bits[dst]).numpy().view(BITS[dst])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_torch(torch, case: tuple[str, str, float]) -> None:
    """``x.to(dst) * k`` is what mergekit computes; we must give the same bits."""
    src, dst, k = case
    raw = inputs(src)
    want = torch_result(torch, raw, src, dst, k)
    got = convert_all(raw, src, dst, k)
    assert_same_bits(got, want, dst, nan_sign=source_nan_sign(raw, src, dst) if dst == "BF16" else None)


# -- against ml_dtypes, without torch -------------------------------------------------------------


def ml_dtypes_expected(raw: np.ndarray, src: str, dst: str, k: float) -> np.ndarray:
    """The numerics spelled out with ml_dtypes: cast (via float32 into 16-bit types), then scale."""
    x = raw.view(NUMPY[src])
    with np.errstate(all="ignore"):
        if dst in ("BF16", "F16"):
            y = x.astype(np.float32).astype(NUMPY[dst])
            if k != 1.0:
                y = (y.astype(np.float32) * np.float32(k)).astype(NUMPY[dst])
        elif dst == "F32":
            y = x.astype(np.float32) * np.float32(k) if k != 1.0 else x.astype(np.float32)
        else:
            y = x.astype(np.float64) * np.float64(k) if k != 1.0 else x.astype(np.float64)
    return np.ascontiguousarray(y).view(BITS[dst])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_ml_dtypes(case: tuple[str, str, float]) -> None:
    src, dst, k = case
    raw = inputs(src)
    got = convert_all(raw, src, dst, k)
    assert_same_bits(got, ml_dtypes_expected(raw, src, dst, k), dst, nan_sign=source_nan_sign(raw, src, dst))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_verifiers_definition_matches_torch(torch, case: tuple[str, str, float]) -> None:
    """``verify --src`` recomputes conversions with its own plain arithmetic, not with ChunkConverter;
    that definition must give torch's bits too, or verify would flag correct outputs."""
    src, dst, k = case
    raw = inputs(src)
    want = torch_result(torch, raw, src, dst, k)
    got = np.ascontiguousarray(by_definition(raw.tobytes(), src, Convert(k), dst)).view(BITS[dst])
    assert_same_bits(got, want, dst, nan_sign=source_nan_sign(raw, src, dst) if dst == "BF16" else None)


HAND_WORKED = [
    # (src, dst, k, source bits, result bits)
    ("BF16", "BF16", 0.7, 0x3F80, 0x3F33),  # 1.0 * 0.7f = 0x3F333333 -> 0x3F33
    ("BF16", "BF16", 3.0, 0x7F7F, 0x7F80),  # bf16 max * 3 overflows to inf
    ("BF16", "BF16", -2.5, 0xFFC0, 0xFFC0),  # -NaN stays -NaN whatever the sign of k
    ("BF16", "F16", 1.0, 0x4780, 0x7C00),  # 65536 -> inf
    ("BF16", "F16", 1.0, 0x477F, 0x7BF8),  # 65280 -> 65280
    ("BF16", "F16", 1.0, 0x3380, 0x0001),  # 2**-24 -> smallest F16 subnormal
    ("BF16", "F16", 1.0, 0x3300, 0x0000),  # 2**-25: a tie, rounds to even (0)
    ("BF16", "F16", 1.0, 0x33C0, 0x0002),  # 1.5 * 2**-24: a tie, rounds to even (2)
    ("BF16", "F16", 1.0, 0x3440, 0x0003),  # 3 * 2**-24
    ("BF16", "F16", 1.0, 0xB880, 0x8400),  # -2**-14, smallest normal
    ("BF16", "F16", 1.0, 0x7F80, 0x7C00),  # inf
    ("F32", "BF16", 1.0, 0x3F808000, 0x3F80),  # tie, even stays
    ("F32", "BF16", 1.0, 0x3F818000, 0x3F82),  # tie, odd rounds up
    ("F32", "BF16", 1.0, 0x7F7FFFFF, 0x7F80),  # float32 max -> inf
    ("F32", "F16", 1.0, 0x477FF000, 0x7C00),  # 65520 -> inf
    ("F32", "F16", 1.0, 0x477FEFFF, 0x7BFF),  # just under 65520 -> 65504
    ("F16", "BF16", 1.0, 0x3C01, 0x3F80),  # 1 + 2**-10 -> 1.0
    ("F16", "BF16", 1.0, 0x0001, 0x3380),  # 2**-24 is a normal BF16
    ("F64", "F16", 1.0, 0x3FF0020000000001, 0x3C00),  # 1 + 2**-11 + 2**-52: rounds twice, as torch does
]


@pytest.mark.parametrize(("src", "dst", "k", "bits", "want"), HAND_WORKED)
def test_hand_worked_values(src: str, dst: str, k: float, bits: int, want: int) -> None:
    got = convert_all(np.array([bits], BITS[src]), src, dst, k)
    assert int(got[0]) == want, f"{got[0]:#x} != {want:#x}"


# -- streaming: chunk and block boundaries --------------------------------------------------------


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
@pytest.mark.parametrize("k", [1.0, 0.7])
def test_chunking_does_not_change_bits(src: str, dst: str, k: float) -> None:
    """Odd chunk and block sizes (many chunks, a short last one, NaN blocks next to clean ones)."""
    everything = inputs(src)
    for count, sizes in [(2_003, [(1, 1), (7, 3)]), (50_003, [(4099, 1000), (50_000, 50_000), (CHUNK_ELEMENTS, 777)])]:
        raw = everything[:: len(everything) // count][:count]  # a sample across all the kinds of input
        whole = convert_all(raw, src, dst, k)
        for chunk, block in sizes:
            got = convert_all(raw, src, dst, k, chunk_elements=chunk, block_elements=block)
            assert got.tobytes() == whole.tobytes(), (chunk, block)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_without_nan_never_take_the_slow_path(monkeypatch: pytest.MonkeyPatch, case) -> None:
    """The fast paths handle every non-NaN value themselves (so the comparisons above test them)."""
    src, dst, k = case
    raw = inputs(src)
    with np.errstate(invalid="ignore"):
        raw = raw[~np.isnan(raw.view(NUMPY[src]))]

    def refuse(*args: object) -> None:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(ChunkConverter, "_slow", refuse)
    convert_all(raw, src, dst, k)


def test_block_with_a_nan_among_clean_blocks() -> None:
    """The NaN fallback handles only its own block; the blocks around it keep the fast path's result."""
    values = np.linspace(-3, 3, 1000, dtype=np.float32)
    values[500] = np.float32("nan")
    for dst, k in [("BF16", 1.0), ("BF16", 0.7), ("F16", 1.0), ("F16", -2.5)]:
        got = convert_all(values.view(np.uint32), "F32", dst, k, chunk_elements=300, block_elements=64)
        want = ml_dtypes_expected(values.view(np.uint32), "F32", dst, k)
        assert_same_bits(got, want, dst)


def test_convert_accepts_bytes_bytearray_and_empty() -> None:
    converter = ChunkConverter("BF16", "F16", 1.0)
    one = np.array([0x3F80], np.uint16).tobytes()
    assert bytes(converter.convert(one)) == np.array([0x3C00], np.uint16).tobytes()
    assert bytes(converter.convert(bytearray(one))) == np.array([0x3C00], np.uint16).tobytes()
    assert bytes(converter.convert(memoryview(b""))) == b""


def test_convert_rejects_bad_sizes_and_dtypes() -> None:
    converter = ChunkConverter("F32", "BF16", 0.7, chunk_elements=4)
    with pytest.raises(ValueError, match="whole number"):
        converter.convert(memoryview(bytes(6)))
    with pytest.raises(ValueError, match="whole number"):
        converter.convert(memoryview(bytes(20)))
    with pytest.raises(ValueError, match="cannot convert"):
        ChunkConverter("I32", "F32", 1.0)
    with pytest.raises(ValueError, match="finite"):
        ChunkConverter("F32", "F32", float("inf"))
    assert set(DTYPES) == FLOAT_DTYPES


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [(s, d, k) for s in DTYPES for d in DTYPES for k in (1.0, 0.7)], ids=_ids)
def test_memory_is_fixed_and_small(case: tuple[str, str, float]) -> None:
    """Buffers are allocated up front; a chunk of clean values allocates (almost) nothing more."""
    src, dst, k = case
    converter = ChunkConverter(src, dst, k)
    assert converter.nbytes <= 6 << 20, converter.nbytes
    assert converter.chunk_src_bytes == CHUNK_ELEMENTS * converter.src_itemsize
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(CHUNK_ELEMENTS) * 0.02).astype(NUMPY[src]).tobytes()
    converter.convert(chunk)  # first call: lookup tables and scratch exist from here on
    tracemalloc.start()
    try:
        for _ in range(3):
            converter.convert(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, f"{peak} bytes allocated while converting {len(chunk)} bytes"
