"""A job: everything decided before writing, and the key that names its work wherever it runs.

:class:`Job` holds the resolved sources, the recipe, the plan, the layout and the texts of the
model card. Its :attr:`Job.key` names the work of the job on any destination, in any mode (a whole
run, each writer of a distributed job, the finalize) and on any machine that sees the same source
files: the plan's fingerprint, the shards' names and sizes, and every source file's version
(:mod:`storage.versions`). A staging folder, an S3 folder's resume record, each shard's metadata
and a plan file's writers all carry it, so work left by one run is found by another of the very
same job, and by no other. Pure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from shardsurgeon.model.arch import NO_HINT, StackHint
from shardsurgeon.model.routerfile import RouterFile
from shardsurgeon.model.source import Source, card_names_of
from shardsurgeon.model.tokenizer import read_token_files
from shardsurgeon.plan.layout import DEFAULT_MAX_SHARD_BYTES, RECIPE_METADATA_KEY, Layout, ShardLayout, plan_layout
from shardsurgeon.plan.planner import Plan
from shardsurgeon.plan.recipe import Recipe, recipe_to_json
from shardsurgeon.plan.tensors import source_files
from shardsurgeon.plan.token_files import token_files
from shardsurgeon.storage.versions import SourceVersion


@dataclass(frozen=True)
class Job:
    """A planned rewrite of ``sources`` (by the model references of the recipe), and of the file of
    routers the recipe names, if any: a source file like the models' shards."""

    sources: dict[str, Source]
    recipe: Recipe
    plan: Plan
    layout: Layout
    description: str
    mergekit_yaml: str
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    stack_hint: StackHint = NO_HINT
    router_file: RouterFile | None = None

    @cached_property
    def versions(self) -> tuple[SourceVersion, ...]:
        """Every source file as the plan saw it: the models' shards, then the file of routers."""
        shards = [shard for source in self.sources.values() for shard in source.checkpoint.shards]
        return tuple(shard.version for shard in [*shards, *([self.router_file.shard] if self.router_file else [])])

    def local_files(self) -> tuple[list[Path], list[Path]]:
        """The local source files: the models' shards (whose folders are sources too), and the
        file of routers (a file alone: the folder holding it may hold an output)."""
        router = self.router_file.shard.version if self.router_file is not None else None
        shards = [Path(v.where) for v in self.versions if v.is_local and v is not router]
        return shards, [Path(router.where)] if router is not None and router.is_local else []

    @cached_property
    def key(self) -> str:
        """Names this job's work: the plan, its shards, and its source files' versions."""
        digest = hashlib.sha256(b"job:" + self.plan.fingerprint.encode())
        for shard in self.layout.shards:
            digest.update(f"{shard.name}:{shard.nbytes};".encode())
        for version in self.versions:
            digest.update(version.key().encode())
        return digest.hexdigest()

    @cached_property
    def files(self) -> dict[str, bytes | None]:
        """The small files the output holds instead of the donor's (None: left out): the token files
        a vocabulary change rewrites; read from the donor when first asked for."""
        return replaced_files(self.recipe, self.sources[self.recipe.donor])

    @property
    def card_names(self) -> dict[str, str]:
        """The name the model card gives each model reference (see :func:`model.source.card_names_of`)."""
        return card_names_of(self.sources)

    def versions_of(self, shard: ShardLayout) -> tuple[SourceVersion, ...]:
        """The versions of the source files ``shard``'s bytes are made from."""
        by_where = {version.where: version for version in self.versions}
        paths = dict.fromkeys(str(path) for placed in shard.tensors for path in source_files(placed.tensor))
        return tuple(by_where[path] for path in paths if path in by_where)


def replaced_files(recipe: Recipe, donor: Source) -> dict[str, bytes | None]:
    """The files of the output of ``recipe`` that differ from ``donor``'s (see :attr:`Job.files`)."""
    if recipe.vocab is None:
        return {}
    return token_files(recipe.vocab, read_token_files(donor.folder))


def job_layout(
    recipe: Recipe, plan: Plan, sources: dict[str, Source], max_shard_bytes: int, router_file: RouterFile | None = None
) -> Layout:
    """The shards, each recording the recipe by published model names (and the file of routers by
    its file name) so ``verify`` can re-derive it."""
    names = {model: source.published_name for model, source in sources.items()}
    if router_file is not None:
        names[router_file.reference] = router_file.name
    return plan_layout(plan, max_shard_bytes, {RECIPE_METADATA_KEY: recipe_to_json(recipe, names)})
