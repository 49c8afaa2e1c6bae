"""Run the shardsurgeon CLI with its file-system calls timed, optionally with one I/O knob changed.

    python bench/phases.py VARIANT PHASES_JSON -- expand --src ... --out ... -q

The CLI runs in this process as ``python -m shardsurgeon`` would; at exit, the seconds spent in each
kind of call (and how many calls) are written to PHASES_JSON, with the process's own wall time,
CPU time and peak RSS (VmHWM). Timing wraps only Python-level calls (a few hundred per 7b run), so
it costs nothing measurable. VARIANT is an experiment on the I/O layer, never a production setting:

- ``as-is``: the code as it is.
- ``no-hint``: no ``sync_file_range`` writeback hints (``fileio.start_writeback`` does nothing).
- ``call-1g``: ``copy_file_range`` calls of up to 1 GiB instead of ``fileio.KERNEL_CALL_BYTES``.
- ``call-16m``: calls of up to 16 MiB.
- ``end-sync``: no fsync per shard; one ``syncfs`` of the output's filesystem at exit instead
  (a timing experiment: the output is published before its data is durable).
- ``hint-thread``: the ``sync_file_range`` hints queued to one helper thread, so the copy goes on
  while the writeback is submitted; drained before each fsync (the time in the hints is then the
  helper's, not the copy's).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

VARIANTS = ("as-is", "no-hint", "call-1g", "call-16m", "end-sync", "hint-thread")

_start = time.perf_counter()
_spent: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)


def _timed(name: str, function):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _spent[name] += time.perf_counter() - began
            _calls[name] += 1

    return wrapper


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def main() -> None:
    variant, phases_path, dashdash, *cli_args = sys.argv[1:]
    if variant not in VARIANTS or dashdash != "--":
        sys.exit(f"usage: phases.py {{{'|'.join(VARIANTS)}}} PHASES_JSON -- CLI ARGS")
    imports_began = time.perf_counter()
    from shardsurgeon import cli
    from shardsurgeon.storage import fileio
    from shardsurgeon.write import executor as execute

    imports_s = time.perf_counter() - imports_began
    os.copy_file_range = _timed("copy_file_range", os.copy_file_range)  # fileio looks it up per call
    os.pwrite = _timed("pwrite", os.pwrite)
    os.ftruncate = _timed("ftruncate", os.ftruncate)
    hints = None
    if variant == "no-hint" or fileio._SYNC_FILE_RANGE is None:
        fileio._SYNC_FILE_RANGE = None
    elif variant == "hint-thread":
        from concurrent.futures import ThreadPoolExecutor

        hints = ThreadPoolExecutor(1)
        in_thread = _timed("sync_file_range (helper thread)", fileio._SYNC_FILE_RANGE)
        fileio._SYNC_FILE_RANGE = lambda fd, offset, nbytes, flags: hints.submit(in_thread, fd, offset, nbytes, flags)
    else:
        fileio._SYNC_FILE_RANGE = _timed("sync_file_range", fileio._SYNC_FILE_RANGE)
    if variant == "call-1g":
        fileio.KERNEL_CALL_BYTES = 1 << 30
    elif variant == "call-16m":
        fileio.KERNEL_CALL_BYTES = 16 << 20
    real_sync = fileio.durable_sync
    timed_sync = _timed("fsync (other files, folders)", real_sync)
    timed_shard_sync = _timed("fsync (shards)", real_sync)
    out = Path(cli_args[cli_args.index("--out") + 1]) if "--out" in cli_args else None

    drain = _timed("waiting for the helper's hints", lambda: hints.submit(lambda: None).result())

    def durable_sync(fd: int) -> None:
        if hints is not None:
            drain()
        if sys._getframe(1).f_globals.get("__name__") == execute.__name__:
            if variant != "end-sync":
                timed_shard_sync(fd)
        else:
            timed_sync(fd)

    fileio.durable_sync = durable_sync

    def report() -> None:
        if variant == "end-sync" and out is not None:
            began = time.perf_counter()
            fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
            ctypes.CDLL(None, use_errno=True).syncfs(fd)
            os.close(fd)
            _spent["syncfs at exit"] += time.perf_counter() - began
            _calls["syncfs at exit"] += 1
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record = {
            "variant": variant,
            "wall_s": round(time.perf_counter() - _start, 3),
            "imports_s": round(imports_s, 3),
            "user_s": round(usage.ru_utime, 3),
            "sys_s": round(usage.ru_stime, 3),
            "vm_hwm_mb": round(_vm_hwm_mb(), 1),
            "spent_s": {k: round(v, 3) for k, v in sorted(_spent.items())},
            "calls": dict(sorted(_calls.items())),
        }
        Path(phases_path).write_text(json.dumps(record))

    atexit.register(report)
    sys.argv = ["shardsurgeon", *cli_args]
    try:
        cli.main()
    except SystemExit as e:
        report_code = e.code
        atexit.unregister(report)
        report()
        raise SystemExit(report_code) from None


if __name__ == "__main__":
    main()
