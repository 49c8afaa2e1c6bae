"""The library's front door: plan a job from the user's terms, then run it.

A :class:`Job` is everything decided before writing: the opened sources, the recipe, the plan, the
layout, and the texts of the model card. ``plan_expand`` (and ``plan_merge`` for mergekit configs)
build one; :func:`run_job` writes it. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.arch import find_layer_stack, resolve_zero_filters
from shardsurgeon.checkpoint import Checkpoint, open_checkpoint
from shardsurgeon.errors import OutputError, RecipeError
from shardsurgeon.format import DTYPE_ALIASES, TORCH_DTYPE_NAMES
from shardsurgeon.hfcache import resolve_model
from shardsurgeon.hfdir import base_model_id, model_card
from shardsurgeon.layout import DEFAULT_MAX_SHARD_BYTES, RECIPE_METADATA_KEY, Layout, plan_layout
from shardsurgeon.mergekit import merge_recipe, parse_config, to_mergekit_yaml
from shardsurgeon.output import check_outside_sources
from shardsurgeon.plan import Plan, make_plan
from shardsurgeon.recipe import Recipe, expand_recipe, recipe_to_json
from shardsurgeon.report import describe_expansion, describe_merge, plan_json
from shardsurgeon.rewrite import Progress, RunResult, write_checkpoint


@dataclass(frozen=True, slots=True)
class Job:
    """A planned rewrite. ``names`` maps each model reference to the name published in the card."""

    checkpoints: dict[str, Checkpoint]
    recipe: Recipe
    plan: Plan
    layout: Layout
    names: dict[str, str]
    description: str
    mergekit_yaml: str

    @property
    def base_models(self) -> list[str]:
        """Published names of the models, the config donor first."""
        return list(dict.fromkeys(self.names[m] for m in self.recipe.models))


def plan_expand(
    src: str | Path,
    *,
    dups: Sequence[tuple[int, int]] = (),
    every: int | None = None,
    zero: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layer_prefix: str | None = None,
    layers_key: str | None = None,
) -> Job:
    """Plan ``expand``: copies of layers inserted after their source, some tensors zeroed.

    ``zero`` may hold ``residual``, which names the architecture's residual-output projections;
    ``dtype`` is a torch name (``bfloat16``) or a safetensors one (``BF16``).
    """
    checkpoint = open_checkpoint(src)
    model = str(src)
    stack = find_layer_stack(checkpoint.tensors, checkpoint.config, layer_prefix, layers_key)
    layer_names = [split[1] for split in map(stack.split, checkpoint.tensors) if split is not None]
    filters = resolve_zero_filters(zero, checkpoint.config, stack, layer_names)
    cast_to = DTYPE_ALIASES.get(dtype, dtype) if dtype else None
    recipe = expand_recipe(model, stack.count, dups, every, filters, cast_to)
    plan = make_plan(recipe, {model: checkpoint}, layer_prefix=layer_prefix, layers_key=layers_key)
    names = {model: base_model_id(checkpoint.folder, checkpoint.config)}
    return Job(
        {model: checkpoint},
        recipe,
        plan,
        plan_layout(plan, max_shard_bytes, {RECIPE_METADATA_KEY: recipe_to_json(recipe, names)}),
        names,
        describe_expansion(plan, names[model]),
        to_mergekit_yaml(
            recipe,
            names,
            TORCH_DTYPE_NAMES[cast_to] if cast_to else None,
            [t.name for t in plan.tensors if stack.split(t.name) is None],
        ),
    )


def plan_merge(
    config_path: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layer_prefix: str | None = None,
    layers_key: str | None = None,
) -> Job:
    """Plan a mergekit passthrough config; models resolve against the config's folder or the HF cache."""
    path = Path(config_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: is not a text file; expected a mergekit YAML config") from None
    spec = parse_config(text, str(path))
    checkpoints = {model: open_checkpoint(resolve_model(model, path.parent)) for model in spec.models}
    stacks = {
        model: find_layer_stack(c.tensors, c.config, layer_prefix, layers_key) for model, c in checkpoints.items()
    }
    recipe = merge_recipe(spec, lambda model: stacks[model].count)
    plan = make_plan(recipe, checkpoints, layer_prefix=layer_prefix, layers_key=layers_key)
    names = {model: base_model_id(c.folder, c.config) for model, c in checkpoints.items()}
    return Job(
        checkpoints,
        recipe,
        plan,
        plan_layout(plan, max_shard_bytes, {RECIPE_METADATA_KEY: recipe_to_json(recipe, names)}),
        names,
        describe_merge(plan, names),
        text,
    )


def write_plan_json(job: Job, path: str | Path) -> None:
    """Save the plan as JSON at ``path``, which must not lie inside a source."""
    check_outside_sources(Path(path), [c.folder for c in job.checkpoints.values()], "--plan-json", "file")
    try:
        Path(path).write_bytes(plan_json(job.plan, job.layout))
    except OSError as e:
        raise OutputError(f"--plan-json {path}: cannot write: {e.strerror or e}") from None


def run_job(
    job: Job,
    out: str | Path,
    *,
    command: str,
    force: bool = False,
    dense: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Write ``job`` to ``out``; ``command`` is the command line recorded in the model card."""
    card = model_card(job.plan, job.base_models, command, job.description, job.mergekit_yaml)
    return write_checkpoint(
        job.plan,
        job.layout,
        Path(out),
        job.checkpoints,
        model_card=card,
        force=force,
        dense=dense,
        progress=progress,
    )
