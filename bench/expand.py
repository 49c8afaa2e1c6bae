"""Benchmark of issue 3: ``shardsurgeon expand`` against a dense ``cp -r`` of the same output bytes.

Generates a synthetic bf16 checkpoint (see ``make_checkpoint.py``), then for each recipe runs one
warm-up of each tool and ``--pairs`` alternating pairs: ours writes OUT, then ``cp -r
--sparse=never OUT COPY`` copies those same output bytes densely. Each run is a child process whose
wall time and peak RSS (``ru_maxrss`` from ``os.wait4``, that child alone, interpreter and imports
included) are measured. Before every run the page cache's dirty pages are flushed with ``sync``
(untimed); the ``sync`` right after a run is timed as ``sync_s``, so writeback the tool leaves behind
is visible. Caches are never dropped, so every timed run is warm. Both outputs of the last pair are
deleted before ours runs, as the last copy is before cp runs: a deleted file's pages leave the page
cache, so neither tool starts with the other's 20 GB of cache to reclaim (before 2026-11-27 13:40
the copy was still there when ours ran; see RESULTS.md, "Issue 9 part 3").

Prints one JSON line per run and per ratio, appends a table to ``bench/RESULTS.md``, and removes
everything it generated (``--keep`` keeps the source checkpoint for the next run).

``bytes_written`` is the output's logical size (sum of ``st_size``, the same for both tools),
``bytes_holes`` the part of it left unallocated, ``mb_per_s`` is ``bytes_written / wall_s / 1e6``,
``data_mb_per_s`` counts only the bytes actually written (for a cast: the bytes converted),
``peak_rss_mb`` is decimal megabytes.

    python bench/expand.py --shape 7b [--keep] [--pairs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from check_output import check_output
from make_checkpoint import (
    SHAPES,
    NotEnoughSpace,
    Shape,
    check_free_space,
    checkpoint_nbytes,
    layer_nbytes,
    make_checkpoint,
)

import shardsurgeon

COPIES = 12
GNU_TIME = "/usr/bin/time"
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_TITLE = """# Benchmark results

Appended by `bench/expand.py` (issue 3), one section per run. Seed recipe: `--dup LASTx12 --zero
o_proj,down_proj`; the yardstick is `cp -r --sparse=never` of the same output. "ratio" is the median
of per-pair wall-time ratios ours/cp; "incl. sync" adds the timed `sync` after each run. shardsurgeon
fsyncs every file before it exits and cp does not, so "incl. sync" is the like-for-like ratio; "data
MB/s" counts only bytes actually written (holes excluded; for a cast, the bytes converted).
"""


@dataclass(frozen=True, slots=True)
class Recipe:
    """The flags after ``--src``, and the dtype the output tensors must have."""

    name: str
    args: tuple[str, ...]
    dtype: str = "BF16"
    merge_config: str | None = None
    """A mergekit YAML to run with ``shardsurgeon merge`` instead of ``expand ARGS``."""


@dataclass(frozen=True, slots=True)
class Child:
    """One finished child process."""

    wall_s: float
    sync_s: float
    peak_rss_mb: float
    exit_code: int
    output_tail: str


@dataclass(frozen=True, slots=True)
class Measurement:
    """One timed run, printed as a JSON line."""

    tool: str
    shape: str
    recipe: str
    run: str
    wall_s: float
    sync_s: float
    peak_rss_mb: float
    bytes_written: int
    bytes_holes: int
    mb_per_s: float
    data_mb_per_s: float


@dataclass(frozen=True, slots=True)
class Context:
    """What every run of one benchmark shares: the shape, the tool, and the three folders."""

    shape: Shape
    exe: str
    src: Path
    out: Path
    copy: Path
    pairs: int


def recipes_for(shape: Shape, cast: bool) -> list[Recipe]:
    seed = ("--dup", f"{shape.num_hidden_layers - 1}x{COPIES}", "--zero", "o_proj,down_proj")
    recipes = [Recipe("seed", seed)]
    if cast or shape.name == "wide":
        recipes.append(Recipe("seed+float16", (*seed, "--dtype", "float16"), "F16"))
        recipes.append(Recipe("merge seed yaml+float16", (), "F16", seed_yaml(shape, "float16")))
    return recipes


def seed_yaml(shape: Shape, dtype: str) -> str:
    """The seed model's mergekit config for this shape; ``{model}`` is filled in with the source."""
    last = shape.num_hidden_layers - 1
    copy = (
        f"  - sources:\n    - model: {{model}}\n      layer_range: [{last}, {last + 1}]\n"
        "      parameters:\n        scale:\n          - filter: o_proj\n            value: 0.0\n"
        "          - filter: down_proj\n            value: 0.0\n          - value: 1.0\n"
    )
    head = f"slices:\n  - sources:\n    - model: {{model}}\n      layer_range: [0, {last + 1}]\n"
    return head + copy * COPIES + f"merge_method: passthrough\ndtype: {dtype}\n"


