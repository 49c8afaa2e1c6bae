"""Benchmark of issue 9: the seed recipe on loop-mounted XFS and btrfs against a dense ``cp`` of its output.

For each filesystem, a sparse image file sized for the shape is made in ``--workdir`` (its free
space is checked first), formatted (``mkfs.xfs -m reflink=1``, ``mkfs.btrfs``), attached with
``losetup --find --show`` and mounted; the source checkpoint is generated inside it
(``make_checkpoint.py``, streamed). Then, as ``bench/expand.py`` measures: one warm-up of each tool
and ``--pairs`` alternating pairs, ours (``python -m shardsurgeon expand ... -q``, this checkout)
writing OUT and ``cp -r --reflink=never --sparse=never OUT COPY`` copying the same bytes densely,
each a child process (wall time, peak RSS through GNU time), with an untimed ``sync`` before and a
timed one after; ours runs from cached bytecode, as an installed package does (this environment sets
PYTHONDONTWRITEBYTECODE, so the cache goes to a folder of ``--workdir``). After each run: the new
disk it took (statvfs after a syncfs, before and after, each once the count stops changing: XFS
frees removed files in the background); after ours, the fraction of the copied bytes that FIEMAP
reports shared. Afterwards
everything is removed, the filesystem unmounted, the loop device this script attached detached (by
its name) and the image deleted, also on errors and SIGTERM.

Also prints, for the synthesized checkpoints of ``alignment_study.py`` (Llama-2, Mistral, Qwen2,
Gemma, Mixtral, GPT-2), the study's own figures and the fraction of copied bytes that
``shardsurgeon.plan.layout`` makes shareable, and appends all of it to ``bench/RESULTS.md``.

    PYTHONPATH=. python bench/reflink.py --shape 1b [--pairs 3] [--workdir DIR] [--filesystems xfs,btrfs]
    PYTHONPATH=. python bench/reflink.py --figures-only

Needs root, ``losetup``, ``mkfs.xfs`` and ``mkfs.btrfs``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import alignment_study
from check_output import check_output
from expand import COPIES, Child, code_digest, emit, machine, output_nbytes, remove, run_child, tree_bytes
from make_checkpoint import SHAPES, NotEnoughSpace, Shape, check_free_space, checkpoint_nbytes, make_checkpoint

import shardsurgeon
from shardsurgeon.model.arch import NO_HINT
from shardsurgeon.model.checkpoint import Checkpoint, Shard, TensorRef
from shardsurgeon.model.source import resolve
from shardsurgeon.plan.layout import Layout, plan_layout
from shardsurgeon.plan.planner import make_plan
from shardsurgeon.plan.recipe import LayerSource, Recipe, ScaleRule
from shardsurgeon.storage import fileio

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
IMAGE_MARGIN_BYTES = 2 << 30
"""Room beyond the source, the output and its dense copy: filesystem metadata, logs, chunk slack."""


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run; ``extra_disk`` is the filesystem's used bytes after minus before it."""

    tool: str
    run: str
    wall_s: float
    sync_s: float
    peak_rss_mb: float
    extra_disk: int
    shared: int | None


# --- the loop mount -------------------------------------------------------------------------------


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _checked(command: list[str]) -> str:
    result = _run(command)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


@contextlib.contextmanager
def loop_mount(kind: str, folder: Path, image_bytes: int) -> Iterator[Path]:
    """A ``kind`` filesystem in a sparse image in ``folder``, mounted at ``folder / kind``; always
    unmounted, detached (the device attached here, by name) and deleted afterwards."""
    image, mount_point = folder / f"{kind}.img", folder / kind
    with open(image, "wb") as f:
        f.truncate(image_bytes)
    try:
        _checked([*MKFS[kind], str(image)])
        mount_point.mkdir(exist_ok=True)
        device = _checked(["losetup", "--find", "--show", str(image)]).strip()
        try:
            _checked(["mount", "-t", kind, device, str(mount_point)])
            try:
                yield mount_point
            finally:
                _retry(["umount", str(mount_point)])
        finally:
            _retry(["losetup", "--detach", device])
    finally:
        image.unlink()
        if mount_point.is_dir() and not os.path.ismount(mount_point):
            mount_point.rmdir()


def _retry(command: list[str]) -> None:
    for _ in range(20):
        if _run(command).returncode == 0:
            return
        time.sleep(0.5)  # busy: a descriptor closing late, or udev probing the device
    raise RuntimeError(f"{' '.join(command)} kept failing; clean up by hand (see losetup -a, mount)")


