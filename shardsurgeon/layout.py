"""Plan -> Layout: shard file names, header bytes and every tensor's offset, fixed before writing.

Greedy in output order, like huggingface_hub's ``split_state_dict_into_shards``: a shard takes
tensors until the next one would pass ``max_shard_bytes``; a tensor larger than the limit gets a
shard of its own. One header and one ordered tensor list per shard drive both the header bytes and
the data, so they cannot disagree. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shardsurgeon.checkpoint import SINGLE_FILE
from shardsurgeon.errors import PlanError
from shardsurgeon.format import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, encode_header
from shardsurgeon.plan import Plan, PlannedTensor
from shardsurgeon.units import format_bytes

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
PLAN_METADATA_KEY = "shardsurgeon_plan"
RECIPE_METADATA_KEY = "shardsurgeon_recipe"


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
        if len(header) - HEADER_LENGTH_BYTES > MAX_HEADER_BYTES:
            raise PlanError(
                f"shard {name}: its header would be {format_bytes(len(header) - HEADER_LENGTH_BYTES)}, more than the "
                f"{format_bytes(MAX_HEADER_BYTES)} safetensors readers accept; give a smaller --max-shard-size"
            )
        offset = len(header)
        placed = []
        for tensor in group:
            placed.append(PlacedTensor(tensor, offset))
            offset += tensor.nbytes
        shards.append(ShardLayout(name, header, tuple(placed)))
    return Layout(tuple(shards))
