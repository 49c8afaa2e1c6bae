"""A mergekit-yaml command line pasted as `shardsurgeon merge`: OUT as an argument, --out-shard-size as
mergekit reads it, mergekit's other flags noted (no effect) or refused (would change the output), and
the config keys mergekit ignores but a user meant something by."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import folder_bytes, read_tensors, run_cli, write_tiny_checkpoint

from shardsurgeon import MERGEKIT_FLAGS
from shardsurgeon.cli import cli

USAGE = 2
CONFIG = """\
slices:
  - sources:
    - model: m
      layer_range: [0, 4]
  - sources:
    - model: m
      layer_range: [3, 4]
      parameters:
        scale:
          - {filter: o_proj, value: 0.0}
          - {value: 1.0}
merge_method: passthrough
"""


@pytest.fixture
def config(tmp_path) -> Path:
    write_tiny_checkpoint(tmp_path / "m", layers=4, shards=2)
    path = tmp_path / "merge.yml"
    path.write_text(CONFIG)
    return path


def invoke(*args: str | Path):
    """Run the CLI with stdout and stderr kept apart (click's runner never gives a terminal)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def shard_sizes(output: str) -> list[str]:
    return re.findall(r"^  (model\S*\.safetensors) ", output, re.MULTILINE)


def test_out_as_an_argument_is_the_same_run_as_out_flag(tmp_path, config, monkeypatch):
    """Each run in its own folder with the output named `out`: every file, the card included, is the same."""
    for folder, args in (("a", ["out"]), ("b", ["--out", "out"])):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        result = invoke("merge", "../merge.yml", *args, "-q")
        assert result.exit_code == 0, result.output
    assert folder_bytes(tmp_path / "a" / "out") == folder_bytes(tmp_path / "b" / "out")
    assert "shardsurgeon merge merge.yml out\n" in (tmp_path / "a" / "out" / "README.md").read_text()


def test_out_given_twice(tmp_path, config, monkeypatch):
    result = invoke("merge", config, tmp_path / "one", "--out", tmp_path / "two")
    assert result.exit_code == USAGE
    assert one_line(result.output) == (
        f"shardsurgeon: error: the output folder is given twice, as OUT {tmp_path / 'one'} and as --out "
        f"{tmp_path / 'two'}; give it once (see: shardsurgeon merge --help)"
    )
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()
    monkeypatch.chdir(tmp_path)
    same = invoke("merge", config, "one", "--out", tmp_path / "one", "-q")
    assert same.exit_code == 0, same.output


def test_a_pasted_mergekit_command_runs_with_one_note_per_flag(tmp_path, config):
    reference = invoke("merge", config, "--out", tmp_path / "reference", "-q")
    assert reference.exit_code == 0
    pasted = ["--cuda", "--lazy-unpickle", "--allow-crimes", "--out-shard-size", "5B", "--copy-tokenizer"]
    result = invoke("merge", config, tmp_path / "out", *pasted)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("shardsurgeon: note:")]
    assert notes == [
        "shardsurgeon: note: --cuda has no effect here: it picks the device mergekit computes on; shardsurgeon "
        "computes casts and scales on the CPU, to the same bits",
        "shardsurgeon: note: --lazy-unpickle has no effect here: it loads pickled .bin weights lazily; shardsurgeon "
        "reads safetensors only, headers first, tensors as they are written",
        "shardsurgeon: note: --allow-crimes has no effect here: it lets mergekit mix architectures by name; "
        "shardsurgeon checks that the models' tensor names and shapes agree instead",
        "shardsurgeon: note: --copy-tokenizer has no effect here: shardsurgeon always copies the base model's "
        "tokenizer files, as mergekit does by default",
    ]
    assert read_tensors(tmp_path / "out") == read_tensors(tmp_path / "reference")
    assert result.stdout == ""


