"""The commands that read: ``inspect``, ``verify`` and the ``demo`` (which also writes, in a
temporary folder, to show the seed recipe)."""

from __future__ import annotations

import shlex
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from shardsurgeon import (
    Progress,
    StackHint,
    VerifyReport,
    compare_with_plan,
    describe_checkpoint,
    format_bytes,
    open_checkpoint,
    plan_expand,
    safe_text,
    verify_checkpoint,
)
from shardsurgeon.cli import show
from shardsurgeon.cli.base import cli, reports_errors, verbosity
from shardsurgeon.cli.params import (
    SOURCE,
)
from shardsurgeon.cli.write import expand


@cli.command()
@click.argument("folder", type=SOURCE)
@click.option("--layer-prefix", help="Layer stack prefix, when it cannot be detected.")
@click.option("--layers-key", help="config.json key that counts the layers.")
@verbosity
@reports_errors
def inspect(folder: Path | str, layer_prefix: str | None, layers_key: str | None, quiet: bool, verbose: bool) -> None:
    """Show a checkpoint's layer stack, tensors per layer, dtypes, parameters and shards.

    FOLDER may be a URL: s3://bucket/prefix (endpoint and credentials from the environment, as the
    AWS tools read them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID ...) or https://host/folder/ (Hub
    resolve/ URLs too); only the index, the config and each shard's header are fetched.
    """
    checkpoint = open_checkpoint(folder)
    click.echo(describe_checkpoint(checkpoint, StackHint(layer_prefix, layers_key)))
    if not quiet:
        show.report_fetched([checkpoint])


@cli.command()
@click.option("--keep", type=click.Path(path_type=Path), help="Build in this folder and keep it.")
@click.option("--force", is_flag=True, help="Replace the demo folders already in the --keep folder.")
@verbosity
@reports_errors
def demo(keep: Path | None, force: bool, quiet: bool, verbose: bool) -> None:
    """Build a small 32-layer Mistral-shaped checkpoint, expand it with the seed recipe, check it."""
    from shardsurgeon import demo_folders, make_demo_checkpoint  # numpy loads only for the demo

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
@click.option(
    "--router",
    "router_file",
    metavar="FILE",
    help="With --src: the file of routers the output was made from (upcycle or moe --router FILE).",
)
@click.option("--layer-prefix", help="Layer stack prefix, when it cannot be detected.")
@click.option("--layers-key", help="config.json key that counts the layers.")
@verbosity
@reports_errors
def verify_command(
    folder: Path | str,
    sources: tuple[Path | str, ...],
    router_file: str | None,
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
    shardsurgeon verify ./mixtral-init --src ./mistral-7b --router ./routers.safetensors
    """
    with verify_bar(quiet) as (on_start, progress):
        hint = StackHint(layer_prefix, layers_key)
        report = verify_checkpoint(
            folder, sources, router_file=router_file, stack_hint=hint, progress=progress, on_start=on_start
        )
    for mismatch in report.mismatches:
        click.echo(str(mismatch))
    if not quiet:
        for note in report.notes:
            click.echo(f"note: {note}")
        click.echo(verify_summary(report))
    if not report.ok:
        sys.exit(1)


@contextmanager
def verify_bar(quiet: bool) -> Iterator[tuple[Progress | None, Progress | None]]:
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


def verify_summary(report: VerifyReport) -> str:
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
