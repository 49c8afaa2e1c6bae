"""The license a source model declares: its model card's front matter, else its config. Reads only
the source's small files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError
from shardsurgeon.names import CARD_FILE
from shardsurgeon.storage.smallfile import PARSE_ERRORS, read_small


@dataclass(frozen=True, slots=True)
class License:
    """A license as a model card's front matter names it: an id, and for ``other`` its name and link."""

    id: str
    name: str | None = None
    link: str | None = None


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
    card = _front_matter(folder / CARD_FILE) if isinstance(folder, Path) else {}
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
