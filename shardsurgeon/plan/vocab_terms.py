"""A change of the vocabulary built from the user's terms: ``--add-tokens`` (ids from the
``tokenizers`` library, rows from ``--init``), ``--pad-to-multiple``, ``--trim-to``, ``--remap``,
each checked against every id the tokenizer and the configs use, so that no output's tokenizer or
config disagrees with its rows. Pure but for the tokenizer it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import PlanError, RecipeError, safe_text
from shardsurgeon.model.arch import section_of
from shardsurgeon.model.source import Source
from shardsurgeon.model.tokenizer import (
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenFiles,
    read_token_files,
)
from shardsurgeon.plan.recipe import (
    MAX_VOCAB_ROWS,
    ZERO_ROW,
    NewRows,
    NewToken,
    RowInit,
    RowRun,
    SourceRows,
    VocabChange,
)
from shardsurgeon.plan.token_files import added_ids
from shardsurgeon.plan.vocab import vocab_matrices


@dataclass(frozen=True, slots=True)
class InitSpec:
    """``--init``/``--head-init`` as given: ``zero``, ``mean``, ``copy`` (of ``text``, a token) or
    ``mean-of`` (the tokens ``text`` encodes to)."""

    kind: str
    text: str = ""

    @property
    def shown(self) -> str:
        return self.kind if not self.text else f"{self.kind}:{self.text}"


ZERO_INIT = InitSpec("zero")


def parse_init(text: str, flag: str = "--init") -> InitSpec:
    """``zero``, ``mean``, ``copy:TOKEN`` or ``mean-of:TEXT``."""
    if not is_utf8(text):
        raise RecipeError(f"{flag} {safe_text(text, 60)}: is not UTF-8 text; give the token as UTF-8")
    kind, colon, rest = text.partition(":")
    if kind in ("zero", "mean") and not colon:
        return InitSpec(kind)
    if kind in ("copy", "mean-of") and rest:
        return InitSpec(kind, rest)
    raise RecipeError(f"{flag} {safe_text(text, 60)}: expected zero, mean, copy:TOKEN or mean-of:TEXT")


def is_utf8(text: str) -> bool:
    """Whether ``text`` is UTF-8 (a shell argument that is not reaches Python as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def resolve_init(spec: InitSpec, files: TokenFiles, rows: int, flag: str) -> RowInit:
    """The rows ``spec`` names in the source: ``mean`` is the mean of the rows of every token the
    tokenizer has (all rows without a tokenizer), ``copy:TOKEN`` one token's row, ``mean-of:TEXT``
    the mean of the rows of the ids TEXT encodes to (without special tokens), each as often as it
    occurs."""
    if spec.kind == "zero":
        return ZERO_ROW
    if spec.kind == "mean":
        size = files.size
        return RowInit("mean", range(min(rows, size) if size else rows))
    tokenizer = files.need_tokenizer(f"{flag} {spec.shown}")
    if spec.kind == "copy":
        token_id = tokenizer.token_to_id(spec.text)
        ids = [token_id] if token_id is not None else tokenizer.encode(spec.text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise RecipeError(
                f"{flag} {safe_text(spec.shown, 60)}: {safe_text(spec.text, 40)} is not one token of the tokenizer "
                f"(it encodes to ids {ids[:8]}); name a single token, or use mean-of:TEXT"
            )
        return RowInit("copy", (_in_rows(ids[0], rows, flag, spec),))
    ids = tokenizer.encode(spec.text, add_special_tokens=False).ids
    if not ids:
        raise RecipeError(f"{flag} {safe_text(spec.shown, 60)}: the text encodes to no token; give some text")
    return RowInit("mean", tuple(_in_rows(i, rows, flag, spec) for i in ids))


def _in_rows(token_id: int, rows: int, flag: str, spec: InitSpec) -> int:
    if not 0 <= token_id < rows:
        raise RecipeError(
            f"{flag} {safe_text(spec.shown, 60)}: token id {token_id} has no row (the embedding has {rows} rows)"
        )
    return int(token_id)


def add_tokens_change(
    files: TokenFiles, rows: int, tokens: Sequence[str], *, special: bool, init: RowInit, head: RowInit,
    skip_existing: bool, config: Mapping[str, Any] | None = None,
) -> VocabChange:  # fmt: skip
    """``tokens`` added to the tokenizer at the ids the ``tokenizers`` library gives them; their rows
    replace unused rows where the embedding has room past the tokenizer, else are appended."""
    tokenizer = files.need_tokenizer("--add-tokens")
    if tokenizer.get_vocab_size(with_added_tokens=True) > rows:
        raise PlanError(
            f"--add-tokens: the tokenizer knows {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the "
            f"embedding has {rows} rows; the source's tokenizer and weights disagree"
        )
    wanted: dict[str, None] = {}
    unknown = _unknown_ids(files)
    for token in tokens:
        if token in wanted:
            raise RecipeError(f"--add-tokens: {safe_text(token, 40)} is given twice; give each token once")
        existing = _existing_id(tokenizer, token, unknown)
        if existing is None:
            wanted[token] = None
        elif not skip_existing:
            raise RecipeError(
                f"--add-tokens: the tokenizer already has {safe_text(token, 40)} (id {existing}); leave it out, "
                "or pass --existing skip"
            )
    if not wanted:
        raise RecipeError("--add-tokens: every token given is already in the tokenizer; nothing to add")
    del tokenizer
    files.release_tokenizer()  # one tokenizer at a time: the library's copy with the tokens added is next
    new = [NewToken(token, token_id, special) for token, token_id in added_ids(files, list(wanted), special)]
    by_id = {t.id: t for t in new}
    for where, token_id in files.config_ids(config or {}):  # the tokenizer's own ids are below the new ones
        if token_id in by_id:
            raise RecipeError(
                f"--add-tokens: {safe_text(by_id[token_id].content, 40)} would take id {token_id}, which "
                f"{safe_text(where, 80)} already names; add the token that id stands for to the tokenizer first, or "
                "take the id out of the config"
            )
    size = max(rows, max(by_id) + 1)
    runs = _runs((by_id.get(i) is None and i < rows, i) for i in range(size))
    return VocabChange(tuple(_with_init(runs, init, head)), tuple(new))


def _existing_id(tokenizer: Any, token: str, unknown: set[int]) -> int | None:
    """The id the tokenizer already has for the text ``token``: its id if the text encodes to one
    token (a byte-level vocabulary holds " the" as "Ġthe"), None if the text is new. Refused where
    the vocabulary names a string that the text does not encode to (the byte-level alphabet's "é"
    is the byte 0xE9, the text "é" two bytes): added, it would take that row."""
    named = tokenizer.token_to_id(token)
    ids = tokenizer.encode(token, add_special_tokens=False).ids
    if named is not None and ids != [named]:
        raise RecipeError(
            f"--add-tokens: {safe_text(token, 40)} is the tokenizer's name for id {named}, but the text encodes to "
            f"ids {ids[:8]}; it cannot be added as a token of its own: leave it out"
        )
    if named is not None:
        return int(named)
    if len(ids) == 1 and ids[0] not in unknown:
        return int(ids[0])
    return None


def _unknown_ids(files: TokenFiles) -> set[int]:
    """The id a text the vocabulary lacks encodes to (a model's unk token), if it has one: from the
    library's model where it tells (BPE, WordPiece, WordLevel), else from tokenizer.json's model
    (Unigram's ``unk_id``; parsing the whole file as JSON costs about 20 times its size)."""
    model_type = type(files.tokenizer.model).__name__
    if model_type != "Unigram":
        unk = getattr(files.tokenizer.model, "unk_token", None)
        token_id = files.tokenizer.token_to_id(unk) if isinstance(unk, str) else None
        return set() if token_id is None else {int(token_id)}
    record = files.json(TOKENIZER_FILE) or {}
    model = record.get("model") if isinstance(record, dict) else None
    if not isinstance(model, dict):
        return set()
    if isinstance(model.get("unk_id"), int):
        return {model["unk_id"]}
    unk = model.get("unk_token")
    token_id = files.tokenizer.token_to_id(unk) if isinstance(unk, str) else None
    return set() if token_id is None else {int(token_id)}


def _runs(rows: Iterable[tuple[bool, int]]) -> list[RowRun]:
    """Runs of (is a source row, which) in output order: consecutive source rows become one run."""
    runs: list[RowRun] = []
    for is_source, row in rows:
        last = runs[-1] if runs else None
        if is_source and isinstance(last, SourceRows) and last.first + last.count == row:
            runs[-1] = SourceRows(last.first, last.count + 1)
        elif is_source:
            runs.append(SourceRows(row, 1))
        elif isinstance(last, NewRows):
            runs[-1] = NewRows(last.count + 1)
        else:
            runs.append(NewRows(1))
    return runs


def _with_init(runs: list[RowRun], init: RowInit, head: RowInit) -> list[RowRun]:
    return [NewRows(r.count, init, head) if isinstance(r, NewRows) else r for r in runs]


def pad_change(change: VocabChange | None, rows: int, multiple: int) -> VocabChange:
    """Zero rows appended so the row count is a multiple of ``multiple`` (after ``change``, if any)."""
    if not 1 <= multiple <= MAX_VOCAB_ROWS:
        raise RecipeError(f"--pad-to-multiple {multiple}: expected a whole number from 1 to {MAX_VOCAB_ROWS}")
    change = change or VocabChange((SourceRows(0, rows),))
    missing = -change.size % multiple
    if missing == 0 and change.size == rows and len(change.rows) == 1:
        raise RecipeError(
            f"--pad-to-multiple {multiple}: the embedding has {rows} rows, already a multiple of {multiple}; "
            "nothing to do"
        )
    if missing == 0:
        return change
    return VocabChange((*change.rows, NewRows(missing, ZERO_ROW, ZERO_ROW)), change.tokens)


def trim_change(files: TokenFiles, config: Mapping[str, Any], rows: int, keep: int) -> VocabChange:
    """Rows ``keep`` and on dropped; refused while the tokenizer or a config uses an id there."""
    if not 1 <= keep < rows:
        raise RecipeError(
            f"--trim-to {keep}: expected a row count from 1 to {rows - 1} (the embedding has {rows} rows)"
        )
    for where, token_id in files.ids_from(keep, config):  # the highest first
        raise RecipeError(
            f"--trim-to {keep}: {safe_text(where, 80)} uses id {token_id}, which would have no row; trim to at "
            f"least {token_id + 1}, or --remap the ids first"
        )
    return VocabChange((SourceRows(0, keep),))


def remap_change(files: TokenFiles, config: Mapping[str, Any], rows: int, mapping: Mapping[int, int]) -> VocabChange:
    """Source id -> output id for every row kept; output ids no source row takes are zero rows.
    Every id a config names must be kept; a token of the tokenizer's own vocabulary too (an added
    token may be dropped with its row)."""
    if not mapping:
        raise RecipeError('--remap: the map is empty; give {"SOURCE_ID": OUTPUT_ID, ...} for the rows to keep')
    taken: dict[int, int] = {}
    for old, new in mapping.items():
        if not 0 <= old < rows:
            raise RecipeError(f"--remap: source id {old} has no row (the embedding has {rows} rows)")
        if not 0 <= new < MAX_VOCAB_ROWS:
            raise RecipeError(f"--remap: output id {new} is out of range (0 to {MAX_VOCAB_ROWS - 1})")
        if new in taken:
            raise RecipeError(f"--remap: source ids {taken[new]} and {old} both map to {new}; give each output id once")
        taken[new] = old
    for where, token_id in files.config_ids(config):
        if token_id not in mapping:
            raise RecipeError(
                f"--remap: {safe_text(where, 80)} uses id {token_id}, which the map drops; map it, or take the id "
                "out of the config"
            )
    added = _added_ids(files)
    for where, token_id in files.tokenizer_ids():
        if token_id not in mapping and token_id not in added:
            raise RecipeError(
                f"--remap: {safe_text(where, 80)} uses id {token_id}, which the map drops; map it, or remove the "
                "token from the tokenizer first (only added tokens are dropped with their rows)"
            )
    for token_id, where in _kept_ids(files).items():
        if token_id not in mapping:
            raise RecipeError(
                f"--remap: {safe_text(where, 100)} uses id {token_id}, which the map drops; map it (only an added "
                "token nothing else names is dropped with its row)"
            )
    size = max(taken) + 1
    runs = _runs((i in taken, taken.get(i, i)) for i in range(size))
    return VocabChange(tuple(runs))


_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_SPECIAL_LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")


def _kept_ids(files: TokenFiles) -> dict[int, str]:
    """Ids of added tokens a remap may not drop, with where they are named: a token of the model's
    own vocabulary too, one the post-processor inserts, one the tokenizer configs name by its text
    (transformers would add it back at an id with no row)."""
    tokenizer = files.tokenizer
    if tokenizer is None:
        return {}
    kept: dict[int, str] = {}
    own = tokenizer.get_vocab(with_added_tokens=False)
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if own.get(added.content) == token_id:
            kept[int(token_id)] = f"{added.content!r}, in the vocabulary of tokenizer.json as well as added,"
    record = files.json(TOKENIZER_FILE)
    for token_id in _processor_ids(record.get("post_processor") if isinstance(record, dict) else None):
        kept.setdefault(token_id, f"the post-processor of {TOKENIZER_FILE}")
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):
        config = files.json(name)
        if not isinstance(config, dict):
            continue
        for key, content in _named_tokens(config):
            token_id = tokenizer.token_to_id(content)
            if token_id is not None:
                kept.setdefault(int(token_id), f"{key} {content!r} of {name}")
    return kept


def _processor_ids(processor: Any) -> list[int]:
    if not isinstance(processor, dict):
        return []
    ids: list[int] = []
    for inner in processor.get("processors") or []:
        ids += _processor_ids(inner)
    for entry in (
        (processor.get("special_tokens") or {}).values() if isinstance(processor.get("special_tokens"), dict) else []
    ):
        ids += [i for i in entry.get("ids", []) if isinstance(i, int)]
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list) and len(processor[key]) == 2 and isinstance(processor[key][1], int):
            ids.append(processor[key][1])
    return ids