def output_nbytes(shape: Shape) -> int:
    return checkpoint_nbytes(shape) + COPIES * layer_nbytes(shape)


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def run_child(cmd: list[str]) -> Child:
    """Run ``cmd`` after an untimed sync; measure its wall time, its own peak RSS and the sync after.

    ``ru_maxrss`` survives ``execve``, so a child forked straight from this (numpy-laden) process
    would report at least our own RSS; GNU time, a small C program, forks the child instead.
    Without it, ``os.wait4`` is used and the figure is an upper bound.
    """
    os.sync()
    with tempfile.NamedTemporaryFile() as rss_file, tempfile.TemporaryFile() as output:
        use_time = os.access(GNU_TIME, os.X_OK)
        prefix = [GNU_TIME, "-f", "%M", "-o", rss_file.name] if use_time else []
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*prefix, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # GNU time and the tool under it
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        sync_start = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - sync_start
        peak_kib = int(Path(rss_file.name).read_text().split()[-1]) if use_time else usage.ru_maxrss
        output.seek(0)
        tail = output.read()[-2000:].decode(errors="replace").strip()
    return Child(wall_s, sync_s, peak_kib * 1024 / 1e6, proc.returncode, tail)


def tree_bytes(root: Path) -> tuple[int, int]:
    """Logical bytes of every file under ``root`` and the part of them that is holes."""
    size = holes = 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            size += st.st_size
            holes += max(0, st.st_size - st.st_blocks * 512)
    return size, holes


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_outputs(ctx: Context) -> None:
    """Remove OUT, COPY and any temporary sibling the tool may have left next to OUT."""
    for entry in ctx.out.parent.iterdir():
        name = entry.name.lstrip(".")
        if name == ctx.copy.name or name == ctx.out.name or name.startswith(ctx.out.name + "."):
            remove(entry)


def measure(ctx: Context, tool: str, recipe: Recipe, run: str) -> tuple[Measurement | None, Child]:
    if tool == "shardsurgeon":
        remove(ctx.out)
        remove(ctx.copy)  # the last pair's copy: deleting it frees its page cache, as cp gets before its run
        cmd = [ctx.exe, "expand", "--src", str(ctx.src), *recipe.args, "--out", str(ctx.out), "-q"]
        if recipe.merge_config is not None:
            config = ctx.out.parent / "merge.yml"
            config.write_text(recipe.merge_config.format(model=ctx.src))
            cmd = [ctx.exe, "merge", str(config), "--out", str(ctx.out), "-q"]
        target = ctx.out
    else:
        remove(ctx.copy)
        cmd = ["cp", "-r", "--sparse=never", str(ctx.out), str(ctx.copy)]
        target = ctx.copy
    child = run_child(cmd)
    if child.exit_code != 0:
        return None, child
    size, holes = tree_bytes(target)
    return Measurement(
        tool,
        ctx.shape.name,
        recipe.name,
        run,
        round(child.wall_s, 3),
        round(child.sync_s, 3),
        round(child.peak_rss_mb, 1),
        size,
        holes,
        round(size / child.wall_s / 1e6, 1),
        round((size - holes) / child.wall_s / 1e6, 1),
    ), child


