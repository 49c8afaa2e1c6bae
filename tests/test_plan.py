"""The pure layers, tested without files: arch detection, config patching, recipes, plans, layouts."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import pytest

from shardsurgeon import (
    Checkpoint,
    Convert,
    Copy,
    PlanError,
    RecipeError,
    Shard,
    Source,
    SourceVersion,
    TensorRef,
    Zeros,
    make_plan,
    parse_size,
    plan_layout,
    resolve,
)
from shardsurgeon.model.arch import (
    NO_HINT,
    SourceLayer,
    StackHint,
    find_layer_stack,
    patch_config,
    resolve_zero_filters,
)
from shardsurgeon.plan.recipe import (
    LayerSource,
    Recipe,
    ScaleRule,
    expand_recipe,
    parse_dup,
    recipe_from_json,
    recipe_to_json,
)

FAKE = Path("/fake/model.safetensors")


def fake_checkpoint(names: list[str], config: dict, dtype: str = "BF16", shape=(4, 4)) -> Checkpoint:
    tensors, offset = {}, 8
    for name in names:
        tensors[name] = TensorRef(name, FAKE, dtype, shape, offset, 2 * shape[0] * shape[1])
        offset += 32
    return Checkpoint(Path("/fake"), tensors, (Shard(FAKE, SourceVersion(str(FAKE), offset, "0" * 64)),), config)


def fake_source(names: list[str], config: dict, dtype: str = "BF16", shape=(4, 4), reference: str = "m") -> Source:
    return resolve(fake_checkpoint(names, config, dtype, shape), NO_HINT, reference)


def llama_names(layers: int, prefix: str = "model.layers") -> list[str]:
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(layers):
        names += [f"{prefix}.{i}.self_attn.o_proj.weight", f"{prefix}.{i}.mlp.down_proj.weight", f"{prefix}.{i}.x"]
    return names


@pytest.mark.parametrize(
    ("names", "config", "prefix", "key"),
    [
        (llama_names(3), {"num_hidden_layers": 3}, "model.layers", ("num_hidden_layers",)),
        (
            ["transformer.wte.weight", "transformer.h.0.a", "transformer.h.1.a"],
            {"n_layer": 2},
            "transformer.h",
            ("n_layer",),
        ),
        (
            ["gpt_neox.layers.0.a", "gpt_neox.layers.1.a"],
            {"num_hidden_layers": 2},
            "gpt_neox.layers",
            ("num_hidden_layers",),
        ),
        (
            [
                "model.language_model.layers.0.a",
                "model.vision_tower.encoder.layers.0.a",
                "model.vision_tower.encoder.layers.1.a",
            ],
            {"text_config": {"num_hidden_layers": 1}, "vision_config": {"num_hidden_layers": 2}},
            "model.language_model.layers",
            ("text_config", "num_hidden_layers"),
        ),
        (["backbone.blocks.0.a", "backbone.blocks.1.a"], {"num_layers": 2}, "backbone.blocks", ("num_layers",)),
    ],
)
def test_layer_stack_detection(names, config, prefix, key):
    stack = find_layer_stack(names, config)
    assert stack.prefix == prefix
    assert (*stack.config_section, stack.count_key) == key


def test_unknown_layout_names_what_was_looked_for():
    with pytest.raises(PlanError, match=r"cannot tell which layer stack.*name it with --layer-prefix"):
        find_layer_stack(["a.0.x", "b.0.y"], {"num_hidden_layers": 1})
    stack = find_layer_stack(["a.0.x", "b.0.y", "b.1.y"], {"depth": 2}, StackHint("b", "depth"))
    assert (stack.prefix, stack.count) == ("b", 2)


def test_missing_layer_and_wrong_count_are_refused():
    with pytest.raises(PlanError, match="layer 1 has no tensors"):
        find_layer_stack(["model.layers.0.a", "model.layers.2.a"], {"num_hidden_layers": 3})
    with pytest.raises(PlanError, match="num_hidden_layers is 3 but the tensors hold 2 layers"):
        find_layer_stack(["model.layers.0.a", "model.layers.1.a"], {"num_hidden_layers": 3})


def test_patch_config_rebuilds_per_layer_lists_in_the_stack_section_only():
    config = {
        "architectures": ["X"],
        "text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "model_type": "t"},
        "vision_config": {"num_hidden_layers": 3, "layer_types": ["v", "v", "v"]},
    }
    stack = find_layer_stack([f"model.language_model.layers.{i}.w" for i in range(3)], config)
    patched = patch_config(config, stack, [SourceLayer(config, stack, i) for i in [0, 1, 1, 2, 2]])
    assert patched["text_config"] == {
        "num_hidden_layers": 5,
        "layer_types": ["a", "b", "b", "c", "c"],
        "model_type": "t",
    }
    assert patched["vision_config"] == config["vision_config"]
    assert config["text_config"]["num_hidden_layers"] == 3, "input not modified"


@pytest.mark.parametrize(
    ("model_type", "names", "expected"),
    [
        ("llama", ["self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"], ("o_proj", "down_proj")),
        (
            "gpt2",
            ["attn.c_attn.weight", "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight"],
            ("attn.c_proj", "mlp.c_proj"),
        ),
        ("gpt_neox", ["attention.dense.weight", "mlp.dense_4h_to_h.weight"], ("attention.dense", "dense_4h_to_h")),
        ("mixtral", ["self_attn.o_proj.weight", "block_sparse_moe.experts.0.w2.weight"], ("o_proj", "w2")),
    ],
)
def test_residual_alias(model_type, names, expected):
    config = {"model_type": model_type, "num_hidden_layers": 1}
    stack = find_layer_stack([f"model.layers.0.{n}" for n in names], config)
    assert resolve_zero_filters(["residual", "up_proj"], config, stack, names) == (*expected, "up_proj")


def test_parse_dup_and_size():
    assert parse_dup("31x12") == [(31, 12)]
    assert parse_dup("3x1, 7X2") == [(3, 1), (7, 2)]
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("123") == 123
    for bad in ("", "GB", "-1GB", "5 XB"):
        with pytest.raises(RecipeError):
            parse_size(bad)


def test_every_matches_llama_pro_formula():
    recipe = expand_recipe("m", 32, every=4, zero=("o_proj",))
    inserted = [i for i, s in enumerate(recipe.layers) if s.inserted]
    assert inserted == [(k + 1) * 5 - 1 for k in range(8)]
    assert [recipe.layers[i].layer for i in inserted] == [(k + 1) * 4 - 1 for k in range(8)]


def test_plan_ops_order_and_config():
    checkpoint = fake_source(llama_names(2), {"num_hidden_layers": 2, "torch_dtype": "bfloat16"})
    recipe = expand_recipe("m", 2, [(1, 1)], zero=("o_proj", "down_proj"), dtype="F16")
    plan = make_plan(recipe, {"m": checkpoint})
    names = [t.name for t in plan.tensors]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    ops = {t.name: (t.op, t.dtype, t.source.name) for t in plan.tensors}
    assert ops["model.layers.2.self_attn.o_proj.weight"] == (Zeros(), "F16", "model.layers.1.self_attn.o_proj.weight")
    assert ops["model.layers.2.x"] == (Convert(), "F16", "model.layers.1.x")
    assert ops["model.layers.1.mlp.down_proj.weight"][0] == Convert()
    assert plan.config == {"num_hidden_layers": 3, "torch_dtype": "float16"}


def test_plan_fingerprint_changes_with_the_recipe():
    checkpoint = fake_source(llama_names(2), {"num_hidden_layers": 2})
    a = make_plan(expand_recipe("m", 2, [(1, 1)]), {"m": checkpoint})
    b = make_plan(expand_recipe("m", 2, [(0, 1)]), {"m": checkpoint})
    c = make_plan(expand_recipe("m", 2, [(1, 1)]), {"m": checkpoint})
    assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint


def test_scale_rules_first_match_wins_and_integers_cannot_be_scaled():
    checkpoint = fake_source(llama_names(1), {"num_hidden_layers": 1})
    rules = (ScaleRule(0.5, "o_proj"), ScaleRule(0.0, "proj"), ScaleRule(2.0))
    layer = LayerSource("m", 0, rules)
    plan = make_plan(Recipe((layer,), LayerSource("m", None), LayerSource("m", None)), {"m": checkpoint})
    ops = {t.name: t.op for t in plan.tensors}
    assert ops["model.layers.0.self_attn.o_proj.weight"] == Convert(0.5)
    assert ops["model.layers.0.mlp.down_proj.weight"] == Zeros()
    assert ops["model.layers.0.x"] == Convert(2.0)
    assert ops["model.embed_tokens.weight"] == Copy()
    ints = fake_source(llama_names(1), {"num_hidden_layers": 1}, dtype="I32")
    with pytest.raises(PlanError, match=r"is I32, which cannot be scaled by 0\.5"):
        make_plan(Recipe((layer,), LayerSource("m", None), LayerSource("m", None)), {"m": ints})


def test_filter_matching_nothing_is_an_error():
    checkpoint = fake_source(llama_names(2), {"num_hidden_layers": 2})
    with pytest.raises(RecipeError, match="--zero 'q_proj' matches no tensor"):
        make_plan(expand_recipe("m", 2, [(1, 1)], zero=("q_proj",)), {"m": checkpoint})


def test_layout_is_greedy_and_big_tensors_get_their_own_shard():
    checkpoint = fake_source(llama_names(2), {"num_hidden_layers": 2})
    plan = make_plan(expand_recipe("m", 2, [(1, 1)]), {"m": checkpoint})
    layout = plan_layout(plan, max_shard_bytes=70)  # 32-byte tensors: two per shard
    assert [len(s.tensors) for s in layout.shards] == [2] * 6
    assert layout.shards[0].name == "model-00001-of-00006.safetensors"
    assert sorted(p.tensor.name for s in layout.shards for p in s.tensors) == sorted(t.name for t in plan.tensors)
    tiny = plan_layout(plan, max_shard_bytes=10)
    assert [len(s.tensors) for s in tiny.shards] == [1] * 12
    single = plan_layout(plan)
    assert [s.name for s in single.shards] == ["model.safetensors"]
    first = single.shards[0]
    assert first.tensors[0].offset == len(first.header) and len(first.header) % 8 == 0
    assert all(b.offset == a.offset + a.tensor.nbytes for a, b in pairwise(first.tensors))


def test_recipe_json_round_trip():
    recipe = expand_recipe("./local/path", 4, [(3, 2)], every=2, zero=("o_proj",), dtype="F16")
    text = recipe_to_json(recipe, {"./local/path": "acme/model"})
    assert "./local/path" not in text
    assert recipe_from_json(text, ["./local/path"], lambda model: 4) == recipe
    with pytest.raises(RecipeError, match="recorded recipe is unreadable"):
        recipe_from_json("{", ["m"], lambda model: 4)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda r: r["layers"][0].__setitem__(1, "3"), "layer '3'"),
        (lambda r: r["layers"][0].__setitem__(1, 4), "layer 4 of m, which has 4 layers"),
        (lambda r: r["layers"][0].__setitem__(1, True), "layer True"),
        (lambda r: r["layers"][4].__setitem__(2, [[float("nan"), None]]), "scale nan"),
        (lambda r: r.__setitem__("dtype", "F99"), "dtype 'F99'"),
        (lambda r: r["head"].__setitem__(0, 7), "model index 7"),
        (lambda r: r.__setitem__("layers", 5), "no list of them"),
    ],
)
def test_an_edited_recorded_recipe_is_refused_in_one_line(edit, problem):
    import json

    record = json.loads(recipe_to_json(expand_recipe("m", 4, [(3, 2)], zero=("o_proj",)), {}))
    edit(record)
    with pytest.raises(RecipeError, match=re.escape(problem)) as caught:
        recipe_from_json(json.dumps(record), ["m"], lambda model: 4)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "alias",
    ["model.layers.01.x", "model.layers.\u0661.x", "model.layers.+1.x", "model.layers. 1.x", "model.layers.1"],
)
def test_a_layer_number_has_one_spelling_and_others_are_outside_the_stack(alias):
    source = fake_source([*llama_names(2), alias], {"num_hidden_layers": 2})
    assert source.layer_count == 2
    assert alias in [ref.name for ref in source.outside]
    assert all(alias != t.ref.name for layer in source.layers for t in layer)
    plan = make_plan(expand_recipe("m", 2, [(1, 1)]), {"m": source})
    names = [t.name for t in plan.tensors]
    assert len(names) == len(set(names)) and names.count(alias) == 1


def test_a_layer_with_no_name_after_its_number_is_outside_the_stack():
    source = fake_source([*llama_names(2), "model.layers.1."], {"num_hidden_layers": 2})
    assert "model.layers.1." in [ref.name for ref in source.outside]


def test_two_sources_of_one_output_name_are_refused():
    """A tensor outside the stack named like an output layer's (possible only in a hand-built source)."""
    source = fake_source(llama_names(2), {"num_hidden_layers": 2})
    clash = Source(
        source.reference,
        source.checkpoint,
        source.stack,
        source.layers,
        source.before,
        (*source.after, TensorRef("model.layers.2.x", FAKE, "BF16", (4, 4), 8, 32)),
        source.published_name,
    )
    with pytest.raises(PlanError, match=r"output tensor 'model\.layers\.2\.x' would be made from both"):
        make_plan(expand_recipe("m", 2, [(1, 1)]), {"m": clash})


