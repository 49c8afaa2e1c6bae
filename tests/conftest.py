"""Shared fixtures: tiny Mistral-shaped checkpoints whose bytes say where they came from.

Every tensor is filled from a hash of its own name, so a tensor copied from the wrong layer, a
shifted offset or a swapped pair of tensors changes the bytes a test compares. Outputs are read
back by a minimal reader written here, independent of the code under test, and by the reference
``safetensors`` reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shardsurgeon import mistral_config
from shardsurgeon.cli import cli

pytest_plugins = ["_platforms", "_mounts", "_s3kit"]
"""SHARDSURGEON_EMULATE=macos|windows runs any test as on that platform (_platforms.py); the XFS and
btrfs loop mounts (_mounts.py) are made only for the tests that ask for them; the session's one
SeaweedFS (_s3kit.py) is started by the first test that needs it."""

LAYER_PARTS = {
    "input_layernorm.weight": lambda h, i, kv: (h,),
    "self_attn.q_proj.weight": lambda h, i, kv: (h, h),
    "self_attn.k_proj.weight": lambda h, i, kv: (kv, h),
    "self_attn.v_proj.weight": lambda h, i, kv: (kv, h),
    "self_attn.o_proj.weight": lambda h, i, kv: (h, h),
    "post_attention_layernorm.weight": lambda h, i, kv: (h,),
    "mlp.gate_proj.weight": lambda h, i, kv: (i, h),
    "mlp.up_proj.weight": lambda h, i, kv: (i, h),
    "mlp.down_proj.weight": lambda h, i, kv: (h, i),
}


_FINITE_HIGH_BYTE = bytes(b & 0x3F for b in range(256))


def origin_bytes(name: str, nbytes: int) -> bytes:
    """Bytes that name their tensor; the low byte of every bf16 value is random, the high is finite."""
    raw = bytearray(hashlib.shake_256(name.encode()).digest(nbytes))
    raw[1::2] = raw[1::2].translate(_FINITE_HIGH_BYTE)  # exponent below 0x7F: finite, no NaN or inf
    return bytes(raw)


def tiny_specs(layers: int, hidden: int = 8, intermediate: int = 12, kv: int = 4, vocab: int = 16, lm_head=True):
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        specs += [
            (f"model.layers.{layer}.{part}", shape(hidden, intermediate, kv)) for part, shape in LAYER_PARTS.items()
        ]
    specs.append(("model.norm.weight", (hidden,)))
    if lm_head:
        specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


def write_tiny_checkpoint(
    folder: Path,
    layers: int = 4,
    shards: int = 2,
    config: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    **shape: Any,
) -> dict[str, bytes]:
    """A bf16 Mistral-shaped checkpoint in ``shards`` files, written byte by byte here (not by the
    code under test). Tensors are spread over shards in an order unlike the output's. Returns each
    tensor's bytes by name."""
    hidden, intermediate, _kv, vocab = (
        shape.get(k, d) for k, d in (("hidden", 8), ("intermediate", 12), ("kv", 4), ("vocab", 16))
    )
    base = mistral_config(layers, hidden, intermediate, hidden // 4, 2, vocab) | {"_name_or_path": "acme/tiny-mistral"}
    specs = tiny_specs(layers, **shape)
    return write_checkpoint(folder, specs, shards, config if config is not None else base, extra_files)


def write_checkpoint(
    folder: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    shards: int,
    config: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> dict[str, bytes]:
    """bf16 tensors ``(name, shape)`` dealt round-robin into ``shards`` files, each file's data in
    name order after a header padded to 8, as the reference writer lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {name: origin_bytes(name, 2 * _numel(dims)) for name, dims in specs}
    groups = [specs[i::shards] for i in range(shards)]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = "model.safetensors" if shards == 1 else f"model-{number:05d}-of-{shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in sorted(group):  # data in name order, like the reference writer
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + len(data[name])]}
            offset += len(data[name])
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, _ in sorted(group):
                f.write(data[name])
        weight_map |= {name: file_name for name, _ in group}
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(map(len, data.values()))},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return data


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def read_tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes, str, int]]:
    """Independent reader: name -> (dtype, shape, bytes, file name, absolute offset), all shards."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            tensors[name] = (info["dtype"], info["shape"], blob[8 + n + begin : 8 + n + end], path.name, 8 + n + begin)
    return tensors


def data_order(folder: Path) -> list[str]:
    """Tensor names in the order their bytes appear across the output's shards."""
    tensors = read_tensors(folder)
    return sorted(tensors, key=lambda name: (tensors[name][3], tensors[name][4]))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A 4-layer checkpoint in 2 shards with a tokenizer config and files that must not be copied."""
    src = tmp_path / "src"
    data = write_tiny_checkpoint(
        src,
        layers=4,
        shards=2,
        extra_files={
            "tokenizer_config.json": '{"bos_token": "<s>"}',
            "generation_config.json": "{}",
            "README.md": "source card",
            ".hidden": "x",
            "pytorch_model.bin": "weights",
        },
    )
    return src, data


_RUNNER_PID = os.getpid()
_stopped_by: list[int] = []
_workers_started_here: list[bool] = []


def _terminated(signum: int, frame: object) -> None:
    """Nothing is raised (a test or the code under test could catch it): the run stops after the
    test under way (pytest_runtest_protocol below). A second signal ends the process at once."""
    signal.signal(signum, signal.SIG_DFL)
    if os.getpid() != _RUNNER_PID:  # a forked child: die as it would have
        os.kill(os.getpid(), signum)
        return
    _stopped_by.append(signum)
    if _workers_started_here:  # pytest-xdist's controller: its workers run the tests; pass it on
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rpartition(")")[2].split()[1]) == _RUNNER_PID:  # our children
                    os.kill(int(stat.parent.name), signum)
            except (OSError, ValueError, IndexError):
                continue


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> object:
    result = yield
    if _stopped_by:
        item.session.shouldstop = f"stopped by signal {_stopped_by[0]}"
    return result


def _cache_bytecode_outside_the_tree() -> None:
    """Where PYTHONDONTWRITEBYTECODE is set (and no PYTHONPYCACHEPREFIX), every interpreter the
    tests start compiles all it imports again, standard library included where it ships without
    .pyc files: a tenth of a second or more per child process, and seconds for collection. Such
    runs keep their bytecode in a folder of the temporary directory instead, for this process
    (the test modules, imported after this) and its children; the source tree stays free of it."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = os.path.join(tempfile.gettempdir(), f"shardsurgeon-tests-pycache-{os.getuid()}")
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    sys.dont_write_bytecode = False
    sys.pycache_prefix = prefix


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, ``kill``) ends the run in order after the test under way: pytest tears
    the fixtures down, and with them every server they started and every loop mount. Without this,
    Python dies on SIGTERM leaving them behind."""
    _cache_bytecode_outside_the_tree()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which turns these options into workers
def pytest_cmdline_main(config: pytest.Config) -> None:
    """With pytest-xdist installed (the ``test`` extra), the suite runs in a process per CPU (at most
    4), a module at a time each (``--dist loadfile``: module fixtures, such as a module's buckets
    or its Ray head, are made once). ``-n 0`` runs it in this one process; so do ``--pdb``, ``-s``
    and any ``-n``/``--dist`` given on the command line, which are left as given."""
    option = config.option
    if (
        config.pluginmanager.has_plugin("xdist")
        and not hasattr(config, "workerinput")  # a worker of such a run
        and getattr(option, "numprocesses", None) is None
        and getattr(option, "dist", "no") == "no"
        and not option.usepdb
        and option.capture != "no"
        and not option.collectonly
    ):
        option.numprocesses = "auto"
        option.maxprocesses = option.maxprocesses or 4
        option.dist = "loadfile"
        option.loadscopereorder = False  # hand modules out in the order below, not by test count
        _workers_started_here.append(True)


SLOWEST_MODULES_FIRST = (
    "test_s3_output_recovery.py",
    "test_s3_output.py",
    "test_s3_output_edges.py",
    "test_write_path_sources_and_names.py",
    "test_published_bytes.py",
    "test_write_path_claims_and_versions.py",
    "test_parallel.py",
    "test_numerics.py",
    "test_reflink.py",
    "test_compat_transformers.py",
    "test_hostile_classes.py",
    "test_remote.py",
    "test_memory.py",
    "test_resume.py",
)
"""Modules of half a minute to a minute and more, run first (then the rest in their usual order):
with the suite spread over processes a module at a time (``-n``, ``--dist loadfile``), a long
one handed out last would keep one process busy alone at the end."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


def pytest_report_header() -> str:
    import shardsurgeon

    return f"shardsurgeon {shardsurgeon.__version__} from {Path(shardsurgeon.__file__).parent}"
