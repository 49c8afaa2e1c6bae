"""The library's front door: plan a job from the user's terms, then run it.

A :class:`Job` is everything decided before writing: the resolved sources, the recipe, the plan,
the layout, and the texts of the model card. ``plan_expand`` (and ``plan_merge`` for mergekit
configs) build one; :func:`run_job` writes it. The user's words about the layer stack
(``StackHint``) stop here: each model is resolved once into a :class:`Source`, which everything
after consumes. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shardsurgeon.errors import DestinationError, RecipeError, safe_text
from shardsurgeon.format import CAST_TARGETS, cast_target
from shardsurgeon.memory import release_freed_memory
from shardsurgeon.model.arch import (
    DEFAULT_RESIDUAL_OUTPUTS,
    NO_HINT,
    RESIDUAL_OUTPUTS,
    StackHint,
    model_type,
    resolve_zero_filters,
)
from shardsurgeon.model.hfcache import hub_id, is_hub_id, resolve_model
from shardsurgeon.model.license import source_license
from shardsurgeon.model.routerfile import RouterFile, open_router_file
from shardsurgeon.model.source import Source, card_names_of, open_source
from shardsurgeon.plan.dense import SharedExpert
from shardsurgeon.plan.experts import (
    KeepSpec,
    dense_change,
    experts_kind,
    parse_keep,
    prune_change,
    upcycle_change,
)
from shardsurgeon.plan.job import Job, job_layout
from shardsurgeon.plan.layout import DEFAULT_MAX_SHARD_BYTES
from shardsurgeon.plan.mergekit import merge_recipe, parse_config, to_mergekit_yaml
from shardsurgeon.plan.mergekit_moe import parse_moe_config
from shardsurgeon.plan.planner import Plan, make_plan
from shardsurgeon.plan.recipe import (
    ExpertChange,
    Recipe,
    Router,
    expand_recipe,
    same_layers_recipe,
)
from shardsurgeon.plan.report import (
    describe_dense,
    describe_expansion,
    describe_merge,
    describe_pruning,
    describe_upcycle,
    describe_vocab,
)
from shardsurgeon.plan.vocab_terms import ZERO_INIT, InitSpec, is_utf8, parse_remap, vocab_change
from shardsurgeon.storage.remote import is_url, normal_url
from shardsurgeon.storage.smallfile import MAX_RECIPE_BYTES, read_small
from shardsurgeon.write.card import CardModel, model_card
from shardsurgeon.write.destination import WHOLE, Destination, Part, RunResult, WriteOptions
from shardsurgeon.write.local.destination import LocalFolder
from shardsurgeon.write.run import write_job


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
    source = _open(src, stack_hint)
    filters = resolve_zero_filters(zero, source.config, source.stack, source.layer_rests())
    recipe = expand_recipe(source.reference, source.layer_count, dups, every, filters, _cast_to(dtype))
    sources = {source.reference: source}
    plan = make_plan(recipe, sources)
    names = card_names_of(sources)
    description = describe_expansion(plan, names[source.reference], _blocks_are_identities(source, recipe, filters))
    return _job(
        sources, recipe, plan, description, to_mergekit_yaml(recipe, sources, names), max_shard_bytes, stack_hint
    )


def plan_upcycle(
    src: str | Path,
    *,
    experts: int,
    top_k: int,
    router_seed: int | None = None,
    router_file: str | Path | None = None,
    layers: Sequence[int] | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
) -> Job:
    """Plan ``upcycle``: each dense MLP of ``layers`` (default: all) becomes ``experts`` copies of
    itself behind a router of zeros, of seeded normal numbers (``router_seed``), or read from a
    safetensors file (``router_file``, a path or URL: each upcycled layer's router under its output
    name), ``top_k`` of them per token (Llama and Mistral to Mixtral, Qwen2 to Qwen2-MoE, Qwen3 to
    Qwen3-MoE)."""
    source = _open(src, stack_hint)
    router = Router(router_seed, None if router_file is None else str(router_file))
    change = upcycle_change(experts, top_k, router, layers, source.config, source.stack)
    return _experts_job(source, change, dtype, describe_upcycle, max_shard_bytes, stack_hint, _router_file(router))


def plan_prune_experts(
    src: str | Path,
    *,
    keep: KeepSpec,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
) -> Job:
    """Plan ``prune-experts``: each layer with experts keeps those ``keep`` names for it (one list
    for every layer, or one per layer), in that order; routers and routing biases keep their rows."""
    source = _open(src, stack_hint)
    change = prune_change(keep, source)
    return _experts_job(source, change, dtype, describe_pruning, max_shard_bytes, stack_hint)


def plan_dense_expert(
    src: str | Path,
    *,
    keep: KeepSpec | None,
    shared_expert: SharedExpert | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
) -> Job:
    """Plan ``prune-experts --to-dense``: a dense model whose every layer with experts has the one
    expert ``keep`` names for it as its MLP (Mixtral to Mistral, Qwen3-MoE to Qwen3, Qwen2-MoE to
    Qwen2), or with ``shared_expert`` take the shared expert; ``drop`` drops it (Qwen2-MoE must say)."""
    source = _open(src, stack_hint)
    change = dense_change(keep, shared_expert, source)
    return _experts_job(source, change, dtype, describe_dense, max_shard_bytes, stack_hint)


def _experts_job(
    source: Source, change: ExpertChange, dtype: str | None, describe: Callable[[Plan, str], str],
    max_shard_bytes: int, stack_hint: StackHint, router_file: RouterFile | None = None,
) -> Job:  # fmt: skip
    """The job of ``change`` to the experts of every layer of ``source``, in place."""
    recipe = same_layers_recipe(source.reference, source.layer_count, change, _cast_to(dtype))
    sources = {source.reference: source}
    plan = make_plan(recipe, sources, router_file)
    description = describe(plan, card_names_of(sources)[source.reference])
    return _job(sources, recipe, plan, description, "", max_shard_bytes, stack_hint, router_file)


def _router_file(router: Router) -> RouterFile | None:
    return None if router.file is None else open_router_file(router.file)


def plan_moe(
    config_path: str | Path,
    *,
    seed: int = 0,
    router_file: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
    hub_cache: Path | None = None,
) -> Job:
    """Plan a mergekit-moe config: the base model's layers with each MLP made experts, expert i the
    MLP of the config's i-th expert model (``gate_mode: random``: routers drawn with ``seed``;
    ``router_file``: the routers of a safetensors file, whatever the ``gate_mode``)."""
    path = Path(config_path)
    try:
        text = read_small(path, MAX_RECIPE_BYTES, RecipeError, "a mergekit-moe YAML config").decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: is not a text file; expected a mergekit-moe YAML config") from None
    spec = parse_moe_config(text, str(path), router_file=router_file is not None)
    models = dict.fromkeys([spec.base, *spec.experts, *([spec.shared] if spec.shared else [])])
    sources = {model: open_source(resolve_model(model, path.parent, hub_cache), stack_hint, model) for model in models}
    base = sources[spec.base]
    if router_file is not None and seed:
        raise RecipeError(f"--seed {seed}: has no effect with --router FILE (the routers come from the file); give one")
    router = Router(seed) if router_file is None else Router(file=str(router_file))
    change = upcycle_change(
        len(spec.experts), spec.top_k, router, None, base.config, base.stack, spec.experts, spec.shared
    )  # fmt: skip
    made = experts_kind(change, base.config, base.stack)
    for model in models:
        if sources[model].layer_count != base.layer_count:
            raise RecipeError(
                f"{path}: {safe_text(model)} has {sources[model].layer_count} layers but the base model "
                f"{safe_text(spec.base)} has {base.layer_count}; experts come from fine-tunes of the base"
            )
    if spec.shared is not None and made is not None and made.shared is None:
        raise RecipeError(
            f"{path}: shared_experts: {made.architecture} has no shared expert (Qwen2-MoE has one); leave it out"
        )
    if spec.architecture is not None and made is not None and made.model_type != spec.architecture:
        raise RecipeError(
            f"{path}: architecture asks for {spec.architecture} but the base model ({base.config.get('model_type')}) "
            f"becomes {made.model_type}"
        )
    recipe = same_layers_recipe(spec.base, base.layer_count, change, spec.dtype)
    opened = _router_file(router)
    plan = make_plan(recipe, sources, opened)
    names = card_names_of(sources)
    description = describe_upcycle(plan, names[spec.base], names)
    return _job(sources, recipe, plan, description, "", max_shard_bytes, stack_hint, opened)


def plan_vocab(
    src: str | Path,
    *,
    add_tokens: Sequence[str] = (),
    special: bool = False,
    init: InitSpec = ZERO_INIT,
    head_init: InitSpec | None = None,
    skip_existing: bool = False,
    pad_to_multiple: int | None = None,
    trim_to: int | None = None,
    remap: Mapping[int, int] | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stack_hint: StackHint = NO_HINT,
) -> Job:
    """Plan ``vocab``: tokens added (their rows started as ``init``, an untied head's as ``head_init``,
    zeros by default), rows padded to a multiple, trimmed, or moved by ``remap`` (source id -> output
    id); the tokenizer files and config made to match, every other tensor copied."""
    source = _open(src, stack_hint)
    change, rows, untied = vocab_change(
        source, add_tokens, special, init, head_init, skip_existing, pad_to_multiple, trim_to, remap
    )
    recipe = same_layers_recipe(source.reference, source.layer_count, None, _cast_to(dtype), change)
    sources = {source.reference: source}
    plan = make_plan(recipe, sources)
    description = describe_vocab(plan, card_names_of(sources)[source.reference], rows, untied)
    job = _job(sources, recipe, plan, description, "", max_shard_bytes, stack_hint)
    job.files  # the token files made now: a tokenizer that cannot match the rows stops the plan  # noqa: B018
    release_freed_memory()  # what the tokenizers library held, before the writing needs its own
    return job


TOKEN_FILE_SUFFIXES = (".txt", ".lst", ".list", ".tokens", ".json", ".jsonl", ".csv", ".tsv")
"""Names that mean a file of tokens: given and missing, they are a typo, not a token to add."""
MAX_TOKENS_BYTES = 16 << 20
"""A file of new tokens: a few thousand lines at most in practice."""


def read_tokens(text: str) -> tuple[str, list[str]]:
    """``--add-tokens``: a file of one token a line (kept exactly, empty lines skipped), or a comma
    list (each token stripped of surrounding spaces); with how the model card's command names it."""
    path = Path(text)
    if path.is_file():
        content = _flag_file(
            "--add-tokens", text, MAX_TOKENS_BYTES, "a file of tokens, one a line",
            "is not UTF-8 text; expected one token a line",
        )  # fmt: skip
        lines = [line.removesuffix("\r") for line in content.split("\n")]
        tokens = [line for line in lines if line]
        shown = path.name
    elif path.suffix.lower() in TOKEN_FILE_SUFFIXES and "," not in text:
        raise RecipeError(
            f"--add-tokens {safe_text(text)}: no such file; give a file of one token a line, or tokens separated "
            "by commas (a token that looks like a file name goes in a file)"
        )
    else:
        tokens = [part.strip() for part in text.split(",")]
        if not all(tokens):
            raise RecipeError(
                f"--add-tokens {safe_text(text, 60)}: expected tokens separated by commas, or a file of one a line"
            )
        shown = text
    if not tokens:
        raise RecipeError(f"--add-tokens {safe_text(text)}: the file holds no token; give one a line")
    if not all(is_utf8(token) for token in tokens):
        raise RecipeError(f"--add-tokens {safe_text(text, 60)}: is not UTF-8 text; give the tokens as UTF-8")
    return shown, tokens


