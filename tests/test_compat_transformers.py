"""Compatibility with transformers: expanded checkpoints load and compute what the source computes.

For every architecture in `compat_models.ARCHS` a tiny random model is saved sharded by
transformers, expanded by the CLI with identity blocks (copies whose residual-output projections
are zeroed), reloaded by transformers, and its logits on a fixed input must be bit-identical to the
reloaded source's. The output config must be the source's with the new layer count and every
per-layer list (such as `layer_types`) rebuilt so that each output layer takes its source layer's
entry.
"""

from __future__ import annotations

import copy
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from compat_models import ARCHS, N_LAYERS, Arch, fixed_input, save_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from shardsurgeon.cli import cli  # noqa: E402

pytestmark = pytest.mark.compat


# Output layer k copies source layer MAPPING[k]; NEW[k] tells whether it is an inserted copy.
@dataclass(frozen=True)
class Recipe:
    name: str
    args: tuple[str, ...]
    mapping: tuple[int, ...]
    new: tuple[bool, ...]


L = N_LAYERS
RECIPES = {
    # LLaMA Pro / seed-model style: two copies of the last layer appended at the end.
    "end": Recipe(
        "end",
        ("--dup", f"{L - 1}x2"),
        (*range(L), L - 1, L - 1),
        (False,) * L + (True, True),
    ),
    # Interleaved: one copy after every 2nd layer; written in several shards to test the index too.
    "every2": Recipe(
        "every2",
        ("--every", "2", "--max-shard-size", "20KB"),
        (0, 1, 1, 2, 3, 3),
        (False, False, True, False, False, True),
    ),
}


@dataclass
class Source:
    arch: Arch
    path: Path
    config: dict
    logits: torch.Tensor
    state: dict[str, torch.Tensor]


def _load(path: Path, dtype: torch.dtype):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems for {path}: {problems}"
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_input()).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each architecture's source model, built, saved and reloaded once per module."""
    cache: dict[str, Source] = {}

    def get(name: str) -> Source:
        if name not in cache:
            arch = ARCHS[name]
            path = save_tiny_model(arch.make_config(), tmp_path_factory.mktemp(f"src-{name}"), dtype=arch.dtype)
            shards = list(path.glob("*.safetensors"))
            assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
            config = json.loads((path / "config.json").read_text())
            model = _load(path, arch.dtype)
            cache[name] = Source(arch, path, config, _logits(model), model.state_dict())
        return cache[name]

    return get


def _lookup(node, dotted: str):
    """``a.b.c`` in a config dict or a transformers config object."""
    for key in dotted.split("."):
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node


def _expected_config(src: dict, layers_key: str, mapping: tuple[int, ...]) -> dict:
    """The source config with the new layer count and each per-layer list following `mapping`.

    Per-layer lists are the lists as long as the old layer count in the section holding the count
    (the top level, or `text_config` for a multimodal wrapper); every other section stays as it is.
    """
    *section_path, count_key = layers_key.split(".")
    out = copy.deepcopy(src)
    section = _lookup(out, ".".join(section_path)) if section_path else out
    old = section[count_key]
    for key, value in section.items():
        if key != "architectures" and isinstance(value, list) and len(value) == old:
            section[key] = [value[i] for i in mapping]
    section[count_key] = len(mapping)
    return out


