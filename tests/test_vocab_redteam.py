"""Red-team tests for ``vocab`` (issue 20): each one fails on the code it was written against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _vocabkit import write_bpe_tokenizer, write_word_tokenizer
from conftest import read_tensors, run_cli, write_tiny_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shardsurgeon import verify_checkpoint

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
    """" the" is token ``Ġthe`` of a GPT-2/Llama-3 style tokenizer. Observed: it is added again as a
    new token with a zero row, and as added tokens match first, every " the" of ordinary text now
    encodes to the new, untrained id instead of ``Ġthe``."""
    folder, source = byte_level_src(tmp_path)
    (the,) = source.encode(" the").ids
    (tmp_path / "tokens.txt").write_text(" the\n")  # a file: a comma list strips the space
    message = one_line_refusal("--src", folder, "--add-tokens", tmp_path / "tokens.txt", "--out", tmp_path / "out")
    assert f"id {the}" in message


def test_a_byte_level_alphabet_character_is_not_an_existing_token(tmp_path):
    """The byte-level alphabet writes byte 0xE9 as the string "é", but the text "é" is the two bytes
    C3 A9 (two tokens). Observed: refused as "the tokenizer already has é (id ...)", and with
    ``--existing skip`` silently not added."""
    folder, source = byte_level_src(tmp_path)
    assert len(source.encode("é").ids) == 2
    ok("--src", folder, "--add-tokens", "é", "--existing", "skip", "--special", "--out", tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tokenizer.encode("é", add_special_tokens=False).ids == [300]


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
