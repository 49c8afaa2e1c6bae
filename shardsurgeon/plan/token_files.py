"""The token files of an output whose vocabulary changed: each file that names token ids, made to
agree with the rows of the weights, and checked with the ``tokenizers`` library.

- tokens added: ``tokenizer.json`` gains them through the library (which gives their ids), the
  ``added_tokens_decoder`` of ``tokenizer_config.json`` and ``added_tokens.json`` name them, and
  special ones join ``additional_special_tokens``;
- ids moved (a remap): the vocabulary, the added tokens and the post-processor's special tokens of
  ``tokenizer.json``, the decoder entries, ``added_tokens.json`` and the ids of
  ``generation_config.json`` move with their rows; a slow tokenizer's files, which only their own
  libraries could renumber, are left out of the output rather than left disagreeing;
- rows padded or trimmed past every token: no token file changes.

Every new tokenizer.json is read back with the library: each token's id is the one its row has,
and each added token encodes to its own id. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from shardsurgeon.errors import PlanError, safe_text
from shardsurgeon.model.tokenizer import (
    ADDED_TOKENS_FILE,
    GENERATION_CONFIG_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenFiles,
    load_tokenizer,
    moved_ids,
)
from shardsurgeon.plan.recipe import NewToken, SourceRows, VocabChange


def added_ids(files: TokenFiles, tokens: Sequence[str], special: bool) -> list[tuple[str, int]]:
    """The ids the ``tokenizers`` library gives ``tokens`` added to the source's tokenizer."""
    tokenizer = _with_added(files, [NewToken(t, -1, special) for t in tokens])
    return [(t, int(tokenizer.token_to_id(t))) for t in tokens]  # the library's own ids, asked once


def _with_added(files: TokenFiles, tokens: Sequence[NewToken]) -> Any:
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(files.files[TOKENIZER_FILE], TOKENIZER_FILE)
    for special in (False, True):
        batch = [AddedToken(t.content, special=special, normalized=not special) for t in tokens if t.special == special]
        if batch:
            (tokenizer.add_special_tokens if special else tokenizer.add_tokens)(batch)
    return tokenizer


def token_files(change: VocabChange, files: TokenFiles) -> dict[str, bytes | None]:
    """The token files the output holds instead of the source's (None: left out)."""
    out: dict[str, bytes | None] = {}
    if change.tokens:
        out |= _added(change.tokens, files)
    if change.moves_ids() or _drops_tokens(change, files):
        out |= _moved(change, files)
    return out


def _drops_tokens(change: VocabChange, files: TokenFiles) -> bool:
    tokenizer = files.tokenizer
    first = change.rows[0]
    if tokenizer is None or (isinstance(first, SourceRows) and first.first == 0 and first.count >= (files.size or 0)):
        return False  # every token's row stays where it is
    kept = change.id_map()
    return any(int(i) not in kept for i in tokenizer.get_vocab(with_added_tokens=True).values())


def _added(tokens: Sequence[NewToken], files: TokenFiles) -> dict[str, bytes | None]:
    tokenizer = _with_added(files, tokens)
    for token in tokens:
        given = tokenizer.token_to_id(token.content)
        if given != token.id:
            raise PlanError(
                f"{TOKENIZER_FILE}: the tokenizers library gives {safe_text(token.content, 40)} id {given}, the plan "
                f"says {token.id}; the source's tokenizer changed since the plan was made: plan again"
            )
    text = tokenizer.to_str(pretty=True)
    del tokenizer  # one tokenizer at a time: a large vocabulary costs tens of MB each
    _check_encodes(load_tokenizer(text, TOKENIZER_FILE), tokens)
    out: dict[str, bytes | None] = {TOKENIZER_FILE: text.encode()}
    entries = {str(t.id): _decoder_entry(t) for t in tokens}
    specials = [t.content for t in tokens if t.special]
    config = files.json(TOKENIZER_CONFIG_FILE)
    if isinstance(config, dict):
        config = {**config, "added_tokens_decoder": {**(config.get("added_tokens_decoder") or {}), **entries}}
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if specials and isinstance(config.get(key), list):
                config[key] = [*config[key], *(s for s in specials if s not in config[key])]
        out[TOKENIZER_CONFIG_FILE] = _dumps(config)
    special_map = files.json(SPECIAL_TOKENS_FILE)
    if isinstance(special_map, dict) and specials:
        present = special_map.get("additional_special_tokens") or []
        shown = {item if isinstance(item, str) else item.get("content") for item in present}
        special_map = {**special_map, "additional_special_tokens": [*present, *(s for s in specials if s not in shown)]}
        out[SPECIAL_TOKENS_FILE] = _dumps(special_map)
    added_file = files.json(ADDED_TOKENS_FILE)
    if isinstance(added_file, dict):
        out[ADDED_TOKENS_FILE] = _dumps({**added_file, **{t.content: t.id for t in tokens}})
    return out