def _check_loaded_tensors(src: Source, rec: Recipe, state: dict[str, torch.Tensor]) -> None:
    """Every loaded tensor is its source's, or (in an inserted copy only) all +0.0.

    The logits cannot see the kept tensors of an identity block (q/k/v, gate/up, norms), so a copy
    of the wrong layer would go unnoticed there. Names are those of the loaded model, which may
    differ from the saved ones (Mixtral's experts are fused on load), hence no --zero filter here.
    """
    head = src.arch.loaded_stack + "."
    outside = {n for n in src.state if not n.startswith(head)}
    rests: dict[int, list[str]] = {}
    for n in src.state.keys() - outside:
        index, _, rest = n[len(head) :].partition(".")
        rests.setdefault(int(index), []).append(rest)
    expected_names = outside | {f"{head}{k}.{rest}" for k, s in enumerate(rec.mapping) for rest in rests[s]}
    assert set(state) == expected_names
    zeroed = set()
    for name, tensor in state.items():
        if name in outside:
            assert torch.equal(tensor, src.state[name]), f"{name} differs from the source's"
            continue
        index, _, rest = name[len(head) :].partition(".")
        k = int(index)
        from_name = f"{head}{rec.mapping[k]}.{rest}"
        if torch.equal(tensor, src.state[from_name]):
            continue
        assert rec.new[k], f"{name} differs from {from_name}, which it should copy"
        assert not tensor.any() and not tensor.signbit().any(), f"{name} is neither {from_name} nor +0.0"
        zeroed.add(k)
    assert zeroed == {k for k, new in enumerate(rec.new) if new}, "inserted layers without zeroed tensors"


def _run_cli(args: list[str]):
    result = CliRunner().invoke(cli, args)
    if result.exit_code != 0:
        tb = ""
        if result.exc_info is not None and not isinstance(result.exception, SystemExit):
            tb = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"shardsurgeon {' '.join(args)}\nexit {result.exit_code}\n{result.output}\n{tb}")
    return result


@pytest.mark.parametrize("recipe", list(RECIPES), ids=list(RECIPES))
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_identity_expansion_keeps_logits(sources, tmp_path, arch_name, recipe):
    src = sources(arch_name)
    rec = RECIPES[recipe]
    out = tmp_path / "out"
    # The explicit names at the end; the architecture's own `residual` alias when interleaving.
    zero = src.arch.zero if recipe == "end" else "residual"
    _run_cli(["expand", "--src", str(src.path), *rec.args, "--zero", zero, "--out", str(out), "-q"])

    # Shards follow the source's files where that lets copies share blocks: either recipe may give several.
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    several = (out / "model.safetensors.index.json").is_file()
    assert several == (len(shards) > 1) and (several or shards == ["model.safetensors"])

    # config.json: the source's, key order kept, count and per-layer lists following the new stack.
    out_config = json.loads((out / "config.json").read_text())
    expected = _expected_config(src.config, src.arch.layers_key, rec.mapping)
    assert out_config == expected
    assert list(out_config) == list(expected)
    section = src.arch.layers_key.rpartition(".")[0]
    src_section = _lookup(src.config, section) if section else src.config
    out_section = _lookup(out_config, section) if section else out_config
    if "layer_types" in src_section:
        assert out_section["layer_types"] == [src_section["layer_types"][i] for i in rec.mapping]

    model = _load(out, src.arch.dtype)
    assert _lookup(model.config, src.arch.layers_key) == len(rec.mapping)
    if "layer_types" in src_section:
        model_section = _lookup(model.config, section) if section else model.config
        assert list(model_section.layer_types) == out_section["layer_types"]
    assert all(p.dtype == src.arch.dtype for p in model.parameters())

    _check_loaded_tensors(src, rec, model.state_dict())

    logits = _logits(model)
    assert logits.dtype == src.logits.dtype
    diff = (logits.float() - src.logits.float()).abs().max().item()
    assert torch.equal(logits, src.logits), f"logits differ from the source's, max abs diff {diff}"


def test_a_single_file_output_loads(tmp_path):
    """A source in one file gives one model.safetensors and no index, which transformers loads too."""
    arch = ARCHS["llama"]
    src = save_tiny_model(arch.make_config(), tmp_path / "src", dtype=arch.dtype, max_shard_size="1GB")
    assert [p.name for p in src.glob("*.safetensors")] == ["model.safetensors"]
    out = tmp_path / "out"
    _run_cli(["expand", "--src", str(src), "--dup", f"{L - 1}x2", "--zero", arch.zero, "--out", str(out), "-q"])
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert torch.equal(_logits(_load(out, arch.dtype)), _logits(_load(src, arch.dtype)))
