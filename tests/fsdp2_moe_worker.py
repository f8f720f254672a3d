"""Worker side of ``tests/test_fsdp2_moe.py``: MoE expert stacks and conv weights under FSDP2 (gloo, CPU).

The model has two expert stacks (``(5, 520, 16)``: right side, 5 experts split 3 + 2 over 2 ranks and 2 + 2 + 1
over 3; ``(2, 16, 520)``: left side, no expert on rank 2 of 3) and two ``nn.Conv2d`` (``64 x 27``: right side;
``16 x 576``: left side), each low-rank moment at least 4096 elements (8-bit sized). Rank 0 saves each case's
whole parameters; the test compares them with one process on the same global batches / gradients.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lowrank_optim as lro

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_worker as base

STEPS = 12
GAP = 5  # refreshes at steps 5 and 10
SAVE_AT = 7  # after the first refresh
RANK = 8
BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
#: Projected matrices of :class:`MoENet` (5 + 2 experts, 2 convs).
N_MATRICES = 9


class MoENet(nn.Module):
    """conv -> conv -> mean -> 5 routed experts (softly gated) -> 2 experts -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 64, 3, padding=1)  # (64, 3, 3, 3): the matrix 64 x 27, right side
        self.conv_b = nn.Conv2d(64, 16, 3, padding=1)  # (16, 64, 3, 3): 16 x 576, left side
        self.experts = nn.Parameter(torch.randn(5, 520, 16) * 0.1)  # 5 matrices 520 x 16, right side
        self.experts_out = nn.Parameter(torch.randn(2, 16, 520) * 0.05)  # 2 matrices 16 x 520, left side
        self.gate = nn.Linear(16, 5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_b(torch.tanh(self.conv_a(x)))).mean((2, 3))  # (B, 16)
        weights = torch.softmax(self.gate(h), -1)  # (B, 5)
        mixed = torch.tanh(torch.einsum("be,eoi,bi->bo", weights, self.experts, h))  # (B, 520)
        z = torch.tanh(torch.einsum("koi,bi->bko", self.experts_out, mixed)).sum(1)  # (B, 16)
        return self.head(z)


def make_model() -> MoENet:
    torch.manual_seed(0)
    return MoENet()


def low_params(model: nn.Module) -> list[nn.Parameter]:
    return [model.conv_a.weight, model.conv_b.weight, model.experts, model.experts_out]


def build(name: str, model: nn.Module, store: str) -> torch.optim.Optimizer:
    from helpers import CASES

    low = {id(p) for p in low_params(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in low]},
              {"params": low_params(model), "rank": RANK, "update_proj_gap": GAP}]
    return lro.create_optimizer(name, groups, state_dtype=store, **CASES.get(name, {}))


def _matrix_grad(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """8 strong directions over weak noise: a clear spectral gap (stable subspaces)."""
    g = torch.randn(rows, 8, generator=gen) @ torch.randn(8, cols, generator=gen)
    return g.add_(torch.randn(rows, cols, generator=gen), alpha=0.01)


def synthetic_grads(model: nn.Module, step: int) -> None:
    """Every gradient ``0.1 W + noise(step)`` computed on the whole weight (each expert and conv matrix with a
    spectral gap), the same bits on every rank and in one process; a sharded parameter gets its rows."""
    for i, p in enumerate(model.parameters()):
        w = p.full_tensor() if hasattr(p, "full_tensor") else p
        gen = torch.Generator().manual_seed(7919 * step + i)
        if p.dim() == 3:
            g = torch.stack([_matrix_grad(p.shape[1], p.shape[2], gen) for _ in range(p.shape[0])])
        elif p.dim() == 4:
            g = _matrix_grad(p.shape[0], p[0].numel(), gen).reshape(p.shape)
        else:
            g = torch.randn(tuple(p.shape), generator=gen)
        g.add_(w.detach(), alpha=0.1)
        if hasattr(p, "full_tensor"):
            from torch.distributed.tensor import DTensor

            mesh = p.device_mesh
            c = -(-p.shape[0] // mesh.size())
            rows = g[mesh.get_local_rank() * c: (mesh.get_local_rank() + 1) * c].clone()
            g = DTensor.from_local(rows, mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
        p.grad = g


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 3, 5, 5, generator=g), torch.randn(BATCH, 3, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          source: str = "synthetic") -> None:
    for step in steps:
        opt.zero_grad()
        if source == "synthetic":
            synthetic_grads(model, step)
        else:
            x, y = batch(step)
            part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()


def single(name: str, store: str, source: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """One process on the whole batches (the reference)."""
    model = make_model()
    opt = build(name, model, store)
    train(model, opt, range(steps), source=source)
    return base.whole(model)


def sharded_model(world: int) -> MoENet:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.conv_a, model.conv_b):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def param_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """State bytes of each projected parameter on this rank."""
    from lowrank_optim.checkpoint import state_bytes

    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: state_bytes([opt.state[p]]) for p in low_params(model)}


def modes(model: nn.Module, opt: Any) -> dict[str, str]:
    from lowrank_optim.distributed import fsdp

    group = opt.param_groups[1]
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: fsdp.mode(opt, group, p) for p in low_params(model)}


def parity(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, store, source in cases:
        model = sharded_model(world)
        opt = build(name, model, store)
        before = base._calls()
        train(model, opt, range(STEPS), rank, world, source)
        out[f"{name}/{store}/{source}"] = {"params": base.whole(model), "calls": base._sum_calls(before),
                                           "bytes": _gather(param_bytes(model, opt)), "modes": modes(model, opt)}
    return out


def _gather(obj: Any) -> list[Any]:
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def checkpoint_save(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: :data:`SAVE_AT` steps, DCP save, the rest (the uninterrupted run); a fresh model and optimizer at
    this world size load the checkpoint and continue; the full (gathered) state dicts are kept."""
    return base.save_resume(RUN, cases, rank, world, out_dir)


def checkpoint_load(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: the 2-rank checkpoint loaded at this world size, continued."""
    return base.load_resume(RUN, cases, rank, world, out_dir)


def _path(out_dir: str, world: int, key: str) -> str:
    return str(Path(out_dir) / f"moe-{world}-{key.replace('/', '-')}")


RUN = base.Run(sharded_model, build, train, SAVE_AT, STEPS, _path)


JOBS: dict[str, Any] = {"parity": parity, "checkpoint_save": checkpoint_save, "checkpoint_load": checkpoint_load}


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    base.run_jobs(JOBS, rank, world, init_method, jobs, out_dir, prefix="moe-")
