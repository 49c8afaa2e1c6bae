"""Scratch folders on tmpfs when there is one, for tests that write many small checkpoints.

Such tests need no disk: a SIGKILL loses nothing the page cache holds, and fsync on a busy disk
would only make them slow (the code under test fsyncs every file it writes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SHM = Path("/dev/shm")


@contextmanager
def scratch_folder(fallback: Path | None = None) -> Iterator[Path]:
    """A fresh folder under /dev/shm, removed afterwards; else ``fallback`` (or a temporary folder)."""
    on_tmpfs = SHM.is_dir() and os.access(SHM, os.W_OK)
    if fallback is not None and not on_tmpfs:
        yield fallback
        return
    with tempfile.TemporaryDirectory(dir=SHM if on_tmpfs else None, prefix="shardsurgeon-test-") as folder:
        yield Path(folder)
