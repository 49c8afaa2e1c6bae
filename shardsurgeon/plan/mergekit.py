"""mergekit passthrough configs: read one into a Recipe, and write the one equivalent to a Recipe.

Reading follows mergekit 0.1.5's semantics: slices of half-open ``layer_range``s, one source per
slice; ``parameters.scale`` as a number or a list of ``{filter, value}`` entries where the first
entry whose filter is a substring of the *source* tensor name wins (no filter or ``*``: all), and
a scope without a matching entry falls through to the next (source, then slice, then top level);
embeddings from the first slice's model and parameters, final norm and lm_head from the last's;
``dtype`` then ``out_dtype``. What we do not support is an error naming it, never ignored.
Writing merges consecutive layers into slices, as mergekit users write them. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import RecipeError
from shardsurgeon.format import CAST_TARGETS, cast_target, torch_name
from shardsurgeon.model.hfcache import is_hub_id
from shardsurgeon.model.source import Source
from shardsurgeon.plan.recipe import MAX_LAYERS, LayerSource, Recipe, ScaleRule


def to_mergekit_yaml(recipe: Recipe, sources: Mapping[str, Source], names: Mapping[str, str]) -> str:
    """The mergekit passthrough YAML whose output equals this recipe's.

    Models are printed by ``names`` (a model card's names: Hugging Face ids, or folder names), never
    by the paths the recipe was given. Without a cast there is no ``dtype`` key, which would also
    cast float32 norms. mergekit applies the first and last slices' scales to the tensors outside
    the stack, so those slices get entries that keep them as the recipe says. A ``base`` (the donor
    of config and tokenizer) is written as ``base_model``.
    """
    outside = [ref.name for ref in sources[recipe.head.model].before] + [
        ref.name for ref in sources[recipe.tail.model].after
    ]
    runs: list[tuple[LayerSource, int]] = []  # first source of a slice, and its length
    for source in recipe.layers:
        assert source.layer is not None
        if runs:
            start, length = runs[-1]
            if (start.model, start.scale, start.layer) == (source.model, source.scale, source.layer - length):
                runs[-1] = (start, length + 1)
                continue
        runs.append((source, 1))
    slices: list[dict[str, Any]] = []
    for number, (start, length) in enumerate(runs):
        assert start.layer is not None
        entry: dict[str, Any] = {
            "model": names.get(start.model, start.model),
            "layer_range": [start.layer, start.layer + length],
        }
        donors = [d for d, at in ((recipe.head, 0), (recipe.tail, len(runs) - 1)) if at == number]
        keep = {n: d.scale_for(n)[0] for d in donors for n in outside if start.scale_for(n) != d.scale_for(n)}
        if start.scale or keep:
            entry["parameters"] = {"scale": _scale_entries(start, keep)}
        slices.append({"sources": [entry]})
    config: dict[str, Any] = {"slices": slices, "merge_method": "passthrough"}
    if recipe.base is not None:
        config["base_model"] = names.get(recipe.base, recipe.base)
    if recipe.dtype is not None:
        config["dtype"] = torch_name(recipe.dtype)
    if recipe.out_dtype is not None:
        config["out_dtype"] = torch_name(recipe.out_dtype)
    import yaml  # loaded only when a config is read or written

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)


def _scale_entries(source: LayerSource, keep: Mapping[str, float]) -> list[dict[str, Any]]:
    """``keep`` first (tensor name -> value, for tensors outside the stack), then the source's rules."""
    entries: list[dict[str, Any]] = [{"filter": name, "value": value} for name, value in keep.items()]
    entries += [{"filter": r.filter, "value": r.value} if r.filter else {"value": r.value} for r in source.scale]
    if all(r.filter for r in source.scale):
        entries.append({"value": 1.0})
    return entries


TOP_KEYS = frozenset({"merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype"})
TOP_KEYS_IGNORED = frozenset({"tokenizer_source", "name"})


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """One slice of a config: ``model`` layers ``start`` to ``end`` (exclusive), and its scale rules."""

    model: str
    start: int | None
    end: int | None
    scale: tuple[ScaleRule, ...]


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """A parsed passthrough config; ``start``/``end`` are None in the ``models:`` form (all layers)."""

    slices: tuple[SliceSpec, ...]
    base_model: str | None
    dtype: str | None
    out_dtype: str | None

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*([self.base_model] if self.base_model else []), *(s.model for s in self.slices)]))


