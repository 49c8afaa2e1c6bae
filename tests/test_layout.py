"""The layout, without files: fake checkpoints laid out as the reference writer lays them out.

A fake source is a model's state dict in module order, cut greedily into files like huggingface_hub
does, each file's data sorted by name after a compact header padded to 8 (the reference writer).
Only headers are computed; no tensor bytes exist, so real 7B shapes cost nothing. The figures the
layout must reach are those of ``bench/alignment_study.py`` for the same shapes.
"""

from __future__ import annotations

import hashlib
import re
from itertools import pairwise
from pathlib import Path

import pytest
from safetensors import deserialize

from shardsurgeon import (
    BLOCK_BYTES,
    NO_HINT,
    Checkpoint,
    Copy,
    CopyRun,
    LayerSource,
    Layout,
    Recipe,
    Shard,
    Source,
    SourceVersion,
    TensorRef,
    decode_header,
    encode_header,
    expand_recipe,
    make_plan,
    plan_layout,
    resolve,
    tensor_nbytes,
)

Spec = tuple[str, str, tuple[int, ...]]


def llama_layer(i: int, hidden: int, inter: int, kv: int, bias: bool = False) -> list[Spec]:
    p = f"model.layers.{i}."
    specs: list[Spec] = [(p + "self_attn.q_proj.weight", "BF16", (hidden, hidden))]
    specs += [(p + "self_attn.q_proj.bias", "BF16", (hidden,))] if bias else []
    specs += [(p + "self_attn.k_proj.weight", "BF16", (kv, hidden))]
    specs += [(p + "self_attn.k_proj.bias", "BF16", (kv,))] if bias else []
    specs += [(p + "self_attn.v_proj.weight", "BF16", (kv, hidden))]
    specs += [(p + "self_attn.v_proj.bias", "BF16", (kv,))] if bias else []
    specs += [
        (p + "self_attn.o_proj.weight", "BF16", (hidden, hidden)),
        (p + "mlp.gate_proj.weight", "BF16", (inter, hidden)),
        (p + "mlp.up_proj.weight", "BF16", (inter, hidden)),
        (p + "mlp.down_proj.weight", "BF16", (hidden, inter)),
        (p + "input_layernorm.weight", "BF16", (hidden,)),
        (p + "post_attention_layernorm.weight", "BF16", (hidden,)),
    ]
    return specs


