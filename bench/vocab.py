"""``shardsurgeon vocab --add-tokens`` against transformers' ``resize_token_embeddings`` (issue 20).

The job: add 8 special tokens to a checkpoint of ``make_checkpoint.py``'s shape (``1b``:
TinyLlama-shaped, untied head, 32,000 rows; ``7b``: Mistral-shaped; ``wide``: a 256,000-row tied
embedding, for the tokenizer's share of memory), new embedding rows the mean
of the old ones. transformers needs torch and is not a dependency: pass a Python that has torch
and transformers (``--hf-python``). Each tool runs in a child measured by GNU time (wall with the
sync after it, peak RSS), ``--pairs`` alternating pairs, medians printed as JSON lines. Then the
outputs are compared: every tensor but the embedding and head byte-identical, and their old rows
too (transformers' new rows are drawn at random around the mean, ours are the exact mean), read a
chunk at a time.

With ``--fs xfs`` everything happens inside an XFS image (``mkfs.xfs -m reflink=1``, sparse, on a
loop device, as bench/upcycle.py does): our copies share the source's blocks, and the extra disk our
output takes is printed; the dense cp yardstick runs first in each triple and is removed at once, so
the disk holds at most the source and two outputs.

    python bench/vocab.py --hf-python /work/mk-venv/bin/python [--shape 1b|7b] [--fs ext4|xfs]
        [--pairs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path

from expand import machine, remove, run_child
from make_checkpoint import SHAPES, Shape, checkpoint_nbytes, make_checkpoint
from reflink import loop_mount, settled_used_bytes

NEW_TOKENS = [f"<tool_{i}>" for i in range(8)]
TRANSFORMERS_JOB = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
src, out, tokens = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
tokenizer = AutoTokenizer.from_pretrained(src)
tokenizer.add_special_tokens({"additional_special_tokens": tokens})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
model.resize_token_embeddings(len(tokenizer))
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def write_tokenizer(folder: Path, size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tensor_index(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, first byte, end byte) from the shards' headers alone."""
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            index[name] = (path, info["dtype"], info["shape"], 8 + n + begin, 8 + n + end)
    return index


def same_bytes(a: tuple[Path, int, int], b: tuple[Path, int, int], chunk: int = 8 << 20) -> bool:
    """Whether two byte ranges of two files are equal, read a chunk at a time (7b: 14.5 GB each)."""
    (path_a, start_a, end_a), (path_b, start_b, end_b) = a, b
    if end_a - start_a != end_b - start_b:
        return False
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        for done in range(0, end_a - start_a, chunk):
            count = min(chunk, end_a - start_a - done)
            if os.pread(fa.fileno(), count, start_a + done) != os.pread(fb.fileno(), count, start_b + done):
                return False
    return True


def compare(ours: Path, theirs: Path) -> dict[str, object]:
    a, b = tensor_index(ours), tensor_index(theirs)
    matrices = [n for n in a if "embed_tokens" in n or n.startswith("lm_head")]
    others = sorted(set(a) - set(matrices))
    differing = [
        n for n in others if n not in b or a[n][1:3] != b[n][1:3] or not same_bytes(
            (a[n][0], a[n][3], a[n][4]), (b[n][0], b[n][3], b[n][4]))
    ]  # fmt: skip
    old_rows = {}
    for name in matrices:
        path, _, shape, start, end = a[name]
        their_path, _, their_shape, their_start, _ = b[name]
        kept = (shape[0] - len(NEW_TOKENS)) * ((end - start) // shape[0])
        equal = same_bytes((path, start, start + kept), (their_path, their_start, their_start + kept))
        old_rows[name] = {"ours": shape, "theirs": their_shape, "old_rows_equal": equal}
    return {"other_tensors": len(others), "other_tensors_differing": differing, "matrices": old_rows,
            "same_names": sorted(a) == sorted(b)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-python", required=True, help="a Python with torch and transformers")
    parser.add_argument("--shape", choices=["1b", "7b", "wide"], default="1b")
    parser.add_argument("--fs", choices=["ext4", "xfs"], default="ext4")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="bench-vocab-", dir=args.workdir))
    emit({"shape": shape.name, "fs": args.fs, "machine": machine(work)})
    try:
        with contextlib.ExitStack() as stack:
            root = work
            if args.fs == "xfs":
                root = stack.enter_context(loop_mount("xfs", work, int(checkpoint_nbytes(shape) * 2.2) + (2 << 30)))
            return compare_runs(root, shape, args)
    finally:
        remove(work)


def compare_runs(root: Path, shape: Shape, args: argparse.Namespace) -> int:
    src = make_checkpoint(shape, root / "src")
    write_tokenizer(src, shape.vocab_size)
    ours_out, theirs_out, copy_out = root / "ours", root / "theirs", root / "copy"
    tokens = ",".join(NEW_TOKENS)
    commands = {
        "cp --reflink=never --sparse=never (yardstick)": (
            ["cp", "-r", "--reflink=never", "--sparse=never", str(src), str(copy_out)], copy_out),
        "shardsurgeon vocab": ([sys.executable, "-m", "shardsurgeon", "vocab", "--src", str(src), "--add-tokens",
                                tokens, "--special", "--init", "mean", "--out", str(ours_out), "-q"], ours_out),
        "transformers resize_token_embeddings": (
            [args.hf_python, "-c", TRANSFORMERS_JOB, str(src), str(theirs_out), tokens], theirs_out),
    }  # fmt: skip
    runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
    extra: list[int] = []
    for pair in range(args.pairs):
        for _, out in commands.values():
            remove(out)  # the disk holds the source and at most two outputs (7b: 43.5 GB)
        for tool, (cmd, out) in commands.items():
            before = settled_used_bytes(root) if args.fs == "xfs" and out == ours_out else 0
            child = run_child(cmd)
            if child.exit_code != 0:
                emit({"tool": tool, "error": child.output_tail[-800:]})
                return 1
            wall = child.wall_s + child.sync_s
            runs[tool].append((wall, child.peak_rss_mb))
            record = {"tool": tool, "run": f"pair {pair + 1}", "wall_s_with_sync": round(wall, 2),
                      "peak_rss_mb": round(child.peak_rss_mb, 1)}  # fmt: skip
            if before:
                extra.append(settled_used_bytes(root) - before)
                record["extra_disk_mb"] = round(extra[-1] / 1e6, 1)
            emit(record)
            if out == copy_out:
                remove(copy_out)
    emit({"part": "bytes", **compare(ours_out, theirs_out)})
    summary: dict[str, object] = {
        tool: {"wall_s": round(statistics.median(w for w, _ in r), 2),
               "peak_rss_mb": round(statistics.median(m for _, m in r), 1)}
        for tool, r in runs.items()
    }  # fmt: skip
    if extra:
        summary["ours_extra_disk_mb"] = round(statistics.median(extra) / 1e6, 1)
    emit({"shape": args.shape, "fs": args.fs, "median of pairs": args.pairs, **summary})
    remove(ours_out)
    remove(theirs_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