def _check_encodes(tokenizer: Any, tokens: Sequence[NewToken]) -> None:
    for token in tokens:
        ids = tokenizer.encode(token.content, add_special_tokens=False).ids
        if ids != [token.id]:
            raise PlanError(
                f"{TOKENIZER_FILE}: the new token {safe_text(token.content, 40)} encodes to {ids[:8]}, not to its "
                f"id {token.id}; the tokenizer's normalizer changes it: add the token as it reads after "
                "normalization, or as --special"
            )


def _decoder_entry(token: NewToken) -> dict[str, Any]:
    return {
        "content": token.content, "lstrip": False, "normalized": not token.special, "rstrip": False,
        "single_word": False, "special": token.special,
    }  # fmt: skip


def _moved(change: VocabChange, files: TokenFiles) -> dict[str, bytes | None]:
    moved = change.id_map()
    out: dict[str, bytes | None] = dict.fromkeys(files.slow_files)
    record = files.json(TOKENIZER_FILE)
    if isinstance(record, dict):
        text = json.dumps(_moved_tokenizer(record, moved), ensure_ascii=False, indent=2)
        _check_moved(files.tokenizer, load_tokenizer(text, TOKENIZER_FILE), moved)
        out[TOKENIZER_FILE] = text.encode()
    config = files.json(TOKENIZER_CONFIG_FILE)
    if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
        decoder = {str(moved[int(k)]): v for k, v in config["added_tokens_decoder"].items() if int(k) in moved}
        out[TOKENIZER_CONFIG_FILE] = _dumps({**config, "added_tokens_decoder": decoder})
    added_file = files.json(ADDED_TOKENS_FILE)
    if isinstance(added_file, dict):
        out[ADDED_TOKENS_FILE] = _dumps({k: moved[v] for k, v in added_file.items() if v in moved})
    generation = files.json(GENERATION_CONFIG_FILE)
    if isinstance(generation, dict):
        out[GENERATION_CONFIG_FILE] = _dumps({**generation, **moved_ids(generation, moved)})
    return out


def _moved_tokenizer(record: dict[str, Any], moved: Mapping[int, int]) -> dict[str, Any]:
    """tokenizer.json with every id moved and dropped added tokens left out."""
    record = dict(record)
    model = dict(record.get("model") or {})
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        model["vocab"] = {token: moved[i] for token, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: the id is the position
        placed = sorted((moved[i], entry) for i, entry in enumerate(vocab))
        if [i for i, _ in placed] != list(range(len(vocab))):
            raise PlanError(
                f"--remap: a Unigram tokenizer's {len(vocab)} pieces must keep the ids 0 to {len(vocab) - 1} among "
                "them (in any order); map its pieces onto that range"
            )
        model["vocab"] = [entry for _, entry in placed]
        if isinstance(model.get("unk_id"), int):
            model["unk_id"] = moved[model["unk_id"]]
    record["model"] = model
    record["added_tokens"] = [
        {**token, "id": moved[token["id"]]} for token in record.get("added_tokens") or [] if token["id"] in moved
    ]
    record["post_processor"] = _moved_processor(record.get("post_processor"), moved)
    return record


def _moved_processor(processor: Any, moved: Mapping[int, int]) -> Any:
    if not isinstance(processor, dict):
        return processor
    processor = dict(processor)
    if isinstance(processor.get("processors"), list):
        processor["processors"] = [_moved_processor(p, moved) for p in processor["processors"]]
    if isinstance(processor.get("special_tokens"), dict):
        processor["special_tokens"] = {
            key: {**entry, "ids": [moved[i] for i in entry.get("ids", [])]}
            for key, entry in processor["special_tokens"].items()
        }
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key] = [processor[key][0], moved[processor[key][1]]]
    return processor


def _check_moved(before: Any, after: Any, moved: Mapping[int, int]) -> None:
    added = {int(i) for i in before.get_added_tokens_decoder()}
    for token, old in before.get_vocab(with_added_tokens=True).items():
        new = after.token_to_id(token)
        if new == moved.get(old):
            continue
        if old in added:
            raise PlanError(
                f"--remap: the added token {safe_text(token, 40)} would read as id {new}, not {moved.get(old)}: the "
                "tokenizers library numbers added tokens past the vocabulary without gaps; map the added tokens "
                "onto consecutive ids right after the vocabulary's"
            )
        raise PlanError(
            f"{TOKENIZER_FILE}: after the remap {safe_text(token, 40)} has id {new}, expected {moved.get(old)}; "
            "this tokenizer's format is not one the remap knows"
        )


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
