"""Plan -> Layout: shard file names, header bytes and every tensor's offset, fixed before writing.

The data order is chosen so that a reflink filesystem (XFS, btrfs) can share copied tensors with
their sources instead of storing them again. Such a filesystem shares only whole blocks, and only
where a range's output offset is congruent to its source offset modulo the block size. safetensors
allows no gaps between tensors, so the freedoms are the header's trailing spaces, the order of the
tensors inside a file, and where shards split:

1. Output tensors are grouped by the source file they come from, groups in the order the plan
   first names them (the embeddings' file first); each group is cut greedily at
   ``max_shard_bytes``, like huggingface_hub (a tensor larger than the limit gets a shard of its own).
   Neighbouring parts share a shard only where they fit in one and lose no shareable byte by it.
2. Inside a group tensors go in source order, one copy instance after the other: the first
   instances reproduce the source file's data as it is, then the second ones (the first inserted
   copies) follow, and so on. Copies that lie one after the other in both files are one range.
3. Each header is padded with spaces so that the data start (a multiple of 8, as the reference
   writer keeps it) puts the most copied bytes in phase with their source.
4. Where that leaves large copies (anchors, at least ``ANCHOR_MIN_BYTES``) out of phase, another
   order is tried: anchors in the same order, each preceded by the fewest of the shard's other
   tensors (fillers: zeros, conversions, small copies; at most ``MAX_FILLERS``) whose sizes bring
   the phase back; unused fillers go last. The order that shares more is kept (a tie keeps 2).

The block is a fixed ``BLOCK_BYTES``, never the destination's: the output bytes must not depend on
where a run writes or resumes. Loaders find tensors by name (header and index), so the order inside
a file is free; the index's weight_map follows the data order. One header and one ordered tensor
list per shard drive both the header bytes and the data, so they cannot disagree. Pure: no file is
read, and the choice depends only on the plan (sort keys, never set or dict iteration of paths).
"""

from __future__ import annotations

import itertools
import zlib
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import PlanError
from shardsurgeon.format import DTYPES, HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, encode_header, padded_header
from shardsurgeon.model.checkpoint import SINGLE_FILE
from shardsurgeon.plan.planner import Plan
from shardsurgeon.plan.tensors import Copy, Piece, PlannedTensor, pieces_of
from shardsurgeon.units import format_bytes

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
PLAN_METADATA_KEY = "shardsurgeon_plan"
RECIPE_METADATA_KEY = "shardsurgeon_recipe"
BLOCK_BYTES = 4096
"""The sharing granule the layout aims at: the block of XFS and btrfs on x86-64 and arm64 alike."""
ANCHOR_MIN_BYTES = 64 << 10
"""Copies smaller than this hold at most 15 shareable blocks: they serve as fillers instead."""
MAX_FILLERS = 4
MAX_FILLER_SIZES = 24
"""Distinct filler sizes (modulo the block) searched for a combination: bounds the search on odd plans."""
DATA_ALIGN = 8


@dataclass(frozen=True, slots=True)
class PlacedTensor:
    tensor: PlannedTensor
    offset: int
    """Absolute offset of the tensor's first byte in its shard file."""


@dataclass(frozen=True, slots=True)
class PlacedPiece:
    """A run of a tensor's bytes that is not a copy (zeros, a conversion, generated numbers), at the
    absolute offset ``offset`` of its shard."""

    tensor: PlannedTensor
    piece: Piece
    offset: int


@dataclass(frozen=True, slots=True)
class CopyRun:
    """Copied tensors that lie one after the other in both their source file and the shard: one
    range copy, so the blocks that straddle two of them can be shared too."""

    path: Path | str
    src_offset: int
    offset: int
    nbytes: int

    @property
    def shareable_bytes(self) -> int:
        """Whole blocks in phase with the source: what a reflink filesystem can share."""
        if (self.offset - self.src_offset) % BLOCK_BYTES:
            return 0
        return _whole_blocks(self.offset, self.offset + self.nbytes)


@dataclass(frozen=True, slots=True, init=False)
class ShardLayout:
    """A shard: its name, its header and its tensors in data order, held compactly (a shard of a
    100,000-tensor plan would otherwise hold a record and an offset object per tensor and 15 MB of
    header JSON that repeats itself; each is needed only while its shard is written or checked)."""

    name: str
    packed_header: bytes
    """The header bytes, zlib-compressed."""
    header_nbytes: int
    """Length of the header, which is where the data starts."""
    planned: tuple[PlannedTensor, ...]
    packed_offsets: bytes
    """Each tensor's offset, as 8-byte integers."""

    def __init__(self, name: str, header: bytes, tensors: tuple[PlacedTensor, ...]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "packed_header", zlib.compress(header, 1))
        object.__setattr__(self, "header_nbytes", len(header))
        object.__setattr__(self, "planned", tuple(p.tensor for p in tensors))
        object.__setattr__(self, "packed_offsets", array("q", [p.offset for p in tensors]).tobytes())

    @property
    def header(self) -> bytes:
        """The header: the 8-byte length, the JSON and its padding."""
        return zlib.decompress(self.packed_header)

    @property
    def tensors(self) -> tuple[PlacedTensor, ...]:
        """The tensors in data order, each with its offset."""
        return tuple(map(PlacedTensor, self.planned, memoryview(self.packed_offsets).cast("q")))

    @property
    def nbytes(self) -> int:
        """Final size of the shard file."""
        return self.header_nbytes + sum(t.nbytes for t in self.planned)

    def segments(self) -> list[PlacedPiece | CopyRun]:
        """What to write, in data order: copied pieces merged into runs where they lie one after the
        other in both files, every other piece on its own."""
        segments: list[PlacedPiece | CopyRun] = []
        for placed in self.tensors:
            offset = placed.offset
            for piece in pieces_of(placed.tensor):
                if isinstance(piece.op, Copy) and piece.source is not None:
                    src_offset = piece.source.data_start + piece.first * DTYPES[piece.source.dtype].itemsize
                    last = segments[-1] if segments else None
                    if (
                        isinstance(last, CopyRun)
                        and last.path == piece.source.path
                        and last.src_offset + last.nbytes == src_offset
                        and last.offset + last.nbytes == offset
                    ):
                        segments[-1] = CopyRun(last.path, last.src_offset, last.offset, last.nbytes + piece.nbytes)
                    else:
                        segments.append(CopyRun(piece.source.path, src_offset, offset, piece.nbytes))
                else:
                    segments.append(PlacedPiece(placed.tensor, piece, offset))
                offset += piece.nbytes
        return segments

    @property
    def shareable_bytes(self) -> int:
        return sum(s.shareable_bytes for s in self.segments() if isinstance(s, CopyRun))


@dataclass(frozen=True, slots=True)
class Layout:
    shards: tuple[ShardLayout, ...]

    @property
    def total_size(self) -> int:
        """Sum of tensor data bytes, as the index's ``metadata.total_size`` reports it."""
        return sum(t.nbytes for s in self.shards for t in s.planned)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def copied_bytes(self) -> int:
        """Bytes of tensors copied unchanged from a source."""
        return sum(piece.nbytes for s in self.shards for t in s.planned for piece in pieces_of(t)
                   if isinstance(piece.op, Copy))  # fmt: skip

    @property
    def shareable_bytes(self) -> int:
        """Copied bytes a reflink filesystem with ``BLOCK_BYTES`` blocks can share with the sources."""
        return sum(s.shareable_bytes for s in self.shards)


@dataclass(frozen=True, slots=True)
class _Item:
    """A planned tensor with what the layout sorts it by."""

    tensor: PlannedTensor
    order: int
    """Its position in the plan."""
    instance: int
    """How many earlier output tensors of the plan are made from the same source tensor."""

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    @property
    def src_offset(self) -> int:
        return self.tensor.source.data_start if self.tensor.source is not None else 0

    @property
    def copied(self) -> bool:
        """A whole tensor copied: what the layout puts in phase with its source."""
        return isinstance(self.tensor.op, Copy)

    @property
    def anchor(self) -> bool:
        return self.copied and self.nbytes >= ANCHOR_MIN_BYTES


