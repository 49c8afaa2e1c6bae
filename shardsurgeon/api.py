"""The library's front door: plan a job from the user's terms, then run it.

A :class:`Job` is everything decided before writing: the resolved sources, the recipe, the plan,
the layout, and the texts of the model card. ``plan_expand`` (and ``plan_merge`` for mergekit
configs) build one; :func:`run_job` writes it. The user's words about the layer stack
(``StackHint``) stop here: each model is resolved once into a :class:`Source`, which everything
after consumes. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import RecipeError
from shardsurgeon.format import CAST_TARGETS, cast_target
from shardsurgeon.model.arch import (
    DEFAULT_RESIDUAL_OUTPUTS,
    NO_HINT,
    RESIDUAL_OUTPUTS,
    StackHint,
    model_type,
    resolve_zero_filters,
)
from shardsurgeon.model.hfcache import card_names, hub_id, is_hub_id, resolve_model
from shardsurgeon.model.source import Source, open_source
from shardsurgeon.plan.layout import DEFAULT_MAX_SHARD_BYTES, RECIPE_METADATA_KEY, Layout, plan_layout
from shardsurgeon.plan.mergekit import merge_recipe, parse_config, to_mergekit_yaml
from shardsurgeon.plan.planner import Plan, make_plan
from shardsurgeon.plan.recipe import Recipe, expand_recipe, recipe_to_json
from shardsurgeon.plan.report import describe_expansion, describe_merge
from shardsurgeon.storage.remote import is_url
from shardsurgeon.storage.smallfile import MAX_RECIPE_BYTES, read_small
from shardsurgeon.units import Progress, ShardStarted
from shardsurgeon.write.executor import Reflink
from shardsurgeon.write.run import RunResult, write_checkpoint
from shardsurgeon.write.runners import Runner
from shardsurgeon.write.smallfiles import CardModel, model_card, source_license


@dataclass(frozen=True, slots=True)
class Job:
    """A planned rewrite of ``sources`` (by the model references of the recipe)."""

    sources: dict[str, Source]
    recipe: Recipe
    plan: Plan
    layout: Layout
    description: str
    mergekit_yaml: str
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    stack_hint: StackHint = NO_HINT

    @property
    def card_names(self) -> dict[str, str]:
        """The name the model card, its command and its mergekit config give each model reference:
        its Hugging Face id where known, else its folder's name (never a path)."""
        return _card_names(self.sources)

    def card_models(self) -> list[CardModel]:
        """The models as the card names them, the config donor first, each with the license its
        own card (README.md) or config declares."""
        names, models = self.card_names, {}
        for reference in self.recipe.models:
            source = self.sources[reference]
            if names[reference] not in models:
                models[names[reference]] = CardModel(
                    names[reference], hub_id(source.folder, source.config), source_license(source.folder, source.config)
                )
        return list(models.values())


def plan_expand(
    src: str | Path,
    *,
    dups: Sequence[tuple[int, int]] = (),
    every: int | None = None,
    zero: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
) -> Job:
    """Plan ``expand``: copies of layers inserted after their source, some tensors zeroed.

    ``src`` is a folder, or a Hugging Face id (``org/name[@revision]``) found in the local cache
    when no folder has that path. ``zero`` may hold ``residual``, which names the architecture's
    residual-output projections; ``dtype`` is a torch name (``bfloat16``) or a safetensors one (``BF16``).
    """
    reference = str(src)
    folder = resolve_model(reference, Path.cwd()) if is_hub_id(reference) and not Path(src).exists() else src
    source = open_source(folder, stack_hint, reference)
    filters = resolve_zero_filters(zero, source.config, source.stack, source.layer_rests())
    cast_to = None
    if dtype is not None:
        cast_to = cast_target(dtype)
        if cast_to is None:
            raise RecipeError(f"--dtype {dtype!r}: expected one of {', '.join(CAST_TARGETS)}")
    recipe = expand_recipe(source.reference, source.layer_count, dups, every, filters, cast_to)
    sources = {source.reference: source}
    plan = make_plan(recipe, sources)
    names = _card_names(sources)
    return Job(
        sources,
        recipe,
        plan,
        job_layout(recipe, plan, sources, max_shard_bytes),
        describe_expansion(plan, names[source.reference], _blocks_are_identities(source, recipe, filters)),
        to_mergekit_yaml(recipe, sources, names),
        max_shard_bytes,
        stack_hint,
    )


