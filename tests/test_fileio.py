"""The I/O layer: the same bytes on every platform path, and real block sharing on XFS and btrfs.

Tests taking ``platform_mode`` run three times, as on Linux, macOS and Windows (see
``_platforms``). Byte patterns come from a hash of the file's role and offset, so a byte copied
from or to the wrong place changes what is compared. The mount tests (``reflink_mount``) need
root and loop devices and are skipped, saying why, elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest
from _mounts import syncfs, used_bytes
from hypothesis import given
from hypothesis import strategies as st

from shardsurgeon.storage import fileio
from shardsurgeon.storage.fileio import CopiedPiece, CopyCounts, RangeCopier, SourceEnded, Span, split_for_clone

pytest_plugins = ["_platforms", "_mounts"]  # fixtures: platform_mode, reflink_mount, on_mount

MiB = 1 << 20


def pattern(role: str, nbytes: int) -> bytes:
    return hashlib.shake_256(role.encode()).digest(nbytes)


def make_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- splitting ------------------------------------------------------------------------------------


@given(
    src=st.integers(0, 1 << 40),
    dst=st.integers(0, 1 << 40),
    nbytes=st.integers(0, 1 << 24),
    block=st.sampled_from([512, 4096, 65536]),
    congruent=st.booleans(),
)
def test_split_covers_the_range_and_aligns_only_whole_blocks(src, dst, nbytes, block, congruent):
    if congruent:
        dst = dst - (dst - src) % block
    spans = split_for_clone(src, dst, nbytes, block)
    assert [s.start for s in spans] == [sum(s.nbytes for s in spans[:i]) for i in range(len(spans))]
    assert sum(s.nbytes for s in spans) == nbytes and all(s.nbytes > 0 for s in spans)
    assert len(spans) <= 3 and sum(s.aligned for s in spans) <= 1
    for span in spans:
        if span.aligned:
            assert (src + span.start) % block == (dst + span.start) % block == span.nbytes % block == 0
    if (src - dst) % block:
        assert spans == ([Span(0, nbytes, False)] if nbytes else [])
    elif nbytes >= 2 * block:
        assert any(s.aligned for s in spans)


def test_split_of_the_issue_example():
    assert split_for_clone(100, 4196, 64 * MiB) == [
        Span(0, 3996, False),
        Span(3996, 64 * MiB - 4096, True),
        Span(64 * MiB - 100, 100, False),
    ]


# --- positional reads and writes, on every platform path ------------------------------------------


def test_read_and_write_at_offsets(tmp_path, platform_mode):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        fileio.write_all_at(fd, pattern("a", 10_000), 3)
        fileio.write_all_at(fd, memoryview(pattern("b", 5000))[1000:], 20_001)  # a gap: reads as zeros
        buffer = bytearray(30_000)
        assert fileio.read_at(fd, buffer, 0) == 24_001  # short only at the end of the file
        expected = bytes(3) + pattern("a", 10_000) + bytes(10_001 - 3) + pattern("b", 5000)[1000:]
        assert bytes(buffer[:24_001]) == expected
        view = memoryview(buffer)[5:105]
        assert fileio.read_at(fd, view, 9) == 100 and bytes(view) == expected[9:109]
        assert fileio.read_at(fd, bytearray(10), 24_001) == 0
        assert fileio.read_at(fd, bytearray(0), 5) == 0
    finally:
        os.close(fd)


def test_open_helpers_and_set_size_make_holes_of_zeros(tmp_path, platform_mode):
    fd = fileio.open_new(tmp_path / "f")
    try:
        fileio.set_size(fd, 3 * MiB)
        fileio.write_all_at(fd, b"x" * 10, MiB)
    finally:
        os.close(fd)
    fd = fileio.open_read(tmp_path / "f")
    try:
        buffer = bytearray(3 * MiB)
        assert fileio.read_at(fd, buffer, 0) == 3 * MiB
        assert buffer == bytes(MiB) + b"x" * 10 + bytes(2 * MiB - 10)
    finally:
        os.close(fd)


def test_seek_path_is_safe_from_two_threads(tmp_path):
    """On the portable path both threads move one file position; the lock keeps each seek with its I/O."""
    from _platforms import emulated  # loaded as a plugin first (pytest_plugins), so its asserts are rewritten

    chunk, rounds = 4096 + 3, 1000
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    source = pattern("read", chunk * 8)
    errors: list[str] = []
    with emulated("windows"):
        assert not hasattr(os, "pread")
        fileio.write_all_at(fd, source, 0)

        def reader() -> None:
            buffer = bytearray(chunk)
            for number in range(rounds):
                start = (number % 8) * chunk
                if fileio.read_at(fd, buffer, start) != chunk or buffer != source[start : start + chunk]:
                    errors.append(f"read {number} got wrong bytes")

        def writer() -> None:
            for number in range(rounds):
                fileio.write_all_at(fd, pattern(f"w{number % 8}", chunk), (8 + number % 8) * chunk)

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    try:
        assert errors == []
        written = os.pread(fd, 8 * chunk, 8 * chunk)
        assert written == b"".join(pattern(f"w{n}", chunk) for n in range(8))
    finally:
        os.close(fd)


# --- range copies ---------------------------------------------------------------------------------

COPIES = [
    pytest.param(100, 4196, 300_000, id="congruent-unaligned"),
    pytest.param(0, 8192, 5 * 4096, id="aligned-whole-blocks"),
    pytest.param(7, 8, 123_457, id="incongruent"),
    pytest.param(4000, 4000, 50, id="inside-one-block"),
    pytest.param(5, 9, 0, id="empty"),
]


@pytest.mark.parametrize(("src_offset", "dst_offset", "nbytes"), COPIES)
def test_copy_range_gives_the_same_bytes_on_every_path(tmp_path, platform_mode, src_offset, dst_offset, nbytes):
    source = pattern("source", src_offset + nbytes + 999)
    before = pattern("destination", dst_offset + nbytes + 777)
    src = fileio.open_read(make_file(tmp_path / "src", source))
    dst = os.open(make_file(tmp_path / "dst", before), os.O_WRONLY)
    pieces: list[CopiedPiece] = []
    try:
        copier = RangeCopier(chunk_bytes=10_000 + 1)  # many chunks, none a divisor of the lengths
        counts = copier.copy_range(src, src_offset, dst, dst_offset, nbytes, pieces.append)
    finally:
        os.close(src)
        os.close(dst)
    after = (tmp_path / "dst").read_bytes()
    assert after == before[:dst_offset] + source[src_offset : src_offset + nbytes] + before[dst_offset + nbytes :]
    assert counts.nbytes == sum(p.nbytes for p in pieces) == nbytes
    assert sorted((p.dst_offset, p.nbytes) for p in pieces) == _tiled(dst_offset, [p.nbytes for p in pieces])
    if platform_mode == "linux":
        assert counts.kernel_bytes == nbytes  # ext4, tmpfs and overlayfs all take copy_file_range
    else:
        assert counts == CopyCounts(user_bytes=nbytes)
        assert all(p.route == "user" and p.nbytes <= 10_001 for p in pieces)


def _tiled(start: int, sizes: list[int]) -> list[tuple[int, int]]:
    tiles = []
    for size in sizes:
        tiles.append((start, size))
        start += size
    return tiles


def test_copy_range_reports_aligned_bodies(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "KERNEL_CALL_BYTES", 8192)
    source = pattern("source", 100_000)
    src = fileio.open_read(make_file(tmp_path / "src", source))
    dst = fileio.open_new(tmp_path / "dst")
    pieces: list[CopiedPiece] = []
    try:
        counts = RangeCopier().copy_range(src, 100, dst, 4196, 50_000, pieces.append)
    finally:
        os.close(src)
        os.close(dst)
    assert counts == CopyCounts(kernel_bytes=50_000, aligned_kernel_bytes=45_056)
    assert [(p.nbytes, p.aligned) for p in pieces] == [
        (3996, False),
        *[(8192, True)] * 5,
        (4096, True),
        (948, False),
    ]
    assert (tmp_path / "dst").read_bytes()[4196:] == source[100:50_100]


@pytest.mark.parametrize("refusal", sorted(fileio._KERNEL_REFUSALS))
def test_a_refusing_kernel_is_asked_once_per_filesystem_pair(tmp_path, monkeypatch, refusal):
    calls = []

    def refuse(*args: int) -> int:
        calls.append(args)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    source = pattern("source", 60_000)
    src = fileio.open_read(make_file(tmp_path / "src", source))
    dst = fileio.open_new(tmp_path / "dst")
    try:
        copier = RangeCopier()
        first = copier.copy_range(src, 0, dst, 0, 30_000)
        second = copier.copy_range(src, 30_000, dst, 30_000, 30_000)
    finally:
        os.close(src)
        os.close(dst)
    assert len(calls) == 1
    assert first == second == CopyCounts(user_bytes=30_000)
    assert (tmp_path / "dst").read_bytes() == source


def test_other_kernel_errors_are_not_hidden(tmp_path, monkeypatch):
    def fail(*args: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", fail)
    src = fileio.open_read(make_file(tmp_path / "src", pattern("source", 100)))
    dst = fileio.open_new(tmp_path / "dst")
    try:
        with pytest.raises(OSError, match="I/O error"):
            RangeCopier().copy_range(src, 0, dst, 0, 100)
    finally:
        os.close(src)
        os.close(dst)


def test_short_and_zero_kernel_copies_are_finished(tmp_path, monkeypatch):
    real = os.copy_file_range
    calls = []

    def stingy(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
        calls.append(count)
        return 0 if len(calls) > 3 else real(src, dst, min(count, 7), src_offset, dst_offset)

    monkeypatch.setattr(os, "copy_file_range", stingy)
    source = pattern("source", 40_000)
    src = fileio.open_read(make_file(tmp_path / "src", source))
    dst = fileio.open_new(tmp_path / "dst")
    try:
        counts = RangeCopier().copy_range(src, 0, dst, 0, 40_000)
    finally:
        os.close(src)
        os.close(dst)
    assert counts == CopyCounts(kernel_bytes=21, aligned_kernel_bytes=0, user_bytes=40_000 - 21)
    assert (tmp_path / "dst").read_bytes() == source


def test_a_short_source_is_an_error(tmp_path, platform_mode):
    src = fileio.open_read(make_file(tmp_path / "src", pattern("source", 5000)))
    dst = fileio.open_new(tmp_path / "dst")
    try:
        with pytest.raises(SourceEnded) as raised:
            RangeCopier().copy_range(src, 1000, dst, 0, 10_000)
    finally:
        os.close(src)
        os.close(dst)
    assert raised.value.offset == 5000


def test_never_copies_every_byte_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", lambda *args: pytest.fail("copy_file_range was called"))
    src = fileio.open_read(make_file(tmp_path / "src", pattern("source", 9000)))
    dst = fileio.open_new(tmp_path / "dst")
    try:
        assert RangeCopier(use_kernel=False).copy_range(src, 0, dst, 0, 9000) == CopyCounts(user_bytes=9000)
    finally:
        os.close(src)
        os.close(dst)


# --- durability -----------------------------------------------------------------------------------


def test_durable_sync_uses_full_fsync_where_the_platform_has_it(tmp_path, monkeypatch):
    import fcntl

    done: list[str] = []
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, command: done.append(f"fcntl {command}"))
    monkeypatch.setattr(os, "fsync", lambda fd: done.append("fsync"))
    fileio.durable_sync(0)
    assert done == ["fcntl 51"]

    def refuse(fd: int, command: int) -> None:
        raise OSError(errno.ENOTSUP, "not supported")

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    fileio.durable_sync(0)
    assert done == ["fcntl 51", "fsync"]


def test_durable_sync_is_fsync_elsewhere(tmp_path, monkeypatch, platform_mode):
    done: list[int] = []
    monkeypatch.setattr(os, "fsync", done.append)
    fileio.durable_sync(7)
    assert done == [7]


def test_sync_file_and_folder(tmp_path, platform_mode):
    fileio.sync_file(make_file(tmp_path / "f", b"data"))
    fileio.sync_dir(tmp_path)
    assert (tmp_path / "f").read_bytes() == b"data"


# --- what the filesystem shares -------------------------------------------------------------------


def test_nothing_shares_on_the_test_folder(tmp_path, platform_mode):
    path = make_file(tmp_path / "f", pattern("f", 3 * 4096))
    block = fileio.block_size(tmp_path)
    assert block >= 512 and block & (block - 1) == 0
    reflink = fileio.can_reflink(path, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # the probe cleaned up
    if platform_mode == "windows":
        assert not reflink and fileio.shared_bytes(path) is None
    elif _filesystem(tmp_path) in ("ext4", "tmpfs", "overlay"):
        assert not reflink and fileio.shared_bytes(path) in (0, None)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path``, from the longest matching mount point."""
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    real = str(path.resolve())
    matching = [(point, kind) for point, kind in mounts if real == point or real.startswith(point.rstrip("/") + "/")]
    return max(matching, key=lambda m: len(m[0]))[1] if matching else "unknown"