def used_bytes(folder: Path) -> int:
    """Bytes in use on the filesystem of ``folder``, after committing it (btrfs counts lazily)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)
    info = os.statvfs(folder)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def settled_used_bytes(folder: Path, tries: int = 40) -> int:
    """``used_bytes`` once it stops changing: XFS frees the blocks of removed files in the background
    (inode garbage collection), after syncfs returns, and would count them against the next run."""
    last = used_bytes(folder)
    for _ in range(tries):
        time.sleep(0.25)
        now = used_bytes(folder)
        if now == last:
            return now
        last = now
    return last


# --- one filesystem -------------------------------------------------------------------------------


def seed_args(shape: Shape) -> list[str]:
    return ["--dup", f"{shape.num_hidden_layers - 1}x{COPIES}", "--zero", "o_proj,down_proj"]


def seed_layout(src: Path, shape: Shape) -> Layout:
    from shardsurgeon.api import plan_expand

    job = plan_expand(src, dups=[(shape.num_hidden_layers - 1, COPIES)], zero=("o_proj", "down_proj"))
    return job.layout


def shared_in(out: Path, layout: Layout) -> int | None:
    measured = [fileio.shared_bytes(out / shard.name) for shard in layout.shards]
    return None if None in measured else sum(m for m in measured if m is not None)


def timed(tool: str, run: str, cmd: list[str], mount: Path, out: Path, layout: Layout) -> tuple[Run, Child]:
    before = settled_used_bytes(mount)
    child = run_child(cmd)
    extra = settled_used_bytes(mount) - before
    shared = shared_in(out, layout) if tool == "shardsurgeon" and child.exit_code == 0 else None
    measured = Run(
        tool, run, round(child.wall_s, 3), round(child.sync_s, 3), round(child.peak_rss_mb, 1), extra, shared
    )
    return measured, child


def bench_filesystem(kind: str, mount: Path, shape: Shape, pairs: int) -> dict[str, object]:
    src, out, copy = mount / f"src-{shape.name}", mount / f"out-{shape.name}", mount / f"copy-{shape.name}"
    started = time.perf_counter()
    make_checkpoint(shape, src, progress=lambda m: print(m, file=sys.stderr))
    generated = time.perf_counter() - started
    layout = seed_layout(src, shape)
    ours_cmd = [sys.executable, "-m", "shardsurgeon", "expand", "--src", str(src), *seed_args(shape)]
    ours_cmd += ["--out", str(out), "-q"]
    cp_cmd = ["cp", "-r", "--reflink=never", "--sparse=never", str(out), str(copy)]
    runs: dict[str, list[Run]] = {"shardsurgeon": [], "cp": []}
    check = "ok"
    for index in range(pairs + 1):
        run = "warmup" if index == 0 else f"pair{index}"
        for tool, cmd, target in (("shardsurgeon", ours_cmd, out), ("cp", cp_cmd, copy)):
            remove(target)
            measured, child = timed(tool, run, cmd, mount, out, layout)
            if child.exit_code != 0:
                failure = {"filesystem": kind, "tool": tool, "run": run, "exit_code": child.exit_code}
                emit({**failure, "error": child.output_tail.splitlines()[-1:]})
                return failure
            emit(_record(kind, measured))
            if index == 0 and tool == "shardsurgeon":
                check = check_output(src, out, COPIES, "BF16") or "ok"
            if index > 0:
                runs[tool].append(measured)
    output_bytes, holes = tree_bytes(out)
    summary = summarize(kind, layout, runs, output_bytes, holes, generated, check)
    emit(summary)
    for path in (out, copy, src):
        remove(path)
    return summary


def _record(kind: str, run: Run) -> dict[str, object]:
    return {"filesystem": kind, **{name: getattr(run, name) for name in Run.__slots__}}


def summarize(
    kind: str,
    layout: Layout,
    runs: dict[str, list[Run]],
    output_bytes: int,
    holes: int,
    generated_s: float,
    check: str,
) -> dict[str, object]:
    ours, cps = runs["shardsurgeon"], runs["cp"]

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    shared = [o.shared for o in ours if o.shared is not None]
    return {
        "filesystem": kind,
        "pairs": len(ours),
        "ratio_wall": median([o.wall_s / c.wall_s for o, c in zip(ours, cps, strict=True)]),
        "ratio_wall_plus_sync": median(
            [(o.wall_s + o.sync_s) / (c.wall_s + c.sync_s) for o, c in zip(ours, cps, strict=True)]
        ),
        "ours_wall_s": median([o.wall_s for o in ours]),
        "ours_sync_s": median([o.sync_s for o in ours]),
        "ours_wall_runs": [o.wall_s for o in ours],
        "cp_wall_s": median([c.wall_s for c in cps]),
        "cp_sync_s": median([c.sync_s for c in cps]),
        "cp_wall_runs": [c.wall_s for c in cps],
        "ours_peak_rss_mb": max(o.peak_rss_mb for o in ours),
        "ours_extra_disk": int(statistics.median([o.extra_disk for o in ours])),
        "ours_extra_disk_max": max(o.extra_disk for o in ours),
        "cp_extra_disk": int(statistics.median([c.extra_disk for c in cps])),
        "output_bytes": output_bytes,
        "holes": holes,
        "copied_bytes": layout.copied_bytes,
        "shareable_bytes": layout.shareable_bytes,
        "shared_min": min(shared) if shared else None,
        "source_generated_s": round(generated_s, 1),
        "check": check,
    }


# --- the alignment study's shapes, through layout.py ----------------------------------------------


def study_figures() -> tuple[str, list[tuple[str, str, int, int, int, int]]]:
    """The study's printout, and per model and recipe: copied bytes, shareable by the study's
    prototype layout e, by shardsurgeon.plan.layout, and layout.py's shard count."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        alignment_study.main()
    rows = []
    for model in alignment_study.MODELS:
        where = alignment_study.source_offsets(model)
        source = study_source(model, where)
        for name, layers in alignment_study.recipes(model.layers).items():
            prototype = alignment_study.measure(
                alignment_study.phase_layout(alignment_study.plan(model, layers, where))
            )
            rules = tuple(ScaleRule(0.0, part) for part in model.residual)
            recipe = Recipe(
                tuple(LayerSource("m", layer, rules if inserted else (), inserted) for layer, inserted in layers),
                LayerSource("m", None),
                LayerSource("m", None),
            )
            layout = plan_layout(make_plan(recipe, {"m": source}))
            assert layout.copied_bytes == prototype.copied, (model.name, name)
            rows.append(
                (model.name, name, layout.copied_bytes, prototype.shared, layout.shareable_bytes, len(layout.shards))
            )
    return printed.getvalue(), rows


