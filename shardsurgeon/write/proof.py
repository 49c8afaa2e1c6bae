"""The one rule for a kept shard, on every destination and in every mode (a resumed run, a writer run
again, the finalize): a finished shard is kept, or published, only when proven to hold exactly the
bytes the plan says.

The proof is the cheapest one that is sound:

- where the destination keeps a record that breaks when a byte changes (an S3 object's ETag, which
  its writer recorded when the upload completed: an object is never changed in place, only
  replaced, and a replacement has another ETag) and every source the shard is made from is still a
  version that proves its bytes (:attr:`storage.versions.SourceVersion.proves_bytes`), the record
  is the proof;
- otherwise (a local file keeps no such record: a disk error or a stray edit leaves its size, times
  and header as they were; a source whose version is only as good as its time and size) every
  byte of the shard is compared with the bytes the plan gives, recomputed from the sources by
  definition (:mod:`plan.expected`), read back in chunks.

bench/RESULTS.md measures what each proof costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardsurgeon.plan.expected import differing_tensors
from shardsurgeon.plan.job import Job
from shardsurgeon.plan.layout import ShardLayout
from shardsurgeon.storage.remote import SourceFiles
from shardsurgeon.write.destination import Area


def proven_shards(area: Area, shards: Sequence[ShardLayout], job: Job) -> tuple[list[ShardLayout], set[str]]:
    """Those of ``shards`` that ``area`` holds finished and proven to be the planned bytes, and the
    sources whose versions made a recorded shard be compared byte for byte (their versions prove
    nothing of their bytes)."""
    kept: list[ShardLayout] = []
    unproven: set[str] = set()
    with SourceFiles() as files:
        for shard in shards:
            if not area.finished(shard):
                continue
            weak = [v.where for v in job.versions_of(shard) if not v.proves_bytes]
            recorded = area.recorded(shard)
            if recorded and not weak:
                kept.append(shard)  # the destination's record vouches for the bytes
                continue
            unproven.update(weak if recorded else ())
            if not differing_tensors(shard, files.read, area.location(shard), first_only=True):
                kept.append(shard)
    return kept, unproven
