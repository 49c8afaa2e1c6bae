"""Generate a synthetic bf16 Hugging Face checkpoint with real tensor names and shapes, streamed.

Owns the benchmark shapes (``tiny``, ``1b``, ``7b``, ``wide``), their shard layout, and writing the
folder: safetensors shards, ``model.safetensors.index.json``, ``config.json`` and a small
``tokenizer_config.json``. Tensor values are random bit patterns masked to finite bf16 (magnitude
below 2); they are not realistic, only finite and incompressible.

Memory stays flat whatever the model size: each shard's data region is one contiguous stream of
random bytes written in fixed-size chunks, so no buffer is ever as large as a tensor. The folder is
written under ``<name>.partial`` and renamed when complete, so an existing folder is a finished one.

Must not import anything from shardsurgeon but ``format.encode_header``, so the benchmark's input
does not depend on the code it measures.

    python bench/make_checkpoint.py --shape 7b --out /tmp/src-7b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardsurgeon.format import encode_header

CHUNK_BYTES = 8 * 1024 * 1024
BF16_NBYTES = 2
FINITE_BF16_MASK = 0xBFFF_BFFF_BFFF_BFFF
"""Clears the top exponent bit of each bf16 lane: the exponent can never be all ones (inf/NaN)."""
DISK_MARGIN_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class Shape:
    """A decoder-only Llama/Mistral model's dimensions and how its checkpoint is sharded."""

    name: str
    architecture: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", "LlamaForCausalLM", "llama", 2, 64, 160, 4, 2, 320, max_shard_bytes=100_000),
        Shape("1b", "LlamaForCausalLM", "llama", 22, 2048, 5632, 32, 4, 32000),
        Shape("7b", "MistralForCausalLM", "mistral", 32, 4096, 14336, 32, 8, 32002),
        Shape("wide", "LlamaForCausalLM", "llama", 2, 4096, 1024, 32, 8, 256000, tie_word_embeddings=True),
    )
}
"""``1b`` is TinyLlama-1.1B, ``7b`` is Mistral-7B as in openchat-3.5-0106 (3 shards of about 5 GB),
``wide`` is a 2 GB tied embedding (256000 x 4096) with two small layers; ``tiny`` is for self-tests
and is split into several shards so that shard boundaries are exercised."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = BF16_NBYTES
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard file: tensors in data order (sorted by name, as the reference writer does)."""

    file_name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def data_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        entries = [(t.name, "BF16", t.shape, t.nbytes) for t in self.tensors]
        return encode_header(entries, {"format": "pt"})


def layer_tensors(shape: Shape, layer: int) -> list[TensorSpec]:
    """One decoder layer's tensors in ``state_dict`` order."""
    hidden, inter, prefix = shape.hidden_size, shape.intermediate_size, f"model.layers.{layer}."
    return [
        TensorSpec(prefix + "self_attn.q_proj.weight", (hidden, hidden)),
        TensorSpec(prefix + "self_attn.k_proj.weight", (shape.kv_dim, hidden)),
        TensorSpec(prefix + "self_attn.v_proj.weight", (shape.kv_dim, hidden)),
        TensorSpec(prefix + "self_attn.o_proj.weight", (hidden, hidden)),
        TensorSpec(prefix + "mlp.gate_proj.weight", (inter, hidden)),
        TensorSpec(prefix + "mlp.up_proj.weight", (inter, hidden)),
        TensorSpec(prefix + "mlp.down_proj.weight", (hidden, inter)),
        TensorSpec(prefix + "input_layernorm.weight", (hidden,)),
        TensorSpec(prefix + "post_attention_layernorm.weight", (hidden,)),
    ]


def model_tensors(shape: Shape) -> list[TensorSpec]:
    """Every tensor of the model in ``state_dict`` order (the order transformers shards in)."""
    tensors = [TensorSpec("model.embed_tokens.weight", (shape.vocab_size, shape.hidden_size))]
    for layer in range(shape.num_hidden_layers):
        tensors += layer_tensors(shape, layer)
    tensors.append(TensorSpec("model.norm.weight", (shape.hidden_size,)))
    if not shape.tie_word_embeddings:
        tensors.append(TensorSpec("lm_head.weight", (shape.vocab_size, shape.hidden_size)))
    return tensors


