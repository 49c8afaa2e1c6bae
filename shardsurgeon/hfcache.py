"""Model references and Hugging Face ids: a reference to a local folder (a path, or an id in the
local cache), and a folder back to the id a model card names it by.

Never touches the network. A Hugging Face id ``org/name`` (optionally ``org/name@revision``) is
looked up in ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``: the
snapshot that ``refs/main`` (or the revision's ref) names, or the newest snapshot.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
"""A Hub id as a model card may name it: ``org/name``, letters, digits, ``-``, ``_`` and ``.``."""


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


def base_model_id(source: Path | str, config: dict[str, Any]) -> str:
    """The Hugging Face id to name as ``base_model``: from the cache path or Hub URL, the config, or
    the folder.

    The config's ``_name_or_path`` counts only when it has the shape of a Hub id (``org/name``).
    """
    if isinstance(source, str):
        return _url_model_id(source, config)
    for part in source.resolve().parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/", 1)
    name = config.get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.fullmatch(name):
        return name
    return source.resolve().name


_HUB_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/resolve/")


def _url_model_id(url: str, config: dict[str, Any]) -> str:
    """For a folder URL: the id in a Hub ``resolve/`` URL, else the config's, else the URL's last part."""
    hub = _HUB_URL.match(url)
    if hub and _HUB_ID.fullmatch(hub.group(1)):
        return hub.group(1)
    name = config.get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.fullmatch(name):
        return name
    return url.rstrip("/").rpartition("/")[2]
