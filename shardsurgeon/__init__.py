"""shardsurgeon: rewrite Hugging Face safetensors checkpoints layer by layer, streaming."""

__version__ = "0.1.0"
