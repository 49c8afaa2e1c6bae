"""Describe a checkpoint in words: layer stack, tensors per layer, dtypes, parameters, shards. Pure."""

from __future__ import annotations

from collections import Counter

from shardsurgeon.arch import find_layer_stack, residual_outputs
from shardsurgeon.checkpoint import Checkpoint
from shardsurgeon.errors import PlanError
from shardsurgeon.format import numel
from shardsurgeon.layout import format_bytes


def describe_checkpoint(checkpoint: Checkpoint, layer_prefix: str | None = None, layers_key: str | None = None) -> str:
    config = checkpoint.config
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    params = sum(numel(t.shape) for t in checkpoint.tensors.values())
    dtypes = Counter(t.dtype for t in checkpoint.tensors.values())
    lines = [
        f"{checkpoint.folder}",
        f"  architecture: {', '.join(map(str, architectures))} (model_type {config.get('model_type', '?')})",
        f"  tensors: {len(checkpoint.tensors)}, parameters: {params:,} ({_count(params)}), "
        f"dtypes: {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}",
        f"  shards: {len(checkpoint.shards)}, {format_bytes(checkpoint.nbytes)} of tensor data",
    ]
    lines += [f"    {s.path.name}  {s.nbytes:,} bytes" for s in checkpoint.shards]
    try:
        stack = find_layer_stack(checkpoint.tensors, config, layer_prefix, layers_key)
    except PlanError as e:
        lines.append(f"  layer stack: not found: {e}")
        return "\n".join(lines)
    key = ".".join((*stack.config_section, stack.count_key))
    lines.append(f"  layer stack: {stack.prefix}.N, {stack.count} layers (config {key})")
    layer0 = [(stack.split(n), t) for n, t in checkpoint.tensors.items()]
    per_layer = [(split[1], t) for split, t in layer0 if split is not None and split[0] == 0]
    layer_params = sum(numel(t.shape) for _, t in per_layer)
    lines.append(f"  per layer: {len(per_layer)} tensors, {layer_params:,} parameters (layer 0):")
    lines += [f"    {rest:<40} {t.dtype:<5} {list(t.shape)}" for rest, t in per_layer]
    try:
        residual = residual_outputs(config, stack, [rest for rest, _ in per_layer])
        selected = [rest for rest, _ in per_layer if any(r in rest for r in residual)]
        lines.append(f"  --zero residual selects {', '.join(residual)}: {', '.join(selected)}")
    except PlanError as e:
        lines.append(f"  --zero residual: {e}")
    outside = [t for n, t in checkpoint.tensors.items() if stack.split(n) is None]
    lines.append(f"  outside the stack: {len(outside)} tensors")
    lines += [f"    {t.name:<40} {t.dtype:<5} {list(t.shape)}" for t in outside]
    return "\n".join(lines)


def _count(params: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if params >= size:
            return f"{params / size:.2f}{unit}"
    return str(params)
