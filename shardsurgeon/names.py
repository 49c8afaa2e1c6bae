"""The names every layer shares: a checkpoint's files, the tool's own work files and objects, and
the sizes that bound reads of them. One home each; no logic.
"""

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
CHECKSUMS_FILE = "shardsurgeon.checksums.json"

WORK_PREFIX = ".shardsurgeon-"
"""Every file or object the tool keeps for itself starts so: never part of a published output."""
RESUME_NAME = WORK_PREFIX + "resume"
"""The record naming the job whose unfinished work a staging folder or an S3 folder holds."""
LOCK_NAME = WORK_PREFIX + "lock"
"""An S3 folder's claim object (a local output's lock is a sibling, see write.local.publish)."""
WRITERS_PREFIX = WORK_PREFIX + "writers/"
"""An S3 folder's leases of the writers of a distributed job, one object per writer."""
DONE_PREFIX = WORK_PREFIX + "done/"
"""An S3 folder's records of finished shards: the ETag each one's upload completed with."""
ZEROS_NAME = WORK_PREFIX + "zeros"
SCRATCH_PREFIX = WORK_PREFIX + "scratch/"
PARTIAL_SUFFIX = ".partial"
"""A shard being written in a local staging folder: renamed to its own name once complete."""

HOLDER_MAX_BYTES = 4096
"""Most bytes read from a lock file or a claim object: a short JSON object, whatever wrote it."""

CHUNK_BYTES = 4 << 20
"""What one read or write of tensor bytes moves at most, and what a buffer of them holds."""


def shard_name(number: int, count: int) -> str:
    """The file name of shard ``number`` (from 1) of ``count``, as transformers names them."""
    return SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
