"""Model references and Hugging Face ids: a reference to a local folder (a path, or an id in the
local cache), and a folder back to the id a model card names it by.

Never touches the network. A Hugging Face id ``org/name`` (optionally ``org/name@revision``) is
looked up in ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``: the
snapshot that ``refs/main`` (or the revision's ref) names, or the newest snapshot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
"""A Hub id as a model card may name it: ``org/name``, letters, digits, ``-``, ``_`` and ``.``."""
_LEGACY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
"""An id of the Hub's first models, without an organisation (``gpt2``): trusted from a cache path only."""


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` reads as ``org/name`` (``@revision`` aside) rather than as a folder path."""
    model_id = reference.partition("@")[0]
    return model_id.count("/") == 1 and not model_id.startswith((".", "/", "~"))


def resolve_model(reference: str, relative_to: Path, cache: Path | None = None) -> Path | str:
    """The folder of ``reference``: a folder URL (``s3://``, ``https://``: kept as text), a local path
    (relative ones against ``relative_to``) or an id in ``cache`` (default: :func:`hub_cache`)."""
    if reference.startswith(("s3://", "http://", "https://")):
        return reference
    try:
        local = (relative_to / reference).expanduser()
    except RuntimeError:  # ~user of a user that does not exist
        raise CheckpointError(
            f"model {reference!r}: no such user's home folder; give a local path or a Hugging Face id"
        ) from None
    if local.exists():
        return local
    model_id, _, revision = reference.partition("@")
    if not is_hub_id(reference):
        raise CheckpointError(f"model {reference!r}: no folder {local}; give a local path or a Hugging Face id")
    entry = (cache or hub_cache()) / ("models--" + model_id.replace("/", "--"))
    found = snapshot(entry, revision or "main")
    if found is None:
        raise CheckpointError(
            f"model {reference!r}: not a folder ({local}) and not in the Hugging Face cache ({entry}); "
            "download it first (huggingface-cli download) or give a local path"
        )
    return found


def snapshot(entry: Path, revision: str = "main") -> Path | None:
    """The snapshot of cache entry ``entry`` that ``revision`` names (a ref or a hash prefix); for
    ``main`` without a ref, the newest one. None when there is none."""
    snapshots = entry / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = entry / "refs" / revision
    named = _read_ref(ref)
    if named and (snapshots / named).is_dir():
        return snapshots / named
    present = [s for s in snapshots.iterdir() if s.is_dir()]  # a dangling link is no snapshot
    if revision != "main":
        matches = [s for s in present if s.name.startswith(revision)]
        return matches[0] if len(matches) == 1 else None
    candidates = sorted(present, key=lambda p: (p.stat().st_mtime, p.name))
    return candidates[-1] if candidates else None


def _read_ref(ref: Path) -> str | None:
    """The commit hash a ref file names, or None when it is missing or is not a plain hash."""
    try:
        if not ref.is_file() or ref.stat().st_size > 1024:
            return None
        text = ref.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and "/" not in text and text not in (".", "..") else None


def hub_id(source: Path | str, config: Mapping[str, Any]) -> str | None:
    """The Hugging Face id of the model in folder ``source``, or None: from a cache path
    (``models--org--name/snapshots/REV``) or a Hub ``resolve/`` URL, else from the config's
    ``_name_or_path`` when it has the shape of a Hub id (``org/name``). Only the characters Hub ids
    use, so a model card may carry it as it is."""
    if isinstance(source, str):
        hub = _HUB_URL.match(source)
        if hub and _HUB_ID.fullmatch(hub.group(1)):
            return hub.group(1)
        name = config.get("_name_or_path")
        return name if isinstance(name, str) and _HUB_ID.fullmatch(name) else None
    parts = source.resolve().parts
    for part, below in pairwise(parts):
        if part.startswith("models--") and below == "snapshots":
            model_id = part.removeprefix("models--").replace("--", "/", 1)
            if _HUB_ID.fullmatch(model_id) or _LEGACY_ID.fullmatch(model_id):
                return model_id
    name = config.get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.fullmatch(name):
        return name
    return None


def base_model_id(source: Path | str, config: Mapping[str, Any]) -> str:
    """The name a model card gives the model in ``source``: its :func:`hub_id`, else its folder's
    name (for a URL, its last part)."""
    if isinstance(source, str):
        return hub_id(source, config) or source.rstrip("/").rpartition("/")[2]
    return hub_id(source, config) or source.resolve().name


_HUB_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/resolve/")


def card_names(models: Sequence[tuple[str, Path | str, str]]) -> dict[str, str]:
    """The name a model card gives each model reference, one name per model folder.

    ``models`` holds (reference, resolved folder, published name). A reference that is the model's
    Hub id keeps its revision (``org/name@rev``); any other is named by its published name. Models
    in different folders that would share a name (two fine-tunes whose configs both name their base
    in ``_name_or_path``) are named by their folders instead, then with ``-2``, ``-3`` while even
    those are shared, so that a config naming them never merges two models into one.
    """
    first = {
        reference: reference if is_hub_id(reference) and reference.partition("@")[0] == published else published
        for reference, _, published in models
    }
    folders_of: dict[str, set[Path | str]] = {}
    for reference, folder, _ in models:
        folders_of.setdefault(first[reference], set()).add(folder)
    taken: dict[str, Path | str] = {}
    names = {}
    for reference, folder, _ in models:
        folder_name = folder.name if isinstance(folder, Path) else folder.rstrip("/").rpartition("/")[2]
        name = folder_name if len(folders_of[first[reference]]) > 1 else first[reference]
        candidate, number = name, 1
        while taken.setdefault(candidate, folder) != folder:
            number += 1
            candidate = f"{name}-{number}"
        names[reference] = candidate
    return names
