"""Real XFS (``-m reflink=1``) and btrfs filesystems on loop devices, for tests of block sharing.

Each filesystem is an image file in a pytest temporary folder, sparse so that it costs only what
the tests write, attached with ``losetup --find --show`` and mounted beside it. Teardown always
unmounts it and detaches the loop device this fixture attached (by its name, never "all"), also
when a test fails. A test process killed outright (SIGKILL) leaves them behind; ``losetup -a`` and
``mount`` show them.

Tests are skipped, with the reason, only where such a mount is impossible: not Linux, not root,
no loop device support, ``mkfs.xfs`` / ``mkfs.btrfs`` not installed (``.ci/run`` installs
``xfsprogs`` and ``btrfs-progs``), a kernel without the filesystem, or a container that refuses
loop devices or mounts. Any other failure fails the test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

IMAGE_BYTES = 1 << 30
"""Sparse: large enough that mkfs gives both filesystems their normal (not small-volume) layout."""
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
PACKAGES = {"xfs": "xfsprogs", "btrfs": "btrfs-progs"}
_REFUSED = ("permission denied", "operation not permitted", "read-only file system")


@dataclass(frozen=True, slots=True)
class Mounted:
    kind: str
    path: Path
    device: str


def why_impossible(kind: str) -> str | None:
    """Why a ``kind`` loop mount cannot be made here, or None when it should work."""
    if not sys.platform.startswith("linux"):
        return "loop mounts need Linux"
    if os.geteuid() != 0:
        return "loop mounts need root"
    for tool in ("losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/loop-control").exists():
        return "no loop device support (/dev/loop-control is missing)"
    if shutil.which(MKFS[kind][0]) is None:
        return f"{MKFS[kind][0]} is not installed (apt-get install {PACKAGES[kind]})"
    if kind not in Path("/proc/filesystems").read_text().split() and not _loadable(kind):
        return f"the kernel has no {kind} support"
    return None


def _loadable(kind: str) -> bool:
    return shutil.which("modprobe") is not None and _run(["modprobe", kind]).returncode == 0


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _check(command: list[str], what: str) -> str:
    """Run ``command``; skip if the system refuses it, fail on any other error; returns stdout."""
    result = _run(command)
    if result.returncode != 0:
        message = f"{what}: {' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}"
        if any(refusal in message.lower() for refusal in _REFUSED):
            pytest.skip(f"loop mounts are refused here ({message})")
        pytest.fail(message)
    return result.stdout


@contextmanager
def loop_mount(kind: str, folder: Path) -> Iterator[Mounted]:
    """Make a ``kind`` filesystem in ``folder``, mount it at ``folder / "mnt"``, and always clean up."""
    reason = why_impossible(kind)
    if reason is not None:
        pytest.skip(reason)
    image, mount_point = folder / f"{kind}.img", folder / "mnt"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    _check([*MKFS[kind], str(image)], f"making {kind}")
    mount_point.mkdir()
    device = _check(["losetup", "--find", "--show", str(image)], "attaching a loop device").strip()
    try:
        _check(["mount", "-t", kind, device, str(mount_point)], f"mounting {kind}")
        try:
            yield Mounted(kind, mount_point, device)
        finally:
            _unmount(mount_point)
    finally:
        _detach(device)
        image.unlink()  # sparse, but holds every block the tests wrote: not left for pytest's tmp retention


def _unmount(mount_point: Path) -> None:
    for _ in range(10):
        if _run(["umount", str(mount_point)]).returncode == 0:
            return
        time.sleep(0.5)  # busy: a descriptor closing late, or udev probing the device
    _run(["umount", "--lazy", str(mount_point)])


def _detach(device: str) -> None:
    for _ in range(10):
        if _run(["losetup", "--detach", device]).returncode == 0:
            return
        time.sleep(0.5)


def syncfs(folder: Path) -> None:
    """Commit the filesystem holding ``folder``, so statvfs counts what was written (btrfs counts lazily)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def used_bytes(folder: Path) -> int:
    """Bytes in use on the filesystem holding ``folder``, after a syncfs."""
    syncfs(folder)
    info = os.statvfs(folder)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


@pytest.fixture(scope="session", params=sorted(MKFS))
def reflink_mount(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    """A mounted XFS, then btrfs, filesystem with reflink; one of each for the whole session."""
    with loop_mount(request.param, tmp_path_factory.mktemp(request.param)) as mounted:
        yield mounted


@pytest.fixture
def on_mount(reflink_mount: Mounted) -> Iterator[Path]:
    """A fresh folder on the mounted filesystem, emptied after the test so space does not run out."""
    folder = reflink_mount.path / f"test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder)
