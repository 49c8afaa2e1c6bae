"""The plan as a file: what ``--plan-json`` writes, and a job read back from it by ``apply``.

The file is the plan in words and numbers (:func:`report.plan_dict`: every tensor, its op, source,
shard and offset) plus a ``job`` record that lets any process, on any machine that sees the same
source paths, rebuild the very same job: the recipe, each source's folder and the version of each
of its files (:class:`~shardsurgeon.storage.versions.SourceVersion`: device, inode, size, times and
header digest, or for a URL the ETag or Last-Modified time), the layer-stack hint, the shard size,
the model card's texts, and the file of routers with its version, if the recipe names one.
Reading it back re-plans from the sources and refuses, in one line, sources that are no longer the
versions recorded, and a plan that no longer comes out the same (other headers, or another
shardsurgeon version). Output bytes never depend on which process wrote
a shard, so a plan can be split among writers (``apply --shards``) and finalized once.

The file may have been edited by hand: every field is checked for its type and bounds before it is
used, and anything wrong is one line naming the field.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from shardsurgeon.errors import CheckpointError, OutputError, PlanError, RecipeError, safe_text
from shardsurgeon.model.arch import StackHint
from shardsurgeon.model.routerfile import RouterFile, open_router_file
from shardsurgeon.model.source import Source, open_source
from shardsurgeon.plan.job import Job, job_layout
from shardsurgeon.plan.planner import make_plan
from shardsurgeon.plan.recipe import recipe_from_json, recipe_to_json, recorded_models, recorded_router_file
from shardsurgeon.plan.report import plan_dict
from shardsurgeon.storage.overlap import check_outside_sources
from shardsurgeon.storage.remote import file_name, is_url, join_name
from shardsurgeon.storage.smallfile import MAX_JSON_BYTES, check_writable_target, read_small
from shardsurgeon.storage.versions import SourceVersion, describe_change
from shardsurgeon.units import MAX_SIZE_BYTES

FORMAT = 2
"""2: sources recorded as versions (device, inode, times, header; a URL's validator)."""
MAX_TEXT_CHARS = 1 << 20
MAX_SOURCES = 1000
MAX_FILES = 100_000


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """A job read back from a plan file, with the command line (without the output) that made it."""

    job: Job
    command: str

    def command_to(self, out: Path | str) -> str:
        """The command line of a run writing this job to ``out``, as the model card records it: the
        output by its folder name only (the card leaks no path, and every writer of a plan, in any
        working folder, records the same), after ``merge``'s config as mergekit-yaml writes it
        (``merge CONFIG OUT``), else as ``--out OUT``."""
        words = shlex.split(self.command)
        name = os.path.basename(os.path.abspath(out)) if not is_url(out) else str(out).rstrip("/").rpartition("/")[2]
        if words[1:2] == ["merge"]:
            return shlex.join([*words[:3], name, *words[3:]])
        return shlex.join([*words, "--out", name])


def plan_file_bytes(job: Job, command: str) -> bytes:
    """The plan file of ``job``; ``command`` is its command line without ``--out``."""
    record = plan_dict(job.plan, job.layout)
    record["job"] = {
        "format": FORMAT,
        "recipe": recipe_to_json(job.recipe, {}),
        "sources": [_source_record(source) for source in job.sources.values()],
        "router_file": None if job.router_file is None else _router_file_record(job.router_file),
        "stack_hint": {"prefix": job.stack_hint.prefix, "count_key": job.stack_hint.count_key},
        "max_shard_bytes": job.max_shard_bytes,
        "description": job.description,
        "mergekit_yaml": job.mergekit_yaml,
        "command": command,
    }
    return orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n"


def write_plan_file(job: Job, path: Path, command: str) -> None:
    """Save the plan file at ``path``, which must not lie inside a source nor be a FIFO or device."""
    folders = [s.folder for s in job.sources.values() if isinstance(s.folder, Path)]
    files, lone_files = job.local_files()
    check_outside_sources(path, folders, "--plan-json", "file", files=files, lone_files=lone_files)
    check_writable_target(path, OutputError, "--plan-json")
    try:
        path.write_bytes(plan_file_bytes(job, command))
    except OSError as e:
        raise OutputError(f"--plan-json {safe_text(path)}: cannot write: {e.strerror or e}") from None


def _source_record(source: Source) -> dict[str, Any]:
    return {
        "reference": source.reference,
        "folder": str(source.folder.absolute()) if isinstance(source.folder, Path) else source.folder,
        "files": [shard.version.as_record() for shard in source.checkpoint.shards],
    }


def _router_file_record(router_file: RouterFile) -> dict[str, Any]:
    where = router_file.shard.path
    return {
        "reference": str(where.absolute()) if isinstance(where, Path) else where,
        "file": router_file.shard.version.as_record(),
    }


def load_plan_file(path: Path) -> PlannedJob:
    """The job of the plan file at ``path``, re-planned from its sources, which must be the versions
    the file records."""
    shown = safe_text(path)
    try:
        record = orjson.loads(read_small(path, MAX_JSON_BYTES, PlanError, "a plan file"))
    except orjson.JSONDecodeError as e:
        raise PlanError(f"{shown}: not a plan file: not JSON ({safe_text(str(e), 80)}); write one with "
                        "expand|merge ... --plan-json FILE") from None  # fmt: skip
    try:
        return _load(record, shown)
    except _FieldError as e:
        raise PlanError(
            f"{shown}: {e.field}: {e.problem}; the file was edited or is not a plan file of this shardsurgeon "
            "version: make the plan again with expand|merge ... --plan-json FILE"
        ) from None


class _FieldError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _load(record: Any, shown: str) -> PlannedJob:
    top = _object(record, "the file")
    job = _object(_get(top, "job", "job"), "job")
    if (found := _get(job, "format", "job.format")) != FORMAT:
        raise _FieldError("job.format", f"expected {FORMAT}, found {_shown(found)}")
    hint_record = _object(_get(job, "stack_hint", "job.stack_hint"), "job.stack_hint")
    hint = StackHint(
        _text(hint_record.get("prefix"), "job.stack_hint.prefix", optional=True),
        _text(hint_record.get("count_key"), "job.stack_hint.count_key", optional=True),
    )
    source_records = _list(_get(job, "sources", "job.sources"), "job.sources", MAX_SOURCES)
    sources: dict[str, Source] = {}
    for number, item in enumerate(source_records):
        at = f"job.sources[{number}]"
        source_record = _object(item, at)
        reference = _text(_get(source_record, "reference", f"{at}.reference"), f"{at}.reference")
        if reference in sources:
            raise _FieldError(f"{at}.reference", f"{_shown(reference)} is recorded twice")
        sources[reference] = _reopen(source_record, at, hint, shown)
    recipe_text = _text(_get(job, "recipe", "job.recipe"), "job.recipe")
    router_file = _reopen_router_file(job.get("router_file"), recorded_router_file(recipe_text), shown)
    max_shard_bytes = _count(
        _get(job, "max_shard_bytes", "job.max_shard_bytes"), "job.max_shard_bytes", 1, MAX_SIZE_BYTES
    )
    description = _text(_get(job, "description", "job.description"), "job.description")
    mergekit_yaml = _text(_get(job, "mergekit_yaml", "job.mergekit_yaml"), "job.mergekit_yaml")
    command = _text(_get(job, "command", "job.command"), "job.command")
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise _FieldError("job.command", f"cannot be split into words ({e})") from None
    if words[:1] != ["shardsurgeon"] or len(words) < 2:
        raise _FieldError("job.command", f"expected a shardsurgeon command line, found {_shown(command)}")
    try:
        references = recorded_models(recipe_text)
        if sorted(references) != sorted(sources):
            raise _FieldError(
                "job.recipe", f"names the models {_shown(references)}, job.sources {_shown(list(sources))}"
            )
        reference = None if router_file is None else router_file.reference
        recipe = recipe_from_json(recipe_text, references, lambda model: sources[model].layer_count, reference)
    except RecipeError as e:
        raise _FieldError("job.recipe", str(e)) from None
    plan = make_plan(recipe, sources, router_file)
    layout = job_layout(recipe, plan, sources, max_shard_bytes, router_file)
    fingerprint = _text(_get(top, "fingerprint", "fingerprint"), "fingerprint")
    planned = []
    for number, item in enumerate(_list(_get(top, "shards", "shards"), "shards", MAX_FILES)):
        shard = _object(item, f"shards[{number}]")
        name = _text(_get(shard, "name", f"shards[{number}].name"), f"shards[{number}].name")
        planned.append(
            (
                name,
                _count(
                    _get(shard, "nbytes", f"shards[{number}].nbytes"), f"shards[{number}].nbytes", 0, MAX_SIZE_BYTES
                ),
            )
        )
    if plan.fingerprint != fingerprint or planned != [(s.name, s.nbytes) for s in layout.shards]:
        raise PlanError(
            f"{shown}: planning again from its sources gives another plan (fingerprint {plan.fingerprint}, the "
            f"file records {safe_text(fingerprint, 40)}); the sources' headers or the shardsurgeon version changed: "
            "make the plan again"
        )
    rebuilt = Job(sources, recipe, plan, layout, description, mergekit_yaml, max_shard_bytes, hint, router_file)
    return PlannedJob(rebuilt, command)


def _reopen(record: dict[str, Any], at: str, hint: StackHint, shown: str) -> Source:
    """The source as the file records it, opened again: each file must be the version recorded."""
    folder_text = _text(_get(record, "folder", f"{at}.folder"), f"{at}.folder")
    if "\0" in folder_text or not folder_text:
        raise _FieldError(f"{at}.folder", "expected a folder path or URL")
    folder: Path | str = folder_text if is_url(folder_text) else Path(folder_text)
    files = _list(_get(record, "files", f"{at}.files"), f"{at}.files", MAX_FILES)
    try:
        recorded = [SourceVersion.from_record(item, f"{at}.files[{number}]") for number, item in enumerate(files)]
    except ValueError as e:
        raise _FieldError(*e.args) from None
    source = open_source(folder, hint, str(_get(record, "reference", f"{at}.reference")))
    now = {file_name(shard.path): shard.version for shard in source.checkpoint.shards}
    if sorted(now) != sorted(v.name for v in recorded):
        raise CheckpointError(
            f"{safe_text(folder)}: holds the shards {_shown(sorted(now))} but the plan {shown} was made from "
            f"{_shown(sorted(v.name for v in recorded))}; make the plan again"
        )
    for version in recorded:
        if not version.same_as(now[version.name]):
            raise CheckpointError(
                f"{safe_text(join_name(folder, version.name))}: changed since the plan {shown} was made "
                f"({describe_change(version, now[version.name])}); make the plan again"
            )
    racy = {version.name for version in recorded if version.racy}  # as the plan saw it: still no proof
    shards = tuple(
        replace(shard, version=replace(shard.version, racy=True)) if file_name(shard.path) in racy else shard
        for shard in source.checkpoint.shards
    )
    return replace(source, checkpoint=replace(source.checkpoint, shards=shards))


def _reopen_router_file(record: Any, named: str | None, shown: str) -> RouterFile | None:
    """The file of routers as the plan file records it (absent in plan files made before routers
    came from files: none), opened again: it must be the version recorded, and the one the recipe
    names (``named``, by file name) if and only if there is one."""
    if (record is None) != (named is None):
        problem = "expected null: the recipe reads its routers from no file" if named is None else "missing"
        raise _FieldError("job.router_file", f"{problem} (the recipe names {_shown(named)})")
    if record is None:
        return None
    record = _object(record, "job.router_file")
    if not {"reference", "file"} & record.keys():
        raise _FieldError("job.router_file", f"expected null or an object of reference and file, not {_shown(record)}")
    reference = _text(_get(record, "reference", "job.router_file.reference"), "job.router_file.reference")
    if "\0" in reference or not reference:
        raise _FieldError("job.router_file.reference", "expected a file path or URL")
    try:
        recorded = SourceVersion.from_record(_get(record, "file", "job.router_file.file"), "job.router_file.file")
    except ValueError as e:
        raise _FieldError(*e.args) from None
    opened = open_router_file(reference)
    now = opened.shard.version
    if not recorded.same_as(now):
        raise CheckpointError(
            f"{safe_text(reference)}: the file of routers changed since the plan {shown} was made "
            f"({describe_change(recorded, now)}); make the plan again"
        )
    if recorded.racy:  # as the plan saw it: still no proof
        return replace(opened, shard=replace(opened.shard, version=replace(now, racy=True)))
    return opened


def _get(record: dict[str, Any], key: str, field: str) -> Any:
    if key not in record:
        raise _FieldError(field, "missing")
    return record[key]


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _FieldError(field, f"expected an object, found {_shown(value)}")
    return value


def _list(value: Any, field: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise _FieldError(field, f"expected a list, found {_shown(value)}")
    if len(value) > limit:
        raise _FieldError(field, f"lists {len(value)} entries, more than the {limit} a plan can have")
    return value


def _text(value: Any, field: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _FieldError(field, f"expected text, found {_shown(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _FieldError(field, f"is {len(value)} characters long, more than {MAX_TEXT_CHARS}")
    return value


def _count(value: Any, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _FieldError(field, f"expected a whole number from {low} to {high}, found {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list) and len(value) > 5:
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    return safe_text(repr(value), 60)
