"""Run the shardsurgeon CLI and stop it by a signal to itself at a chosen point of its work.

    python tests/_killable.py N[:SIGNAL][@PID] expand --src ... --out ...

Once N bytes of tensor data are done (as the progress callback counts them, kept shards included),
or at N = total + 1 just before the finished output is moved into place, the process sends itself
SIGKILL (or the signal named, such as SIGINT for a Ctrl-C); with ``@PID``, it sends it to that
process instead (an S3 server killed under a running upload) and goes on. The library has no hook for this: the
wrapper passes its own progress callback to the run sequence and wraps the commit, from outside.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from typing import Any

from shardsurgeon import api
from shardsurgeon.cli import main
from shardsurgeon.write.local import publish


def install(limit: int, sent: signal.Signals, pid: int | None = None) -> None:
    done = 0

    def count(nbytes: int) -> None:
        nonlocal done, limit
        done += nbytes
        if limit and done >= limit:
            limit = 0
            os.kill(pid or os.getpid(), sent)

    write_job, commit = api.write_job, publish.commit

    def counted_write(*args: Any, options: Any, **kwargs: Any) -> Any:
        progress = options.progress

        def both(nbytes: int) -> None:
            if progress is not None:
                progress(nbytes)
            count(nbytes)

        return write_job(*args, options=replace(options, progress=both), **kwargs)

    def counted_commit(*args: Any, **kwargs: Any) -> Any:
        count(1)  # the final rename counts as one more byte
        return commit(*args, **kwargs)

    api.write_job = counted_write  # type: ignore[assignment]
    publish.commit = counted_commit  # type: ignore[assignment]


def signal_state() -> str:
    """This process's blocked and ignored signals, as the kernel reports them."""
    with open("/proc/self/status") as status:
        return ", ".join(line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigPnd", "ShdPnd")))


if __name__ == "__main__":
    when, _, pid_text = sys.argv.pop(1).partition("@")
    limit_text, _, signal_name = when.partition(":")
    sent = signal.Signals[signal_name or "SIGKILL"]
    # A Ctrl-C as a terminal delivers it, whatever the test process passed down (a signal ignored
    # or blocked in the parent stays so in a child: CI saw a SIGINT that never arrived).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install(int(limit_text), sent, int(pid_text) if pid_text else None)
    sys.argv[0] = "shardsurgeon"
    try:
        main()
    except SystemExit as e:
        if e.code in (0, None) and sent is signal.SIGINT and not pid_text:  # the Ctrl-C did not stop it
            print(f"_killable: finished after its {sent.name}; {signal_state()}", file=sys.stderr)
        raise
