"""Benchmark of issue 13: the seed recipe with a float16 cast, one writer against two, and on Ray.

For each shape (``1b``, ``wide``; sources generated with ``make_checkpoint.py`` in ``--workdir``),
three modes of ``python -m shardsurgeon expand --src SRC --dup LASTx12 --zero o_proj,down_proj
--dtype float16 --max-shard-size SIZE -q`` (this checkout):

- ``jobs1``: ``--jobs 1``, one process;
- ``jobs2``: ``--jobs 2``, two writer processes (``multiprocessing`` spawn) under the driver;
- ``ray2``: ``--ray ADDRESS`` against a local Ray head started here with two CPUs (``ray start
  --head --block --num-cpus=2 ...``, its own session, stopped by killing its process group), so at
  most two tasks run at once.

One untimed warm-up of each mode, then ``--pairs`` rounds in which the modes alternate (jobs1,
jobs2, ray2, jobs1, ...); medians per mode, and the median of the per-round ratios to ``jobs1``.
``--max-shard-size`` (default ``1GB``) gives these 3.3-3.6 GB outputs several shards to share out:
at the default 5 GB each is a single shard, which one process writes whatever ``--jobs`` says.

Per run: wall time; CPU time (user + sys) of every process of the run: the driver and its
``--jobs`` children from ``wait4`` (GNU time, which waits for the tree), Ray's workers from their
own report; peak RSS of each process as its ``VmHWM`` at exit, written by a ``sitecustomize``
this script puts first on every child's ``PYTHONPATH`` (the Ray head is started with it too, so
its workers inherit it), and as a fallback for processes that are killed rather than exit (Ray
workers at the end of a job) the last ``VmHWM`` seen by a 50 ms sampler of the raylet's children;
the system's CPU and I/O pressure (PSI ``some``, stalled share of the wall) and load average.
"Limit" says which resource the run waited for: the disk when PSI shows tasks stalled on I/O for a
fifth of the wall or more, else the CPU, with this run's cores busy (user+sys / wall) and PSI's
CPU stall beside it (system-wide: other people's load on a shared machine counts).

Prints a JSON line per run and a markdown table; removes everything it generated.

    PYTHONPATH=. python bench/parallel.py [--shapes 1b,wide] [--pairs 3] [--workdir DIR]
    PYTHONPATH=. python bench/parallel.py --table-from LOG   (the table again, from the JSON lines it printed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from expand import COPIES, emit, machine, remove, tree_bytes
from make_checkpoint import SHAPES, make_checkpoint

import shardsurgeon

GNU_TIME = "/usr/bin/time"
MODES = ("jobs1", "jobs2", "ray2")
SITECUSTOMIZE = """\
import atexit, os, sys
_dir = os.environ.get("SHARDSURGEON_BENCH_RSS_DIR")
if _dir:
    def _report():
        try:
            hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            t = os.times()
            what = open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode(errors="replace")[:200]
            with open(os.path.join(_dir, str(os.getpid())), "w") as f:
                f.write(f"{hwm} {t.user + t.system:.3f} {what}\\n")
        except Exception:
            pass
    atexit.register(_report)
