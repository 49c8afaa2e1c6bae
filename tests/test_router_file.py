"""Routers read from a safetensors file (``upcycle --router FILE``, ``moe --router FILE``): each router
holds the file's values converted to the output dtype; every rule a file must keep is one line
naming the file and the tensor; and the file is a source like a model's shards: plan files record
and re-check it, a resume keeps what it proves, a change before publishing is caught, an output
never overwrites it, and ``verify --src --router`` recomputes the routers from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _clikit import invoke, refused, tensors  # noqa: E402
from _s3kit import stop_after  # noqa: E402
from compat_models import _LLAMA_LIKE, save_tiny_model  # noqa: E402
from conftest import folder_bytes  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from shardsurgeon import CheckpointError, WriteOptions, api  # noqa: E402

EXPERTS, HIDDEN, LAYERS = 3, 32, 4
MIXTRAL_ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
QWEN_ROUTER = "model.layers.{}.mlp.gate.weight"
QWEN_SHARED_GATE = "model.layers.{}.mlp.shared_expert_gate.weight"


def router_values(layer: int, shape: tuple[int, ...] = (EXPERTS, HIDDEN)) -> np.ndarray:
    """Layer ``layer``'s router: numbers of its own (seeded by the layer), not exact in bfloat16."""
    return np.random.default_rng(100 + layer).standard_normal(shape).astype(np.float32)