def _copy_on(
    folder: Path, src_offset: int, dst_offset: int, nbytes: int, use_kernel: bool = True
) -> tuple[CopyCounts, int]:
    """Copy ``nbytes`` between two files of ``folder``; returns the counts and the disk it took."""
    source = os.urandom(src_offset + nbytes + 100)
    make_file(folder / "src", source)
    syncfs(folder)
    used = used_bytes(folder)
    src, dst = fileio.open_read(folder / "src"), fileio.open_new(folder / "dst")
    try:
        fileio.set_size(dst, dst_offset + nbytes + 100)
        counts = RangeCopier(use_kernel=use_kernel).copy_range(src, src_offset, dst, dst_offset, nbytes)
        fileio.durable_sync(dst)
    finally:
        os.close(src)
        os.close(dst)
    grown = used_bytes(folder) - used
    out = (folder / "dst").read_bytes()
    assert out[dst_offset : dst_offset + nbytes] == source[src_offset : src_offset + nbytes]
    assert out[:dst_offset] == bytes(dst_offset) and out[dst_offset + nbytes :] == bytes(100)
    return counts, grown


def test_congruent_copies_share_their_body(reflink_mount, on_mount):
    counts, grown = _copy_on(on_mount, 100, 4196, 64 * MiB)
    body = 64 * MiB - 4096
    assert counts == CopyCounts(kernel_bytes=64 * MiB, aligned_kernel_bytes=body)
    shared = fileio.shared_bytes(on_mount / "dst", 8192, body)
    assert shared is not None and shared >= 0.99 * body, f"{reflink_mount.kind}: {shared} of {body} shared"
    assert grown <= MiB, f"{reflink_mount.kind}: the copy took {grown} bytes of new disk"


