"""The commands that change a model's experts: ``upcycle`` (a dense model into a mixture of
experts), ``prune-experts`` (keep some experts of a mixture) and ``moe`` (a mergekit-moe config)."""

from __future__ import annotations

from pathlib import Path

import click

from shardsurgeon import (
    DEFAULT_MAX_SHARD_BYTES,
    Job,
    KeepSpec,
    RecipeError,
    Reflink,
    Router,
    SharedExpert,
    StackHint,
    file_name,
    parse_layers,
    parse_router,
    plan_dense_expert,
    plan_moe,
    plan_prune_experts,
    plan_upcycle,
    read_keep,
)
from shardsurgeon.cli import params
from shardsurgeon.cli.base import cli, reports_errors
from shardsurgeon.cli.params import DTYPE, OUTPUT, SOURCE, ParsedParam, writing_options
from shardsurgeon.cli.write import command_line, one_output, plan_or_run

SRC_HELP = (
    "Source checkpoint folder, a Hugging Face id (org/name[@REVISION]) in the local cache, or a URL "
    "(s3://bucket/prefix, https://.../)."
)


@cli.command()
@click.option("--src", required=True, type=SOURCE, help=SRC_HELP)
@click.option("--experts", required=True, type=click.IntRange(min=1), help="Experts per layer, each a copy of the MLP.")
@click.option("--top-k", required=True, type=click.IntRange(min=1), help="Experts each token is routed to.")
@click.option(
    "--router",
    default="zeros",
    type=ParsedParam("zeros|random:SEED|FILE", parse_router),
    metavar="zeros|random:SEED|FILE",
    help="The routers: zeros (the model computes what the dense one did), normal numbers of the config's "
    "initializer_range drawn with SEED, or a safetensors file (path or URL) holding each upcycled layer's router "
    "under its output name, [experts, hidden], any float dtype.",
)
@click.option(
    "--layers",
    type=ParsedParam("LIST", parse_layers),
    metavar="LIST",
    help="Upcycle only these layers (0,2,4 or 0-7); the others stay dense (Qwen2-MoE, Qwen3-MoE).",
)
@click.option("--dtype", type=DTYPE, help="Cast floating-point tensors to this dtype.")
@writing_options
@reports_errors
def upcycle(
    src: Path | str,
    experts: int,
    top_k: int,
    router: Router,
    layers: tuple[int, ...] | None,
    dtype: str | None,
    out: Path | str | None,
    max_shard_size: int,
    dense: bool,
    reflink: Reflink,
    checksums: bool,
    force: bool,
    dry_run: bool,
    plan_json: Path | None,
    layer_prefix: str | None,
    layers_key: str | None,
    jobs: int,
    ray_address: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Make a dense model a mixture of experts, each a copy of its MLP (sparse upcycling).

    \b
    shardsurgeon upcycle --src ./Mistral-7B-v0.1 --experts 8 --top-k 2 --out ./mixtral-8x7b-init
    shardsurgeon upcycle --src ./Qwen3-1.7B --experts 8 --top-k 2 --layers 0,2,4,6,8,10 --out ./qwen3-moe
    """
    params.need_output(out, dry_run, plan_json)
    job = plan_upcycle(
        src, experts=experts, top_k=top_k, router_seed=router.seed, router_file=router.file, layers=layers, dtype=dtype,
        max_shard_bytes=max_shard_size, stack_hint=StackHint(layer_prefix, layers_key),
    )  # fmt: skip
    command = command_line(
        "upcycle",
        src=job.card_names[str(src)],
        experts=experts,
        top_k=top_k,
        router=None if router == Router() else _router_word(router),
        layers=None if layers is None else ",".join(map(str, layers)),
        dtype=dtype,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    )
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)


def _router_word(router: Router) -> str:
    """How the model card's command names the routers: a file by its name alone (the card leaks no path)."""
    return router.text if router.file is None else file_name(router.file)


def _keep(text: str) -> tuple[str, KeepSpec]:
    """The keep list, and how the model card's command names it (a file by its name alone)."""
    spec, path = read_keep(text)
    return (text if path is None else path.name), spec


@cli.command(name="prune-experts")
@click.option("--src", required=True, type=SOURCE, help=SRC_HELP)
@click.option(
    "--keep",
    type=ParsedParam("LIST|FILE", _keep),
    metavar="LIST|FILE",
    help="Experts to keep, in their new order: 0,3,5 for every layer, or a JSON file (a list, a list per layer, "
    'or {"LAYER": [...]}).',
)
@click.option(
    "--to-dense",
    is_flag=True,
    help="Make a dense model: each layer's one kept expert becomes its MLP, the router is dropped (Mixtral to "
    "Mistral, Qwen3-MoE to Qwen3, Qwen2-MoE to Qwen2).",
)
@click.option(
    "--shared-expert",
    type=click.Choice(["drop", "take"]),
    help="With --to-dense, for a model with a shared expert (Qwen2-MoE): drop it (the kept expert is the MLP) "
    "or take it as the MLP (no --keep).",
)
@click.option("--dtype", type=DTYPE, help="Cast floating-point tensors to this dtype.")
@writing_options
@reports_errors
def prune_experts(
    src: Path | str,
    keep: tuple[str, KeepSpec] | None,
    to_dense: bool,
    shared_expert: SharedExpert | None,
    dtype: str | None,
    out: Path | str | None,
    max_shard_size: int,
    dense: bool,
    reflink: Reflink,
    checksums: bool,
    force: bool,
    dry_run: bool,
    plan_json: Path | None,
    layer_prefix: str | None,
    layers_key: str | None,
    jobs: int,
    ray_address: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Keep some experts of each layer of a mixture of experts (and their router rows), or one as a dense model.

    \b
    shardsurgeon prune-experts --src ./Mixtral-8x7B-v0.1 --keep 0,2,5,7 --out ./mixtral-4x7b
    shardsurgeon prune-experts --src ./Qwen3-30B-A3B --keep reap-keep.json --out ./qwen3-pruned
    shardsurgeon prune-experts --src ./Mixtral-8x7B-v0.1 --keep 3 --to-dense --out ./mistral-expert-3
    """
    params.need_output(out, dry_run, plan_json)
    text, spec = keep if keep is not None else (None, None)
    hint = StackHint(layer_prefix, layers_key)
    if to_dense:
        job = plan_dense_expert(
            src, keep=spec, shared_expert=shared_expert, dtype=dtype, max_shard_bytes=max_shard_size, stack_hint=hint
        )
    else:
        job = _pruning_job(src, spec, shared_expert, dtype, max_shard_size, hint)
    command = command_line(
        "prune-experts",
        src=job.card_names[str(src)],
        keep=text,
        to_dense=to_dense,
        shared_expert=shared_expert,
        dtype=dtype,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    )
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)


def _pruning_job(
    src: Path | str, keep: KeepSpec | None, shared_expert: SharedExpert | None, dtype: str | None, max_shard_bytes: int,
    hint: StackHint,
) -> Job:  # fmt: skip
    if shared_expert is not None:
        raise RecipeError("--shared-expert: only with --to-dense (a pruned mixture keeps its shared expert)")
    if keep is None:
        raise RecipeError("--keep: missing; give the experts to keep, such as --keep 0,2,5,7")
    return plan_prune_experts(src, keep=keep, dtype=dtype, max_shard_bytes=max_shard_bytes, stack_hint=hint)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_argument", metavar="[OUT]", required=False, type=OUTPUT)
@click.option(
    "--seed",
    default=0,
    type=click.IntRange(min=0, max=(1 << 64) - 1),
    help="Seed of the routers of gate_mode: random (the same routers on every machine).",
)
@click.option(
    "--router",
    "router_file",
    metavar="FILE",
    help="Take the routers from this safetensors file (path or URL), whatever the gate_mode: each layer's "
    "router under its output name, [experts, hidden] (how hidden and cheap_embed gates computed elsewhere enter).",
)
@click.option(
    "--transformers-cache",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Find Hugging Face ids in this cache folder instead of HF_HUB_CACHE.",
)
@writing_options
@reports_errors
def moe(
    config: Path,
    out_argument: Path | str | None,
    seed: int,
    router_file: str | None,
    transformers_cache: Path | None,
    out: Path | str | None,
    max_shard_size: int,
    dense: bool,
    reflink: Reflink,
    checksums: bool,
    force: bool,
    dry_run: bool,
    plan_json: Path | None,
    layer_prefix: str | None,
    layers_key: str | None,
    jobs: int,
    ray_address: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Make a mixture of experts from a mergekit-moe config (gate_mode: random, or any with --router FILE).

    \b
    shardsurgeon moe clowncar.yml ./clowncar-4x7b
    shardsurgeon moe clowncar.yml ./clowncar-4x7b --router hidden-gates.safetensors
    """
    out = one_output(out_argument, out)
    params.need_output(out, dry_run, plan_json, "give the output folder (OUT or --out)")
    job = plan_moe(
        config, seed=seed, router_file=router_file, max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key), hub_cache=transformers_cache,
    )  # fmt: skip
    command = command_line(
        "moe",
        config=None,
        seed=seed or None,
        router=None if router_file is None else file_name(router_file),
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    ).replace("shardsurgeon moe", f"shardsurgeon moe {config.name}", 1)
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)