MAX_REMAP_BYTES = 64 << 20
"""A remap of the largest vocabulary (262,144 ids) as indented JSON is about 8 MB."""


def read_remap(text: str) -> dict[int, int]:
    """``--remap FILE``: a JSON object of source ids to output ids."""
    content = _flag_file(
        "--remap", text, MAX_REMAP_BYTES, "a JSON map of token ids", "is not a text file; expected JSON"
    )
    return parse_remap(content, f"--remap {safe_text(text)}")


MAX_KEEP_BYTES = 16 << 20
"""A keep file of a list per layer, indented, for the largest MoE (61 layers of 256 experts) is
about 100 kB; 16 MiB stops a wrong file without refusing any real one."""


def read_keep(text: str) -> tuple[KeepSpec, Path | None]:
    """``--keep``: expert numbers given inline (``0,3,5``, or JSON), or the path of a JSON file of
    them (a list, a list per layer, or an object of layer numbers to lists, as REAP-style scorers
    write); with the file's path, if it was one."""
    stripped = text.strip()
    if stripped[:1].isdigit() or stripped[:1] in ("[", "{", "-"):
        return parse_keep(text), None
    content = _flag_file(
        "--keep", text, MAX_KEEP_BYTES, "a JSON list of the experts to keep", "is not a text file; expected JSON"
    )
    return parse_keep(content, f"--keep {safe_text(text)}"), Path(text)


