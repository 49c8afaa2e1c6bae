"""The small files of an output: config.json, the index, the donor's other files, the model card
and the checksums, written into a local folder for the destination to publish, each fsynced.

Writes only into the folder it is given; never touches tensor bytes, and of a source reads only
the small files it carries over.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shardsurgeon.errors import OutputError
from shardsurgeon.model.checkpoint import TensorRef
from shardsurgeon.model.otherfiles import other_files, remote_other_files
from shardsurgeon.names import CARD_FILE, CONFIG_FILE, INDEX_FILE
from shardsurgeon.plan.job import Job
from shardsurgeon.plan.layout import Layout, PlacedTensor, ShardLayout
from shardsurgeon.storage.checksums import write_manifest
from shardsurgeon.storage.fileio import sync_file


def write_small_files(
    folder: Path, job: Job, model_card: str, checksums: bool, location: Callable[[ShardLayout], Path | str]
) -> None:
    """config.json, the index, the donor's other files, the model card and, with ``checksums``, the
    tensors' checksums (read back from the shards written, found by ``location``)."""

    def write_card() -> None:
        (folder / CARD_FILE).write_text(model_card, encoding="utf-8")
        sync_file(folder / CARD_FILE)

    donor = job.sources[job.plan.recipe.donor].folder
    steps: list[tuple[str, Callable[[], object]]] = [
        (CONFIG_FILE, lambda: write_json(folder / CONFIG_FILE, job.plan.config)),
        ("the index", lambda: write_index(folder, job.layout)),
        (f"the other files of {donor}", lambda: copy_other_files(donor, folder, job.files)),
        (CARD_FILE, write_card),
    ]
    if checksums:
        shards = {s.name: [_written(location(s), placed) for placed in s.tensors] for s in job.layout.shards}
        steps.append(("the checksums", lambda: write_manifest(folder, shards)))
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OutputError(
                f"{folder}: cannot write {what}: {e.strerror or e}; fix that and run the same command again, "
                "the shards written are kept"
            ) from None


def _written(path: Path | str, placed: PlacedTensor) -> TensorRef:
    """Where a planned tensor is in the shard written at ``path``."""
    tensor = placed.tensor
    return TensorRef(tensor.name, path, tensor.dtype, tensor.shape, placed.offset, tensor.nbytes)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sync_file(path)


def write_index(folder: Path, layout: Layout) -> None:
    """The index json, only when there is more than one shard (like transformers)."""
    if len(layout.shards) == 1:
        return
    path = folder / INDEX_FILE
    with path.open("w", encoding="utf-8") as f:  # as json.dumps(indent=2) writes it, one entry at a time
        f.write(f'{{\n  "metadata": {{\n    "total_size": {layout.total_size}\n  }},\n  "weight_map": {{')
        separator = "\n"
        for shard in layout.shards:
            shard_name = json.dumps(shard.name, ensure_ascii=False)
            for placed in shard.tensors:
                f.write(f"{separator}    {json.dumps(placed.tensor.name, ensure_ascii=False)}: {shard_name}")
                separator = ",\n"
        f.write("\n  }\n}\n" if separator != "\n" else "}\n}\n")
    sync_file(path)


def copy_other_files(source: Path | str, folder: Path, replaced: Mapping[str, bytes | None]) -> list[str]:
    """The source's other files, each as it is unless ``replaced`` gives the output's own bytes
    (None: left out)."""
    if isinstance(source, str):
        copied = _fetch_other_files(source, folder, replaced)
    else:
        copied = []
        for entry in other_files(source):
            if entry.name not in replaced:
                shutil.copyfile(entry, folder / entry.name)
                sync_file(folder / entry.name)
                copied.append(entry.name)
    for name, data in replaced.items():
        if data is not None:
            (folder / name).write_bytes(data)
            sync_file(folder / name)
            copied.append(name)
    return copied


def _fetch_other_files(url: str, folder: Path, replaced: Mapping[str, bytes | None]) -> list[str]:
    copied = []
    for name, data in remote_other_files(url):
        if name in replaced:
            continue
        (folder / name).write_bytes(data)
        sync_file(folder / name)
        copied.append(name)
    return copied