def write_routers(path: Path, name: str = MIXTRAL_ROUTER, dtype=np.float32, **extra: np.ndarray) -> Path:
    values = {name.format(layer): router_values(layer).astype(dtype) for layer in range(LAYERS)}
    save_file({**values, **extra}, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-file")
    qwen2 = transformers.Qwen2Config(**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"})
    return {
        "mistral": save_tiny_model(transformers.MistralConfig(**_LLAMA_LIKE), root / "mistral"),
        "qwen2": save_tiny_model(qwen2, root / "qwen2"),
    }


def upcycle(src: Path, router: Path | str, out: Path, *more: str | Path):
    args = ("--experts", EXPERTS, "--top-k", "2", "--router", router, "--out", out, *more)
    return invoke("upcycle", "--src", src, *args)


@pytest.mark.parametrize(
    "file_dtype, out_dtype, want",
    [
        (np.float32, None, np.float32),  # a copy
        (ml_dtypes.bfloat16, None, np.float32),  # widened
        (np.float32, "bfloat16", ml_dtypes.bfloat16),  # rounded to nearest even
        (np.float64, "float16", np.float16),
    ],
)
def test_each_router_is_the_files_tensor_in_the_output_dtype(models, tmp_path, file_dtype, out_dtype, want):
    routers = write_routers(tmp_path / "routers.safetensors", dtype=file_dtype)
    more = ("--dtype", out_dtype) if out_dtype else ()
    result = upcycle(models["mistral"], routers, tmp_path / "moe", "-q", *more)
    assert result.exit_code == 0, result.output
    out = tensors(tmp_path / "moe")
    for layer in range(LAYERS):
        expected = router_values(layer).astype(file_dtype).astype(np.float32).astype(want)
        assert out[MIXTRAL_ROUTER.format(layer)].tobytes() == expected.tobytes(), layer
    assert "behind routers read from the file routers.safetensors" in (tmp_path / "moe" / "README.md").read_text()
    checked = invoke("verify", tmp_path / "moe", "--src", models["mistral"], "--router", routers)
    assert checked.exit_code == 0 and "compared byte for byte" in checked.output, checked.output


def test_a_qwen2_shared_expert_gate_comes_from_the_file_where_it_has_one(models, tmp_path):
    gate = np.full((1, HIDDEN), 0.25, np.float32)
    routers = write_routers(tmp_path / "r.safetensors", QWEN_ROUTER, **{QWEN_SHARED_GATE.format(2): gate})
    assert upcycle(models["qwen2"], routers, tmp_path / "moe", "-q").exit_code == 0
    out = tensors(tmp_path / "moe")
    assert out[QWEN_SHARED_GATE.format(2)].tobytes() == gate.tobytes()
    for layer in (0, 1, 3):
        assert not out[QWEN_SHARED_GATE.format(layer)].any()  # as for a zero router: a weight of 1/2
    assert out[QWEN_ROUTER.format(1)].tobytes() == router_values(1).tobytes()
    source = tensors(models["qwen2"])
    for layer, factor in ((1, 0.5), (2, 1.0)):  # halved where the gate is zeros; a trained gate: copies
        down = source[f"model.layers.{layer}.mlp.down_proj.weight"]
        got = out[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"]
        assert got.tobytes() == (down * np.array(factor, down.dtype)).tobytes(), layer


def _crafted(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.safetensors"
    values = {MIXTRAL_ROUTER.format(layer): router_values(layer) for layer in range(LAYERS)}
    if case == "missing":
        del values[MIXTRAL_ROUTER.format(2)]
    elif case == "extra":
        values["model.layers.1.mlp.gate.weight"] = router_values(1)
    elif case == "misshapen":
        values[MIXTRAL_ROUTER.format(3)] = router_values(3, (EXPERTS + 1, HIDDEN))
    elif case == "integers":
        values[MIXTRAL_ROUTER.format(0)] = np.zeros((EXPERTS, HIDDEN), np.int32)
    elif case == "not-safetensors":
        path.write_text("router weights, I promise\n")
        return path
    save_file(values, str(path))
    return path


@pytest.mark.parametrize(
    "case, parts",
    [
        ("missing", ["has no tensor 'model.layers.2.block_sparse_moe.gate.weight'", "expected it, [3, 32]"]),
        ("extra", ["holds tensor 'model.layers.1.mlp.gate.weight'", "not the router of a layer this run upcycles"]),
        ("misshapen", ["'model.layers.3.block_sparse_moe.gate.weight'", "is F32 [4, 32], expected [3, 32]"]),
        ("integers", ["'model.layers.0.block_sparse_moe.gate.weight'", "is I32 [3, 32], expected [3, 32] of a float"]),
        ("not-safetensors", ["header length field says", "not a safetensors file"]),
    ],
)
def test_a_file_that_breaks_a_rule_is_refused_in_one_line(models, tmp_path, case, parts):
    path = _crafted(tmp_path, case)
    refused(upcycle(models["mistral"], path, tmp_path / "o"), "--router", path.name, *parts)
    assert not (tmp_path / "o").exists()


def test_a_missing_file_and_a_router_for_a_dense_layer_are_refused(models, tmp_path):
    refused(upcycle(models["mistral"], tmp_path / "nowhere.safetensors", tmp_path / "o"), "nowhere", "no such file")
    routers = write_routers(tmp_path / "r.safetensors", QWEN_ROUTER)
    result = upcycle(models["qwen2"], routers, tmp_path / "o", "--layers", "0,1")
    refused(result, "holds tensor 'model.layers.2.mlp.gate.weight' (and 1 more)", "check --layers")
    assert not (tmp_path / "o").exists()


def test_a_plan_file_records_the_router_file_and_refuses_it_changed(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors", dtype=ml_dtypes.bfloat16)
    assert upcycle(models["mistral"], routers, tmp_path / "run" / "out", "-q").exit_code == 0
    args = ("upcycle", "--src", models["mistral"], "--experts", EXPERTS, "--top-k", "2", "--router", routers)
    assert invoke(*args, "--plan-json", tmp_path / "plan.json").exit_code == 0
    record = json.loads((tmp_path / "plan.json").read_text())["job"]["router_file"]
    assert record["reference"] == str(routers.absolute()) and record["file"]["nbytes"] == routers.stat().st_size
    assert invoke("apply", tmp_path / "plan.json", tmp_path / "applied" / "out", "-q").exit_code == 0
    assert folder_bytes(tmp_path / "applied" / "out") == folder_bytes(tmp_path / "run" / "out")
    for edited, problem in ((5, "job.router_file: expected an object"), (None, "job.router_file: missing")):
        plan = json.loads((tmp_path / "plan.json").read_text())
        plan["job"]["router_file"] = edited
        (tmp_path / "edited.json").write_text(json.dumps(plan))
        refused(invoke("apply", tmp_path / "edited.json", tmp_path / "edited"), problem)
    write_routers(routers, dtype=np.float32)  # another file under the planned name
    refused(invoke("apply", tmp_path / "plan.json", tmp_path / "late"), "r.safetensors", "changed since the plan")
    assert not (tmp_path / "late").exists()


def test_dry_run_says_where_the_routers_come_from(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors")
    result = invoke("upcycle", "--src", models["mistral"], "--experts", EXPERTS, "--top-k", "2", "--router", routers,
                    "--dry-run")  # fmt: skip
    assert result.exit_code == 0 and f"router from the file {routers}" in result.output, result.output


def test_a_stopped_run_resumes_and_keeps_what_it_proves(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors", dtype=ml_dtypes.bfloat16)
    job = api.plan_upcycle(
        models["mistral"], experts=EXPERTS, top_k=2, router_file=routers, max_shard_bytes=40_000
    )  # fmt: skip
    assert routers in {Path(v.where) for v in job.versions}
    assert len(job.layout.shards) > 2
    with pytest.raises(KeyboardInterrupt):
        api.run_job(job, tmp_path / "out", command="upcycle", options=WriteOptions(progress=stop_after(60_000)))
    result = api.run_job(job, tmp_path / "out", command="upcycle")
    assert result.shards_reused > 0
    assert upcycle(models["mistral"], routers, tmp_path / "whole", "-q", "--max-shard-size", "40KB").exit_code == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "whole") | {
        "README.md": (tmp_path / "out" / "README.md").read_bytes()
    }


def test_the_router_file_changed_during_the_run_is_not_published(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors")
    job = api.plan_upcycle(models["mistral"], experts=EXPERTS, top_k=2, router_file=routers)
    changed = []

    def change_once(nbytes: int) -> None:
        if not changed:
            changed.append(True)
            write_routers(routers)  # the same bytes, rewritten: another version all the same
            os.utime(routers, ns=(1, 1))

    with pytest.raises(CheckpointError, match=r"r\.safetensors: source file changed during the run"):
        api.run_job(job, tmp_path / "out", command="upcycle", options=WriteOptions(progress=change_once))
    assert not (tmp_path / "out").exists()


def test_an_output_never_overwrites_the_router_file(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors")
    refused(upcycle(models["mistral"], routers, routers, "--force"), "--out", "the source file")
    inside = tmp_path / "out"
    inside.mkdir()
    routers_inside = write_routers(inside / "r.safetensors")
    refused(upcycle(models["mistral"], routers_inside, inside, "--force"), "--out", "source file", "r.safetensors")
    assert routers_inside.exists() and load_file(routers_inside)


def test_verify_needs_the_router_file_and_finds_another(models, tmp_path):
    routers = write_routers(tmp_path / "r.safetensors")
    assert upcycle(models["mistral"], routers, tmp_path / "moe", "-q").exit_code == 0
    refused(invoke("verify", tmp_path / "moe", "--src", models["mistral"]), "read from the file r.safetensors",
            "--router FILE")  # fmt: skip
    other = tmp_path / "other.safetensors"
    save_file({MIXTRAL_ROUTER.format(layer): router_values(layer + 1) for layer in range(LAYERS)}, str(other))
    result = invoke("verify", tmp_path / "moe", "--src", models["mistral"], "--router", other)
    assert result.exit_code == 1 and MIXTRAL_ROUTER.format(0) in result.output, result.output
    plain = tmp_path / "plain"
    assert invoke("upcycle", "--src", models["mistral"], "--experts", EXPERTS, "--top-k", "2", "--out", plain,
                  "-q").exit_code == 0  # fmt: skip
    refused(invoke("verify", plain, "--src", models["mistral"], "--router", routers), "were not read from a file")
    refused(invoke("verify", tmp_path / "moe", "--router", routers), "give the models too (--src)")


# --- mergekit-moe configs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-router")
    config = transformers.MistralConfig(**_LLAMA_LIKE)
    for name, seed in (("base", 0), ("coder", 1), ("writer", 2)):
        save_tiny_model(config, root / name, seed=seed)
    (root / "hidden.yml").write_text(
        "base_model: ./base\ngate_mode: hidden\nexperts_per_token: 2\nexperts:\n"
        "  - source_model: ./coder\n    positive_prompts: [code]\n  - source_model: ./writer\n"
        "  - source_model: ./base\n"
    )
    return root


def test_a_mergekit_moe_config_of_hidden_gates_takes_the_routers_from_the_file(fine_tunes, tmp_path):
    refused(invoke("moe", fine_tunes / "hidden.yml", tmp_path / "o"), "gate_mode hidden", "--router FILE")
    routers = write_routers(tmp_path / "hidden-gates.safetensors", dtype=ml_dtypes.bfloat16)
    refused(invoke("moe", fine_tunes / "hidden.yml", tmp_path / "o", "--router", routers, "--seed", "3"), "--seed 3")
    result = invoke("moe", fine_tunes / "hidden.yml", tmp_path / "o", "--router", routers, "-q")
    assert result.exit_code == 0, result.output
    out = tensors(tmp_path / "o")
    for layer in range(LAYERS):
        want = router_values(layer).astype(ml_dtypes.bfloat16).astype(np.float32)
        assert out[MIXTRAL_ROUTER.format(layer)].tobytes() == want.tobytes()
    card = (tmp_path / "o" / "README.md").read_text()
    assert "--router hidden-gates.safetensors" in card and str(tmp_path) not in card
    coder = tensors(fine_tunes / "coder")["model.layers.2.mlp.up_proj.weight"]
    assert out["model.layers.2.block_sparse_moe.experts.0.w3.weight"].tobytes() == coder.tobytes()
    sources = [a for m in ("base", "coder", "writer") for a in ("--src", fine_tunes / m)]
    checked = invoke("verify", tmp_path / "o", *sources, "--router", routers)
    assert checked.exit_code == 0 and "compared byte for byte" in checked.output, checked.output


def test_a_router_file_by_url_is_read_by_range_and_verified(models, tmp_path):
    pytest.importorskip("obstore", reason="the remote extra (obstore) is not installed")
    from _servers import serve_http

    served = tmp_path / "served"
    served.mkdir()
    routers = write_routers(served / "r.safetensors", dtype=ml_dtypes.bfloat16)
    assert upcycle(models["mistral"], routers, tmp_path / "local", "-q").exit_code == 0
    with serve_http(served) as http:
        url = f"{http.url}/ok/r.safetensors"
        result = upcycle(models["mistral"], url, tmp_path / "remote")
        assert result.exit_code == 0, result.output
        checked = invoke("verify", tmp_path / "remote", "--src", models["mistral"], "--router", url)
        assert checked.exit_code == 0, checked.output
        refused(upcycle(models["mistral"], f"{http.url}/ok/gone.safetensors", tmp_path / "o"), "gone.safetensors")
    local, remote = folder_bytes(tmp_path / "local"), folder_bytes(tmp_path / "remote")
    assert {k: v for k, v in local.items() if k != "README.md"} == {k: v for k, v in remote.items() if k != "README.md"}
