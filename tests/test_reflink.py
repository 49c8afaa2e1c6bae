"""Copies that share blocks with their source, on real XFS and btrfs loop mounts; and ``--reflink``.

The seed recipe (``--dup LASTx12 --zero o_proj,down_proj``) runs on two checkpoints written into the
mount: a Llama-shaped one whose tensors are all multiples of 4096 bytes, and a Qwen2-shaped one
whose biases and norms are not (3584 and 512 bytes). What is shared is read back with FIEMAP
(``FIEMAP_EXTENT_SHARED``), new disk with statvfs after a syncfs. Outputs must be byte-identical to
the same run on the ordinary filesystem of the test folder, verify against their source, and
resume after a kill. The mount tests are skipped, saying why, only where loop mounts are
impossible (``_mounts.py``); the others run everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _mounts import Mounted, used_bytes
from conftest import folder_bytes, run_cli, write_checkpoint, write_tiny_checkpoint

from shardsurgeon import Job, format_bytes, mistral_config, plan_expand
from shardsurgeon.storage import fileio

KILLABLE = Path(__file__).with_name("_killable.py")
COPIES = 12
ZERO = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    layers: int
    specs: list[tuple[str, tuple[int, ...]]]
    config: dict

    def args(self, src: Path) -> list[str | Path]:
        return ["expand", "--src", src, "--dup", f"{self.layers - 1}x{COPIES}", "--zero", ",".join(ZERO)]

    def job(self, src: Path) -> Job:
        return plan_expand(src, dups=[(self.layers - 1, COPIES)], zero=ZERO)


def llama_like(layers: int, hidden: int, inter: int, kv: int, vocab: int, bias: bool) -> Shape:
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (hidden, hidden))]
        specs += [(p + "self_attn.q_proj.bias", (hidden,))] if bias else []
        specs += [(p + "self_attn.k_proj.weight", (kv, hidden))]
        specs += [(p + "self_attn.k_proj.bias", (kv,))] if bias else []
        specs += [(p + "self_attn.v_proj.weight", (kv, hidden))]
        specs += [(p + "self_attn.v_proj.bias", (kv,))] if bias else []
        specs += [
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    config = mistral_config(layers, hidden, inter, hidden // 128, kv // 128, vocab) | {"_name_or_path": "acme/m"}
    return Shape(layers, specs, config)


SHAPES = {
    # every tensor a multiple of 4096 bytes: 92 MB in 2 files, 256 MB copied by the seed recipe
    "llama": llama_like(4, hidden=2048, inter=512, kv=128, vocab=64, bias=False),
    # Qwen2's odd sizes: biases of 3584 and 512 bytes, norms of 3584; 78 MB, 213 MB copied
    "qwen2": llama_like(4, hidden=1792, inter=512, kv=256, vocab=64, bias=True),
}


@pytest.fixture(scope="module")
def on_mount_sources(reflink_mount: Mounted, ordinary_sources: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Both checkpoints, written into the mounted filesystem once per module: copied from the
    ordinary ones (another filesystem, so every block is written anew; generating 170 MB again
    for each mount only cost time)."""
    folder = reflink_mount.path / f"sources-{os.getpid()}"
    for name in SHAPES:
        shutil.copytree(ordinary_sources[name], folder / name)
    yield {name: folder / name for name in SHAPES}
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def ordinary_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same checkpoints on the test folder's own filesystem (ext4, overlayfs or tmpfs here)."""
    folder = tmp_path_factory.mktemp("ordinary")
    for name, shape in SHAPES.items():
        write_checkpoint(folder / name, shape.specs, 2, shape.config)
    return {name: folder / name for name in SHAPES}


def comparable(out: Path, src: Path) -> dict[str, bytes]:
    """The output's files; the model card records the --src path, which differs between filesystems."""
    files = folder_bytes(out)
    files["README.md"] = files["README.md"].replace(str(src).encode(), b"SRC")
    return files


def shared_in(out: Path, job: Job) -> int:
    measured = [fileio.shared_bytes(out / shard.name) for shard in job.layout.shards]
    assert None not in measured, "FIEMAP answers on XFS and btrfs"
    return sum(m for m in measured if m is not None)


def file_bytes(out: Path, job: Job) -> int:
    return sum((out / shard.name).stat().st_size for shard in job.layout.shards)


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_the_seed_recipe_shares_its_copies_with_the_source(
    reflink_mount, on_mount, on_mount_sources, ordinary_sources, shape_name, tmp_path, monkeypatch
):
    shape, src = SHAPES[shape_name], on_mount_sources[shape_name]
    job = shape.job(src)
    before = used_bytes(on_mount)
    monkeypatch.chdir(on_mount)
    result = run_cli(*shape.args(src), "--out", "out")
    assert result.exit_code == 0, result.output
    grown = used_bytes(on_mount) - before
    out = on_mount / "out"
    shared = shared_in(out, job)
    where = f"{reflink_mount.kind}, {shape_name}"
    assert shared >= 0.99 * job.layout.copied_bytes, f"{where}: {shared} of {job.layout.copied_bytes} copied bytes"
    assert shared >= job.layout.shareable_bytes, f"{where}: the layout promised {job.layout.shareable_bytes}"
    assert grown <= 0.01 * file_bytes(out, job), f"{where}: {grown} bytes of new disk for {file_bytes(out, job)}"
    assert f"({format_bytes(shared)} shared with the source, " in result.output.splitlines()[-1]

    verified = run_cli("verify", out, "--src", src)
    assert verified.exit_code == 0, verified.output

    monkeypatch.chdir(tmp_path)
    here = ordinary_sources[shape_name]
    assert run_cli(*shape.args(here), "--out", "out", "-q").exit_code == 0
    assert comparable(tmp_path / "out", here) == comparable(out, src), "the same bytes on any filesystem"


