"""Config keys that give layers different kinds by a rule, not by a per-layer list.

Some architectures say which layers are MoE, sliding-window or without RoPE through a count or a
period (DeepSeek's ``first_k_dense_replace``/``moe_layer_freq``, Qwen-MoE's ``decoder_sparse_step``,
Gemma 3 and Cohere 2's ``sliding_window_pattern``, Gemma 2's even/odd rule, Llama 4's
``interleave_moe_layer_step`` and ``no_rope_layer_interval``, Qwen 2's ``max_window_layers``,
Jamba's attention and expert periods and offsets).
Re-arranging layers moves them, so each output layer must keep the kind of the source layer it
copies. Each :class:`Rule` reads the kinds a config gives its layers and finds the key values that
give the output's kinds; when no value can, the recipe is refused in one line rather than written
with a config that contradicts its tensors. Per-layer lists (``layer_types``, ``mlp_only_layers``)
are rebuilt by :mod:`arch` and take precedence, so a rule stands aside where its list is present.
Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import PlanError

Section = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Rule:
    """``kinds(section, count)`` names each layer's kind; ``fit(section, kinds)`` gives the key values
    that produce ``kinds`` (None when none can). ``applies`` says whether the section uses the rule."""

    keys: tuple[str, ...]
    applies: Callable[[Section], bool]
    kinds: Callable[[Section, int], list[str]]
    fit: Callable[[Section, list[str]], dict[str, Any] | None]


def _int(section: Section, key: str, default: int) -> int:
    """The key as the model's code uses it: ints, bools and whole floats (``2.0``) count as ints."""
    value = section.get(key, default)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**31:
        return int(value)
    return int(value) if isinstance(value, int) else default


def _search(
    kinds: list[str], candidates: Sequence[int], pattern: Callable[[int, int], str], key: str
) -> dict[str, Any] | None:
    """The first candidate value ``v`` of ``key`` for which ``pattern(v, i) == kinds[i]`` for every layer."""
    for value in candidates:
        if all(pattern(value, i) == kind for i, kind in enumerate(kinds)):
            return {key: value}
    return None


# DeepSeek V2/V3: MoE from layer first_k_dense_replace on, every moe_layer_freq-th layer.
def _deepseek_kind(section: Section, k: int, i: int) -> str:
    routed = section.get("n_routed_experts")
    return "moe" if routed and i >= k and i % max(_int(section, "moe_layer_freq", 1), 1) == 0 else "dense"


DEEPSEEK = Rule(
    ("first_k_dense_replace", "moe_layer_freq"),
    lambda s: "first_k_dense_replace" in s and bool(s.get("n_routed_experts")),
    lambda s, n: [_deepseek_kind(s, _int(s, "first_k_dense_replace", 0), i) for i in range(n)],
    lambda s, kinds: _search(
        kinds, range(len(kinds) + 1), lambda k, i: _deepseek_kind(s, k, i), "first_k_dense_replace"
    ),
)


# Qwen2-MoE / Qwen3-MoE: sparse where (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
def _qwen_moe_kinds(section: Section, count: int) -> list[str]:
    step = max(_int(section, "decoder_sparse_step", 1), 1)
    dense = section.get("mlp_only_layers") or []
    experts = _int(section, "num_experts", 0)
    return ["moe" if experts > 0 and i not in dense and (i + 1) % step == 0 else "dense" for i in range(count)]


QWEN_MOE = Rule(
    ("decoder_sparse_step", "mlp_only_layers"),
    lambda s: "decoder_sparse_step" in s and _int(s, "num_experts", 0) > 0,
    _qwen_moe_kinds,
    # Always expressible: every layer sparse by step 1, the dense ones listed.
    lambda s, kinds: {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, k in enumerate(kinds) if k == "dense"]},
)


def _period_kind(period: int, i: int) -> str:
    return "full" if (i + 1) % max(period, 1) == 0 else "sliding"


# Gemma 3, Cohere 2: every sliding_window_pattern-th layer has full attention.
SLIDING_PATTERN = Rule(
    ("sliding_window_pattern",),
    lambda s: "sliding_window_pattern" in s and "layer_types" not in s,
    lambda s, n: [_period_kind(_int(s, "sliding_window_pattern", 1), i) for i in range(n)],
    lambda s, kinds: _search(kinds, range(1, len(kinds) + 2), _period_kind, "sliding_window_pattern"),
)

# Gemma 2 without layer_types: even layers slide, odd layers attend fully; no key to change.
GEMMA2 = Rule(
    (),
    lambda s: s.get("model_type") == "gemma2" and "layer_types" not in s,
    lambda s, n: [_period_kind(2, i) for i in range(n)],
    lambda s, kinds: {} if all(_period_kind(2, i) == k for i, k in enumerate(kinds)) else None,
)

