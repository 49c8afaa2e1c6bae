"""User mistakes through the CLI: one line naming the flag or file, exit 2 for usage and 1 for data,
no traceback, nothing created, the source untouched. Plus interruption and resume."""

from __future__ import annotations

import pytest
from conftest import folder_bytes, run_cli, write_tiny_checkpoint

from shardsurgeon.write import smallfiles
from shardsurgeon.write.executor import ShardWriter

USAGE, DATA = 2, 1


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


BAD_ARGUMENTS = [  # the rest of the argument errors are in test_hostile's corpus, with their whole message
    (["--dup", "x"], USAGE, "--dup 'x': expected LxN (N copies of layer L) such as 31x12"),
    (["--dup", "3x1", "--zero", "o_proj,,x"], USAGE, "--zero 'o_proj,,x': expected comma-separated"),
    (["--dup", "3x1", "--layers-key", "n_layers"], DATA, "--layers-key 'n_layers': config.json has no such key"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_ARGUMENTS, ids=lambda v: str(v))
def test_wrong_arguments(tmp_path, tiny, args, code, message):
    src, _ = tiny
    before = folder_bytes(src)
    result = run_cli("expand", "--src", src, "--out", tmp_path / "out", *args)
    assert result.exit_code == code, result.output
    assert message in one_line_error(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert folder_bytes(src) == before


def test_output_inside_or_equal_to_source_is_refused(tmp_path, tiny):
    src, _ = tiny
    before = folder_bytes(src)
    for out in (src, src / "sub", tmp_path):
        result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", out, "--force")
        assert result.exit_code == USAGE, result.output
        assert "--out" in one_line_error(result.output)
    assert folder_bytes(src) == before
    assert sorted(p.name for p in src.iterdir()) == sorted(before)


def test_existing_output_needs_force(tmp_path, tiny):
    src, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", out)
    assert result.exit_code == USAGE
    assert "folder exists and is not empty; pass --force" in one_line_error(result.output)
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("expand", "--src", src, "--dup", "1x1", "--out", out, "--force", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and any(out.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_empty_output_folder_is_used(tmp_path, tiny):
    src, _ = tiny
    (tmp_path / "out").mkdir()
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0 and result.output == ""
    assert {"config.json", "README.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert any((tmp_path / "out").glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_interrupted_run_leaves_no_output_and_resumes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_tiny_checkpoint(src, layers=4, shards=2)
    args = ["expand", "--src", src, "--dup", "3x2", "--zero", "o_proj", "--max-shard-size", "2KB"]
    assert run_cli(*args, "--out", tmp_path / "reference", "-q").exit_code == 0
    shard_count = len(list((tmp_path / "reference").glob("*.safetensors")))
    assert shard_count >= 3

    real_write = ShardWriter.write
    calls = []

    def interrupted(self, shard, path):
        calls.append(shard.name)
        if len(calls) == 3:
            real_write(self, shard, path)  # a partial file is on disk when the interrupt comes
            raise KeyboardInterrupt
        return real_write(self, shard, path)

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 130
    assert "interrupted; run the same command again to resume" in one_line_error(result.output)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(ShardWriter, "write", real_write)
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "(2 kept from an earlier run)" in result.output
    reference, resumed = folder_bytes(tmp_path / "reference"), folder_bytes(tmp_path / "out")
    reference["README.md"] = reference["README.md"].replace(b"--out reference\n", b"--out out\n")
    assert resumed == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference", "src"]


def test_leftover_of_another_recipe_is_not_reused(tmp_path, tiny, monkeypatch):
    src, _ = tiny
    out = tmp_path / "out"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(smallfiles, "write_index", interrupt)
    assert run_cli("expand", "--src", src, "--dup", "3x1", "--max-shard-size", "2KB", "--out", out).exit_code == 130
    monkeypatch.undo()
    result = run_cli("expand", "--src", src, "--dup", "2x1", "--max-shard-size", "2KB", "--out", out)
    assert result.exit_code == 0 and "kept" not in result.output
    assert (
        run_cli("expand", "--src", src, "--dup", "2x1", "--max-shard-size", "2KB", "--out", tmp_path / "ref").exit_code
        == 0
    )
    produced, reference = folder_bytes(out), folder_bytes(tmp_path / "ref")
    reference["README.md"] = reference["README.md"].replace(b"--out ref\n", b"--out out\n")
    assert produced == reference


def test_help_and_version():
    assert "expand" in run_cli("--help").output
    assert run_cli("-h").exit_code == 0
    assert "shardsurgeon, version" in run_cli("--version").output
    assert "--dup" in run_cli("expand", "--help").output


def test_out_is_required_to_write(tiny):
    src, _ = tiny
    result = run_cli("expand", "--src", src, "--dup", "1x1")
    assert result.exit_code == USAGE
    assert "--out is required" in result.output


def test_output_that_cannot_be_renamed_into_place_is_refused(tmp_path, tiny, monkeypatch):
    src, _ = tiny
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", ".")
    assert result.exit_code == USAGE
    assert "holds the current folder" in one_line_error(result.output)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--out", tmp_path / "link")
    assert result.exit_code == USAGE
    assert "is a symbolic link; give the folder it points to" in one_line_error(result.output)
    assert list(here.iterdir()) == [] and list((tmp_path / "target").iterdir()) == []


def test_plan_json_is_never_written_into_the_source(tmp_path, tiny):
    src, _ = tiny
    before = folder_bytes(src)
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--plan-json", src / "config.json")
    assert result.exit_code == USAGE
    assert "--plan-json" in one_line_error(result.output) and "is inside the source" in result.output
    assert folder_bytes(src) == before
    result = run_cli("expand", "--src", src, "--dup", "1x1", "--plan-json", tmp_path / "missing" / "plan.json")
    assert result.exit_code == DATA
    assert "cannot write: No such file or directory" in one_line_error(result.output)


def test_absurd_copy_counts_are_refused(tmp_path, tiny):
    src, _ = tiny
    result = run_cli("expand", "--src", src, "--dup", "0x999999999", "--out", tmp_path / "out")
    assert result.exit_code == USAGE
    assert "more than the 10000 supported" in one_line_error(result.output)