def plan_merge(
    config_path: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
    hub_cache: Path | None = None,
) -> Job:
    """Plan a mergekit passthrough config; models resolve against the config's folder or the HF cache
    (``hub_cache``, default: HF_HUB_CACHE or HF_HOME's)."""
    path = Path(config_path)
    try:
        text = read_small(path, MAX_RECIPE_BYTES, RecipeError, "a mergekit YAML config").decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: is not a text file; expected a mergekit YAML config") from None
    spec = parse_config(text, str(path))
    sources = {
        model: open_source(resolve_model(model, path.parent, hub_cache), stack_hint, model) for model in spec.models
    }
    recipe = merge_recipe(spec, lambda model: sources[model].layer_count)
    plan = make_plan(recipe, sources)
    names = _card_names(sources)
    return Job(
        sources,
        recipe,
        plan,
        job_layout(recipe, plan, sources, max_shard_bytes),
        describe_merge(plan, names, path.name),
        to_mergekit_yaml(recipe, sources, names),
        max_shard_bytes,
        stack_hint,
    )


def job_layout(recipe: Recipe, plan: Plan, sources: dict[str, Source], max_shard_bytes: int) -> Layout:
    """The shards, each recording the recipe by published model names so ``verify`` can re-derive it."""
    names = {model: source.published_name for model, source in sources.items()}
    return plan_layout(plan, max_shard_bytes, {RECIPE_METADATA_KEY: recipe_to_json(recipe, names)})


def run_job(
    job: Job,
    out: str | Path,
    *,
    command: str,
    force: bool = False,
    dense: bool = False,
    reflink: Reflink = "auto",
    checksums: bool = False,
    progress: Progress | None = None,
    on_shard: ShardStarted | None = None,
    runner: Runner | None = None,
) -> RunResult:
    """Write ``job`` to ``out``; ``command`` is the command line recorded in the model card.

    ``progress``, ``on_shard`` and ``runner`` (who writes the shards) are :func:`write_checkpoint`'s.
    ``reflink`` says whether copies share blocks with the source where the filesystem can
    (``auto``), must (``always``: refused up front otherwise) or never do; the output bytes are the
    same.
    """
    return write_checkpoint(
        job.plan,
        job.layout,
        out if is_url(out) else Path(out),
        job.sources,
        model_card=card_of(job, command),
        force=force,
        dense=dense,
        reflink=reflink,
        checksums=checksums,
        progress=progress,
        on_shard=on_shard,
        runner=runner,
    )


def card_of(job: Job, command: str) -> str:
    """The model card of ``job``'s output, recording ``command``."""
    return model_card(job.plan, job.card_models(), command, job.description, job.mergekit_yaml)


def _card_names(sources: dict[str, Source]) -> dict[str, str]:
    return card_names([(ref, _real(source.folder), source.published_name) for ref, source in sources.items()])


def _real(folder: Path | str) -> Path | str:
    return folder.resolve() if isinstance(folder, Path) else folder


def _blocks_are_identities(source: Source, recipe: Recipe, zero: Sequence[str]) -> bool:
    """Whether every inserted copy passes its input through unchanged: each of its tensors that writes
    into the residual stream (per the architecture) is zeroed by a ``zero`` filter."""
    residual = RESIDUAL_OUTPUTS.get(model_type(source.config, source.stack), DEFAULT_RESIDUAL_OUTPUTS)
    copied = {s.layer for s in recipe.layers if s.inserted and s.layer is not None}
    outputs = [rest for layer in copied for rest in source.layer_rests(layer) if any(r in rest for r in residual)]
    return bool(outputs) and all(any(part in rest for part in zero) for rest in outputs)
