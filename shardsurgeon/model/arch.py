"""Where the transformer layer stack lives: in tensor names and in config.json.

Finds the prefix under which layers are numbered (``model.layers.N.``, ``transformer.h.N.``,
``gpt_neox.layers.N.``, ``model.language_model.layers.N.`` ...), the config section and key that
count them, and how the tensors outside the stack are ordered. Pure: no files, no tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import PlanError, safe_text
from shardsurgeon.model.structure import OutputLayer, fit_structure

KNOWN_PREFIXES = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "backbone.layers",
)
"""Prefixes of decoder stacks, most common first; used when several numbered stacks exist."""

COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
TEXT_SECTIONS = ("text_config", "language_config", "llm_config")
NOT_PER_LAYER = frozenset({"architectures"})
"""Config lists that are never per-layer even when their length equals the layer count."""
LAYER_INDEX_LISTS = frozenset(
    {"mlp_only_layers", "moe_layers", "full_attention_layers", "sliding_window_layers", "cross_attention_layers"}
)
"""Config lists of layer numbers: renumbered to the output layers that copy a listed layer."""

_INDEX = "0|[1-9][0-9]{0,8}"
"""A layer number: ASCII decimal without leading zeros, so that no two spellings mean one layer, and
under a billion (a longer number is no layer, and Python would refuse to read 4,300 digits)."""
_NUMBERED = re.compile(rf"^(?P<prefix>.+?)\.(?P<index>{_INDEX})\.(?P<rest>.+)$", re.DOTALL)
_LAYER = re.compile(rf"(?:{_INDEX})")  # used with fullmatch: "$" would also match before a newline
INPUT_EMBEDDING_MARKERS = ("embed_tokens", "word_embeddings", "wte", "embed_in")
"""Name parts of input embeddings, by architecture (Llama and most; BLOOM/BERT; GPT-2; GPT-NeoX)."""
_HEAD_MARKERS = (*INPUT_EMBEDDING_MARKERS, "wpe", "embeddings")


@dataclass(frozen=True, slots=True)
class StackHint:
    """What the user says about the layer stack when it cannot be detected (``--layer-prefix``,
    ``--layers-key``); None leaves each to detection."""

    prefix: str | None = None
    count_key: str | None = None


NO_HINT = StackHint()


@dataclass(frozen=True, slots=True)
class LayerStack:
    """The layer stack of a checkpoint: ``{prefix}.{i}.{rest}`` for i in range(count)."""

    prefix: str
    count: int
    config_section: tuple[str, ...]
    count_key: str

    def split(self, name: str) -> tuple[int, str] | None:
        """``(layer, rest)`` for a tensor of the stack, None for any other tensor."""
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        index, dot, rest = name[len(head) :].partition(".")
        if not dot or not rest or not _LAYER.fullmatch(index):
            return None
        return int(index), rest

    def name(self, layer: int, rest: str) -> str:
        return f"{self.prefix}.{layer}.{rest}"

    @property
    def count_path(self) -> str:
        """Where config.json counts the layers, such as ``text_config.num_hidden_layers``."""
        return ".".join((*self.config_section, self.count_key))


def find_layer_stack(names: Iterable[str], config: Mapping[str, Any], hint: StackHint = NO_HINT) -> LayerStack:
    """Detect the layer stack from tensor names and config, or use the prefix the ``hint`` gives."""
    layers_by_prefix: dict[str, set[int]] = {}
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            layers_by_prefix.setdefault(match["prefix"], set()).add(int(match["index"]))
    prefix = hint.prefix
    if prefix is None:
        prefix = _choose_prefix(layers_by_prefix)
    elif prefix not in layers_by_prefix:
        found = ", ".join(sorted(layers_by_prefix)[:8]) or "none"
        shown = safe_text(prefix)
        raise PlanError(f"--layer-prefix '{shown}': no tensor is named {shown}.N.*; numbered prefixes found: {found}")
    count = _contiguous_count(prefix, layers_by_prefix[prefix])
    section = _config_section(config, prefix)
    key = _count_key(config, section, hint.count_key)
    declared = _section(config, section).get(key)
    if declared != count:
        where = ".".join((*section, key))
        raise PlanError(
            f"config.json: {where} is {_short(declared)} but the tensors hold {count} layers under "
            f"{prefix}.N; the config does not describe these weights"
        )
    return LayerStack(prefix, count, section, key)


def _contiguous_count(prefix: str, indices: set[int]) -> int:
    """The layer count, when layers 0..count-1 all have tensors; never builds a range of the count,
    which a single name such as ``model.layers.30000000.x`` would make huge."""
    for expected, index in enumerate(sorted(indices)):
        if index != expected:
            raise PlanError(
                f"layer stack {prefix}.N: layers 0..{max(indices)} expected, but layer {expected} has no "
                "tensors; the checkpoint is incomplete"
            )
    return len(indices)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _choose_prefix(layers_by_prefix: Mapping[str, set[int]]) -> str:
    for known in KNOWN_PREFIXES:
        if known in layers_by_prefix:
            return known
    stacks = [p for p in layers_by_prefix if p.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer")]
    if len(stacks) == 1:
        return stacks[0]
    found = ", ".join(sorted(layers_by_prefix)) or "no numbered tensor names"
    raise PlanError(
        f"cannot tell which layer stack to edit (looked for {', '.join(KNOWN_PREFIXES)}; found {found}); "
        "name it with --layer-prefix"
    )


def _config_section(config: Mapping[str, Any], prefix: str) -> tuple[str, ...]:
    if "language_model" in prefix or "text_model" in prefix:
        for section in TEXT_SECTIONS:
            if isinstance(config.get(section), dict):
                return (section,)
    if not any(k in config for k in COUNT_KEYS):
        for section in TEXT_SECTIONS:
            if isinstance(config.get(section), dict) and any(k in config[section] for k in COUNT_KEYS):
                return (section,)
    return ()


def _section(config: Mapping[str, Any], section: tuple[str, ...]) -> Mapping[str, Any]:
    for key in section:
        config = config[key]
    return config


def _count_key(config: Mapping[str, Any], section: tuple[str, ...], count_key: str | None) -> str:
    values = _section(config, section)
    if count_key is not None:
        if count_key not in values:
            where = ".".join(section) or "the top level"
            raise PlanError(f"--layers-key {count_key!r}: config.json has no such key in {where}")
        return count_key
    for key in COUNT_KEYS:
        if key in values:
            return key
    where = ".".join(section) or "the top level"
    raise PlanError(
        f"config.json: none of {', '.join(COUNT_KEYS)} found in {where}; name the layer count key with --layers-key"
    )


@dataclass(frozen=True, slots=True)
class SourceLayer:
    """Where an output layer comes from, for config patching: its model's config and stack."""

    config: Mapping[str, Any]
    stack: LayerStack
    layer: int


