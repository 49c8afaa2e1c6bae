"""The non-weight files of a Hugging Face checkpoint folder: config, index, other files, model card.

Writes into the staging folder only; never touches tensor bytes and never writes to the source.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardsurgeon.checkpoint import INDEX_FILE
from shardsurgeon.errors import safe_text
from shardsurgeon.layout import Layout
from shardsurgeon.output import fsync_file
from shardsurgeon.plan import Plan

KNOWN_OTHER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)
"""What a source by URL on a web server, which cannot be listed, may hold besides weights and config."""
MAX_OTHER_FILE_BYTES = 256 * 1024 * 1024

NOT_COPIED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".ot", ".tflite", ".onnx",
    ".npz", ".pb", ".mlmodel", ".mlpackage", ".tar", ".zip",
)  # fmt: skip
"""Weights in any format: they describe the source's layers, not the output's."""
NOT_COPIED_NAMES = frozenset(
    {
        "config.json", "README.md", "model.safetensors.index.json", "params.json", "mergekit_config.yml",
        "shardsurgeon.checksums.json",
    }
)  # fmt: skip
"""Rewritten here (config, index, card), or stale: Mistral's native ``params.json`` counts layers."""


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_file(path)


def write_index(folder: Path, layout: Layout) -> None:
    """The index json, only when there is more than one shard (like transformers)."""
    if len(layout.shards) == 1:
        return
    weight_map = {p.tensor.name: s.name for s in layout.shards for p in s.tensors}
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": layout.total_size}, "weight_map": weight_map})


def other_files(source: Path) -> list[Path]:
    """Top-level files of the source to carry over as they are: tokenizer, generation config..."""
    return sorted(entry for entry in source.iterdir() if entry.is_file() and carried_over(entry.name))


def carried_over(name: str) -> bool:
    """Whether a source file of this name is copied to the output as it is."""
    return (
        not name.startswith(".")
        and name not in NOT_COPIED_NAMES
        and not name.endswith(NOT_COPIED_SUFFIXES)
        and not name.startswith("pytorch_model")
    )


def copy_other_files(source: Path | str, folder: Path) -> list[str]:
    if isinstance(source, str):
        return _fetch_other_files(source, folder)
    copied = []
    for entry in other_files(source):
        shutil.copyfile(entry, folder / entry.name)
        fsync_file(folder / entry.name)
        copied.append(entry.name)
    return copied


def model_card(plan: Plan, base_models: list[str], command: str, what: str, mergekit_yaml: str) -> str:
    """The README.md of the output: front matter, what was done, how, and the mergekit config.

    Valid UTF-8 and valid YAML whatever the names hold: the front matter is dumped by the YAML
    library, the title and description are kept on their line, and bytes of a name that are not
    UTF-8 are written as ``\\xNN``.
    """
    import yaml  # loaded only when a card is written

    names = [_utf8(name) for name in base_models]
    tags = ["shardsurgeon", "mergekit", "merge"] + (
        ["block-expansion"] if any(s.inserted for s in plan.recipe.layers) else []
    )
    front = {"base_model": names[0] if len(names) == 1 else names, "library_name": "transformers", "tags": tags}
    title = safe_text(" + ".join(names), limit=None)
    command, mergekit_yaml = _utf8(command), _utf8(mergekit_yaml.rstrip())
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=False, width=1 << 20)}---

# {title}, {plan.output_layers} layers

{safe_text(what, limit=None)}

Made with [shardsurgeon](https://pypi.org/project/shardsurgeon/) by:

{_fence(command)}sh
{command}
{_fence(command)}

The same checkpoint as a mergekit passthrough config:

{_fence(mergekit_yaml)}yaml
{mergekit_yaml}
{_fence(mergekit_yaml)}
"""


def _utf8(text: str) -> str:
    """``text`` with lone surrogates (bytes of a name that is not UTF-8) written as escapes."""
    return "".join(safe_text(char) if "\ud800" <= char <= "\udfff" else char for char in text)


def _fence(text: str) -> str:
    """A Markdown code fence longer than any run of backticks in ``text``, so ``text`` cannot close it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _fetch_other_files(url: str, folder: Path) -> list[str]:
    copied = []
    for name, data in remote_other_files(url):
        (folder / name).write_bytes(data)
        fsync_file(folder / name)
        copied.append(name)
    return copied


def remote_other_files(url: str) -> Iterator[tuple[str, bytes]]:
    """The other files of a source by URL, name and bytes: those an S3 prefix lists, or for a web
    server (which lists nothing) the usual tokenizer and generation files, each that exists."""
    from shardsurgeon.remote import RemoteFolder

    remote = RemoteFolder(url)
    for name in remote.file_names(KNOWN_OTHER_FILES):
        if carried_over(name):
            data = remote.read_small(name, MAX_OTHER_FILE_BYTES, "a file carried over to the output")
            if data is not None:
                yield name, data
