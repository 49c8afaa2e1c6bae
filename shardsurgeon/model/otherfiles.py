"""Which files of a source checkpoint an output carries over as they are: the tokenizer, the
generation config, the chat template... never weights, the index, the config or the card, which
the output has its own of. Reads only (the names, and the bytes of a source by URL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shardsurgeon.names import CARD_FILE, CHECKSUMS_FILE, CONFIG_FILE, INDEX_FILE

KNOWN_OTHER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)
"""What a source by URL on a web server, which cannot be listed, may hold besides weights and config."""
MAX_OTHER_FILE_BYTES = 256 * 1024 * 1024

NOT_COPIED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".ot", ".tflite", ".onnx",
    ".npz", ".pb", ".mlmodel", ".mlpackage", ".tar", ".zip",
)  # fmt: skip
"""Weights in any format: they describe the source's layers, not the output's."""
NOT_COPIED_NAMES = frozenset(
    {
        CONFIG_FILE, CARD_FILE, INDEX_FILE, "params.json", "mergekit_config.yml", CHECKSUMS_FILE,
    }
)  # fmt: skip
"""Rewritten here (config, index, card), or stale: Mistral's native ``params.json`` counts layers."""


def other_files(source: Path) -> list[Path]:
    """Top-level files of the source to carry over as they are: tokenizer, generation config..."""
    return sorted(entry for entry in source.iterdir() if entry.is_file() and carried_over(entry.name))


def carried_over(name: str) -> bool:
    """Whether a source file of this name is copied to the output as it is."""
    return (
        not name.startswith(".")
        and name not in NOT_COPIED_NAMES
        and not name.endswith(NOT_COPIED_SUFFIXES)
        and not name.startswith("pytorch_model")
    )


def remote_other_files(url: str) -> Iterator[tuple[str, bytes]]:
    """The other files of a source by URL, name and bytes: those an S3 prefix lists, or for a web
    server (which lists nothing) the usual tokenizer and generation files, each that exists."""
    from shardsurgeon.storage.remote import RemoteFolder  # obstore loads only for a source by URL

    remote = RemoteFolder(url)
    for name in remote.file_names(KNOWN_OTHER_FILES):
        if carried_over(name):
            data = remote.read_small(name, MAX_OTHER_FILE_BYTES, "a file carried over to the output")
            if data is not None:
                yield name, data
