"""Worker side of ``tests/test_fsdp2_gum.py``: GUM sharded under FSDP2 (gloo, CPU, one process per rank).

Reuses ``fsdp2_worker``'s model, gradients and training loop; adds GUM variants (draw sizes, weightings, the SVD
projector with Muon) and direct calls of the distributed Newton-Schulz with their measured traffic.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_worker as worker

#: GUM variants: the preset's test settings (one matrix full-rank per period), two and all four matrices full-rank
#: with the weights after Newton-Schulz, independent draws, and GaLore-Muon (the SVD projector, Muon rule).
VARIANTS: dict[str, dict[str, Any]] = {
    "gum": {},
    "gum_two_after": {"full_rank_layers": 2, "weighting": "after"},
    "gum_all": {"full_rank_layers": 4},
    "gum_prob": {"full_rank_prob": 0.5, "full_rank_layers": None, "weighting": "none"},
    "galore_muon": {"projector": "svd", "full_rank_layers": None},  # GUM's branch options are refused with "svd"
}
#: ``(global shape, split axis)`` of the direct Newton-Schulz calls: both forms, both axes, tall and wide, a chunk
#: empty on the third rank (2 rows).
NS_SHAPES = [((520, 8), 0), ((8, 520), 1), ((24, 520), 0), ((520, 24), 0), ((24, 24), 0), ((2, 24), 1),
             ((2, 24), 0), ((60, 40), 1)]


#: 12 steps with draws and refreshes at 0, 4 and 8 (a short run: three draws, two refreshes).
STEPS = 12
GAP = 4


def build(variant: str, model: torch.nn.Module, store: str) -> torch.optim.Optimizer:
    from helpers import CASES

    import lowrank_optim as lro

    groups = lro.param_groups(model, rank=worker.RANK, target_modules=["attn", "mlp"], update_proj_gap=GAP)
    return lro.create_optimizer("gum", groups, state_dtype=store, **{**CASES["gum"], **VARIANTS[variant]})


def draws(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """``{name: full}`` of every projected matrix: the current period's draw."""
    return {n: int(opt.state[p]["projector"].get("full", 0)) for n, p in model.named_parameters()
            if "projector" in opt.state.get(p, {})}


def _perturb(model: torch.nn.Module, step: int) -> None:
    """Multiplies every gradient by ``1 + 1.2e-7 z`` (``z`` standard normal, seeded by the step): about one ulp."""
    gen = torch.Generator().manual_seed(99 + step)
    for p in model.parameters():
        p.grad.mul_(1 + 1.2e-7 * torch.randn(p.grad.shape, generator=gen))


def single(variant: str, store: str, ulp: bool = False) -> dict[str, Any]:
    """One process: the parameters after the run, the draw of each period and the state bytes; ``ulp``: with every
    gradient perturbed by about one ulp (what fp32 rounding alone changes)."""
    model = worker.make_model()
    opt = build(variant, model, store)
    periods = []
    for step in range(STEPS):
        opt.zero_grad()
        worker.synthetic_grads(model, step)
        if ulp:
            _perturb(model, step)
        opt.step()
        if step % GAP == 0:
            periods.append(draws(model, opt))
    return {"params": worker.whole(model), "draws": periods, "bytes": opt.state_bytes()}


def parity(cases: list[tuple[str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: :data:`STEPS` steps (refreshes and draws every :data:`GAP`) on the sharded model; the gathered
    parameters, this rank's and the job's state bytes, the refresh computations, and the traffic of the last
    (steady) step."""
    from lowrank_optim.distributed import comm

    out: dict[str, Any] = {}
    for variant, store in cases:
        model = worker.sharded_model(world)
        opt = build(variant, model, store)
        before = worker._calls()
        worker.train(model, opt, range(STEPS - 1), rank, world, "synthetic")
        comm.TRAFFIC.update(step=0.0, refresh=0.0)
        worker.train(model, opt, range(STEPS - 1, STEPS), rank, world, "synthetic")
        traffic = dict(comm.TRAFFIC)
        out[f"{variant}/{store}"] = {"params": worker.whole(model), "bytes": opt.state_bytes(),
                                     "global_bytes": opt.global_state_bytes(), "calls": worker._sum_calls(before),
                                     "traffic": traffic}
    return out


def newton_schulz(cases: list[Any], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per :data:`NS_SHAPES` entry: this rank's chunk of a seeded matrix through the distributed Newton-Schulz, the
    result gathered, and the bytes the call moved into this rank (``comm.TRAFFIC``)."""
    from lowrank_optim.distributed import comm
    from lowrank_optim.distributed.newton_schulz import sharded_newton_schulz
    from lowrank_optim.distributed.shards import Layout, all_gather_cols, all_gather_rows

    group = dist.group.WORLD
    lay = Layout(None, group, rank, world)
    out: dict[str, Any] = {}
    for shape, dim in NS_SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
        offset, size = lay.rows(shape[dim])
        part = x.narrow(dim, offset, size).contiguous()
        comm.TRAFFIC.update(step=0.0)
        got = sharded_newton_schulz(part, comm.Sharding(group, dim, shape, x.numel()))
        moved = comm.TRAFFIC["step"]
        low = sharded_newton_schulz(part, comm.Sharding(group, dim, shape, x.numel()), dtype=torch.bfloat16)

        def gather(t: torch.Tensor, shape: tuple[int, int] = shape, dim: int = dim) -> torch.Tensor:
            return all_gather_rows(t, shape[0], lay) if dim == 0 else all_gather_cols(t, shape[1], lay)

        out[f"{shape[0]}x{shape[1]}/{dim}"] = {"x": x, "ns": gather(got), "ns_bf16": gather(low), "bytes": moved}
    return out


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    worker.run_jobs(JOBS, rank, world, init_method, jobs, out_dir)


JOBS: dict[str, Any] = {"parity": parity, "newton_schulz": newton_schulz}
