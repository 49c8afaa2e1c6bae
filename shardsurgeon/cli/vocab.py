"""The command that changes a model's vocabulary: ``vocab`` (tokens added, rows padded, trimmed or
moved, the tokenizer files to match)."""

from __future__ import annotations

from pathlib import Path

import click

from shardsurgeon import (
    DEFAULT_MAX_SHARD_BYTES,
    ZERO_INIT,
    InitSpec,
    Reflink,
    StackHint,
    parse_init,
    plan_vocab,
    read_remap,
    read_tokens,
)
from shardsurgeon.cli import params
from shardsurgeon.cli.base import cli, reports_errors
from shardsurgeon.cli.experts import SRC_HELP
from shardsurgeon.cli.params import DTYPE, SOURCE, ParsedParam, writing_options
from shardsurgeon.cli.write import command_line, plan_or_run


def _remap(text: str) -> tuple[str, dict[int, int]]:
    return Path(text).name, read_remap(text)


@cli.command()
@click.option("--src", required=True, type=SOURCE, help=SRC_HELP)
@click.option(
    "--add-tokens",
    type=ParsedParam("FILE|LIST", read_tokens),
    metavar="FILE|LIST",
    help="Tokens to add: a file of one a line, or a comma list; they take the ids the tokenizer gives them.",
)
@click.option("--special", is_flag=True, help="Add the tokens as special tokens (never split, skipped in decoding).")
@click.option(
    "--existing",
    type=click.Choice(["refuse", "skip"]),
    default="refuse",
    show_default=True,
    help="What to do with a token the tokenizer already has.",
)
@click.option(
    "--init",
    "init",
    type=ParsedParam("zero|mean|copy:TOKEN|mean-of:TEXT", parse_init),
    metavar="zero|mean|copy:TOKEN|mean-of:TEXT",
    help="How the new rows of the input embedding start: zeros, the mean of every token's row, a copy of one "
    "token's row, or the mean of the rows TEXT encodes to (float64 sums, rounded once). Default: zero.",
)
@click.option(
    "--head-init",
    type=ParsedParam("zero|mean|copy:TOKEN|mean-of:TEXT", lambda text: parse_init(text, "--head-init")),
    metavar="zero|mean|copy:TOKEN|mean-of:TEXT",
    help="How the new rows of an untied output head start (default: zero, so a new token is never predicted "
    "before training). A tied head is the embedding.",
)
@click.option(
    "--pad-to-multiple",
    type=click.IntRange(min=1),
    metavar="N",
    help="Append zero rows up to a multiple of N (after --add-tokens); the tokenizer is unchanged.",
)
@click.option(
    "--trim-to",
    type=click.IntRange(min=1),
    metavar="N",
    help="Drop rows N and on; refused while the tokenizer or a config uses such an id.",
)
@click.option(
    "--remap",
    type=ParsedParam("FILE", _remap),
    metavar="FILE",
    help='A JSON object of source ids to output ids ({"0": 0, "7": 1, ...}): rows moved or dropped, the tokenizer '
    "ids to match; output ids no source row takes are zero rows.",
)
@click.option("--dtype", type=DTYPE, help="Cast floating-point tensors to this dtype.")
@writing_options
@reports_errors
def vocab(
    src: Path | str,
    add_tokens: tuple[str, list[str]] | None,
    special: bool,
    existing: str,
    init: InitSpec | None,
    head_init: InitSpec | None,
    pad_to_multiple: int | None,
    trim_to: int | None,
    remap: tuple[str, dict[int, int]] | None,
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
    """Add, pad, trim or move the rows of the vocabulary, with the tokenizer files and config to match.

    \b
    shardsurgeon vocab --src ./Llama-3.1-8B --add-tokens '<tool_call>,</tool_call>' --special --init mean --out ./l
    shardsurgeon vocab --src ./Qwen3-8B --pad-to-multiple 128 --out ./qwen3-padded
    shardsurgeon vocab --src ./model --trim-to 32000 --out ./trimmed
    """
    params.need_output(out, dry_run, plan_json)
    job = plan_vocab(
        src,
        add_tokens=add_tokens[1] if add_tokens else (),
        special=special,
        init=init or ZERO_INIT,
        head_init=head_init,
        skip_existing=existing == "skip",
        pad_to_multiple=pad_to_multiple,
        trim_to=trim_to,
        remap=remap[1] if remap else None,
        dtype=dtype,
        max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key),
    )
    command = command_line(
        "vocab",
        src=job.card_names[str(src)],
        add_tokens=add_tokens[0] if add_tokens else None,
        special=special,
        existing=None if existing == "refuse" else existing,
        init=init.shown if init else None,
        head_init=head_init.shown if head_init else None,
        pad_to_multiple=pad_to_multiple,
        trim_to=trim_to,
        remap=remap[0] if remap else None,
        dtype=dtype,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    )
    options = params.write_options(force, dense, reflink, checksums, jobs, ray_address)
    plan_or_run(job, out, command, dry_run, plan_json, quiet, options)
