"""A source's tokenizer as files and as the ``tokenizers`` library reads it: the token files'
bytes, the ids a tokenizer and the configs use, a text's ids. Reads only.

The files that name token ids are :data:`TOKEN_FILES`; a vocabulary change rewrites exactly these
(plan/vocab.py). ``tokenizer.json`` is read by the ``tokenizers`` library (Rust, no torch), never
by hand: an id is what the library says it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from shardsurgeon.errors import CheckpointError, RecipeError, safe_text
from shardsurgeon.model.otherfiles import KNOWN_OTHER_FILES, MAX_OTHER_FILE_BYTES
from shardsurgeon.storage.smallfile import PARSE_ERRORS, read_small

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKEN_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE, GENERATION_CONFIG_FILE)
"""The files of a checkpoint that name tokens or token ids."""
SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
"""The files of a slow (Python or SentencePiece) tokenizer, which only their own libraries read."""

ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id", "sep_token_id")
"""The best-known keys of config.json and generation_config.json that hold token ids (an id, or a
list of ids); :func:`is_id_key` names every such key."""
ID_KEY_SUFFIXES = ("_token_id", "_token_ids", "_token_index")
"""Multimodal and generation configs name ids by these suffixes too: image_token_id (Llava, Qwen2-VL),
image_token_index/boi_token_index (Gemma 3), forced_eos_token_id (BART, NLLB), video_token_id..."""
ID_LIST_KEYS = ("suppress_tokens", "begin_suppress_tokens")
"""Lists of ids in a generation config (Whisper)."""


def is_id_key(key: str) -> bool:
    """Whether a config key holds a token id or a list of them."""
    return key in ID_KEYS or key in ID_LIST_KEYS or key.endswith(ID_KEY_SUFFIXES)


@dataclass(frozen=True)
class TokenFiles:
    """The token files of a source (name -> bytes, those it has), and the slow tokenizer files it has."""

    where: Path | str
    files: Mapping[str, bytes]
    slow_files: tuple[str, ...]

    def json(self, name: str) -> Any:
        """The JSON of file ``name`` (None if the source has none)."""
        raw = self.files.get(name)
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, *PARSE_ERRORS) as e:
            raise CheckpointError(f"{_at(self.where, name)}: cannot read JSON ({safe_text(str(e), 80)})") from None

    @cached_property
    def tokenizer(self) -> Any:
        """The source's ``tokenizers.Tokenizer``, or None without a tokenizer.json."""
        raw = self.files.get(TOKENIZER_FILE)
        if raw is None:
            return None
        return load_tokenizer(raw, _at(self.where, TOKENIZER_FILE))

    def need_tokenizer(self, flag: str) -> Any:
        """The tokenizer, or a one-line refusal that says why ``flag`` needs one."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.slow_files:
            raise RecipeError(
                f"{flag}: {safe_text(str(self.where))} has only a slow tokenizer ({', '.join(self.slow_files)}) and no "
                f"{TOKENIZER_FILE}; convert it once with transformers (AutoTokenizer.from_pretrained(...)"
                ".save_pretrained(...)) so its ids can be read and kept in step with the weights"
            )
        raise RecipeError(f"{flag}: {safe_text(str(self.where))} has no {TOKENIZER_FILE}; the tokens cannot be read")

    @property
    def size(self) -> int | None:
        """Tokens the tokenizer knows, added ones included (None without one)."""
        return None if self.tokenizer is None else int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def used_ids(self, config: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
        """Every token id the tokenizer and the configs name, with where: the ids a remap must move
        and a trim must keep."""
        yield from self.tokenizer_ids()
        yield from self.config_ids(config)

    def ids_from(self, first: int, config: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
        """The ids from ``first`` on that ``config`` (config.json), the generation config, the
        tokenizer or its config use, with where (a config's name first), highest first: a lookup per
        id, not a dictionary of the whole vocabulary (which costs about 500 bytes a token)."""
        decoder = (self.json(TOKENIZER_CONFIG_FILE) or {}).get("added_tokens_decoder") or {}
        named = {int(k): f"added_tokens_decoder of {TOKENIZER_CONFIG_FILE}" for k in decoder if str(k).isdigit()}
        configs = {token_id: where for where, token_id in self.config_ids(config)}
        tokenizer = self.tokenizer
        end = max(first, self.size or 0, *(token_id + 1 for token_id in (*named, *configs)))
        for token_id in range(end - 1, first - 1, -1):
            token = tokenizer.id_to_token(token_id) if tokenizer is not None else None
            if token_id in configs:
                yield configs[token_id], token_id
            elif token is not None:
                yield f"token {token!r} of {TOKENIZER_FILE}", token_id
            elif token_id in named:
                yield named[token_id], token_id

    def release_tokenizer(self) -> None:
        """Let the source's tokenizer go (it is read again if asked for): a large vocabulary costs
        tens of MB in the library, and a second tokenizer is about to be made."""
        self.__dict__.pop("tokenizer", None)

    def tokenizer_ids(self) -> Iterator[tuple[str, int]]:
        """Every token id the tokenizer names (added tokens too), with where."""
        if self.tokenizer is not None:
            for token, token_id in self.tokenizer.get_vocab(with_added_tokens=True).items():
                yield f"token {token!r} of {TOKENIZER_FILE}", int(token_id)
        decoder = (self.json(TOKENIZER_CONFIG_FILE) or {}).get("added_tokens_decoder") or {}
        for key in decoder:
            if str(key).isdigit():
                yield f"added_tokens_decoder of {TOKENIZER_CONFIG_FILE}", int(key)

    def config_ids(self, config: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
        """Every token id ``config`` (config.json) and the generation config name, with where."""
        for where, record in (("config.json", config), (GENERATION_CONFIG_FILE, self.json(GENERATION_CONFIG_FILE))):
            for key, value in config_ids(record or {}):
                yield f"{key} of {where}", value


def config_ids(record: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
    """The token ids a config names (:func:`is_id_key`, also in a nested ``text_config``)."""
    for key in [k for k in record if isinstance(k, str) and is_id_key(k)]:
        value = record.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                yield key, item
    if isinstance(record.get("text_config"), dict):
        yield from ((f"text_config.{k}", v) for k, v in config_ids(record["text_config"]))


def moved_ids(record: Mapping[str, Any], moved: Mapping[int, int]) -> dict[str, Any]:
    """The token-id keys of a config with each id moved (a planner's checks keep every one mapped)."""
    out: dict[str, Any] = {}
    for key in [k for k in record if isinstance(k, str) and is_id_key(k)]:
        value = record.get(key)
        if isinstance(value, list):
            out[key] = [moved.get(v, v) if isinstance(v, int) else v for v in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = moved.get(value, value)
    return out


def load_tokenizer(raw: bytes | str, shown: str) -> Any:
    """A ``tokenizers.Tokenizer`` from the text of a tokenizer.json."""
    from tokenizers import Tokenizer  # loads only where tokens are read

    try:
        return Tokenizer.from_str(raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, Exception) as e:  # the library raises a bare Exception on bad JSON
        raise CheckpointError(f"{shown}: the tokenizers library cannot read it ({safe_text(str(e), 100)})") from None


def read_token_files(folder: Path | str) -> TokenFiles:
    """The token files of the checkpoint at ``folder`` (a local folder or a folder URL)."""
    if isinstance(folder, str):
        return _remote_token_files(folder)
    files = {}
    for name in TOKEN_FILES:
        if (folder / name).exists():
            files[name] = read_small(folder / name, MAX_OTHER_FILE_BYTES, CheckpointError, "a tokenizer file")
    return TokenFiles(folder, files, tuple(n for n in SLOW_TOKENIZER_FILES if (folder / n).exists()))


def _remote_token_files(url: str) -> TokenFiles:
    from shardsurgeon.storage.remote import RemoteFolder  # obstore loads only for a source by URL

    remote = RemoteFolder(url)
    names = remote.file_names(KNOWN_OTHER_FILES)
    files = {}
    for name in TOKEN_FILES:
        if name in names:
            data = remote.read_small(name, MAX_OTHER_FILE_BYTES, "a tokenizer file")
            if data is not None:
                files[name] = data
    return TokenFiles(url, files, tuple(n for n in SLOW_TOKENIZER_FILES if n in names))


def _at(where: Path | str, name: str) -> str:
    return safe_text(f"{str(where).rstrip('/')}/{name}")
