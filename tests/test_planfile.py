"""A plan file is data anyone can edit: every field given a wrong type, a huge value, a missing key
or broken quoting is one clean line naming the field, through the API and the CLI; a plan file
left alone loads back into the very same job."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, write_tiny_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsurgeon import ShardSurgeonError, load_plan_file, plan_expand, plan_file_bytes


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("planfile")
    write_tiny_checkpoint(root / "src", layers=4, shards=2)
    job = plan_expand(root / "src", dups=[(3, 2)], zero=["o_proj"], max_shard_bytes=3000)
    record = json.loads(plan_file_bytes(job, "shardsurgeon expand --src src --dup 3x2 --zero o_proj"))
    return root, record


def fields(value: Any, path: str = "") -> list[tuple[str, list[Any]]]:
    """Every field of the job record and the top-level shards, as (shown path, key path)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if not path and key not in ("job", "shards", "fingerprint"):
                continue  # the rest is the plan in words, for people: not read back
            if path.startswith("shards[") and key not in ("name", "nbytes"):
                continue
            shown = f"{path}.{key}" if path else key
            found.append((shown, [key]))
            found += [(s, [key, *keys]) for s, keys in fields(item, shown)]
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            shown = f"{path}[{index}]"
            found.append((shown, [index]))
            found += [(s, [index, *keys]) for s, keys in fields(item, shown)]
    return found


def write(root: Path, record: dict[str, Any]) -> Path:
    path = root / "edited.json"
    path.write_text(json.dumps(record))
    return path


def test_a_plan_file_loads_back_into_the_same_job(planned):
    root, record = planned
    job = load_plan_file(write(root, record)).job
    assert job.plan.fingerprint == record["fingerprint"]
    assert [s.name for s in job.layout.shards] == [s["name"] for s in record["shards"]]


def test_a_command_with_an_unbalanced_quote_is_one_line_naming_it(planned, tmp_path):
    root, record = planned
    edited = copy.deepcopy(record)
    edited["job"]["command"] = "shardsurgeon expand --src 'src --dup 3x2"
    result = run_cli("apply", write(root, edited), tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "job.command: cannot be split into words (No closing quotation)" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("job.format", 1, "job.format: expected 2, found 1"),
        ("job.max_shard_bytes", 10**40, "job.max_shard_bytes: expected a whole number from 1 to"),
        ("job.max_shard_bytes", True, "job.max_shard_bytes: expected a whole number"),
        ("job.sources[0].files[0].inode", "12", "job.sources[0].files[0].inode: expected a whole number"),
        ("job.sources[0].files[0].mtime_ns", -1, "job.sources[0].files[0].mtime_ns: expected a whole number"),
        ("job.sources[0].folder", "", "job.sources[0].folder: expected a folder path or URL"),
        ("job.sources[0].folder", "a\0b", "job.sources[0].folder: expected a folder path or URL"),
        ("job.sources[0].files", "x" * 10**6, "job.sources[0].files: expected a list, found"),
        ("job.stack_hint.prefix", 3, "job.stack_hint.prefix: expected text, found 3"),
        ("job.recipe", "{", "job.recipe: recorded recipe is unreadable"),
        ("shards[0].nbytes", "1", "shards[0].nbytes: expected a whole number"),
        ("job.description", None, "job.description: expected text, found null"),
    ],
)
def test_a_wrong_field_is_one_line_naming_it(planned, tmp_path, field, value, said):
    root, record = planned
    edited = copy.deepcopy(record)
    target, keys = edited, dict(fields(record))[field]
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    result = run_cli("apply", write(root, edited), tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert said in result.output, result.output


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["'", '"', "\\", "shardsurgeon '", "\0", "../..", "s3://", "http://[::1"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_a_field_is_accepted_or_one_line_naming_it(planned, data):
    """Each field replaced by a value of any type, or removed: the job loads, or one line says why;
    a field given a value of another type is named in that line."""
    root, record = planned
    shown, keys = data.draw(st.sampled_from(fields(record)), label="field")
    edited = copy.deepcopy(record)
    target = edited
    for key in keys[:-1]:
        target = target[key]
    original = target[keys[-1]]
    removed = data.draw(st.booleans(), label="remove")
    if removed:
        del target[keys[-1]]
    else:
        target[keys[-1]] = data.draw(VALUES, label="value")
    name = str(keys[-1])
    optional = name in ("validator", "modified", "prefix", "count_key", "racy", "router_file")
    accepted = {type(original)} | ({bool} if name == "racy" else {str, type(None)} if optional else set())
    try:
        load_plan_file(write(root, edited))
    except ShardSurgeonError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 2000, message
        if removed and isinstance(target, dict) and not optional:
            assert f"{shown}: missing" in message, message
        elif not removed and type(target[keys[-1]]) not in accepted:
            assert f"{shown}: " in message, message
    else:
        assert removed or type(target[keys[-1]]) in accepted, f"{shown} = {target[keys[-1]]!r} was accepted"
