"""What the run sequence (:mod:`write.run`) asks of a destination, and the records it passes around.

A destination (a local folder, an S3 folder) differs from another only in how it claims the
output, where it keeps finished shards until publishing, how it publishes and what it cleans up;
the rules between those steps live in :mod:`write.run` and :mod:`write.proof`, once. The records:

- :class:`Part`: which part of a job a run does (all of it, one writer's shards, or the finalize);
- :class:`WriteOptions`: the one record of how to write, from the CLI down to the executors;
- :class:`ShardTarget`: where a runner writes shards, in whichever process it runs;
- :class:`RunResult`: what a run did, built by keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.units import Progress, ShardStarted
from shardsurgeon.write.executor import Reflink, ShardStats

if TYPE_CHECKING:
    from shardsurgeon.plan.job import Job
    from shardsurgeon.write.runners import Runner

ShardBegins = Callable[[ShardLayout], None]


@dataclass(frozen=True, slots=True)
class Part:
    """Which part of a job a run does: ``write`` the shards named (None: every shard), then
    ``publish`` the output. A whole run does both; a writer of a distributed job writes its shards
    and publishes nothing; the finalize writes nothing and publishes what the writers left, every
    shard of which must then be there and proven."""

    shards: tuple[str, ...] | None = None
    write: bool = True
    publish: bool = True

    @property
    def kind(self) -> Literal["run", "writer", "finalize"]:
        return "run" if self.write and self.publish else "writer" if self.write else "finalize"

    @property
    def exclusive(self) -> bool:
        """A run and a finalize hold the output alone; writers share it with one another."""
        return self.publish

    def wanted(self, shards: Sequence[ShardLayout]) -> list[ShardLayout]:
        return [s for s in shards if self.shards is None or s.name in self.shards]


WHOLE: Part = Part()
FINALIZE: Part = Part(write=False)


def writer(names: Sequence[str]) -> Part:
    return Part(tuple(names), publish=False)


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """How to write: the one record every layer passes on (defaults: a plain run in this process)."""

    force: bool = False
    """Replace an output that holds something else (a checkpoint, other files or objects)."""
    dense: bool = False
    """Write zero tensors as real zero bytes instead of holes (a local folder; S3 never has holes)."""
    reflink: Reflink = "auto"
    checksums: bool = False
    """Also record every tensor's CRC-32, read back from the shards written."""
    runner: Runner | None = None
    """Who writes the shards (None: this process)."""
    progress: Progress | None = None
    """Told each time more tensor bytes are done (a kept shard's all at once)."""
    on_shard: ShardStarted | None = None
    """Told each shard that is written, as it begins."""


class ShardTarget(Protocol):
    """Where shards go, described so that any process can write them (picklable): a runner hands it
    to its processes, each of which writes its share with :meth:`write`."""

    def write(self, shards: Sequence[ShardLayout], progress: Progress, begins: ShardBegins) -> ShardStats:
        """Write ``shards`` one after the other in this process; each appears whole or not at all."""
        ...


class Area(Protocol):
    """A destination claimed for one job (see :meth:`Destination.claim`): where its finished shards
    are kept until published, read back, and published from."""

    notes: tuple[str, ...]
    """What the claim did beyond the run itself (a recovery), in words."""
    stats: ShardStats
    """What the area itself wrote or sent besides the shards (an S3 folder's zeros object, small files)."""

    def finished(self, shard: ShardLayout) -> bool:
        """Whether a finished shard of that name is there with the planned size and header (cheap)."""
        ...

    def recorded(self, shard: ShardLayout) -> bool:
        """Whether the destination itself vouches that the shard is still exactly what a writer of
        this job wrote (a record its writer left, which a change of the bytes would break)."""
        ...

    def location(self, shard: ShardLayout) -> Path | str:
        """Where the shard's bytes can be read back (a path or a URL)."""
        ...

    def prepare(self, kept: Sequence[ShardLayout], todo: Sequence[ShardLayout], options: WriteOptions) -> None:
        """Ready the area for writing ``todo``: with the output held alone, what it holds besides the
        ``kept`` shards is removed; room is checked where the destination can."""
        ...

    def target(self, todo: Sequence[ShardLayout], options: WriteOptions) -> ShardTarget: ...

    def small_files(self) -> AbstractContextManager[Path]:
        """A local folder for the small files (config, index, other files, card, checksums)."""
        ...

    def publish(self, small: Path, sources_unchanged: Callable[[], None]) -> None:
        """Make the output appear, complete: every shard and the small files in ``small``, calling
        ``sources_unchanged`` (which raises if a source changed) right before the step that makes it
        appear; then remove what the run kept for itself."""
        ...


class Destination(Protocol):
    @property
    def out(self) -> Path | str:
        """The output as a result names it: its path, or its URL."""
        ...

    @property
    def shown(self) -> str:
        """How messages name the output."""
        ...

    def claim(self, job: Job, part: Part, options: WriteOptions) -> AbstractContextManager[Area]:
        """Claim the output for ``part`` of ``job`` (alone, or shared with the job's other writers),
        after checking that nothing it may touch is a source; leave it claimed until exit."""
        ...


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run did; bytes are file bytes (headers included), holes are zeros left unwritten."""

    out: Path | str
    tensors: int
    shards: int
    shards_reused: int
    written: int
    holes: int
    seconds: float
    notes: tuple[str, ...] = ()
    """What was done beyond the run itself, such as recovering from an interrupted commit."""
    stats: ShardStats = field(default_factory=ShardStats)
    """What writing the shards of this run did: bytes copied, converted, shared with the source."""
