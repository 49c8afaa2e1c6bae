"""Red-team tests for ``vocab`` (issue 20): each one fails on the code it was written against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _vocabkit import write_bpe_tokenizer, write_word_tokenizer
from conftest import run_cli, write_tiny_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HIDDEN, ROWS, TOKENS = 8, 24, 20
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def make_src(tmp_path: Path, config_extra: dict | None = None, generation: dict | None = None) -> Path:
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=ROWS)
    config = json.loads((folder / "config.json").read_text()) | (config_extra or {})
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    write_word_tokenizer(folder, TOKENS)
    return folder


def run(*args: str | Path):
    return run_cli("vocab", *[str(a) for a in args], "-q")


def ok(*args: str | Path) -> None:
    result = run(*args)
    assert result.exit_code == 0, result.output


def one_line_refusal(*args: str | Path, command: str = "vocab") -> str:
    result = run_cli(command, *[str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert "internal error" not in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def write_map(tmp_path: Path, mapping: dict[int, int]) -> Path:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({str(k): v for k, v in mapping.items()}))
    return path


# --- remap and trim: every id a config names moves with its row ------------------------------------


def test_remap_moves_the_multimodal_and_forced_ids_of_the_configs(tmp_path):
    """A Llava/Gemma-3 style ``image_token_id`` and a BART/NLLB style ``forced_eos_token_id`` name
    token ids just like ``eos_token_id``; after a remap they must name the moved ids."""
    folder = make_src(
        tmp_path, {"image_token_id": 19, "forced_eos_token_id": 2}, {"forced_eos_token_id": 19, "eos_token_id": 2}
    )
    mapping = {i: (i if i < 3 else 22 - i) for i in range(TOKENS)}
    ok("--src", folder, "--remap", write_map(tmp_path, mapping), "--out", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["image_token_id"] == mapping[19]  # observed: 19, now the row of w3
    assert generation["forced_eos_token_id"] == mapping[19]  # observed: 19


def test_trim_refuses_while_the_image_token_index_has_no_row(tmp_path):
    folder = make_src(tmp_path, {"image_token_index": 22})
    message = one_line_refusal("--src", folder, "--trim-to", "20", "--out", tmp_path / "out")
    assert "image_token_index" in message  # observed: written, image_token_index 22 of 20 rows


def test_remap_dropping_the_bos_the_post_processor_adds_is_a_one_line_refusal(tmp_path):
    """<s> (id 1) is an added token, so the planner lets the map drop it, but the post-processor
    still prepends it: observed ``internal error: KeyError: 1``."""
    folder = make_src(tmp_path)
    mapping = write_map(tmp_path, {i: i for i in range(TOKENS) if i != 1})
    message = one_line_refusal("--src", folder, "--remap", mapping, "--out", tmp_path / "out")
    assert "<s>" in message or "post" in message


def test_remap_dropping_an_added_token_that_is_also_in_the_vocabulary(tmp_path):
    """GPT-2's ``<|endoftext|>`` is both in ``model.vocab`` and an added token: dropping it gives
    ``internal error: KeyError: 2`` from the vocabulary rewrite."""
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=10)
    write_bpe_tokenizer(folder)
    mapping = write_map(tmp_path, {i: i for i in range(10) if i != 2})
    one_line_refusal("--src", folder, "--remap", mapping, "--out", tmp_path / "out")


# --- byte-level tokenizers: a token's text is not its vocabulary string -----------------------------


def byte_level_src(tmp_path: Path) -> tuple[Path, Tokenizer]:
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=300)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(["hello world the cat sat on the mat"] * 50, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, tokenizer


def test_a_token_the_byte_level_vocabulary_has_as_one_token_is_existing(tmp_path):
    """ " the" is token ``Ġthe`` of a GPT-2/Llama-3 style tokenizer. Observed: it is added again as a
    new token with a zero row, and as added tokens match first, every " the" of ordinary text now
    encodes to the new, untrained id instead of ``Ġthe``."""
    folder, source = byte_level_src(tmp_path)
    (the,) = source.encode(" the").ids
    (tmp_path / "tokens.txt").write_text(" the\n")  # a file: a comma list strips the space
    message = one_line_refusal("--src", folder, "--add-tokens", tmp_path / "tokens.txt", "--out", tmp_path / "out")
    assert f"id {the}" in message


def test_a_byte_level_alphabet_character_is_not_silently_skipped_as_existing(tmp_path):
    """The byte-level alphabet writes byte 0xE9 as the string "é", but the text "é" is the two bytes
    C3 A9 (two tokens). Observed: with ``--existing skip`` "é" is silently left out as if the
    tokenizer had it (and refused as "already has é (id ...)" without it), while "é" still encodes
    to two ids. Expected: a one-line refusal that says the text does not encode to that id."""
    folder, source = byte_level_src(tmp_path)
    ids = source.encode("é").ids
    assert len(ids) == 2
    message = one_line_refusal(
        "--src", folder, "--add-tokens", "é,<new>", "--existing", "skip", "--special", "--out", tmp_path / "out"
    )
    assert "é" in message and str(ids) in message


# --- token files -------------------------------------------------------------------------------------


def test_a_token_file_splits_only_at_line_ends(tmp_path):
    """A file is "one token a line, kept exactly", but str.splitlines also splits at U+2028, U+0085,
    \\x1c-\\x1e, \\v and \\f: "a\u2028b" became the two tokens "a" and "b"."""
    folder = make_src(tmp_path)
    (tmp_path / "tokens.txt").write_text("a\u2028b\nc\x85d\n", encoding="utf-8")
    ok("--src", folder, "--add-tokens", tmp_path / "tokens.txt", "--special", "--out", tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tokenizer.token_to_id("a\u2028b") == 20 and tokenizer.token_to_id("c\x85d") == 21
    assert tokenizer.token_to_id("a") is None


# --- plan files edited by hand -------------------------------------------------------------------------


def _edited_plan(tmp_path: Path, edit) -> Path:
    folder = make_src(tmp_path)
    ok("--src", folder, "--add-tokens", "n1,n2", "--init", "mean", "--plan-json", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    recipe = json.loads(plan["job"]["recipe"])
    edit(recipe["vocab"])
    plan["job"]["recipe"] = json.dumps(recipe, separators=(",", ":"))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return tmp_path / "plan.json"


def _mean_of_two(run: list) -> list:
    """A run of new rows whose mean of a range of rows is made the mean of the range's two ends."""
    if run[0] != "new":
        return run
    ends = [(kind, rows["range"] if isinstance(rows, dict) else rows) for kind, rows in run[2:]]
    return [*run[:2], *([kind, list(rows)] for kind, rows in ends)]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda v: v.update(tokens=[]), id="tokens-removed"),
        pytest.param(lambda v: v.update(tokens=[["n9", 20, False], ["n2", 21, False]]), id="token-renamed"),
        pytest.param(lambda v: v.update(tokens=[[t[0], t[1], "no"] for t in v["tokens"]]), id="special-as-text"),
    ],
)
def test_an_edited_token_list_in_a_plan_file_is_refused(tmp_path, edit):
    """The rows of the recorded vocabulary change are covered by the plan's fingerprint, its tokens
    are not: observed, each edit applies and writes a different output than the plan made (no new
    token at all, another token, or special tokens from ``"no"``)."""
    plan = _edited_plan(tmp_path, edit)
    one_line_refusal(plan, "--out", tmp_path / "out", command="apply")


