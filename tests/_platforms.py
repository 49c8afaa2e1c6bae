"""Run tests as on macOS or Windows, on Linux, by hiding the calls those platforms lack.

Three modes: ``linux`` (nothing hidden), ``macos`` (no ``os.copy_file_range``, ``os.fdatasync``,
``os.posix_fadvise``, ``os.posix_fallocate``) and ``windows`` (also no ``os.pread``, ``os.pwrite``,
``os.preadv``, ``os.pwritev``, ``os.readv``, ``os.writev``, ``os.O_CLOEXEC``, ``os.O_DIRECTORY``,
and ``import fcntl`` fails). The full lists are in ``_emulated_site/sitecustomize.py``. This works
because ``shardsurgeon.storage.fileio`` looks every such call up when it is made.

Three ways in:

- ``emulated(mode)``: a context manager, for a block of a test.
- the ``platform_mode`` fixture: parametrized over the three modes, for tests that check all three
  (``tests/test_fileio.py``).
- the autouse fixture ``emulated_platform``: reads ``SHARDSURGEON_EMULATE`` and hides the calls for
  every test of the session. Whole test modules run a second and a third time this way, unchanged::

      cd tests && for mode in macos windows; do
          SHARDSURGEON_EMULATE=$mode pytest test_expand.py test_merge.py test_verify.py test_resume.py
      done

  It is active wherever this module is loaded as a plugin: ``pytest_plugins = ["_platforms"]`` in
  ``tests/conftest.py`` (or ``-p _platforms`` with ``tests`` on ``PYTHONPATH``). With the variable
  unset it hides nothing.

Child processes (``python -m shardsurgeon`` in the crash tests) get the same calls hidden: the
emulation sets ``SHARDSURGEON_EMULATE`` and puts ``_emulated_site`` first on ``PYTHONPATH``, whose
``sitecustomize`` hides them at the child's start-up.

What this proves and what it does not: the portable code paths run, and give the same bytes as the
Linux paths, on a real kernel. It does not run Windows' own API calls (sparse files, end of file),
macOS's ``F_FULLFSYNC``, or the filesystems of those platforms; those are covered by reasoning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

_SITE = Path(__file__).parent / "_emulated_site"


def _load_site() -> ModuleType:
    """The sitecustomize module, loaded under another name: it must not run its env check here."""
    spec = importlib.util.spec_from_file_location("_shardsurgeon_emulated_site", _SITE / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_site = _load_site()
EMULATE_ENV: str = _site.EMULATE_ENV
HIDDEN: dict[str, tuple[str, ...]] = _site.HIDDEN
HIDDEN_MODULES: dict[str, tuple[str, ...]] = _site.HIDDEN_MODULES
MODES = tuple(HIDDEN)


def hide(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide what ``mode`` lacks until ``monkeypatch`` is undone, here and in child processes."""
    if mode not in HIDDEN:
        raise ValueError(f"{EMULATE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    for name in HIDDEN[mode]:
        monkeypatch.delattr(os, name, raising=False)
    for module in HIDDEN_MODULES[mode]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setenv(EMULATE_ENV, mode)
    if mode != "linux":
        path = os.environ.get("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_SITE), *([path] if path else [])]))


@contextmanager
def emulated(mode: str) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        hide(mode, monkeypatch)
        yield mode


@pytest.fixture(params=MODES)
def platform_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using it runs three times: as on Linux, macOS and Windows."""
    mode: str = request.param
    hide(mode, monkeypatch)
    return mode


@pytest.fixture(autouse=True)
def emulated_platform() -> Iterator[str]:
    """The platform named by ``SHARDSURGEON_EMULATE`` (default ``linux``), for every test.

    With a MonkeyPatch of its own, not the ``monkeypatch`` fixture: an autouse fixture is set up
    first and torn down last, and so would be the shared ``monkeypatch``, whose ``chdir`` would
    then be undone only after the test's other fixtures (a mount it chdir'ed into) are gone.
    """
    with emulated(os.environ.get(EMULATE_ENV, "linux")) as mode:
        yield mode
