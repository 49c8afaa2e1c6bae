"""A file of routers (``--router FILE``): one safetensors file, local or by URL, read from its header.

A router trained or computed elsewhere (mergekit-moe's ``hidden`` gates need a forward pass this
tool does not do) enters an upcycled model from such a file: for each upcycled layer its router
under the output's own name. The file is a source like a model's shards: it is indexed here, from
its header alone, with the :class:`~shardsurgeon.storage.versions.SourceVersion` its header was read
from, and its tensors are read later by the executor like any other source tensor. Which tensors it
must hold, and of what shape, is the planner's to say (:mod:`plan.routers`). Never reads tensor
data and never writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shardsurgeon.errors import CheckpointError, FormatError, safe_text
from shardsurgeon.format import TensorRef
from shardsurgeon.model.checkpoint import Shard, read_remote_shard, read_shard
from shardsurgeon.storage.remote import RemoteFolder, file_name, is_url, normal_url

ROUTER_FILE_HINT = "a safetensors file holding each upcycled layer's router under its output name (docs/routers.md)"


@dataclass(frozen=True, slots=True)
class RouterFile:
    """The file ``reference`` names (as the user gave it), its version, and its tensors by name."""

    reference: str
    shard: Shard
    tensors: dict[str, TensorRef]

    @property
    def name(self) -> str:
        """The file's name without its folder: how the model card and the output's metadata name it."""
        return file_name(self.shard.path)


def open_router_file(reference: str | os.PathLike[str]) -> RouterFile:
    """Index the router file at ``reference`` (a path, or an ``s3://``/``https://`` URL of a file);
    a missing file, or one that is not safetensors, is refused in one line."""
    shown = safe_text(reference)
    try:
        if is_url(reference):
            url = normal_url(str(reference))
            folder, _, name = url.rpartition("/")
            if not name:
                raise CheckpointError(f"{shown}: names a folder; expected the URL of {ROUTER_FILE_HINT}")
            shard, refs = read_remote_shard(RemoteFolder(folder), name, f"expected {ROUTER_FILE_HINT}")
        else:
            path = Path(reference)
            if not os.path.lexists(path):
                raise CheckpointError(f"{shown}: no such file; expected {ROUTER_FILE_HINT}")
            shard, refs = read_shard(path)
    except (CheckpointError, FormatError) as e:
        raise type(e)(f"--router {e}") from None
    return RouterFile(str(reference), shard, {ref.name: ref for ref in refs})