def study_source(model: alignment_study.Model, where: dict[str, tuple[int, int]]):  # type: ignore[no-untyped-def]
    """The study's synthesized source as the headers shardsurgeon would read (no file exists)."""
    specs = [*model.before, *(s for i in range(model.layers) for s in model.layer(i)), *model.after]
    files = max(number for number, _ in where.values()) + 1
    paths = [Path(f"/study/{model.name}/model-{n + 1:05d}-of-{files:05d}.safetensors") for n in range(files)]
    refs = sorted(
        (TensorRef(s.name, paths[where[s.name][0]], s.dtype, s.shape, where[s.name][1], s.nbytes) for s in specs),
        key=lambda ref: (ref.path, ref.data_start),
    )
    ends = {path: max(r.data_start + r.nbytes for r in refs if r.path == path) for path in paths}
    shards = tuple(Shard(path, ends[path], f"{n:064d}") for n, path in enumerate(paths))
    key = "n_layer" if model.prefix == "h." else "num_hidden_layers"
    checkpoint = Checkpoint(Path(f"/study/{model.name}"), {r.name: r for r in refs}, shards, {key: model.layers})
    return resolve(checkpoint, NO_HINT, "m")


# --- results --------------------------------------------------------------------------------------


def gb(nbytes: object) -> str:
    return f"{int(str(nbytes)) / 1e9:.2f}"


def percent(part: int, whole: int) -> str:
    """Rounded down, so that 100.00% means all of it."""
    return f"{part * 10000 // whole / 100:.2f}%" if whole else "-"


