"""Tokenizers for the vocabulary tests, made with the ``tokenizers`` library: a word-level one whose
token i is ``w{i}`` (so a text of words names its ids), with ``<unk>``, ``<s>`` and ``</s>`` as
special added tokens at ids 0-2, and a byte-pair one for the library's other model."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

SPECIALS = ("<unk>", "<s>", "</s>")


def word_vocab(size: int) -> dict[str, int]:
    return {**{s: i for i, s in enumerate(SPECIALS)}, **{f"w{i}": i for i in range(len(SPECIALS), size)}}


def write_word_tokenizer(folder: Path, size: int, *, config_extra: dict | None = None) -> Tokenizer:
    """tokenizer.json (word level, ``size`` tokens, a post-processor that prepends ``<s>``),
    tokenizer_config.json and special_tokens_map.json in ``folder``."""
    tokenizer = Tokenizer(models.WordLevel(word_vocab(size), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    decoder = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, s in enumerate(SPECIALS)
    }  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": decoder, **(config_extra or {}),
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    return tokenizer


def write_bpe_tokenizer(folder: Path) -> Tokenizer:
    """A byte-pair tokenizer of 12 tokens: a b c d, three merges, and the specials."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "d": 6, "ab": 7, "cd": 8, "abcd": 9}
    merges = [("a", "b"), ("c", "d"), ("ab", "cd")]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer
