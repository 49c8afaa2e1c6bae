"""Describe a checkpoint in words: layer stack, tensors per layer, dtypes, parameters, shards. Pure."""

from __future__ import annotations

from collections import Counter

from shardsurgeon.errors import PlanError, safe_text
from shardsurgeon.format import numel
from shardsurgeon.model.arch import NO_HINT, StackHint, residual_outputs
from shardsurgeon.model.checkpoint import Checkpoint
from shardsurgeon.model.source import resolve
from shardsurgeon.storage.remote import file_name
from shardsurgeon.units import format_bytes


def describe_checkpoint(checkpoint: Checkpoint, hint: StackHint = NO_HINT) -> str:
    config = checkpoint.config
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if not isinstance(architectures, list):
        architectures = [architectures]
    params = sum(numel(t.shape) for t in checkpoint.tensors.values())
    dtypes = Counter(t.dtype for t in checkpoint.tensors.values())
    lines = [
        f"{safe_text(checkpoint.folder)}",
        f"  architecture: {', '.join(map(str, architectures))} (model_type {config.get('model_type', '?')})",
        f"  tensors: {len(checkpoint.tensors)}, parameters: {params:,} ({_count(params)}), "
        f"dtypes: {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}",
        f"  shards: {len(checkpoint.shards)}, {format_bytes(checkpoint.nbytes)} of tensor data",
    ]
    lines += [f"    {safe_text(file_name(s.path))}  {s.nbytes:,} bytes" for s in checkpoint.shards]
    try:
        source = resolve(checkpoint, hint, str(checkpoint.folder))
    except PlanError as e:
        lines.append(f"  layer stack: not found: {e}")
        return "\n".join(lines)
    stack = source.stack
    lines.append(f"  layer stack: {stack.prefix}.N, {stack.count} layers (config {stack.count_path})")
    layer0 = source.layers[0]
    layer_params = sum(numel(t.ref.shape) for t in layer0)
    lines.append(f"  per layer: {len(layer0)} tensors, {layer_params:,} parameters (layer 0):")
    lines += [f"    {safe_text(t.rest):<40} {t.ref.dtype:<5} {list(t.ref.shape)}" for t in layer0]
    rests = source.layer_rests()
    try:
        residual = residual_outputs(config, stack, rests)
        selected = [rest for rest in rests if any(r in rest for r in residual)]
        lines.append(f"  --zero residual selects {', '.join(residual)}: {', '.join(selected)}")
    except PlanError as e:
        lines.append(f"  --zero residual: {e}")
    outside = source.before + source.after
    lines.append(f"  outside the stack: {len(outside)} tensors")
    lines += [f"    {safe_text(t.name):<40} {t.dtype:<5} {list(t.shape)}" for t in outside]
    return "\n".join(lines)


def _count(params: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if params >= size:
            return f"{params / size:.2f}{unit}"
    return str(params)
