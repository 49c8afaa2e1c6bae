"""The plan as a file: what ``--plan-json`` writes, and a job read back from it by ``apply``.

The file is the plan in words and numbers (:func:`report.plan_dict`: every tensor, its op, source,
shard and offset) plus a ``job`` record that lets any process, on any machine that sees the same
source paths, rebuild the very same job: the recipe, each source's folder and the identity of each
of its files (size, modification time, header digest), the layer-stack hint, the shard size, and
the model card's texts. Reading it back re-plans from the sources and refuses, in one line, sources
that changed since (a file's size or modification time, or a plan that no longer comes out the
same: other headers, or another shardsurgeon version). Output bytes never depend on which process
wrote a shard, so a plan can be split among writers (``apply --shards``) and finalized once.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shardsurgeon.api import Job, job_layout
from shardsurgeon.errors import CheckpointError, OutputError, PlanError, safe_text
from shardsurgeon.model.arch import StackHint
from shardsurgeon.model.source import Source, open_source
from shardsurgeon.plan.planner import make_plan
from shardsurgeon.plan.recipe import recipe_from_json, recipe_to_json, recorded_models
from shardsurgeon.plan.report import plan_dict
from shardsurgeon.storage.remote import file_name, is_url, join_name
from shardsurgeon.storage.smallfile import MAX_JSON_BYTES, check_writable_target, read_small
from shardsurgeon.write.local.folder import check_outside_sources

FORMAT = 1


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
        name = os.path.basename(os.path.abspath(out))
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
        "stack_hint": {"prefix": job.stack_hint.prefix, "count_key": job.stack_hint.count_key},
        "max_shard_bytes": job.max_shard_bytes,
        "description": job.description,
        "mergekit_yaml": job.mergekit_yaml,
        "command": command,
    }
    return orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n"


def write_plan_file(job: Job, path: Path, command: str) -> None:
    """Save the plan file at ``path``, which must not lie inside a source nor be a FIFO or device."""
    shard_paths = [shard.path for source in job.sources.values() for shard in source.checkpoint.shards]
    folders = [s.folder for s in job.sources.values() if isinstance(s.folder, Path)]
    local_shards = [p for p in shard_paths if isinstance(p, Path)]
    check_outside_sources(path, folders, "--plan-json", "file", files=local_shards)
    check_writable_target(path, OutputError, "--plan-json")
    try:
        path.write_bytes(plan_file_bytes(job, command))
    except OSError as e:
        raise OutputError(f"--plan-json {safe_text(path)}: cannot write: {e.strerror or e}") from None


def _source_record(source: Source) -> dict[str, Any]:
    files = []
    for shard in source.checkpoint.shards:
        mtime_ns = shard.identity.mtime_ns if shard.identity is not None else None
        files.append(
            {"name": file_name(shard.path), "nbytes": shard.nbytes, "mtime_ns": mtime_ns, "header": shard.header_sha256}
        )
    return {
        "reference": source.reference,
        "folder": _folder_text(source.folder),
        "files": files,
    }


def load_plan_file(path: Path) -> PlannedJob:
    """The job of the plan file at ``path``, re-planned from its sources, which must be unchanged."""
    shown = safe_text(path)
    try:
        record = orjson.loads(read_small(path, MAX_JSON_BYTES, PlanError, "a plan file"))
        job = record["job"]
        if not isinstance(job, dict) or job.get("format") != FORMAT:
            raise ValueError(f"job format {job.get('format') if isinstance(job, dict) else job!r}")
        hint = StackHint(job["stack_hint"]["prefix"], job["stack_hint"]["count_key"])
        sources = {s["reference"]: _reopen(s, hint, shown) for s in job["sources"]}
        references = recorded_models(job["recipe"])
        recipe = recipe_from_json(job["recipe"], references, lambda model: sources[model].layer_count)
        plan = make_plan(recipe, sources)
        max_shard_bytes = int(job["max_shard_bytes"])
        layout = job_layout(recipe, plan, sources, max_shard_bytes)
        planned = [(s["name"], s["nbytes"]) for s in record["shards"]]
        if plan.fingerprint != record["fingerprint"] or planned != [(s.name, s.nbytes) for s in layout.shards]:
            raise PlanError(
                f"{shown}: planning again from its sources gives another plan (fingerprint {plan.fingerprint}, "
                f"the file records {safe_text(str(record['fingerprint']), 40)}); the sources' headers or the "
                "shardsurgeon version changed: make the plan again"
            )
        command = str(job["command"])
        rebuilt = Job(
            sources, recipe, plan, layout, str(job["description"]), str(job["mergekit_yaml"]), max_shard_bytes, hint
        )
        return PlannedJob(rebuilt, command)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PlanError(
            f"{shown}: not a plan file of this shardsurgeon version ({safe_text(str(e), 80)}); write one with "
            "expand|merge ... --plan-json FILE"
        ) from None


def _reopen(record: dict[str, Any], hint: StackHint, shown: str) -> Source:
    source = open_source(_folder_of(record), hint, str(record["reference"]))
    now = {file_name(shard.path): shard for shard in source.checkpoint.shards}
    for file in record["files"]:
        shard = now.get(file["name"])
        seen = shard.identity.mtime_ns if shard is not None and shard.identity is not None else None
        if shard is None or (shard.nbytes, seen, shard.header_sha256) != (
            file["nbytes"],
            file["mtime_ns"],
            file["header"],
        ):
            raise CheckpointError(
                f"{safe_text(join_name(_folder_of(record), str(file['name'])))}: changed since the plan {shown} "
                "was made "
                "(size, modification time or header); make the plan again"
            )
    return source


def plan_key(job: Job) -> str:
    """Names the work of a plan wherever it runs: the plan's fingerprint, its shards, and its source
    files by name, size and header (a machine's device and inode numbers differ between machines)."""
    digest = hashlib.sha256(b"plan:" + job.plan.fingerprint.encode())
    for shard in job.layout.shards:
        digest.update(f"{shard.name}:{shard.nbytes};".encode())
    for source in job.sources.values():
        for file in source.checkpoint.shards:
            digest.update(f"{file_name(file.path)}:{file.nbytes}:{file.header_sha256};".encode())
    return digest.hexdigest()


def _folder_of(record: dict[str, Any]) -> Path | str:
    """A source's folder as the plan file records it: a path, or a folder URL kept as text."""
    folder = str(record["folder"])
    return folder if is_url(folder) else Path(folder)


def _folder_text(folder: Path | str) -> str:
    return str(folder.absolute()) if isinstance(folder, Path) else folder
