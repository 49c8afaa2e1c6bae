"""How an upcycled layer's routers start: zeros (a hole), seeded normal numbers, or a file's tensors.

A :class:`~shardsurgeon.plan.recipe.Router` names the kind; for a file of routers the opened
:class:`~shardsurgeon.model.routerfile.RouterFile` gives the tensors. A file's router is the file's
tensor under the output's own router name, of shape ``[experts, hidden]`` and any float dtype,
copied when its dtype is the output's and otherwise converted by the tool's one definition of a
cast (:class:`~shardsurgeon.plan.tensors.Convert`). Qwen2-MoE's ``shared_expert_gate`` (``[1,
hidden]``) may be in the file too; where it is not, it is zeros as for a zero router (a weight of
exactly 1/2 on the shared expert). Every rule a file must keep lives here: each router there, of
the right shape and a float dtype, and nothing else in it. Pure.
"""

from __future__ import annotations

from shardsurgeon.errors import PlanError, safe_text
from shardsurgeon.format import DTYPES, FLOAT_DTYPES
from shardsurgeon.model.routerfile import ROUTER_FILE_HINT, RouterFile
from shardsurgeon.plan.recipe import Router
from shardsurgeon.plan.tensors import Convert, Copy, Normal, PlannedTensor, Zeros


def planned_router(
    router: Router, router_file: RouterFile | None, name: str, dtype: str, shape: tuple[int, int], model: str,
    std: float,
) -> PlannedTensor:  # fmt: skip
    """The router ``name`` of an upcycled layer, ``dtype`` and ``shape`` (``[experts, hidden]``)."""
    if router.file is not None:
        return _from_file(_opened(router, router_file), name, dtype, shape, "the router of an upcycled layer")
    if router.seed is None:
        return PlannedTensor(name, dtype, shape, Zeros(), None, model)
    return PlannedTensor(name, dtype, shape, Normal(router.seed, std, name), None, model)


def planned_shared_gate(
    router: Router, router_file: RouterFile | None, name: str, dtype: str, shape: tuple[int, int], model: str
) -> PlannedTensor:
    """The gate of a shared expert (Qwen2-MoE): the file's where it holds one, else zeros."""
    if router.file is not None and name in _opened(router, router_file).tensors:
        return _from_file(_opened(router, router_file), name, dtype, shape, "the shared expert's gate")
    return PlannedTensor(name, dtype, shape, Zeros(), None, model)


def check_every_tensor_used(router_file: RouterFile | None, used: set[str]) -> None:
    """Refuse a file of routers holding a tensor the plan does not take: a layer left dense
    (``--layers``), a name of another architecture, or a typo would otherwise be dropped unseen."""
    if router_file is None:
        return
    extra = [name for name in router_file.tensors if name not in used]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise PlanError(
            f"--router {safe_text(router_file.reference)}: holds tensor {safe_text(extra[0], 120)!r}{more}, which is "
            "not the router of a layer this run upcycles; expected only the routers (and Qwen2-MoE shared expert "
            "gates) under the output's names: remove it, or check --layers"
        )


def _opened(router: Router, router_file: RouterFile | None) -> RouterFile:
    if router_file is None or router_file.reference != router.file:
        raise AssertionError(f"the file of routers {router.file!r} was not opened for the plan")
    return router_file


def _from_file(router_file: RouterFile, name: str, dtype: str, shape: tuple[int, int], what: str) -> PlannedTensor:
    shown = f"--router {safe_text(router_file.reference)}"
    wanted = f"{list(shape)} of a float dtype ({', '.join(sorted(FLOAT_DTYPES))})"
    ref = router_file.tensors.get(name)
    if ref is None:
        raise PlanError(f"{shown}: has no tensor {name!r} ({what}); expected it, {wanted}, in {ROUTER_FILE_HINT}")
    if not DTYPES[ref.dtype].is_float or ref.shape != shape:
        raise PlanError(
            f"{shown}: tensor {name!r} ({what}) is {ref.dtype} {list(ref.shape)}, expected {wanted}; write it "
            "again with one row per expert and one column per hidden unit"
        )
    op = Copy() if ref.dtype == dtype else Convert()
    return PlannedTensor(name, dtype, shape, op, ref, router_file.reference)