def _named_tokens(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The special tokens a tokenizer config names by their text."""

    def content(value: Any) -> str | None:
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    named = [(key, content(config.get(key))) for key in _SPECIAL_TOKEN_KEYS]
    for key in _SPECIAL_LIST_KEYS:
        value = config.get(key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        named += [(key, content(item)) for item in items]
    return [(key, text) for key, text in named if text is not None]


def _added_ids(files: TokenFiles) -> set[int]:
    tokenizer = files.tokenizer
    if tokenizer is None:
        return set()
    return {int(i) for i in tokenizer.get_added_tokens_decoder()}


def _is_id_text(key: str) -> bool:
    """A source id as a remap file writes it: ASCII digits, no leading zero, at most 9 digits."""
    return key.isascii() and key.isdigit() and len(key) <= 9 and (key == "0" or not key.startswith("0"))


def parse_remap(text: str, where: str) -> dict[int, int]:
    """A remap file's JSON: ``{"SOURCE_ID": OUTPUT_ID, ...}``."""

    class Pairs(tuple):  # every entry of an object as written: a dict keeps only the last of two equal keys
        __slots__ = ()

    try:
        record = json.loads(text, object_pairs_hook=Pairs)
        if not isinstance(record, Pairs):
            raise ValueError("not an object")
        mapping = {}
        for key, value in record:
            if not _is_id_text(key) or not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"entry {key!r}: {value!r}")
            if int(key) in mapping:
                raise ValueError(f"source id {int(key)} given twice")
            mapping[int(key)] = value
        return mapping
    except (ValueError, RecursionError) as e:
        raise RecipeError(
            f'{where}: expected a JSON object of source ids to output ids such as {{"0": 0, "5": 1}}, '
            f"found {safe_text(str(e), 60)}"
        ) from None