"""


@dataclass
class RunResult:
    wall_s: float
    exit_code: int
    tree_cpu_s: float
    """user+sys of the driver and every child it waited for (GNU time's wait4)."""
    processes: list[dict[str, object]] = field(default_factory=list)
    psi_cpu_some: float = 0.0
    psi_io_some: float = 0.0
    tail: str = ""


def psi_total(kind: str) -> int:
    try:
        line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
    except OSError:
        return 0
    return int(line.rsplit("total=", 1)[1])


def children_of(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                for child in map(int, text):
                    found.append(child)
                    todo.append(child)
        except OSError:
            continue
    return found


def status_of(pid: int) -> tuple[int, float, str] | None:
    """(VmHWM KiB, user+sys s, command) of a live process."""
    try:
        hwm = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        return hwm, cpu, command
    except (OSError, StopIteration, IndexError):
        return None


class Sampler:
    """Last-seen VmHWM and CPU of the Ray workers (the raylet's descendants) during a run."""

    def __init__(self, root: int | None):
        self.root = root
        self.seen: dict[int, tuple[int, float, str]] = {}
        self.start_cpu: dict[int, float] = {}
        for pid in children_of(root) if root else []:
            info = status_of(pid)
            if info is not None:
                self.start_cpu[pid] = info[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        if self.root:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for pid in children_of(self.root):  # type: ignore[arg-type]
                info = status_of(pid)
                if info is not None and info[2].startswith("ray::"):
                    self.seen[pid] = (info[0], info[1] - self.start_cpu.get(pid, 0.0), info[2])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.root:
            self._thread.join()


def run(cmd: list[str], env: dict[str, str], rss_dir: Path, raylet: int | None) -> RunResult:
    for entry in rss_dir.iterdir():
        entry.unlink()
    os.sync()
    psi = (psi_total("cpu"), psi_total("io"))
    with tempfile.TemporaryFile() as output, Sampler(raylet) as sampler:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", str(rss_dir.parent / "time.txt"), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            raise
        wall = time.perf_counter() - start
        if raylet:
            time.sleep(0.3)  # Ray workers of the finished job exit (and report) shortly after the driver
        output.seek(0)
        tail = output.read()[-1500:].decode(errors="replace").strip()
    result = RunResult(wall, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, tail=tail)
    result.psi_cpu_some = (psi_total("cpu") - psi[0]) / 1e6 / wall
    result.psi_io_some = (psi_total("io") - psi[1]) / 1e6 / wall
    reported: dict[int, tuple[int, float, str]] = {}
    for entry in rss_dir.iterdir():
        hwm, cpu, what = entry.read_text().split(" ", 2)
        reported[int(entry.name)] = (int(hwm), float(cpu), what.strip())
    for pid, info in sampler.seen.items():
        if info[1] > 0.05:  # a worker of this run (new, or an idle one that took a task); CPU during the run
            reported.setdefault(pid, (*info[:2], info[2] + " [sampled]"))
    for pid, (hwm, cpu, what) in sorted(reported.items()):
        result.processes.append(
            {"pid": pid, "peak_rss_mb": round(hwm * 1024 / 1e6, 1), "cpu_s": round(cpu, 2), "what": role(what)}
        )
    return result


def role(command: str) -> str:
    if "resource_tracker" in command:
        return "resource_tracker"
    if "spawn_main" in command:
        return "jobs child"
    if command.startswith("ray::") or "default_worker.py" in command:
        return "ray worker" + (" [sampled]" if "[sampled]" in command else "")
    if "shardsurgeon" in command:
        return "driver"
    return command[:60]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayHead:
    """``ray start --head --block`` in its own session; stopped by killing that process group."""

    def __init__(self, env: dict[str, str]):
        self.exe = str(Path(sys.executable).with_name("ray"))
        self.temp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # Ray's socket paths must stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [
            self.exe,
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp}",
        ]
        self.log = open(self.temp.parent / f"{self.temp.name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while subprocess.run(
            [self.exe, "status", f"--address={self.address}"], capture_output=True, env=env
        ).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start; see {self.log.name}")
            time.sleep(1)

    def raylet(self) -> int | None:
        for pid in children_of(self.proc.pid):
            info = status_of(pid)
            if info and "raylet" in info[2].split()[0]:
                return pid
        return None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.temp, ignore_errors=True)


def command(mode: str, src: Path, out: Path, layers: int, shard_size: str, ray_address: str) -> list[str]:
    base = [
        sys.executable,
        "-m",
        "shardsurgeon",
        "expand",
        "--src",
        str(src),
        "--dup",
        f"{layers - 1}x{COPIES}",
        "--zero",
        "o_proj,down_proj",
        "--dtype",
        "float16",
        "--max-shard-size",
        shard_size,
        "--out",
        str(out),
        "-q",
    ]
    return base + {"jobs1": ["--jobs", "1"], "jobs2": ["--jobs", "2"], "ray2": ["--ray", ray_address]}[mode]


