"""What the command tests share: the CLI run in process, a one-line refusal checked, and a folder's
tensors read back with the safetensors package (the reference reader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from safetensors.numpy import load_file

from shardsurgeon.cli import cli


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result: Result, *parts: str) -> None:
    """The command failed with one line, no traceback, holding each of ``parts``."""
    assert result.exit_code not in (0, None), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in lines[0], lines[0]


def tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every shard in ``folder``, by the safetensors package."""
    out: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out