def parse_config(text: str, where: str) -> MergeSpec:
    """Parse a mergekit passthrough YAML config; ``where`` names it in messages."""
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({_clip(' '.join(str(e).split()), 200)})") from None
    except RecursionError:
        raise RecipeError(f"{where}: not valid YAML (nested too deeply)") from None
    except (ValueError, MemoryError) as e:  # a number of thousands of digits; a flood of nodes
        raise RecipeError(f"{where}: cannot read the YAML ({type(e).__name__}: {_clip(str(e), 80)})") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{where}: expected a mapping with slices and merge_method, found {type(config).__name__}")
    _check_keys(config, TOP_KEYS | TOP_KEYS_IGNORED, where, "")
    method = config.get("merge_method")
    if method != "passthrough":
        raise RecipeError(
            f"{where}: merge_method {_shown(method)} is not supported; shardsurgeon does passthrough merges only"
        )
    tokenizer_source = config.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise RecipeError(
            f"{where}: tokenizer_source {_shown(tokenizer_source)} is not supported; only 'base' (the base model's "
            "tokenizer, copied as is)"
        )
    top = _scale(config.get("parameters"), where, "parameters")
    if ("slices" in config) == ("models" in config):
        raise RecipeError(f"{where}: expected either slices or models (one of them), found {_found(config)}")
    slices = _slices(config, top, where) if "slices" in config else _models(config, top, where)
    return MergeSpec(
        slices,
        None if config.get("base_model") is None else _model_ref(config["base_model"], where, "base_model"),
        _dtype(config.get("dtype"), where, "dtype"),
        _dtype(config.get("out_dtype"), where, "out_dtype"),
    )


def merge_recipe(spec: MergeSpec, layer_count: Callable[[str], int]) -> Recipe:
    """The recipe of a parsed config; ``layer_count(model)`` gives each model's number of layers."""
    layers: list[LayerSource] = []
    if len(spec.slices) > MAX_LAYERS:
        raise RecipeError(f"{len(spec.slices)} slices is more than the {MAX_LAYERS} layers supported")
    for number, piece in enumerate(spec.slices):
        count = layer_count(piece.model)
        start, end = (0, count) if piece.start is None else (piece.start, piece.end)
        assert end is not None
        if not 0 <= start < end <= count:
            raise RecipeError(
                f"slices[{number}]: layer_range [{start}, {end}] of {piece.model} is out of range; the model "
                f"has layers 0..{count - 1}, so a range is [a, b] with 0 <= a < b <= {count}"
            )
        if len(layers) + end - start > MAX_LAYERS:
            raise RecipeError(
                f"slices[{number}]: the slices so far give more than the {MAX_LAYERS} output layers supported"
            )
        layers += [LayerSource(piece.model, layer, piece.scale) for layer in range(start, end)]
    first, last = spec.slices[0], spec.slices[-1]
    return Recipe(
        tuple(layers),
        LayerSource(first.model, None, first.scale),
        LayerSource(last.model, None, last.scale),
        spec.dtype,
        spec.out_dtype,
        spec.base_model,
    )


def _slices(config: dict[str, Any], top: tuple[ScaleRule, ...], where: str) -> tuple[SliceSpec, ...]:
    slices = config["slices"]
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{where}: slices must be a non-empty list, found {_found(slices)}")
    specs = []
    for number, piece in enumerate(slices):
        at = f"slices[{number}]"
        if not isinstance(piece, dict):
            raise RecipeError(f"{where}: {at} must be a mapping with sources, found {_found(piece)}")
        _check_keys(piece, {"sources", "parameters"}, where, at)
        sources = piece.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise RecipeError(
                f"{where}: {at}.sources must list exactly one source for a passthrough merge, found {_found(sources)}"
            )
        source = sources[0]
        at_source = f"{at}.sources[0]"
        if not isinstance(source, dict):
            raise RecipeError(f"{where}: {at_source} must be a mapping with model and layer_range")
        _refuse_revision(source, where, at_source)
        _check_keys(source, {"model", "layer_range", "parameters"}, where, at_source)
        start, end = _layer_range(source.get("layer_range"), where, at_source)
        scale = _in_effect(
            _scale(source.get("parameters"), where, f"{at_source}.parameters")
            + _scale(piece.get("parameters"), where, f"{at}.parameters")
            + top
        )
        specs.append(SliceSpec(_model_ref(source.get("model"), where, f"{at_source}.model"), start, end, scale))
    return tuple(specs)


def _models(config: dict[str, Any], top: tuple[ScaleRule, ...], where: str) -> tuple[SliceSpec, ...]:
    models = config["models"]
    if not isinstance(models, list) or len(models) != 1:
        raise RecipeError(
            f"{where}: models must list exactly one model for a passthrough merge, found {_found(models)}; "
            "use slices to stack several"
        )
    entry = models[0]
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: models[0] must be a mapping with model, found {_found(entry)}")
    _refuse_revision(entry, where, "models[0]")
    _check_keys(entry, {"model", "parameters"}, where, "models[0]")
    scale = _in_effect(_scale(entry.get("parameters"), where, "models[0].parameters") + top)
    return (SliceSpec(_model_ref(entry.get("model"), where, "models[0].model"), None, None, scale),)