def limit(busy: float, psi_cpu: float, psi_io: float, cores: int) -> str:
    """The resource the run waited for: the disk when tasks stalled on I/O for a fifth of the wall,
    else the CPU (this run's own cores busy, plus the share of the wall some task waited for a core,
    which on a shared machine is other people's load too)."""
    if psi_io >= 0.2:
        return f"disk (I/O stall {psi_io:.2f})"
    return f"CPU ({busy:.2f} of {cores} cores ours; CPU stall {psi_cpu:.2f}, I/O stall {psi_io:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,wide")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ssb-parallel"))
    parser.add_argument("--table-from", type=Path, help="only print the table of the JSON lines of an earlier run")
    args = parser.parse_args(argv)
    if args.table_from is not None:
        logged: dict[str, dict[str, list[dict[str, object]]]] = {}
        for line in args.table_from.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if "mode" in record and "wall_s" in record and record.get("run") != "warmup":
                logged.setdefault(str(record["shape"]), {}).setdefault(str(record["mode"]), []).append(record)
        print(table(list(logged.items()), len(os.sched_getaffinity(0))))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    modes = args.modes.split(",")
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    site, rss_dir = workdir / "site", workdir / "rss"
    site.mkdir(exist_ok=True)
    rss_dir.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    checkout = str(Path(shardsurgeon.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": f"{site}:{checkout}", "SHARDSURGEON_BENCH_RSS_DIR": str(rss_dir)}
    cores = len(os.sched_getaffinity(0))
    head: RayHead | None = None
    rows = []
    try:
        info = machine(workdir)
        if "ray2" in modes:
            head = RayHead(env)
        emit(
            {
                "machine": info,
                "modes": modes,
                "max_shard_size": args.max_shard_size,
                "ray": head.address if head else None,
            }
        )
        raylet = head.raylet() if head else None
        for shape_name in args.shapes.split(","):
            shape = SHAPES[shape_name]
            src, out = workdir / f"src-{shape.name}", workdir / f"out-{shape.name}"
            if not src.exists():
                make_checkpoint(shape, src, progress=lambda m: None)
            per_mode: dict[str, list[dict[str, object]]] = {m: [] for m in modes}
            for number in range(args.pairs + 1):
                label = "warmup" if number == 0 else f"pair{number}"
                for mode in modes:
                    remove(out)
                    cmd = command(
                        mode, src, out, shape.num_hidden_layers, args.max_shard_size, head.address if head else ""
                    )
                    r = run(cmd, env, rss_dir, raylet if mode == "ray2" else None)
                    if r.exit_code != 0:
                        emit({"shape": shape.name, "mode": mode, "run": label, "error": r.tail[-600:]})
                        return 1
                    size, holes = tree_bytes(out)
                    shards = len(list(out.glob("*.safetensors")))
                    ray_cpu = sum(float(p["cpu_s"]) for p in r.processes if str(p["what"]).startswith("ray worker"))
                    record = {
                        "shape": shape.name,
                        "mode": mode,
                        "run": label,
                        "wall_s": round(r.wall_s, 3),
                        "cpu_s": round(r.tree_cpu_s + ray_cpu, 2),
                        "shards": shards,
                        "data_gb": round((size - holes) / 1e9, 3),
                        "psi_cpu_some": round(r.psi_cpu_some, 2),
                        "psi_io_some": round(r.psi_io_some, 2),
                        "loadavg_1m": round(os.getloadavg()[0], 2),
                        "processes": r.processes,
                    }
                    emit(record)
                    if number > 0:
                        per_mode[mode].append(record)
            remove(out)
            remove(src)
            rows.append((shape.name, per_mode))
    finally:
        if head is not None:
            head.stop()
        for shape_name in args.shapes.split(","):
            remove(workdir / f"out-{shape_name}")
            remove(workdir / f"src-{shape_name}")
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows, cores))
    return 0


def table(rows: list[tuple[str, dict[str, list[dict[str, object]]]]], cores: int) -> str:
    med = statistics.median
    head = [
        "shape",
        "mode",
        "shards",
        "wall s (runs)",
        "vs jobs1",
        "user+sys s",
        "cores busy",
        "limit",
        "peak RSS MB per process",
        "PSI cpu / io",
        "load avg",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for shape, per_mode in rows:
        base = per_mode.get("jobs1", [])
        for mode, rs in per_mode.items():
            if not rs:
                continue
            wall = med([float(r["wall_s"]) for r in rs])  # type: ignore[arg-type]
            cpu = med([float(r["cpu_s"]) for r in rs])  # type: ignore[arg-type]
            ratio = (
                f"{med([float(r['wall_s']) / float(b['wall_s']) for r, b in zip(rs, base, strict=True)]):.2f}x"  # type: ignore[arg-type]
                if base
                else ""
            )
            peaks: dict[str, float] = {}
            for r in rs:
                for p in r["processes"]:  # type: ignore[attr-defined]
                    peaks[p["what"]] = max(peaks.get(p["what"], 0.0), p["peak_rss_mb"])
            peak_text = "; ".join(f"{k} {v}" for k, v in sorted(peaks.items()))
            cells = [
                shape,
                mode,
                rs[0]["shards"],
                f"{wall:.2f} ({', '.join(str(r['wall_s']) for r in rs)})",
                ratio,
                f"{cpu:.2f}",
                f"{cpu / wall:.2f}",
                limit(
                    cpu / wall,
                    med([float(r["psi_cpu_some"]) for r in rs]),  # type: ignore[arg-type]
                    med([float(r["psi_io_some"]) for r in rs]),
                    cores,
                ),
                peak_text,  # type: ignore[arg-type]
                f"{med([float(r['psi_cpu_some']) for r in rs]):.2f} / {med([float(r['psi_io_some']) for r in rs]):.2f}",  # type: ignore[arg-type]
                f"{min(r['loadavg_1m'] for r in rs)}-{max(r['loadavg_1m'] for r in rs)}",
            ]  # type: ignore[type-var]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
