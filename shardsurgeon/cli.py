"""The command line: parses arguments, calls the library, turns library errors into one-line messages.

The only module that imports click. Progress goes to stderr: a bar on a terminal, a line every few
seconds anywhere else (a job's log).
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from functools import wraps
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from shardsurgeon import __version__
from shardsurgeon.api import Job, card_of, plan_expand, plan_merge, run_job
from shardsurgeon.arch import StackHint
from shardsurgeon.checkpoint import Checkpoint, open_checkpoint
from shardsurgeon.errors import DestinationError, RecipeError, ShardSurgeonError, safe_text
from shardsurgeon.execute import REFLINK_MODES, Reflink
from shardsurgeon.format import CAST_TARGETS
from shardsurgeon.inspect import describe_checkpoint
from shardsurgeon.layout import DEFAULT_MAX_SHARD_BYTES, Layout
from shardsurgeon.mergekit_options import MERGEKIT_FLAGS, MergekitFlag, parse_out_shard_size
from shardsurgeon.plan import Plan
from shardsurgeon.planfile import PlannedJob, load_plan_file, plan_file_bytes, plan_key, write_plan_file
from shardsurgeon.progress import LINE_INTERVAL_SECONDS, advance, begin_shard, figures, start_tally
from shardsurgeon.recipe import parse_dup, parse_filters
from shardsurgeon.remote import EXTRA_HINT, is_url, obstore_available
from shardsurgeon.report import dry_run_text
from shardsurgeon.rewrite import RunResult, finalize_checkpoint, write_some_shards
from shardsurgeon.runners import Processes, Runner, select_shards
from shardsurgeon.s3 import EXTRA_HINT as S3_EXTRA_HINT
from shardsurgeon.s3 import boto3_available
from shardsurgeon.units import Progress, ShardStarted, format_bytes, parse_size
from shardsurgeon.verify import VerifyReport, compare_with_plan, verify_checkpoint

F = TypeVar("F", bound=Callable[..., Any])


class _ParsedParam(click.ParamType):
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


class _SourceParam(click.ParamType):
    """A source: a local folder (a Path) or a folder URL (kept as text: a Path would fold its ``//``)."""

    name = "FOLDER|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if not is_url(value):
            return Path(value)
        if not obstore_available():
            flag = param.opts[0] if param is not None and param.opts[0].startswith("-") else None
            raise click.UsageError(f"{flag + ' ' if flag else ''}{safe_text(value)}: {EXTRA_HINT}", ctx)
        return value


class _OutputParam(click.ParamType):
    """An output: a local folder (a Path) or an S3 folder (``s3://``, kept as text); a web server is
    read-only."""

    name = "FOLDER|s3://BUCKET/FOLDER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or not is_url(value):
            return Path(value) if isinstance(value, str) else value
        if not value.startswith("s3://"):
            raise click.UsageError(
                f"{safe_text(value)}: a web server is read-only; write to a local folder or to s3://BUCKET/FOLDER", ctx
            )
        if not (obstore_available() and boto3_available()):
            raise click.UsageError(f"{safe_text(value)}: {S3_EXTRA_HINT}", ctx)
        return value


SOURCE = _SourceParam()
OUTPUT = _OutputParam()
DUP = _ParsedParam("LxN", parse_dup)
FILTERS = _ParsedParam("NAME[,NAME...]", parse_filters)
SIZE = _ParsedParam("SIZE", parse_size)
DTYPE = click.Choice(CAST_TARGETS)
USAGE_ERRORS = (RecipeError, DestinationError)
"""Errors in what the user typed: exit status 2, as click gives usage errors; other errors give 1."""


MAX_MESSAGE_CHARS = 2000
"""Whatever a message holds, it is printed on one line of at most this many characters."""


def exit_status(error: ShardSurgeonError) -> int:
    return 2 if isinstance(error, USAGE_ERRORS) else 1


class _OneLineErrors(click.Group):
    """Usage errors as one line, like every other error, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.Abort:
            click.echo("shardsurgeon: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            command = "shardsurgeon" if ctx is None or ctx.parent is None else f"shardsurgeon {ctx.info_name}"
            hint = f" (see: {command} --help)"
            click.echo(f"shardsurgeon: error: {safe_text(e.format_message(), MAX_MESSAGE_CHARS)}{hint}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="shardsurgeon")
def cli() -> None:
    """Rewrite Hugging Face safetensors checkpoints layer by layer, streaming, in constant memory."""


def main() -> None:
    if sys.stderr is None:  # started with 2>&-: nowhere to say anything, but the work is still done
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    sys.stdout = _GuardedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        cli(prog_name="shardsurgeon")
    except _StdoutFailed as e:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # so that the interpreter's last flush does not fail once more
        os.close(null)
        click.echo(f"shardsurgeon: error: cannot write to standard output: {e}", err=True)
        sys.exit(1)


def _verbosity(command: F) -> F:
    command = click.option("-q", "--quiet", is_flag=True, help="No progress, notes or summary.")(command)
    return click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of errors.")(command)


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


def _writing_options(command: F) -> F:
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
        *_runner_options(),
    ]
    command = _verbosity(command)
    for option in reversed(options):
        command = option(command)
    return command


def _runner_options() -> list[Callable[[F], F]]:
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


def _runner_options_of(command: F) -> F:
    for option in reversed(_runner_options()):
        command = option(command)
    return command


def _runner(jobs: int, ray_address: str | None) -> Runner | None:
    if ray_address is not None and jobs > 1:
        raise click.UsageError("--jobs and --ray: give one of them (Ray decides how many tasks run at once)")
    if ray_address is not None:
        from shardsurgeon.raytasks import RayTasks

        return RayTasks(ray_address)
    return Processes(jobs) if jobs > 1 else None


def _reports_errors(command: F) -> F:
    """Print library errors as one line and exit non-zero; keep the traceback for -v."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ShardSurgeonError as e:
            if kwargs.get("verbose"):
                raise
            click.echo(f"shardsurgeon: error: {safe_text(e, MAX_MESSAGE_CHARS)}", err=True)
            sys.exit(exit_status(e))
        except KeyboardInterrupt:
            click.echo("shardsurgeon: interrupted; run the same command again to resume", err=True)
            sys.exit(130)
        except (_StdoutFailed, click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as e:  # not wrapped by the library (a name too long, a folder gone): still one line
            if kwargs.get("verbose"):
                raise
            where = f"{safe_text(os.fsdecode(e.filename))}: " if e.filename is not None else ""
            click.echo(f"shardsurgeon: error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except Exception as e:  # a bug: still one line, with the way to see more
            if kwargs.get("verbose"):
                raise
            text = " ".join(str(e).split())[:200]
            click.echo(f"shardsurgeon: internal error: {type(e).__name__}: {text}; rerun with -v for details", err=True)
            sys.exit(1)

    return run  # type: ignore[return-value]


class _StdoutFailed(Exception):
    """Standard output refused our text (a full disk, a closed pipe)."""


class _GuardedStdout:
    """sys.stdout, with its write errors told apart from every other OSError."""

    def __init__(self, stream: Any):
        self._stream = stream
        """None when the process was started with standard output closed (>&-)."""

    def write(self, text: str) -> int:
        if self._stream is None:
            raise _StdoutFailed("it is closed")
        try:
            return int(self._stream.write(text))
        except OSError as e:
            raise _StdoutFailed(e.strerror or str(e)) from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as e:
            raise _StdoutFailed(e.strerror or str(e)) from None

    def isatty(self) -> bool:
        return self._stream is not None and bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise _StdoutFailed("it is closed")
        return getattr(self._stream, name)


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
@_writing_options
@_reports_errors
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
    if out is None and not dry_run and plan_json is None:
        raise click.UsageError("--out is required unless --dry-run or --plan-json is given")
    job = plan_expand(
        src,
        dups=[pair for group in dups for pair in group],
        every=every,
        zero=zero or (),
        dtype=dtype,
        max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key),
    )
    command = _command_line(
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
    runner = _runner(jobs, ray_address)
    _plan_or_run(job, out, command, dry_run, plan_json, force, dense, quiet, runner, reflink, checksums)


def _plan_or_run(
    job: Job,
    out: Path | str | None,
    command: str,
    dry_run: bool,
    plan_json_path: Path | None,
    force: bool,
    dense: bool,
    quiet: bool,
    runner: Runner | None,
    reflink: Reflink,
    checksums: bool,
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
            _report_fetched([source.checkpoint for source in job.sources.values()])
        return
    planned = PlannedJob(job, command)
    with _progress(job.layout, quiet) as (progress, on_shard):
        result = run_job(
            job, out, command=planned.command_to(out), force=force, dense=dense, reflink=reflink,
            checksums=checksums, progress=progress, on_shard=on_shard, runner=runner,
        )  # fmt: skip
    _report(job.plan, result, quiet)


def _report(plan: Plan, result: RunResult, quiet: bool) -> None:
    if not quiet:
        for note in result.notes:
            click.echo(f"shardsurgeon: note: {note}", err=True)
        click.echo(_summary(plan, result), err=True)


def _mergekit_flags(command: F) -> F:
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


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_argument", metavar="[OUT]", required=False, type=OUTPUT)
@click.option(
    "--out-shard-size",
    type=_ParsedParam("COUNT", parse_out_shard_size),
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
@_writing_options
@_mergekit_flags
@_reports_errors
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
    out = _one_output(out_argument, out)
    max_shard_size = _one_shard_size(out_shard_size, max_shard_size)
    if out is None and not dry_run and plan_json is None:
        raise click.UsageError("give the output folder (OUT or --out) unless --dry-run or --plan-json is given")
    job = plan_merge(
        config,
        max_shard_bytes=max_shard_size,
        stack_hint=StackHint(layer_prefix, layers_key),
        hub_cache=transformers_cache,
    )
    if not quiet:
        for flag in no_effect:
            click.echo(f"shardsurgeon: note: {flag.flag} has no effect here: {flag.why}", err=True)
    command = _command_line(
        "merge",
        config=config.name,
        max_shard_size=None if max_shard_size == DEFAULT_MAX_SHARD_BYTES else max_shard_size,
        dense=dense,
        checksums=checksums,
        layer_prefix=layer_prefix,
        layers_key=layers_key,
    ).replace("--config ", "")
    runner = _runner(jobs, ray_address)
    _plan_or_run(job, out, command, dry_run, plan_json, force, dense, quiet, runner, reflink, checksums)


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
@_runner_options_of
@_verbosity
@_reports_errors
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
    out = _one_output(out_argument, out)
    if out is None:
        raise click.UsageError("give the output folder (OUT or --out)")
    if shards is not None and finalize:
        raise click.UsageError("--shards and --finalize: a writer writes, and the finalize step runs once after all")
    planned = load_plan_file(plan_file)
    job, key = planned.job, plan_key(planned.job)
    if shards is None and not finalize:
        with _progress(job.layout, quiet) as (progress, on_shard):
            result = run_job(
                job, out, command=planned.command_to(out), force=force, dense=dense, reflink=reflink,
                checksums=checksums, progress=progress, on_shard=on_shard, runner=_runner(jobs, ray_address),
            )  # fmt: skip
        _report(job.plan, result, quiet)
        return
    if isinstance(out, str):
        raise click.UsageError(
            f"{safe_text(out)}: --shards and --finalize write to a shared local folder; for S3 run the whole plan "
            "(apply PLAN s3://...): one process sends several parts at once"
        )
    if finalize:
        card = card_of(job, planned.command_to(out))
        result = finalize_checkpoint(
            job.plan, job.layout, out, job.sources, plan_key=key, model_card=card, force=force, checksums=checksums
        )
        _report(job.plan, result, quiet)
        return
    chosen = [shard.name for shard in select_shards(shards or "", job.layout.shards)]
    with _progress(job.layout, quiet) as (progress, on_shard):
        result = write_some_shards(
            job.layout, out, job.sources, chosen, plan_key=key, dense=dense, reflink=reflink, progress=progress,
            on_shard=on_shard,
        )  # fmt: skip
    if not quiet:
        kept = f" ({result.shards_reused} already there)" if result.shards_reused else ""
        click.echo(
            f"shardsurgeon apply: {result.shards} of {len(job.layout.shards)} shards written{kept}, "
            f"{format_bytes(result.written)} written, {format_bytes(result.holes)} left as holes, "
            f"{result.seconds:.1f} s; publish with: shardsurgeon apply {shlex.quote(str(plan_file))} "
            f"{shlex.quote(str(out))} --finalize",
            err=True,
        )


def _one_output(argument: Path | str | None, option: Path | str | None) -> Path | str | None:
    if argument is not None and option is not None and os.path.abspath(argument) != os.path.abspath(option):
        raise click.UsageError(
            f"the output folder is given twice, as OUT {argument} and as --out {option}; give it once"
        )
    return argument if argument is not None else option


def _one_shard_size(out_shard_size: int | None, max_shard_size: int) -> int:
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


def _command_line(command: str, **options: Any) -> str:
    words = ["shardsurgeon", command]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False, ""):
            words += [flag, str(value)]
    return shlex.join(words)


@contextmanager
def _progress(
    layout: Layout, quiet: bool, interval: float = LINE_INTERVAL_SECONDS
) -> Iterator[tuple[Progress | None, ShardStarted | None]]:
    """The library's two callbacks, drawing on stderr: a bar on a terminal; elsewhere (a job's log)
    a line every ``interval`` seconds and at each shard's end once the run is that long; with
    ``quiet``, nothing."""
    if quiet:
        yield None, None
        return
    shard_bytes = {s.name: s.nbytes - len(s.header) for s in layout.shards}
    tally = start_tally(layout.total_size, monotonic())

    def info(_: int | None) -> str:
        return figures(tally.done, tally.total, tally.rate(monotonic()))

    bar = None
    if sys.stderr.isatty():
        bar = click.progressbar(
            length=layout.total_size,
            label="writing",
            file=sys.stderr,
            width=0,
            show_percent=False,
            show_eta=False,
            item_show_func=info,
        )

    def progress(nbytes: int) -> None:
        nonlocal tally
        # on a terminal the bar shows the figures, so no line is ever due there
        tally, line = advance(tally, nbytes, monotonic(), interval if bar is None else math.inf)
        if bar is not None:
            bar.update(nbytes)
        elif line is not None:
            click.echo(line, err=True)

    def on_shard(name: str, number: int, count: int) -> None:
        nonlocal tally
        tally = begin_shard(tally, name, shard_bytes[name], monotonic())
        if bar is not None:
            bar.label = f"shard {number} of {count}"

    with bar if bar is not None else nullcontext():
        yield progress, on_shard


def _summary(plan: Plan, result: RunResult) -> str:
    reused = f" ({result.shards_reused} kept from an interrupted run)" if result.shards_reused else ""
    shards = "1 shard" if result.shards == 1 else f"{result.shards} shards"
    if isinstance(result.out, str):  # an object store: no holes, and the bytes that crossed the network
        stats = result.stats
        return (
            f"shardsurgeon: {plan.layers_in} -> {plan.output_layers} layers, {result.tensors} tensors, "
            f"{shards}{reused}, {format_bytes(result.written)} written ({format_bytes(stats.server_copied)} copied "
            f"by the server, {format_bytes(stats.sent)} sent{_fetched(result)}), {result.seconds:.1f} s -> {result.out}"
        )
    return (
        f"shardsurgeon: {plan.layers_in} -> {plan.output_layers} layers, {result.tensors} tensors, "
        f"{shards}{reused}, {format_bytes(result.written)} written ({_bytes_by_kind(result)}), "
        f"{format_bytes(result.holes)} left as holes{_fetched(result)}, {result.seconds:.1f} s -> {result.out}"
    )


def _fetched(result: RunResult) -> str:
    """Tensor bytes read from sources by URL, when there are any."""
    return f", {format_bytes(result.stats.fetched)} fetched by URL" if result.stats.fetched else ""


def _bytes_by_kind(result: RunResult) -> str:
    """Shared as the filesystem reports it; where it cannot tell, what the kernel could have cloned."""
    stats = result.stats
    shared, kind = (
        (stats.copies.aligned_kernel_bytes, "clone-eligible")
        if stats.shared is None
        else (stats.shared, "shared with the source")
    )
    return (
        f"{format_bytes(shared)} {kind}, {format_bytes(max(0, stats.copied - shared))} copied, "
        f"{format_bytes(stats.converted)} converted"
    )


@cli.command()
@click.argument("folder", type=SOURCE)
@click.option("--layer-prefix", help="Layer stack prefix, when it cannot be detected.")
@click.option("--layers-key", help="config.json key that counts the layers.")
@_verbosity
@_reports_errors
def inspect(folder: Path | str, layer_prefix: str | None, layers_key: str | None, quiet: bool, verbose: bool) -> None:
    """Show a checkpoint's layer stack, tensors per layer, dtypes, parameters and shards.

    FOLDER may be a URL: s3://bucket/prefix (endpoint and credentials from the environment, as the
    AWS tools read them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID ...) or https://host/folder/ (Hub
    resolve/ URLs too); only the index, the config and each shard's header are fetched.
    """
    checkpoint = open_checkpoint(folder)
    click.echo(describe_checkpoint(checkpoint, StackHint(layer_prefix, layers_key)))
    if not quiet:
        _report_fetched([checkpoint])


def _report_fetched(checkpoints: list[Checkpoint]) -> None:
    """For each checkpoint read by URL, what opening it fetched, on stderr."""
    for checkpoint in checkpoints:
        if isinstance(checkpoint.folder, str):
            click.echo(
                f"fetched {format_bytes(checkpoint.fetched_nbytes)} from {safe_text(checkpoint.folder)}", err=True
            )


@cli.command()
@click.option("--keep", type=click.Path(path_type=Path), help="Build in this folder and keep it.")
@click.option("--force", is_flag=True, help="Replace the demo folders already in the --keep folder.")
@_verbosity
@_reports_errors
def demo(keep: Path | None, force: bool, quiet: bool, verbose: bool) -> None:
    """Build a small 32-layer Mistral-shaped checkpoint, expand it with the seed recipe, check it."""
    from shardsurgeon.demo import demo_folders, make_demo_checkpoint  # numpy loads only for the demo

    with tempfile.TemporaryDirectory(prefix="shardsurgeon-demo-") as scratch:
        src, out = demo_folders(keep or Path(scratch), force)
        make_demo_checkpoint(src)
        checkpoint = open_checkpoint(src)
        click.echo(f"built a 32-layer Mistral-shaped bf16 checkpoint in {src} ({len(checkpoint.shards)} shards)")
        args = [
            "expand",
            "--src",
            str(src),
            "--dup",
            "31x12",
            "--zero",
            "o_proj,down_proj",
            "--out",
            str(out),
        ]
        click.echo("$ shardsurgeon " + shlex.join(args))
        expand.main(args[1:] + (["--force"] if force else []) + (["-q"] if quiet else []), standalone_mode=False)
        job = plan_expand(src, dups=[(31, 12)], zero=("o_proj", "down_proj"))
        mismatches = compare_with_plan(job.layout, out)
        for mismatch in mismatches:
            click.echo(f"MISMATCH {mismatch.shard} {mismatch.tensor}: {mismatch.problem}", err=True)
        if mismatches:
            raise SystemExit(1)
        click.echo(describe_checkpoint(open_checkpoint(out)))
        click.echo(
            f"checked: all {len(job.plan.tensors)} tensors of {out} hold exactly the source bytes or zeros "
            "the plan says; layers 32-43 are identity blocks"
        )
        if keep is None:
            click.echo("(the demo folders are removed; pass --keep DIR to keep them)")


@cli.command("verify")
@click.argument("folder", type=SOURCE)
@click.option(
    "--src",
    "sources",
    multiple=True,
    type=SOURCE,
    help="A source the output was made from (repeat, in the recipe's order): check every tensor's bytes.",
)
@click.option("--layer-prefix", help="Layer stack prefix, when it cannot be detected.")
@click.option("--layers-key", help="config.json key that counts the layers.")
@_verbosity
@_reports_errors
def verify_command(
    folder: Path | str,
    sources: tuple[Path | str, ...],
    layer_prefix: str | None,
    layers_key: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Check a checkpoint (a folder, or an s3:// or https:// folder URL): shards, index, config; with
    --src, every tensor against its source.

    Lists problems one per line; exits 0 when there are none, 1 otherwise.

    \b
    shardsurgeon verify ./openchat-44
    shardsurgeon verify ./openchat-44 --src ./openchat-3.5-0106
    shardsurgeon verify s3://models/openchat-44 --src ./openchat-3.5-0106
    """
    with _verify_bar(quiet) as (on_start, progress):
        hint = StackHint(layer_prefix, layers_key)
        report = verify_checkpoint(folder, sources, stack_hint=hint, progress=progress, on_start=on_start)
    for mismatch in report.mismatches:
        click.echo(str(mismatch))
    if not quiet:
        for note in report.notes:
            click.echo(f"note: {note}")
        click.echo(_verify_summary(report))
    if not report.ok:
        sys.exit(1)


@contextmanager
def _verify_bar(quiet: bool) -> Iterator[tuple[Progress | None, Progress | None]]:
    """Callbacks for verify: the bar appears when the bytes to compare are known (only with --src)."""
    if quiet or not sys.stderr.isatty():
        yield None, None
        return
    with ExitStack() as stack:
        bars: list[Any] = []

        def start(nbytes: int) -> None:
            if nbytes:
                bars.append(stack.enter_context(click.progressbar(length=nbytes, label="verifying", file=sys.stderr)))

        def update(nbytes: int) -> None:
            for bar in bars:
                bar.update(nbytes)

        yield start, update


def _verify_summary(report: VerifyReport) -> str:
    layers = f", {report.layers} layers" if report.layers is not None else ""
    shards = "1 shard" if report.shards == 1 else f"{report.shards} shards"
    found = f"{shards}, {report.tensors} tensors{layers}, {format_bytes(report.nbytes)}"
    if report.sources:
        sources = "1 source" if report.sources == 1 else f"{report.sources} sources"
        found += f"; {report.compared} tensors compared byte for byte with {sources}"
    if report.checksummed:
        found += f"; {report.checksummed} tensors checked against their recorded checksums"
    problems = len(report.mismatches)
    verdict = "OK" if report.ok else ("1 problem" if problems == 1 else f"{problems} problems")
    return f"shardsurgeon verify: {verdict}: {safe_text(report.folder, None)}: {found}"


if __name__ == "__main__":
    main()
