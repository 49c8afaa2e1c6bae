"""Sizes in bytes as users write and read them, and the progress callbacks every long step takes.

``parse_size`` reads ``--max-shard-size``; ``format_bytes`` prints sizes in messages, dry runs and
summaries. Decimal units are decimal (``5GB`` is 5,000,000,000 bytes), as huggingface_hub reads them.
Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from shardsurgeon.errors import RecipeError

Progress = Callable[[int], None]
"""Called with a count of bytes each time that many more are done."""

ShardStarted = Callable[[str, int, int], None]
"""Called as writing a shard begins, with its file name, its number from 1, and the number of shards."""

MAX_SIZE_DIGITS = 30
"""A size longer than this is a typo, not a plan: refused before any arithmetic on it."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE | re.ASCII)
MAX_SIZE_BYTES = 2**63 - 1


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """Parse ``5GB`` (decimal, 5 * 10**9), ``500MiB`` (binary) or a plain byte count."""
    match = _SIZE.match(text) if len(text) <= MAX_SIZE_DIGITS else None
    if not match:
        shown = text if len(text) <= MAX_SIZE_DIGITS else text[:MAX_SIZE_DIGITS] + "..."
        raise RecipeError(f"{flag} {shown!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
    whole, _, fraction = match[1].partition(".")
    unit = _UNITS[(match[2] or "").upper()]
    nbytes = int(whole) * unit + int(fraction or "0") * unit // 10 ** len(fraction or "0")
    if not 0 < nbytes <= MAX_SIZE_BYTES:
        raise RecipeError(
            f"{flag} {text.strip()!r}: must be more than 0 bytes and at most {format_bytes(MAX_SIZE_BYTES)}"
        )
    return nbytes


def format_bytes(nbytes: int) -> str:
    """A size in the decimal unit that suits it, as disks are sold and --max-shard-size is read."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