IGNORED = [f for f in MERGEKIT_FLAGS if not f.refused]
EXAMPLES = {"DEVICE": "cuda:0", "N": "8", "DIR": "/nonexistent/lora", "DTYPE": "bfloat16"}
REFUSED = [f for f in MERGEKIT_FLAGS if f.refused]


@pytest.mark.parametrize("flag", IGNORED, ids=lambda f: f.flag)
def test_each_flag_without_effect_gets_one_note(tmp_path, config, flag):
    args = [flag.flag, EXAMPLES[flag.value]] if flag.value else [flag.flag]
    result = invoke("merge", config, "--dry-run", *args, *args)
    assert result.exit_code == 0, result.output
    assert one_line(result.stderr) == f"shardsurgeon: note: {flag.flag} has no effect here: {flag.why}"
    assert "dry run: nothing written" in result.stdout
    quiet = invoke("merge", config, "--dry-run", *args, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize("flag", REFUSED, ids=lambda f: f.flag)
def test_each_flag_that_would_change_the_output_is_refused(tmp_path, config, flag):
    before = folder_bytes(tmp_path / "m")
    result = invoke("merge", config, tmp_path / "out", "--cuda", flag.flag)
    assert result.exit_code == USAGE
    assert one_line(result.output) == (
        f"shardsurgeon: error: {flag.flag} is not supported: {flag.why} (see: shardsurgeon merge --help)"
    )
    assert not (tmp_path / "out").exists() and folder_bytes(tmp_path / "m") == before


@pytest.mark.parametrize(
    ("count", "nbytes"),
    [("2K", "2000"), ("2k", "2000"), ("3000", "3000"), ("1m", "1000000"), ("5B", "5000000000"), ("0", None)],
)
def test_out_shard_size_is_mergekit_s_count_of_bytes(config, count, nbytes):
    """K, M, B are thousands, millions, billions (mergekit's parse_kmb), compared with bytes; 0: one shard."""
    result = invoke("merge", config, "--dry-run", "--out-shard-size", count)
    assert result.exit_code == 0, result.output
    if nbytes is None:
        assert shard_sizes(result.stdout) == ["model.safetensors"]
        return
    assert shard_sizes(result.stdout) == shard_sizes(
        invoke("merge", config, "--dry-run", "--max-shard-size", nbytes).stdout
    )
    same = invoke("merge", config, "--dry-run", "--out-shard-size", count, "--max-shard-size", nbytes)
    assert same.exit_code == 0, same.output


def test_out_shard_size_written_down_as_max_shard_size(tmp_path, config):
    result = invoke("merge", config, tmp_path / "out", "--out-shard-size", "2K", "-q")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert "shardsurgeon merge merge.yml out --max-shard-size 2000\n" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("text", ["5GB", "1.5B", "-1", "B", "5T", "x" * 80])
def test_out_shard_size_that_mergekit_cannot_read(config, text):
    result = invoke("merge", config, "--dry-run", "--out-shard-size", text)
    assert result.exit_code == USAGE
    message = one_line(result.output)
    assert message.startswith("shardsurgeon: error: --out-shard-size ")
    assert "expected a whole number of bytes with an optional K, M or B (thousand, million, billion)" in message
    assert "for units such as GB or GiB use --max-shard-size" in message


def test_out_shard_size_and_max_shard_size_that_disagree(config):
    result = invoke("merge", config, "--dry-run", "--out-shard-size", "5B", "--max-shard-size", "5GiB")
    assert result.exit_code == USAGE
    assert one_line(result.output) == (
        "shardsurgeon: error: --out-shard-size is 5000000000 bytes but --max-shard-size is 5368709120 bytes; "
        "give one of them (see: shardsurgeon merge --help)"
    )


def test_transformers_cache_is_where_hub_ids_are_found(tmp_path, monkeypatch):
    cache = tmp_path / "elsewhere"
    entry = cache / "models--acme--tiny"
    data = write_tiny_checkpoint(entry / "snapshots" / "abc123", layers=2, shards=1)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    config = tmp_path / "hub.yml"
    config.write_text("models:\n  - model: acme/tiny\nmerge_method: passthrough\n")
    result = invoke("merge", config, tmp_path / "out", "--transformers-cache", cache, "-q")
    assert result.exit_code == 0, result.output
    assert read_tensors(tmp_path / "out")["lm_head.weight"][2] == data["lm_head.weight"]
    missing = invoke("merge", config, tmp_path / "out2")
    assert missing.exit_code == 1 and f"not in the Hugging Face cache ({tmp_path / 'empty'}" in missing.output


@pytest.mark.parametrize(
    ("source", "fix"),
    [
        (
            "model: acme/tiny\n      revision: v1.0",
            "slices[0].sources[0].revision: mergekit ignores this key and would load acme/tiny's default branch; "
            "to load revision v1.0, name it in the model: model: acme/tiny@v1.0",
        ),
        (
            "model: acme/tiny@v2\n      revision: v1.0",
            "slices[0].sources[0].revision: mergekit ignores this key; the model acme/tiny@v2 already names its "
            "revision (v2), so remove the revision key",
        ),
        (
            "model: ./m\n      revision: main",
            "slices[0].sources[0].revision: mergekit ignores this key, and ./m is a folder, which has no "
            "revisions; remove the revision key",
        ),
    ],
    ids=["hub id", "hub id with a revision", "folder"],
)
def test_revision_key_says_how_to_name_a_revision(tmp_path, source, fix):
    config = tmp_path / "rev.yml"
    config.write_text(f"slices:\n  - sources:\n    - {source}\n      layer_range: [0, 2]\nmerge_method: passthrough\n")
    result = invoke("merge", config, "--dry-run")
    assert result.exit_code == USAGE
    assert one_line(result.output) == f"shardsurgeon: error: {config}: {fix}"


def test_revision_key_in_the_models_form(tmp_path):
    config = tmp_path / "rev.yml"
    config.write_text("models:\n  - model: acme/tiny\n    revision: 0123abc\nmerge_method: passthrough\n")
    result = invoke("merge", config, "--dry-run")
    assert result.exit_code == USAGE
    assert "models[0].revision: mergekit ignores this key" in result.output
    assert "model: acme/tiny@0123abc" in one_line(result.output)


def test_help_shows_out_argument_and_the_shard_size_reading():
    result = run_cli("merge", "--help")
    assert "Usage: cli merge [OPTIONS] CONFIG [OUT]" in result.output
    assert "--out-shard-size COUNT" in result.output
    assert "5B is 5,000,000,000 bytes" in " ".join(result.output.split())
    options = result.output.split("Options:")[1]
    assert not re.search(r"^\s+--cuda", options, re.MULTILINE), "mergekit's flags stay out of the option list"
    assert "noted as having no effect" in " ".join(result.output.split())


def test_docs_list_every_mergekit_flag():
    page = (Path(__file__).parents[1] / "docs" / "formats.md").read_text()
    table = page.split("| mergekit-yaml flag |")[1].split("\n\n")[0]
    for flag in MERGEKIT_FLAGS:
        assert f"`{flag.flag}" in table, flag.flag


def test_notes_wait_until_the_config_is_planned(tmp_path):
    """A config error is the only line, even with flags to note."""
    config = tmp_path / "bad.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: m\n")
    result = invoke("merge", config, tmp_path / "out", "--cuda", "-j", "8")
    assert result.exit_code == USAGE
    assert "merge_method 'linear' is not supported" in one_line(result.output)


def test_no_output_folder(config):
    result = invoke("merge", config)
    assert result.exit_code == USAGE
    assert one_line(result.output) == (
        "shardsurgeon: error: give the output folder (OUT or --out) unless --dry-run or --plan-json is given "
        "(see: shardsurgeon merge --help)"
    )