def _scale(parameters: Any, where: str, at: str) -> tuple[ScaleRule, ...]:
    if parameters is None:
        return ()
    if not isinstance(parameters, dict):
        raise RecipeError(f"{where}: {at} must be a mapping, found {_found(parameters)}")
    _check_keys(parameters, {"scale"}, where, at)
    value = parameters.get("scale")
    if value is None:
        return ()
    if _is_number(value):
        return (ScaleRule(float(value)),)
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: {at}.scale must be a number or a list of {{filter, value}}, found {_found(value)}")
    rules = []
    for number, entry in enumerate(value):
        if _is_number(entry):
            raise RecipeError(
                f"{where}: {at}.scale is a list of numbers (a gradient across layers), which shardsurgeon does "
                "not support; give one number or {filter, value} entries"
            )
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: {at}.scale[{number}] must be a mapping with value, found {_found(entry)}")
        _check_keys(entry, {"filter", "value"}, where, f"{at}.scale[{number}]")
        if not _is_number(entry.get("value")):
            raise RecipeError(
                f"{where}: {at}.scale[{number}].value must be a number, found {_found(entry.get('value'))}"
            )
        name_filter = entry.get("filter")
        if name_filter is not None and not isinstance(name_filter, str):
            raise RecipeError(f"{where}: {at}.scale[{number}].filter must be a string, found {_found(name_filter)}")
        rules.append(ScaleRule(float(entry["value"]), None if name_filter in (None, "*") else name_filter))
    return tuple(rules)


def _in_effect(rules: tuple[ScaleRule, ...]) -> tuple[ScaleRule, ...]:
    """The rules that can change a tensor: none after the first without a filter (it matches every
    tensor first), and no trailing rules of 1 (a tensor they match is unchanged, as is one no rule
    matches). So a config and the one :func:`to_mergekit_yaml` writes back give the same recipe."""
    kept = list(rules)
    for number, rule in enumerate(kept):
        if rule.filter is None:
            del kept[number + 1 :]
            break
    while kept and kept[-1].value == 1:
        kept.pop()
    return tuple(kept)


def _layer_range(value: Any, where: str, at: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise RecipeError(f"{where}: {at}.layer_range must be [start, end] (end excluded), found {_found(value)}")
    return value[0], value[1]


def _model_ref(value: Any, where: str, at: str) -> str:
    if not isinstance(value, str) or not value or "+" in value:
        problem = " (LoRA adapters, model+lora, are not supported)" if isinstance(value, str) and "+" in value else ""
        raise RecipeError(f"{where}: {at} must be a folder or a Hugging Face id, found {_found(value)}{problem}")
    return value


def _dtype(value: Any, where: str, at: str) -> str | None:
    if value is None:
        return None
    dtype = cast_target(value) if value in CAST_TARGETS else None
    if dtype is None:
        shown = repr(value) if isinstance(value, str) else _found(value)
        raise RecipeError(f"{where}: {at} {shown} is not supported; expected one of {', '.join(CAST_TARGETS)}")
    return dtype


def _refuse_revision(entry: dict[str, Any], where: str, at: str) -> None:
    """A source's ``revision:`` key, which published configs hold and mergekit's pydantic model
    drops without a word (it loads the default branch): say how to name a revision instead."""
    if "revision" not in entry:
        return
    model, revision = entry.get("model"), entry["revision"]
    place = f"{where}: {at}.revision: mergekit ignores this key"
    if not isinstance(model, str) or not isinstance(revision, str | int) or isinstance(revision, bool):
        raise RecipeError(f"{place}; name a revision in the model instead, as model: org/name@REVISION")
    if not is_hub_id(model):
        raise RecipeError(f"{place}, and {model} is a folder, which has no revisions; remove the revision key")
    if "@" in model:
        raise RecipeError(
            f"{place}; the model {model} already names its revision ({model.partition('@')[2]}), so remove the "
            "revision key"
        )
    raise RecipeError(
        f"{place} and would load {model}'s default branch; to load revision {revision}, name it in the model: "
        f"model: {model}@{revision}"
    )


def _check_keys(mapping: dict[str, Any], known: frozenset[str] | set[str], where: str, at: str) -> None:
    for key in mapping:
        if key not in known:
            place = _clip(f"{at}.{key}" if at else str(key), 80)
            raise RecipeError(
                f"{where}: {place}: unknown or unsupported key; shardsurgeon accepts {', '.join(sorted(known))} here"
            )


FLOAT32_MAX = 3.4028234663852886e38


def _is_number(value: Any) -> bool:
    """A finite int or float that float32 can hold (scales multiply in float32; YAML's .inf, .nan and
    1e39 are refused with the other non-numbers rather than turning tensors into infinities)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= FLOAT32_MAX
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _found(value: Any) -> str:
    """``value`` in YAML flow style for a message, cut to 60 characters; a structure of more than a
    few hundred nodes (such as a billion-laughs of aliases) is described, never expanded."""
    import yaml

    if not _fewer_nodes_than(value, 200):
        return f"a {type(value).__name__} of {len(value)} entries, nested"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return _clip(text, 60)


def _shown(value: Any) -> str:
    """A scalar as Python writes it (quoted strings), anything else as :func:`_found` does."""
    return _clip(repr(value), 60) if isinstance(value, str | int | float | None) else _found(value)


def _fewer_nodes_than(value: Any, budget: int) -> bool:
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and len(item) > 1000:
            return False
    return True


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
