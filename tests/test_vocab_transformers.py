"""``vocab`` judged by transformers: every output loads without a missing or unexpected weight; for
a prompt of old tokens the logits of every old id equal the source's bit for bit (float32 and
bfloat16, untied Llama and tied Qwen2) after tokens are added with each init and after padding;
trimmed and remapped outputs give the source's logits cut or permuted as the map says; the tokenizer
transformers loads from the output encodes each new token to its id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _vocabkit import write_word_tokenizer  # noqa: E402
from compat_models import VOCAB, fixed_input, llama_config, qwen2_config, save_tiny_model  # noqa: E402
from compat_models import load_checked as load  # noqa: E402
from compat_models import logits_of as logits  # noqa: E402
from compat_models import run_ok as run  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

pytestmark = pytest.mark.compat

TOKENS = VOCAB - 8
"""The tokenizer knows 120 tokens; rows 120-127 are padding."""
ARCHS = {"llama": llama_config, "qwen2": qwen2_config}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    made: dict[tuple[str, str], tuple[Path, torch.Tensor]] = {}

    def get(arch: str, dtype: str) -> tuple[Path, torch.Tensor]:
        if (arch, dtype) not in made:
            path = save_tiny_model(ARCHS[arch](), tmp_path_factory.mktemp(f"{arch}-{dtype}"), dtype=DTYPES[dtype])
            write_word_tokenizer(path, TOKENS)
            made[arch, dtype] = path, logits(load(path, DTYPES[dtype]))
        return made[arch, dtype]

    return get


@pytest.mark.parametrize("init", ["zero", "mean", "copy:w7", "mean-of:w3 w9 w9 w4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("count", [2, 12])
def test_old_ids_keep_their_logits_bit_for_bit(source, tmp_path, arch, dtype, init, count):
    src, want = source(arch, dtype)
    new = [f"<new{i}>" for i in range(count)]
    run(
        "vocab", "--src", src, "--add-tokens", ",".join(new), "--special", "--init", init, "--out", tmp_path / "o", "-q"
    )
    model = load(tmp_path / "o", DTYPES[dtype])
    got = logits(model)
    new_ids = list(range(TOKENS, TOKENS + count))
    old = [i for i in range(VOCAB) if i not in new_ids]
    assert got.shape[-1] == max(VOCAB, TOKENS + count)
    assert torch.equal(got[..., old], want[..., old])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tokenizer.convert_tokens_to_ids(new) == new_ids
    old_ids = AutoTokenizer.from_pretrained(src)("w5 w9", add_special_tokens=False).input_ids
    assert tokenizer(" ".join(["w5 w9", *new]), add_special_tokens=False).input_ids == [*old_ids, *new_ids]
    embed = model.get_input_embeddings().weight
    if init == "zero":
        assert not embed[new_ids].any()
    elif init == "copy:w7":
        assert torch.equal(embed[new_ids[0]], embed[7])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_keeps_every_logit(source, tmp_path, arch, dtype):
    src, want = source(arch, dtype)
    run("vocab", "--src", src, "--pad-to-multiple", "96", "--out", tmp_path / "o", "-q")
    got = logits(load(tmp_path / "o", DTYPES[dtype]))
    assert got.shape[-1] == 192 and torch.equal(got[..., :VOCAB], want) and not got[..., VOCAB:].any()


def test_trim_and_remap_cut_and_permute_the_logits(source, tmp_path):
    src, want = source("llama", "float32")
    run("vocab", "--src", src, "--trim-to", TOKENS, "--out", tmp_path / "trimmed", "-q")
    assert torch.equal(logits(load(tmp_path / "trimmed", torch.float32)), want[..., :TOKENS])
    mapping = {**{i: i for i in range(3)}, **{i: TOKENS + 2 - i for i in range(3, TOKENS)}}
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in mapping.items()}))
    run("vocab", "--src", src, "--remap", tmp_path / "map.json", "--out", tmp_path / "moved", "-q")
    ids = fixed_input() % TOKENS
    before = logits(load(src, torch.float32), ids)
    got = logits(load(tmp_path / "moved", torch.float32), ids.apply_(lambda i: mapping[i]))
    order = torch.tensor([mapping[i] for i in range(TOKENS)])
    assert torch.allclose(got[..., order], before[..., :TOKENS], rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moved")
    assert tokenizer("w3 w119", add_special_tokens=False).input_ids == [mapping[3], mapping[119]]
