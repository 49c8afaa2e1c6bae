"""Which shard layout lets a reflink filesystem share the most copied bytes? Prints figures; no files.

A copied tensor can share blocks with its source only where its output offset is congruent to its
source offset modulo the block size (4096). safetensors allows no gaps between tensors, so the
freedoms are the header's trailing spaces (data start: any multiple of 8), the order of tensors in
a shard file (loaders look names up in the header and the index) and where shards split.

Sources are synthesized as Hugging Face writes them: the state dict in module order, cut greedily
at 5 GB (``split_torch_state_dict_into_shards``); in each file the data sorted by dtype then name,
after a compact JSON header padded to 8 bytes (the reference ``safetensors`` writer). Outputs
follow shardsurgeon's plan: tensors before the stack, then every output layer with its source
layer's tensors in source order, then final norm and head. Layouts:

- ``a greedy``  today: canonical order, cut greedily at 5 GB, header padded to 8 only.
- ``b pad``     as a, each header padded so that its first copied tensor is in phase.
- ``c regroup`` canonical order stably grouped by source file, a new output shard per source file
  (then greedy at 5 GB), each header padded to the phase that shares the most bytes.
- ``d mirror``  as c, but inside a group tensors go in source order, one copy instance after the
  other: a group's first instances reproduce the source file byte for byte.
- ``e fill``    as d, but tensors that cannot share anyway (not copied, or under 64 KiB) are taken
  out and put back where their sizes restore the phase after a break; the rest go last.
  This is :func:`phase_layout`, a prototype for ``layout.py``.

Shared bytes are whole blocks of copied ranges in phase, with ranges that are contiguous in both
files merged as an executor that coalesces adjacent copies would copy them (``per tensor`` when
every tensor is its own copy_range). Run: ``python bench/alignment_study.py``; and
``python bench/alignment_study.py --measure-on DIR`` checks the model on the filesystem of DIR
(needs about 1.2 GB there; XFS or btrfs to see sharing).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

BLOCK = 4096
MAX_SHARD_BYTES = 5_000_000_000
ANCHOR_MIN_BYTES = 64 << 10
"""Copied tensors smaller than this are fillers in layout e: they hold at most 15 shareable blocks."""
MAX_FILLERS = 4
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
RUST_DTYPE_RANK = {"F16": 7, "BF16": 8, "F32": 11}
"""Position in the reference writer's Dtype enum; it writes higher ranks first."""
OUTPUT_METADATA = {"format": "pt", "shardsurgeon_plan": "0" * 64}


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = DTYPE_BYTES[self.dtype]
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    before: tuple[Spec, ...]
    layer: Callable[[int], list[Spec]]
    layers: int
    after: tuple[Spec, ...]
    prefix: str
    residual: tuple[str, ...]
    """Name parts zeroed in inserted copies (the seed recipe's ``--zero``)."""
    source_shard_bytes: int = MAX_SHARD_BYTES


