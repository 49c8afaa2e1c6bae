"""shardsurgeon: rewrite Hugging Face safetensors checkpoints layer by layer, streaming."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shardsurgeon")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