def test_a_plan_file_whose_mean_of_a_range_is_made_the_mean_of_its_two_ends_is_refused(tmp_path):
    """The mean of rows 0-19 and the mean of rows 0 and 20 are different bytes: the fingerprint tells
    them apart (a plan file so edited, or a resumed job of the other, must not pass as the same plan)."""
    plan = _edited_plan(tmp_path, lambda v: v.update(rows=[_mean_of_two(r) for r in v["rows"]]))
    message = one_line_refusal(plan, "--out", tmp_path / "out", command="apply")
    assert "planning again from its sources gives another plan" in message


# --- add-tokens: a row past the tokenizer is not free while a config names its id --------------------


@pytest.mark.parametrize(
    ("config", "generation"),
    [
        pytest.param({"pad_token_id": 21}, None, id="config-pad"),
        pytest.param({}, {"eos_token_id": [2, 21]}, id="generation-eos"),
        pytest.param({"boi_token_index": 20, "eoi_token_index": 21, "image_token_index": 22}, None, id="gemma3-image"),
    ],
)
def test_added_tokens_do_not_take_a_row_a_config_names(tmp_path, config, generation):
    """Rows 20-23 are past the tokenizer's 20 tokens, but a config names 21 (a pad row, a second
    eos, Gemma 3's image tokens, which transformers' own Gemma 3 test config places there). Observed:
    the new tokens are given ids 20 and 21, so "<a>"/"<b>" become the pad/eos/image token, and with
    --init mean the row the model uses for it is overwritten."""
    folder = make_src(tmp_path, config, generation)
    result = run("--src", folder, "--add-tokens", "<a>,<b>", "--special", "--init", "mean", "--out", tmp_path / "out")
    named = {21, 20, 22} if "boi_token_index" in config else {21}
    if result.exit_code != 0:  # a one-line refusal naming the id is a fine answer too
        assert any(f"id {i}" in result.output for i in named), result.output
        assert "internal error" not in result.output, result.output
        return
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    ids = {tokenizer.token_to_id("<a>"), tokenizer.token_to_id("<b>")}
    assert not ids & named, ids