def test_a_huge_layer_number_costs_no_memory():
    with pytest.raises(PlanError, match=r"layers 0\.\.30000000 expected, but layer 2 has no tensors"):
        find_layer_stack([*llama_names(2), "model.layers.30000000.x"], {"num_hidden_layers": 2})


def test_per_layer_lists_of_a_merge_come_from_each_layers_own_model():
    a_config = {"num_hidden_layers": 3, "layer_types": ["a0", "a1", "a2"], "eos_token_id": [1, 2, 3]}
    b_config = {"num_hidden_layers": 5, "layer_types": ["b0", "b1", "b2", "b3", "b4"]}
    a = fake_source(llama_names(3), a_config, reference="a")
    b = fake_source(llama_names(5), b_config, reference="b")
    layers = (*(LayerSource("a", i) for i in range(2)), *(LayerSource("b", i) for i in range(2, 5)))
    recipe = Recipe(layers, LayerSource("a", None), LayerSource("b", None))
    plan = make_plan(recipe, {"a": a, "b": b})
    assert plan.config == {
        "num_hidden_layers": 5,
        "layer_types": ["a0", "a1", "b2", "b3", "b4"],
        "eos_token_id": [1, 2, 3],
    }


def test_layer_index_lists_are_renumbered():
    config = {"num_hidden_layers": 4, "mlp_only_layers": [1, 3]}
    checkpoint = fake_source(llama_names(4), config)
    plan = make_plan(expand_recipe("m", 4, [(1, 2), (3, 1)]), {"m": checkpoint})
    assert plan.config["mlp_only_layers"] == [1, 2, 3, 5, 6]
