"""``divide_refresh`` (DDP) on MoE expert stacks and convs, staggered refreshes and a non-finite step (gloo, 2 ranks).

Every rank gets the same gradients (DDP's contract; the synthetic gradients of ``fsdp2_moe_worker``), so a rank
must end bit-identical to one process without ``divide_refresh``, weights and state. Each refresh is computed on
the owner of its matrix: ``(parameter index + matrix index) % world``; an expert stack's experts used to go all to
the stack's owner (5 + 2 experts and 2 convs over 2 ranks: 6 and 3 matrices, now 5 and 4). A NaN gradient at a
refresh step is skipped on every rank with the state bit-unchanged, and the run goes on equal to one process.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_moe_worker as moe
from helpers import CASES, flat_state, launch_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
STEPS = 10
GAP = 3  # refreshes at 3, 6, 9 (staggered: each matrix at its own phase)
NAN_AT = 3
#: (preset, state store, refresh_stagger)
RUNS = [("galore_adamw", "fp32", True), ("coap", "fp32", True), ("gum", "8bit", False)]


def _digest(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for k, v in flat_state(opt) if opt is not None else []:
        h.update(k.encode())
        h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if isinstance(v, torch.Tensor)
                 else repr(v).encode())
    return h.hexdigest()


def _state_digest(opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for k, v in flat_state(opt):
        h.update(k.encode())
        h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if isinstance(v, torch.Tensor)
                 else repr(v).encode())
    return h.hexdigest()


def _run(name: str, store: str, stagger: bool, divided: bool) -> dict[str, Any]:
    model = moe.make_model()
    low = {id(p) for p in moe.low_params(model)}
    group: dict[str, Any] = {"params": moe.low_params(model), "rank": moe.RANK, "update_proj_gap": GAP}
    if stagger:
        group["refresh_stagger"] = True
    opt = lro.create_optimizer(name, [{"params": [p for p in model.parameters() if id(p) not in low]}, group],
                               state_dtype=store, **CASES.get(name, {}))
    if divided:
        lro.distributed.divide_refresh(opt)
    before = lro.distributed.REFRESH_CALLS["engine"]
    around_nan = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            opt.zero_grad()
            moe.synthetic_grads(model, step)
            if step == NAN_AT:
                model.experts.grad[1, 2, 3] = float("nan")  # every rank: DDP all-reduces a NaN to all
                around_nan.append(_state_digest(opt) + _digest(model))
            opt.step()
            if step == NAN_AT:
                around_nan.append(_state_digest(opt) + _digest(model))
    return {"all": _digest(model, opt), "calls": lro.distributed.REFRESH_CALLS["engine"] - before,
            "nan_unchanged": around_nan[0] == around_nan[1]}


def _job(runs: list[tuple[str, str, bool]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    got: list[Any] = [None] * world
    dist.all_gather_object(got, {"/".join(map(str, r)): _run(*r, divided=True) for r in runs})
    return {"ranks": got}


def _zero(cases: list[Any], rank: int, world: int, out_dir: str) -> list[str]:
    """``divide_refresh`` on a ZeroRedundancyOptimizer and on its local optimizer (a different shard per rank:
    the job used to hang at the first refresh): the errors, per call."""
    from helpers import make_model
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    zero = ZeroRedundancyOptimizer(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]),
                                   optimizer_class=lro.GaLoreAdamW)
    out = []
    for target in (zero, zero.optim):
        try:
            lro.distributed.divide_refresh(target)
            out.append("accepted")
        except (TypeError, ValueError) as err:
            out.append(f"{type(err).__name__}: {err}")
    return out


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    import fsdp2_worker as base

    base.run_jobs({"ddp": _job, "zero": _zero}, rank, world, init_method, jobs, out_dir, prefix="review10-ddp-")


#: The low-rank group's parameters follow the 6 plain ones: (index, matrices) of conv_a, conv_b, the 5 experts and
#: the 2 experts_out; their matrices are positions 0..8 of the group (the staggered phases).
LOW = ((6, 1), (7, 1), (8, 5), (9, 2))


def _calls_per_rank(world: int, stagger: bool) -> list[int]:
    """Closed form: matrix at position ``pos`` has phase ``pos * GAP // 9`` (staggered, else 0) and takes
    ``STEPS - 1`` steps (one skipped): its init plus a refresh at each step count ``s`` in ``1 .. STEPS - 2`` with
    ``(s - phase) % GAP == 0``, computed on rank ``(index + matrix) % world``."""
    counts = [0] * world
    pos = 0
    for index, n in LOW:
        for matrix in range(n):
            phase = pos * GAP // moe.N_MATRICES if stagger else 0
            calls = 1 + sum(1 for s in range(1, STEPS - 1) if (s - phase) % GAP == 0)
            counts[(index + matrix) % world] += calls
            pos += 1
    return counts


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("review10_ddp")
    return launch_ranks(main, WORLD, [("ddp", RUNS), ("zero", [])], out, 180, prefix="review10-ddp-")


def test_divide_refresh_refuses_zero(launched: dict[str, Any]) -> None:
    whole, local = launched["zero"]
    assert whole.startswith("TypeError: Invalid optimizer") and "ZeroRedundancyOptimizer" in whole, whole
    assert local.startswith("ValueError: Invalid optimizer") and "rank(s) [1]" in local, local


def test_divided_refresh_equals_one_process(launched: dict[str, Any]) -> None:
    ranks = launched["ddp"]["ranks"]
    assert _calls_per_rank(WORLD, False) == [15, 12]  # 5 and 4 matrices x 3 (the stack's owner alone: 18 and 9)
    for run in RUNS:
        key = "/".join(map(str, run))
        one = _run(*run, divided=False)
        assert one["nan_unchanged"] and one["calls"] == sum(_calls_per_rank(WORLD, run[2])), (key, one)
        for r, got in enumerate(ranks):
            assert got[key]["all"] == one["all"], (key, r)  # weights and state, bit for bit
            assert got[key]["nan_unchanged"], (key, r)
        assert [got[key]["calls"] for got in ranks] == _calls_per_rank(WORLD, run[2]), key