# Llama 4: MoE every interleave_moe_layer_step-th layer unless moe_layers lists them; the list
# is understood by every version that knows Llama 4, so it can always be written.
LLAMA4_MOE = Rule(
    ("interleave_moe_layer_step",),
    lambda s: "interleave_moe_layer_step" in s and s.get("moe_layers") is None,
    lambda s, n: [
        "moe" if _period_kind(_int(s, "interleave_moe_layer_step", 1), i) == "full" else "dense" for i in range(n)
    ],
    lambda s, kinds: {"moe_layers": [i for i, k in enumerate(kinds) if k == "moe"]},
)

LLAMA4_NO_ROPE = Rule(
    ("no_rope_layer_interval",),
    lambda s: "no_rope_layer_interval" in s and not s.get("no_rope_layers"),
    lambda s, n: [
        "nope" if _period_kind(_int(s, "no_rope_layer_interval", 4), i) == "full" else "rope" for i in range(n)
    ],
    lambda s, kinds: {"no_rope_layers": [int(k == "rope") for k in kinds]},
)


# Qwen 2/3 with use_sliding_window: layers from max_window_layers on slide.
def _window_kind(first: int, i: int) -> str:
    return "sliding" if i >= first else "full"


MAX_WINDOW = Rule(
    ("max_window_layers",),
    lambda s: bool(s.get("use_sliding_window")) and "max_window_layers" in s and "layer_types" not in s,
    lambda s, n: [_window_kind(_int(s, "max_window_layers", 0), i) for i in range(n)],
    lambda s, kinds: _search(kinds, range(len(kinds) + 1), _window_kind, "max_window_layers"),
)


# Jamba: attention (else Mamba) where i % attn_layer_period == attn_layer_offset; experts likewise.
def _periodic(period_key: str, offset_key: str, on: str, off: str) -> Rule:
    def kind(period: int, offset: int, i: int) -> str:
        return on if period > 0 and i % period == offset else off

    def fit(section: Section, kinds: list[str]) -> dict[str, Any] | None:
        for period in range(1, len(kinds) + 2):
            for offset in range(period):
                if all(kind(period, offset, i) == k for i, k in enumerate(kinds)):
                    return {period_key: period, offset_key: offset}
        return None

    return Rule(
        (period_key, offset_key),
        lambda s: period_key in s and offset_key in s,
        lambda s, n: [kind(_int(s, period_key, 1), _int(s, offset_key, 0), i) for i in range(n)],
        fit,
    )


JAMBA_ATTENTION = _periodic("attn_layer_period", "attn_layer_offset", "attention", "mamba")
JAMBA_EXPERTS = _periodic("expert_layer_period", "expert_layer_offset", "moe", "dense")

RULES = (
    DEEPSEEK, QWEN_MOE, SLIDING_PATTERN, GEMMA2, LLAMA4_MOE, LLAMA4_NO_ROPE, MAX_WINDOW, JAMBA_ATTENTION, JAMBA_EXPERTS,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class OutputLayer:
    """An output layer for the rules: its source model's stack section, layer count, and layer."""

    section: Section
    count: int
    layer: int


def fit_structure(donor: Section, layers: Sequence[OutputLayer]) -> dict[str, Any]:
    """The structure key values the output config needs so each layer keeps its source layer's kind.

    Raises PlanError naming the key when no value gives the output's kinds.
    """
    updates: dict[str, Any] = {}
    for rule in RULES:
        if not rule.applies(donor):
            continue
        source_kinds: dict[int, list[str]] = {}
        kinds = []
        for out in layers:
            key = id(out.section)
            if key not in source_kinds:
                source_kinds[key] = rule.kinds(out.section, out.count)
            kinds.append(source_kinds[key][out.layer])
        if rule.kinds(donor, len(kinds)) == kinds:
            continue
        fitted = rule.fit(donor, kinds)
        if fitted is None:
            raise PlanError(_refusal(rule, donor, kinds, layers))
        updates.update(fitted)
    return updates


def _refusal(rule: Rule, donor: Section, kinds: list[str], layers: Sequence[OutputLayer]) -> str:
    given = rule.kinds(donor, len(kinds))
    wrong = next(i for i, kind in enumerate(given) if kind != kinds[i])
    if rule.keys:
        setting, remedy = f"{rule.keys[0]} {donor.get(rule.keys[0])!r}", f"no value of {rule.keys[0]} gives"
    else:
        setting, remedy = f"{donor.get('model_type')} without layer_types (even layers slide)", "no key changes"
    return (
        f"config.json: {setting} makes output layer {wrong} {given[wrong]}, but it copies source layer "
        f"{layers[wrong].layer}, which is {kinds[wrong]}, and {remedy} every output layer its source's kind; "
        "choose a recipe that keeps the pattern (copies in runs of its period), or add a per-layer list such as "
        "layer_types to the source config"
    )