@dataclass(frozen=True, slots=True)
class Out:
    """An output tensor; ``src_*`` say where its bytes (or, for zeros, its source tensor) live."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    copied: bool
    src_file: int
    src_offset: int
    order: int
    instance: int
    """How many earlier output tensors come from the same source tensor."""

    @property
    def phase(self) -> int:
        return self.src_offset % BLOCK


@dataclass(frozen=True, slots=True)
class Shard:
    tensors: tuple[Out, ...]
    data_start: int


# --- shapes -------------------------------------------------------------------------------------


def llama_like(
    name: str,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    kv: int,
    dtype: str = "BF16",
    q_out: int | None = None,
    bias: bool = False,
    tied: bool = False,
    inv_freq: int = 0,
    experts: int = 0,
) -> Model:
    """Llama, Mistral, Qwen2 (q/k/v biases), Gemma (q_out, tied), Mixtral (experts), in module order."""
    q_out = q_out or hidden

    def layer(i: int) -> list[Spec]:
        p = f"model.layers.{i}."
        specs = [Spec(p + "self_attn.q_proj.weight", dtype, (q_out, hidden))]
        specs += [Spec(p + "self_attn.q_proj.bias", dtype, (q_out,))] if bias else []
        specs += [Spec(p + "self_attn.k_proj.weight", dtype, (kv, hidden))]
        specs += [Spec(p + "self_attn.k_proj.bias", dtype, (kv,))] if bias else []
        specs += [Spec(p + "self_attn.v_proj.weight", dtype, (kv, hidden))]
        specs += [Spec(p + "self_attn.v_proj.bias", dtype, (kv,))] if bias else []
        specs += [Spec(p + "self_attn.o_proj.weight", dtype, (hidden, q_out))]
        specs += [Spec(p + "self_attn.rotary_emb.inv_freq", "F32", (inv_freq,))] if inv_freq else []
        if experts:
            specs += [Spec(p + "block_sparse_moe.gate.weight", dtype, (experts, hidden))]
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                specs += [
                    Spec(q + "w1.weight", dtype, (intermediate, hidden)),
                    Spec(q + "w2.weight", dtype, (hidden, intermediate)),
                    Spec(q + "w3.weight", dtype, (intermediate, hidden)),
                ]
        else:
            specs += [
                Spec(p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
                Spec(p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
                Spec(p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
            ]
        specs += [
            Spec(p + "input_layernorm.weight", dtype, (hidden,)),
            Spec(p + "post_attention_layernorm.weight", dtype, (hidden,)),
        ]
        return specs

    after = [Spec("model.norm.weight", dtype, (hidden,))]
    after += [] if tied else [Spec("lm_head.weight", dtype, (vocab, hidden))]
    residual = ("o_proj", "w2") if experts else ("o_proj", "down_proj")
    embed = (Spec("model.embed_tokens.weight", dtype, (vocab, hidden)),)
    return Model(name, embed, layer, layers, tuple(after), "model.layers.", residual)


def gpt2() -> Model:
    """GPT-2 small as in its model.safetensors: F32, Conv1D weights (in, out), tied head, no prefix."""

    def layer(i: int) -> list[Spec]:
        p, d = f"h.{i}.", 768
        return [
            Spec(p + "ln_1.weight", "F32", (d,)),
            Spec(p + "ln_1.bias", "F32", (d,)),
            Spec(p + "attn.c_attn.weight", "F32", (d, 3 * d)),
            Spec(p + "attn.c_attn.bias", "F32", (3 * d,)),
            Spec(p + "attn.c_proj.weight", "F32", (d, d)),
            Spec(p + "attn.c_proj.bias", "F32", (d,)),
            Spec(p + "ln_2.weight", "F32", (d,)),
            Spec(p + "ln_2.bias", "F32", (d,)),
            Spec(p + "mlp.c_fc.weight", "F32", (d, 4 * d)),
            Spec(p + "mlp.c_fc.bias", "F32", (4 * d,)),
            Spec(p + "mlp.c_proj.weight", "F32", (4 * d, d)),
            Spec(p + "mlp.c_proj.bias", "F32", (d,)),
        ]

    before = (Spec("wte.weight", "F32", (50257, 768)), Spec("wpe.weight", "F32", (1024, 768)))
    after = (Spec("ln_f.weight", "F32", (768,)), Spec("ln_f.bias", "F32", (768,)))
    return Model("GPT-2 (F32)", before, layer, 12, after, "h.", ("attn.c_proj", "mlp.c_proj"))


LLAMA_2 = llama_like("Llama-2-7B", hidden=4096, intermediate=11008, layers=32, vocab=32000, kv=4096)
MISTRAL = llama_like("Mistral-7B", hidden=4096, intermediate=14336, layers=32, vocab=32000, kv=1024)
MODELS = [
    LLAMA_2,
    replace(
        llama_like(
            "Llama-2-7B as published: F16, inv_freq, 10 GB",
            hidden=4096,
            intermediate=11008,
            layers=32,
            vocab=32000,
            kv=4096,
            dtype="F16",
            inv_freq=64,
        ),
        source_shard_bytes=10_000_000_000,
    ),
    MISTRAL,
    replace(MISTRAL, name="Mistral-7B, 10 GB source shards", source_shard_bytes=10_000_000_000),
    llama_like("Qwen2-7B", hidden=3584, intermediate=18944, layers=28, vocab=152064, kv=512, bias=True),
    llama_like("Gemma-7B", hidden=3072, intermediate=24576, layers=28, vocab=256000, kv=4096, q_out=4096, tied=True),
    llama_like("Mixtral-8x7B", hidden=4096, intermediate=14336, layers=32, vocab=32000, kv=1024, experts=8),
    gpt2(),
]


# --- sources and plans --------------------------------------------------------------------------


def header_nbytes(entries: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> int:
    """8-byte length plus compact JSON padded to 8, as the reference writer makes it."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text) % 8)


