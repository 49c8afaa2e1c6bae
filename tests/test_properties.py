"""Property tests: hostile bytes raise only the project's errors; random recipes put every byte right.

The expected output of a recipe is derived here from the meaning of the flags (DESIGN.md), not from
the plan: which source layer each output layer copies, which tensors of the inserted copies are
zero, and each tensor cast with ml_dtypes. The output is read back with the independent reader of
``conftest`` and compared byte for byte.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from _scratch import scratch_folder
from conftest import data_order, read_tensors, run_cli, write_tiny_checkpoint
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardsurgeon import ShardSurgeonError, plan_expand, run_job

# Mutated sources: only the project's errors, or a run that succeeds

TARGETS = {
    1: ("model.safetensors", "config.json"),
    2: ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json"),
}
"""The files to damage, by the number of shards of the source."""

mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "cut"]), st.integers(0, 2**16), st.integers(0, 255))


def mutate(blob: bytes, mutations: list[tuple[str, int, int]], span: int) -> bytes:
    """Apply ``mutations`` at positions below ``span`` (a shard's length field and header)."""
    raw = bytearray(blob)
    for kind, at, byte in mutations:
        at %= max(1, min(span, len(raw)))
        if kind == "flip" and at < len(raw):
            raw[at] = byte
        elif kind == "insert":
            raw.insert(at, byte)
        elif kind == "delete" and at < len(raw):
            del raw[at]
        elif kind == "cut":
            del raw[at:]
    return bytes(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shards=st.integers(1, 2), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_source_raises_only_shardsurgeon_errors(data, shards, mutations):
    target = data.draw(st.sampled_from(TARGETS[shards]))
    with scratch_folder() as root:
        src = root / "src"
        write_tiny_checkpoint(src, layers=2, shards=shards)
        blob = (src / target).read_bytes()
        span = 8 + int.from_bytes(blob[:8], "little") if target.endswith(".safetensors") else len(blob)
        (src / target).write_bytes(mutate(blob, mutations, span))
        try:
            job = plan_expand(src, dups=[(1, 1)], zero=["o_proj"], max_shard_bytes=2000)
            run_job(job, root / "out", command="test")
        except ShardSurgeonError as e:
            assert "\n" not in str(e)
        else:
            assert (root / "out" / "config.json").is_file()


# Random recipes on random small checkpoints

FILTERS = ["o_proj", "down_proj", "mlp", "self_attn", "layernorm", "q_proj", "up_proj.weight"]
OUTPUT_DTYPES = {None: "BF16", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Job:
    layers: int
    shards: int
    lm_head: bool
    dups: list[tuple[int, int]]
    every: int | None
    zero: list[str]
    dtype: str | None
    max_shard_size: str | None

    def args(self) -> list[str]:
        args = [f"--dup={layer}x{copies}" for layer, copies in self.dups]
        args += [f"--every={self.every}"] if self.every else []
        args += ["--zero", ",".join(self.zero)] if self.zero else []
        args += ["--dtype", self.dtype] if self.dtype else []
        return args + (["--max-shard-size", self.max_shard_size] if self.max_shard_size else [])

    def output_layers(self) -> list[tuple[int, bool]]:
        """(source layer, inserted) for each output layer, from the flags' meaning in DESIGN.md."""
        layers = []
        for layer in range(self.layers):
            layers.append((layer, False))
            copies = sum(n for source, n in self.dups if source == layer)
            copies += 1 if self.every and (layer + 1) % self.every == 0 else 0
            layers += [(layer, True)] * copies
        return layers


@st.composite
def jobs(draw) -> Job:
    layers = draw(st.integers(1, 6))
    dups = draw(st.lists(st.tuples(st.integers(0, layers - 1), st.integers(1, 3)), max_size=3))
    every = draw(st.none() | st.integers(1, layers))
    if not dups and every is None:
        dups = [(draw(st.integers(0, layers - 1)), draw(st.integers(1, 3)))]
    return Job(
        layers=layers,
        shards=draw(st.integers(1, 3)),
        lm_head=draw(st.booleans()),
        dups=dups,
        every=every,
        zero=draw(st.lists(st.sampled_from(FILTERS), unique=True, max_size=3)),
        dtype=draw(st.sampled_from(list(OUTPUT_DTYPES))),
        max_shard_size=draw(st.sampled_from([None, "300B", "2KB", "5KB"])),
    )


def cast(blob: bytes, dtype: str) -> bytes:
    if dtype == "BF16":
        return blob
    values = np.frombuffer(blob, ml_dtypes.bfloat16).astype(np.float32)  # bf16 -> f32 is exact
    return values.astype({"F16": np.float16, "F32": np.float32}[dtype]).tobytes()


def expected_output(job: Job, data: dict[str, bytes], source_order: list[str]) -> dict[str, tuple[str, bytes]]:
    """Output tensor name -> (dtype, bytes), in the plan's order: each layer's tensors in source order."""
    dtype = OUTPUT_DTYPES[job.dtype]
    expected = {"model.embed_tokens.weight": (dtype, cast(data["model.embed_tokens.weight"], dtype))}
    for position, (layer, inserted) in enumerate(job.output_layers()):
        prefix = f"model.layers.{layer}."
        for part in [name.removeprefix(prefix) for name in source_order if name.startswith(prefix)]:
            blob = cast(data[f"model.layers.{layer}.{part}"], dtype)
            if inserted and any(name in part for name in job.zero):
                blob = bytes(len(blob))
            expected[f"model.layers.{position}.{part}"] = (dtype, blob)
    expected["model.norm.weight"] = (dtype, cast(data["model.norm.weight"], dtype))
    if job.lm_head:
        expected["lm_head.weight"] = (dtype, cast(data["lm_head.weight"], dtype))
    return expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs())
@example(job=Job(1, 1, False, dups=[], every=1, zero=["mlp", "down_proj"], dtype=None, max_shard_size=None))
def test_every_output_byte_comes_from_where_the_recipe_says(job):
    with scratch_folder() as root:
        src, out = root / "src", root / "out"
        data = write_tiny_checkpoint(src, layers=job.layers, shards=job.shards, lm_head=job.lm_head)
        result = run_cli("expand", "--src", src, *job.args(), "--out", out, "-q")
        assert result.exit_code == 0, result.output
        expected = expected_output(job, data, data_order(src))
        tensors = read_tensors(out)
        assert sorted(tensors) == sorted(expected), "every planned tensor once, nothing else"
        for name, (dtype, blob) in expected.items():
            assert tensors[name][0] == dtype, name
            assert tensors[name][2] == blob, f"{name} holds the wrong bytes"
        config = json.loads((out / "config.json").read_text())
        assert config["num_hidden_layers"] == len(job.output_layers())
        check_shards(out, job)
        verified = run_cli("verify", out, "--src", src)
        assert verified.exit_code == 0, verified.output
        shutil.rmtree(out)


def check_shards(out: Path, job: Job) -> None:
    """One file without index, or an index naming every tensor's shard; shards within the limit."""
    tensors = read_tensors(out)
    shards = sorted({shard for _, _, _, shard, _ in tensors.values()})
    index_path = out / "model.safetensors.index.json"
    if len(shards) == 1:
        assert shards == ["model.safetensors"] and not index_path.exists()
        return
    index = json.loads(index_path.read_text())
    assert index["weight_map"] == {name: t[3] for name, t in tensors.items()}
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    limit = {"300B": 300, "2KB": 2000, "5KB": 5000}.get(job.max_shard_size or "", 5 * 10**9)
    for shard in shards:
        sizes = [len(t[2]) for t in tensors.values() if t[3] == shard]
        assert sum(sizes) <= limit or len(sizes) == 1, (shard, sizes)
    assert np.all(np.diff([int(s[6:11]) for s in shards]) == 1), shards
