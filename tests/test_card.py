"""The model card (README.md of an output): fit to publish on the Hub, and runnable.

The card names models by their Hugging Face ids (a cache entry's ``models--org--name``, a config's
``_name_or_path`` of the form ``org/name``) or else by their folder names, the output by its folder
name, and the config of a merge by its file name, so no path of the machine that wrote it appears
in it; its front matter follows the Hub's conventions; its command and its mergekit config run
again where the models are found under those names, and give the same checkpoint.
"""

from __future__ import annotations

import json
import shlex
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import folder_bytes, read_tensors, run_cli, write_tiny_checkpoint

from shardsurgeon import card_names

SEED = ["--dup", "3x2", "--zero", "o_proj,down_proj"]


def cache_entry(cache: Path, model_id: str, layers: int = 4, card: str | None = None) -> Path:
    """A Hugging Face cache entry of ``model_id`` whose config does not name it (only the path does)."""
    entry = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = entry / "snapshots" / "0123abcd"
    write_tiny_checkpoint(snapshot, layers=layers, shards=2, extra_files={"README.md": card} if card else None)
    forget_name(snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return entry


def forget_name(folder: Path, name: str | None = None) -> None:
    """Drop the config's ``_name_or_path`` (so only the folder names the model), or set it to ``name``."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("_name_or_path", None)
    if name is not None:
        config["_name_or_path"] = name
    (folder / "config.json").write_text(json.dumps(config))


def model(folder: Path, *, name: str | None = None, card: str | None = None, layers: int = 4) -> Path:
    write_tiny_checkpoint(folder, layers=layers, shards=1, extra_files={"README.md": card} if card else None)
    forget_name(folder, name)
    return folder


def read_card(out: Path) -> tuple[dict[str, Any], str]:
    """The front matter (parsed) and the whole text of the card in ``out``."""
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)]), text


def fenced(card: str, language: str) -> str:
    return card.split(f"```{language}\n", 1)[1].split("\n```", 1)[0]


def ok(*args: str | Path) -> None:
    result = run_cli(*args)
    assert result.exit_code == 0, result.output


def no_machine_path(card: str, tmp_path: Path) -> None:
    for path in {str(tmp_path), str(tmp_path.resolve())}:
        assert path not in card


def test_an_expand_card_names_the_source_and_output_by_name_only(tmp_path):
    src = model(tmp_path / "models" / "src1b")
    ok("expand", "--src", src, *SEED, "--out", tmp_path / "work" / "src1b-6", "-q")
    front, card = read_card(tmp_path / "work" / "src1b-6")
    no_machine_path(card, tmp_path)
    assert "shardsurgeon expand --src src1b --dup 3x2 --zero o_proj,down_proj --out src1b-6\n" in card
    assert "model: src1b\n" in fenced(card, "yaml")
    assert front == {"library_name": "transformers", "tags": ["shardsurgeon", "mergekit", "merge", "block-expansion"]}


def test_a_cache_entry_is_named_by_its_hub_id_and_the_card_command_runs_from_the_cache(tmp_path, monkeypatch):
    entry = cache_entry(tmp_path / "hub", "acme/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ok("expand", "--src", entry, *SEED, "--out", tmp_path / "a" / "tiny-6", "-q")
    front, card = read_card(tmp_path / "a" / "tiny-6")
    no_machine_path(card, tmp_path)
    assert front["base_model"] == "acme/tiny-llama" and front["base_model_relation"] == "merge"
    assert "\n# acme/tiny-llama, 6 layers\n" in card
    command = fenced(card, "sh")
    assert command == "shardsurgeon expand --src acme/tiny-llama --dup 3x2 --zero o_proj,down_proj --out tiny-6"
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")  # someone with the model from the Hub runs the card's command
    ok(*shlex.split(command)[1:], "-q")
    assert folder_bytes(tmp_path / "b" / "tiny-6") == folder_bytes(tmp_path / "a" / "tiny-6")


def test_a_hub_id_that_is_not_cached_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    result = run_cli("expand", "--src", "acme/nowhere", "--dup", "1x1", "--out", "out")
    assert result.exit_code != 0 and "not in the Hugging Face cache" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_config_name_of_the_form_of_a_hub_id_names_the_model(tmp_path):
    src = model(tmp_path / "downloads" / "x", name="acme/tiny-7b")
    ok("expand", "--src", src, "--every", "2", "--out", tmp_path / "out", "-q")
    front, card = read_card(tmp_path / "out")
    assert front["base_model"] == "acme/tiny-7b"
    assert "shardsurgeon expand --src acme/tiny-7b --every 2 --out out\n" in card


@pytest.mark.parametrize(
    ("card", "config_license", "expected"),
    [
        ("---\nlicense: apache-2.0\ntags: [chat]\n---\n# a model\n", None, {"license": "apache-2.0"}),
        (
            "\ufeff---\r\nlicense: other\r\nlicense_name: tiny-license\r\nlicense_link: LICENSE\r\n---\r\n",
            None,
            {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"},
        ),
        ("no front matter here", "mit", {"license": "mit"}),
        ("---\nlicense: mit\ninjected: [\n---\n", None, {}),  # not YAML: no license, and no error
        ('---\nlicense: "mit\\ninjected: true"\n---\n', None, {}),  # not a license id
        ("---\nlicense: [mit, apache-2.0]\n---\n", None, {}),
    ],
    ids=["card", "other-with-name-and-link", "config", "broken-yaml", "not-an-id", "a-list"],
)
def test_a_license_is_carried_over_from_the_source_card_or_config(tmp_path, card, config_license, expected):
    src = model(tmp_path / "src", name="acme/tiny", card=card)
    if config_license:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "license": config_license}))
    ok("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out", "-q")
    front, text = read_card(tmp_path / "out")
    assert {k: v for k, v in front.items() if k.startswith("license")} == expected
    if expected:
        assert f"License: {expected['license']}, carried over from the base model's card or config." in text
    else:
        assert "icense" not in text


def test_a_source_card_that_is_not_text_or_too_large_gives_no_license(tmp_path):
    src = model(tmp_path / "src", name="acme/tiny")
    (src / "README.md").write_bytes(b"---\nlicense: mit\n---\n\xff\xfe")
    ok("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "a", "-q")
    (src / "README.md").write_bytes(b"---\nlicense: mit\n---\n" + b"x" * (1 << 20))
    ok("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "b", "-q")
    assert "license" not in read_card(tmp_path / "a")[0] and "license" not in read_card(tmp_path / "b")[0]


MERGE = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
merge_method: passthrough
base_model: {a}
dtype: bfloat16
"""


def test_a_merge_of_several_models(tmp_path, monkeypatch):
    """Models given by absolute and relative paths and by a Hub id: the card names each by its id or folder."""
    zoo = tmp_path / "zoo"
    model(zoo / "chat-a", card="---\nlicense: llama2\n---\n")
    model(zoo / "second", name="acme/base-b", card="---\nlicense: apache-2.0\n---\n")
    cache_entry(tmp_path / "hub", "acme/head-c", card="---\nlicense: apache-2.0\n---\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = tmp_path / "configs" / "frank.yml"
    config.parent.mkdir()
    config.write_text(MERGE.format(a="../zoo/chat-a", b=zoo / "second") + "# acme/head-c is not used\n")
    ok("merge", config, tmp_path / "out" / "frank-6", "--max-shard-size", "20KB", "-q")
    front, card = read_card(tmp_path / "out" / "frank-6")
    no_machine_path(card, tmp_path)
    assert front["base_model"] == "acme/base-b", "chat-a is known by its folder only, which is no Hub id"
    assert "license" not in front
    assert (
        "No license is set: the base models name different licenses (chat-a: llama2; acme/base-b: apache-2.0)" in card
    )
    assert "\n# chat-a + acme/base-b, 6 layers\n" in card
    assert "layers 0-2 are layers 0-2 of chat-a; layers 3-5 are layers 1-3 of acme/base-b (o_proj x0.5)" in card
    assert "config.json and the tokenizer from chat-a" in card and "saved as frank.yml" in card
    assert fenced(card, "sh") == "shardsurgeon merge frank.yml frank-6 --max-shard-size 20000"
    assert yaml.safe_load(fenced(card, "yaml")) == {
        "slices": [
            {"sources": [{"model": "chat-a", "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": "acme/base-b",
                        "layer_range": [1, 4],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                    }
                ]
            },
        ],
        "merge_method": "passthrough",
        "base_model": "chat-a",
        "dtype": "bfloat16",
    }

    # Where the models are found under the card's names, its config and command give the same
    # checkpoint, file for file, the card included.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(zoo / "chat-a", elsewhere / "chat-a")
    shutil.copytree(zoo / "second", elsewhere / "acme" / "base-b")
    (elsewhere / "frank.yml").write_text(fenced(card, "yaml") + "\n")
    monkeypatch.chdir(elsewhere)
    ok(*shlex.split(fenced(card, "sh"))[1:], "-q")
    assert folder_bytes(elsewhere / "frank-6") == folder_bytes(tmp_path / "out" / "frank-6")


def test_models_with_one_license_and_ids_from_the_cache(tmp_path, monkeypatch):
    cache_entry(tmp_path / "hub", "acme/a", card="---\nlicense: apache-2.0\n---\n")
    cache_entry(tmp_path / "hub", "other/b", card="---\nlicense: apache-2.0\n---\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = tmp_path / "m.yml"
    config.write_text(MERGE.format(a="acme/a", b="other/b@0123abcd").replace("base_model: acme/a\n", ""))
    ok("merge", config, tmp_path / "out", "-q")
    front, card = read_card(tmp_path / "out")
    assert front["base_model"] == ["acme/a", "other/b"] and front["license"] == "apache-2.0"
    assert "License: apache-2.0, carried over from the base models, which all name it." in card
    assert "model: other/b@0123abcd\n" in fenced(card, "yaml"), "the revision asked for is kept"


def test_two_models_with_one_config_name_stay_two_models(tmp_path):
    """Fine-tunes keep their base's id in _name_or_path: naming both by it would merge them into one."""
    model(tmp_path / "zoo" / "tune-1", name="acme/base")
    model(tmp_path / "zoo" / "tune-2", name="acme/base")
    config = tmp_path / "zoo" / "m.yml"
    config.write_text(MERGE.format(a="tune-1", b="tune-2"))
    ok("merge", config, tmp_path / "out", "-q")
    front, card = read_card(tmp_path / "out")
    assert front["base_model"] == "acme/base"
    names = [s["sources"][0]["model"] for s in yaml.safe_load(fenced(card, "yaml"))["slices"]]
    assert names == ["tune-1", "tune-2"]
    (tmp_path / "again").mkdir()
    (tmp_path / "zoo" / "card.yml").write_text(fenced(card, "yaml"))
    ok("merge", tmp_path / "zoo" / "card.yml", tmp_path / "again" / "out", "-q")
    assert tensors(tmp_path / "again" / "out") == tensors(tmp_path / "out")


def test_card_names_are_one_per_folder():
    a, b, c = Path("/x/a"), Path("/y/a"), Path("/z/c")
    assert card_names([("acme/m@v1", a, "acme/m"), ("/x/a", a, "acme/m")]) == {
        "acme/m@v1": "acme/m@v1",
        "/x/a": "acme/m",
    }
    assert card_names([("p", a, "acme/m"), ("q", b, "acme/m"), ("r", c, "a")]) == {"p": "a", "q": "a-2", "r": "a-3"}
    assert card_names([("p", a, "a"), ("./p", a, "a")]) == {"p": "a", "./p": "a"}


def tensors(folder: Path) -> dict[str, tuple[Any, ...]]:
    """Each tensor's dtype, shape and bytes (not where it lies: the shards record their recipe)."""
    return {name: value[:3] for name, value in read_tensors(folder).items()}


@pytest.mark.parametrize("kind", ["folder", "config-id", "cache"])
def test_the_mergekit_config_of_an_expand_card_runs_back_to_the_same_tensors(tmp_path, monkeypatch, kind):
    zoo = tmp_path / "zoo"
    if kind == "cache":
        src = cache_entry(tmp_path / "hub", "acme/tiny")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    elif kind == "config-id":
        src = model(zoo / "acme" / "tiny", name="acme/tiny")
    else:
        src = model(zoo / "tiny")
    recipe = ["--every", "2", "--zero", "o_proj,down_proj,norm", "--dtype", "float16"]
    ok("expand", "--src", src, *recipe, "--out", tmp_path / "e", "-q")
    _, card = read_card(tmp_path / "e")
    config = yaml.safe_load(fenced(card, "yaml"))
    assert {s["sources"][0]["model"] for s in config["slices"]} == {"tiny" if kind == "folder" else "acme/tiny"}
    zoo.mkdir(exist_ok=True)
    (zoo / "card.yml").write_text(fenced(card, "yaml"))  # next to the models, named as the card names them
    ok("merge", zoo / "card.yml", tmp_path / "m", "-q")
    assert tensors(tmp_path / "m") == tensors(tmp_path / "e")


def test_descriptions_read_as_groups(tmp_path):
    src = model(tmp_path / "m", name="acme/m", layers=32)
    ok("expand", "--src", src, "--dup", "31x12", "--zero", "o_proj,down_proj", "--out", tmp_path / "seed", "-q")
    card = read_card(tmp_path / "seed")[1]
    assert (
        "Expanded acme/m from 32 to 44 layers by inserting 12 copies of layer 31 after it (output layers 32-43), "
        "with every tensor of the copies whose name contains down_proj or o_proj set to zero, so each new block "
        "passes its input through unchanged" in card
    )
    ok("expand", "--src", src, "--every", "8", "--zero", "o_proj", "--out", tmp_path / "every", "-q")
    card = read_card(tmp_path / "every")[1]
    assert "by inserting after each of layers 7, 15, 23 and 31 a copy of it (output layers 8, 17, 26 and 35)" in card
    assert "unchanged" not in card, "the MLP of each copy still writes into the residual stream"
    seed = textwrap.dedent(
        """\
        slices:
          - sources:
            - model: m
              layer_range: [0, 32]
        """
    ) + "".join(
        "  - sources:\n    - model: m\n      layer_range: [31, 32]\n      parameters:\n        scale:\n"
        "          - {filter: o_proj, value: 0}\n          - {filter: down_proj, value: 0}\n          - {value: 1}\n"
        for _ in range(12)
    )
    (tmp_path / "seed.yml").write_text(seed + "merge_method: passthrough\n")
    ok("merge", tmp_path / "seed.yml", tmp_path / "merged", "-q")
    card = read_card(tmp_path / "merged")[1]
    assert (
        "A passthrough merge into 44 layers: layers 0-31 are layers 0-31 of acme/m; layers 32-43 are 12 copies "
        "of layer 31 of acme/m (o_proj, down_proj zero)." in card
    )


def test_every_way_of_writing_a_job_records_the_same_card(tmp_path):
    """One process, --jobs 2, and a plan file applied in parts then finalized, each to an output of
    the same name in another folder: the same README.md (and the same files)."""
    src = model(tmp_path / "models" / "src", name="acme/src", card="---\nlicense: mit\n---\n")
    recipe = ["--dup", "2x2", "--zero", "o_proj,down_proj", "--max-shard-size", "3KB"]
    ok("expand", "--src", src, *recipe, "--out", tmp_path / "one" / "out", "-q")
    ok("expand", "--src", src, *recipe, "--out", tmp_path / "jobs" / "out", "--jobs", "2", "-q")
    ok("expand", "--src", src, *recipe, "--plan-json", tmp_path / "plan.json")
    ok("apply", tmp_path / "plan.json", tmp_path / "parts" / "out", "--shards", "1/2", "-q")
    ok("apply", tmp_path / "plan.json", tmp_path / "parts" / "out", "--shards", "2/2", "-q")
    ok("apply", tmp_path / "plan.json", tmp_path / "parts" / "out", "--finalize", "-q")
    reference = folder_bytes(tmp_path / "one" / "out")
    assert len([name for name in reference if name.endswith(".safetensors")]) > 1
    no_machine_path(reference["README.md"].decode(), tmp_path)
    assert folder_bytes(tmp_path / "jobs" / "out") == reference
    assert folder_bytes(tmp_path / "parts" / "out") == reference
