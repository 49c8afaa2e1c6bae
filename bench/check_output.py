"""A quick sanity check of a seed-recipe output, so a benchmark never times a wrong result silently.

Reads the output with the reference ``safetensors`` reader (headers, a few rows and one zeroed
tensor), never anything of model size. Checks: the layer count in config.json, the tensor names, the
dtype, that an appended copy holds the last source layer's values, and that its ``o_proj`` and
``down_proj`` read as zeros. It is no substitute for the test suite; it only catches a benchmark
that measures the wrong thing.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
NUMPY_DTYPES: dict[str, type] = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


def open_all(stack: ExitStack, folder: Path) -> dict[str, Any]:
    """Map every tensor name to the open reader of the shard that holds it."""
    readers: dict[str, Any] = {}
    for path in shard_files(folder):
        reader = stack.enter_context(safe_open(path, framework="numpy"))
        readers.update(dict.fromkeys(reader.keys(), reader))
    return readers


def expected_names(source_names: set[str], layers: int, copies: int) -> set[str]:
    names = set(source_names)
    last_layer = {m.group(2) for n in source_names if (m := LAYER.match(n)) and int(m.group(1)) == layers - 1}
    for layer in range(layers, layers + copies):
        names |= {f"model.layers.{layer}.{suffix}" for suffix in last_layer}
    return names


def first_row(reader: Any, name: str) -> np.ndarray:
    return np.asarray(reader.get_slice(name)[0:1])


def check_output(src: Path, out: Path, copies: int, dtype: str) -> str | None:
    """Return what is wrong with ``out``, or None if the checks pass."""
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    out_layers = json.loads((out / "config.json").read_text()).get("num_hidden_layers")
    if out_layers != layers + copies:
        return f"config.json num_hidden_layers is {out_layers}, expected {layers + copies}"
    with ExitStack() as stack:
        source, output = open_all(stack, src), open_all(stack, out)
        if set(output) != expected_names(set(source), layers, copies):
            extra = sorted(set(output) ^ expected_names(set(source), layers, copies))[:3]
            return f"tensor names differ from the expected ones, e.g. {extra}"
        dtypes = {output[name].get_slice(name).get_dtype() for name in output}
        if dtypes != {dtype}:
            return f"output dtypes are {sorted(dtypes)}, expected {dtype}"
        return check_values(source, output, layers, dtype)


def check_values(source: dict[str, Any], output: dict[str, Any], layers: int, dtype: str) -> str | None:
    last, copy = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    pairs = [
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        (last + "self_attn.q_proj.weight", last + "self_attn.q_proj.weight"),
        (last + "self_attn.q_proj.weight", copy + "self_attn.q_proj.weight"),
        (last + "mlp.up_proj.weight", copy + "mlp.up_proj.weight"),
    ]
    for source_name, output_name in pairs:
        want: np.ndarray = first_row(source[source_name], source_name).astype(NUMPY_DTYPES[dtype])
        if first_row(output[output_name], output_name).tobytes() != want.tobytes():
            return f"{output_name}: first row differs from source {source_name} (as {dtype})"
    for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        tensor = output[copy + suffix].get_tensor(copy + suffix)
        if np.any(tensor.view(np.uint8)):
            return f"{copy + suffix}: expected all +0.0, found non-zero bytes"
    return None
