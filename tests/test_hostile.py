"""Hostile input through the CLI: malformed checkpoints and wrong arguments, one rule each.

Every case runs ``shardsurgeon expand`` on a damaged copy of a tiny checkpoint, or with a wrong
argument, and checks the same promises: exit status 2 for a usage error and 1 for bad data; one
short line starting ``shardsurgeon: error:`` that names the file, tensor or flag and says what was
expected and what was found (the ``fragments`` of each case); no traceback; nothing created beside
the output; the source byte-identical afterwards.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _craft import header_json, raw_file
from conftest import run_cli, write_tiny_checkpoint

USAGE, DATA = 2, 1
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
MAX_MESSAGE_CHARS = 300
"""A message is short: at most this long once the test's temporary folder is written as ``<tmp>``."""


@dataclass(frozen=True)
class Case:
    id: str
    code: int
    fragments: tuple[str, ...]
    """Must all occur in the message; ``{src}``, ``{out}`` and ``{tmp}`` are replaced by the paths."""
    damage: Callable[[Path], Any] = lambda src: None
    args: tuple[str, ...] = ("--dup", "1x1")
    out: str = "{tmp}/out"
    src: bool = True
    """Pass ``--src`` with the source folder before ``args``."""


# Ways to damage a source checkpoint; each takes the source folder.