def plan_layout(
    plan: Plan, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: Mapping[str, str] | None = None
) -> Layout:
    """Split the plan's tensors into shards, order and place them, and encode each shard's header.

    Every shard's ``__metadata__`` holds ``format: pt``, the plan fingerprint and ``metadata``.
    """
    metadata = {"format": "pt", PLAN_METADATA_KEY: plan.fingerprint, **(metadata or {})}
    parts = (part for group in _by_source_file(plan.tensors) for part in _cut(group, max_shard_bytes))
    shards = _packed(parts, max_shard_bytes, metadata)
    named = []
    for number, shard in enumerate(shards, start=1):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        if shard.header_nbytes - HEADER_LENGTH_BYTES > MAX_HEADER_BYTES:
            raise PlanError(
                f"shard {name}: its header would be {format_bytes(shard.header_nbytes - HEADER_LENGTH_BYTES)}, more "
                f"than the {format_bytes(MAX_HEADER_BYTES)} safetensors readers accept; give a smaller --max-shard-size"
            )
        named.append(ShardLayout(name, shard.header, shard.tensors))
    return Layout(tuple(named))


def _packed(parts: Iterable[list[_Item]], max_shard_bytes: int, metadata: Mapping[str, str]) -> list[ShardLayout]:
    """Each part arranged as a shard; neighbouring parts share one where they fit in it together and
    lose no shareable byte by it (tensors too small to share, a source file small enough), so small
    sources do not give one small output file per source file. Names come later."""
    shards: list[ShardLayout] = []
    current: list[_Item] = []
    for part in parts:
        alone = _arranged(part, metadata)
        joined = current + part
        if current and sum(i.nbytes for i in joined) <= max_shard_bytes:
            together = _arranged(joined, metadata)
            if together.shareable_bytes >= shards[-1].shareable_bytes + alone.shareable_bytes:
                shards[-1], current = together, joined
                continue
        shards.append(alone)
        current = part
    return shards


def _arranged(items: list[_Item], metadata: Mapping[str, str]) -> ShardLayout:
    """``items`` as one shard (not yet named), in source order or with fillers, whichever shares more
    (the source order on a tie)."""
    candidates = [_placed(items, metadata)]
    filled = _fill_breaks(items)
    if filled != items:
        candidates.append(_placed(filled, metadata))
    return max(candidates, key=lambda shard: shard.shareable_bytes)


def _by_source_file(tensors: Sequence[PlannedTensor]) -> Iterator[list[_Item]]:
    """Tensors grouped by source file (first named first), each group in source order by instance;
    a tensor made from no source (a router of zeros, one drawn from a seed) joins the group of the
    tensor before it in the plan. A group's items are made when it is asked for."""
    groups = _grouped(tensors)
    while groups:
        orders, instances = groups.pop(next(iter(groups)))
        items = [_Item(tensors[order], order, instance) for order, instance in zip(orders, instances, strict=True)]
        yield sorted(items, key=lambda i: (i.instance, i.src_offset, i.order))


def _grouped(tensors: Sequence[PlannedTensor]) -> dict[Path | str | None, tuple[array[int], array[int]]]:
    """Each group as the plan positions of its tensors and their instances, in arrays: an item
    object (and a position object) per tensor of a 100,000-tensor plan would cost 5 MB."""
    seen: dict[Path | str | None, dict[str, int]] = {}  # by path, then name: no key tuple per tensor
    groups: dict[Path | str | None, tuple[array[int], array[int]]] = {}
    path: Path | str | None = None
    for order, tensor in enumerate(tensors):
        path = tensor.source.path if tensor.source is not None else path
        counts = seen.setdefault(path, {})
        name = tensor.source.name if tensor.source is not None else tensor.name
        instance = counts.get(name, 0)
        counts[name] = instance + 1
        orders, instances = groups.setdefault(path, (array("Q"), array("Q")))
        orders.append(order)
        instances.append(instance)
    return groups


