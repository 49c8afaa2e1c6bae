"""`--dry-run`: the plan in words, one line per run of output layers, and the flags' names in --help."""

from __future__ import annotations

import textwrap

import pytest
from conftest import run_cli, write_tiny_checkpoint


def layer_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("output ")]


@pytest.fixture
def model32(tmp_path):
    write_tiny_checkpoint(tmp_path / "m", layers=32, shards=1)
    return tmp_path / "m"


def test_seed_recipe_is_two_lines(model32):
    result = run_cli("expand", "--src", model32, "--dup", "31x12", "--zero", "o_proj,down_proj", "--dry-run")
    assert result.exit_code == 0, result.output
    assert layer_lines(result.output) == [
        "output    0-31 <- layers 0-31",
        "output   32-43 <- 12 copies of layer 31 [o_proj, down_proj zero]",
    ]


@pytest.mark.parametrize(
    ("recipe", "lines"),
    [
        (
            ["--dup", "3x1,1x2", "--zero", "mlp"],
            [
                "output     0-1 <- layers 0-1",
                "output     2-3 <- 2 copies of layer 1 [mlp zero]",
                "output     4-5 <- layers 2-3",
                "output       6 <- copy of layer 3 [mlp zero]",
                "output     7-8 <- layers 4-5",
            ],
        ),
        (
            ["--every", "3"],
            [
                "output     0-2 <- layers 0-2",
                "output       3 <- copy of layer 2",
                "output     4-6 <- layers 3-5",
                "output       7 <- copy of layer 5",
            ],
        ),
    ],
    ids=["dups", "every"],
)
def test_expand_runs(tmp_path, recipe, lines):
    write_tiny_checkpoint(tmp_path / "m", layers=6, shards=1)
    result = run_cli("expand", "--src", tmp_path / "m", *recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert layer_lines(result.output) == lines


def test_seed_yaml_reads_as_the_seed_recipe(model32, tmp_path):
    """The mergekit form of the seed recipe (12 one-layer slices with a catch-all scale of 1) in the same words."""
    copy = """\
      - sources:
        - model: m
          layer_range: [31, 32]
          parameters:
            scale:
              - {filter: o_proj, value: 0.0}
              - {filter: down_proj, value: 0.0}
              - {value: 1.0}
    """
    head = "slices:\n  - sources:\n    - model: m\n      layer_range: [0, 32]\n"
    config = tmp_path / "seed.yml"
    config.write_text(head + textwrap.indent(textwrap.dedent(copy), "  ") * 12 + "merge_method: passthrough\n")
    result = run_cli("merge", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert layer_lines(result.output) == [
        "output    0-31 <- layers 0-31",
        "output   32-43 <- 12 copies of layer 31 [o_proj, down_proj zero]",
    ]


def test_merge_of_two_models_and_mixed_scales(tmp_path):
    write_tiny_checkpoint(tmp_path / "a", layers=4, shards=1)
    write_tiny_checkpoint(tmp_path / "b", layers=4, shards=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        textwrap.dedent(
            """\
            slices:
              - sources:
                - model: a
                  layer_range: [0, 3]
              - sources:
                - model: b
                  layer_range: [1, 4]
                  parameters:
                    scale:
                      - {filter: o_proj, value: 0.0}
                      - {filter: down_proj, value: 0.0}
                      - {filter: norm, value: 1.0}
                      - {value: 0.5}
            merge_method: passthrough
            """
        )
    )
    result = run_cli("merge", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert layer_lines(result.output) == [
        "output     0-2 <- layers 0-2 of a",
        "output     3-5 <- layers 1-3 of b [o_proj, down_proj zero; norm x1; all x0.5]",
    ]


@pytest.mark.parametrize(
    ("command", "shown"),
    [("expand", ["--dup LxN", "--every STEP", "--zero NAME[,NAME...]", "--max-shard-size SIZE"])],
)
def test_help_names_values_as_the_help_text_does(command, shown):
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    for text in shown:
        assert text in result.output, text
    assert "LXN" not in result.output and "INTEGER RANGE" not in result.output
