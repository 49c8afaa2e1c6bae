"""``vocab``: tokens added with each way of starting their rows, rows padded, trimmed and moved, the
tokenizer files and config to match; every other tensor the source's bytes. Checked on tiny
checkpoints whose bytes name their tensor, against the ``tokenizers`` library for ids and an
independent exact mean (``math.fsum``) for mean rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _vocabkit import write_bpe_tokenizer, write_word_tokenizer
from conftest import read_tensors, run_cli, write_tiny_checkpoint
from tokenizers import Tokenizer

from shardsurgeon import load_plan_file, verify_checkpoint

HIDDEN, ROWS, TOKENS = 8, 24, 20
"""The embedding has 24 rows, the tokenizer 20 tokens: rows 20-23 are padding no token uses."""
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def rows_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(-1, HIDDEN)


def exact_mean(rows: np.ndarray) -> np.ndarray:
    """The mean by an independent rule: an exactly rounded sum (fsum), divided, rounded to bf16."""
    columns = rows.astype(np.float64).T
    return np.array([math.fsum(c) / len(c) for c in columns]).astype(ml_dtypes.bfloat16)


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "src"
    config = {"bos_token_id": 1, "eos_token_id": 2}
    data = write_tiny_checkpoint(folder, layers=2, shards=2, vocab=ROWS, extra_files={"generation_config.json": "{}"})
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 19]}))
    write_word_tokenizer(folder, TOKENS)
    return folder, data


def vocab(*args: str | Path) -> None:
    result = run_cli("vocab", *args, "-q")
    assert result.exit_code == 0, result.output


def refused(*args: str | Path) -> str:
    result = run_cli("vocab", *args)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def others_unchanged(out: Path, data: dict[str, bytes]) -> None:
    tensors = read_tensors(out)
    for name, raw in data.items():
        if name not in (EMBED, HEAD):
            assert tensors[name][2] == raw, name


def test_added_tokens_take_the_padding_rows_zeros_by_default(src, tmp_path):
    folder, data = src
    out = tmp_path / "out"
    vocab("--src", folder, "--add-tokens", "<tool>,</tool>", "--special", "--out", out)
    tensors = read_tensors(out)
    for name in (EMBED, HEAD):
        got, before = rows_of(tensors[name][2]), rows_of(data[name])
        assert got.shape == (ROWS, HIDDEN)  # ids 20 and 21 fit in the padding
        assert got[:20].tobytes() == before[:20].tobytes() and got[22:].tobytes() == before[22:].tobytes()
        assert not got[20:22].view(np.uint16).any()
    others_unchanged(out, data)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("w5 <tool> w7 </tool>").ids == [1, 5, 20, 7, 21]
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["20"]["content"] == "<tool>" and decoder["21"]["special"] is True
    assert json.loads((out / "config.json").read_text())["vocab_size"] == ROWS
    assert verify_checkpoint(out, [folder]).ok


def test_tokens_past_the_rows_append_rows(src, tmp_path):
    folder, data = src
    out = tmp_path / "out"
    new = [f"x{i}" for i in range(6)]
    vocab("--src", folder, "--add-tokens", ",".join(new), "--out", out)
    got = rows_of(read_tensors(out)[EMBED][2])
    assert got.shape == (26, HIDDEN)
    assert got[:20].tobytes() == rows_of(data[EMBED])[:20].tobytes() and not got[20:].view(np.uint16).any()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 26
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tokenizer.token_to_id(t) for t in new] == list(range(20, 26))


@pytest.mark.parametrize(
    ("init", "rows"),
    [("mean", list(range(TOKENS))), ("copy:w7", [7]), ("mean-of:w3 w9 w9 w4", [3, 9, 9, 4])],
)
def test_each_init_gives_its_definition(src, tmp_path, init, rows):
    folder, data = src
    out = tmp_path / "out"
    vocab("--src", folder, "--add-tokens", "n1,n2", "--init", init, "--head-init", "mean-of:w4 w5", "--out", out)
    tensors = read_tensors(out)
    embed, head = rows_of(tensors[EMBED][2]), rows_of(tensors[HEAD][2])
    want = exact_mean(rows_of(data[EMBED])[rows])
    assert embed[20].tobytes() == want.tobytes() == embed[21].tobytes()
    assert head[20].tobytes() == exact_mean(rows_of(data[HEAD])[[4, 5]]).tobytes()
    assert verify_checkpoint(out, [folder]).ok


def test_the_mean_is_exact_where_float32_summation_is_not(tmp_path):
    """Rows 1e8, 1, -1e8 (float32, one column): summed in float32 the 1 is lost; the mean is 1/3."""
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=4)
    write_word_tokenizer(folder, 3)
    embed = np.zeros((4, HIDDEN), np.float32)
    embed[:3, 0] = [1e8, 1.0, -1e8]
    _rewrite_as_f32(folder, EMBED, embed)
    vocab("--src", folder, "--add-tokens", "z", "--init", "mean", "--out", tmp_path / "out")
    got = np.frombuffer(read_tensors(tmp_path / "out")[EMBED][2], np.float32).reshape(-1, HIDDEN)
    assert got[3, 0] == np.float32(1 / 3)


def _rewrite_as_f32(folder: Path, name: str, values: np.ndarray) -> None:
    """The checkpoint with tensor ``name`` replaced by float32 ``values`` (through safetensors)."""
    from safetensors.numpy import load_file, save_file

    (path,) = folder.glob("*.safetensors")
    tensors = {k: v for k, v in load_file(path).items()}
    tensors[name] = values
    save_file(tensors, path, metadata={"format": "pt"})


def test_pad_to_multiple_adds_zero_rows_and_leaves_the_tokenizer(src, tmp_path):
    folder, data = src
    out = tmp_path / "out"
    vocab("--src", folder, "--pad-to-multiple", "16", "--out", out)
    for name in (EMBED, HEAD):
        got = rows_of(read_tensors(out)[name][2])
        assert got.shape == (32, HIDDEN) and got[:ROWS].tobytes() == data[name] and not got[ROWS:].view(np.uint16).any()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    assert verify_checkpoint(out, [folder]).ok


def test_add_then_pad(src, tmp_path):
    folder, _ = src
    vocab("--src", folder, "--add-tokens", ",".join(f"x{i}" for i in range(6)), "--pad-to-multiple", "8",
          "--out", tmp_path / "out")  # fmt: skip
    assert read_tensors(tmp_path / "out")[EMBED][1] == [32, HIDDEN]


def test_trim_drops_rows_past_every_id(src, tmp_path):
    folder, data = src
    out = tmp_path / "out"
    vocab("--src", folder, "--trim-to", str(TOKENS), "--out", out)
    for name in (EMBED, HEAD):
        assert read_tensors(out)[name][2] == rows_of(data[name])[:TOKENS].tobytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == TOKENS
    assert verify_checkpoint(out, [folder]).ok


def test_trim_refuses_while_an_id_is_used(src):
    folder, _ = src
    message = refused("--src", folder, "--trim-to", "19", "--out", folder.parent / "out")
    assert "19" in message and "trim to at least 20" in message


def test_remap_moves_rows_and_every_id(src, tmp_path):
    folder, data = src
    out = tmp_path / "out"
    mapping = {i: i for i in range(3)} | {i: 22 - i for i in range(3, TOKENS)}  # words reversed, padding dropped
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in mapping.items()}))
    vocab("--src", folder, "--remap", tmp_path / "map.json", "--out", out)
    before, got = rows_of(data[EMBED]), rows_of(read_tensors(out)[EMBED][2])
    assert got.shape == (TOKENS, HIDDEN)
    for old, new in mapping.items():
        assert got[new].tobytes() == before[old].tobytes()
    old_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "w3 w4 w19 nothing"
    assert tokenizer.encode(text).ids == [mapping[i] for i in old_tokenizer.encode(text).ids]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 3]
    assert verify_checkpoint(out, [folder]).ok


def test_remap_of_a_byte_pair_tokenizer(tmp_path):
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=10)
    write_bpe_tokenizer(folder)
    mapping = {0: 0, 1: 1, 2: 2, 3: 9, 4: 8, 5: 7, 6: 6, 7: 5, 8: 4, 9: 3}
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in mapping.items()}))
    vocab("--src", folder, "--remap", tmp_path / "map.json", "--out", tmp_path / "out")
    before = Tokenizer.from_file(str(folder / "tokenizer.json"))
    after = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for text in ("abcd", "ab", "cdab", "dcba"):
        assert after.encode(text).ids == [mapping[i] for i in before.encode(text).ids]


def test_remap_refuses_to_drop_a_used_id(src, tmp_path):
    folder, _ = src
    (tmp_path / "map.json").write_text(json.dumps({str(i): i for i in range(TOKENS) if i != 7}))
    message = refused("--src", folder, "--remap", tmp_path / "map.json", "--out", tmp_path / "out")
    assert "'w7'" in message and "7" in message


def test_existing_tokens_refused_or_skipped(src, tmp_path):
    folder, _ = src
    assert "already has w5 (id 5)" in refused("--src", folder, "--add-tokens", "w5,new", "--out", tmp_path / "o")
    vocab("--src", folder, "--add-tokens", "w5,new", "--existing", "skip", "--out", tmp_path / "out")
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).token_to_id("new") == 20


def test_tokens_from_a_file(src, tmp_path):
    folder, _ = src
    (tmp_path / "tokens.txt").write_text("<a b>\n\n,comma\n")
    vocab("--src", folder, "--add-tokens", tmp_path / "tokens.txt", "--special", "--out", tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert [tokenizer.token_to_id(t) for t in ("<a b>", ",comma")] == [20, 21]


def test_a_plan_file_applies_to_the_same_bytes(src, tmp_path):
    folder, _ = src
    vocab("--src", folder, "--add-tokens", "n1", "--init", "mean", "--out", tmp_path / "direct")
    vocab("--src", folder, "--add-tokens", "n1", "--init", "mean", "--plan-json", tmp_path / "plan.json")
    assert load_plan_file(tmp_path / "plan.json").job.recipe.vocab is not None
    result = run_cli("apply", tmp_path / "plan.json", "--out", tmp_path / "applied", "-q")
    assert result.exit_code == 0, result.output
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "applied" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    assert read_tensors(tmp_path / "applied")[EMBED][2] == read_tensors(tmp_path / "direct")[EMBED][2]


def test_verify_finds_a_changed_mean_row_and_tokenizer(src, tmp_path):
    folder, _ = src
    out = tmp_path / "out"
    vocab("--src", folder, "--add-tokens", "n1", "--init", "mean", "--out", out)
    _, _, _, file, offset = read_tensors(out)[EMBED]
    with open(out / file, "r+b") as f:
        f.seek(offset + 20 * HIDDEN * 2)
        f.write(b"\x01\x00")
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace('"n1"', '"n2"'))
    problems = " ".join(str(m) for m in verify_checkpoint(out, [folder]).mismatches)
    assert "mean of 20 rows" in problems and "tokenizer.json" in problems


def test_dry_run_says_what_changes(src):
    folder, _ = src
    result = run_cli("vocab", "--src", folder, "--add-tokens", "n1,n2", "--init", "mean", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "vocab: 24 -> 24 rows" in result.output and "ids 20-21" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "nothing to do"),
        (("--trim-to", "20", "--add-tokens", "a"), "stand alone"),
        (("--init", "mean"), "give the tokens to add"),
        (("--add-tokens", "a", "--init", "copy:w3 w4"), "is not one token"),
        (("--add-tokens", "a", "--init", "avg"), "expected zero, mean"),
        (("--add-tokens", "a,a"), "given twice"),
        (("--add-tokens", "a", "--init", "mean-of:   "), "encodes to no token"),
        (("--trim-to", "24"), "expected a row count from 1 to 23"),
        (("--pad-to-multiple", "8"), "already a multiple of 8"),
    ],
)
def test_one_line_refusals(src, tmp_path, args, expected):
    folder, _ = src
    assert expected in refused("--src", folder, *args, "--out", tmp_path / "out")


def test_a_tied_head_takes_no_head_init(tmp_path):
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=24, lm_head=False)
    config = json.loads((folder / "config.json").read_text()) | {"tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    write_word_tokenizer(folder, TOKENS)
    assert "no untied output head" in refused(
        "--src", folder, "--add-tokens", "a", "--head-init", "mean", "--out", tmp_path / "out"
    )


def test_a_sentencepiece_only_tokenizer_is_refused(tmp_path):
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=24, extra_files={"tokenizer.model": "sp"})
    assert "only a slow tokenizer (tokenizer.model)" in refused(
        "--src", folder, "--add-tokens", "a", "--out", tmp_path / "out"
    )


def test_a_bad_remap_file(src, tmp_path):
    folder, _ = src
    (tmp_path / "map.json").write_text('{"0": 0, "1": 0}')
    assert "both map to 0" in refused("--src", folder, "--remap", tmp_path / "map.json", "--out", tmp_path / "o")
    (tmp_path / "map.json").write_text("[1, 2]")
    assert "expected a JSON object" in refused("--src", folder, "--remap", tmp_path / "map.json", "--out", tmp_path)


def test_a_stopped_run_resumes_to_the_bytes_of_a_whole_run(src, tmp_path):
    from _s3kit import stop_after
    from conftest import folder_bytes

    from shardsurgeon import InitSpec, WriteOptions, plan_vocab, run_job

    folder, _ = src
    args = ("--add-tokens", "n1,n2", "--init", "mean", "--max-shard-size", "1KB")
    vocab("--src", folder, *args, "--out", tmp_path / "whole" / "out")
    job = plan_vocab(folder, add_tokens=["n1", "n2"], init=InitSpec("mean"), max_shard_bytes=1000)
    assert len(job.layout.shards) > 2
    with pytest.raises(KeyboardInterrupt):
        run_job(job, tmp_path / "out", command="vocab", options=WriteOptions(progress=stop_after(1500)))
    result = run_cli("vocab", "--src", folder, *args, "--out", tmp_path / "out")
    assert result.exit_code == 0 and "kept from an earlier run" in result.output, result.output
    whole, resumed = folder_bytes(tmp_path / "whole" / "out"), folder_bytes(tmp_path / "out")
    assert {k: v for k, v in resumed.items() if k != "README.md"} == {
        k: v for k, v in whole.items() if k != "README.md"
    }


def test_from_and_to_s3_is_the_local_output(src, tmp_path, seaweed_session, monkeypatch):
    import boto3
    from _s3kit import objects_under, own_buckets
    from _servers import s3_environment, upload_folder
    from conftest import folder_bytes

    folder, _ = src
    weed = own_buckets(seaweed_session, "vocab")
    for key, value in s3_environment(weed.endpoint).items():
        monkeypatch.setenv(key, value)
    upload_folder(weed.endpoint, "vocab", "src", folder)
    args = ("--add-tokens", "n1,n2", "--special", "--init", "mean-of:w3 w4", "--max-shard-size", "1KB")
    vocab("--src", folder, *args, "--out", tmp_path / "local")
    vocab("--src", "s3://vocab/src", *args, "--out", "s3://vocab/out")
    remote = objects_under(boto3.client("s3"), "s3://vocab/out")
    mine = folder_bytes(tmp_path / "local")
    assert sorted(remote) == sorted(mine)
    assert [name for name in mine if name != "README.md" and remote[name] != mine[name]] == []
    assert verify_checkpoint("s3://vocab/out", ["s3://vocab/src"]).ok


def test_from_a_web_server_is_the_local_output(src, tmp_path):
    """A source by https-like URL (a web server with range requests, which lists nothing): the token
    files are found among the usual names and read whole, the shards by range."""
    pytest.importorskip("obstore", reason="the remote extra (obstore) is not installed")
    from _servers import serve_http
    from conftest import folder_bytes

    folder, _ = src
    args = ("--add-tokens", "n1", "--special", "--init", "copy:w9")
    vocab("--src", folder, *args, "--out", tmp_path / "local")
    with serve_http(folder.parent) as http:
        url = f"{http.url}/ok/{folder.name}"
        vocab("--src", url, *args, "--out", tmp_path / "remote")
        assert verify_checkpoint(tmp_path / "remote", [url]).ok
    local, remote = folder_bytes(tmp_path / "local"), folder_bytes(tmp_path / "remote")
    assert {k: v for k, v in local.items() if k != "README.md"} == {k: v for k, v in remote.items() if k != "README.md"}


def test_a_remap_that_leaves_a_gap_among_added_tokens_says_why(tmp_path):
    """Added tokens at 20 and 21; a map moving 21 to 23 leaves a gap the library would close."""
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=24)
    write_word_tokenizer(folder, TOKENS)
    vocab("--src", folder, "--add-tokens", "<a>,<b>", "--special", "--out", tmp_path / "added")
    (tmp_path / "map.json").write_text(json.dumps({**{str(i): i for i in range(21)}, "21": 23}))
    message = refused("--src", tmp_path / "added", "--remap", tmp_path / "map.json", "--out", tmp_path / "o")
    assert "numbers added tokens past the vocabulary without gaps" in message


def test_remap_refuses_to_drop_an_added_token_the_config_names(tmp_path):
    """Added tokens at 20 and 21, config.json's pad_token_id 21: a map dropping 21 would leave the
    config naming an id with no row."""
    folder = tmp_path / "src"
    write_tiny_checkpoint(folder, layers=1, shards=1, vocab=24)
    write_word_tokenizer(folder, TOKENS)
    vocab("--src", folder, "--add-tokens", "<a>,<b>", "--out", tmp_path / "added")
    config = json.loads((tmp_path / "added" / "config.json").read_text())
    (tmp_path / "added" / "config.json").write_text(json.dumps({**config, "pad_token_id": 21}))
    (tmp_path / "map.json").write_text(json.dumps({str(i): i for i in range(21)}))
    message = refused("--src", tmp_path / "added", "--remap", tmp_path / "map.json", "--out", tmp_path / "o")
    assert "pad_token_id of config.json uses id 21, which the map drops" in message


def test_a_missing_token_file_is_refused_not_added_as_a_token(src, tmp_path):
    folder, _ = src
    assert "no such file" in refused("--src", folder, "--add-tokens", tmp_path / "tokns.txt", "--out", tmp_path / "o")


def test_verify_finds_a_token_file_the_source_had_not(src, tmp_path):
    folder, _ = src
    vocab("--src", folder, "--add-tokens", "n1", "--out", tmp_path / "out")
    (tmp_path / "out" / "added_tokens.json").write_text('{"n1": 7}')
    problems = " ".join(str(m) for m in verify_checkpoint(tmp_path / "out", [folder]).mismatches)
    assert "added_tokens.json" in problems and "neither in the source nor made by the recipe" in problems
