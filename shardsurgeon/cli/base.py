"""The command group and how errors reach the user: one line each, an exit status by the error's
class, a traceback only with ``-v``; standard output that fails is told apart from other errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from shardsurgeon import DestinationError, RecipeError, ShardSurgeonError, __version__, safe_text

F = TypeVar("F", bound=Callable[..., Any])


USAGE_ERRORS = (RecipeError, DestinationError)
"""Errors in what the user typed: exit status 2, as click gives usage errors; other errors give 1."""


MAX_MESSAGE_CHARS = 2000
"""Whatever a message holds, it is printed on one line of at most this many characters."""


def exit_status(error: ShardSurgeonError) -> int:
    return 2 if isinstance(error, USAGE_ERRORS) else 1


class OneLineErrors(click.Group):
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


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="shardsurgeon")
def cli() -> None:
    """Rewrite Hugging Face safetensors checkpoints layer by layer, streaming, in constant memory."""


def main() -> None:
    if sys.stderr is None:  # started with 2>&-: nowhere to say anything, but the work is still done
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    sys.stdout = GuardedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        cli(prog_name="shardsurgeon")
    except StdoutFailed as e:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # so that the interpreter's last flush does not fail once more
        os.close(null)
        click.echo(f"shardsurgeon: error: cannot write to standard output: {e}", err=True)
        sys.exit(1)


def verbosity(command: F) -> F:
    command = click.option("-q", "--quiet", is_flag=True, help="No progress, notes or summary.")(command)
    return click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of errors.")(command)


def reports_errors(command: F) -> F:
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
        except (StdoutFailed, click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
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


class StdoutFailed(Exception):
    """Standard output refused our text (a full disk, a closed pipe)."""


class GuardedStdout:
    """sys.stdout, with its write errors told apart from every other OSError."""

    def __init__(self, stream: Any):
        self._stream = stream
        """None when the process was started with standard output closed (>&-)."""

    def write(self, text: str) -> int:
        if self._stream is None:
            raise StdoutFailed("it is closed")
        try:
            return int(self._stream.write(text))
        except OSError as e:
            raise StdoutFailed(e.strerror or str(e)) from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutFailed(e.strerror or str(e)) from None

    def isatty(self) -> bool:
        return self._stream is not None and bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise StdoutFailed("it is closed")
        return getattr(self._stream, name)
