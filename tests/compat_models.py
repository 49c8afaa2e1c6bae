"""Tiny randomly initialised transformers models, saved sharded, for the compatibility tests.

One function per architecture returns a small config; `save_tiny_model` builds the model from a
config with a fixed seed, perturbs every parameter (norms and biases too) so that a tensor wrongly
zeroed or copied from the wrong layer changes the logits, and saves it with several shards and an
index. `ARCHS` lists every architecture with what the tests need to know about it: the `--zero`
substrings that select its residual-output projections and the config key holding its layer count.

Configs with per-layer lists (`layer_types` in Qwen2, Qwen3, Gemma 2, Gemma 3) get explicit,
irregular patterns and a sliding window shorter than the test input, so that a layer given the
wrong attention type after a rebuild changes the logits, and a list left at the old length fails
to load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedConfig

N_LAYERS = 4
VOCAB = 128
SEQ_LEN = 12
SLIDING_WINDOW = 3  # shorter than SEQ_LEN, so sliding and full attention give different outputs

# Irregular on purpose: neither periodic nor a prefix/suffix split, so a list regenerated from a
# pattern, or a copy that takes a neighbour's type, is visible.
LAYER_TYPES = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]

_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def llama_config(**overrides) -> PreTrainedConfig:
    return transformers.LlamaConfig(**{**_LLAMA_LIKE, **overrides})


def llama_bias_config() -> PreTrainedConfig:
    # o_proj and down_proj with biases: zeroing by substring must zero the biases as well.
    return llama_config(attention_bias=True, mlp_bias=True)


def mistral_config() -> PreTrainedConfig:
    return transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=SLIDING_WINDOW)


def qwen2_config() -> PreTrainedConfig:
    # Qwen2 has q/k/v biases, and small Qwen2 checkpoints tie their embeddings.
    cfg = {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}
    return transformers.Qwen2Config(
        **{**cfg, "tie_word_embeddings": True},
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=2,
        layer_types=list(LAYER_TYPES),
    )


def qwen3_config() -> PreTrainedConfig:
    return transformers.Qwen3Config(
        **_LLAMA_LIKE,
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )


def gemma_config() -> PreTrainedConfig:
    return transformers.GemmaConfig(**{**_LLAMA_LIKE, "tie_word_embeddings": True})


def gemma2_config() -> PreTrainedConfig:
    return transformers.Gemma2Config(
        **{**_LLAMA_LIKE, "tie_word_embeddings": True},
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(LAYER_TYPES),
    )


def gemma3_text_config() -> PreTrainedConfig:
    # Gemma 3 also uses a different RoPE base for sliding and full layers.
    return transformers.Gemma3TextConfig(
        **{**_LLAMA_LIKE, "tie_word_embeddings": True},
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
    )


def gemma3_multimodal_config() -> PreTrainedConfig:
    # Gemma3ForConditionalGeneration: transformers saves the text stack as
    # language_model.model.layers.N and counts it in text_config; the vision tower (SigLIP, saved as
    # vision_tower.encoder.layers.N) has as many layers as the text stack, so a tool that edits
    # the wrong stack or every num_hidden_layers key is caught. It must be left as it is.
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return transformers.Gemma3Config(
        text_config=gemma3_text_config().to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )


def phi3_config() -> PreTrainedConfig:
    cfg = {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}
    return transformers.Phi3Config(**cfg, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def mixtral_config() -> PreTrainedConfig:
    return transformers.MixtralConfig(
        **{**_LLAMA_LIKE, "intermediate_size": 32},
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def gpt2_config() -> PreTrainedConfig:
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=N_LAYERS,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )


def gpt_neox_config() -> PreTrainedConfig:
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: Callable[[], PreTrainedConfig]
    zero: str  # --zero substrings selecting the residual-output projections (weights and biases)
    layers_key: str = "num_hidden_layers"  # dotted path for nested sections: text_config.num_hidden_layers
    dtype: torch.dtype = torch.float32
    # The layer stack's prefix in the *loaded* model's state_dict, which may differ from the names
    # saved on disk (transformers >= 5 renames multimodal stacks and fuses Mixtral's experts).
    loaded_stack: str = "model.layers"


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", llama_config, "o_proj,down_proj"),
        Arch("llama_bf16", llama_config, "o_proj,down_proj", dtype=torch.bfloat16),
        Arch("llama_bias", llama_bias_config, "o_proj,down_proj"),
        Arch("mistral", mistral_config, "o_proj,down_proj"),
        Arch("qwen2", qwen2_config, "o_proj,down_proj"),
        Arch("qwen3", qwen3_config, "o_proj,down_proj"),
        Arch("gemma", gemma_config, "o_proj,down_proj"),
        Arch("gemma2", gemma2_config, "o_proj,down_proj"),
        Arch("gemma3_text", gemma3_text_config, "o_proj,down_proj"),
        Arch(
            "gemma3_multimodal",
            gemma3_multimodal_config,
            "o_proj,down_proj",
            "text_config.num_hidden_layers",
            loaded_stack="model.language_model.layers",
        ),
        Arch("phi3", phi3_config, "o_proj,down_proj"),
        # transformers >= 5 saves the experts as w1/w2/w3 per expert: w2 is the output projection.
        Arch("mixtral", mixtral_config, "o_proj,w2"),
        Arch("gpt2", gpt2_config, "attn.c_proj,mlp.c_proj", layers_key="n_layer", loaded_stack="transformer.h"),
        Arch("gpt_neox", gpt_neox_config, "attention.dense,dense_4h_to_h", loaded_stack="gpt_neox.layers"),
    ]
}


def build_tiny_model(config: PreTrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised model in eval mode; every parameter perturbed so none is 0 or 1."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.to(dtype).eval()


def save_tiny_model(
    config: PreTrainedConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "20KB",
) -> Path:
    """Build a tiny model and save it sharded (several `*.safetensors` and the index json)."""
    model = build_tiny_model(config, seed=seed, dtype=dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    return out_dir


def fixed_input(seed: int = 1234) -> torch.Tensor:
    """The fixed token ids the logits are compared on: shape [1, SEQ_LEN], no special image tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 8, (1, SEQ_LEN), generator=gen)


def run_ok(*args: str | Path) -> None:
    """A shardsurgeon command run in process; it must succeed."""
    from click.testing import CliRunner

    from shardsurgeon.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def load_checked(path: Path, dtype: torch.dtype, **config):
    """The model at ``path`` as transformers loads it, with no missing, unexpected or mismatched weight."""
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **config)
    assert not {k: v for k, v in info.items() if v}, info
    return model.eval()


def logits_of(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits on ``ids`` (default: :func:`fixed_input`)."""
    with torch.no_grad():
        return model(fixed_input() if ids is None else ids).logits


def logits_with_routers_masked(model, routers: set[int], kept: Callable[[int], bool]) -> torch.Tensor:
    """The logits with every router logit of an expert ``kept`` refuses set to minus infinity: each
    ``torch.nn.functional.linear`` whose weight is one of ``routers`` (by ``id``) masks its columns."""
    real = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        y = real(x, weight, bias)
        if id(weight) in routers:
            y = y.clone()
            y[..., [e for e in range(weight.shape[0]) if not kept(e)]] = float("-inf")
        return y

    torch.nn.functional.linear = linear
    try:
        return logits_of(model)
    finally:
        torch.nn.functional.linear = real