def shard_layout(shape: Shape) -> list[ShardSpec]:
    """Split greedily in ``state_dict`` order like huggingface_hub; name files like transformers."""
    groups: list[list[TensorSpec]] = [[]]
    group_nbytes = 0
    for tensor in model_tensors(shape):
        if groups[-1] and group_nbytes + tensor.nbytes > shape.max_shard_bytes:
            groups.append([])
            group_nbytes = 0
        groups[-1].append(tensor)
        group_nbytes += tensor.nbytes
    if len(groups) == 1:
        return [ShardSpec("model.safetensors", tuple(sorted(groups[0], key=lambda t: t.name)))]
    count = len(groups)
    return [
        ShardSpec(f"model-{i:05d}-of-{count:05d}.safetensors", tuple(sorted(group, key=lambda t: t.name)))
        for i, group in enumerate(groups, start=1)
    ]


def checkpoint_nbytes(shape: Shape) -> int:
    """Bytes the shard files take on disk (headers included; JSON files are negligible)."""
    return sum(len(s.header()) + s.data_nbytes for s in shard_layout(shape))


def layer_nbytes(shape: Shape) -> int:
    return sum(t.nbytes for t in layer_tensors(shape, 0))


def config_json(shape: Shape) -> dict[str, object]:
    """A config.json as transformers writes it for this architecture."""
    config: dict[str, object] = {
        "architectures": [shape.architecture],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 32768 if shape.model_type == "mistral" else 2048,
        "model_type": shape.model_type,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }
    if shape.model_type == "mistral":
        config["sliding_window"] = 4096
    return config


def tokenizer_config_json() -> dict[str, object]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 2048,
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


class NotEnoughSpace(Exception):
    """The target filesystem has less free space than the job needs."""


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` or, if it does not exist, its nearest parent."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_free_space(path: Path, need_nbytes: int, what: str) -> None:
    have = free_bytes(path)
    if have < need_nbytes + DISK_MARGIN_BYTES:
        raise NotEnoughSpace(
            f"{what} needs {need_nbytes / 1e9:.2f} GB in {path} but its filesystem has only "
            f"{have / 1e9:.2f} GB free; free some space or pick a folder on a larger disk"
        )


def random_chunks(nbytes: int, seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """``nbytes`` of finite random bf16 in views of at most ``chunk_bytes`` (one chunk alive at a time)."""
    bit_generator = np.random.PCG64(seed)
    remaining = nbytes
    while remaining:
        step = min(chunk_bytes, remaining)
        words = bit_generator.random_raw(-(-step // 8))
        np.bitwise_and(words, np.uint64(FINITE_BF16_MASK), out=words)
        yield words.data.cast("B")[:step]
        remaining -= step


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def write_shard(path: Path, shard: ShardSpec, seed: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write header then data; the data region is one random stream, tensor boundaries need no care."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(shard.header()))
        for chunk in random_chunks(shard.data_nbytes, seed, chunk_bytes):
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def index_json(shards: list[ShardSpec]) -> dict[str, object]:
    total = sum(s.data_nbytes for s in shards)
    weight_map = {t.name: s.file_name for s in shards for t in s.tensors}
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def make_checkpoint(
    shape: Shape,
    out: Path,
    seed: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the checkpoint of ``shape`` to ``out`` (which must not exist) and return ``out``."""
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or pick another folder")
    check_free_space(out, checkpoint_nbytes(shape), f"the {shape.name} checkpoint")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = shard_layout(shape)
    for number, shard in enumerate(shards):
        if progress:
            progress(f"writing {shard.file_name} ({shard.data_nbytes / 1e9:.2f} GB)")
        write_shard(partial / shard.file_name, shard, seed * 1000 + number, chunk_bytes)
    write_json(partial / INDEX_NAME, index_json(shards))
    write_json(partial / "config.json", config_json(shape))
    write_json(partial / "tokenizer_config.json", tokenizer_config_json())
    partial.rename(out)
    return out


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES // (1024 * 1024))
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    try:
        make_checkpoint(shape, args.out, args.seed, args.chunk_mib * 1024 * 1024, _progress)
    except (NotEnoughSpace, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {shape.name}, {checkpoint_nbytes(shape) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
