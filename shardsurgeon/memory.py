"""Give memory the process has freed back to the system.

A large tokenizer costs tens of MB while a vocabulary change is planned, in the ``tokenizers``
library's allocations; freed, glibc keeps most of it in the process, so the writing that follows
would stack its own memory on top. ``malloc_trim(0)`` returns it. Elsewhere (macOS, Windows, musl)
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any


def release_freed_memory() -> None:
    """Return the heap's free pages to the system where the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None
