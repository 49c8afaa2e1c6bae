"""The safetensors format: golden bytes against the reference writer, every header rule on crafted
bytes, and a property test that malformed headers only ever raise FormatError."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from _craft import entry, header_json, raw_file, tensor_bytes, write_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from shardsurgeon import (
    DTYPES,
    MAX_HEADER_BYTES,
    FormatError,
    Header,
    HeaderEntry,
    decode_header,
    encode_header,
    read_header,
    tensor_nbytes,
)

# numpy-loadable by the reference reader; the others (F8_*, F4, F6_*) have no numpy type there.
NUMPY_LOADABLE = [d.name for d in DTYPES.values() if d.numpy is not None and not d.name.startswith("F8")]


def write(tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def rejected(path: Path, match: str, tensor: str | None = None) -> str:
    """Assert read_header refuses ``path`` with a one-line message naming it (and the tensor)."""
    with pytest.raises(FormatError, match=match) as info:
        read_header(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if tensor is not None:
        assert f"tensor {tensor!r}" in message
    return message


def rejected_header(tmp_path: Path, header: object, data: bytes = b"", **kw: str) -> str:
    return rejected(write(tmp_path, raw_file(header, data)), **kw)


# Golden bytes: the reference writer


def reference_order(arrays: dict[str, np.ndarray]) -> list[str]:
    """The reference writer lays tensors out by dtype size, largest first, then by name. The data
    order of our files is the caller's choice (the plan decides it), so the golden tests pass ours
    in this order and pin everything else: length field, key order, JSON spelling, padding."""
    return sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name.encode()))


def ours(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    names = reference_order(arrays)
    entries = [(n, DTYPES_BY_NUMPY[arrays[n].dtype], arrays[n].shape, arrays[n].nbytes) for n in names]
    return encode_header(entries, metadata) + b"".join(arrays[n].tobytes() for n in names)


DTYPES_BY_NUMPY = {d.numpy: d.name for d in DTYPES.values() if d.numpy is not None}


def sample_arrays() -> dict[str, np.ndarray]:
    return {
        "model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "model.layers.0.mlp.down_proj.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
        "lm_head.weight": np.arange(3, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "zero": np.zeros((0, 5), dtype=np.float32),
    }


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {"note": 'é " \\ / \x01\t'}])
def test_encode_header_is_byte_identical_to_reference_writer(tmp_path, metadata):
    arrays = sample_arrays()
    save_file(arrays, tmp_path / "ref.safetensors", metadata=metadata)
    assert ours(arrays, metadata) == (tmp_path / "ref.safetensors").read_bytes()


def test_metadata_with_several_keys_matches_reference_up_to_key_order(tmp_path):
    # The reference writer keeps __metadata__ in a hash map, so its key order varies from run to
    # run; ours keeps the caller's order. Pinned: same length, same JSON, same data.
    arrays, metadata = sample_arrays(), {"format": "pt", "a": "1", "z": "2", "m": "é"}
    save_file(arrays, tmp_path / "ref.safetensors", metadata=metadata)
    reference, mine = (tmp_path / "ref.safetensors").read_bytes(), ours(arrays, metadata)
    assert len(mine) == len(reference) and mine[:8] == reference[:8]
    data_start = 8 + struct.unpack("<Q", mine[:8])[0]
    assert json.loads(mine[8:data_start]) == json.loads(reference[8:data_start])
    assert list(json.loads(mine[8:data_start])["__metadata__"]) == list(metadata)
    assert mine[data_start:] == reference[data_start:]


@pytest.mark.parametrize("name_len", range(1, 9))
def test_padding_matches_reference_for_every_remainder(tmp_path, name_len):
    # Name lengths 1..8 move the JSON length through every residue mod 8.
    arrays = {"x" * name_len: np.arange(3, dtype=np.int32), 'é中\x01"': np.ones(2, dtype=np.int32)}
    save_file(arrays, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert ours(arrays, {"format": "pt"}) == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("name_len", range(1, 17))
def test_encode_header_padding_rules(name_len):
    encoded = encode_header([("t" * name_len, "F32", (2,), 8)], {"format": "pt"})
    (length,) = struct.unpack("<Q", encoded[:8])
    text = encoded[8:]
    assert length == len(text) and len(encoded) % 8 == 0
    compact = text.rstrip(b" ")
    assert len(text) - len(compact) < 8
    assert compact == header_json({"__metadata__": {"format": "pt"}, "t" * name_len: entry("F32", [2], 0, 8)})


def test_encode_header_with_no_tensors_is_empty_object():
    assert encode_header([], None) == struct.pack("<Q", 8) + b"{}      "


@pytest.mark.parametrize("dtype", NUMPY_LOADABLE)
def test_our_files_load_with_reference_reader(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    specs = [("a", dtype, (2, 4)), ("b", "F32", (3,)), ("empty", dtype, (0,)), ("c", dtype, (1, 1, 2))]
    data = write_safetensors(path, specs, {"format": "pt"})
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(data)
        for name, want_dtype, shape in specs:
            array = f.get_tensor(name)
            assert array.shape == shape
            assert array.dtype == DTYPES[want_dtype].numpy
            assert array.tobytes() == data[name]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in NUMPY_LOADABLE])
def test_reference_reader_accepts_headers_of_other_dtypes(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [("t", dtype, (2, 4)), ("u", "U8", (3,))])
    with safe_open(path, framework="numpy") as f:
        assert f.get_slice("t").get_shape() == [2, 4]
        assert f.get_slice("t").get_dtype() == dtype
        assert f.get_tensor("u").tobytes() == tensor_bytes("u", 3)


# Valid headers


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype_round_trips(tmp_path, dtype):
    specs = [("first", dtype, (2, 4)), ("second", dtype, (8,)), ("empty", dtype, (3, 0))]
    path = tmp_path / "model.safetensors"
    data = write_safetensors(path, specs, {"format": "pt"})
    header = read_header(path)
    nbytes = DTYPES[dtype].bits
    assert header.metadata == {"format": "pt"}
    assert header.tensors == (
        HeaderEntry("first", dtype, (2, 4), 0, nbytes),
        HeaderEntry("second", dtype, (8,), nbytes, 2 * nbytes),
        HeaderEntry("empty", dtype, (3, 0), 2 * nbytes, 2 * nbytes),
    )
    assert header.data_start % 8 == 0
    assert header.data_start + header.data_nbytes == path.stat().st_size
    assert sum(len(b) for b in data.values()) == header.data_nbytes


def test_zero_tensors_and_no_data(tmp_path):
    header = read_header(write(tmp_path, encode_header([], None)))
    assert header == Header(None, (), 16, 0)
    header = read_header(write(tmp_path, raw_file({"__metadata__": {"format": "pt"}})))
    assert header.metadata == {"format": "pt"} and header.tensors == ()


def test_empty_tensors_may_share_an_offset(tmp_path):
    header = {
        "a": entry("F32", [1], 0, 4),
        "e1": entry("F32", [0], 4, 4),
        "e2": entry("BF16", [0, 7], 4, 4),
        "b": entry("F32", [1], 4, 8),
    }
    decoded = read_header(write(tmp_path, raw_file(header, bytes(8))))
    assert [(t.name, t.begin, t.end) for t in decoded.tensors] == [
        ("a", 0, 4),
        ("e1", 4, 4),
        ("e2", 4, 4),
        ("b", 4, 8),
    ]


def test_tensors_come_back_in_data_order_not_json_order(tmp_path):
    header = {"late": entry("U8", [2], 3, 5), "early": entry("U8", [3], 0, 3)}
    decoded = read_header(write(tmp_path, raw_file(header, bytes(5))))
    assert [t.name for t in decoded.tensors] == ["early", "late"]
    assert decoded.data_start == 8 + len(header_json(header))


def test_unpadded_header_is_accepted(tmp_path):
    # The reference writer pads, but readers (theirs and ours) do not require it.
    text = header_json({"t": entry("U8", [1], 0, 1)})
    assert len(text) % 8
    assert read_header(write(tmp_path, raw_file(text, b"x"))).data_start == 8 + len(text)


@pytest.mark.parametrize(("dtype", "count", "nbytes"), [("F4", 2, 1), ("F4", 8, 4), ("F6_E2M3", 4, 3)])
def test_sub_byte_dtypes_with_whole_byte_counts(tmp_path, dtype, count, nbytes):
    header = read_header(write(tmp_path, raw_file({"t": entry(dtype, [count], 0, nbytes)}, bytes(nbytes))))
    assert header.tensors[0].nbytes == nbytes == tensor_nbytes(dtype, (count,))


@pytest.mark.parametrize(("dtype", "count"), [("F4", 3), ("F6_E3M2", 2), ("F4", 1)])
def test_sub_byte_dtypes_with_partial_byte_are_refused(tmp_path, dtype, count):
    nbytes = DTYPES[dtype].bits * count // 8
    path = write(tmp_path, raw_file({"t": entry(dtype, [count], 0, nbytes)}, bytes(nbytes)))
    rejected(path, match=r"needs \d+\.\d+ bytes", tensor="t")
    with pytest.raises(ValueError, match="whole bytes"):
        tensor_nbytes(dtype, (count,))


# The file itself


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_length_field(tmp_path, size):
    rejected(write(tmp_path, bytes(size)), match=rf"file is {size} bytes, too short")


def test_empty_file(tmp_path):
    rejected(write(tmp_path, b""), match="file is 0 bytes, too short for a safetensors header")


def test_header_length_past_end_of_file(tmp_path):
    text = header_json({"t": entry("U8", [1], 0, 1)})
    path = write(tmp_path, raw_file(text, b"x", length=len(text) + 2))
    rejected(path, match=rf"says {len(text) + 2} bytes but the file has only {len(text) + 1} after it")


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])
def test_header_length_over_cap(tmp_path, length):
    rejected(write(tmp_path, raw_file(b"{}", length=length)), match=rf"says {length} bytes, more than")


def test_header_length_at_cap_is_only_truncated(tmp_path):
    path = write(tmp_path, raw_file(b"{}", length=MAX_HEADER_BYTES))
    rejected(path, match="the file is truncated")


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    rejected(tmp_path / "model.safetensors", match="is a directory")


def test_missing_file(tmp_path):
    rejected(tmp_path / "absent.safetensors", match="cannot read: No such file")


# The header JSON


def test_header_not_utf8(tmp_path):
    rejected_header(tmp_path, b'{"\xff\xfe":{}}', match="not valid UTF-8")


@pytest.mark.parametrize("text", [b"", b"{", b'{"t":}', b"{'t': 1}", b"\x00" * 8, b"{} x"])
def test_header_not_json(tmp_path, text):
    rejected_header(tmp_path, text, match="not valid UTF-8 JSON")


def test_deeply_nested_header_is_format_error(tmp_path):
    rejected_header(tmp_path, b"[" * 100_000, match="not valid UTF-8 JSON")


@pytest.mark.parametrize(
    ("text", "found"),
    [(b"[]", "list"), (b"42", "int"), (b"1.5", "float"), (b'"x"', "str"), (b"null", "NoneType")],
)
def test_header_not_object(tmp_path, text, found):
    rejected_header(tmp_path, text, match=rf"header must be a JSON object, found {found}")


def test_duplicate_tensor_names(tmp_path):
    one = header_json(entry("U8", [1], 0, 1))
    text = b'{"w":' + one + b',"w":' + one + b"}"
    rejected_header(tmp_path, text, bytes(1), match="header repeats the key 'w'")


@pytest.mark.parametrize("metadata", [[], "pt", 1, {"format": 1}, {"a": "b", "c": None}, {"x": ["y"]}])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    rejected_header(tmp_path, {"__metadata__": metadata}, match="__metadata__ must map strings to strings")


# One tensor entry


def bad_entry(tmp_path: Path, value: object, match: str, nbytes: int = 4) -> str:
    """A header with a valid tensor 'ok' and the tensor 'bad' whose entry is ``value``."""
    header = {"ok": entry("U8", [4], 0, 4), "bad": value}
    return rejected_header(tmp_path, header, bytes(4 + nbytes), match=match, tensor="bad")


@pytest.mark.parametrize("value", [[], "F32", 3, None])
def test_entry_not_object(tmp_path, value):
    bad_entry(
        tmp_path,
        value,
        match=f"expected an object with dtype, shape and data_offsets, found {type(value).__name__}",
    )


@pytest.mark.parametrize("drop", ["dtype", "shape", "data_offsets"])
def test_entry_missing_key(tmp_path, drop):
    value = entry("U8", [4], 4, 8)
    del value[drop]
    bad_entry(tmp_path, value, match=re.escape(f"found {sorted(value)}"))


def test_entry_extra_key(tmp_path):
    bad_entry(tmp_path, {**entry("U8", [4], 4, 8), "offset": 0}, match="'offset'")


@pytest.mark.parametrize("dtype", ["F128", "f32", "float32", "", None, 32, ["F32"], {"F32": 1}])
def test_unknown_dtype(tmp_path, dtype):
    bad_entry(tmp_path, {**entry("U8", [4], 4, 8), "dtype": dtype}, match=r"unknown dtype .* \(known: BOOL, U8")


@pytest.mark.parametrize("shape", ["4", {"0": 4}, None, 4, [-1], [4, -1], [True], [4.0], ["4"], [None], [[4]]])
def test_bad_shape(tmp_path, shape):
    bad_entry(tmp_path, {**entry("U8", [4], 4, 8), "shape": shape}, match="shape must be a list of non-negative")


@pytest.mark.parametrize(
    "offsets",
    [
        [4],
        [4, 8, 8],
        [],
        "4,8",
        None,
        [-4, 0],
        [4, -8],
        [8, 4],
        [4.0, 8],
        [4, 8.0],
        [True, 8],
        ["4", "8"],
        [4, 2**63],
    ],
)
def test_bad_data_offsets(tmp_path, offsets):
    value = {**entry("U8", [4], 4, 8), "data_offsets": offsets}
    bad_entry(tmp_path, value, match=r"data_offsets must be \[begin, end\] with 0 <= begin <= end")


@pytest.mark.parametrize(("dtype", "shape"), [("U8", [3]), ("U8", [5]), ("F32", [4]), ("F16", [2, 2]), ("U8", [])])
def test_size_not_matching_shape(tmp_path, dtype, shape):
    bad_entry(tmp_path, entry(dtype, shape, 4, 8), match=r"needs \d+ bytes but data_offsets \[4, 8\] span 4")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62, 2], [2**64], [2**20] * 5])
def test_overflowing_shape(tmp_path, shape):
    bad_entry(tmp_path, entry("F32", shape, 4, 8), match="overflows: .* more than a file can hold")


# Offsets across tensors and against the file


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}
    rejected_header(tmp_path, header, bytes(6), match=r"starts at data offset 2, expected 4 \(overlaps", tensor="b")


def test_same_offsets_twice(tmp_path):
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 0, 4)}
    rejected_header(tmp_path, header, bytes(8), match="overlaps the previous tensor")


def test_gap_between_tensors(tmp_path):
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 6, 10)}
    rejected_header(
        tmp_path, header, bytes(10), match=r"starts at data offset 6, expected 4 \(leaves a gap", tensor="b"
    )


def test_gap_before_first_tensor(tmp_path):
    rejected_header(tmp_path, {"a": entry("U8", [4], 2, 6)}, bytes(6), match="expected 0 .leaves a gap", tensor="a")


@pytest.mark.parametrize("missing", [1, 4, 8])
def test_data_past_end_of_file(tmp_path, missing):
    header = {"a": entry("U8", [4], 0, 4), "b": entry("F32", [2], 4, 12)}
    rejected_header(
        tmp_path,
        header,
        bytes(12 - missing),
        match=f"cover 12 data bytes but the file holds {12 - missing} .*runs past",
    )


@pytest.mark.parametrize("extra", [1, 8])
def test_trailing_bytes_after_last_tensor(tmp_path, extra):
    header = {"a": entry("U8", [4], 0, 4)}
    rejected_header(tmp_path, header, bytes(4 + extra), match=f"holds {4 + extra} after the header .*trailing bytes")


def test_trailing_bytes_with_no_tensors(tmp_path):
    rejected_header(tmp_path, {"__metadata__": {"format": "pt"}}, b"\x00", match="cover 0 data bytes")


def test_decode_header_names_where(tmp_path):
    with pytest.raises(FormatError, match=r"^shard-7\.safetensors: tensor 'w': unknown dtype"):
        decode_header(header_json({"w": entry("X", [1], 0, 1)}), 100, "shard-7.safetensors")


# Property: malformed headers raise FormatError or decode, nothing else

VALID = header_json(
    {
        "__metadata__": {"format": "pt"},
        "model.embed.weight": entry("BF16", [2, 3], 0, 12),
        "model.layers.0.w": entry("F4", [4], 12, 14),
        "empty": entry("F32", [0], 14, 14),
        "model.norm.weight": entry("F32", [2], 14, 22),
    }
)
DATA_NBYTES = 22

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.just(0)),
)


@settings(max_examples=500, deadline=None)
@given(mutations=st.lists(mutation, min_size=1, max_size=6), data_delta=st.integers(-30, 30))
def test_mutated_header_raises_only_format_error(mutations, data_delta):
    raw = bytearray(VALID)
    for kind, at, byte in mutations:
        at = min(at, len(raw))
        if kind == "flip" and at < len(raw):
            raw[at] = byte
        elif kind == "cut":
            del raw[at:]
        elif kind == "insert":
            raw.insert(at, byte)
        elif kind == "delete" and at < len(raw):
            del raw[at]
    file_nbytes = 8 + len(raw) + max(0, DATA_NBYTES + data_delta)
    try:
        header = decode_header(bytes(raw), file_nbytes, "mutant.safetensors")
    except FormatError as e:
        assert str(e).startswith("mutant.safetensors: ")
        assert "\n" not in str(e)
    else:
        assert header.data_start + header.data_nbytes == file_nbytes
        assert sum(t.nbytes for t in header.tensors) == header.data_nbytes


@given(
    text=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_raises_only_format_error(text):
    raw = json.dumps(text).encode()
    try:
        decode_header(raw, 8 + len(raw), "any.safetensors")
    except FormatError as e:
        assert "\n" not in str(e)
