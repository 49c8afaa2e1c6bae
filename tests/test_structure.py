"""Config keys that give layers kinds by a rule: each output layer keeps its source layer's kind,
or the recipe is refused in one line. Pure: configs and fake stacks, no files."""

from __future__ import annotations

import pytest

from shardsurgeon import LayerStack, PlanError, SourceLayer, patch_config


def patched(config: dict, layers: list[int]) -> dict:
    stack = LayerStack("model.layers", config["num_hidden_layers"], (), "num_hidden_layers")
    return patch_config(config, stack, [SourceLayer(config, stack, i) for i in layers])


def kinds(config: dict) -> list[str]:
    """Each layer's kind as transformers reads the config (written out here, not with the rules)."""
    out = []
    for i in range(config["num_hidden_layers"]):
        kind = []
        if "first_k_dense_replace" in config:
            moe = i >= config["first_k_dense_replace"] and i % config.get("moe_layer_freq", 1) == 0
            kind.append("moe" if moe else "dense")
        if "decoder_sparse_step" in config:
            moe = i not in config.get("mlp_only_layers", []) and (i + 1) % config["decoder_sparse_step"] == 0
            kind.append("moe" if moe else "dense")
        if "layer_types" in config:
            kind.append(config["layer_types"][i])
        elif "sliding_window_pattern" in config:
            kind.append("full" if (i + 1) % config["sliding_window_pattern"] == 0 else "sliding")
        elif config.get("model_type") == "gemma2":
            kind.append("sliding" if i % 2 == 0 else "full")
        if "moe_layers" in config or "interleave_moe_layer_step" in config:
            moe = (
                i in config["moe_layers"]
                if "moe_layers" in config
                else (i + 1) % config["interleave_moe_layer_step"] == 0
            )
            kind.append("moe" if moe else "dense")
        if "no_rope_layers" in config or "no_rope_layer_interval" in config:
            rope = (
                config["no_rope_layers"][i]
                if "no_rope_layers" in config
                else (i + 1) % config["no_rope_layer_interval"] != 0
            )
            kind.append("rope" if rope else "nope")
        if config.get("use_sliding_window"):
            kind.append("sliding" if i >= config["max_window_layers"] else "full")
        out.append("/".join(kind))
    return out


def check_kinds_follow_sources(config: dict, layers: list[int]) -> dict:
    out = patched(config, layers)
    before = kinds(config)
    assert kinds(out) == [before[i] for i in layers]
    return out


DEEPSEEK = {"model_type": "deepseek_v3", "num_hidden_layers": 6, "first_k_dense_replace": 2, "n_routed_experts": 8}
QWEN_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "num_experts": 4}


def test_deepseek_dense_prefix_grows_with_copies_of_a_dense_layer():
    out = check_kinds_follow_sources(DEEPSEEK, [0, 1, 1, 2, 3, 4, 5])
    assert out["first_k_dense_replace"] == 3 and out["num_hidden_layers"] == 7


def test_deepseek_dense_layer_after_a_moe_layer_is_refused():
    with pytest.raises(
        PlanError, match=r"first_k_dense_replace 2 makes output layer 3 moe, but it copies source layer 1"
    ):
        patched(DEEPSEEK, [0, 1, 2, 1, 3, 4, 5])


def test_deepseek_appending_moe_copies_changes_nothing():
    out = check_kinds_follow_sources(DEEPSEEK, [0, 1, 2, 3, 4, 5, 5, 5])
    assert out["first_k_dense_replace"] == 2


def test_qwen_moe_step_becomes_an_explicit_list_of_dense_layers():
    out = check_kinds_follow_sources(QWEN_MOE, [0, 1, 1, 2, 3, 4, 5])  # layer 1 is sparse (step 2)
    assert (out["decoder_sparse_step"], out["mlp_only_layers"]) == (1, [0, 3, 5])


def test_qwen_moe_with_mlp_only_layers_is_renumbered():
    config = {**QWEN_MOE, "decoder_sparse_step": 1, "mlp_only_layers": [0, 4]}
    out = check_kinds_follow_sources(config, [0, 0, 1, 2, 3, 4, 4, 5])
    assert out["mlp_only_layers"] == [0, 1, 5, 6]


@pytest.mark.parametrize("model_type", ["gemma3_text", "cohere2"])
def test_sliding_window_pattern_is_kept_when_a_period_fits_and_refused_otherwise(model_type):
    config = {"model_type": model_type, "num_hidden_layers": 6, "sliding_window_pattern": 3}
    out = check_kinds_follow_sources(config, [0, 1, 2, 3, 4, 5, 3, 4, 5])  # a whole period appended
    assert out["sliding_window_pattern"] == 3
    with pytest.raises(
        PlanError,
        match=r"sliding_window_pattern 3 makes output layer 2 full, but it copies source layer 1, which is sliding",
    ):
        patched(config, [0, 1, 1, 2, 3, 4, 5])


def test_sliding_window_pattern_defers_to_layer_types():
    config = {"num_hidden_layers": 3, "sliding_window_pattern": 3, "layer_types": ["s", "s", "f"]}
    out = patched(config, [0, 1, 1, 2])
    assert out["layer_types"] == ["s", "s", "s", "f"] and out["sliding_window_pattern"] == 3


def test_gemma2_without_layer_types_keeps_its_parity_or_is_refused():
    config = {"model_type": "gemma2", "num_hidden_layers": 4}
    check_kinds_follow_sources(config, [0, 1, 0, 1, 2, 3])
    with pytest.raises(
        PlanError,
        match=r"gemma2 without layer_types \(even layers slide\) makes output layer 2 sliding.*no key changes",
    ):
        patched(config, [0, 1, 1, 2, 3])


def test_llama4_moe_and_no_rope_become_lists():
    config = {
        "model_type": "llama4_text",
        "num_hidden_layers": 4,
        "interleave_moe_layer_step": 2,
        "no_rope_layer_interval": 4,
    }
    out = check_kinds_follow_sources(config, [0, 1, 1, 2, 3])
    assert out["moe_layers"] == [1, 2, 4]
    assert out["no_rope_layers"] == [1, 1, 1, 1, 0]


def test_qwen2_max_window_layers_moves_with_the_prefix():
    config = {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2}
    out = check_kinds_follow_sources(config, [0, 0, 1, 2, 3])
    assert out["max_window_layers"] == 3
    with pytest.raises(PlanError, match="max_window_layers 2"):
        patched(config, [0, 1, 2, 0, 3])


def test_plain_models_are_untouched():
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8}
    assert patched(config, [0, 1, 1]) == {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 8}
