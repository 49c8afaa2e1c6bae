"""The commands that write a checkpoint: ``expand``, ``merge`` (a mergekit passthrough config)
and ``apply`` (a plan file, whole or in parts)."""

from __future__ import annotations

import os
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from shardsurgeon import (
    DEFAULT_MAX_SHARD_BYTES,
    FINALIZE,
    WHOLE,
    Job,
    MergekitFlag,
    Part,
    PlannedJob,
    Reflink,
    RunResult,
    StackHint,
    WriteOptions,
    dry_run_text,
    format_bytes,
    load_plan_file,
    parse_out_shard_size,
    plan_expand,
    plan_file_bytes,
    plan_merge,
    run_job,
    select_shards,
    write_plan_file,
    writer,
)
from shardsurgeon.cli import params, show
from shardsurgeon.cli.base import cli, reports_errors, verbosity
from shardsurgeon.cli.params import (
    CHECKSUMS_OPTION,
    DTYPE,
    DUP,
    FILTERS,
    OUTPUT,
    REFLINK_OPTION,
    SOURCE,
    ParsedParam,
    mergekit_flags,
    runner_options_of,
    writing_options,
)


@cli.command()
@click.option(
    "--src",
    required=True,
    type=SOURCE,
    help="Source checkpoint folder, a Hugging Face id (org/name[@REVISION]) in the local cache, or a URL "
    "(s3://bucket/prefix, https://.../).",
)
@click.option(
    "--dup", "dups", multiple=True, type=DUP, metavar="LxN", help="Insert N copies of layer L after L (repeatable)."
)
@click.option(
    "--every", type=click.IntRange(min=1), metavar="STEP", help="Insert a copy after every STEP-th layer (LLaMA Pro)."
)
@click.option(
    "--zero",
    type=FILTERS,
    metavar="NAME[,NAME...]",
    help="Zero tensors of inserted copies whose name contains these; 'residual': the residual outputs.",
)
@click.option("--dtype", type=DTYPE, help="Cast floating-point tensors to this dtype.")
@writing_options
@reports_errors
def expand(
    src: Path | str,
    out: Path | str | None,
    dups: tuple[list[tuple[int, int]], ...],
    every: int | None,
    zero: tuple[str, ...] | None,
    dtype: str | None,
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
    """Insert copies of layers, such as LLaMA Pro identity blocks.

    \b
    shardsurgeon expand --src ./openchat-3.5-0106 --dup 31x12 --zero o_proj,down_proj --out ./openchat-44
    shardsurgeon expand --src ./llama-2-7b --every 4 --zero o_proj,down_proj --out ./llama-pro-8b
    """
    params.need_output(out, dry_run, plan_json)
    job = plan_expand(
        src,
        dups=[pair for group in dups for pair in group],
        every=every,
        zero=zero or (),
        dtype=dtype,
        max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key),
    )
    command = command_line(
        "expand",
        src=job.card_names[str(src)],
        dup=",".join(f"{layer}x{n}" for g in dups for layer, n in g),
        every=every,
        zero=",".join(zero or ()),
        dtype=dtype,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    )
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)


def plan_or_run(
    job: Job,
    out: Path | str | None,
    command: str,
    dry_run: bool,
    plan_json_path: Path | None,
    quiet: bool,
    options: WriteOptions,
) -> None:
    """``command`` is the model card's command line without the output (models and the config by
    name, no local path): the plan file records it so, and a run adds the output's folder name."""
    if plan_json_path is not None:
        if str(plan_json_path) == "-":
            click.echo(plan_file_bytes(job, command).decode(), nl=False)
        else:
            write_plan_file(job, plan_json_path, command)
    if dry_run:
        click.echo(dry_run_text(job.plan, job.layout))
    if out is None or dry_run:
        if not quiet:
            show.report_fetched([source.checkpoint for source in job.sources.values()])
        return
    write(PlannedJob(job, command), out, WHOLE, options, quiet)