def read_shard(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def edit_header(shard: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        header, data = read_shard(src / shard)
        change(header)
        (src / shard).write_bytes(raw_file(header, data))

    return damage


def set_entry(name: str, key: str, value: Any) -> Callable[[Path], None]:
    return edit_header(SHARD1, lambda header: header[name].__setitem__(key, value))


def replace_shard(blob: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        path = src / SHARD1
        path.write_bytes(blob(path.read_bytes()) if callable(blob) else blob)

    return damage


def with_header_text(text: bytes, length: int | None = None) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        _, data = read_shard(src / SHARD1)
        (src / SHARD1).write_bytes(raw_file(text, data, length=length))

    return damage


def repeated_key(src: Path) -> None:
    header, data = read_shard(src / SHARD1)
    text = header_json(header)
    text = text[:-1] + b',"lm_head.weight":' + header_json(header["lm_head.weight"]) + b"}"
    (src / SHARD1).write_bytes(raw_file(text, data))


def tensor_in_both_shards(src: Path) -> None:
    header, data = read_shard(src / SHARD2)
    end = len(data)
    header["lm_head.weight"] = {"dtype": "BF16", "shape": [16, 8], "data_offsets": [end, end + 256]}
    (src / SHARD2).write_bytes(raw_file(header, data + bytes(256)))


def grow_last_tensor(header: dict[str, Any]) -> None:
    """One more row for the tensor whose data comes last, its end moved to match: past the file."""
    entry = max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"])
    rows, width = entry["shape"]
    begin, end = entry["data_offsets"]
    entry.update(shape=[rows + 1, width], data_offsets=[begin, end + 2 * width])


def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        value = json.loads((src / name).read_text())
        change(value)
        (src / name).write_text(json.dumps(value))

    return damage


def write_text(name: str, text: str) -> Callable[[Path], None]:
    return lambda src: (src / name).write_text(text)


def remove(*names: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        for name in names:
            (src / name).unlink()

    return damage


def shard_is_a_directory(src: Path) -> None:
    (src / SHARD1).unlink()
    (src / SHARD1).mkdir()


def move_layer(old: int, new: int) -> Callable[[Path], None]:
    """Rename every tensor of layer ``old`` to layer ``new``, in the shards and the index alike."""

    def rename(name: str) -> str:
        return name.replace(f"model.layers.{old}.", f"model.layers.{new}.")

    def damage(src: Path) -> None:
        for shard in (SHARD1, SHARD2):
            header, data = read_shard(src / shard)
            (src / shard).write_bytes(raw_file({rename(k): v for k, v in header.items()}, data))
        index = json.loads((src / INDEX).read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        (src / INDEX).write_text(json.dumps(index))

    return damage


def empty_single_file(src: Path) -> None:
    remove(SHARD1, SHARD2, INDEX)(src)
    (src / "model.safetensors").write_bytes(raw_file({"__metadata__": {"format": "pt"}}))


def only_pytorch_weights(src: Path) -> None:
    remove(SHARD1, SHARD2, INDEX)(src)
    (src / "pytorch_model.bin").write_bytes(b"\0" * 64)


CASES = [
    # The safetensors header
    Case(
        "header length past the file",
        DATA,
        (SHARD1, "header length field says 4456 bytes", "the file has only 4448 after it", "truncated"),
        replace_shard(lambda blob: struct.pack("<Q", len(blob)) + blob[8:]),
    ),
    Case(
        "header length 2^63",
        DATA,
        (SHARD1, f"header length field says {2**63} bytes, more than the 100000000 allowed"),
        replace_shard(lambda blob: struct.pack("<Q", 2**63) + blob[8:]),
    ),
    Case(
        "file shorter than the length field",
        DATA,
        (SHARD1, "file is 5 bytes, too short for a safetensors header (needs at least 8)"),
        replace_shard(b"\x10\0\0\0\0"),
    ),
    Case("empty shard", DATA, (SHARD1, "file is 0 bytes, too short", "needs at least 8"), replace_shard(b"")),
    Case(
        "directory shard",
        DATA,
        (SHARD1, "is a directory, expected a safetensors file"),
        shard_is_a_directory,
    ),
    Case("header not JSON", DATA, (SHARD1, "header is not valid UTF-8 JSON (Expecting"), with_header_text(b"{oops")),
    Case("header not UTF-8", DATA, (SHARD1, "header is not valid UTF-8 JSON ("), with_header_text(b'{"\xff": 1}')),
    Case(
        "header not an object",
        DATA,
        (SHARD1, "header must be a JSON object, found list"),
        with_header_text(b"[1, 2]"),
    ),
    Case(
        "unknown dtype",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "unknown dtype 'BF17' (known: BOOL, U8"),
        set_entry("lm_head.weight", "dtype", "BF17"),
    ),
    Case(
        "overlapping offsets",
        DATA,
        (SHARD1, "tensor 'model.embed_tokens.weight' starts at data offset 200, expected 256 (overlaps"),
        set_entry("model.embed_tokens.weight", "data_offsets", [200, 456]),
    ),
    Case(
        "gap between tensors",
        DATA,
        (SHARD1, "tensor 'model.embed_tokens.weight' starts at data offset 264, expected 256 (leaves a gap)"),
        set_entry("model.embed_tokens.weight", "data_offsets", [264, 520]),
    ),
    Case(
        "negative offset",
        DATA,
        (
            SHARD1,
            "tensor 'lm_head.weight'",
            "data_offsets must be [begin, end] with 0 <= begin <= end, found [-2, 254]",
        ),
        set_entry("lm_head.weight", "data_offsets", [-2, 254]),
    ),
    Case(
        "begin after end",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "with 0 <= begin <= end, found [256, 0]"),
        set_entry("lm_head.weight", "data_offsets", [256, 0]),
    ),
    Case(
        "offsets past the end of the file",
        DATA,
        (SHARD1, "tensors cover 2512 data bytes but the file holds 2496 after the header (runs past the end"),
        edit_header(SHARD1, grow_last_tensor),
    ),
    Case(
        "size not matching shape",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "shape [16, 9] of BF16 needs 288 bytes but data_offsets [0, 256] span 256"),
        set_entry("lm_head.weight", "shape", [16, 9]),
    ),
    Case(
        "overflowing shape",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "overflows", "more than a file can hold"),
        set_entry("lm_head.weight", "shape", [2**40, 2**40]),
    ),
    Case(
        "negative dimension",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "shape must be a list of non-negative integers, found [-16, 8]"),
        set_entry("lm_head.weight", "shape", [-16, 8]),
    ),
    Case(
        "entry without dtype",
        DATA,
        (SHARD1, "tensor 'lm_head.weight'", "expected an object with dtype, shape and data_offsets, found"),
        edit_header(SHARD1, lambda h: h["lm_head.weight"].pop("dtype")),
    ),
    Case(
        "truncated data",
        DATA,
        (SHARD1, "tensors cover 2496 data bytes but the file holds 2486", "truncated"),
        replace_shard(lambda blob: blob[:-10]),
    ),
    Case(
        "trailing bytes",
        DATA,
        (SHARD1, "tensors cover 2496 data bytes but the file holds 2504", "leaves trailing bytes"),
        replace_shard(lambda blob: blob + bytes(8)),
    ),
    Case(
        "non-string metadata",
        DATA,
        (SHARD1, '__metadata__ must map strings to strings, found {"format": 1}'),
        edit_header(SHARD1, lambda h: h.__setitem__("__metadata__", {"format": 1})),
    ),
    Case("duplicate names", DATA, (SHARD1, "header repeats the key 'lm_head.weight'"), repeated_key),
    # The folder and its index
    Case("missing shard", DATA, (SHARD1, "shard listed in model.safetensors.index.json is missing"), remove(SHARD1)),
    Case(
        "index names a tensor its shard lacks",
        DATA,
        (INDEX, "maps tensor 'model.layers.0.extra.weight' to " + SHARD1, "which does not hold it"),
        edit_json(INDEX, lambda i: i["weight_map"].__setitem__("model.layers.0.extra.weight", SHARD1)),
    ),
    Case(
        "shard holds a tensor the index lacks",
        DATA,
        (SHARD1, "holds tensor 'lm_head.weight' that model.safetensors.index.json does not list"),
        edit_json(INDEX, lambda i: i["weight_map"].pop("lm_head.weight")),
    ),
    Case(
        "tensor in two shards",
        DATA,
        ("tensor 'lm_head.weight' is in both", SHARD1, SHARD2),
        tensor_in_both_shards,
    ),
    Case("broken index JSON", DATA, (INDEX, "cannot read JSON (Expecting"), write_text(INDEX, '{"weight_map": ')),
    Case(
        "index without a weight_map object",
        DATA,
        (INDEX, 'expected an object with a "weight_map" of tensor name to shard file'),
        write_text(INDEX, '{"weight_map": []}'),
    ),
    Case(
        "index maps outside the folder",
        DATA,
        (INDEX, "tensor 'lm_head.weight' maps to '../x.safetensors', expected a file name in the same folder"),
        edit_json(INDEX, lambda i: i["weight_map"].__setitem__("lm_head.weight", "../x.safetensors")),
    ),
    Case(
        "empty weight_map",
        DATA,
        (INDEX, "weight_map is empty", "holds no tensors"),
        write_text(INDEX, '{"weight_map": {}}'),
    ),
    Case("broken config JSON", DATA, ("config.json", "cannot read JSON (Expecting"), write_text("config.json", "{")),
    Case("missing config", DATA, ("config.json: missing", "needs its config.json"), remove("config.json")),
    Case(
        "config not an object",
        DATA,
        ("config.json", "expected a JSON object, found list"),
        write_text("config.json", "[4]"),
    ),
    Case(
        "config layer count not matching the tensors",
        DATA,
        ("config.json", "num_hidden_layers is 5 but the tensors hold 4 layers under model.layers.N"),
        edit_json("config.json", lambda c: c.__setitem__("num_hidden_layers", 5)),
    ),
    Case(
        "a layer without tensors",
        DATA,
        ("model.layers.N", "layers 0..5 expected, but layer 3 has no tensors"),
        move_layer(3, 5),
    ),
    Case(
        "no tensors at all",
        DATA,
        ("{src}: the checkpoint holds no tensors; expected at least one in model.safetensors",),
        empty_single_file,
    ),
    Case(
        "no weights",
        DATA,
        ("{src}", f"expected {INDEX} or model.safetensors, found no weights at all"),
        remove(SHARD1, SHARD2, INDEX),
    ),
    Case(
        "only pytorch weights",
        DATA,
        ("{src}", f"expected {INDEX} or model.safetensors, found only pytorch_model.bin"),
        only_pytorch_weights,
    ),
    # The arguments
    Case(
        "missing source",
        DATA,
        ("{tmp}/nope: no such folder", "pass the folder that holds config.json"),
        args=("--src", "{tmp}/nope", "--dup", "1x1"),
    ),
    Case(
        "source is a file",
        DATA,
        ("{src}/config.json: is a file, expected a checkpoint folder",),
        args=("--src", "{src}/config.json", "--dup", "1x1"),
    ),
    Case(
        "layer out of range",
        USAGE,
        ("--dup 4x1", "layer 4 is out of range, the model has layers 0..3"),
        args=("--dup", "4x1"),
    ),
    Case(
        "malformed --dup",
        USAGE,
        ("--dup '3-1'", "expected LxN (N copies of layer L) such as 31x12", "found '3-1'"),
        args=("--dup", "3-1"),
    ),
    Case(
        "--dup count 0",
        USAGE,
        ("--dup '3x0'", "the number of copies must be at least 1, found 0"),
        args=("--dup", "3x0"),
    ),
    Case(
        "filter matching nothing",
        USAGE,
        ("--zero 'o_prj' matches no tensor", "(layer tensors: ", "... 9 in all)", "did you mean 'o_proj'?"),
        args=("--dup", "1x1", "--zero", "o_prj"),
    ),
    Case(
        "empty filter",
        USAGE,
        ("--zero 'o_proj,'", "expected comma-separated name parts such as o_proj,down_proj"),
        args=("--dup", "1x1", "--zero", "o_proj,"),
    ),
    Case(
        "bad --max-shard-size",
        USAGE,
        ("--max-shard-size '5XB'", "expected a size such as 5GB"),
        args=("--dup", "1x1", "--max-shard-size", "5XB"),
    ),
    Case(
        "--max-shard-size 0",
        USAGE,
        ("--max-shard-size '0'", "must be more than 0 bytes"),
        args=("--dup", "1x1", "--max-shard-size", "0"),
    ),
    Case("--every 0", USAGE, ("'--every'", "0 is not in the range x>=1"), args=("--every", "0")),
    Case(
        "--every past the layer count",
        USAGE,
        ("--every 5", "expected a step between 1 and 4 (the layer count)"),
        args=("--every", "5"),
    ),
    Case("nothing to insert", USAGE, ("expand: nothing to insert", "give --dup LxN or --every STEP"), args=()),
    Case(
        "unknown --dtype",
        USAGE,
        ("'--dtype'", "'int8' is not one of 'bfloat16', 'float16', 'float32'"),
        args=("--dup", "1x1", "--dtype", "int8"),
    ),
    Case(
        "unknown option",
        USAGE,
        ("No such option '--dupe'", "Did you mean one of: '--dtype', '--dup'"),
        args=("--dupe", "1x1"),
    ),
    Case("missing --src", USAGE, ("Missing option '--src'",), args=("--dup", "1x1"), src=False),
    Case(
        "wrong --layer-prefix",
        DATA,
        ("--layer-prefix 'model.blocks'", "no tensor is named model.blocks.N.*", "found: model.layers"),
        args=("--dup", "1x1", "--layer-prefix", "model.blocks"),
    ),
    Case(
        "output equal to the source",
        USAGE,
        ("--out {src}: is the source folder", "the source is never written to, choose another output folder"),
        out="{src}",
    ),
    Case("output inside the source", USAGE, ("--out {src}/new", "is inside the source {src}"), out="{src}/new"),
    Case("output holding the source", USAGE, ("--out {tmp}", "contains the source {src}"), out="{tmp}"),
    Case(
        "existing non-empty output without --force",
        USAGE,
        ("--out {tmp}/taken", "folder exists and is not empty; pass --force to replace it"),
        out="{tmp}/taken",
    ),
    Case(
        "output is a file", USAGE, ("--out {tmp}/file", "exists and is a file; choose a folder name"), out="{tmp}/file"
    ),
]


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file's bytes (None for a folder) under ``path``, by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(tmp_path, case):
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=4, shards=2, extra_files={"tokenizer_config.json": "{}"})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    case.damage(src)

    def fill(text: str) -> str:
        return text.replace("{src}", str(src)).replace("{out}", str(tmp_path / "out")).replace("{tmp}", str(tmp_path))

    args = [fill(a) for a in case.args]
    if case.src and "--src" not in args:
        args = ["--src", str(src), *args]
    before, beside = snapshot(src), snapshot(tmp_path)
    result = run_cli("expand", *args, "--out", fill(case.out))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    message = lines[0]
    assert message.startswith("shardsurgeon: error: "), message
    for fragment in case.fragments:
        assert fill(fragment) in message, f"{fill(fragment)!r} not in {message!r}"
    assert result.exit_code == case.code, message
    assert len(message.replace(str(tmp_path), "<tmp>")) <= MAX_MESSAGE_CHARS, message
    assert snapshot(src) == before, "the source is byte-identical"
    assert snapshot(tmp_path) == beside, "nothing created beside the output, nothing changed"


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in ("unknown dtype", "missing shard")], ids=lambda case: case.id
)
def test_verbose_shows_the_traceback(tmp_path, case):
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=4, shards=2)
    case.damage(src)
    with pytest.raises(Exception, match="safetensors"):
        run_cli("expand", "--src", src, *case.args, "--out", tmp_path / "out", "-v")
