"""The local output and planning at their edges: a red-team pass against the fixed code of issue 12
(DESIGN.md's promises, issue 12's classes).

Each test asserts the promised behaviour; each was a strict xfail naming the cause found until its
fix landed. Letters follow the report's order: A corrupt output or a modified source, B unbounded memory or
time, C tracebacks and internal errors, D unclear messages. Each test builds its own tiny
checkpoint; the file runs in about 16 s (the B tests stop children at 200 MB or after 4-12 s).
Helpers (the child process with its hooks, the one-line checks) come from ``test_hostile_classes``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import folder_bytes, read_tensors, run_cli, write_tiny_checkpoint
from test_hostile_classes import (
    DATA,
    HANG_SECONDS,
    LOCK,
    MEMORY_LIMIT_MB,
    RECIPE,
    STAGING,
    USAGE,
    Child,
    child,
    edit_recorded_recipe,
    expand_here,
    front_matter,
    one_line,
    reference,
    refused,
    rename_tensor,
    tree,
    valid,
)

import shardsurgeon
from shardsurgeon import mistral_config

ROOT = str(Path(shardsurgeon.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=4, shards=2, extra_files={"tokenizer_config.json": '{"bos_token": "<s>"}'})
    return folder


MEASURED = """
import atexit, sys
from shardsurgeon.cli import main
report = sys.argv.pop(1)
def peak():
    status = open("/proc/self/status").read()
    open(report, "w").write(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
atexit.register(peak)
sys.argv[0] = "shardsurgeon"
main()
"""


def peak_rss_mb(cwd: Path, *args: str | Path, timeout: float = 30) -> tuple[int, float, str]:
    """Run ``shardsurgeon *args`` in a child; its exit status, peak RSS (MB, the child's own VmHWM:
    ``ru_maxrss`` would count the pages it shared with this large pytest process), stderr."""
    report = cwd / f".peak-{time.monotonic_ns()}"
    try:
        result = subprocess.run(
            [sys.executable, "-c", MEASURED, str(report), *map(os.fsdecode, args)],
            cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout,
        )  # fmt: skip
        code, err = result.returncode, result.stderr
    except subprocess.TimeoutExpired as e:
        code, err = -9, str(e.stderr or "")
    peak = int(report.read_text()) / 1024 if report.exists() else float("inf")
    report.unlink(missing_ok=True)
    return code, peak, err


def with_closed(fds: str, cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``shardsurgeon *args`` with standard output (``>&-``) or error (``2>&-``) closed, as cron and
    daemons start programs; the other stream is captured."""
    command = [sys.executable, "-m", "shardsurgeon", *map(os.fsdecode, args)]
    return subprocess.run(
        ["bash", "-c", f'exec "$@" {fds}', "bash", *command],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


# == A. corrupt output or source modified ===========================================================


def test_a1_a_source_that_is_the_outputs_staging_folder_is_not_deleted(tmp_path, src):
    """A run whose commit was refused leaves "the finished output waiting in .out.shardsurgeon-partial";
    using that folder as the source of a run to ``out`` deletes it."""
    run = tmp_path / "run"
    run.mkdir()
    waiting = run / STAGING
    shutil.copytree(src, waiting)
    (waiting / ".shardsurgeon-resume").write_text("the key of the run that left it")
    before = tree(waiting)
    result = expand_here(run, waiting, recipe=("--dup", "1x1"))
    refused(result.exit_code, result.output, USAGE, re.escape(STAGING))
    assert tree(waiting) == before, "the source folder was deleted"


@pytest.mark.parametrize("out_exists", [True, False], ids=["out exists, --force", "out missing"])
def test_a2_a_source_that_is_the_outputs_old_folder_is_not_deleted_or_moved(tmp_path, src, out_exists):
    """An earlier version hid the replaced output in ``.out.shardsurgeon-old``; a user who rebuilds
    ``out`` from it loses it (deleted with --force, or renamed to ``out`` and then refused)."""
    run = tmp_path / "run"
    run.mkdir()
    old = run / ".out.shardsurgeon-old"
    shutil.copytree(src, old)
    if out_exists:
        (run / "out").mkdir()
        (run / "out" / "mine.txt").write_text("mine")
    before = tree(old)
    result = expand_here(run, old, *(["--force"] if out_exists else []), recipe=("--dup", "1x1"))
    assert tree(old) == before, "the source folder was deleted or moved"
    assert "internal error" not in result.output, result.output


def test_a3_staging_replaced_by_a_link_to_the_source_during_the_run(tmp_path, src):
    before = tree(src)
    run = tmp_path / "run"
    first = Child.start(run, "expand", "--src", src, *RECIPE, "--out", "out", pause=True)
    first.wait_until_paused()
    (run / STAGING).rename(run / "moved")
    (run / STAGING).symlink_to(src)
    first.go()
    code, _, err = first.finish()
    assert tree(src) == before, "the source's config.json and index were overwritten, shards added to it"
    assert code != 0 and "Traceback" not in err, err
    assert not (run / "out").exists()


@pytest.mark.parametrize("target", ["an existing source file", "a new file in the source folder", "a FIFO"])
def test_a4_a_lock_path_that_is_a_link_or_fifo_is_never_written_through(tmp_path, src, target):
    run = tmp_path / "run"
    run.mkdir()
    if target == "a FIFO":
        os.mkfifo(run / LOCK)
    else:
        name = "config.json" if target == "an existing source file" else "planted.json"
        (run / LOCK).symlink_to(src / name)
    before = tree(src)
    result = expand_here(run, src, recipe=("--dup", "1x1"))
    assert tree(src) == before, "a source file was overwritten or created through the lock path"
    if target == "a FIFO":
        refused(result.exit_code, result.output, DATA, re.escape(LOCK))
    else:  # a name beside the output that leads into the source is refused before anything is opened
        refused(result.exit_code, result.output, USAGE, re.escape(LOCK) + ".* leads into the source")


def kinds_llama4(config: dict[str, Any], n: int) -> list[str]:
    return ["moe" if i in config["moe_layers"] else "dense" for i in range(n)]


def kinds_mllama(config: dict[str, Any], n: int) -> list[str]:
    return ["cross" if i in config["cross_attention_layers"] else "self" for i in range(n)]


def kinds_jamba(config: dict[str, Any], n: int) -> list[str]:
    """transformers' JambaConfig.layers_block_type and layers_num_experts."""
    return [
        ("attention" if i % config["attn_layer_period"] == config["attn_layer_offset"] else "mamba")
        + ("/moe" if i % config["expert_layer_period"] == config["expert_layer_offset"] else "/dense")
        for i in range(n)
    ]


def kinds_gemma3(config: dict[str, Any], n: int) -> list[str]:
    """transformers' Gemma3TextConfig: layer_types, else ``(i + 1) % sliding_window_pattern`` (a float
    such as 2.0 is accepted by transformers 5.24 and computed with)."""
    if "layer_types" in config:
        return list(config["layer_types"])
    return ["sliding" if (i + 1) % config["sliding_window_pattern"] else "full" for i in range(n)]


STRUCTURES = {
    "Llama 4 moe_layers listing every layer (interleave step 1, as transformers saves it)": (
        {"model_type": "llama4_text", "interleave_moe_layer_step": 1, "moe_layers": [0, 1, 2, 3]},
        kinds_llama4,
        "moe_layers",
    ),
    "Mllama cross_attention_layers": (
        {"model_type": "mllama_text_model", "cross_attention_layers": [1]},
        kinds_mllama,
        "cross_attention_layers",
    ),
    "Jamba attn/expert layer period and offset": (
        {"model_type": "jamba", "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
         "expert_layer_offset": 1, "num_experts": 4},
        kinds_jamba,
        "attn_layer|expert_layer",
    ),
    "Gemma 3 sliding_window_pattern 2.0": (
        {"model_type": "gemma3_text", "sliding_window": 512, "sliding_window_pattern": 2.0},
        kinds_gemma3,
        "sliding_window_pattern",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STRUCTURES))
def test_a5_each_output_layer_keeps_its_source_layer_kind(tmp_path, case):
    extra, kinds, key = STRUCTURES[case]
    config = mistral_config(4, 8, 12, 2, 2, 16) | extra
    write_tiny_checkpoint(tmp_path / "src", layers=4, shards=1, config=config)
    result = run_cli("expand", "--src", tmp_path / "src", "--dup", "0x1", "--out", tmp_path / "out")
    if case.startswith(("Jamba", "Gemma 3")):  # no key can say the new kinds: refused, naming the key
        refused(result.exit_code, result.output, DATA, key)
        return
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source = kinds(config, 4)
    assert kinds(written, 5) == [source[s] for s in (0, 0, 1, 2, 3)], written


def test_a6_a_layer_number_with_a_trailing_newline_is_not_part_of_the_stack(tmp_path, src):
    odd = "model.layers.3\n.self_attn.o_proj.weight"
    rename_tensor(src, "model.layers.3.self_attn.o_proj.weight", odd)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out")
    valid(result, tmp_path / "out", {odd})  # kept under its own name, outside the stack
    assert "model.layers.4.self_attn.o_proj.weight" not in read_tensors(tmp_path / "out")


def test_a7_resume_does_not_publish_a_damaged_kept_shard(tmp_path, src):
    expected = reference(tmp_path, src)
    run = tmp_path / "run"
    code, _, err = child(run, "expand", "--src", src, *RECIPE, "--out", "out", kill_after_shards=2)
    assert code == -signal.SIGKILL, err
    kept = sorted((run / STAGING).glob("*.safetensors"))[0]
    blob = bytearray(kept.read_bytes())
    blob[-1] ^= 0x01  # last data byte: size and header unchanged
    kept.write_bytes(bytes(blob))
    result = expand_here(run, src)
    assert result.exit_code == 0, result.output
    assert folder_bytes(run / "out") == expected, "the damaged shard was published"


# == B. unbounded memory or time ===================================================================


def test_b1_a_merge_of_more_layers_than_supported_is_refused_before_planning(tmp_path, src):
    text = "slices:\n- &s {sources: [{model: src, layer_range: [0, 4]}]}\n" + "- *s\n" * 30_000
    (tmp_path / "many.yml").write_text(text + "merge_method: passthrough\n")
    code, _, err = child(tmp_path, "merge", "many.yml", "--out", "out", timeout=HANG_SECONDS * 3,
                         limit_mb=MEMORY_LIMIT_MB)  # fmt: skip
    refused(code, err, USAGE, r"many\.yml|120000|layers")


def test_b2_verify_of_an_output_recording_a_huge_recipe_is_bounded(tmp_path, src):
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out").exit_code == 0
    edit_recorded_recipe(tmp_path / "out", lambda r: r.__setitem__("layers", [[0, 1, [], False]] * 200_000))
    code, out, err = child(tmp_path, "verify", "out", "--src", src, timeout=HANG_SECONDS * 3,
                           limit_mb=MEMORY_LIMIT_MB)  # fmt: skip
    assert code == DATA and "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert re.match(r"cannot check against --src: recorded recipe", out), out[:2000]


def test_b3_verify_of_an_index_naming_many_missing_shards_is_fast(tmp_path, src):
    out = tmp_path / "out"
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--max-shard-size", "3KB", "--out", out).exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] |= {f"x{n}": f"m{n}.safetensors" for n in range(30_000)}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = child(tmp_path, "verify", "out", "-q", timeout=HANG_SECONDS)
    assert code == DATA, err[-500:]


def test_b4_a_mergekit_config_of_many_small_nodes_costs_little_memory(tmp_path):
    (tmp_path / "flood.yml").write_text("merge_method: passthrough\nslices: [" + ",".join(["{}"] * 80_000) + "]\n")
    code, peak, err = peak_rss_mb(tmp_path, "merge", "flood.yml", "--out", "out")
    assert code == USAGE and "Traceback" not in err, err[-500:]
    assert peak < 110, f"{peak:.0f} MB for a 240 KB config"


def test_b5_a_config_json_of_many_small_values_costs_little_memory(tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    text = json.dumps(config)[:-1] + ', "junk": [' + ",".join(["{}"] * 1_000_000) + "]}"
    (src / "config.json").write_text(text)
    code, peak, err = peak_rss_mb(tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", "out", "-q")
    assert peak < 110, f"{peak:.0f} MB for a 3 MB config.json (exit {code}, {err[-300:]})"


# == C. tracebacks and internal errors ==============================================================


def surrogate_named(src: Path) -> None:
    """Rename ``model.norm.weight`` to a name holding a lone surrogate escape, which the reference
    reader refuses ("lone leading surrogate") and json.loads accepts."""
    path = src / "model-00002-of-00002.safetensors"
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + length].replace(b'"model.norm.weight"', b'"model.norm\\ud800.weight"')
    assert header != blob[8 : 8 + length]
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + length :])
    index = (src / "model.safetensors.index.json").read_text()
    (src / "model.safetensors.index.json").write_text(
        index.replace('"model.norm.weight"', '"model.norm\\ud800.weight"')
    )


@pytest.mark.parametrize("command", ["expand", "inspect", "plan-json"])
def test_c1_a_name_with_a_lone_surrogate_is_refused_naming_the_shard(tmp_path, src, command):
    surrogate_named(src)
    args = {
        "expand": ["expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out"],
        "inspect": ["inspect", src],
        "plan-json": ["expand", "--src", src, "--dup", "1x1", "--plan-json", tmp_path / "plan.json"],
    }[command]
    result = run_cli(*args)
    refused(result.exit_code, result.output, DATA, r"model-00002-of-00002\.safetensors")


@pytest.mark.parametrize("command", ["expand", "inspect", "verify", "merge layer_range"])
def test_c2_a_number_of_5000_digits_gets_one_clear_line(tmp_path, src, command):
    huge = "9" * 5000
    if command == "merge layer_range":
        (tmp_path / "m.yml").write_text(
            f"slices:\n- sources:\n  - model: src\n    layer_range: [0, {huge}]\nmerge_method: passthrough\n"
        )
        args: list[Any] = ["merge", tmp_path / "m.yml", "--out", tmp_path / "out"]
    else:
        rename_tensor(src, "model.norm.weight", f"model.layers.{huge}.x")
        args = {
            "expand": ["expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out"],
            "inspect": ["inspect", src],
            "verify": ["verify", src],
        }[command]
    result = run_cli(*args)
    assert "internal error" not in result.output and "Traceback" not in result.output, result.output[-500:]
    if command == "merge layer_range":
        refused(result.exit_code, result.output, USAGE, r"m\.yml")
    elif command in ("expand", "inspect"):  # a number of 5,000 digits is no layer: a tensor outside the stack
        assert result.exit_code == 0, result.output[-500:]
        assert command == "expand" or "outside the stack: 3 tensors" in result.output
    else:  # verify: the name is a tensor outside the stack, and the folder a valid checkpoint
        assert result.exit_code == 0 and "verify: OK" in result.output, result.output[-500:]


@pytest.mark.parametrize("where", ["--src", "--out", "merge model"])
def test_c3_a_path_component_over_255_bytes_gets_one_clear_line(tmp_path, src, where):
    long = "n" * 300
    if where == "--src":
        args: list[Any] = ["expand", "--src", tmp_path / long, "--dup", "1x1", "--out", tmp_path / "out"]
    elif where == "--out":
        args = ["expand", "--src", src, "--dup", "1x1", "--out", tmp_path / long]
    else:
        (tmp_path / "m.yml").write_text(
            f"slices:\n- sources:\n  - model: {long}\n    layer_range: [0, 4]\nmerge_method: passthrough\n"
        )
        args = ["merge", tmp_path / "m.yml", "--out", tmp_path / "out"]
    result = run_cli(*args)
    line = refused(result.exit_code, result.output, DATA, r"(?i)too long|nnnn")
    assert "internal error" not in line


@pytest.mark.parametrize("flag", ["--out", "--plan-json"])
def test_c4_a_symlink_loop_as_the_output_gets_one_clear_line(tmp_path, src, flag):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = run_cli("expand", "--src", src, "--dup", "1x1", flag, tmp_path / "loop")
    line = refused(result.exit_code, result.output, USAGE, r"loop")
    assert "internal error" not in line


def test_c5_an_already_full_disk_gets_one_clear_line(tmp_path, src):
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        # in a child: the failing run leaks the lock file's descriptor, which would keep the mount busy
        code, _, err = child(tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", disk / "out")
        line = refused(code, err, DATA, r"(?i)no space left on device")
        assert "internal error" not in line
        assert sorted(p.name for p in disk.iterdir()) == ["filler"], "nothing left behind"
    finally:
        if subprocess.run(["umount", str(disk)]).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def test_c6_a_source_removed_between_planning_and_writing_is_a_checkpoint_error(tmp_path, src):
    from shardsurgeon import CheckpointError, plan_expand, run_job

    job = plan_expand(src, dups=[(3, 1)])
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        run_job(job, tmp_path / "out", command="test")
    assert not (tmp_path / "out").exists()


def test_c7_a_run_with_standard_error_closed_still_writes_its_output(tmp_path, src):
    done = with_closed("2>&-", tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", "out")
    assert done.returncode == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["expand", "inspect"])
def test_c8_standard_output_closed(tmp_path, src, command):
    if command == "expand":
        done = with_closed(">&-", tmp_path, "expand", "--src", src, "--dup", "1x1", "--out", "out")
        assert (tmp_path / "out" / "model.safetensors").is_file()
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    else:
        done = with_closed(">&-", tmp_path, "inspect", src)
        line = one_line(done.stderr)
        assert re.fullmatch(r"shardsurgeon: error: cannot write to standard output: .*", line), line
        assert done.returncode == 1


# == D. unclear messages and small lies =============================================================


def test_d1_model_card_front_matter_keeps_a_folder_name_with_nel(tmp_path):
    src = tmp_path / "a\x85b"
    write_tiny_checkpoint(src, layers=4, shards=1)
    config = json.loads((src / "config.json").read_text())
    del config["_name_or_path"]
    (src / "config.json").write_text(json.dumps(config))
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "base_model" not in front_matter(card), "a folder's name is no Hugging Face id"
    assert "\n# a\\x85b, 5 layers\n" in card, "the name is kept, escaped, on the title's line"


def test_d2_a_shard_that_is_a_symlink_loop_is_named_as_such(tmp_path):
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=4, shards=1)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("model.safetensors")
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out")
    line = refused(result.exit_code, result.output, DATA, r"model\.safetensors")
    assert re.search(r"(?i)loop|symbolic link|cannot read", line), line