def write(planned: PlannedJob, out: Path | str, part: Part, options: WriteOptions, quiet: bool) -> RunResult:
    """Do ``part`` of the job to ``out``, drawing its progress, and report it."""
    job = planned.job
    with show.progress(job.layout, quiet) as (progress, on_shard):
        result = run_job(
            job, out, command=planned.command_to(out), part=part,
            options=replace(options, progress=progress, on_shard=on_shard),
        )  # fmt: skip
    if part.publish:
        show.report(job.plan, result, quiet)
    return result


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_argument", metavar="[OUT]", required=False, type=OUTPUT)
@click.option(
    "--out-shard-size",
    type=ParsedParam("COUNT", parse_out_shard_size),
    metavar="COUNT",
    help="--max-shard-size as mergekit-yaml spells and reads it: K, M, B are thousand, million, billion, of bytes "
    "(mergekit's help says parameters, its writer compares bytes), so 5B is 5,000,000,000 bytes; 0: one shard.",
)
@click.option(
    "--transformers-cache",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Find Hugging Face ids in this cache folder instead of HF_HUB_CACHE (as mergekit downloads into it).",
)
@writing_options
@mergekit_flags
@reports_errors
def merge(
    config: Path,
    out_argument: Path | str | None,
    out_shard_size: int | None,
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
    no_effect: list[MergekitFlag],
) -> None:
    """Run a mergekit passthrough config (slices of one or more models), bit for bit.

    \b
    shardsurgeon merge solar.yml ./solar-10.7b
    shardsurgeon merge solar.yml --out ./solar-10.7b

    Models are local folders (relative to the config's folder) or Hugging Face ids found in the
    local cache (HF_HUB_CACHE or HF_HOME); nothing is downloaded.

    A mergekit-yaml command line runs as it is: its flags that only tune how mergekit computes
    (--cuda, --lazy-unpickle, --allow-crimes, -j ...) are noted as having no effect, and those
    that would change the output and are not supported here (--no-copy-tokenizer ...) are refused.
    """
    out = one_output(out_argument, out)
    max_shard_size = one_shard_size(out_shard_size, max_shard_size)
    params.need_output(out, dry_run, plan_json, "give the output folder (OUT or --out)")
    job = plan_merge(
        config,
        max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key),
        hub_cache=transformers_cache,
    )
    if not quiet:
        for flag in no_effect:
            click.echo(f"shardsurgeon: note: {flag.flag} has no effect here: {flag.why}", err=True)
    command = command_line(
        "merge",
        config=config.name,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    ).replace("--config ", "")
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)


@cli.command()
@click.argument("plan_file", metavar="PLAN", type=click.Path(path_type=Path))
@click.argument("out_argument", metavar="[OUT]", required=False, type=OUTPUT)
@click.option("--out", type=OUTPUT, help="Output folder (shared by every writer of the plan).")
@click.option(
    "--shards",
    metavar="SPEC",
    help="Write only these shards, for a later --finalize: K/N (the K-th of N groups of about equal bytes) or "
    "numbers and ranges from 1 such as 1,3,5-7.",
)
@click.option("--finalize", is_flag=True, help="Check every shard is written, then publish the output.")
@click.option("--dense", is_flag=True, help="Write zeros as real bytes instead of holes.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (when publishing).")
@REFLINK_OPTION
@CHECKSUMS_OPTION
@runner_options_of
@verbosity
@reports_errors
def apply(
    plan_file: Path,
    out_argument: Path | str | None,
    out: Path | str | None,
    shards: str | None,
    finalize: bool,
    dense: bool,
    force: bool,
    reflink: Reflink,
    checksums: bool,
    jobs: int,
    ray_address: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Write the output of a plan file (expand|merge ... --plan-json PLAN), whole or in parts.

    The parts can run anywhere the sources and the output folder are seen at the same paths: a
    Slurm array, a Kubernetes Indexed Job, GNU parallel. Sources that changed since the plan was
    made are refused; the output is the same bytes whoever wrote which shard.

    \b
    shardsurgeon apply plan.json ./out                    # the whole job, as the run itself would
    shardsurgeon apply plan.json ./out --shards 3/8       # one writer of eight
    shardsurgeon apply plan.json ./out --finalize         # once all eight are done
    """
    out = one_output(out_argument, out)
    if out is None:
        raise click.UsageError("give the output folder (OUT or --out)")
    if shards is not None and finalize:
        raise click.UsageError("--shards and --finalize: a writer writes, and the finalize step runs once after all")
    planned = load_plan_file(plan_file)
    job = planned.job
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    if finalize:
        write(planned, out, FINALIZE, options, quiet)
        return
    if shards is None:
        write(planned, out, WHOLE, options, quiet)
        return
    chosen = [shard.name for shard in select_shards(shards, job.layout.shards)]
    result = write(planned, out, writer(chosen), options, quiet)
    if not quiet:
        kept = f" ({result.shards_reused} already there)" if result.shards_reused else ""
        click.echo(
            f"shardsurgeon apply: {result.shards} of {len(job.layout.shards)} shards written{kept}, "
            f"{format_bytes(result.written)} written, {format_bytes(result.holes)} left as holes, "
            f"{result.seconds:.1f} s; publish with: shardsurgeon apply {shlex.quote(str(plan_file))} "
            f"{shlex.quote(str(out))} --finalize",
            err=True,
        )


def one_output(argument: Path | str | None, option: Path | str | None) -> Path | str | None:
    if argument is not None and option is not None and os.path.abspath(argument) != os.path.abspath(option):
        raise click.UsageError(
            f"the output folder is given twice, as OUT {argument} and as --out {option}; give it once"
        )
    return argument if argument is not None else option


def one_shard_size(out_shard_size: int | None, max_shard_size: int) -> int:
    """``--out-shard-size`` (mergekit's) stands for ``--max-shard-size``; both may be given if they agree."""
    if out_shard_size is None:
        return max_shard_size
    ctx = click.get_current_context()
    if ctx.get_parameter_source("max_shard_size") is not ParameterSource.DEFAULT and max_shard_size != out_shard_size:
        raise click.UsageError(
            f"--out-shard-size is {out_shard_size} bytes but --max-shard-size is {max_shard_size} bytes; "
            "give one of them"
        )
    return out_shard_size


def command_line(command: str, **options: Any) -> str:
    words = ["shardsurgeon", command]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False, ""):
            words += [flag, str(value)]
    return shlex.join(words)