# --- remap: a dropped token must not stay named by the tokenizer's configuration ---------------------


def test_remap_refuses_to_drop_a_token_the_tokenizer_config_names(tmp_path):
    """tokenizer_config.json names "<y>" (id 21, an added special token) as eos and pad token; no
    config.json id names it, so the map may drop it. Observed: written with 21 rows, the token gone
    from tokenizer.json but still the eos/pad token and in additional_special_tokens, so
    transformers adds "<y>" back at id 21 -- an eos/pad id with no row (IndexError when padding)."""
    folder = make_src(tmp_path)
    ok("--src", folder, "--add-tokens", "<x>,<y>", "--special", "--out", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text()) | {
        "eos_token": "<y>",
        "pad_token": "<y>",
    }
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    mapping = write_map(tmp_path, {i: i for i in range(21)})
    result = run("--src", tmp_path / "a", "--remap", mapping, "--out", tmp_path / "b")
    if result.exit_code != 0:
        assert "<y>" in result.output and "internal error" not in result.output, result.output
        return
    tokenizer = Tokenizer.from_file(str(tmp_path / "b" / "tokenizer.json"))
    assert tokenizer.token_to_id("<y>") is not None  # observed: None, while the configs still name it


# --- size ----------------------------------------------------------------------------------------------


def test_many_tokens_are_added_with_their_ids(tmp_path):
    """5,000 tokens from a file (a new language's vocabulary is tens of thousands): each gets the
    next id. (The duplicate check was quadratic: 40,000 tokens took 45 s; tests never time things,
    so this one only checks the outcome.)"""
    folder = make_src(tmp_path)
    (tmp_path / "tokens.txt").write_text("".join(f"<t{i}>\n" for i in range(5_000)))
    ok("--src", folder, "--add-tokens", tmp_path / "tokens.txt", "--special", "--out", tmp_path / "out")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert [tokenizer.token_to_id(f"<t{i}>") for i in (0, 4_999)] == [20, 5_019]


# --- the model card -------------------------------------------------------------------------------------


def test_the_card_of_tokens_added_in_the_padding_drops_no_rows(tmp_path):
    """Two tokens take padding rows 20 and 21 of 24 (Qwen's case: 151,665 tokens, 151,936 rows).
    Observed card: "... from 24 to 24 rows: added 2 tokens (ids 20-21, special) ...; rows 22 and on
    dropped" -- no row was dropped (rows 22 and 23 are kept)."""
    folder = make_src(tmp_path)
    ok("--src", folder, "--add-tokens", "<a>,<b>", "--special", "--out", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "from 24 to 24 rows" in card and "dropped" not in card


# --- remap files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"0": 5, "00": 0, ', id="leading-zero-key"),
        pytest.param('{"0": 5, "0": 0, ', id="duplicate-key"),
    ],
)
def test_a_remap_naming_a_source_id_twice_is_refused(tmp_path, text):
    """json.loads keeps the last of two equal keys, and "00" is read as 0: observed, the entry
    "0": 5 is silently ignored and the output written with row 0 at id 0."""
    folder = make_src(tmp_path)
    path = tmp_path / "map.json"
    path.write_text(text + ", ".join(f'"{i}": {i}' for i in range(1, TOKENS)) + "}")
    message = one_line_refusal("--src", folder, "--remap", path, "--out", tmp_path / "out")
    assert "0" in message


# --- text from the command line that is not UTF-8 -------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--add-tokens", "a\udcffb"), id="add-tokens"),
        pytest.param(("--add-tokens", "new", "--init", "copy:w\udcff"), id="init-copy"),
        pytest.param(("--add-tokens", "new", "--init", "mean-of:w3 \udcff"), id="init-mean-of"),
    ],
)
def test_a_token_that_is_not_utf8_is_a_one_line_refusal(tmp_path, args):
    """A shell argument with a byte that is not UTF-8 reaches Python as a lone surrogate. Observed for
    --add-tokens: ``internal error: UnicodeEncodeError: 'utf-8' codec can't encode character
    '\\udcff'``."""
    folder = make_src(tmp_path)
    one_line_refusal("--src", folder, *args, "--special", "--out", tmp_path / "out")
