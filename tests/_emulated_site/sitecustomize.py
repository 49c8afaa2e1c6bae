"""Hide the calls a platform lacks, in every Python process started while a test emulates it.

The tests' emulation (``tests/_platforms.py``) puts this folder first on ``PYTHONPATH`` and sets
``SHARDSURGEON_EMULATE``, so a child such as ``python -m shardsurgeon`` (the crash and resume tests
start those) runs with the same calls missing as the test process. Plain Python, no pytest: it runs
at the start-up of every child. It shadows any other ``sitecustomize`` for those children only.
"""

from __future__ import annotations

import os
import sys

EMULATE_ENV = "SHARDSURGEON_EMULATE"

HIDDEN: dict[str, tuple[str, ...]] = {
    "linux": (),
    # What macOS's Python lacks among the os calls this project could use; it has pread/pwrite/preadv.
    "macos": ("copy_file_range", "fdatasync", "posix_fadvise", "posix_fallocate"),
    # Windows lacks the positional calls and the vectored ones too, and O_CLOEXEC / O_DIRECTORY.
    "windows": (
        "copy_file_range",
        "fdatasync",
        "posix_fadvise",
        "posix_fallocate",
        "pread",
        "pwrite",
        "preadv",
        "pwritev",
        "readv",
        "writev",
        "O_CLOEXEC",
        "O_DIRECTORY",
    ),
}
"""``os`` attributes deleted per emulated platform. Not hidden, though Windows lacks them:
``statvfs`` (``shutil.disk_usage`` calls it on Linux, so hiding it would break the portable
function too) and the fcntl module's ioctls (the module itself is hidden instead)."""
HIDDEN_MODULES: dict[str, tuple[str, ...]] = {"linux": (), "macos": (), "windows": ("fcntl",)}


def hide_in_this_process(mode: str) -> None:
    for name in HIDDEN[mode]:
        if hasattr(os, name):
            delattr(os, name)
    for module in HIDDEN_MODULES[mode]:
        sys.modules[module] = None  # type: ignore[assignment]  # makes "import fcntl" raise ImportError


if os.environ.get(EMULATE_ENV, "linux") in HIDDEN:
    hide_in_this_process(os.environ.get(EMULATE_ENV, "linux"))