def section_of(config: Mapping[str, Any], stack: LayerStack) -> Mapping[str, Any]:
    return _section(config, stack.config_section)


def is_per_layer(key: str, value: Any, count: int) -> bool:
    """A config list with one entry per layer, such as ``layer_types``.

    Recognised by its length; token-id lists (``eos_token_id: [1, 2, 3]``) never are.
    """
    return (
        isinstance(value, list)
        and len(value) == count
        and key not in NOT_PER_LAYER
        and key not in LAYER_INDEX_LISTS
        and not key.endswith(("token_id", "token_ids"))
    )


def patch_config(config: Mapping[str, Any], stack: LayerStack, sources: list[SourceLayer]) -> dict[str, Any]:
    """The config for an output stack whose layer i is ``sources[i]``.

    Sets the layer count, rebuilds every per-layer list of the stack's section so each output
    layer takes its own source layer's entry (from its own model's config), renumbers lists of
    layer indices such as ``mlp_only_layers``, and sets the keys that give layers their kind by a
    rule (:mod:`structure`). Key order is kept; the input is not modified.
    """

    def entry(key: str, source: SourceLayer) -> Any:
        values = section_of(source.config, source.stack).get(key)
        if not is_per_layer(key, values, source.stack.count):
            raise PlanError(
                f"config.json: {key} has one entry per layer in the first model but not in a model whose "
                f"layer {source.layer} is used; models of one merge must share the per-layer config"
            )
        assert isinstance(values, list)
        return values[source.layer]

    def rebuild(section: Mapping[str, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        at_stack = depth == len(stack.config_section)
        for key, value in section.items():
            if not at_stack and key == stack.config_section[depth]:
                out[key] = rebuild(value, depth + 1)
            elif at_stack and key == stack.count_key:
                out[key] = len(sources)
            elif at_stack and key in LAYER_INDEX_LISTS and isinstance(value, list):
                # before the per-layer test: a list of every layer's index is as long as the stack
                out[key] = [i for i, source in enumerate(sources) if source.layer in value]
            elif at_stack and is_per_layer(key, value, stack.count):
                out[key] = [entry(key, source) for source in sources]
            else:
                out[key] = value
        if at_stack:  # keys such as first_k_dense_replace must keep every layer's kind
            layers = [OutputLayer(section_of(s.config, s.stack), s.stack.count, s.layer) for s in sources]
            out.update(fit_structure(out, layers))
        return out

    return rebuild(config, 0)


def outside_rank(name: str) -> tuple[int, int]:
    """Sort key group of a tensor outside the stack: (0, _) before the stack, (1, n) after it.

    After the stack come final norms, then the output head, then anything else.
    """
    if name.startswith("lm_head") or "embed_out" in name:
        return (1, 1)
    if any(marker in name for marker in _HEAD_MARKERS):
        return (0, 0)
    if "norm" in name or "ln_f" in name:
        return (1, 0)
    return (1, 2)


RESIDUAL_ALIAS = "residual"
RESIDUAL_OUTPUTS: dict[str, tuple[str, ...]] = {
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "dense_4h_to_h"),
    "falcon": ("self_attention.dense", "dense_4h_to_h"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "mixtral": ("o_proj", "w2", "down_proj"),
    "qwen2_moe": ("o_proj", "down_proj"),
    "qwen3_moe": ("o_proj", "down_proj"),
}
"""Name parts of the projections that write into the residual stream, by config ``model_type``.

Zeroing them turns a block into the identity. Not listed: ``o_proj`` and ``down_proj``, which
Llama, Mistral, Qwen, Gemma and Phi-3 use (MoE experts' down projections included)."""
DEFAULT_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def model_type(config: Mapping[str, Any], stack: LayerStack) -> str:
    section = _section(config, stack.config_section)
    return str(section.get("model_type") or config.get("model_type") or "")


def residual_outputs(config: Mapping[str, Any], stack: LayerStack, layer_names: Iterable[str]) -> tuple[str, ...]:
    """The residual-output name parts of this architecture that occur in ``layer_names``."""
    names = list(layer_names)
    candidates = RESIDUAL_OUTPUTS.get(model_type(config, stack), DEFAULT_RESIDUAL_OUTPUTS)
    found = tuple(c for c in candidates if any(c in name for name in names))
    if not found:
        raise PlanError(
            f"--zero {RESIDUAL_ALIAS}: none of {', '.join(candidates)} occurs in the layer tensors of this "
            f"{model_type(config, stack) or 'unknown'} model; name the projections to zero explicitly"
        )
    return found


def resolve_zero_filters(
    filters: Iterable[str], config: Mapping[str, Any], stack: LayerStack, layer_names: Iterable[str]
) -> tuple[str, ...]:
    """Replace the ``residual`` alias in ``--zero`` filters by this architecture's projections."""
    resolved: list[str] = []
    for part in filters:
        resolved += residual_outputs(config, stack, layer_names) if part == RESIDUAL_ALIAS else [part]
    return tuple(dict.fromkeys(resolved))
