"""A checkpoint's index (``model.safetensors.index.json``) read for what the checkpoint needs of it.

The checkpoint needs which shards the index names and, to check each shard's header against it,
which tensor names it gives each shard. ``json.loads`` of the index of a 100,000-tensor model
holds every name and every shard name at once (about 40 MB, for a 9 MB file); here a well-formed
index is read one weight_map entry at a time from its bytes, and each shard's names are kept only
as a :class:`Listing` (their count and the sum of their hashes). Anything unusual is read by
``json.loads`` instead, which reports it as it always has. The names themselves are read again
(:func:`index_names`) only to say which one is wrong. Pure: bytes in, records out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError
from shardsurgeon.storage.smallfile import PARSE_ERRORS


@dataclass(frozen=True, slots=True)
class Listing:
    """Tensor names as their count and the sum of their hashes: what an index gives one shard,
    compared with what the shard's header holds (a set of 100,000 names would cost 10 MB)."""

    count: int
    hash_sum: int

    def add(self, name: str) -> Listing:
        return Listing(self.count + 1, self.hash_sum + hash(name))


EMPTY = Listing(0, 0)


def listing(names: Iterable[str]) -> Listing:
    count = hash_sum = 0
    for name in names:
        count += 1
        hash_sum += hash(name)
    return Listing(count, hash_sum)


def read_index(raw: bytes, where: Path | str) -> dict[str, Listing]:
    """The shards the index ``raw`` names, sorted, each with a listing of the names it gives it."""
    return _streamed(raw) or _listings(parse_json(raw, where), where)


def index_names(raw: bytes, where: Path | str) -> dict[str, set[str]]:
    """The tensor names the index ``raw`` gives each shard."""
    by_shard: dict[str, set[str]] = {}
    for name, shard in _weight_map(parse_json(raw, where), where).items():
        by_shard.setdefault(shard, set()).add(name)
    return by_shard


def parse_json(raw: bytes, path: Path | str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read JSON (nested too deeply); the file is corrupt") from None
    except PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read JSON ({_clip(str(e))}); the file is corrupt") from None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listings(index: Any, where: Path | str) -> dict[str, Listing]:
    by_shard: dict[str, Listing] = {}
    for name, shard in _weight_map(index, where).items():
        if not _is_file_name(shard):
            raise CheckpointError(
                f"{where}: tensor {name!r} maps to {shard!r}, expected a file name in the same folder"
            )
        by_shard[shard] = by_shard.get(shard, EMPTY).add(name)
    return {shard: by_shard[shard] for shard in sorted(by_shard)}


def _weight_map(index: Any, where: Path | str) -> dict[str, str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f'{where}: expected an object with a "weight_map" of tensor name to shard file; the index is corrupt'
        )
    if not weight_map:
        raise CheckpointError(f"{where}: weight_map is empty; the checkpoint holds no tensors")
    return weight_map


def _is_file_name(shard: str) -> bool:
    return not ("/" in shard or "\\" in shard or shard in ("", ".", ".."))


_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"', re.DOTALL)
"""A JSON string token (its escapes are checked when it is decoded)."""
_SPACE = re.compile(rb"[ \t\n\r]*")
_SCALAR = re.compile(rb"[^,}\] \t\n\r]+")


class _Unusual(Exception):
    """Not the plain shape of an index: the full parse reads it."""


def _streamed(raw: bytes) -> dict[str, Listing] | None:
    """:func:`_listings` of a well-formed index, from its bytes one entry at a time (JSON's structure
    is ASCII, which never occurs inside a UTF-8 sequence); None for anything unusual."""
    try:
        at = _expect(raw, _skip(raw, 0), b"{")
        found: dict[str, Listing] | None = None
        while True:
            key, at = _string(raw, _skip(raw, at))
            at = _skip(raw, _expect(raw, _skip(raw, at), b":"))
            if key == "weight_map":
                if found is not None:  # json.loads keeps the last
                    raise _Unusual
                found, at = _streamed_weight_map(raw, _expect(raw, at, b"{"))
            else:
                at = _value_end(raw, at)
            at = _skip(raw, at)
            if raw[at : at + 1] == b"}":
                break
            at = _expect(raw, at, b",")
        if _skip(raw, at + 1) != len(raw) or not found:
            return None
        return {shard: found[shard] for shard in sorted(found)}
    except (_Unusual, ValueError, RecursionError):
        return None


def _streamed_weight_map(raw: bytes, at: int) -> tuple[dict[str, Listing], int]:
    """The listings of the weight_map whose ``{`` ends at ``at``, and where the map ends. A name
    given twice is unusual (json.loads keeps its last shard; counted under both, a tensor that
    two shards hold would pass both checks)."""
    by_shard: dict[str, Listing] = {}
    seen: set[int] = set()  # names by hash, while the index is read: a repeat (or a collision) is unusual
    while True:
        name, at = _string(raw, _skip(raw, at))
        shard, at = _string(raw, _skip(raw, _expect(raw, _skip(raw, at), b":")))
        if not _is_file_name(shard) or hash(name) in seen:
            raise _Unusual
        seen.add(hash(name))
        by_shard[shard] = by_shard.get(shard, EMPTY).add(name)
        at = _skip(raw, at)
        if raw[at : at + 1] == b"}":
            return by_shard, at + 1
        at = _expect(raw, at, b",")


def _string(raw: bytes, at: int) -> tuple[str, int]:
    """The JSON string at ``raw[at]``, and where it ends."""
    match = _STRING.match(raw, at)
    if match is None:
        raise _Unusual
    token = match.group()
    text = json.loads(token) if b"\\" in token else token[1:-1].decode("utf-8")
    if not isinstance(text, str):
        raise _Unusual
    return text, match.end()


def _value_end(raw: bytes, at: int) -> int:
    """Where the JSON value at ``raw[at]`` ends (any value other than the weight_map: a few bytes
    of metadata), checked by decoding it."""
    start = at
    if raw[at : at + 1] == b'"':
        at = _string(raw, at)[1]
    elif raw[at : at + 1] in (b"{", b"["):
        depth = 0
        while True:
            if raw[at : at + 1] == b'"':
                at = _string(raw, at)[1]
                continue
            char = raw[at : at + 1]
            if not char:
                raise _Unusual
            depth += char in (b"{", b"[")
            depth -= char in (b"}", b"]")
            at += 1
            if depth == 0:
                break
    else:
        match = _SCALAR.match(raw, at)
        if match is None:
            raise _Unusual
        at = match.end()
    json.loads(raw[start:at])
    return at


def _skip(raw: bytes, at: int) -> int:
    match = _SPACE.match(raw, at)
    return at if match is None else match.end()


def _expect(raw: bytes, at: int, char: bytes) -> int:
    """Just after the ``char`` at ``raw[at]``."""
    if raw[at : at + 1] != char:
        raise _Unusual
    return at + 1
