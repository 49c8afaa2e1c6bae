"""Shards written as tasks on a Ray cluster (the optional ``ray`` extra): one task per shard.

The tasks write where the run's destination says (a staging folder, an S3 folder), as any writer
does: every machine of the cluster must see the sources at the same paths or URLs, and the output
too (a shared filesystem, or the same S3 store with the same AWS configuration). A task that fails is tried
again by Ray (``max_retries``); the driver reports each shard as it completes and publishes after
the last, as a one-process run would: the bytes do not depend on who wrote them. Tasks work in the
driver's working folder, so relative paths mean the same everywhere. Imports Ray only when a job
runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import OutputError, RecipeError, ShardSurgeonError
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.units import Progress
from shardsurgeon.write.destination import ShardBegins, ShardTarget
from shardsurgeon.write.executor import ShardStats

TASK_RETRIES = 3


@dataclass(frozen=True, slots=True)
class RayTasks:
    """Writes on the Ray cluster at ``address`` (``auto``: the one ``RAY_ADDRESS`` or a local head names)."""

    address: str = "auto"

    def run(
        self, shards: Sequence[ShardLayout], target: ShardTarget, progress: Progress, begins: ShardBegins
    ) -> ShardStats:
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RecipeError(f"--ray {self.address}: cannot join the Ray cluster ({str(e)[:120]})") from None
        try:
            task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)(_write_one)
            here = os.getcwd()  # relative source and output paths mean the same on every node
            pending = {task.remote(shard, target, here): shard for shard in shards}
            for shard in shards:
                begins(shard)
            total = ShardStats()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(done[0])
                total += _result(ray, done[0])
                progress(shard.nbytes - shard.header_nbytes)
            return total
        finally:
            if started_here:
                ray.shutdown()


def _write_one(shard: ShardLayout, target: ShardTarget, cwd: str) -> ShardStats:
    os.chdir(cwd)
    return target.write([shard], lambda nbytes: None, lambda shard: None)


def _result(ray: Any, ref: Any) -> ShardStats:
    """The task's result; its own error (one line) when it failed every try."""
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ShardSurgeonError):
            raise cause from None
        raise OutputError(
            f"a Ray task failed {TASK_RETRIES + 1} times: {type(cause).__name__}: {str(cause)[:200]}"
        ) from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RecipeError("--ray needs Ray: pip install 'shardsurgeon[ray]'") from None
    return ray