def _flag_file(flag: str, text: str, limit: int, what: str, not_text: str) -> str:
    """The text of the file a flag names (at most ``limit`` bytes, a BOM dropped); ``not_text``
    completes the refusal of one that is not UTF-8."""
    raw = read_small(Path(text), limit, RecipeError, what)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecipeError(f"{flag} {safe_text(text)}: {not_text}") from None


def _open(src: str | Path, stack_hint: StackHint) -> Source:
    """The model ``src`` names: a folder, a URL, or a Hugging Face id found in the local cache."""
    reference = str(src)
    folder = resolve_model(reference, Path.cwd()) if is_hub_id(reference) and not Path(src).exists() else src
    return open_source(folder, stack_hint, reference)


def _cast_to(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    cast_to = cast_target(dtype)
    if cast_to is None:
        raise RecipeError(f"--dtype {dtype!r}: expected one of {', '.join(CAST_TARGETS)}")
    return cast_to


def _job(
    sources: dict[str, Source], recipe: Recipe, plan: Plan, description: str, mergekit_yaml: str,
    max_shard_bytes: int, stack_hint: StackHint, router_file: RouterFile | None = None,
) -> Job:  # fmt: skip
    layout = job_layout(recipe, plan, sources, max_shard_bytes, router_file)
    return Job(sources, recipe, plan, layout, description, mergekit_yaml, max_shard_bytes, stack_hint, router_file)


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
    names = card_names_of(sources)
    yaml = to_mergekit_yaml(recipe, sources, names)
    return _job(sources, recipe, plan, describe_merge(plan, names, path.name), yaml, max_shard_bytes, stack_hint)


def destination_of(out: str | Path) -> Destination:
    """The destination ``out`` names: a local folder, or an S3 folder (``s3://bucket/folder``); a web
    server is read-only."""
    if not is_url(out):
        return LocalFolder(Path(out))
    out = normal_url(str(out))
    if not out.startswith("s3://"):
        raise DestinationError(
            f"--out {safe_text(out)}: a web server is read-only; write to a local folder or to s3://BUCKET/FOLDER"
        )
    from shardsurgeon.write.s3.destination import S3Destination  # boto3 loads only for an S3 output

    return S3Destination(str(out))


def run_job(
    job: Job, out: str | Path, *, command: str, options: WriteOptions | None = None, part: Part = WHOLE
) -> RunResult:
    """Write ``part`` of ``job`` (default: all of it, published) to ``out``; ``command`` is the
    command line recorded in the model card. ``options`` say how (:class:`WriteOptions`: ``force``,
    ``dense``, ``reflink``, ``checksums``, the runner and the progress callbacks)."""
    options = options or WriteOptions()
    destination = destination_of(out)
    if options.reflink == "always" and not isinstance(destination, LocalFolder):
        raise DestinationError(f"--out {safe_text(out)}: --reflink always needs a local XFS or btrfs folder")
    return write_job(job, destination, model_card=card_of(job, command), part=part, options=options)


def card_of(job: Job, command: str) -> str:
    """The model card of ``job``'s output, recording ``command``."""
    return model_card(job.plan, card_models(job), command, job.description, job.mergekit_yaml)


def card_models(job: Job) -> list[CardModel]:
    """The models as the card names them, the config donor first, each with the license its own card
    (README.md) or config declares."""
    names, models = job.card_names, {}
    for reference in job.recipe.models:
        source = job.sources[reference]
        if names[reference] not in models:
            models[names[reference]] = CardModel(
                names[reference], hub_id(source.folder, source.config), source_license(source.folder, source.config)
            )
    return list(models.values())


def _blocks_are_identities(source: Source, recipe: Recipe, zero: Sequence[str]) -> bool:
    """Whether every inserted copy passes its input through unchanged: each of its tensors that writes
    into the residual stream (per the architecture) is zeroed by a ``zero`` filter."""
    residual = RESIDUAL_OUTPUTS.get(model_type(source.config, source.stack), DEFAULT_RESIDUAL_OUTPUTS)
    copied = {s.layer for s in recipe.layers if s.inserted and s.layer is not None}
    outputs = [rest for layer in copied for rest in source.layer_rests(layer) if any(r in rest for r in residual)]
    return bool(outputs) and all(any(part in rest for part in zero) for rest in outputs)
