"""The command line: parses arguments, calls the library, turns library errors into one-line messages.

The only package that imports click: ``base`` (the group, errors), ``params`` (parameter types and
shared options), ``write`` (expand, merge, apply), ``experts`` (upcycle, prune-experts, moe),
``vocab`` (vocab), ``look`` (inspect, verify, demo) and ``show`` (progress and summaries on stderr).
"""

from shardsurgeon.cli import experts, look, vocab, write  # noqa: F401  (each registers its commands on the group)
from shardsurgeon.cli.base import cli, exit_status, main

__all__ = ["cli", "exit_status", "main"]