def source_offsets(model: Model) -> dict[str, tuple[int, int]]:
    """Every source tensor's file number and absolute offset."""
    state = [*model.before, *(s for i in range(model.layers) for s in model.layer(i)), *model.after]
    files: list[list[Spec]] = [[]]
    size = 0
    for spec in state:
        if files[-1] and size + spec.nbytes > model.source_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += spec.nbytes
    where = {}
    for number, specs in enumerate(files):
        ordered = sorted(specs, key=lambda s: (-RUST_DTYPE_RANK[s.dtype], s.name))
        offset = header_nbytes([(s.name, s.dtype, s.shape, s.nbytes) for s in ordered], {"format": "pt"})
        for spec in ordered:
            where[spec.name] = (number, offset)
            offset += spec.nbytes
    return where


Recipe = list[tuple[int, bool]]
"""Output layers: (source layer, inserted); inserted copies have their residual projections zeroed."""


def recipes(layers: int) -> dict[str, Recipe]:
    keep = [(layer, False) for layer in range(layers)]
    copies = 12 if layers > 12 else 4
    every = [(layer, inserted) for layer in range(layers) for inserted in (False, True)[: 2 if layer % 4 == 3 else 1]]
    solar = [(layer, False) for layer in [*range(layers - 8), *range(8, layers)]]
    return {
        "re-shard only": keep,
        f"seed: dup {layers - 1}x{copies}, zero": keep + [(layers - 1, True)] * copies,
        "LLaMA Pro: every 4, zero": every,
        "SOLAR: [0,n-8)+[8,n)": solar,
    }


def plan(model: Model, recipe: Recipe, where: dict[str, tuple[int, int]]) -> list[Out]:
    def source_order(specs: Iterable[Spec]) -> list[Spec]:
        return sorted(specs, key=lambda s: where[s.name])

    seen: dict[str, int] = {}
    out: list[Out] = []

    def add(spec: Spec, name: str, copied: bool) -> None:
        src_file, src_offset = where[spec.name]
        instance = seen.get(spec.name, 0)
        seen[spec.name] = instance + 1
        out.append(Out(name, spec.dtype, spec.shape, spec.nbytes, copied, src_file, src_offset, len(out), instance))

    for spec in source_order(model.before):
        add(spec, spec.name, True)
    for position, (layer, inserted) in enumerate(recipe):
        source_prefix = f"{model.prefix}{layer}."
        for spec in source_order(model.layer(layer)):
            name = f"{model.prefix}{position}.{spec.name.removeprefix(source_prefix)}"
            add(spec, name, not (inserted and any(part in spec.name for part in model.residual)))
    for spec in model.after:  # norm, then head: shardsurgeon's order after the stack
        add(spec, spec.name, True)
    return out


# --- layouts ------------------------------------------------------------------------------------


def minimal_start(tensors: Sequence[Out]) -> int:
    return header_nbytes([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], OUTPUT_METADATA)


def padded_start(tensors: Sequence[Out], phase: int) -> int:
    """The smallest data start at least the minimal one with ``data_start % BLOCK == phase``."""
    start = minimal_start(tensors)
    return start + (phase - start) % BLOCK


