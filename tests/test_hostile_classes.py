"""Red-team corpus for the ten classes of issue 12, each case through the command line.

Every case states the promise as a test: the exit status, ONE line starting ``shardsurgeon:
error:`` that names the thing (matched by a regex), no traceback, no output folder or partial left
behind, the source byte-identical, and where the class is about size or hanging, bounded memory
(a child under ``RLIMIT_AS``) and bounded time (a child with a timeout).

Classes 1, 2, 7, 8 and 10 (and ``demo --keep FILE`` of class 9) are fixed on the output side;
classes 3, 4, 5, 6 and 9 on the planning side. Where the issue left the remedy open (rewrite a
structure key or refuse the recipe, keep an odd tensor name or refuse it), each case pins the one
that happens: a valid output, or a refusal with its exit status.

Runs that must be stopped, paused or starved happen in a child Python (see ``BOOT``): it can take
an address-space limit, pause after its first finished shard until the test says go (so the test
can act while the run holds its output), SIGKILL itself after a given rename or inside a given
``rmtree`` (to stop a commit half way), or do without ``renameat2``. Those hooks live here, in the
test; nothing in the package knows about them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from _craft import make_checkpoint, write_config
from conftest import folder_bytes, run_cli, write_tiny_checkpoint
from safetensors import safe_open

import shardsurgeon
from shardsurgeon import mistral_config
from shardsurgeon.write.local import destination as output
from shardsurgeon.write.local import publish

USAGE, DATA = 2, 1
MEMORY_LIMIT_MB = 200
"""Address space of a child: these tiny inputs need under 40 MB (VmPeak), a bug eats gigabytes."""
HANG_SECONDS = 20
"""A run on a FIFO that has not answered by then is taken to hang forever. A run that answers
returns at once, so this costs time only when something hangs; 4 s was too short for four
interpreters starting together on two busy cores (a refusal printed after 4 s failed the test)."""
RECIPE = ("--dup", "3x2", "--zero", "o_proj,down_proj", "--max-shard-size", "2KB")
"""About eight shards of the ``tiny`` source: a paused run still has most of its work ahead."""
STAGING, LOCK = ".out.shardsurgeon-partial", ".out.shardsurgeon-lock"


# -- helpers -------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """The single non-empty line of ``text``, which must hold no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def refused(exit_code: int, text: str, code: int | tuple[int, ...], pattern: str) -> str:
    """Assert a one-line refusal with ``code`` whose message matches ``pattern``; returns the line."""
    line = one_line(text)
    assert line.startswith("shardsurgeon: error: "), line
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert exit_code in (code if isinstance(code, tuple) else (code,)), (exit_code, line)
    return line


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` (links not followed): file bytes, link targets, None for folders."""
    found: dict[str, bytes | None] = {}
    for entry in sorted(path.rglob("*")):
        name = str(entry.relative_to(path))
        if entry.is_symlink():
            found[name] = b"-> " + os.fsencode(os.readlink(entry))
        elif entry.is_file():
            found[name] = entry.read_bytes()
        else:
            found[name] = None
    return found


def loads_with_reference_reader(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "np") as f:
            names |= set(f.keys())
    return names


def front_matter(card: str) -> Any:
    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def edit_shard_header(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    change(header)
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (max(n - len(text), 0) if len(text) <= n else -len(text) % 8)  # the same size when it fits
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def rename_tensor(src: Path, old: str, new: str) -> None:
    """Rename a tensor in its shard and in the index, if any."""
    for path in src.glob("*.safetensors"):
        edit_shard_header(path, lambda h: h.__setitem__(new, h.pop(old)) if old in h else None)
    index = src / "model.safetensors.index.json"
    if index.exists():
        record = json.loads(index.read_text())
        record["weight_map"][new] = record["weight_map"].pop(old)
        index.write_text(json.dumps(record))


BOOT = r"""
import json, os, resource, shutil, signal, sys, time
spec = json.loads(sys.argv[1])
if spec.get("limit_mb"):
    limit = spec["limit_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
real_rename, real_rmtree, finished = os.rename, shutil.rmtree, []
def rename(source, target, *args, **kwargs):
    real_rename(source, target, *args, **kwargs)
    name = os.path.basename(os.fsdecode(target))
    if os.fsdecode(source).endswith(".partial"):
        finished.append(name)
        if spec.get("pause") and len(finished) == 1:
            open(spec["pause"] + ".ready", "w").close()
            while not os.path.exists(spec["pause"] + ".go"):
                time.sleep(0.01)
        if len(finished) == spec.get("kill_after_shards"):
            os.kill(os.getpid(), signal.SIGKILL)
    if spec.get("kill_after_rename") == name:
        os.kill(os.getpid(), signal.SIGKILL)
def rmtree(path, *args, **kwargs):
    if spec.get("kill_in_rmtree") == os.path.basename(os.fsdecode(path)):
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)
os.rename, shutil.rmtree = rename, rmtree
if spec.get("no_exchange"):
    import shardsurgeon.write.local.publish
    shardsurgeon.write.local.publish._RENAMEAT2 = None
sys.argv = ["shardsurgeon", *spec["args"]]
from shardsurgeon.cli import main
main()
"""


@dataclass
class Child:
    """A ``shardsurgeon`` run in a child Python, with the hooks of ``BOOT``."""

    process: subprocess.Popen[str]
    control: Path

    @classmethod
    def start(cls, cwd: Path, *args: str | Path, stdout: Any = subprocess.PIPE, **hooks: Any) -> Child:
        cwd.mkdir(parents=True, exist_ok=True)
        control = cwd.parent / f".control-{cwd.name}-{time.monotonic_ns()}"
        spec = {"args": [os.fsdecode(a) for a in args], **hooks}
        if spec.pop("pause", False):
            spec["pause"] = str(control)
        root = str(Path(shardsurgeon.__file__).parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen(
            [sys.executable, "-c", BOOT, json.dumps(spec)],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        return cls(process, control)

    def wait_until_paused(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not Path(str(self.control) + ".ready").exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the child never paused"
            time.sleep(0.01)

    def go(self) -> None:
        Path(str(self.control) + ".go").touch()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            return -signal.SIGKILL, out or "", (err or "") + f"\n(still running after {timeout} s: killed)"
        finally:
            for suffix in (".ready", ".go"):
                Path(str(self.control) + suffix).unlink(missing_ok=True)
        return self.process.returncode, out or "", err or ""


def child(cwd: Path, *args: str | Path, timeout: float = 60, **hooks: Any) -> tuple[int, str, str]:
    return Child.start(cwd, *args, **hooks).finish(timeout)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A 4-layer source in 2 shards with a tokenizer config."""
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=4, shards=2, extra_files={"tokenizer_config.json": '{"bos_token": "<s>"}'})
    return folder


def expand_here(cwd: Path, src: Path, *extra: str | Path, recipe: tuple[str, ...] = RECIPE):
    """``expand`` in-process from ``cwd`` with ``--out out``, so every run records the same command."""
    cwd.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(cwd)
    try:
        return run_cli("expand", "--src", src, *recipe, "--out", "out", *extra)
    finally:
        os.chdir(here)


def reference(tmp_path: Path, src: Path, recipe: tuple[str, ...] = RECIPE) -> dict[str, bytes]:
    """The files of an uninterrupted run of ``recipe`` (same command line as every other run)."""
    result = expand_here(tmp_path / "reference", src, "-q", recipe=recipe)
    assert result.exit_code == 0, result.output
    return folder_bytes(tmp_path / "reference" / "out")


def kept(stderr: str) -> int:
    found = re.search(r"\((\d+) kept from an earlier run\)", stderr)
    return int(found[1]) if found else 0


# -- class 1: concurrent runs to one --out -------------------------------------------------------


@pytest.mark.parametrize("second_recipe", ["same recipe", "other recipe"])
def test_1_second_run_to_a_locked_output_is_refused_naming_the_holder(tmp_path, src, second_recipe):
    expected = reference(tmp_path, src)
    run = tmp_path / "run"
    first = Child.start(run, "expand", "--src", src, *RECIPE, "--out", "out", pause=True)
    first.wait_until_paused()
    staging_before = tree(run / STAGING)
    recipe = RECIPE if second_recipe == "same recipe" else ("--dup", "1x1", "--max-shard-size", "2KB")
    result = expand_here(run, src, recipe=recipe)
    line = refused(
        result.exit_code,
        result.output,
        DATA,
        rf"--out out: another shardsurgeon run is writing it \(pid {first.process.pid} on "
        rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to finish",
    )
    assert len(line) < 300, line
    assert tree(run / STAGING) == staging_before, "the second run touched nothing of the first"
    first.go()
    code, _, err = first.finish()
    assert code == 0, err
    assert folder_bytes(run / "out") == expected, "the first run's output is whole and its own"
    assert sorted(p.name for p in run.iterdir()) == ["out"], "the lock file is gone with its holder"


@pytest.mark.parametrize("appeared", ["an empty folder", "a folder with a file"])
def test_1_folder_created_at_out_during_the_run_is_kept_and_the_output_waits(tmp_path, src, appeared):
    expected = reference(tmp_path, src)
    run = tmp_path / "run"
    first = Child.start(run, "expand", "--src", src, *RECIPE, "--out", "out", pause=True)
    first.wait_until_paused()
    (run / "out").mkdir()
    if appeared == "a folder with a file":
        (run / "out" / "mine.txt").write_text("mine")
    mine = tree(run / "out")
    first.go()
    code, _, err = first.finish()
    refused(
        code,
        err,
        DATA,
        rf"--out out: a folder appeared there during the run; it is left as it is, and the finished output waits "
        rf"in {re.escape(STAGING)}: move that folder away and run the same command again",
    )
    assert tree(run / "out") == mine, "the user's folder is untouched"
    (run / "out").rename(tmp_path / "moved")
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out")
    assert code == 0, err
    assert kept(err) == len([n for n in expected if n.endswith(".safetensors")]), err
    assert folder_bytes(run / "out") == expected


def test_1_with_force_a_folder_created_during_the_run_is_replaced(tmp_path, src):
    expected = reference(tmp_path, src)
    run = tmp_path / "run"
    first = Child.start(run, "expand", "--src", src, *RECIPE, "--out", "out", "--force", pause=True)
    first.wait_until_paused()
    (run / "out").mkdir()
    (run / "out" / "mine.txt").write_text("mine")
    first.go()
    code, _, err = first.finish()
    assert code == 0, err
    assert folder_bytes(run / "out") == expected


def test_1_a_lock_file_no_process_holds_is_not_in_the_way(tmp_path, src):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": 1 << 22, "host": "elsewhere", "started": "yesterday"}))
    result = expand_here(run, src)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["out"]


def test_1_without_file_locks_a_live_holder_is_refused_and_a_dead_one_replaced(tmp_path, src, monkeypatch):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    run.mkdir()
    alive = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2030-01-01 00:00:00"}
    (run / LOCK).write_text(json.dumps(alive))
    result = expand_here(run, src)
    refused(
        result.exit_code,
        result.output,
        DATA,
        rf"another shardsurgeon run is writing it \(pid {os.getpid()} on .*\); .*if no such run exists, delete "
        rf".*{re.escape(LOCK)}$",
    )
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK).write_text(json.dumps(alive | {"pid": int(dead.stdout)}))
    result = expand_here(run, src)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["out"]


# -- class 2: sources whose files are links into another folder ----------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    """A source whose every file is a link into ``store/objects`` (as git-annex and DVC lay them out)."""
    plain = tmp_path / "plain"
    write_tiny_checkpoint(plain, layers=4, shards=2, extra_files={"tokenizer_config.json": "{}"})
    objects, src = tmp_path / "store" / "objects", tmp_path / "src"
    objects.mkdir(parents=True)
    src.mkdir()
    for path in sorted(plain.iterdir()):
        path.rename(objects / path.name)
        (src / path.name).symlink_to(objects / path.name)
    plain.rmdir()
    return src, tmp_path / "store"


LINKED_CASES = [
    ("--plan-json at a shard's real file", ["--plan-json", "{objects}/model-00001-of-00002.safetensors"],
     r"--plan-json \S+/model-00001-of-00002.safetensors: is the source file "),
    ("--plan-json at a copied file's real file", ["--plan-json", "{objects}/tokenizer_config.json"],
     r"--plan-json \S+/tokenizer_config.json: is the source file "),
    ("--out at the folder the links point into, --force", ["--out", "{objects}", "--force"],
     r"--out \S+/objects: is \S+/objects, which holds the source file "),
    ("--out inside that folder", ["--out", "{objects}/new"], r"--out \S+/objects/new: is inside \S+/objects, "),
    ("--out containing that folder, --force", ["--out", "{store}", "--force"], r"--out \S+/store: contains "),
    ("--out at a shard's real file, --force", ["--out", "{objects}/model.safetensors.index.json", "--force"],
     r"--out \S+/model.safetensors.index.json: is the source file "),
]  # fmt: skip


@pytest.mark.parametrize(("args", "pattern"), [c[1:] for c in LINKED_CASES], ids=[c[0] for c in LINKED_CASES])
def test_2_files_behind_source_links_are_protected(tmp_path, linked, args, pattern):
    src, store = linked
    before, beside = tree(store), sorted(p.name for p in tmp_path.iterdir())
    filled = [a.replace("{objects}", str(store / "objects")).replace("{store}", str(store)) for a in args]
    result = run_cli("expand", "--src", src, "--dup", "1x1", *filled)
    refused(result.exit_code, result.output, USAGE, pattern)
    assert tree(store) == before, "no source file was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == beside


def test_2_a_linked_source_still_writes_elsewhere(tmp_path, linked):
    src, store = linked
    before = tree(store)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out", "--plan-json", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert tree(store) == before and (tmp_path / "p").is_file()


# -- class 3: two tensor names that mean one layer ------------------------------------------------


def valid(result: Any, out: Path, names: set[str]) -> None:
    """The run's output loads with the reference reader and holds a tensor of each of ``names``,
    none dropped and none merged."""
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert loads_with_reference_reader(out) >= names


@pytest.mark.parametrize("alias", ["model.layers.01.", "model.layers.\u0661.", "model.layers.\uff11."])
def test_3_a_name_aliasing_a_layer_is_not_merged_into_it(tmp_path, src, alias):
    rename_tensor(src, "model.norm.weight", alias + "input_layernorm.weight")
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out")
    valid(result, tmp_path / "out", {alias + "input_layernorm.weight"})


def test_3_a_tensor_named_like_an_empty_layer_part_is_kept(tmp_path, src):
    rename_tensor(src, "model.norm.weight", "model.layers.3.")
    result = run_cli("expand", "--src", src, "--dup", "3x1", "--out", tmp_path / "out")
    valid(result, tmp_path / "out", {"model.layers.3."})


# -- class 4: an output header past the reference reader's limit ----------------------------------


def test_4_an_output_header_over_100_MB_is_refused_before_writing(tmp_path):
    src, pad = tmp_path / "src", "w" * 25_000_000
    make_checkpoint(src, {"model.safetensors": [(f"model.layers.{i}.{pad}", "BF16", (2,)) for i in range(2)]})
    write_config(src, {"num_hidden_layers": 2, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    result = run_cli("expand", "--src", src, "--dup", "1x2", "--out", tmp_path / "out")
    refused(result.exit_code, result.output, DATA, r"(?i)header.*100")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# -- class 5: layer-structure keys of the config -------------------------------------------------


def deepseek(config: dict[str, Any], n: int) -> list[str]:
    first, every = config["first_k_dense_replace"], config["moe_layer_freq"]
    return ["moe" if i >= first and i % every == 0 else "dense" for i in range(n)]


def qwen_moe(config: dict[str, Any], n: int) -> list[str]:
    step, dense = config["decoder_sparse_step"], config.get("mlp_only_layers", [])
    return ["moe" if i not in dense and (i + 1) % step == 0 else "dense" for i in range(n)]


def sliding_pattern(config: dict[str, Any], n: int) -> list[str]:
    if "layer_types" in config:
        return list(config["layer_types"])
    every = config["sliding_window_pattern"]
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


def gemma2(config: dict[str, Any], n: int) -> list[str]:
    if "layer_types" in config:
        return list(config["layer_types"])
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def llama4(config: dict[str, Any], n: int) -> list[str]:
    step = config["interleave_moe_layer_step"]
    moe = config.get("moe_layers", list(range(step - 1, n, step)))
    no_rope = config.get("no_rope_layers", [1] * n)
    return [f"{'moe' if i in moe else 'dense'}/{'rope' if no_rope[i] else 'nope'}" for i in range(n)]


@dataclass(frozen=True)
class Structure:
    id: str
    config: dict[str, Any]
    dup: int
    """The layer copied once (``--dup Nx1``)."""
    kinds: Callable[[dict[str, Any], int], list[str]]
    key: str
    """What a refusal names (a regex): one of the structure keys of the family."""


DEEPSEEK_KEYS = "first_k_dense_replace|moe_layer_freq"
STRUCTURES = [
    Structure("DeepSeek first_k_dense_replace", {"model_type": "deepseek_v3", "first_k_dense_replace": 1,
              "moe_layer_freq": 1, "n_routed_experts": 4}, 0, deepseek, DEEPSEEK_KEYS),
    Structure("DeepSeek moe_layer_freq", {"model_type": "deepseek_v2", "first_k_dense_replace": 0,
              "moe_layer_freq": 2, "n_routed_experts": 4}, 1, deepseek, DEEPSEEK_KEYS),
    Structure("Qwen2-MoE decoder_sparse_step", {"model_type": "qwen2_moe", "decoder_sparse_step": 2,
              "mlp_only_layers": [], "num_experts": 4}, 1, qwen_moe, "decoder_sparse_step"),
    Structure("Qwen3-MoE mlp_only_layers", {"model_type": "qwen3_moe", "decoder_sparse_step": 1,
              "mlp_only_layers": [1], "num_experts": 4}, 0, qwen_moe, "mlp_only_layers"),
    Structure("Gemma 3 sliding_window_pattern", {"model_type": "gemma3_text", "sliding_window": 512,
              "sliding_window_pattern": 2}, 1, sliding_pattern, "sliding_window_pattern"),
    Structure("Gemma 3 layer_types", {"model_type": "gemma3_text", "sliding_window": 512,
              "layer_types": ["sliding_attention", "full_attention"] * 2}, 1, sliding_pattern, "layer_types"),
    Structure("Gemma 2 alternating layers", {"model_type": "gemma2", "sliding_window": 512}, 1, gemma2,
              "gemma2|layer_types|sliding"),
    Structure("Cohere2 sliding_window_pattern", {"model_type": "cohere2", "sliding_window": 512,
              "sliding_window_pattern": 4}, 1, sliding_pattern, "sliding_window_pattern"),
    Structure("Llama 4 interleave_moe_layer_step", {"model_type": "llama4_text", "interleave_moe_layer_step": 2},
              1, llama4, "interleave_moe_layer_step"),
    Structure("Llama 4 no_rope_layers", {"model_type": "llama4_text", "interleave_moe_layer_step": 1,
              "no_rope_layers": [1, 1, 1, 0]}, 3, llama4, "no_rope_layers"),
    Structure("Llama 4 moe_layers", {"model_type": "llama4_text", "interleave_moe_layer_step": 1,
              "moe_layers": [1, 3]}, 1, llama4, "moe_layers"),
]  # fmt: skip


REFUSED_STRUCTURES = {"DeepSeek moe_layer_freq", "Gemma 3 sliding_window_pattern", "Gemma 2 alternating layers"}
"""Rules whose keys cannot say the kinds of the expanded stack: the recipe is refused; every other
rule's key is rewritten to say them."""


@pytest.mark.parametrize(
    "case",
    STRUCTURES,
    ids=[s.id for s in STRUCTURES],
)
def test_5_each_output_layer_keeps_its_source_layer_kind(tmp_path, case):
    config = mistral_config(4, 8, 12, 2, 2, 16) | case.config
    write_tiny_checkpoint(tmp_path / "src", layers=4, shards=1, config=config)
    result = run_cli("expand", "--src", tmp_path / "src", "--dup", f"{case.dup}x1", "--out", tmp_path / "out")
    if case.id in REFUSED_STRUCTURES:  # no key can say the new kinds: refused, naming the key
        refused(result.exit_code, result.output, DATA, case.key)
        return
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    sources = [*range(case.dup + 1), case.dup, *range(case.dup + 1, 4)]
    source_kinds = case.kinds(config, 4)
    assert case.kinds(written, written["num_hidden_layers"]) == [source_kinds[s] for s in sources], written


# -- class 6: memory and time from tiny inputs ---------------------------------------------------


def starved(cwd: Path, *args: str | Path) -> tuple[int, str, str]:
    """A run with ``MEMORY_LIMIT_MB`` of address space and ``HANG_SECONDS`` to answer."""
    return child(cwd, *args, timeout=HANG_SECONDS * 3, limit_mb=MEMORY_LIMIT_MB)


def test_6_a_huge_layer_number_costs_no_memory(tmp_path, src):
    rename_tensor(src, "model.norm.weight", "model.layers.30000000.x")
    code, _, err = starved(tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", "out")
    refused(code, err, DATA, r"30000000")


def billion_laughs() -> str:
    lines, previous = ["slices: []", "merge_method:"], None
    for name in "abcdefghi":
        items = ['"lol"'] * 9 if previous is None else [f"*{previous}"] * 9
        lines.append(f"- &{name} [{','.join(items)}]")
        previous = name
    return "\n".join(lines) + "\n"


def test_6_a_yaml_billion_laughs_gives_one_short_line(tmp_path):
    (tmp_path / "laughs.yml").write_text(billion_laughs())
    assert (tmp_path / "laughs.yml").stat().st_size < 400
    code, _, err = starved(tmp_path, "merge", "laughs.yml", "--out", "out")
    line = refused(code, err, USAGE, r"laughs.yml: .*merge_method")
    assert len(line) < 500


def test_6_config_json_reading_dev_zero_is_bounded(tmp_path, src):
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    code, _, err = starved(tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", "out")
    refused(code, err, DATA, r"config.json")


FIFOS = {
    "shard": ("model-00001-of-00002.safetensors", ()),
    "index": ("model.safetensors.index.json", ()),
    "config": ("config.json", ()),
    "--plan-json": (None, ("--plan-json", "plan.fifo")),
}


@pytest.fixture(scope="module")
def fifo_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Each FIFO case started at once, so that the hanging ones cost ``HANG_SECONDS`` together."""
    started = {}
    for case, (name, extra) in FIFOS.items():
        root = tmp_path_factory.mktemp("fifo")
        src = root / "src"
        write_tiny_checkpoint(src, layers=4, shards=2)
        (root / "run").mkdir()
        if name is not None:
            (src / name).unlink()
        os.mkfifo(src / name if name is not None else root / "run" / "plan.fifo")
        args = ["expand", "--src", str(src), "--dup", "1x1", *(extra or ("--out", "out"))]
        started[case] = Child.start(root / "run", *args, limit_mb=MEMORY_LIMIT_MB)
    deadline = time.monotonic() + HANG_SECONDS
    return {case: run.finish(max(deadline - time.monotonic(), 0.1)) for case, run in started.items()}


@pytest.mark.parametrize("case", list(FIFOS))
def test_6_a_fifo_is_refused_not_waited_on(fifo_runs, case):
    code, _, err = fifo_runs[case]
    refused(code, err, DATA, re.escape(FIFOS[case][0] or "plan.fifo"))


# -- class 7: paths and names ---------------------------------------------------------------------


def test_7_a_240_character_output_name_works_and_resumes(tmp_path, src):
    name = "n" * 240
    assert all(len(os.fsencode(publish.sibling(Path(name), k).name)) <= 255 for k in ("partial", "lock", "old"))
    assert publish.sibling(Path(name), "partial") == publish.sibling(Path(name), "partial"), "deterministic"
    run = tmp_path / "run"
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", name, kill_after_shards=2)
    assert code == -signal.SIGKILL, err
    assert output.staging_folder(Path(name)).name in os.listdir(run)
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", name)
    assert code == 0, err
    assert kept(err) == 2, err
    assert sorted(os.listdir(run)) == [name]


def non_utf8(path: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(path) + b"/" + name))


def test_7_a_source_folder_name_that_is_not_utf8_writes_a_valid_card(tmp_path):
    src = non_utf8(tmp_path, b"model-\xff\xfe")
    write_tiny_checkpoint(src, layers=4, shards=2)
    config = json.loads((src / "config.json").read_text())
    del config["_name_or_path"]  # the folder's name becomes the base model
    (src / "config.json").write_text(json.dumps(config))
    for extra in ((), ("--force",)):  # again, as a resume or a rerun would
        result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out", *extra)
        assert result.exit_code == 0, result.output
        card = (tmp_path / "out" / "README.md").read_bytes().decode("utf-8")
        assert "base_model" not in front_matter(card), "a folder's name is no Hugging Face id"
        assert "\n# model-\\xff\\xfe, 5 layers\n" in card


@pytest.mark.parametrize("case", ["output name", "source folder name", "shard name in the index", "--keep folder name"])
def test_7_control_characters_in_names_do_not_split_the_message(tmp_path, case):
    bad = "bad\nname\x1b[2J\u2028end"
    src = tmp_path / (bad if case == "source folder name" else "src")
    write_tiny_checkpoint(src, layers=4, shards=2)
    args: list[str | Path] = ["expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out"]
    if case == "output name":
        (tmp_path / bad).mkdir()
        (tmp_path / bad / "mine").write_text("mine")
        args[-1] = tmp_path / bad
    elif case == "source folder name":
        args[-1] = src / "inside"
    elif case == "shard name in the index":
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"]["lm_head.weight"] = bad + ".safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (tmp_path / bad).write_text("a file")
        args = ["demo", "--keep", tmp_path / bad]
    result = run_cli(*args)
    code = DATA if case == "shard name in the index" else USAGE  # bad data; the others are arguments
    line = refused(result.exit_code, result.output, code, re.escape("bad\\nname\\x1b[2J\\u2028end"))
    assert len(line) < 2100


@pytest.mark.parametrize(
    ("folder", "name_or_path", "base_model"),
    [
        ("llama: v2", None, "llama: v2"),
        ("src", "acme/x\ninjected: true", "src"),
        ("- [x] #y", "not an id", "- [x] #y"),
        ("src", "acme/x\u2028y", "src"),
    ],
)
def test_7_model_card_front_matter_is_valid_yaml_whatever_the_names(tmp_path, folder, name_or_path, base_model):
    src = tmp_path / folder
    write_tiny_checkpoint(src, layers=4, shards=2)
    config = json.loads((src / "config.json").read_text())
    config.pop("_name_or_path")
    if name_or_path is not None:
        config["_name_or_path"] = name_or_path
    (src / "config.json").write_text(json.dumps(config))
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    front = front_matter(card)
    assert set(front) == {"library_name", "tags"}, front  # base_model holds Hub ids only, and none is known
    title = card.split("\n---\n", 1)[1].lstrip("\n").splitlines()[0]
    assert title == f"# {base_model}, 5 layers", title


def test_7_a_refused_run_leaves_no_parent_folder_it_created(tmp_path, src, monkeypatch):
    monkeypatch.setattr(output, "free_bytes", lambda folder: 0)
    beside = tree(tmp_path)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "a" / "b" / "c" / "out")
    refused(result.exit_code, result.output, DATA, r"/a/b/c: needs .* but only 0 B is free")
    assert tree(tmp_path) == beside


def test_7_a_refused_run_keeps_parent_folders_that_were_there(tmp_path, src, monkeypatch):
    monkeypatch.setattr(output, "free_bytes", lambda folder: 0)
    (tmp_path / "a").mkdir()
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "a" / "b" / "out")
    assert result.exit_code == DATA
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == []


# -- class 8: sources that change during the run --------------------------------------------------


def regrow(path: Path) -> None:
    """Truncate to 0 and write the same bytes back: same inode, same size, a new mtime."""
    blob = path.read_bytes()
    time.sleep(0.02)  # file times move by the kernel's clock tick, a few milliseconds
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(blob)


def replace_same_size(path: Path) -> None:
    """Another file of the same size and another layout (two same-size tensors swap places), renamed
    over the shard."""
    other = path.with_name("other")
    shutil.copyfile(path, other)

    def swap(header: dict[str, Any]) -> None:
        first, second = [name for name in sorted(header) if name.endswith("layernorm.weight")][:2]
        header[first]["data_offsets"], header[second]["data_offsets"] = (
            header[second]["data_offsets"],
            header[first]["data_offsets"],
        )

    edit_shard_header(other, swap)
    assert other.stat().st_size == path.stat().st_size
    other.replace(path)


def regrow_with_old_mtime(path: Path) -> None:
    stat = path.stat()
    regrow(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (regrow, "rewritten in place"),
        (replace_same_size, "replaced by another file"),
        (regrow_with_old_mtime, "changed in place with its modification time put back, or its permissions changed"),
    ],
    ids=["truncated and regrown", "replaced by a same-size file", "regrown with its old mtime put back"],
)
def test_8_a_source_changed_during_the_run_is_not_published(tmp_path, src, change, what):
    run = tmp_path / "run"
    first = Child.start(run, "expand", "--src", src, *RECIPE, "--out", "out", pause=True)
    first.wait_until_paused()
    change(src / "model-00002-of-00002.safetensors")
    first.go()
    code, _, err = first.finish()
    refused(
        code,
        err,
        DATA,
        rf"{re.escape(str(src))}/model-00002-of-00002.safetensors: source file changed during the run "
        rf"\({re.escape(what)}\); the output was not published",
    )
    assert not (run / "out").exists()


@pytest.mark.parametrize(
    "change", [regrow, replace_same_size, regrow_with_old_mtime], ids=["regrown", "replaced", "mtime"]
)
def test_8_a_source_changed_between_planning_and_writing_is_not_published(tmp_path, src, change):
    """The identity checked before publishing is the one seen when the header was read, not a
    later one: a library user who plans, waits, then writes is protected too."""
    from shardsurgeon import CheckpointError, plan_expand, run_job

    job = plan_expand(src, dups=[(3, 1)])
    change(src / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: source file changed during the run"):
        run_job(job, tmp_path / "out", command="test")
    assert not (tmp_path / "out").exists()


# -- class 9: tracebacks ----------------------------------------------------------------------------


TRACEBACK_ARGS = [
    ("--dup with 5000 digits", ["--dup", "1x" + "9" * 5000], USAGE, r"--dup"),
    ("--max-shard-size of 400 nines", ["--dup", "1x1", "--max-shard-size", "9" * 400], USAGE, r"--max-shard-size"),
]


@pytest.mark.parametrize(
    ("args", "code", "pattern"), [c[1:] for c in TRACEBACK_ARGS], ids=[c[0] for c in TRACEBACK_ARGS]
)
def test_9_absurd_numbers_get_one_line(tmp_path, src, args, code, pattern):
    result = run_cli("expand", "--src", src, *args, "--out", tmp_path / "out")
    refused(result.exit_code, result.output, code, pattern)
    assert not (tmp_path / "out").exists()


def test_9_config_nested_100000_deep(tmp_path, src):
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out")
    refused(result.exit_code, result.output, DATA, r"config.json: ")


def test_9_merge_config_nested_100000_deep(tmp_path):
    (tmp_path / "deep.yml").write_text("slices: " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = run_cli("merge", tmp_path / "deep.yml", "--out", tmp_path / "out")
    refused(result.exit_code, result.output, USAGE, r"deep.yml: ")


def test_9_inspect_a_config_whose_architectures_is_a_number(tmp_path, src):
    config = json.loads((src / "config.json").read_text()) | {"architectures": 5}
    (src / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect", src)
    assert result.exit_code == 0, result.output  # shown as it is: inspect only describes
    assert "Traceback" not in result.output and re.search(r"architecture.*\b5\b", result.output)


def test_9_demo_keep_at_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    result = run_cli("demo", "--keep", tmp_path / "file")
    refused(result.exit_code, result.output, USAGE, r"--keep \S+/file: is a file; give a folder")
    result = run_cli("demo", "--keep", tmp_path / "file" / "sub")
    refused(result.exit_code, result.output, USAGE, r"--keep \S+/file/sub: is inside \S+/file, a file")
    assert tree(tmp_path) == {"file": b"mine"}


def edit_recorded_recipe(out: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    def edit(header: dict[str, Any]) -> None:
        recipe = json.loads(header["__metadata__"]["shardsurgeon_recipe"])
        change(recipe)
        header["__metadata__"]["shardsurgeon_recipe"] = json.dumps(recipe)

    edit_shard_header(out / "model.safetensors", edit)


EDITED_RECIPES = {
    "a layer as a string": lambda r: r["layers"][1].__setitem__(1, "1"),
    "a scale of NaN": lambda r: r["layers"][2].__setitem__(2, [[float("nan"), "o_proj"]]),
    "a dtype F99": lambda r: r.__setitem__("dtype", "F99"),
}


@pytest.mark.parametrize("edit", list(EDITED_RECIPES))
def test_9_verify_of_an_output_whose_recorded_recipe_was_edited(tmp_path, src, edit):
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--zero", "o_proj", "--out", tmp_path / "out").exit_code == 0
    edit_recorded_recipe(tmp_path / "out", EDITED_RECIPES[edit])
    result = run_cli("verify", tmp_path / "out", "--src", src)
    assert result.exit_code == DATA and "Traceback" not in result.output, result.output[-2000:]
    lines = result.output.splitlines()
    assert re.match(r"cannot check against --src: recorded recipe is unreadable \(.+\)", lines[0]), lines
    assert lines[-1].startswith("shardsurgeon verify: 1 problem"), lines


@pytest.fixture
def hub(tmp_path: Path, src: Path, monkeypatch) -> Path:
    """A Hugging Face cache entry for ``acme/tiny`` whose snapshot holds ``src``."""
    entry = tmp_path / "hub" / "models--acme--tiny"
    (entry / "refs").mkdir(parents=True)
    (entry / "snapshots").mkdir()
    shutil.copytree(src, entry / "snapshots" / "abc123")
    (entry / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "merge.yml").write_text(
        "slices:\n- sources:\n  - model: acme/tiny\n    layer_range: [0, 4]\nmerge_method: passthrough\n"
    )
    return entry


@pytest.mark.parametrize("command", ["merge", "expand"])
def test_9_a_cache_entry_whose_ref_is_not_utf8(tmp_path, hub, command):
    (hub / "refs" / "main").write_bytes(b"abc123\xff")
    args = ["merge", tmp_path / "merge.yml"] if command == "merge" else ["expand", "--src", hub, "--dup", "1x1"]
    result = run_cli(*args, "--out", tmp_path / "out")
    valid(result, tmp_path / "out", set())  # the ref is no name: the entry's one snapshot is the model


@pytest.mark.parametrize("command", ["merge", "expand"])
def test_9_a_cache_entry_with_a_dangling_snapshot_link(tmp_path, hub, command):
    shutil.rmtree(hub / "snapshots" / "abc123")
    (hub / "snapshots" / "abc123").symlink_to(tmp_path / "gone")
    (hub / "refs" / "main").unlink()
    args = ["merge", tmp_path / "merge.yml"] if command == "merge" else ["expand", "--src", hub, "--dup", "1x1"]
    result = run_cli(*args, "--out", tmp_path / "out")
    refused(result.exit_code, result.output, DATA, r"acme/tiny|models--acme--tiny")
    assert not (tmp_path / "out").exists()


def test_9_a_model_under_an_unknown_home(tmp_path):
    (tmp_path / "m.yml").write_text(
        "slices:\n- sources:\n  - model: ~nosuchuser/x\n    layer_range: [0, 2]\nmerge_method: passthrough\n"
    )
    code, _, err = child(tmp_path, "merge", "m.yml", "--out", "out")
    refused(code, err, DATA, r"~nosuchuser/x")


def test_9_standard_output_on_dev_full(tmp_path, src):
    with open("/dev/full", "w") as full:
        process = Child.start(tmp_path / "run", "inspect", src, stdout=full)
        code, _, err = process.finish()
    refused(code, err, tuple(range(1, 126)), r"No space left on device")


# -- class 10: destroying what the user had -------------------------------------------------------


@pytest.mark.parametrize("existing", ["mistral-44", "mistral-32"])
def test_10_demo_keep_does_not_replace_an_existing_folder(tmp_path, existing):
    (tmp_path / existing).mkdir()
    (tmp_path / existing / "mine.txt").write_text("mine")
    before = tree(tmp_path)
    result = run_cli("demo", "--keep", tmp_path)
    refused(
        result.exit_code,
        result.output,
        USAGE,
        rf"--keep \S+: \S+/{existing} already exists; pass --force to replace it, or choose another folder",
    )
    assert tree(tmp_path) == before


def test_10_demo_keep_with_force_replaces_its_folders(tmp_path):
    assert run_cli("demo", "-q", "--keep", tmp_path).exit_code == 0
    (tmp_path / "mistral-44" / "stale.txt").write_text("old")
    result = run_cli("demo", "-q", "--keep", tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "mistral-44" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral-32", "mistral-44"]


OTHER = ("--dup", "1x1", "--max-shard-size", "2KB")


def killed_while_replacing(tmp_path: Path, src: Path, **hooks: Any) -> tuple[Path, dict[str, bytes]]:
    """An output of another recipe, then a ``--force`` run killed at the point ``hooks`` name."""
    run = tmp_path / "run"
    assert expand_here(run, src, "-q", recipe=OTHER).exit_code == 0
    old = folder_bytes(run / "out")
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out", "--force", **hooks)
    assert code == -signal.SIGKILL, err
    return run, old


def test_10_force_run_killed_between_its_two_renames_keeps_the_old_output(tmp_path, src):
    expected = reference(tmp_path, src)
    run, old = killed_while_replacing(tmp_path, src, no_exchange=True, kill_after_rename=".out.shardsurgeon-old")
    assert not (run / "out").exists() and (run / ".out.shardsurgeon-old").is_dir(), "the issue's state"
    result = expand_here(run, src)
    refused(
        result.exit_code,
        result.output,
        USAGE,
        r"--out out: folder exists and is not empty; pass --force to replace it \(first, put back out from "
        r"\.out\.shardsurgeon-old: an earlier run was stopped while replacing it",
    )
    assert folder_bytes(run / "out") == old, "the old output is back, whole"
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out", "--force", no_exchange=True)
    assert code == 0, err
    assert kept(err) == len([n for n in expected if n.endswith(".safetensors")]), "the staging folder was kept"
    assert folder_bytes(run / "out") == expected
    assert sorted(p.name for p in run.iterdir()) == ["out"]


def test_10_next_run_says_it_put_the_old_output_back(tmp_path, src):
    run, _ = killed_while_replacing(tmp_path, src, no_exchange=True, kill_after_rename=".out.shardsurgeon-old")
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out", "--force")
    assert code == 0, err
    note, summary = err.splitlines()
    assert note.startswith("shardsurgeon: note: put back out from .out.shardsurgeon-old: an earlier run"), err
    assert summary.startswith("shardsurgeon: 4 -> 6 layers") and kept(summary) > 0, err


@pytest.mark.parametrize(
    "hooks",
    [
        {"no_exchange": True, "kill_in_rmtree": ".out.shardsurgeon-old"},
        pytest.param(
            {"kill_in_rmtree": STAGING},
            marks=pytest.mark.skipif(publish._RENAMEAT2 is None, reason="no renameat2 here"),
        ),
    ],
    ids=["two renames", "atomic exchange"],
)
def test_10_force_run_killed_after_publishing_is_finished_by_the_next_run(tmp_path, src, hooks):
    expected = reference(tmp_path, src)
    run, _ = killed_while_replacing(tmp_path, src, **hooks)
    assert folder_bytes(run / "out") == expected, "the new output is in place"
    code, _, err = child(run, "expand", "--src", src, *OTHER, "--out", "out", "--dry-run")
    assert code == 0 and (run / ".out.shardsurgeon-commit").exists()
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out", "--force")
    assert code == 0, err
    leftover = hooks["kill_in_rmtree"]
    assert re.fullmatch(
        rf"shardsurgeon: note: removed {re.escape(leftover)}: the folder that an earlier --force run replaced "
        r"with out, left there when that run was stopped just after publishing",
        err.splitlines()[0],
    ), err
    assert sorted(p.name for p in run.iterdir()) == ["out"]
    assert folder_bytes(run / "out") == expected


def test_10_the_corpus_covers_every_class():
    numbers = {int(m[1]) for m in re.finditer(r"^def test_(\d+)_", Path(__file__).read_text(), re.MULTILINE)}
    assert numbers == set(range(1, 11)), numbers
