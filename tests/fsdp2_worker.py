"""Worker side of ``tests/test_fsdp2.py``: FSDP2 (``fully_shard``) runs on gloo, CPU, one process per rank.

One launch runs many cases (process start-up dominates on a 2-core machine). Rank 0 saves the whole
parameters (gathered) of each case, which the test compares with one process on the same global batches.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lowrank_optim as lro

STEPS = 30
GAP = 10  # refreshes at steps 10 and 20
BATCH = 48  # divisible by 1, 2, 3 and 4 ranks
RANK = 8
SAVE_AT = 15


class Net(nn.Module):
    """Both projection sides, 8-bit-sized moments on both (>= 4096 elements), a 2-row projected matrix (an
    empty shard from 3 ranks on), a plain 2-D weight big enough for 8-bit, plain 1-D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(24, 520)  # (520, 24): right side, low-rank (520, 8)
        self.mlp = nn.Linear(520, 24)  # (24, 520): left side, low-rank (8, 520)
        self.mlp_sq = nn.Linear(24, 24, bias=False)  # square: right side
        self.attn_tiny = nn.Linear(24, 2)  # (2, 24): left side, rank 2
        self.gate = nn.Linear(24, 200)  # plain 2-D (not targeted)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mlp(torch.tanh(self.attn(x))))
        h = self.norm(self.mlp_sq(h) + self.gate(x)[:, :24])
        return self.head(torch.tanh(self.attn_tiny(h)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 3, generator=g)


def build(name: str, model: nn.Module, store: str) -> torch.optim.Optimizer:
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import CASES

    kwargs = dict(CASES.get(name, {}))
    groups = lro.param_groups(model, rank=RANK, target_modules=["attn", "mlp"], update_proj_gap=GAP)
    return lro.create_optimizer(name, groups, state_dtype=store, **kwargs)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = batch(step)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered (DTensor -> full tensor)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def single(name: str, store: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """One process on the whole batches (the reference)."""
    model = make_model()
    opt = build(name, model, store)
    train(model, opt, range(steps))
    return whole(model)


def sharded_model(world: int) -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.attn, model.mlp, model.attn_tiny):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def parity(cases: list[tuple[str, str]], rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, store in cases:
        model = sharded_model(world)
        opt = build(name, model, store)
        train(model, opt, range(STEPS), rank, world)
        out[f"{name}/{store}"] = {"params": whole(model), "bytes": opt.state_bytes(),
                                  "global_bytes": opt.global_state_bytes()}
    return out


def main(rank: int, world: int, port: int, job: str, cases: list[tuple[str, str]], out_dir: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = parity(cases, rank, world) if job == "parity" else JOBS[job](cases, rank, world, out_dir)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{job}-{world}.pt")
    except Exception:
        Path(out_dir, f"error-{job}-{world}-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


JOBS: dict[str, Any] = {}