def greedy_cut(tensors: Sequence[Out], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[Out]]:
    """Like huggingface_hub: a new shard when the next tensor would pass the limit."""
    groups: list[list[Out]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return groups


def best_phase(tensors: Sequence[Out]) -> int:
    """The data start phase that puts the most copied bytes in phase (ties: the smallest)."""
    weight: dict[int, int] = {}
    offset = 0
    for tensor in tensors:
        if tensor.copied:
            phase = (tensor.src_offset - offset) % BLOCK
            weight[phase] = weight.get(phase, 0) + tensor.nbytes
        offset += tensor.nbytes
    return min(weight, key=lambda phase: (-weight[phase], phase)) if weight else 0


def layout_greedy(tensors: list[Out]) -> list[Shard]:
    return [Shard(tuple(g), minimal_start(g)) for g in greedy_cut(tensors)]


def layout_pad_first(tensors: list[Out]) -> list[Shard]:
    shards = []
    for group in greedy_cut(tensors):
        offset, phase = 0, None
        for tensor in group:
            if tensor.copied:
                phase = (tensor.src_offset - offset) % BLOCK
                break
            offset += tensor.nbytes
        start = minimal_start(group) if phase is None else padded_start(group, phase)
        shards.append(Shard(tuple(group), start))
    return shards


def by_source_file(tensors: list[Out]) -> list[list[Out]]:
    groups: dict[int, list[Out]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.src_file, []).append(tensor)
    return list(groups.values())


def layout_regroup(tensors: list[Out]) -> list[Shard]:
    groups = [g for group in by_source_file(tensors) for g in greedy_cut(group)]
    return [Shard(tuple(g), padded_start(g, best_phase(g))) for g in groups]


def mirror_order(group: list[Out]) -> list[Out]:
    return sorted(group, key=lambda t: (t.instance, t.src_offset))


def layout_mirror(tensors: list[Out]) -> list[Shard]:
    groups = [g for group in by_source_file(tensors) for g in greedy_cut(mirror_order(group))]
    return [Shard(tuple(g), padded_start(g, best_phase(g))) for g in groups]


def phase_layout(tensors: Sequence[Out], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Shard]:
    """Prototype for layout.py: shards whose copied tensors sit in phase with their sources.

    1. Group output tensors by source file, groups in order of first appearance (the embeddings'
       file first); each group its own shards, cut greedily at ``max_shard_bytes``.
    2. Inside a group, tensors go in source order, one copy instance after the other, so each
       instance is a run that is contiguous in the source ("mirror"); the header's padding puts
       the run that shares the most in phase.
    3. Where that leaves a copied tensor out of phase, try instead: "anchors" (copied, at least
       ANCHOR_MIN_BYTES) in the same order, and before each anchor that would be out of phase the
       fewest "fillers" (the shard's other tensors: not copied, or too small to share) whose
       sizes bring the phase back; unused fillers go last. Keep whichever shares more (a tie keeps
       the mirror, which keeps the source's order).

    Deterministic: every choice is by sort keys of the plan. Pure; no file is read. Now
    shardsurgeon.plan.layout, with a fixed 4096-byte block so outputs never depend on the destination.
    """
    shards = []
    for group in by_source_file(list(tensors)):
        for part in greedy_cut(mirror_order(group), max_shard_bytes):
            mirrored = Shard(tuple(part), padded_start(part, best_phase(part)))
            ordered = fill_breaks(part)
            start = minimal_start(ordered)  # the first tensor is the first anchor, if there is one
            if is_anchor(ordered[0]):
                start += (ordered[0].src_offset - start) % BLOCK
            filled = Shard(tuple(ordered), start)
            shards.append(max((mirrored, filled), key=lambda shard: measure([shard]).shared))
    return shards


def is_anchor(tensor: Out) -> bool:
    return tensor.copied and tensor.nbytes >= ANCHOR_MIN_BYTES


def fill_breaks(part: Sequence[Out]) -> list[Out]:
    """Anchors in order, fillers put in front of those that would be out of phase, leftovers last."""
    anchors = [t for t in part if is_anchor(t)]
    pool: dict[int, list[Out]] = {}
    for tensor in part:
        if not is_anchor(tensor):
            pool.setdefault(tensor.nbytes % BLOCK, []).append(tensor)
    if not anchors:
        return list(part)
    ordered: list[Out] = []
    phase = anchors[0].src_offset % BLOCK
    for anchor in anchors:
        need = (anchor.src_offset - phase) % BLOCK
        for residue in fillers_for(need, pool):
            ordered.append(pool[residue].pop(0))
            phase = (phase + ordered[-1].nbytes) % BLOCK
        ordered.append(anchor)
        phase = (phase + anchor.nbytes) % BLOCK
    leftovers = sorted((t for ts in pool.values() for t in ts), key=lambda t: t.order)
    return ordered + leftovers


def fillers_for(need: int, pool: dict[int, list[Out]]) -> tuple[int, ...]:
    """Residues of the fewest fillers (at most MAX_FILLERS) that add up to ``need`` modulo block."""
    if need == 0:
        return ()
    residues = sorted(r for r, ts in pool.items() if r and ts)
    for count in range(1, MAX_FILLERS + 1):
        for combo in itertools.combinations_with_replacement(residues, count):
            if sum(combo) % BLOCK == need and all(combo.count(r) <= len(pool[r]) for r in set(combo)):
                return combo
    return ()


LAYOUTS: dict[str, Callable[[list[Out]], list[Shard]]] = {
    "a greedy": layout_greedy,
    "b pad": layout_pad_first,
    "c regroup": layout_regroup,
    "d mirror": layout_mirror,
    "e fill": phase_layout,
}


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    copied: int
    shared: int
    shared_per_tensor: int
    shards: int
    largest: int


def whole_blocks(start: int, end: int) -> int:
    return max(0, (end // BLOCK - -(-start // BLOCK)) * BLOCK)


def measure(shards: list[Shard]) -> Figures:
    copied = shared = per_tensor = 0
    for shard in shards:
        offset = shard.data_start
        run: tuple[int, int, int, int] | None = None  # src file, src start, out start, out end
        for tensor in shard.tensors:
            if tensor.copied:
                copied += tensor.nbytes
                if (offset - tensor.src_offset) % BLOCK == 0:
                    per_tensor += whole_blocks(offset, offset + tensor.nbytes)
                joins = run and run[0] == tensor.src_file and run[1] + run[3] - run[2] == tensor.src_offset
                if run and joins:
                    run = (run[0], run[1], run[2], offset + tensor.nbytes)
                else:
                    shared += _run_shared(run)
                    run = (tensor.src_file, tensor.src_offset, offset, offset + tensor.nbytes)
            else:
                shared += _run_shared(run)
                run = None
            offset += tensor.nbytes
        shared += _run_shared(run)
    sizes = [s.data_start + sum(t.nbytes for t in s.tensors) for s in shards]
    return Figures(copied, shared, per_tensor, len(shards), max(sizes))


def _run_shared(run: tuple[int, int, int, int] | None) -> int:
    if run is None or (run[2] - run[1]) % BLOCK:
        return 0
    return whole_blocks(run[2], run[3])


def ceiling(tensors: list[Out]) -> tuple[int, int]:
    """Per tensor, the whole source blocks inside it: what in-phase placement can share at most
    without merging neighbours (merged runs can beat it a little); and the copied bytes."""
    copied = [t for t in tensors if t.copied]
    return sum(whole_blocks(t.src_offset, t.src_offset + t.nbytes) for t in copied), sum(t.nbytes for t in copied)


def percent(part: int, whole: int) -> str:
    """Rounded down, so that 100.00% means all of it."""
    return f"{part * 10000 // whole / 100:6.2f}%" if whole else "    - "


def check(shards: list[Shard], tensors: list[Out]) -> None:
    names = sorted(t.name for s in shards for t in s.tensors)
    assert names == sorted(t.name for t in tensors), "a layout lost or duplicated a tensor"
    assert all(s.data_start % 8 == 0 and s.data_start - minimal_start(s.tensors) < BLOCK for s in shards)
    assert all(sum(t.nbytes for t in s.tensors) <= MAX_SHARD_BYTES or len(s.tensors) == 1 for s in shards)


def main() -> None:
    print(f"shared = whole {BLOCK}-byte blocks of copied bytes in phase with the source, / copied bytes")
    print(f"sources cut at {MAX_SHARD_BYTES / 1e9:g} GB in module order; outputs at most the same\n")
    for model in MODELS:
        where = source_offsets(model)
        files = len({f for f, _ in where.values()})
        print(f"## {model.name}: {model.layers} layers, {files} source file(s)")
        print(f"{'recipe':34} {'copied':>9}  " + "  ".join(f"{name:>16}" for name in LAYOUTS) + "  ceiling")
        for recipe_name, recipe in recipes(model.layers).items():
            tensors = plan(model, recipe, where)
            cells = []
            copied = 0
            for make in LAYOUTS.values():
                shards = make(tensors)
                check(shards, tensors)
                figures = measure(shards)
                copied = figures.copied
                cells.append(f"{percent(figures.shared, figures.copied)} ({figures.shards:2d} f)")
            print(f"{recipe_name:34} {copied / 1e9:7.2f}GB  " + "  ".join(f"{c:>16}" for c in cells), end="")
            print(f"  {percent(*ceiling(tensors))}")
        print()
    print_per_tensor()


def print_per_tensor() -> None:
    """Layout e without merging adjacent copies: what a per-tensor copy_range achieves."""
    print("layout e, shared when every tensor is its own copy_range (no merging of neighbours):")
    print(f"{'':46}" + "  ".join(f"{name.split(':')[0]:>13}" for name in recipes(32)))
    for model in MODELS:
        where = source_offsets(model)
        cells = []
        for recipe in recipes(model.layers).values():
            figures = measure(phase_layout(plan(model, recipe, where)))
            cells.append(percent(figures.shared_per_tensor, figures.copied))
        print(f"  {model.name:44}" + "  ".join(f"{cell:>13}" for cell in cells))


def measure_on(folder: Path) -> None:
    """Check the model against a real filesystem: GPT-2's seed recipe, copied tensor by tensor with
    fileio into files in ``folder`` (XFS or btrfs for sharing), shared bytes read back with FIEMAP."""
    from shardsurgeon.storage import fileio  # only this mode needs the package

    model = gpt2()
    where = source_offsets(model)
    tensors = plan(model, list(recipes(model.layers).values())[1], where)
    source = folder / "alignment-study-source.safetensors"
    src_nbytes = max(offset + t.nbytes for t in tensors for offset in [t.src_offset])
    with open(source, "wb") as f:
        for start in range(0, src_nbytes, 1 << 24):
            f.write(os.urandom(min(1 << 24, src_nbytes - start)))
    src = fileio.open_read(source)
    try:
        print(f"\nmeasured on {folder} ({model.name}, seed recipe, one copy_range per tensor):")
        for name in ("a greedy", "b pad", "e fill"):
            (shard,) = LAYOUTS[name](tensors)
            out = folder / "alignment-study-output.safetensors"
            dst = fileio.open_new(out)
            try:
                fileio.set_size(dst, shard.data_start + sum(t.nbytes for t in shard.tensors))
                offset = shard.data_start
                for tensor in shard.tensors:
                    if tensor.copied:
                        fileio.RangeCopier().copy_range(src, tensor.src_offset, dst, offset, tensor.nbytes)
                    offset += tensor.nbytes
            finally:
                os.close(dst)
            predicted = measure([shard])
            shared = fileio.shared_bytes(out) or 0
            print(
                f"  {name:9} predicted {percent(predicted.shared_per_tensor, predicted.copied)}"
                f"  measured {percent(shared, predicted.copied)}"
            )
            out.unlink()
    finally:
        os.close(src)
        source.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-on":
        measure_on(Path(sys.argv[2]))
    else:
        main()