def expand_process(cwd: Path, args: list[str | Path], kill_after: int | None = None) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    runner = ["-m", "shardsurgeon"] if kill_after is None else [str(KILLABLE), str(kill_after)]
    command = [sys.executable, *runner, *map(str, args), "--out", "out", "-q"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_killed_run_resumes_byte_identical_and_still_shares(reflink_mount, on_mount, on_mount_sources):
    shape, src = SHAPES["llama"], on_mount_sources["llama"]
    job = shape.job(src)
    reference = expand_process(on_mount / "whole", shape.args(src))
    assert reference.returncode == 0, reference.stderr
    killed = expand_process(on_mount / "killed", shape.args(src), kill_after=job.layout.total_size // 2)
    assert killed.returncode == -9, killed.stderr
    assert not (on_mount / "killed" / "out").exists()
    resumed = expand_process(on_mount / "killed", shape.args(src))
    assert resumed.returncode == 0, resumed.stderr
    out = on_mount / "killed" / "out"
    assert folder_bytes(out) == folder_bytes(on_mount / "whole" / "out")
    assert shared_in(out, job) >= 0.99 * job.layout.copied_bytes


def test_reflink_always_refuses_a_destination_that_cannot_share(
    reflink_mount, on_mount, on_mount_sources, ordinary_sources
):
    shape, src = SHAPES["llama"], ordinary_sources["llama"]
    result = run_cli(*shape.args(src), "--out", on_mount / "out", "--reflink", "always")
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith(f"shardsurgeon: error: --reflink always: files in {on_mount} cannot share blocks")
    assert f"the source file {src / 'model-00001-of-00002.safetensors'} (another filesystem" in line
    assert line.endswith("or pass --reflink auto to copy what cannot be shared")
    assert list(on_mount.iterdir()) == [], "refused before anything is written; the probe cleaned up"

    inside = on_mount_sources["llama"]
    result = run_cli(*shape.args(inside), "--out", on_mount / "out", "--reflink", "always", "-q")
    assert result.exit_code == 0, result.output


def test_reflink_never_shares_nothing(reflink_mount, on_mount, on_mount_sources):
    shape, src = SHAPES["llama"], on_mount_sources["llama"]
    job = shape.job(src)
    before = used_bytes(on_mount)
    result = run_cli(*shape.args(src), "--out", on_mount / "out", "--reflink", "never")
    assert result.exit_code == 0, result.output
    assert shared_in(on_mount / "out", job) == 0
    assert used_bytes(on_mount) - before >= job.layout.copied_bytes
    assert "(0 B shared with the source, " in result.output.splitlines()[-1]


# --- anywhere -------------------------------------------------------------------------------------


def test_every_reflink_mode_writes_the_same_bytes(tmp_path, tiny, monkeypatch):
    src, _ = tiny
    outputs = {}
    for mode in ("auto", "never"):
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)
        result = run_cli("expand", "--src", src, "--dup", "3x2", "--zero", "o_proj", "--out", "out", "--reflink", mode)
        assert result.exit_code == 0, result.output
        outputs[mode] = folder_bytes(tmp_path / mode / "out")
    assert outputs["auto"] == outputs["never"]
    assert "--reflink" not in outputs["auto"]["README.md"].decode(), "the card records what changes the output"


def test_reflink_always_follows_what_the_filesystem_can_do(tmp_path, tiny):
    src, _ = tiny
    shares = fileio.can_reflink(src / "model-00001-of-00002.safetensors", tmp_path)
    result = run_cli("expand", "--src", src, "--dup", "3x1", "--out", tmp_path / "out", "--reflink", "always", "-q")
    if shares:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and "--reflink always: files in" in result.output
        assert not (tmp_path / "out").exists()


def test_the_summary_says_clone_eligible_where_the_filesystem_cannot_tell(tmp_path):
    """As on Windows: no FIEMAP, so the summary gives what the kernel could have cloned (none there)."""
    from _platforms import emulated

    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=2, shards=1)
    with emulated("windows"):
        result = run_cli("expand", "--src", src, "--dup", "1x1", "--zero", "o_proj", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = result.output.splitlines()[-1]
    assert "written (0 B clone-eligible, " in summary and " copied, 0 B converted), " in summary


def test_an_upcycle_larger_than_the_free_space_fits_because_its_experts_share_blocks(
    reflink_mount, on_mount, on_mount_sources, monkeypatch
):
    """Experts are copies of the source's MLPs: the room needed is the new disk, not the output's
    logical size, so 48 experts of a 92 MB model (1.3 GB) are written on a filesystem of 1 GB."""
    import shutil

    src = on_mount_sources["llama"]
    free, before = shutil.disk_usage(on_mount).free, used_bytes(on_mount)
    monkeypatch.chdir(on_mount)
    result = run_cli("upcycle", "--src", src, "--experts", "48", "--top-k", "2", "--out", "moe", "-q")
    assert result.exit_code == 0, result.output
    logical = sum(path.stat().st_size for path in (on_mount / "moe").iterdir())
    assert logical > free, f"{reflink_mount.kind}: {logical} bytes of output, {free} free: not the case tested"
    assert used_bytes(on_mount) - before <= 0.01 * logical, reflink_mount.kind
    assert run_cli("verify", on_mount / "moe", "--src", src).exit_code == 0