def test_incongruent_copies_share_nothing(reflink_mount, on_mount):
    counts, grown = _copy_on(on_mount, 100, 4096, 64 * MiB)
    assert counts == CopyCounts(kernel_bytes=64 * MiB)
    assert fileio.shared_bytes(on_mount / "dst") == 0
    assert grown >= 60 * MiB


def test_reflink_never_shares_nothing(reflink_mount, on_mount):
    counts, _ = _copy_on(on_mount, 0, 0, 8 * MiB, use_kernel=False)
    assert counts == CopyCounts(user_bytes=8 * MiB)
    assert fileio.shared_bytes(on_mount / "dst") == 0


def test_can_reflink_only_within_a_reflink_filesystem(reflink_mount, on_mount, tmp_path):
    on_reflink = make_file(on_mount / "src", pattern("src", 10_000))
    elsewhere = make_file(tmp_path / "src", pattern("src", 10_000))
    assert fileio.block_size(on_mount) == 4096
    assert fileio.can_reflink(on_reflink, on_mount)
    assert fileio.can_reflink(make_file(on_mount / "tiny", b"abc"), on_mount)
    assert not fileio.can_reflink(elsewhere, on_mount)  # another filesystem
    assert not fileio.can_reflink(on_reflink, tmp_path)
    assert sorted(p.name for p in on_mount.iterdir()) == ["src", "tiny"]


def test_loop_mounts_are_gone_after_use(tmp_path):
    from _mounts import loop_mount

    with loop_mount("xfs", tmp_path) as mounted:
        assert os.path.ismount(mounted.path)
    assert not os.path.ismount(mounted.path)
    attached = subprocess.run(["losetup", "--associated", str(tmp_path / "xfs.img")], capture_output=True, text=True)
    assert attached.stdout == ""
