"""Data parallel on CPU: DDP and ZeroRedundancyOptimizer (gloo, 2 processes, 127.0.0.1, bounded in time).

With ``lro.distributed.divide_refresh(opt)`` every refresh (SVD, rSVD, DCT selection, ...) is computed on one
rank and broadcast: the run stays bit-identical, and the calls summed over ranks equal one rank's count without it.
Every registered optimizer (the random-projection ones included: their seeds come from the group seed
and the parameter index, never from the process) keeps the two replicas bit-identical (weights and
optimizer state) for 20 steps while each rank sees different data. Under ZeroRedundancyOptimizer, which
shards whole tensors, replicas stay identical too, and for the presets whose subspace depends only on
the gradient (exact SVD) the trajectory equals the DDP one bit for bit. FSDP1's flattened parameters
are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro
from lowrank_optim.distributed import local

sys.path.insert(0, os.path.dirname(__file__))
from helpers import rendezvous

STEPS = 20
WORLD = 2
TIMEOUT_S = 240
#: Subspace depends on the gradient only (no seed, no position among the group's params): ZeRO == DDP exactly.
GRADIENT_ONLY = ("galore_adamw", "galore_adafactor", "fira")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _digest(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    if opt is not None:
        from helpers import flat_state

        for k, v in flat_state(opt):
            h.update(k.encode())
            h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if isinstance(v, torch.Tensor)
                     else repr(v).encode())
    return h.hexdigest()


def _run(name: str, rank: int, zero: bool, divided: bool = False) -> tuple[str, str, int]:
    from helpers import CASES, GROUP_OPTIONS, build, loss_fn, make_data, make_model
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    if zero:
        groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], **GROUP_OPTIONS)
        cls = lro.registry.OPTIMIZERS[name]
        opt: Any = ZeroRedundancyOptimizer(groups, optimizer_class=cls, state_dtype="8bit", **CASES.get(name, {}))
    else:
        opt = build(name, model, state_dtype="8bit")
        if divided:
            lro.distributed.divide_refresh(opt)
    before = lro.distributed.REFRESH_CALLS["engine"]
    x, y = make_data(seed=100 + rank)  # different data on each rank
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(ddp, x, y).backward()
        opt.step()
    # under ZeRO each rank holds the state of its own shard only: compare the weights
    return _digest(model, None), _digest(model, None if zero else opt), lro.distributed.REFRESH_CALLS["engine"] - before


def _fsdp_refused() -> list[str]:
    from helpers import make_model
    from torch.distributed.fsdp import FullyShardedDataParallel

    messages = []
    for orig in (False, True):
        wrapped = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"), use_orig_params=orig)
        for build in (lambda m: lro.GaLoreAdamW(m.parameters(), rank=8),
                      lambda m: lro.GaLoreAdamW(lro.param_groups(m, rank=8, target_modules=["attn", "mlp"]))):
            try:
                build(wrapped)
                messages.append("accepted")
            except ValueError as err:
                messages.append(str(err))
    return messages


def _worker(rank: int, init_method: str, names: list[str], out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from lowrank_optim.distributed import local

    torch.set_num_threads(1)
    local.init_gloo(rank, WORLD, init_method, timeout_s=60)
    try:
        result: dict[str, Any] = {}
        for name in names:
            ddp_w, ddp_all, calls = _run(name, rank, zero=False)
            zero_w, _, _ = _run(name, rank, zero=True)
            _, divided_all, divided_calls = _run(name, rank, zero=False, divided=True)
            result[name] = {"ddp_weights": ddp_w, "ddp_all": ddp_all, "zero_weights": zero_w, "calls": calls,
                            "divided_all": divided_all, "divided_calls": divided_calls}
        result["_fsdp"] = _fsdp_refused()
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        local.end_process_group()


def test_replicas_stay_bit_identical(tmp_path: Path) -> None:
    names = lro.available_optimizers()
    out = tmp_path / "result.json"
    try:
        local.spawn(_worker, WORLD, (rendezvous(tmp_path), names, str(out)), TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(str(err))
    ranks = json.loads(out.read_text())
    for name in names:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["ddp_all"] == r1["ddp_all"], f"{name}: DDP replicas diverged (weights or state)"
        assert r0["zero_weights"] == r1["zero_weights"], f"{name}: ZeroRedundancyOptimizer replicas diverged"
        if name in GRADIENT_ONLY:
            assert r0["zero_weights"] == r0["ddp_weights"], f"{name}: ZeRO trajectory differs from DDP"
        # divide_refresh: each refresh computed on one rank and broadcast; the run is bit-identical to DDP's
        assert r0["divided_all"] == r0["ddp_all"] == r1["divided_all"], f"{name}: divided refresh changed the run"
        assert r0["calls"] == r1["calls"] > 0, (name, r0["calls"], r1["calls"])
        assert r0["divided_calls"] + r1["divided_calls"] == r0["calls"], (name, r0, r1)
    for messages in (ranks[0]["_fsdp"], ranks[1]["_fsdp"]):
        assert len(messages) == 4
        assert all("flattened" in m and "ZeroRedundancyOptimizer" in m for m in messages), messages
