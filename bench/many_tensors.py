"""Peak memory of planning and pruning a mixture of experts of about 100,000 tensors (issue 19).

A DeepSeek-V3-sized MoE has about 90,000 tensors; what costs memory in a plan is their count, not
their size. This generates a synthetic Qwen3-MoE checkpoint of tiny tensors (``--layers`` layers of
``--experts`` experts, three projections each, a router, attention and norms: 128 x 256 gives
99,459 tensors in 40 shards), then runs, each measured as ``bench/expand.py`` measures
(``run_child``: GNU time's peak RSS of the tool alone, wall time, an untimed sync before):

- ``prune-experts --keep 0..E/2-1 --dry-run`` (planning: headers read, plan and layout made);
- the same prune written to a folder (planning, writing, publishing);
- ``upcycle``-sized planning is not exercised: a dense model has few tensors.

``--pairs`` runs of each, median and spread printed as JSON lines; everything generated is removed.

    cd bench && PYTHONPATH=.. python many_tensors.py [--layers 128] [--experts 256] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
from pathlib import Path

from expand import run_child

HIDDEN = 8
INTERMEDIATE = 4


def layer_tensors(layer: int, experts: int) -> list[tuple[str, list[int]]]:
    prefix = f"model.layers.{layer}"
    names = [
        (f"{prefix}.input_layernorm.weight", [HIDDEN]),
        (f"{prefix}.post_attention_layernorm.weight", [HIDDEN]),
        *((f"{prefix}.self_attn.{p}_proj.weight", [HIDDEN, HIDDEN]) for p in "qkvo"),
        (f"{prefix}.self_attn.q_norm.weight", [2]),
        (f"{prefix}.self_attn.k_norm.weight", [2]),
        (f"{prefix}.mlp.gate.weight", [experts, HIDDEN]),
    ]
    for e in range(experts):
        names.append((f"{prefix}.mlp.experts.{e}.gate_proj.weight", [INTERMEDIATE, HIDDEN]))
        names.append((f"{prefix}.mlp.experts.{e}.up_proj.weight", [INTERMEDIATE, HIDDEN]))
        names.append((f"{prefix}.mlp.experts.{e}.down_proj.weight", [HIDDEN, INTERMEDIATE]))
    return names


def write_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors:
        nbytes = 2
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(data)) + data)
        f.write(os.urandom(offset))


def make_moe(folder: Path, layers: int, experts: int, shards: int = 40) -> int:
    folder.mkdir(parents=True)
    everything = [("model.embed_tokens.weight", [64, HIDDEN])]
    for layer in range(layers):
        everything += layer_tensors(layer, experts)
    everything += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [64, HIDDEN])]
    per = -(-len(everything) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = everything[i * per : (i + 1) * per]
        write_shard(folder / name, part)
        weight_map.update(dict.fromkeys((n for n, _ in part), name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "moe_intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2, "num_experts": experts,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 64, "torch_dtype": "bfloat16",
        "mlp_only_layers": [], "decoder_sparse_step": 1,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return len(everything)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="many-tensors-", dir=args.workdir))
    try:
        src = work / "src"
        count = make_moe(src, args.layers, args.experts)
        print(json.dumps({"tensors": count, "layers": args.layers, "experts": args.experts}), flush=True)
        keep = ",".join(map(str, range(args.experts // 2)))
        base = [sys.executable, "-m", "shardsurgeon", "prune-experts", "--src", str(src), "--keep", keep]
        runs = {"plan (dry run)": [*base, "--dry-run"], "prune (written)": [*base, "--out", str(work / "out"), "-q"]}
        for label, cmd in runs.items():
            walls, rss = [], []
            for _ in range(args.pairs):
                shutil.rmtree(work / "out", ignore_errors=True)
                done = run_child(cmd)  # GNU time: the tool's own peak, not this generator's
                if done.exit_code != 0:
                    print(done.output_tail, file=sys.stderr)
                    return done.exit_code
                walls.append(done.wall_s)
                rss.append(done.peak_rss_mb)
            record = {
                "run": label, "tensors": count, "wall_s": round(statistics.median(walls), 2),
                "peak_rss_mb": round(statistics.median(rss), 1), "peak_rss_mb_max": round(max(rss), 1),
                "bytes_per_tensor": round(statistics.median(rss) * 1e6 / count),
            }  # fmt: skip
            print(json.dumps(record), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
