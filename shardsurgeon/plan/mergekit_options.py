"""mergekit-yaml's command-line flags, and what each means for ``shardsurgeon merge``. Pure data.

Read from mergekit's ``options.py`` (``MergeOptions``: every bool field is a ``--name/--no-name``
pair) and from where each option is used. A flag that cannot change a passthrough merge's output
here is accepted with a note; one that would change it in a way shardsurgeon does not do is
refused. ``--out-shard-size``, ``--transformers-cache`` and ``--quiet`` are real options of
``merge`` and are not in this table. The CLI builds hidden click options from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardsurgeon.errors import RecipeError
from shardsurgeon.units import MAX_SIZE_BYTES, MAX_SIZE_DIGITS


@dataclass(frozen=True, slots=True)
class MergekitFlag:
    """One spelling of a mergekit-yaml flag; ``value`` names its argument when it takes one.

    ``why`` completes "FLAG has no effect here: ..." or, when ``refused``, "FLAG is not supported: ...".
    """

    flag: str
    why: str
    value: str | None = None
    refused: bool = False


_DEVICE = (
    "it picks the device mergekit computes on; shardsurgeon computes casts and scales on the CPU, to the same bits"
)
_MEMORY = "it keeps mergekit's tensors on the accelerator; shardsurgeon holds no tensor in memory, it streams"
_THREADS = "it sets mergekit's threads; shardsurgeon streams with its own I/O thread, to the same bytes"
_LAZY = (
    "it loads pickled .bin weights lazily; shardsurgeon reads safetensors only, headers first, tensors as they are "
    "written"
)
_CRIMES = (
    "it lets mergekit mix architectures by name; shardsurgeon checks that the models' tensor names and shapes agree "
    "instead"
)
_REMOTE = "it runs a model's own Python code; shardsurgeon reads config.json as data and runs no model code"
_CLONE = "it copies torch tensors before saving; shardsurgeon writes every tensor from its source bytes"
_LORA = "it applies only to model+lora references, which shardsurgeon refuses in a config"

MERGEKIT_FLAGS: tuple[MergekitFlag, ...] = (
    MergekitFlag("--cuda", _DEVICE),
    MergekitFlag("--no-cuda", _DEVICE),
    MergekitFlag("--device", _DEVICE, "DEVICE"),
    MergekitFlag("--read-to-gpu", _DEVICE),
    MergekitFlag("--no-read-to-gpu", _DEVICE),
    MergekitFlag("--multi-gpu", _DEVICE),
    MergekitFlag("--no-multi-gpu", _DEVICE),
    MergekitFlag("--gpu-rich", "it stands for --cuda --low-cpu-memory --read-to-gpu --multi-gpu, all device choices"),
    MergekitFlag("--low-cpu-memory", _MEMORY),
    MergekitFlag("--no-low-cpu-memory", _MEMORY),
    MergekitFlag("--num-threads", _THREADS, "N"),
    MergekitFlag("-j", _THREADS, "N"),
    MergekitFlag("--async-write", _THREADS),
    MergekitFlag("--no-async-write", _THREADS),
    MergekitFlag("--write-threads", _THREADS, "N"),
    MergekitFlag("--lazy-unpickle", _LAZY),
    MergekitFlag("--no-lazy-unpickle", _LAZY),
    MergekitFlag("--clone-tensors", _CLONE),
    MergekitFlag("--no-clone-tensors", _CLONE),
    MergekitFlag("--allow-crimes", _CRIMES),
    MergekitFlag("--no-allow-crimes", _CRIMES),
    MergekitFlag("--trust-remote-code", _REMOTE),
    MergekitFlag("--no-trust-remote-code", _REMOTE),
    MergekitFlag("--random-seed", "it seeds randomized merge methods; a passthrough merge has no randomness", "N"),
    MergekitFlag("--lora-merge-cache", _LORA, "DIR"),
    MergekitFlag("--lora-merge-dtype", _LORA, "DTYPE"),
    MergekitFlag(
        "--copy-tokenizer", "shardsurgeon always copies the base model's tokenizer files, as mergekit does by default"
    ),
    MergekitFlag("--write-model-card", "shardsurgeon always writes README.md, as mergekit does by default"),
    MergekitFlag("--safe-serialization", "shardsurgeon always writes safetensors, as mergekit does by default"),
    MergekitFlag("--no-quiet", "it is the default; shardsurgeon shows progress unless -q"),
    MergekitFlag(
        "--no-copy-tokenizer",
        "shardsurgeon always copies the base model's tokenizer and other files (mergekit would leave the tokenizer "
        "out); drop the flag, and delete the files from the output if you do not want them",
        refused=True,
    ),
    MergekitFlag(
        "--no-write-model-card",
        "shardsurgeon always writes the model card README.md; drop the flag, and delete README.md from the output "
        "if you do not want it",
        refused=True,
    ),
    MergekitFlag(
        "--no-safe-serialization",
        "shardsurgeon writes safetensors only (mergekit would write pickled pytorch_model .bin files); drop the flag",
        refused=True,
    ),
)

_KMB = re.compile(r"^\s*([0-9]+)([kmb]?)\s*$", re.IGNORECASE | re.ASCII)
_KMB_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_out_shard_size(text: str) -> int:
    """``--out-shard-size`` as mergekit reads it: a whole number, optionally followed by K, M or B.

    mergekit's ``parse_kmb`` multiplies by a thousand, a million or a billion, and its writer
    compares the result with each shard's tensor bytes (``numel() * element_size()``), as
    ``--max-shard-size`` is compared here: so ``5B`` is 5,000,000,000 bytes, whatever mergekit's
    help calls it. 0 turns sharding off in mergekit (one file), so it does here.
    """
    match = _KMB.match(text) if len(text) <= MAX_SIZE_DIGITS else None
    if not match:
        shown = text if len(text) <= MAX_SIZE_DIGITS else text[:MAX_SIZE_DIGITS] + "..."
        raise RecipeError(
            f"--out-shard-size {shown!r}: expected a whole number of bytes with an optional K, M or B (thousand, "
            "million, billion) as mergekit reads it, such as 5B; for units such as GB or GiB use --max-shard-size"
        )
    nbytes = int(match[1]) * _KMB_UNITS[match[2].lower()]
    if nbytes > MAX_SIZE_BYTES:
        raise RecipeError(f"--out-shard-size {text.strip()!r}: must be at most {MAX_SIZE_BYTES} bytes")
    return nbytes or MAX_SIZE_BYTES
