"""``shardsurgeon moe CONFIG`` against mergekit-moe 0.1.5 on the same configs (issue 19).

mergekit-moe needs torch and is not a dependency: install it in its own environment
(``python3 -m venv mk && mk/bin/pip install mergekit==0.1.5 torch==2.13.0``) and pass its
``mergekit-moe``. Two parts, each printing JSON lines:

1. **bytes**, on tiny models made here with transformers (a Mistral-shaped base and two "fine-tunes"
   of other weights, bf16, each with a word-level tokenizer, which mergekit-moe insists on): both
   tools run ``gate_mode: random`` with experts [coder, writer, base]. Every tensor but the
   experts and routers must have the same name and bytes; expert e's projections must be the bytes
   of mergekit's fused tensors (``gate_up_proj[e]`` is gate rows then up rows, ``down_proj[e]``);
   routers are compared by shape only (each tool draws its own). The config keys that differ are
   printed.
2. **time and memory**, on the ``1b`` shape of ``make_checkpoint.py`` (TinyLlama-shaped) with 8
   experts all the base model (mergekit-moe's ``--i-understand-this-is-not-useful-without-training``),
   ``--pairs`` alternating pairs, each a child process measured by GNU time (wall, peak RSS).

    python bench/compare_mergekit_moe.py --mergekit-moe /path/to/mk/bin/mergekit-moe [--pairs 3]
        [--workdir DIR] [--skip-1b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from compare_mergekit import read_tensors
from expand import remove, run_child
from make_checkpoint import SHAPES, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)} | {"<unk>": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="t1", eos_token="t2")
    fast.save_pretrained(folder)


def tiny_models(root: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import transformers
    from compat_models import _LLAMA_LIKE, save_tiny_model

    config = transformers.MistralConfig(**_LLAMA_LIKE)
    for name, seed in (("base", 0), ("coder", 1), ("writer", 2)):
        save_tiny_model(config, root / name, seed=seed, dtype=torch.bfloat16)
        write_tokenizer(root / name)


MOE_YAML = """base_model: {root}/base
gate_mode: random
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: {root}/coder
  - source_model: {root}/writer
  - source_model: {root}/base
"""
"""Absolute paths: mergekit-moe reads relative ones from its working folder, not the config's."""


def compare_bytes(root: Path, mergekit_moe: str) -> int:
    tiny_models(root)
    (root / "moe.yml").write_text(MOE_YAML.format(root=root))
    theirs, ours = root / "mergekit-out", root / "ours"
    child = run_child([mergekit_moe, str(root / "moe.yml"), str(theirs)])
    if child.exit_code != 0:
        emit({"error": "mergekit-moe failed", "tail": child.output_tail})
        return 1
    child = run_child([sys.executable, "-m", "shardsurgeon", "moe", str(root / "moe.yml"), str(ours), "-q"])
    if child.exit_code != 0:
        emit({"error": "shardsurgeon moe failed", "tail": child.output_tail})
        return 1
    a, b = read_tensors(theirs), read_tensors(ours)
    experts = [n for n in a if ".mlp.experts." in n]
    routers = [n for n in a if n.endswith(".mlp.gate.weight")]
    plain = sorted(set(a) - set(experts) - set(routers))
    ours_plain = sorted(n for n in b if "block_sparse_moe" not in n)
    differing = [n for n in plain if a[n] != b.get(n)]
    expert_mismatches = []
    for name in experts:
        _, shape, data = a[name]
        layer = name.split(".")[2]
        count = shape[0]
        per = len(data) // count
        for e in range(count):
            chunk = data[e * per : (e + 1) * per]
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            if name.endswith("gate_up_proj"):
                mine = b[f"{prefix}.w1.weight"][2] + b[f"{prefix}.w3.weight"][2]
            else:
                mine = b[f"{prefix}.w2.weight"][2]
            if chunk != mine:
                expert_mismatches.append(f"{name}[{e}]")
    router_shapes = all(a[n][1] == b[n.replace(".mlp.", ".block_sparse_moe.")][1] for n in routers)
    config_a = json.loads((theirs / "config.json").read_text())
    config_b = json.loads((ours / "config.json").read_text())
    keys = sorted(set(config_a) | set(config_b))
    config_diff = {k: [config_a.get(k, "(absent)"), config_b.get(k, "(absent)")] for k in keys
                   if config_a.get(k, "(absent)") != config_b.get(k, "(absent)")}  # fmt: skip
    emit({
        "part": "bytes", "mergekit_tensors": len(a), "ours_tensors": len(b), "plain_tensors": len(plain),
        "plain_names_equal": plain == ours_plain, "plain_bytes_differing": differing,
        "fused_expert_tensors": len(experts), "expert_slices_differing": expert_mismatches,
        "router_shapes_equal": router_shapes, "config_differences (mergekit, ours)": config_diff,
    })  # fmt: skip
    return 0 if not differing and not expert_mismatches and router_shapes and plain == ours_plain else 1


def compare_1b(root: Path, mergekit_moe: str, pairs: int) -> None:
    shape = SHAPES["1b"]
    src = make_checkpoint(shape, root / "tinyllama")
    write_tokenizer(src)
    config = root / "moe-1b.yml"
    config.write_text(f"base_model: {src}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n"
                      + f"  - source_model: {src}\n" * 8)  # fmt: skip
    ours_cmd = [sys.executable, "-m", "shardsurgeon", "moe", str(config), str(root / "ours-1b"), "-q"]
    theirs_cmd = [
        mergekit_moe,
        str(config),
        str(root / "mergekit-1b"),
        "--i-understand-this-is-not-useful-without-training",
    ]
    results: dict[str, list[tuple[float, float]]] = {"shardsurgeon moe": [], "mergekit-moe": []}
    for pair in range(pairs):
        for tool, cmd in (("shardsurgeon moe", ours_cmd), ("mergekit-moe", theirs_cmd)):
            remove(root / "ours-1b")
            remove(root / "mergekit-1b")
            child = run_child(cmd)
            if child.exit_code != 0:
                emit({"tool": tool, "error": child.output_tail[-500:]})
                return
            wall = child.wall_s + child.sync_s
            results[tool].append((wall, child.peak_rss_mb))
            emit({"tool": tool, "run": f"pair {pair + 1}", "wall_s_with_sync": round(wall, 2),
                  "peak_rss_mb": round(child.peak_rss_mb, 1)})  # fmt: skip
    remove(root / "ours-1b")
    remove(root / "mergekit-1b")
    summary = {
        tool: {"wall_s": round(statistics.median(w for w, _ in runs), 2),
               "peak_rss_mb": round(statistics.median(r for _, r in runs), 1)}
        for tool, runs in results.items()
    }  # fmt: skip
    emit({"part": "1b, 8 experts", "median of pairs": pairs, **summary})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-moe", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare-moe-", dir=args.workdir))
    try:
        status = compare_bytes(work, args.mergekit_moe)
        if not args.skip_1b:
            compare_1b(work, args.mergekit_moe, args.pairs)
        return status
    finally:
        remove(work)


if __name__ == "__main__":
    sys.exit(main())
