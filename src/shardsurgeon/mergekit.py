"""mergekit passthrough configs: write the one equivalent to a recipe (parsing comes with `merge`).

Consecutive output layers that copy consecutive source layers of one model with the same scale
rules become one slice with a half-open ``layer_range``, as mergekit users write them. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from shardsurgeon.recipe import LayerSource, Recipe


def to_mergekit_yaml(recipe: Recipe, names: Mapping[str, str], dtype: str | None) -> str:
    """The mergekit passthrough YAML whose output equals this recipe's.

    ``names`` maps the recipe's model references to the names to print (Hugging Face ids);
    ``dtype`` is as torch names it.
    """
    slices: list[dict[str, Any]] = []
    previous: LayerSource | None = None
    for source in recipe.layers:
        assert source.layer is not None
        if (
            previous is not None
            and previous.model == source.model
            and previous.scale == source.scale
            and previous.layer == source.layer - 1
            and slices[-1]["sources"][0]["layer_range"][1] == source.layer
        ):
            slices[-1]["sources"][0]["layer_range"][1] = source.layer + 1
        else:
            entry: dict[str, Any] = {
                "model": names.get(source.model, source.model),
                "layer_range": [source.layer, source.layer + 1],
            }
            if source.scale:
                rules = [
                    {"filter": r.filter, "value": r.value} if r.filter else {"value": r.value} for r in source.scale
                ]
                if all(r.filter for r in source.scale):
                    rules.append({"value": 1.0})
                entry["parameters"] = {"scale": rules}
            slices.append({"sources": [entry]})
        previous = source
    config: dict[str, Any] = {"slices": slices, "merge_method": "passthrough"}
    if dtype is not None:
        config["dtype"] = dtype
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
