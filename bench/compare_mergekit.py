"""Compare ``shardsurgeon merge CONFIG`` with mergekit's own output of the same config, tensor by tensor.

mergekit is not a dependency (it needs torch): run ``mergekit-yaml CONFIG MERGEKIT_OUT`` in its own
environment first, then

    python bench/compare_mergekit.py CONFIG MERGEKIT_OUT [--ours DIR]

Prints one JSON line: tensor counts, the names, dtypes, shapes or bytes that differ, and how many
tensors differ only by the sign of zeros (mergekit's ``x * 0.0`` keeps ``-0.0`` for negative x,
ours writes ``+0.0``). Exit status 0 when everything else is identical.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NEGATIVE_ZERO = {"BF16": (np.uint16, 0x8000), "F16": (np.uint16, 0x8000), "F32": (np.uint32, 0x80000000)}


def read_tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor of every shard in ``folder``: dtype, shape and bytes (small checkpoints only)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            tensors[name] = (info["dtype"], info["shape"], blob[8 + n + begin : 8 + n + end])
    return tensors


def without_negative_zeros(dtype: str, data: bytes) -> bytes:
    if dtype not in NEGATIVE_ZERO:
        return data
    bits, negative_zero = NEGATIVE_ZERO[dtype]
    values = np.frombuffer(data, bits).copy()
    values[values == negative_zero] = 0
    return values.tobytes()


def compare(theirs: Path, ours: Path) -> dict[str, object]:
    a, b = read_tensors(theirs), read_tensors(ours)
    differ, sign_of_zero = [], 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name][:2] != b[name][:2]:
            differ.append(name)
        elif a[name][2] != b[name][2]:
            if without_negative_zeros(*a[name][::2]) == without_negative_zeros(*b[name][::2]):
                sign_of_zero += 1
            else:
                differ.append(name)
    return {
        "mergekit_tensors": len(a),
        "our_tensors": len(b),
        "differ": differ,
        "differ_only_by_zero_sign": sign_of_zero,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("mergekit_out", type=Path)
    parser.add_argument("--ours", type=Path, help="our output folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ours = args.ours or Path(scratch) / "ours"
        command = [sys.executable, "-m", "shardsurgeon", "merge", str(args.config), "--out", str(ours), "--force", "-q"]
        subprocess.run(command, check=True)
        result = {"config": str(args.config), **compare(args.mergekit_out, ours)}
    print(json.dumps(result))
    sys.exit(1 if result["differ"] else 0)


if __name__ == "__main__":
    main()
