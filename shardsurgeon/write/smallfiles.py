"""The non-weight files of a Hugging Face checkpoint folder: config, index, other files, model card.

Writes into the staging folder only; never touches tensor bytes and never writes to the source,
of which it reads only the small files (a source's model card for its license).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, safe_text
from shardsurgeon.model.checkpoint import INDEX_FILE
from shardsurgeon.plan.layout import Layout
from shardsurgeon.plan.planner import Plan
from shardsurgeon.storage.smallfile import PARSE_ERRORS, read_small
from shardsurgeon.write.local.folder import fsync_file

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
        "shardsurgeon.storage.checksums.json",
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


@dataclass(frozen=True, slots=True)
class License:
    """A license as a model card's front matter names it: an id, and for ``other`` its name and link."""

    id: str
    name: str | None = None
    link: str | None = None


@dataclass(frozen=True, slots=True)
class CardModel:
    """A model of the recipe as the card names it: in commands and configs (``name``), as a
    ``base_model`` (``hub_id``, None for a model known only by its folder), and its license."""

    name: str
    hub_id: str | None
    license: License | None


MAX_CARD_BYTES = 1 << 20
"""A source's README.md: model cards are kilobytes; only the front matter is read."""
_LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
"""A license id or name as the Hub spells them (``apache-2.0``, ``llama3.1``, ``other``)."""
_LICENSE_LINK = re.compile(r"[!-~]{1,300}")
"""A URL or a file of the repository (``LICENSE``): printable ASCII, no spaces."""


def source_license(folder: Path | str, config: Mapping[str, Any]) -> License | None:
    """The license the model in ``folder`` declares: its card's front matter (``license``, with
    ``license_name`` and ``license_link``), else its config's ``license``. None when neither names
    one in the Hub's spelling; a card that cannot be read or parsed names none. For a model by URL,
    only its config is read (its card is not fetched)."""
    card = _front_matter(folder / "README.md") if isinstance(folder, Path) else {}
    for record in (card, config):
        value = record.get("license")
        if isinstance(value, str) and _LICENSE_ID.fullmatch(value):
            name, link = record.get("license_name"), record.get("license_link")
            return License(
                value,
                name if isinstance(name, str) and _LICENSE_ID.fullmatch(name) else None,
                link if isinstance(link, str) and _LICENSE_LINK.fullmatch(link) else None,
            )
    return None


def _front_matter(card: Path) -> Mapping[str, Any]:
    """The YAML between the first two ``---`` lines of a model card; empty when there is none."""
    import yaml

    try:
        text = read_small(card, MAX_CARD_BYTES, CheckpointError, "a model card").decode("utf-8")
    except (CheckpointError, UnicodeDecodeError):
        return {}
    lines = [line.rstrip("\r") for line in text.removeprefix("\ufeff").split("\n")]
    if not lines or lines[0].rstrip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() == "---"), None)
    if end is None:
        return {}
    try:
        front = yaml.safe_load("\n".join(lines[1:end]))
    except (yaml.YAMLError, *PARSE_ERRORS):
        return {}
    return front if isinstance(front, dict) else {}


def model_card(plan: Plan, models: Sequence[CardModel], command: str, what: str, mergekit_yaml: str) -> str:
    """The README.md of the output: front matter, what was done, how, and the mergekit config.

    ``models`` are the recipe's models, the config donor first. The front matter follows the Hub's
    conventions: ``base_model`` lists Hub ids only, as mergekit's cards do (the Hub links and
    checks the field; a model known only by its folder is named in the text);
    ``base_model_relation: merge``, since a passthrough merge, of one model or several, is neither
    a fine-tune nor an adapter nor a quantization; and a ``license`` only when every model names
    the same one: a license taken from one model would claim the others' weights for it, so
    differing or unknown licenses are left to the publisher and the text says which model names
    which.

    Valid UTF-8 and valid YAML whatever the names hold: the front matter is dumped by the YAML
    library from ids and license names of the Hub's characters, the title and description are kept
    on their line, and bytes of a name that are not UTF-8 are written as ``\\xNN``.
    """
    import yaml  # loaded only when a card is written

    ids = list(dict.fromkeys(m.hub_id for m in models if m.hub_id))
    tags = ["shardsurgeon", "mergekit", "merge"] + (
        ["block-expansion"] if any(s.inserted for s in plan.recipe.layers) else []
    )
    front: dict[str, Any] = {}
    if ids:
        front["base_model"] = ids[0] if len(ids) == 1 else ids
    front["library_name"] = "transformers"
    if ids:
        front["base_model_relation"] = "merge"
    common, license_text = _license(models)
    if common is not None:
        front["license"] = common.id
        front.update(
            {key: value for key, value in (("license_name", common.name), ("license_link", common.link)) if value}
        )
    front["tags"] = tags
    title = safe_text(" + ".join(_utf8(m.name) for m in models), limit=None)
    what = safe_text(what, limit=None) + (f"\n\n{license_text}" if license_text else "")
    command, mergekit_yaml = _utf8(command), _utf8(mergekit_yaml.rstrip())
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=False, width=1 << 20)}---

# {title}, {plan.output_layers} layers

{what}

Made with [shardsurgeon](https://pypi.org/project/shardsurgeon/) by:

{_fence(command)}sh
{command}
{_fence(command)}

The same checkpoint as a mergekit passthrough config:

{_fence(mergekit_yaml)}yaml
{mergekit_yaml}
{_fence(mergekit_yaml)}
"""


def _license(models: Sequence[CardModel]) -> tuple[License | None, str]:
    """The license the output carries, if any, and a sentence saying where it comes from or why none."""
    licenses = {m.license for m in models}
    if licenses == {None}:
        return None, ""
    if len(licenses) == 1:
        (common,) = licenses
        assert common is not None
        whose = "the base model's card or config" if len(models) == 1 else "the base models, which all name it"
        return common, f"License: {common.id}, carried over from {whose}."
    named = "; ".join(f"{_utf8(m.name)}: {m.license.id if m.license else 'none found'}" for m in models)
    return None, (
        f"No license is set: the base models name different licenses ({safe_text(named, limit=None)}). "
        "Choose the license this checkpoint may carry before publishing it."
    )


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
    from shardsurgeon.storage.remote import RemoteFolder

    remote = RemoteFolder(url)
    for name in remote.file_names(KNOWN_OTHER_FILES):
        if carried_over(name):
            data = remote.read_small(name, MAX_OTHER_FILE_BYTES, "a file carried over to the output")
            if data is not None:
                yield name, data
