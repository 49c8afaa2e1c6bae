"""The layer recipe: which source layer each output layer comes from, and what happens to its tensors.

A recipe is pure data in the shape of a mergekit passthrough config: an ordered list of output
layers, each naming a model and a source layer and carrying scale rules, plus the donors of the
tensors before and after the stack, an optional dtype to cast to, and an optional change of the
experts (:class:`Upcycle`, :class:`PruneExperts`, :class:`DenseExpert`). ``expand`` flags build one with
:func:`expand_recipe`, ``upcycle`` and ``prune-experts`` with :func:`same_layers_recipe`. No
files, no tensors: layer counts come in as plain integers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardsurgeon.errors import RecipeError
from shardsurgeon.format import cast_target


@dataclass(frozen=True, slots=True)
class ScaleRule:
    """Multiply by ``value`` every tensor whose *source* name contains ``filter`` (None: all)."""

    value: float
    filter: str | None = None

    def matches(self, source_name: str) -> bool:
        return self.filter is None or self.filter in source_name


@dataclass(frozen=True, slots=True)
class LayerSource:
    """One output layer, or the donor of the tensors outside the stack (``layer`` is None)."""

    model: str
    layer: int | None
    scale: tuple[ScaleRule, ...] = ()
    inserted: bool = False

    def scale_for(self, source_name: str) -> tuple[float, ScaleRule | None]:
        """The factor for a tensor (first matching rule wins) and the rule that gave it."""
        for rule in self.scale:
            if rule.matches(source_name):
                return rule.value, rule
        return 1.0, None


@dataclass(frozen=True, slots=True)
class Router:
    """How an upcycled router starts: all zeros (``seed`` and ``file`` None: every expert equally
    likely, so the model computes what the dense one did), numbers from a normal distribution of
    the config's ``initializer_range`` drawn with ``seed`` (reproducible on every machine), or the
    tensors of a safetensors ``file`` of routers (named as the user gave it: a path or URL)."""

    seed: int | None = None
    file: str | None = None

    @property
    def text(self) -> str:
        if self.file is not None:
            return self.file
        return "zeros" if self.seed is None else f"random:{self.seed}"


@dataclass(frozen=True, slots=True)
class Upcycle:
    """Each dense MLP of ``layers`` (source layer numbers; None: every layer) becomes ``experts``
    copies of itself behind a router, ``top_k`` of them per token.

    With ``expert_models`` (a mergekit-moe config), expert i is the MLP of ``expert_models[i]`` at
    the same layer instead, and the shared expert (Qwen2-MoE) that of ``shared_model`` (default:
    the base model's): experts of several fine-tunes of one base, copied as they are."""

    experts: int
    top_k: int
    router: Router = Router()
    layers: tuple[int, ...] | None = None
    expert_models: tuple[str, ...] = ()
    shared_model: str | None = None


@dataclass(frozen=True, slots=True)
class PruneExperts:
    """Layer i keeps the experts ``keep[i]``, in that order (None: a layer without experts)."""

    keep: tuple[tuple[int, ...] | None, ...]


@dataclass(frozen=True, slots=True)
class DenseExpert:
    """Each layer with experts becomes a dense layer: its MLP is expert ``expert[i]`` of layer i
    (None: a layer without experts, which stays as it is), or with ``shared`` its shared expert
    (Qwen2-MoE; then ``expert`` is all None). The router, the other experts and the shared
    expert's gate are dropped; the config is the dense class's (Mixtral to Mistral, Qwen3-MoE to
    Qwen3, Qwen2-MoE to Qwen2)."""

    expert: tuple[int | None, ...]
    shared: bool = False


ExpertChange = Upcycle | PruneExperts | DenseExpert


@dataclass(frozen=True, slots=True)
class RowInit:
    """How a new row of a vocabulary matrix starts: ``zero``; ``mean``, the mean of the source rows
    ``rows`` (each counted as often as named; a range for all of them); ``copy``, source row
    ``rows[0]`` as it is."""

    kind: str
    rows: range | tuple[int, ...] = ()

    @property
    def text(self) -> str:
        if self.kind == "mean" and isinstance(self.rows, range):
            return f"the mean of rows {self.rows.start}-{self.rows.stop - 1}"
        if self.kind == "mean":
            return f"the mean of rows {', '.join(map(str, self.rows))}"
        return f"a copy of row {self.rows[0]}" if self.kind == "copy" else "zeros"


ZERO_ROW = RowInit("zero")


@dataclass(frozen=True, slots=True)
class SourceRows:
    """``count`` rows of the source's vocabulary matrices from row ``first`` on, as they are."""

    first: int
    count: int


@dataclass(frozen=True, slots=True)
class NewRows:
    """``count`` new rows: the input embedding's start as ``init``, an untied output head's as ``head``."""

    count: int
    init: RowInit = ZERO_ROW
    head: RowInit = ZERO_ROW


RowRun = SourceRows | NewRows


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token the tokenizer gains, at id ``id``."""

    content: str
    id: int
    special: bool = False


@dataclass(frozen=True, slots=True)
class VocabChange:
    """The rows of the vocabulary matrices (input embedding, untied output head), run by run in
    output order, and the tokens the tokenizer gains. Token ``i`` of the source becomes the output
    row a :class:`SourceRows` run puts source row ``i`` at; a source row no run keeps is dropped."""

    rows: tuple[RowRun, ...]
    tokens: tuple[NewToken, ...] = ()

    @property
    def size(self) -> int:
        return sum(run.count for run in self.rows)

    def id_map(self) -> dict[int, int]:
        """Source id -> output id, for every source row kept (empty where rows only grow in place)."""
        mapped: dict[int, int] = {}
        at = 0
        for run in self.rows:
            if isinstance(run, SourceRows):
                mapped.update(zip(range(run.first, run.first + run.count), range(at, at + run.count), strict=True))
            at += run.count
        return mapped

    @property
    def kept(self) -> int:
        """Source rows the output keeps."""
        return sum(run.count for run in self.rows if isinstance(run, SourceRows))

    def moves_ids(self) -> bool:
        """Whether any kept source row changes its id."""
        at = 0
        for run in self.rows:
            if isinstance(run, SourceRows) and run.first != at:
                return True
            at += run.count
        return False


@dataclass(frozen=True, slots=True)
class Recipe:
    """An output checkpoint described layer by layer; models are named by reference strings.

    Floating-point tensors are cast to ``dtype`` (the working dtype, where scales are applied)
    and then to ``out_dtype``, as mergekit does. ``base`` donates config.json and the tokenizer
    (default: the model of ``head``).
    """

    layers: tuple[LayerSource, ...]
    head: LayerSource
    tail: LayerSource
    dtype: str | None = None
    out_dtype: str | None = None
    base: str | None = None
    experts: ExpertChange | None = None
    vocab: VocabChange | None = None

    @property
    def donor(self) -> str:
        return self.base or self.head.model

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def models(self) -> tuple[str, ...]:
        experts: list[str] = []
        if isinstance(self.experts, Upcycle):
            experts = [*self.experts.expert_models, *([self.experts.shared_model] if self.experts.shared_model else [])]
        seen = dict.fromkeys([self.donor, self.head.model, *(s.model for s in self.layers), self.tail.model, *experts])
        return tuple(seen)


MAX_LAYERS = 10_000
"""Fifty times the deepest published merge; beyond it a typo such as 0x999999999, or a config of
aliased slices, is refused before anything the size of the layer count is built."""

_DUP = re.compile(r"^\s*([0-9]{1,9})\s*[xX*]\s*([0-9]{1,9})\s*$")
"""At most nine digits each: more is a typo (and Python refuses to parse 4,300 digits)."""


def parse_dup(text: str) -> list[tuple[int, int]]:
    """Parse ``--dup`` values such as ``31x12`` or ``3x1,7x2`` into (layer, copies) pairs."""
    pairs = []
    for part in text.split(","):
        match = _DUP.match(part)
        if not match:
            raise RecipeError(
                f"--dup {_clip(text)}: expected LxN (N copies of layer L) such as 31x12, comma-separated for "
                f"several, found {_clip(part.strip())}"
            )
        layer, copies = int(match[1]), int(match[2])
        if copies == 0:
            raise RecipeError(f"--dup {part.strip()!r}: the number of copies must be at least 1, found 0")
        pairs.append((layer, copies))
    return pairs


def parse_router(text: str) -> Router:
    """``--router``: ``zeros``, ``random:SEED``, or anything else the path or URL of a file of routers."""
    kind, _, seed = text.strip().partition(":")
    if kind == "zeros" and not seed:
        return Router()
    if kind == "random" and re.fullmatch(r"[0-9]{1,20}", seed) and int(seed) < 1 << 64:
        return Router(int(seed))
    if kind in ("zeros", "random") or not text.strip():
        raise RecipeError(
            f"--router {_clip(text)}: expected zeros, random:SEED (a whole number below 2**64) or a safetensors "
            "file of routers"
        )
    return Router(file=text)


def parse_layers(text: str, flag: str = "--layers") -> tuple[int, ...]:
    """A list of layer numbers and ranges, such as ``0,2,4`` or ``0-7,12``."""
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*(?:-\s*([0-9]{1,6})\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise RecipeError(f"{flag} {_clip(text)}: expected layer numbers and ranges such as 0,2,4 or 0-7,12")
        last = int(match[2]) if match[2] is not None else int(match[1])
        layers.extend(range(int(match[1]), last + 1))
    return tuple(sorted(set(layers)))


def parse_filters(text: str, flag: str = "--zero") -> tuple[str, ...]:
    """Parse a comma-separated list of name substrings such as ``o_proj,down_proj``."""
    filters = tuple(f.strip() for f in text.split(","))
    if not all(filters):
        raise RecipeError(f"{flag} {_clip(text)}: expected comma-separated name parts such as o_proj,down_proj")
    return filters


def expand_recipe(
    model: str,
    num_layers: int,
    dups: Sequence[tuple[int, int]] = (),
    every: int | None = None,
    zero: tuple[str, ...] = (),
    dtype: str | None = None,
) -> Recipe:
    """The recipe for ``expand``: copies inserted right after their source layer.

    ``dups`` inserts N copies of layer L after L; ``every`` S inserts one copy after every S-th
    layer (LLaMA Pro). Tensors of inserted copies whose name contains one of ``zero`` become zeros.
    """
    copies_after = [0] * num_layers
    for layer, copies in dups:
        if not 0 <= layer < num_layers:
            raise RecipeError(
                f"--dup {layer}x{copies}: layer {layer} is out of range, the model has layers 0..{num_layers - 1}"
            )
        copies_after[layer] += copies
    if every is not None:
        if not 1 <= every <= num_layers:
            raise RecipeError(f"--every {every}: expected a step between 1 and {num_layers} (the layer count)")
        for layer in range(every - 1, num_layers, every):
            copies_after[layer] += 1
    if not any(copies_after):
        raise RecipeError("expand: nothing to insert; give --dup LxN or --every STEP")
    if num_layers + sum(copies_after) > MAX_LAYERS:
        raise RecipeError(
            f"expand: {num_layers + sum(copies_after)} output layers is more than the {MAX_LAYERS} supported; "
            "check the --dup counts"
        )
    copy_rules = tuple(ScaleRule(0.0, f) for f in zero)
    layers = []
    for layer in range(num_layers):
        layers.append(LayerSource(model, layer))
        layers.extend(LayerSource(model, layer, copy_rules, inserted=True) for _ in range(copies_after[layer]))
    return Recipe(tuple(layers), LayerSource(model, None), LayerSource(model, None), dtype)


MAX_EXPERTS = 4096
"""Sixteen times the most routed experts of a published model (DeepSeek-V3: 256)."""


def same_layers_recipe(
    model: str,
    num_layers: int,
    experts: ExpertChange | None,
    dtype: str | None = None,
    vocab: VocabChange | None = None,
) -> Recipe:
    """Every layer of ``model`` in place, its experts changed by ``experts``, its vocabulary by ``vocab``."""
    layers = tuple(LayerSource(model, layer) for layer in range(num_layers))
    return Recipe(layers, LayerSource(model, None), LayerSource(model, None), dtype, experts=experts, vocab=vocab)


def recipe_to_json(recipe: Recipe, names: Mapping[str, str]) -> str:
    """A compact JSON record of the recipe, stored in the output so ``verify`` can re-derive the plan.

    Models are recorded by the names in ``names`` (Hugging Face ids), not by local paths; two models
    of the same name stay two entries, so that ``verify`` can be given each. A file of routers is
    recorded by its name in ``names`` too (its file name: ``verify --router FILE`` gives it again).
    """

    def source(s: LayerSource) -> list[Any]:
        rules = [[r.value, r.filter] for r in s.scale]
        return [refs.index(s.model), s.layer, rules, s.inserted]

    refs = list(dict.fromkeys([*recipe.models, *([recipe.base] if recipe.base is not None else [])]))
    record: dict[str, Any] = {
        "models": [names.get(m, m) for m in refs],
        "head": source(recipe.head),
        "tail": source(recipe.tail),
        "layers": [source(s) for s in recipe.layers],
        "dtype": recipe.dtype,
        "out_dtype": recipe.out_dtype,
        "base": None if recipe.base is None else refs.index(recipe.base),
    }
    if recipe.experts is not None:
        record["experts"] = _experts_record(recipe.experts, refs, names)
    if recipe.vocab is not None:
        record["vocab"] = _vocab_record(recipe.vocab)
    return json.dumps(record, separators=(",", ":"))


def _vocab_record(change: VocabChange) -> dict[str, Any]:
    def init(row: RowInit) -> list[Any]:
        if isinstance(row.rows, range):
            return [row.kind, {"range": [row.rows.start, row.rows.stop]}]
        return [row.kind, list(row.rows)]

    def run(item: RowRun) -> list[Any]:
        if isinstance(item, SourceRows):
            return ["rows", item.first, item.count]
        return ["new", item.count, init(item.init), init(item.head)]

    return {"rows": [run(r) for r in change.rows], "tokens": [[t.content, t.id, t.special] for t in change.tokens]}


def _experts_record(change: ExpertChange, refs: list[str], names: Mapping[str, str]) -> dict[str, Any]:
    match change:
        case Upcycle(experts, top_k, router, layers, expert_models, shared_model):
            fields: dict[str, Any] = {"experts": experts, "top_k": top_k, "router_seed": router.seed, "layers": layers}
            if router.file is not None:
                fields["router_file"] = names.get(router.file, router.file)
            if expert_models:
                fields["expert_models"] = [refs.index(m) for m in expert_models]
                fields["shared_model"] = None if shared_model is None else refs.index(shared_model)
            return {"upcycle": fields}
        case PruneExperts(keep):
            return {"prune": {"keep": [None if k is None else list(k) for k in keep]}}
        case DenseExpert(expert, shared):
            return {"dense": {"expert": list(expert), "shared": shared}}


def recorded_models(text: str) -> list[str]:
    """The model names of a :func:`recipe_to_json` record, in the order ``recipe_from_json`` replaces."""
    try:
        models = json.loads(text)["models"]
        if isinstance(models, list) and models and all(isinstance(m, str) for m in models):
            return models
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    raise RecipeError("recorded recipe is unreadable (no list of models); the output was not written by this version")


def recorded_router_file(text: str) -> str | None:
    """The name of the file of routers a :func:`recipe_to_json` record names, if it names one."""
    try:
        name = json.loads(text)["experts"]["upcycle"]["router_file"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return name if isinstance(name, str) else None


def recipe_from_json(
    text: str, models: Sequence[str], layer_count: Callable[[str], int], router_file: str | None = None
) -> Recipe:
    """Read back :func:`recipe_to_json` with ``models`` in place of the recorded names, in order,
    and ``router_file`` (a path or URL) in place of the recorded file of routers, if it names one.

    The record comes from a file anyone can edit, so every field is checked: layers in range for
    ``layer_count(model)``, finite scales, known cast targets.
    """
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise TypeError("not an object")
        names = list(models)

        def model(index: Any) -> str:
            if not _is_index(index, len(names)):
                raise ValueError(f"model index {index!r}")
            return names[index]

        def source(item: Any, in_stack: bool) -> LayerSource:
            reference, layer, rules, inserted = item
            name = model(reference)
            if in_stack and not _is_index(layer, layer_count(name)):
                raise ValueError(f"layer {layer!r} of {name}, which has {layer_count(name)} layers")
            if not in_stack and layer is not None:
                raise ValueError(f"layer {layer!r} outside the stack")
            scale = tuple(_rule(rule) for rule in rules)
            return LayerSource(name, layer, scale, bool(inserted))

        if not isinstance(record["layers"], list) or len(record["layers"]) > MAX_LAYERS:
            raise ValueError(f"more than {MAX_LAYERS} layers, or no list of them")
        base = record.get("base")
        return Recipe(
            tuple(source(s, True) for s in record["layers"]),
            source(record["head"], False),
            source(record["tail"], False),
            _recorded_dtype(record["dtype"]),
            _recorded_dtype(record.get("out_dtype")),
            None if base is None else model(base),
            _recorded_experts(record.get("experts"), len(record["layers"]), model, router_file),
            _recorded_vocab(record.get("vocab")),
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise RecipeError(
            f"recorded recipe is unreadable ({_clip(str(e))}); the output was not written by this version "
            "or its metadata was edited"
        ) from None


def _recorded_experts(
    record: Any, num_layers: int, model: Callable[[Any], str], router_file: str | None
) -> ExpertChange | None:
    if record is None:
        return None
    (kind, fields), *more = record.items()
    if more:
        raise ValueError("more than one change of the experts")
    if kind == "upcycle":
        experts, top_k, seed, layers = fields["experts"], fields["top_k"], fields["router_seed"], fields["layers"]
        if not _is_index(experts - 1, MAX_EXPERTS) or not _is_index(top_k - 1, experts):
            raise ValueError(f"{experts!r} experts, top {top_k!r}")
        if seed is not None and not _is_index(seed, 1 << 64):
            raise ValueError(f"router seed {seed!r}")
        recorded_file = fields.get("router_file")
        if recorded_file is not None and (not isinstance(recorded_file, str) or seed is not None):
            raise ValueError(f"router file {recorded_file!r}")
        if layers is not None and not all(_is_index(layer, num_layers) for layer in layers):
            raise ValueError(f"upcycled layers {layers!r}")
        expert_models = tuple(model(index) for index in fields.get("expert_models", ()))
        if expert_models and len(expert_models) != experts:
            raise ValueError(f"{len(expert_models)} expert models for {experts} experts")
        shared = fields.get("shared_model")
        router = Router(seed, None if recorded_file is None else router_file or recorded_file)
        return Upcycle(
            experts, top_k, router, None if layers is None else tuple(layers), expert_models,
            None if shared is None else model(shared),
        )  # fmt: skip
    if kind == "prune":
        keep = fields["keep"]
        if len(keep) != num_layers:
            raise ValueError(f"{len(keep)} lists of kept experts for {num_layers} layers")
        for kept in keep:
            if kept is not None and not (0 < len(kept) <= MAX_EXPERTS and all(_is_index(e, MAX_EXPERTS) for e in kept)):
                raise ValueError(f"kept experts {kept!r}")
            if kept is not None and len(set(kept)) != len(kept):
                raise ValueError(f"kept experts {kept!r} name one twice")
        if len({len(k) for k in keep if k is not None}) != 1:
            raise ValueError("lists of kept experts of different lengths, or none")
        return PruneExperts(tuple(None if k is None else tuple(k) for k in keep))
    if kind == "dense":
        return _recorded_dense(fields, num_layers)
    raise ValueError(f"change of the experts {kind!r}")


MAX_VOCAB_ROWS = 1 << 24
"""Sixty-four times the largest published vocabulary (Gemma's 262,144 rows)."""


def _recorded_vocab(record: Any) -> VocabChange | None:
    if record is None:
        return None

    def count(value: Any) -> int:
        if not _is_index(value, MAX_VOCAB_ROWS + 1):
            raise ValueError(f"row count {value!r}")
        return int(value)

    def init(item: Any) -> RowInit:
        kind, rows = item
        if isinstance(rows, dict):
            start, stop = rows["range"]
            if not (_is_index(start, MAX_VOCAB_ROWS) and _is_index(stop - 1, MAX_VOCAB_ROWS) and start < stop):
                raise ValueError(f"rows {rows!r}")
            rows = range(start, stop)
        elif not all(_is_index(row, MAX_VOCAB_ROWS) for row in rows) or len(rows) > MAX_VOCAB_ROWS:
            raise ValueError(f"rows {rows!r}")
        made = RowInit(kind, rows if isinstance(rows, range) else tuple(rows))
        if (kind, bool(made.rows)) not in (("zero", False), ("mean", True), ("copy", True)):
            raise ValueError(f"new rows {item!r}")
        if kind == "copy" and len(made.rows) != 1:
            raise ValueError(f"new rows {item!r}")
        return made

    def run(item: Any) -> RowRun:
        if item[0] == "rows":
            _, first, number = item
            if not _is_index(first, MAX_VOCAB_ROWS):
                raise ValueError(f"first row {first!r}")
            return SourceRows(first, count(number))
        if item[0] == "new":
            _, number, row, head = item
            return NewRows(count(number), init(row), init(head))
        raise ValueError(f"row run {item!r}")

    rows = tuple(run(item) for item in record["rows"])
    tokens = []
    for content, token_id, special in record["tokens"]:
        if (
            not isinstance(content, str)
            or not content
            or not _is_index(token_id, MAX_VOCAB_ROWS)
            or not isinstance(special, bool)
        ):
            raise ValueError(f"new token {content!r} at {token_id!r}")
        tokens.append(NewToken(content, token_id, special))
    change = VocabChange(rows, tuple(tokens))
    if not 0 < change.size <= MAX_VOCAB_ROWS:
        raise ValueError(f"{change.size} vocabulary rows")
    return change


def _recorded_dense(fields: Any, num_layers: int) -> DenseExpert:
    expert, shared = fields["expert"], fields["shared"]
    if not isinstance(expert, list) or len(expert) != num_layers:
        raise ValueError(f"{expert!r} as the expert of each of {num_layers} layers")
    if not all(e is None or _is_index(e, MAX_EXPERTS) for e in expert) or not isinstance(shared, bool):
        raise ValueError(f"dense experts {expert!r}, shared {shared!r}")
    if shared == any(e is not None for e in expert):
        raise ValueError("a dense MLP from the shared expert and from a routed one, or from neither")
    return DenseExpert(tuple(expert), shared)


def _is_index(value: Any, length: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < length


def _rule(item: Any) -> ScaleRule:
    value, name_filter = item
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"scale {value!r}")
    if name_filter is not None and not isinstance(name_filter, str):
        raise ValueError(f"filter {name_filter!r}")
    return ScaleRule(float(value), name_filter)


def _recorded_dtype(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or cast_target(value) != value):
        raise ValueError(f"dtype {value!r}")
    return value


def _clip(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message: escaped, and cut to ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