def error_line(ctx: Context, tool: str, recipe: Recipe, run: str, child: Child) -> dict[str, object]:
    last = child.output_tail.splitlines()[-1] if child.output_tail else ""
    return {
        "tool": tool,
        "shape": ctx.shape.name,
        "recipe": recipe.name,
        "run": run,
        "error": last,
        "exit_code": child.exit_code,
    }


def bench_recipe(ctx: Context, recipe: Recipe) -> dict[str, object]:
    """Warm up both tools, then time alternating pairs; return the summary row (or the error)."""
    runs: dict[str, list[Measurement]] = {"shardsurgeon": [], "cp": []}
    problem: str | None = None
    for index in range(ctx.pairs + 1):
        run = "warmup" if index == 0 else f"pair{index}"
        for tool in ("shardsurgeon", "cp"):
            measurement, child = measure(ctx, tool, recipe, run)
            if measurement is None:
                failure = error_line(ctx, tool, recipe, run, child)
                emit(failure)
                return failure
            emit(asdict(measurement))
            if index == 0 and tool == "shardsurgeon":
                problem = check_output(ctx.src, ctx.out, COPIES, recipe.dtype)
                if problem is not None:
                    emit({"tool": tool, "shape": ctx.shape.name, "recipe": recipe.name, "check": problem})
            if index > 0:
                runs[tool].append(measurement)
    summary = {**summarize(ctx, recipe, runs["shardsurgeon"], runs["cp"]), "check": problem or "ok"}
    emit(summary)
    return summary


def summarize(ctx: Context, recipe: Recipe, ours: list[Measurement], cps: list[Measurement]) -> dict[str, object]:
    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {
        "ratio": "shardsurgeon/cp",
        "shape": ctx.shape.name,
        "recipe": recipe.name,
        "pairs": len(ours),
        "ratio_wall": median([o.wall_s / c.wall_s for o, c in zip(ours, cps, strict=True)]),
        "ratio_wall_plus_sync": median(
            [(o.wall_s + o.sync_s) / (c.wall_s + c.sync_s) for o, c in zip(ours, cps, strict=True)]
        ),
        "ours_wall_s": median([o.wall_s for o in ours]),
        "ours_sync_s": median([o.sync_s for o in ours]),
        "ours_peak_rss_mb": max(o.peak_rss_mb for o in ours),
        "ours_mb_per_s": median([o.mb_per_s for o in ours]),
        "ours_data_mb_per_s": median([o.data_mb_per_s for o in ours]),
        "ours_wall_runs": [o.wall_s for o in ours],
        "cp_wall_s": median([c.wall_s for c in cps]),
        "cp_sync_s": median([c.sync_s for c in cps]),
        "cp_peak_rss_mb": max(c.peak_rss_mb for c in cps),
        "cp_mb_per_s": median([c.mb_per_s for c in cps]),
        "cp_wall_runs": [c.wall_s for c in cps],
        "bytes_written": ours[0].bytes_written,
        "bytes_holes": ours[0].bytes_holes,
        "src_bytes": checkpoint_nbytes(ctx.shape),
    }


def machine(folder: Path) -> dict[str, object]:
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    df = subprocess.run(["df", "--output=fstype,source", str(folder)], capture_output=True, text=True, check=False)
    fstype, _, device = df.stdout.splitlines()[-1].partition(" ") if df.returncode == 0 else ("?", "", "?")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kib * 1024 / 1e9, 1),
        "filesystem": f"{fstype} on {device.strip()}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def code_digest() -> str:
    """Digest of the installed shardsurgeon sources, to notice an edit (editable install) mid-run."""
    package = Path(shardsurgeon.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def tool_version(exe: str) -> str:
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).strip().splitlines()[-1] if result.returncode == 0 else "unknown"