def results_section(shape: Shape, info: dict[str, object], rows: list[dict[str, object]], pairs: int) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## reflink (issue 9): `{shape.name}` on loop-mounted XFS and btrfs, {date}\n",
        f"Machine: {info['nproc']} cores, {info['ram_gb']} GB RAM, images on {info['filesystem']}, kernel "
        f"{info['kernel']}, Python {info['python']}, shardsurgeon sources {info['code']}, load average "
        f"{info['loadavg_1m']} at start, {os.getloadavg()[0]:.2f} at end. `PYTHONPATH=. python bench/reflink.py "
        f"--shape {shape.name} --pairs {pairs}`: the source ({checkpoint_nbytes(shape) / 1e9:.2f} GB bf16) "
        "generated inside each filesystem (sparse image, `mkfs.xfs -m reflink=1` / `mkfs.btrfs`); seed recipe "
        "against `cp -r --reflink=never --sparse=never` of the same output; page cache warm (one warm-up "
        f"of each), median of {pairs} alternating pairs; extra disk is statvfs used bytes after minus before "
        "a run, each after a syncfs once it stops changing; ours runs from cached bytecode; shared is what "
        "FIEMAP flags FIEMAP_EXTENT_SHARED in the output shards.\n",
        "| filesystem | ours wall s | cp wall s | ratio | ratio incl. sync | ours peak RSS MB | ours extra disk "
        "| cp extra disk | output GB | holes GB | copied GB | shared (FIEMAP) | layout predicts | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row or "exit_code" in row:
            lines.append(f"| {row['filesystem']} | failed ({row.get('tool')}, exit {row.get('exit_code')}) |")
            continue
        output = int(str(row["output_bytes"]))
        copied = int(str(row["copied_bytes"]))
        extra = int(str(row["ours_extra_disk"]))
        shared = row["shared_min"]
        cells = [
            row["filesystem"],
            row["ours_wall_s"],
            row["cp_wall_s"],
            f"{row['ratio_wall']:.3f}",
            f"{row['ratio_wall_plus_sync']:.3f}",
            row["ours_peak_rss_mb"],
            f"{extra / 1e6:.1f} MB ({percent(extra, output)} of output)",
            f"{int(str(row['cp_extra_disk'])) / 1e9:.2f} GB",
            gb(output),
            gb(row["holes"]),
            gb(copied),
            "unknown" if shared is None else percent(int(str(shared)), copied),
            percent(int(str(row["shareable_bytes"])), copied),
            row["check"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def figures_section(printed: str, rows: list[tuple[str, str, int, int, int, int]]) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Copied bytes a reflink filesystem can share, per shape (`bench/alignment_study.py`), {date}\n",
        "Synthesized checkpoints as Hugging Face saves them (5 GB source shards unless said), no files. "
        '"e fill (study)" is the study\'s prototype; "layout.py" is what shardsurgeon now writes, from the '
        "same headers through the planner (`PYTHONPATH=. python bench/reflink.py --figures-only`).\n",
        "| shape | recipe | copied GB | e fill (study) | layout.py | output shards |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, recipe, copied, prototype, ours, shards in rows:
        lines.append(
            f"| {model} | {recipe} | {copied / 1e9:.2f} | {percent(prototype, copied)} | {percent(ours, copied)} | "
            f"{shards} |"
        )
    lines += ["", "The study's own printout (layouts a to e; a is the layout before issue 9):", "", "```"]
    lines += [*printed.rstrip().splitlines(), "```"]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--pairs", type=int, default=3, help="timed pairs after the warm-up (>= 3 for a median)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "shardsurgeon-reflink-bench")
    parser.add_argument("--filesystems", default="xfs,btrfs")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file to append to")
    parser.add_argument("--figures-only", action="store_true", help="only the layout figures; no mounts")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if not set(args.filesystems.split(",")) <= set(MKFS):
        parser.error(f"--filesystems: expected a comma-separated subset of {','.join(MKFS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the mounts are cleaned up
    # The children run the code this process imported (this checkout with PYTHONPATH=.), from
    # cached bytecode as an installed package does, even where PYTHONDONTWRITEBYTECODE is set.
    os.environ["PYTHONPATH"] = str(Path(shardsurgeon.__file__).resolve().parent.parent)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(args.workdir.absolute() / "pycache")
    printed, figures = study_figures()
    print(printed)
    for row in figures:
        emit(
            dict(zip(("shape", "recipe", "copied", "shareable_study", "shareable_layout", "shards"), row, strict=True))
        )
    if args.figures_only:
        with open(args.results, "a") as f:
            f.write(figures_section(printed, figures))
        return 0
    if os.geteuid() != 0:
        print("error: loop mounts need root", file=sys.stderr)
        return 1
    shape = SHAPES[args.shape]
    image_bytes = checkpoint_nbytes(shape) + 2 * output_nbytes(shape) + IMAGE_MARGIN_BYTES
    workdir: Path = args.workdir.absolute()
    try:
        check_free_space(workdir, image_bytes, f"the {shape.name} reflink benchmark (one image at a time)")
    except NotEnoughSpace as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    info = {**machine(workdir), "code": code_digest()}
    emit({"machine": info, "shape": shape.name, "image_bytes": image_bytes})
    rows = []
    try:
        for kind in args.filesystems.split(","):
            with loop_mount(kind, workdir, image_bytes) as mount:
                rows.append(bench_filesystem(kind, mount, shape, args.pairs))
    finally:
        remove(workdir / "pycache")
        if workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()
    with open(args.results, "a") as f:
        f.write(results_section(shape, info, rows, args.pairs) + figures_section(printed, figures))
    return 0 if all("exit_code" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
