"""A small Mistral-shaped checkpoint to try the tool on, and a writer for small test checkpoints.

``shardsurgeon demo`` builds one in a temporary folder, runs the seed recipe on it and checks the
result, since no real model can be downloaded everywhere. The arrays here are small by design;
this module is not on the streaming path.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from shardsurgeon.errors import DestinationError, OutputError, safe_text
from shardsurgeon.format import DTYPES, encode_header

DEMO_SHAPE = {"layers": 32, "hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "vocab": 256}
DEMO_SOURCE, DEMO_OUTPUT = "mistral-32", "mistral-44"
"""The folders ``demo`` builds in its folder: the source checkpoint and the expanded one."""


def demo_folders(root: Path, force: bool) -> tuple[Path, Path]:
    """The demo's source and output folders in ``root`` (``--keep``), checked before anything is built.

    Refuses a ``root`` that is a file, and demo folders already there unless ``force`` (never a
    link or a file by those names). With ``force`` an earlier demo source is removed here; the
    output is replaced by the run itself, which does so crash-safely.
    """
    shown = f"--keep {safe_text(root)}"
    existing = next((p for p in (root.absolute(), *root.absolute().parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == root.absolute() else f"is inside {safe_text(existing)}, a file"
        raise DestinationError(f"{shown}: {where}; give a folder to build the demo checkpoints in")
    src, out = root / DEMO_SOURCE, root / DEMO_OUTPUT
    for path in (src, out):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise DestinationError(
                f"{shown}: {safe_text(path)} exists and is not a folder; remove it or choose another folder for --keep"
            )
        if path.exists() and not force:
            raise DestinationError(
                f"{shown}: {safe_text(path)} already exists; pass --force to replace it, or choose another folder "
                "for --keep"
            )
    if src.exists():
        try:
            shutil.rmtree(src)
        except OSError as e:
            raise OutputError(f"{safe_text(src)}: cannot remove the earlier demo source: {e.strerror or e}") from None
    return src, out


def dtype_name(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if dtype.numpy == array.dtype and name != "C64":
            return name
    raise ValueError(f"no safetensors dtype for numpy {array.dtype}")


def save_checkpoint(
    folder: Path,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    shards: int = 1,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` as a Hugging Face checkpoint in ``shards`` files (index when more than one)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    size = -(-len(names) // shards)
    groups = [names[i : i + size] for i in range(0, len(names), size)]  # consecutive, as real shards are
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = "model.safetensors" if shards == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        arrays = [np.ascontiguousarray(tensors[n]) for n in group]
        header = encode_header(
            [(n, dtype_name(a), a.shape, a.nbytes) for n, a in zip(group, arrays, strict=True)],
            {"format": "pt"},
        )
        with open(folder / file_name, "wb") as f:
            f.write(header)
            for array in arrays:
                f.write(array.tobytes())
        weight_map.update(dict.fromkeys(group, file_name))
    if shards > 1:
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def mistral_config(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, Any]:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def mistral_tensors(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, np.ndarray]:
    """Mistral tensor names and shapes; every tensor's values are seeded by its own name."""
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return {name: _values(name, shape) for name, shape in shapes.items()}


def _values(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)


def demo_tokenizer(size: int) -> str:
    """A word-level tokenizer.json of ``size`` tokens: ``<unk>``, ``<s>``, ``</s>``, then ``w3``..."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ("<unk>", "<s>", "</s>")
    vocab = {token: i for i, token in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return str(tokenizer.to_str(pretty=True))


def make_demo_checkpoint(folder: Path) -> Path:
    """Build the demo source: 32 Mistral layers in 3 shards, with a tokenizer (its last 24 rows
    padding, as published vocabularies often have) and a tokenizer config."""
    try:
        save_checkpoint(
            folder,
            mistral_tensors(**DEMO_SHAPE),
            mistral_config(**DEMO_SHAPE),
            shards=3,
            extra_files={
                "tokenizer_config.json": json.dumps({"model_max_length": 4096, "bos_token": "<s>"}),
                "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}),
                "tokenizer.json": demo_tokenizer(DEMO_SHAPE["vocab"] - 24),
            },
        )
    except OSError as e:
        raise OutputError(f"{safe_text(folder)}: cannot build the demo checkpoint: {e.strerror or e}") from None
    return folder
