"""Plan -> Layout: shard file names, header bytes and every tensor's offset, fixed before writing.

Greedy in output order, like huggingface_hub's ``split_state_dict_into_shards``: a shard takes
tensors until the next one would pass ``max_shard_bytes``; a tensor larger than the limit gets a
shard of its own. One header and one ordered tensor list per shard drive both the header bytes and
the data, so they cannot disagree. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from shardsurgeon.errors import RecipeError
from shardsurgeon.format import encode_header
from shardsurgeon.plan import Plan, PlannedTensor

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PLAN_METADATA_KEY = "shardsurgeon_plan"
RECIPE_METADATA_KEY = "shardsurgeon_recipe"

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
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PlacedTensor:
    tensor: PlannedTensor
    offset: int
    """Absolute offset of the tensor's first byte in its shard file."""


@dataclass(frozen=True, slots=True)
class ShardLayout:
    name: str
    header: bytes
    tensors: tuple[PlacedTensor, ...]

    @property
    def nbytes(self) -> int:
        """Final size of the shard file."""
        return len(self.header) + sum(p.tensor.nbytes for p in self.tensors)


@dataclass(frozen=True, slots=True)
class Layout:
    shards: tuple[ShardLayout, ...]

    @property
    def total_size(self) -> int:
        """Sum of tensor data bytes, as the index's ``metadata.total_size`` reports it."""
        return sum(p.tensor.nbytes for s in self.shards for p in s.tensors)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def parse_size(text: str) -> int:
    """Parse ``5GB`` (decimal, 5 * 10**9), ``500MiB`` (binary) or a plain byte count."""
    match = _SIZE.match(text)
    if not match:
        raise RecipeError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
    nbytes = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    if nbytes <= 0:
        raise RecipeError(f"--max-shard-size {text!r}: must be more than 0 bytes")
    return nbytes


def format_bytes(nbytes: int) -> str:
    """A size in the decimal unit that suits it, as disks are sold and --max-shard-size is read."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def plan_layout(
    plan: Plan, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: Mapping[str, str] | None = None
) -> Layout:
    """Split the plan's tensors into shards and encode each shard's header.

    Every shard's ``__metadata__`` holds ``format: pt``, the plan fingerprint and ``metadata``.
    """
    groups: list[list[PlannedTensor]] = []
    group_nbytes = 0
    for tensor in plan.tensors:
        if not groups or (groups[-1] and group_nbytes + tensor.nbytes > max_shard_bytes):
            groups.append([])
            group_nbytes = 0
        groups[-1].append(tensor)
        group_nbytes += tensor.nbytes
    metadata = {"format": "pt", PLAN_METADATA_KEY: plan.fingerprint, **(metadata or {})}
    shards = []
    for number, group in enumerate(groups, start=1):
        name = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in group], metadata)
        offset = len(header)
        placed = []
        for tensor in group:
            placed.append(PlacedTensor(tensor, offset))
            offset += tensor.nbytes
        shards.append(ShardLayout(name, header, tuple(placed)))
    return Layout(tuple(shards))