def _cut(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    """Greedy, like huggingface_hub: a new shard when the next tensor would pass the limit."""
    parts: list[list[_Item]] = []
    part_nbytes = 0
    for item in items:
        if not parts or (parts[-1] and part_nbytes + item.nbytes > max_shard_bytes):
            parts.append([])
            part_nbytes = 0
        parts[-1].append(item)
        part_nbytes += item.nbytes
    return parts


def _placed(items: list[_Item], metadata: Mapping[str, str]) -> ShardLayout:
    """The shard holding ``items`` in this order, its header padded to the phase that shares most."""
    entries = [(i.tensor.name, i.tensor.dtype, i.tensor.shape, i.nbytes) for i in items]
    header = encode_header(entries, metadata)
    del entries
    phase = _best_phase(items)
    padding = 0 if phase is None else (phase - len(header)) % BLOCK_BYTES
    header = padded_header(header, len(header) + padding)
    offset = len(header)
    placed = []
    for item in items:
        placed.append(PlacedTensor(item.tensor, offset))
        offset += item.nbytes
    return ShardLayout("", header, tuple(placed))


def _best_phase(items: list[_Item]) -> int | None:
    """The data start modulo the block that puts the most copied bytes in phase (ties: the smallest);
    None when nothing is copied. Only multiples of 8 qualify, so that the data start stays one."""
    weight: dict[int, int] = {}
    offset = 0
    for item in items:
        phase = (item.src_offset - offset) % BLOCK_BYTES
        if item.copied and phase % DATA_ALIGN == 0:
            weight[phase] = weight.get(phase, 0) + item.nbytes
        offset += item.nbytes
    return min(weight, key=lambda phase: (-weight[phase], phase)) if weight else None


def _fill_breaks(part: list[_Item]) -> list[_Item]:
    """Anchors in order, the fewest fillers in front of each that would be out of phase, the rest last."""
    anchors = [i for i in part if i.anchor]
    if not anchors:
        return part
    pool: dict[int, deque[_Item]] = {}
    for item in part:
        if not item.anchor:
            pool.setdefault(item.nbytes % BLOCK_BYTES, deque()).append(item)
    ordered: list[_Item] = []
    phase = anchors[0].src_offset % BLOCK_BYTES  # where the output is, modulo the block, once padded
    hopeless: set[int] = set()
    for anchor in anchors:
        for residue in _fillers_for((anchor.src_offset - phase) % BLOCK_BYTES, pool, hopeless):
            ordered.append(pool[residue].popleft())
            phase = (phase + ordered[-1].nbytes) % BLOCK_BYTES
        ordered.append(anchor)
        phase = (phase + anchor.nbytes) % BLOCK_BYTES
    return ordered + sorted((i for items in pool.values() for i in items), key=lambda i: i.order)


def _fillers_for(need: int, pool: dict[int, deque[_Item]], hopeless: set[int]) -> tuple[int, ...]:
    """Sizes modulo the block of the fewest fillers (at most MAX_FILLERS) that add up to ``need``.

    The first combination in sorted order wins. A need found impossible is not searched again in
    this shard (the pool only shrinks; the bound on sizes searched may then miss a late chance,
    which costs sharing, never correctness).
    """
    if need == 0 or need in hopeless:
        return ()
    residues = sorted(r for r, items in pool.items() if r and items)[:MAX_FILLER_SIZES]
    for count in range(1, MAX_FILLERS + 1):
        for combo in itertools.combinations_with_replacement(residues, count):
            if sum(combo) % BLOCK_BYTES == need and all(combo.count(r) <= len(pool[r]) for r in set(combo)):
                return combo
    hopeless.add(need)
    return ()


def _whole_blocks(start: int, end: int) -> int:
    return max(0, (end // BLOCK_BYTES - -(-start // BLOCK_BYTES)) * BLOCK_BYTES)