def vocab_change(
    source: Source, add_tokens: Sequence[str], special: bool, init: InitSpec, head_init: InitSpec | None,
    skip_existing: bool, pad_to_multiple: int | None, trim_to: int | None, remap: Mapping[int, int] | None,
) -> tuple[VocabChange, int, bool]:  # fmt: skip
    """The change the terms of ``vocab`` make, the source's rows, and whether its head is untied (the
    source's tokenizer is let go on return: a large vocabulary costs tens of MB in the library)."""
    files = read_token_files(source.folder)
    matrices = vocab_matrices(source)
    rows, untied = matrices.rows, bool(matrices.heads) and not _tied(source)
    if (trim_to is not None or remap is not None) and (add_tokens or pad_to_multiple is not None):
        raise RecipeError("vocab: --trim-to and --remap stand alone; add or pad in a second run")
    if trim_to is not None and remap is not None:
        raise RecipeError("vocab: give --trim-to or --remap, not both (a remap drops every row it does not map)")
    if head_init is not None and head_init.kind != "zero" and not untied:
        raise RecipeError(
            f"--head-init {safe_text(head_init.shown, 60)}: {safe_text(source.reference)} has no untied output head "
            "(its input embedding is the head); leave --head-init out"
        )
    change: VocabChange | None = None
    if add_tokens:
        row_init = resolve_init(init, files, rows, "--init")
        head = resolve_init(head_init, files, rows, "--head-init") if head_init is not None else ZERO_ROW
        change = add_tokens_change(
            files, rows, add_tokens, special=special, init=row_init, head=head if untied else row_init,
            skip_existing=skip_existing, config=source.config,
        )  # fmt: skip
    elif init != ZERO_INIT or head_init is not None:
        raise RecipeError("--init and --head-init start the rows of --add-tokens; give the tokens to add")
    if trim_to is not None:
        change = trim_change(files, source.config, rows, trim_to)
    if remap is not None:
        change = remap_change(files, source.config, rows, remap)
    if pad_to_multiple is not None:
        change = pad_change(change, rows, pad_to_multiple)
    if change is None:
        raise RecipeError("vocab: nothing to do; give --add-tokens, --pad-to-multiple, --trim-to or --remap")
    return change, rows, untied


def _tied(source: Source) -> bool:
    """Whether the config ties the output head to the input embedding (transformers' default: tied)."""
    section = section_of(source.config, source.stack)
    return bool(section.get("tie_word_embeddings", source.config.get("tie_word_embeddings", True)))