def results_section(ctx: Context, info: dict[str, object], rows: list[dict[str, object]], note: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## `{ctx.shape.name}`, {date}\n",
        f"Machine: {info['nproc']} cores, {info['ram_gb']} GB RAM, {info['filesystem']}, "
        f"kernel {info['kernel']}, Python {info['python']}, {info['tool']} (sources {info['code']}), load average "
        f"{info['loadavg_1m']} at start, {os.getloadavg()[0]:.2f} at end.",
        f"Source: {checkpoint_nbytes(ctx.shape) / 1e9:.2f} GB bf16, {note}. Page cache warm: one warm-up "
        f"run of each tool first, caches never dropped; median of {ctx.pairs} alternating pairs, "
        "`sync` (untimed) before every run.\n",
        "| recipe | ours wall s | cp wall s | ratio | ratio incl. sync | ours peak RSS MB | "
        "cp peak RSS MB | ours MB/s | ours data MB/s | cp MB/s | output GB | holes GB | output check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(table_row(row))
    return "\n".join(lines) + "\n"


def table_row(row: dict[str, object]) -> str:
    if "error" in row:
        return f"| {row['recipe']} | failed ({row['tool']}, exit {row['exit_code']}): {row['error']} |"
    gb = {key: f"{int(str(row[key])) / 1e9:.2f}" for key in ("bytes_written", "bytes_holes")}
    cells = [
        row["recipe"],
        row["ours_wall_s"],
        row["cp_wall_s"],
        f"{row['ratio_wall']:.2f}",
        f"{row['ratio_wall_plus_sync']:.2f}",
        row["ours_peak_rss_mb"],
        row["cp_peak_rss_mb"],
        row["ours_mb_per_s"],
        row["ours_data_mb_per_s"],
        row["cp_mb_per_s"],
        gb["bytes_written"],
        gb["bytes_holes"],
        row["check"],
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def append_results(path: Path, section: str) -> None:
    title = "" if path.exists() else RESULTS_TITLE
    with open(path, "a") as f:
        f.write(title + section)


def default_exe() -> str:
    sibling = Path(sys.executable).parent / "shardsurgeon"
    return str(sibling) if sibling.exists() else shutil.which("shardsurgeon") or "shardsurgeon"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the source checkpoint")
    parser.add_argument("--pairs", type=int, default=3, help="timed pairs after the warm-up (>= 1)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "shardsurgeon-bench")
    parser.add_argument("--cast", action="store_true", help="also run the float16 cast (always on wide)")
    parser.add_argument("--exe", default=default_exe(), help="the shardsurgeon executable to measure")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file to append to")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return args


def prepare_source(ctx: Context) -> str:
    """Generate the source checkpoint unless a complete one is already there; say which."""
    if ctx.src.exists():
        return "reused from an earlier --keep run"
    start = time.perf_counter()
    make_checkpoint(ctx.shape, ctx.src, progress=lambda m: print(m, file=sys.stderr))
    return f"generated in {time.perf_counter() - start:.0f} s"


def run_benchmark(ctx: Context, args: argparse.Namespace) -> list[dict[str, object]]:
    """Generate or reuse the source, measure every recipe, append the results; return the rows."""
    note = prepare_source(ctx)
    info = {**machine(ctx.out.parent), "tool": tool_version(ctx.exe), "code": code_digest()}
    emit({"machine": info, "shape": ctx.shape.name, "source": note})
    rows = [bench_recipe(ctx, recipe) for recipe in recipes_for(ctx.shape, args.cast)]
    if code_digest() != info["code"]:
        note += "; WARNING: the shardsurgeon sources changed during this run"
        emit({"warning": "the shardsurgeon sources changed during this run", "shape": ctx.shape.name})
    append_results(args.results, results_section(ctx, info, rows, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so cleanup runs
    shape = SHAPES[args.shape]
    workdir: Path = args.workdir.absolute()
    ctx = Context(
        shape=shape,
        exe=args.exe,
        src=workdir / f"src-{shape.name}",
        out=workdir / f"out-{shape.name}",
        copy=workdir / f"copy-{shape.name}",
        pairs=args.pairs,
    )
    if workdir.is_dir():
        remove_outputs(ctx)  # left by an interrupted run; they would count against the free space
    need = (0 if ctx.src.exists() else checkpoint_nbytes(shape)) + 2 * output_nbytes(shape)
    try:
        check_free_space(workdir, need, f"the {shape.name} benchmark (source, output and its copy)")
    except NotEnoughSpace as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_benchmark(ctx, args)
    finally:
        remove_outputs(ctx)
        if not args.keep:
            remove(ctx.src)
            if not any(workdir.iterdir()):
                workdir.rmdir()
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
