"""The model card (README.md) of an output: front matter, what was done, how, and the mergekit config."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import safe_text
from shardsurgeon.model.license import License
from shardsurgeon.plan.planner import Plan
from shardsurgeon.plan.recipe import DenseExpert, ExpertChange, PruneExperts, Upcycle


@dataclass(frozen=True, slots=True)
class CardModel:
    """A model of the recipe as the card names it: in commands and configs (``name``), as a
    ``base_model`` (``hub_id``, None for a model known only by its folder), and its license."""

    name: str
    hub_id: str | None
    license: License | None


def _experts_tags(change: ExpertChange) -> list[str]:
    match change:
        case Upcycle():
            return ["moe", "sparse-upcycling"]
        case PruneExperts():
            return ["moe", "expert-pruning"]
        case DenseExpert():
            return ["expert-extraction"]  # a dense model, made from a mixture of experts


def model_card(plan: Plan, models: Sequence[CardModel], command: str, what: str, mergekit_yaml: str) -> str:
    """The README.md of the output: front matter, what was done, how, and the mergekit config.

    ``models`` are the recipe's models, the config donor first. The front matter follows the Hub's
    conventions: ``base_model`` lists Hub ids only, as mergekit's cards do (the Hub links and
    checks the field; a model known only by its folder is named in the text);
    ``base_model_relation: merge``, since a passthrough merge, of one model or several, is neither
    a fine-tune nor an adapter nor a quantization, but ``finetune`` for a model whose experts were
    made, pruned or extracted (a model derived from one, to be trained further: the relation the Hub gives
    upcycled and pruned models); and a ``license`` only when every model names
    the same one: a license taken from one model would claim the others' weights for it, so
    differing or unknown licenses are left to the publisher and the text says which model names
    which.

    Valid UTF-8 and valid YAML whatever the names hold: the front matter is dumped by the YAML
    library from ids and license names of the Hub's characters, the title and description are kept
    on their line, and bytes of a name that are not UTF-8 are written as ``\\xNN``.
    """
    import yaml  # loaded only when a card is written

    ids = list(dict.fromkeys(m.hub_id for m in models if m.hub_id))
    experts = plan.recipe.experts
    vocab = plan.recipe.vocab is not None
    if experts is not None:
        tags = ["shardsurgeon", *_experts_tags(experts)]
    else:
        tags = ["shardsurgeon"] + (["vocabulary"] if vocab else ["mergekit", "merge"])
    tags += ["block-expansion"] if any(s.inserted for s in plan.recipe.layers) else []
    front: dict[str, Any] = {}
    if ids:
        front["base_model"] = ids[0] if len(ids) == 1 else ids
    front["library_name"] = "transformers"
    if ids:
        several = isinstance(experts, Upcycle) and bool(experts.expert_models)
        front["base_model_relation"] = "merge" if (experts is None and not vocab) or several else "finetune"
    common, license_text = _license(models)
    if common is not None:
        front["license"] = common.id
        front.update(
            {key: value for key, value in (("license_name", common.name), ("license_link", common.link)) if value}
        )
    front["tags"] = tags
    title = safe_text(" + ".join(_utf8(m.name) for m in models), limit=None)
    what = safe_text(what, limit=None) + (f"\n\n{license_text}" if license_text else "")
    command, mergekit_yaml = _utf8(command), _utf8(mergekit_yaml.rstrip())
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=False, width=1 << 20)}---

# {title}, {plan.output_layers} layers

{what}

Made with [shardsurgeon](https://pypi.org/project/shardsurgeon/) by:

{_fence(command)}sh
{command}
{_fence(command)}
{_mergekit_section(mergekit_yaml)}"""


def _mergekit_section(config: str) -> str:
    if not config:
        return ""
    return f"""
The same checkpoint as a mergekit passthrough config:

{_fence(config)}yaml
{config}
{_fence(config)}
"""


def _license(models: Sequence[CardModel]) -> tuple[License | None, str]:
    """The license the output carries, if any, and a sentence saying where it comes from or why none."""
    licenses = {m.license for m in models}
    if licenses == {None}:
        return None, ""
    if len(licenses) == 1:
        (common,) = licenses
        assert common is not None
        whose = "the base model's card or config" if len(models) == 1 else "the base models, which all name it"
        return common, f"License: {common.id}, carried over from {whose}."
    named = "; ".join(f"{_utf8(m.name)}: {m.license.id if m.license else 'none found'}" for m in models)
    return None, (
        f"No license is set: the base models name different licenses ({safe_text(named, limit=None)}). "
        "Choose the license this checkpoint may carry before publishing it."
    )


def _utf8(text: str) -> str:
    """``text`` with lone surrogates (bytes of a name that is not UTF-8) written as escapes."""
    return "".join(safe_text(char) if "\ud800" <= char <= "\udfff" else char for char in text)


def _fence(text: str) -> str:
    """A Markdown code fence longer than any run of backticks in ``text``, so ``text`` cannot close it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)
