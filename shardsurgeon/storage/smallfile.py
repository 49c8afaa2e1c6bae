"""Read the small files of a checkpoint or a recipe (JSON, YAML, refs) without trusting them.

Only regular files are read: a FIFO would block and a device such as /dev/zero never ends, so
both are refused before any byte is read (the file is opened non-blocking and checked with fstat,
which also closes the race with a file swapped in after a stat). Reads stop one byte past a cap,
so memory is bounded by the cap, not by the file. Nested structures too deep for the parser are
the caller's to report: :data:`PARSE_ERRORS` lists what JSON and YAML parsers raise on them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shardsurgeon.errors import ShardSurgeonError
from shardsurgeon.units import format_bytes

MAX_JSON_BYTES = 64 << 20
"""An index: DeepSeek-V3's 92k tensors take 9 MB. JSON costs about 40 times its size in memory."""
MAX_CONFIG_BYTES = 1 << 20
"""config.json and other small JSON: kilobytes in every published model."""
MAX_RECIPE_BYTES = 64 << 10
"""mergekit configs are kilobytes; the largest published ones are a few hundred lines. YAML costs
hundreds of bytes of memory per node, so this bounds a config to tens of megabytes."""

PARSE_ERRORS = (ValueError, RecursionError, MemoryError)
"""What a JSON or YAML parser raises on malformed or absurdly nested text (YAMLError aside)."""


def read_small(path: Path, limit: int, error: type[ShardSurgeonError], what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit``; ``error`` (naming ``what``) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise error(f"{path}: is {_kind(status.st_mode)}, expected {what} in a regular file")
        chunks, size = [], 0
        wanted = max(status.st_size + 1, 1 << 20)  # the file in one read (then one bytes, not two)
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, wanted))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise error(f"{path}: is larger than {format_bytes(limit)}, too large for {what}; is it the right file?")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def check_writable_target(path: Path, error: type[ShardSurgeonError], flag: str) -> None:
    """Refuse to write to ``path`` when it exists and is not a regular file (a FIFO blocks the writer)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"{flag} {path}: cannot write: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{flag} {path}: is {_kind(mode)}; give the path of a regular file ('-' for standard output)")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