def llama_like(layers: int, hidden: int, inter: int, kv: int, vocab: int, bias: bool = False) -> list[Spec]:
    specs: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        specs += llama_layer(i, hidden, inter, kv, bias)
    return [*specs, ("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]


def gpt2_like(layers: int = 12, d: int = 768) -> list[Spec]:
    """GPT-2 small as its model.safetensors holds it: F32, Conv1D weights, tied head."""
    specs: list[Spec] = [("wte.weight", "F32", (50257, d)), ("wpe.weight", "F32", (1024, d))]
    for i in range(layers):
        p = f"h.{i}."
        specs += [
            (p + "ln_1.weight", "F32", (d,)),
            (p + "ln_1.bias", "F32", (d,)),
            (p + "attn.c_attn.weight", "F32", (d, 3 * d)),
            (p + "attn.c_attn.bias", "F32", (3 * d,)),
            (p + "attn.c_proj.weight", "F32", (d, d)),
            (p + "attn.c_proj.bias", "F32", (d,)),
            (p + "ln_2.weight", "F32", (d,)),
            (p + "ln_2.bias", "F32", (d,)),
            (p + "mlp.c_fc.weight", "F32", (d, 4 * d)),
            (p + "mlp.c_fc.bias", "F32", (4 * d,)),
            (p + "mlp.c_proj.weight", "F32", (4 * d, d)),
            (p + "mlp.c_proj.bias", "F32", (d,)),
        ]
    return [*specs, ("ln_f.weight", "F32", (d,)), ("ln_f.bias", "F32", (d,))]


def fake_source(specs: list[Spec], config: dict, shard_bytes: int = 5_000_000_000, folder: str = "/fake") -> Source:
    """The source as huggingface_hub and the reference writer would have saved ``specs``."""
    files: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = tensor_nbytes(spec[1], spec[2])
        if files[-1] and size + nbytes > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += nbytes
    tensors: dict[str, TensorRef] = {}
    shards = []
    for number, group in enumerate(files, start=1):
        path = Path(folder) / f"model-{number:05d}-of-{len(files):05d}.safetensors"
        ordered = sorted(group)
        entries = [(name, dtype, shape, tensor_nbytes(dtype, shape)) for name, dtype, shape in ordered]
        offset = len(encode_header(entries, {"format": "pt"}))
        for name, dtype, shape, nbytes in entries:
            tensors[name] = TensorRef(name, path, dtype, shape, offset, nbytes)
            offset += nbytes
        shards.append(Shard(path, SourceVersion(str(path), offset, f"{number:064d}")))
    return resolve(Checkpoint(Path(folder), tensors, tuple(shards), config), NO_HINT, "m")


def seed_layout(source: Source, max_shard_bytes: int = 5_000_000_000, zero=("o_proj", "down_proj")) -> Layout:
    layers = source.layer_count
    recipe = expand_recipe("m", layers, [(layers - 1, 12)], zero=zero)
    return plan_layout(make_plan(recipe, {"m": source}), max_shard_bytes)


LLAMA_2 = llama_like(32, 4096, 11008, 4096, 32000)
MISTRAL = llama_like(32, 4096, 14336, 1024, 32000)
QWEN2 = llama_like(28, 3584, 18944, 512, 152064, bias=True)
SHAPES = {
    "llama-2-7b": (LLAMA_2, {"num_hidden_layers": 32}, ("o_proj", "down_proj"), 0.9999),
    "mistral-7b": (MISTRAL, {"num_hidden_layers": 32}, ("o_proj", "down_proj"), 0.9999),
    "qwen2-7b": (QWEN2, {"num_hidden_layers": 28}, ("o_proj", "down_proj"), 0.9999),
    "gpt-2": (gpt2_like(), {"n_layer": 12}, ("attn.c_proj", "mlp.c_proj"), 0.998),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_copied_tensors_land_in_phase_with_their_source(shape):
    specs, config, zero, shared_at_least = SHAPES[shape]
    layout = seed_layout(fake_source(specs, config), zero=zero)
    copied = [p for s in layout.shards for p in s.tensors if isinstance(p.tensor.op, Copy)]
    large = [p for p in copied if p.tensor.nbytes >= 64 << 10]
    out_of_phase = [p.tensor.name for p in large if (p.offset - p.tensor.source.data_start) % BLOCK_BYTES]
    assert out_of_phase == []
    assert layout.copied_bytes == sum(p.tensor.nbytes for p in copied)
    assert layout.shareable_bytes >= shared_at_least * layout.copied_bytes, layout.shareable_bytes / layout.copied_bytes


def test_a_copied_source_file_is_reproduced_byte_for_byte_in_place():
    """Re-sharding only: each output shard holds one source file's data, in one range in phase."""
    source = fake_source(MISTRAL, {"num_hidden_layers": 32})
    recipe = Recipe(
        tuple(LayerSource("m", layer) for layer in range(32)), LayerSource("m", None), LayerSource("m", None)
    )
    layout = plan_layout(make_plan(recipe, {"m": source}))
    assert len(layout.shards) == len(source.checkpoint.shards) == 3
    for shard in layout.shards:
        (run,) = shard.segments()
        assert isinstance(run, CopyRun) and (run.offset - run.src_offset) % BLOCK_BYTES == 0
    assert layout.copied_bytes - layout.shareable_bytes < 3 * 2 * BLOCK_BYTES


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shard_is_covered_without_gaps_by_a_valid_header(shape):
    specs, config, zero, _ = SHAPES[shape]
    source = fake_source(specs, config, shard_bytes=2_000_000_000)
    layout = seed_layout(source, max_shard_bytes=3_000_000_000, zero=zero)
    names = set()
    for shard in layout.shards:
        assert len(shard.header) % 8 == 0
        header = decode_header(shard.header[8:], shard.nbytes, shard.name)  # gaps, overlaps, sizes
        assert [e.name for e in header.tensors] == [p.tensor.name for p in shard.tensors]
        assert shard.tensors[0].offset == len(shard.header) == header.data_start
        assert all(b.offset == a.offset + a.tensor.nbytes for a, b in pairwise(shard.tensors))
        assert shard.header.rstrip(b" ").endswith(b"}") and len(shard.header) - len(shard.header.rstrip()) < 4096
        names.update(p.tensor.name for p in shard.tensors)
    assert len(names) == sum(len(s.tensors) for s in layout.shards), "each tensor once"


def mark(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:4]


def test_headers_load_with_the_reference_reader():
    """A Qwen2-like model small enough to hold in memory: every shard, with data, loads in safetensors."""
    source = fake_source(llama_like(3, 256, 512, 64, 64, bias=True), {"num_hidden_layers": 3}, shard_bytes=1 << 20)
    layout = seed_layout(source, max_shard_bytes=1_500_000)
    assert len(layout.shards) > 2 and layout.shareable_bytes > 0
    for shard in layout.shards:
        data = bytearray(shard.nbytes)
        data[: len(shard.header)] = shard.header
        for placed in shard.tensors:  # each tensor's first bytes say which one it is
            data[placed.offset : placed.offset + 4] = mark(placed.tensor.name)
        loaded = dict(deserialize(bytes(data)))
        assert sorted(loaded) == sorted(p.tensor.name for p in shard.tensors)
        for placed in shard.tensors:
            tensor = loaded[placed.tensor.name]
            assert (tensor["dtype"].upper(), tuple(tensor["shape"])) == ("BF16", placed.tensor.shape)
            assert bytes(tensor["data"][:4]) == mark(placed.tensor.name)


@pytest.mark.parametrize("limit", [300_000_000, 2_000_000_000, 5_000_000_000])
def test_max_shard_size_is_respected_and_a_larger_tensor_gets_a_shard_of_its_own(limit):
    source = fake_source(QWEN2, {"num_hidden_layers": 28})
    layout = seed_layout(source, max_shard_bytes=limit)
    embed = [s for s in layout.shards if any(p.tensor.name == "model.embed_tokens.weight" for p in s.tensors)]
    for shard in layout.shards:
        data = sum(p.tensor.nbytes for p in shard.tensors)
        assert data <= limit or len(shard.tensors) == 1, (shard.name, data)
    if limit < 152064 * 3584 * 2:  # the embedding matrix (1.09 GB) is larger than the limit
        assert [len(s.tensors) for s in embed] == [1]


def test_shard_names_are_fixed_up_front():
    source = fake_source(MISTRAL, {"num_hidden_layers": 32})
    layout = seed_layout(source)
    count = len(layout.shards)
    assert count > 1
    assert [s.name for s in layout.shards] == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    tiny = fake_source(llama_like(2, 64, 128, 32, 32), {"num_hidden_layers": 2})
    assert [s.name for s in seed_layout(tiny).shards] == ["model.safetensors"]


def test_two_runs_give_identical_layouts():
    first = seed_layout(fake_source(QWEN2, {"num_hidden_layers": 28}))
    second = seed_layout(fake_source(QWEN2, {"num_hidden_layers": 28}))
    assert first == second
    assert [s.header for s in first.shards] == [s.header for s in second.shards]


def test_groups_follow_source_files_in_order_of_first_use():
    """The embeddings' file first; within a group the source order, then the inserted copies."""
    source = fake_source(MISTRAL, {"num_hidden_layers": 32})
    layout = seed_layout(source)
    files = [sorted({p.tensor.source.path.name for p in s.tensors}) for s in layout.shards]
    assert all(len(names) == 1 for names in files), "one source file per output shard"
    assert files[0] == [source.before[0].path.name]
    first = [p.tensor.name for p in layout.shards[0].tensors]
    source_first = sorted(t.name for t in source.checkpoint.tensors.values() if t.path == source.before[0].path)
    assert first[: len(source_first)] == source_first
    copies = [
        int(match[1])
        for s in layout.shards
        for p in s.tensors
        if isinstance(p.tensor.op, Copy) and (match := re.match(r"model\.layers\.(3[2-9]|4[0-3])\.", p.tensor.name))
    ]
    assert len(copies) == 12 * 7 and copies == sorted(copies), "inserted copies one after the other"


def test_nothing_copied_means_no_padding():
    source = fake_source(MISTRAL, {"num_hidden_layers": 32})
    recipe = expand_recipe("m", 32, [(31, 2)], zero=("o_proj",), dtype="F16")
    layout = plan_layout(make_plan(recipe, {"m": source}))
    assert layout.copied_bytes == layout.shareable_bytes == 0
    for shard in layout.shards:
        assert len(shard.header) - len(shard.header.rstrip(b" ")) < 8


def test_source_files_share_an_output_shard_only_where_no_shareable_byte_is_lost():
    """Under one limit: source files too small to hold a whole block pack into one output file;
    2048-wide ones keep a shard per source file: the second file's data could not stay in phase."""
    tiny = fake_source(llama_like(4, 8, 12, 4, 16), {"num_hidden_layers": 4}, shard_bytes=600)
    assert len(tiny.checkpoint.shards) > 2
    assert [s.name for s in seed_layout(tiny).shards] == ["model.safetensors"]
    wide = fake_source(llama_like(4, 2048, 512, 128, 64), {"num_hidden_layers": 4}, shard_bytes=60_000_000)
    layout = seed_layout(wide)
    assert len(wide.checkpoint.shards) == len(layout.shards) == 2
    assert layout.shareable_bytes >= 0.999 * layout.copied_bytes
