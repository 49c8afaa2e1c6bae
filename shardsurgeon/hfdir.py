"""The non-weight files of a Hugging Face checkpoint folder: config, index, other files, model card.

Writes into the staging folder only; never touches tensor bytes and never writes to the source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shardsurgeon.checkpoint import INDEX_FILE
from shardsurgeon.layout import Layout
from shardsurgeon.output import fsync_file
from shardsurgeon.plan import Plan

NOT_COPIED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".ot", ".tflite", ".onnx",
    ".npz", ".pb", ".mlmodel", ".mlpackage", ".tar", ".zip",
)  # fmt: skip
"""Weights in any format: they describe the source's layers, not the output's."""
NOT_COPIED_NAMES = frozenset(
    {"config.json", "README.md", "model.safetensors.index.json", "params.json", "mergekit_config.yml"}
)
"""Rewritten here (config, index, card), or stale: Mistral's native ``params.json`` counts layers."""


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_file(path)


def write_index(folder: Path, layout: Layout) -> None:
    """The index json, only when there is more than one shard (like transformers)."""
    if len(layout.shards) == 1:
        return
    weight_map = {p.tensor.name: s.name for s in layout.shards for p in s.tensors}
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": layout.total_size}, "weight_map": weight_map})


def other_files(source: Path) -> list[Path]:
    """Top-level files of the source to carry over as they are: tokenizer, generation config..."""
    return sorted(
        entry
        for entry in source.iterdir()
        if entry.is_file()
        and not entry.name.startswith(".")
        and entry.name not in NOT_COPIED_NAMES
        and not entry.name.endswith(NOT_COPIED_SUFFIXES)
        and not entry.name.startswith("pytorch_model")
    )


def copy_other_files(source: Path, folder: Path) -> list[str]:
    copied = []
    for entry in other_files(source):
        shutil.copyfile(entry, folder / entry.name)
        fsync_file(folder / entry.name)
        copied.append(entry.name)
    return copied


def model_card(plan: Plan, base_models: list[str], command: str, what: str, mergekit_yaml: str) -> str:
    """The README.md of the output: front matter, what was done, how, and the mergekit config."""
    base = base_models[0] if len(base_models) == 1 else "".join(f"\n- {m}" for m in base_models)
    title = base_models[0] if len(base_models) == 1 else " + ".join(base_models)
    extra_tags = "\n- block-expansion" if any(s.inserted for s in plan.recipe.layers) else ""
    return f"""---
base_model: {base}
library_name: transformers
tags:
- shardsurgeon
- mergekit
- merge{extra_tags}
---

# {title}, {plan.output_layers} layers

{what}

Made with [shardsurgeon](https://pypi.org/project/shardsurgeon/) by:

```sh
{command}
```

The same checkpoint as a mergekit passthrough config:

```yaml
{mergekit_yaml.rstrip()}
```
"""
