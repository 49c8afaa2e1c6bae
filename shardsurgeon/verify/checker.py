"""Check a written checkpoint: its shards, index and config, and, given the sources, every byte.

:func:`verify_checkpoint` checks what a folder shows on its own: every shard's header by the
format's rules (which also pins each file's size), the index (every tensor exactly once,
``total_size`` right, no stray or missing shard; or a lone ``model.safetensors``), and the config's
layer count against the tensors. The folder may be local or behind a URL: its files are read
through :mod:`folders`, tensor bytes through :class:`~shardsurgeon.remote.SourceFiles`. Given the
sources, it re-derives the plan from the recipe recorded in the shards' metadata and compares each
output tensor, found by name, with the source bytes, zeros, or the source cast and scaled by the
definition (DESIGN.md, plain numpy and ml_dtypes arithmetic in fixed-size chunks), never by the
executor's converters, so a bug in those cannot pass. :func:`compare_with_plan` checks a folder
against a layout in hand. Reads only; writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardsurgeon.errors import FormatError, PlanError, RecipeError, VerifyError, safe_text
from shardsurgeon.format import Header
from shardsurgeon.model.arch import NO_HINT, StackHint, find_layer_stack
from shardsurgeon.model.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TensorRef
from shardsurgeon.model.otherfiles import other_files, remote_other_files
from shardsurgeon.model.routerfile import open_router_file
from shardsurgeon.model.source import Source, open_source
from shardsurgeon.model.tokenizer import SLOW_TOKENIZER_FILES, TOKEN_FILES
from shardsurgeon.plan.expected import describe_expected, differing_tensors, first_difference
from shardsurgeon.plan.job import replaced_files
from shardsurgeon.plan.layout import PLAN_METADATA_KEY, RECIPE_METADATA_KEY, Layout
from shardsurgeon.plan.planner import Plan, make_plan
from shardsurgeon.plan.recipe import recipe_from_json, recorded_models, recorded_router_file
from shardsurgeon.storage.checksums import CHECKSUMS_FILE, tensor_crcs
from shardsurgeon.storage.remote import SourceFiles, file_name, is_url, join_name
from shardsurgeon.storage.smallfile import MAX_CONFIG_BYTES, MAX_JSON_BYTES, PARSE_ERRORS
from shardsurgeon.units import Progress
from shardsurgeon.verify.folders import CheckpointFolder, file_sha256, open_folder


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One problem: ``shard`` names the file it is in ('' when the problem names it), ``tensor``
    the tensor ('' for a whole file)."""

    shard: str
    tensor: str
    problem: str

    def __str__(self) -> str:
        where = [self.shard] if self.shard else []
        where += [f"tensor {self.tensor!r}"] if self.tensor else []
        return ": ".join([*where, self.problem])


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_checkpoint` found; ``compared`` tensors were checked byte by byte."""

    folder: Path | str
    """The folder's path, or its URL with one trailing slash."""
    shards: int
    tensors: int
    nbytes: int
    layers: int | None
    sources: int
    compared: int
    mismatches: tuple[Mismatch, ...]
    notes: tuple[str, ...]
    checksummed: int = 0
    """Tensors checked against the checksums recorded with the output (``--checksums``)."""

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass(slots=True)
class _Found:
    """The output as its files show it; ``locations`` lists every shard holding a tensor name."""

    headers: dict[str, Header] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    """Shards whose tensors are unknown (corrupt or missing); their tensors get no line of their own."""
    locations: dict[str, list[TensorRef]] = field(default_factory=dict)
    index_map: dict[str, str] | None = None
    mismatches: list[Mismatch] = field(default_factory=list)

    def add(self, shard: str, tensor: str, problem: str) -> None:
        self.mismatches.append(Mismatch(shard, tensor, problem))

    def tensor(self, name: str) -> TensorRef | None:
        """Where the output holds ``name``: in the shard the index names, else the first found."""
        refs = self.locations.get(name, [])
        preferred = self.index_map.get(name) if self.index_map else None
        return next((r for r in refs if file_name(r.path) == preferred), refs[0] if refs else None)


def verify_checkpoint(
    folder: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]] = (),
    *,
    router_file: str | os.PathLike[str] | None = None,
    stack_hint: StackHint = NO_HINT,
    progress: Progress | None = None,
    on_start: Progress | None = None,
) -> VerifyReport:
    """Check the checkpoint in ``folder`` (a path, or an ``s3://`` or ``https://`` folder URL); with
    ``sources`` (the models of its recorded recipe, in order) also every tensor's bytes, and with
    ``router_file`` the routers of an output whose recipe took them from a file (the recipe records
    the file's name; this is the file). ``on_start`` gets the tensor bytes to compare once they are
    known, ``progress`` those compared, chunk by chunk."""
    if router_file is not None and not sources:
        raise RecipeError(
            f"--router {safe_text(router_file)}: the routers are compared with the models' recipe; give the models "
            "too (--src)"
        )
    files = open_folder(folder)
    found = _Found()
    has_index, index = _read_json(files, INDEX_FILE, found, MAX_JSON_BYTES)
    weight_map, total_size = _index_map(index, found) if index is not None else (None, None)
    shard_names = _read_shards(files, found, list((weight_map or {}).values()) if has_index else None)
    strays = _check_index(has_index, weight_map, total_size, shard_names, found)
    _check_each_tensor_once(found, strays)
    has_config, config = _read_config(files, found)
    if not (has_index or shard_names or has_config):
        raise VerifyError(
            f"{safe_text(files.shown)}: no checkpoint here: no {CONFIG_FILE}, no {INDEX_FILE}, no safetensors "
            "file; pass the folder that holds the checkpoint to verify"
        )
    layers = None
    if config is not None and found.locations and not found.unreadable:
        try:
            layers = find_layer_stack(found.locations, config, stack_hint).count
        except PlanError as e:
            found.add("", "", str(e))
    notes: list[str] = []
    checksummed = _check_checksums(files, found)
    compared = 0
    if sources:
        recorded = _recorded_plan(
            found, [s if isinstance(s, str) and is_url(s) else Path(s) for s in sources], router_file, stack_hint, notes
        )
        if recorded is not None:
            plan, donor = recorded
            (on_start or _ignore)(sum(t.nbytes for t in plan.tensors))
            compared = _compare_with_sources(files, plan, donor, config, found, progress or _ignore)
    tensors = [found.tensor(name) for name in found.locations]
    return VerifyReport(
        files.shown,
        len(shard_names),
        len(found.locations),
        sum(t.nbytes for t in tensors if t is not None),
        layers,
        len(sources),
        compared,
        tuple(found.mismatches),
        tuple(notes),
        checksummed,
    )


def _ignore(nbytes: int) -> None:
    pass


def _check_checksums(files: CheckpointFolder, found: _Found) -> int:
    """Each tensor's CRC-32 against the record written with the output, if there is one; returns how
    many matched or differed (a tensor the record lacks, or a record of a tensor not there, is a
    finding too)."""
    has_record, record = _read_json(files, CHECKSUMS_FILE, found, MAX_JSON_BYTES)
    if not has_record:
        return 0
    shards = record.get("shards") if isinstance(record, dict) and record.get("algorithm") == "crc32" else None
    if not isinstance(shards, dict) or not all(isinstance(v, dict) for v in shards.values()):
        found.add(CHECKSUMS_FILE, "", 'expected {"algorithm": "crc32", "shards": {shard: {tensor: crc}}}')
        return 0
    recorded = {(shard, name): crc for shard, tensors in shards.items() for name, crc in tensors.items()}
    present = [ref for refs in found.locations.values() for ref in refs if file_name(ref.path) not in found.unreadable]
    checked = 0
    for ref, crc in zip(present, tensor_crcs(present), strict=True):
        want = recorded.pop((file_name(ref.path), ref.name), None)
        if want is None:
            found.add(file_name(ref.path), ref.name, f"has no checksum in {CHECKSUMS_FILE}")
        elif want != crc:
            shown_crc = safe_text(want, 20)
            found.add(file_name(ref.path), ref.name, f"CRC-32 is {crc}, {CHECKSUMS_FILE} records {shown_crc}: "
                      "its bytes changed since they were written")  # fmt: skip
        checked += 1
    for shard, name in sorted(recorded)[:10]:
        if shard not in found.unreadable:
            found.add(shard, name, f"is in {CHECKSUMS_FILE} but not in the shard")
    return checked


def _read_shards(files: CheckpointFolder, found: _Found, indexed: list[str] | None) -> set[str]:
    """Read every shard's header; returns the names of the shards there are."""
    present = set()
    for name in files.shard_names(indexed):
        try:
            header = files.header(name)
        except FormatError as e:
            found.add("", "", str(e))
            found.unreadable.add(name)
            present.add(name)
            continue
        if header is None:  # named by the index of a folder that cannot be listed, and not there
            continue
        present.add(name)
        found.headers[name] = header
        file_format = (header.metadata or {}).get("format")
        if file_format != "pt":
            found.add(
                name, "", f"__metadata__ format is {file_format!r}, expected 'pt'; transformers refuses such files"
            )
        path = files.path(name)
        for entry in header.tensors:
            ref = TensorRef(entry.name, path, entry.dtype, entry.shape, header.data_start + entry.begin, entry.nbytes)
            found.locations.setdefault(entry.name, []).append(ref)
    return present


def _check_each_tensor_once(found: _Found, strays: set[str]) -> None:
    """A tensor in several shards; copies in stray shards are covered by the stray's own line."""
    for name, refs in found.locations.items():
        shards = [file_name(r.path) for r in refs if file_name(r.path) not in strays]
        if len(shards) > 1:
            found.add("", name, f"is in {len(shards)} shards ({', '.join(shards)}); expected exactly one")


def _check_index(
    has_index: bool, weight_map: dict[str, str] | None, total_size: Any, shard_names: set[str], found: _Found
) -> set[str]:
    """Check the index against the shards; returns the stray shards (which no index lists)."""
    if not has_index:
        if SINGLE_FILE not in shard_names:
            seen = ", ".join(sorted(shard_names)) or "no safetensors file"
            found.add("", "", f"{INDEX_FILE} or {SINGLE_FILE} expected, found {seen}")
            return set()
        strays = shard_names - {SINGLE_FILE}
        for name in sorted(strays):
            found.add(name, "", f"stray shard: there is no {INDEX_FILE}, so only {SINGLE_FILE} belongs here")
        return strays
    if weight_map is None:
        return set()
    found.index_map = weight_map
    listed = set(weight_map.values())
    mapped = Counter(weight_map.values())
    for shard in sorted(listed - shard_names):
        found.add(shard, "", f"missing: {INDEX_FILE} maps {mapped[shard]} tensors to it")
        found.unreadable.add(shard)
    for shard in sorted(shard_names - listed):
        found.add(shard, "", f"stray shard: {INDEX_FILE} maps no tensor to it; remove it or restore the index")
    for name, shard in weight_map.items():
        holders = [file_name(r.path) for r in found.locations.get(name, [])]
        if shard in found.headers and shard not in holders:
            also = f", it is in {', '.join(holders)}" if holders else ""
            found.add(INDEX_FILE, name, f"mapped to {shard}, which does not hold it{also}")
    strays = shard_names - listed
    for name, refs in found.locations.items():
        holders = [file_name(r.path) for r in refs if file_name(r.path) not in strays]
        if name not in weight_map and holders:
            found.add(holders[0], name, f"not listed in {INDEX_FILE}")
    if not found.unreadable:
        actual = sum(r.nbytes for refs in found.locations.values() for r in refs if file_name(r.path) in listed)
        if total_size != actual:
            found.add(
                INDEX_FILE, "", f"metadata.total_size is {total_size!r}, expected {actual} (the shards' tensor bytes)"
            )
    return strays


def _index_map(index: Any, found: _Found) -> tuple[dict[str, str] | None, Any]:
    """The index's weight map and its ``metadata.total_size``; (None, None) when it has no weight map."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        found.add(INDEX_FILE, "", 'expected an object with a "weight_map" of tensor name to shard file')
        return None, None
    metadata = index.get("metadata")
    return weight_map, metadata.get("total_size") if isinstance(metadata, dict) else None


def _read_config(files: CheckpointFolder, found: _Found) -> tuple[bool, dict[str, Any] | None]:
    """Whether there is a config, and the config: None when it is missing or unusable (a finding)."""
    has_config, config = _read_json(files, CONFIG_FILE, found, MAX_CONFIG_BYTES)
    if not has_config:
        found.add(CONFIG_FILE, "", "missing; transformers needs it to load the checkpoint")
        return False, None
    if config is not None and not isinstance(config, dict):
        found.add(CONFIG_FILE, "", f"expected a JSON object, found {type(config).__name__}")
        return True, None
    return True, config


def _read_json(files: CheckpointFolder, name: str, found: _Found, limit: int) -> tuple[bool, Any]:
    """Whether the file ``name`` is there, and its JSON: None when it cannot be read (a finding)."""
    try:
        raw = files.read_small(name, limit, "JSON")
    except VerifyError as e:
        found.add("", "", str(e))
        return True, None
    if raw is None:
        return False, None
    try:
        return True, json.loads(raw)
    except RecursionError:
        found.add(name, "", "cannot read JSON (nested too deeply)")
    except PARSE_ERRORS as e:
        found.add(name, "", f"cannot read JSON ({str(e)[:100]})")
    return True, None


def _recorded_plan(
    found: _Found, sources: list[Path | str], router_file: str | os.PathLike[str] | None, hint: StackHint,
    notes: list[str],
) -> tuple[Plan, Source] | None:  # fmt: skip
    """The plan re-derived from the recipe recorded in the shards, with ``sources`` as its models
    and ``router_file`` as its file of routers, and the model that donates its small files."""
    recorded = {(h.metadata or {}).get(RECIPE_METADATA_KEY) for h in found.headers.values()}
    fingerprints = {(h.metadata or {}).get(PLAN_METADATA_KEY) for h in found.headers.values()}
    if len(recorded) != 1 or len(fingerprints) != 1:
        problem = "no readable shard" if not recorded else "shards record different recipes or plans"
        found.add("", "", f"cannot check against --src: {problem}; expected every shard to record the same one")
        return None
    (text,), (fingerprint,) = recorded, fingerprints
    if text is None:
        found.add("", "", f"cannot check against --src: the shards record no recipe ({RECIPE_METADATA_KEY})")
        return None
    try:
        models = recorded_models(text)
    except RecipeError as e:  # the output's own metadata is bad: a finding, not a usage error
        found.add("", "", f"cannot check against --src: {e}")
        return None
    if len(models) != len(sources):
        raise RecipeError(
            f"--src given {_count(len(sources), 'time')} but the output was made from "
            f"{_count(len(models), 'model')} ({', '.join(models)}); give one --src per model, in this order"
        )
    recorded_file = recorded_router_file(text)
    if recorded_file is None and router_file is not None:
        raise RecipeError(
            f"--router {safe_text(router_file)}: the output's routers were not read from a file; leave --router out"
        )
    if recorded_file is not None and router_file is None:
        raise RecipeError(
            f"the output's routers were read from the file {safe_text(recorded_file)}; give it with --router FILE "
            "to check them"
        )
    routers = None if router_file is None else open_router_file(router_file)
    opened = {str(s): open_source(s, hint) for s in sources}
    try:
        reference = None if routers is None else routers.reference
        recipe = recipe_from_json(text, list(opened), lambda model: opened[model].layer_count, reference)
    except RecipeError as e:
        found.add("", "", f"cannot check against --src: {e}")
        return None
    plan = make_plan(recipe, opened, routers)
    if plan.fingerprint != fingerprint:
        notes.append(
            f"the plan re-derived from --src has fingerprint {plan.fingerprint}, the output records "
            f"{fingerprint}: the sources' headers or the shardsurgeon version differ from the run that "
            "wrote it; tensors are compared with the sources given"
        )
    return plan, opened[recipe.donor]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _compare_with_sources(
    files: CheckpointFolder, plan: Plan, donor: Source, config: dict[str, Any] | None, found: _Found, progress: Progress
) -> int:
    if config is not None and config != plan.config:
        keys = [k for k in dict.fromkeys([*plan.config, *config]) if plan.config.get(k) != config.get(k)]
        found.add(
            CONFIG_FILE,
            "",
            f"differs from the config the recipe gives at {keys[0]!r}: found {json.dumps(config.get(keys[0]))}, "
            f"expected {json.dumps(plan.config.get(keys[0]))}",
        )
    replaced = replaced_files(plan.recipe, donor)
    carried = set()
    for name, digest, where in _donor_files(donor.folder):
        carried.add(name)
        if name not in replaced and files.sha256(name) != digest:
            found.add(name, "", f"missing or different from {where}, which the output should carry as is")
    # where the recipe changed the token rows, a token file from elsewhere could name ids they disagree with
    extra = [n for n in (*TOKEN_FILES, *SLOW_TOKENIZER_FILES) if n not in carried and n not in replaced]
    for name in extra if plan.recipe.vocab is not None else ():
        if files.sha256(name) is not None:
            found.add(name, "", "is in the output but neither in the source nor made by the recipe: ids unchecked")
    for name, data in replaced.items():
        if data is None and files.sha256(name) is not None:
            found.add(name, "", "is in the output, which the recipe leaves out (its ids would disagree with the rows)")
        elif data is not None and files.sha256(name) != hashlib.sha256(data).hexdigest():
            found.add(name, "", "missing or different from the file the recipe makes of the source's")
    planned = {t.name for t in plan.tensors}
    for name, refs in found.locations.items():
        if name not in planned:
            found.add(file_name(refs[0].path), name, "is not in the plan the recorded recipe gives")
    compared = 0
    index_map = found.index_map or {}
    with SourceFiles() as reader:
        for tensor in plan.tensors:
            ref = found.tensor(tensor.name)
            if ref is None:
                if index_map.get(tensor.name) not in found.unreadable:
                    found.add("", tensor.name, "missing from the output")
                continue
            if (ref.dtype, ref.shape) != (tensor.dtype, tensor.shape):
                found.add(
                    file_name(ref.path),
                    tensor.name,
                    f"is {ref.dtype} {list(ref.shape)}, expected {tensor.dtype} {list(tensor.shape)}",
                )
                continue
            difference = first_difference(tensor, reader.read, ref.path, ref.data_start, progress)
            if difference is not None:
                found.add(
                    file_name(ref.path),
                    tensor.name,
                    f"{describe_expected(tensor, difference)} at byte {difference} of the tensor",
                )
            compared += 1
    return compared


def _donor_files(donor: Path | str) -> Iterator[tuple[str, str, Path | str]]:
    """Each file the output should carry over from the donor as it is: its name, SHA-256 and place."""
    if isinstance(donor, str) and is_url(donor):
        for name, data in remote_other_files(donor):
            yield name, hashlib.sha256(data).hexdigest(), join_name(donor, name)
        return
    for source in other_files(Path(donor)):
        yield source.name, file_sha256(source), source


def compare_with_plan(layout: Layout, folder: Path) -> list[Mismatch]:
    """Every way the shards in ``folder`` differ from ``layout``; empty when they match exactly."""
    mismatches: list[Mismatch] = []
    with SourceFiles() as files:
        for shard in layout.shards:
            path = folder / shard.name
            if not path.is_file():
                mismatches.append(Mismatch(shard.name, "", "shard file is missing"))
            elif files.read(path, 0, shard.header_nbytes) != shard.header:
                mismatches.append(Mismatch(shard.name, "", "header differs from the plan's"))
            elif path.stat().st_size != shard.nbytes:
                mismatches.append(Mismatch(shard.name, "", f"is {path.stat().st_size} bytes, expected {shard.nbytes}"))
            else:
                differing = differing_tensors(shard, files.read, path, first_only=False)
                mismatches += [Mismatch(shard.name, tensor.name, describe_expected(tensor)) for tensor in differing]
    return mismatches
