"""The command line's parameter types and the options several commands share: pure parsers
behind click types, so a bad value is a usage error naming the flag."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from shardsurgeon import (
    CAST_TARGETS,
    DEFAULT_MAX_SHARD_BYTES,
    MERGEKIT_FLAGS,
    REFLINK_MODES,
    REMOTE_EXTRA_HINT,
    S3_EXTRA_HINT,
    MergekitFlag,
    Processes,
    RecipeError,
    Reflink,
    Runner,
    WriteOptions,
    boto3_available,
    is_url,
    normal_url,
    obstore_available,
    parse_dup,
    parse_filters,
    parse_size,
    safe_text,
)
from shardsurgeon.cli.base import F, verbosity


class ParsedParam(click.ParamType):
    """A click type that calls a pure parser and turns its RecipeError into a usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]):
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except RecipeError as e:
            raise click.UsageError(str(e), ctx) from None


class SourceParam(click.ParamType):
    """A source: a local folder (a Path) or a folder URL (kept as text: a Path would fold its ``//``)."""

    name = "FOLDER|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if not is_url(value):
            return Path(value)
        if not obstore_available():
            flag = param.opts[0] if param is not None and param.opts[0].startswith("-") else None
            raise click.UsageError(f"{flag + ' ' if flag else ''}{safe_text(value)}: {REMOTE_EXTRA_HINT}", ctx)
        return normal_url(value)


class OutputParam(click.ParamType):
    """An output: a local folder (a Path) or an S3 folder (``s3://``, kept as text); a web server is
    read-only."""

    name = "FOLDER|s3://BUCKET/FOLDER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or not is_url(value):
            return Path(value) if isinstance(value, str) else value
        value = normal_url(value)
        if not value.startswith("s3://"):
            raise click.UsageError(
                f"{safe_text(value)}: a web server is read-only; write to a local folder or to s3://BUCKET/FOLDER", ctx
            )
        if not (obstore_available() and boto3_available()):
            raise click.UsageError(f"{safe_text(value)}: {S3_EXTRA_HINT}", ctx)
        return value


SOURCE = SourceParam()
OUTPUT = OutputParam()
DUP = ParsedParam("LxN", parse_dup)
FILTERS = ParsedParam("NAME[,NAME...]", parse_filters)
SIZE = ParsedParam("SIZE", parse_size)
DTYPE = click.Choice(CAST_TARGETS)


REFLINK_OPTION = click.option(
    "--reflink",
    type=click.Choice(REFLINK_MODES),
    default="auto",
    show_default=True,
    help="Share copied blocks with the source (XFS, btrfs): where possible, always (else refuse), or never.",
)


CHECKSUMS_OPTION = click.option(
    "--checksums",
    is_flag=True,
    help="Also write every tensor's CRC-32 (shardsurgeon.checksums.json), so verify can tell damage without "
    "the sources; reads the output back once.",
)


def writing_options(command: F) -> F:
    """The options that ``expand`` and ``merge`` share: output, layout, planning and verbosity."""
    options = [
        click.option(
            "--out",
            type=OUTPUT,
            help="Output folder (must not exist, or be empty), or an S3 folder s3://BUCKET/FOLDER.",
        ),
        click.option(
            "--max-shard-size",
            type=SIZE,
            metavar="SIZE",
            default=str(DEFAULT_MAX_SHARD_BYTES),
            help="Largest shard, e.g. 5GB.",
        ),
        click.option("--dense", is_flag=True, help="Write zeros as real bytes instead of holes."),
        REFLINK_OPTION,
        CHECKSUMS_OPTION,
        click.option("--force", is_flag=True, help="Replace a non-empty output folder."),
        click.option("--dry-run", is_flag=True, help="Print the plan in words and write nothing."),
        click.option("--plan-json", type=click.Path(path_type=Path), help="Write the plan as JSON here ('-': stdout)."),
        click.option("--layer-prefix", help="Layer stack prefix, e.g. model.layers, when it cannot be detected."),
        click.option("--layers-key", help="config.json key that counts the layers, when it cannot be detected."),
        *runner_options(),
    ]
    command = verbosity(command)
    for option in reversed(options):
        command = option(command)
    return command


def runner_options() -> list[Callable[[F], F]]:
    """Who writes the shards: ``--jobs N`` processes here, or tasks on a Ray cluster."""
    return [
        click.option(
            "--jobs",
            type=click.IntRange(1, 256),
            default=1,
            metavar="N",
            help="Write shards with N processes (helps casts, which use a core each; see README).",
        ),
        click.option(
            "--ray",
            "ray_address",
            is_flag=False,
            flag_value="auto",
            default=None,
            metavar="[ADDRESS]",
            help="Write shards as tasks on a Ray cluster (pip install 'shardsurgeon[ray]'); sources and output "
            "must be on a filesystem every node sees.",
        ),
    ]


def runner_options_of(command: F) -> F:
    for option in reversed(runner_options()):
        command = option(command)
    return command


def runner(jobs: int, ray_address: str | None) -> Runner | None:
    if ray_address is not None and jobs > 1:
        raise click.UsageError("--jobs and --ray: give one of them (Ray decides how many tasks run at once)")
    if ray_address is not None:
        from shardsurgeon import RayTasks  # Ray loads only when a job runs

        return RayTasks(ray_address)
    return Processes(jobs) if jobs > 1 else None


def write_options(
    force: bool, dense: bool, reflink: Reflink, checksums: bool, jobs: int, ray_address: str | None
) -> WriteOptions:
    """The one options record of a run, from the writing options every writing command takes."""
    return WriteOptions(force, dense, reflink, checksums, runner(jobs, ray_address))


def need_output(out: object, dry_run: bool, plan_json: object, named: str = "--out is required") -> None:
    """A command that writes needs its output folder, unless it only plans (--dry-run, --plan-json)."""
    if out is None and not dry_run and plan_json is None:
        raise click.UsageError(f"{named} unless --dry-run or --plan-json is given")


def mergekit_flags(command: F) -> F:
    """mergekit-yaml's flags, hidden: an error for each refused; the others reach the command as
    ``no_effect``, to be noted once the job is planned (a config error stays the only line)."""

    def param(flag: MergekitFlag) -> str:
        return "mergekit_" + flag.flag.lstrip("-").replace("-", "_")

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        given = [flag for flag in MERGEKIT_FLAGS if kwargs.pop(param(flag)) not in (None, False)]
        for flag in given:
            if flag.refused:
                raise click.UsageError(f"{flag.flag} is not supported: {flag.why}")
        return command(*args, no_effect=given, **kwargs)

    for flag in reversed(MERGEKIT_FLAGS):
        if flag.value is None:
            option = click.option(flag.flag, param(flag), is_flag=True, hidden=True)
        else:
            option = click.option(flag.flag, param(flag), metavar=flag.value, hidden=True)
        run = option(run)
    return run  # type: ignore[return-value]
