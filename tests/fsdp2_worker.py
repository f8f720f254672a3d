"""Worker side of ``tests/test_fsdp2.py``: FSDP2 (``fully_shard``) runs on gloo, CPU, one process per rank.

One launch runs many cases (process start-up dominates on a 2-core machine). Rank 0 saves the whole
parameters (gathered) of each case, which the test compares with one process on the same global batches.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
#: A late checkpoint: after the second refresh (20), every warm-up (GaLore+'s residual: 2 steps) and every draw.
LATE_AT = 25
#: GaLore+'s ``residual_density`` of the ``+dense`` cases: 4992 entries of the (520, 24) and (24, 520) matrices, over
#: the 8-bit store's 4096-element threshold, so their residual moments are 8-bit codes.
DENSE = 0.4
#: GaLore+'s ``num_heads`` of the ``+heads`` cases: (520, 24), (24, 520) and (24, 24) split into 4 head blocks (one
#: right-side basis from one drawn head's block, rank min(8, m / 4)); the (2, 24) matrix is not split.
HEADS = 4


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


def build(name: str, model: nn.Module, store: str, **extra: Any) -> torch.optim.Optimizer:
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import CASES

    stagger = name.endswith("+stagger")  # "+stagger": refresh_stagger=True (each matrix at its own phase)
    name = name.removesuffix("+stagger")
    reverse = "+reverse" in name  # "+reverse": proj_side="reverse_std", bases of 520 rows (3 int8 blocks of 256)
    name = name.replace("+reverse", "")
    dense = name.endswith("+dense")  # "+dense": GaLore+ with residual_density=DENSE (8-bit residual moments)
    name = name.removesuffix("+dense")
    heads = name.endswith("+heads")  # "+heads": GaLore+ with num_heads=HEADS (a basis shared by head blocks)
    name = name.removesuffix("+heads")
    name, _, basis = name.partition("+basis_")  # "+basis_<dtype>": the projector keeps its basis in <dtype>
    kwargs = {**CASES.get(name.removesuffix("+relative"), {}), **extra}
    if stagger:
        kwargs["refresh_stagger"] = True
    if reverse:
        kwargs["proj_side"] = "reverse_std"
    if dense:
        kwargs["residual_density"] = DENSE
    if heads:
        kwargs["num_heads"] = HEADS
    if basis:
        kwargs["projector_options"] = {"basis_dtype": basis}
    if name.endswith("+relative"):  # Adafactor's relative step scaled by RMS(W): sums over the whole weight
        name = name.removesuffix("+relative")
        kwargs.update(lr=None, relative_step=True, scale_parameter=True)
    groups = lro.param_groups(model, rank=RANK, target_modules=["attn", "mlp"], update_proj_gap=GAP)
    return lro.create_optimizer(name, groups, state_dtype=store, **kwargs)


def synthetic_grads(model: nn.Module, step: int, source: str = "synthetic") -> None:
    """Sets every gradient to ``0.1 W + noise(step)`` computed on the whole weight, the same bits on every rank
    and in one process; a sharded parameter gets its rows. Methods that take signs or top-k of the gradient
    (FRUGAL, GaLore+, GUM, online PCA) amplify the last-bit differences of a model's reduce-scattered
    gradient, so their equality with one process is shown on identical gradients. ``source="zerofirst"``: the
    same, with every gradient of step 0 exactly zero."""
    zero = step == 0 and source == "zerofirst"
    for i, p in enumerate(model.parameters()):
        w = p.full_tensor() if hasattr(p, "full_tensor") else p
        gen = torch.Generator().manual_seed(7919 * step + i)
        if p.dim() == 2:  # a clear spectral gap: 8 strong directions over weak noise (subspaces are stable)
            k = min(8, *p.shape)
            g = torch.randn(p.shape[0], k, generator=gen) @ torch.randn(k, p.shape[1], generator=gen)
            g.add_(torch.randn(tuple(p.shape), generator=gen), alpha=0.01)
        else:
            g = torch.randn(tuple(p.shape), generator=gen)
        g.add_(w.detach(), alpha=0.1)
        if zero:  # a first gradient of zeros: the subspace is chosen at the first nonzero one
            g.zero_()
        if hasattr(p, "full_tensor"):
            from torch.distributed.tensor import DTensor

            mesh = p.device_mesh
            c = -(-p.shape[0] // mesh.size())
            rows = g[mesh.get_local_rank() * c: (mesh.get_local_rank() + 1) * c].clone()
            g = DTensor.from_local(rows, mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
        p.grad = g


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          source: str = "model") -> None:
    for step in steps:
        opt.zero_grad()
        if source in ("synthetic", "zerofirst"):
            synthetic_grads(model, step, source)
        else:
            x, y = batch(step)
            part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered (DTensor -> full tensor)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def single(name: str, store: str, source: str = "model", steps: int = STEPS) -> dict[str, torch.Tensor]:
    """One process on the whole batches (the reference)."""
    model = make_model()
    opt = build(name, model, store)
    train(model, opt, range(steps), source=source)
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


def _calls() -> dict[str, int]:
    from lowrank_optim.distributed import fsdp

    return dict(fsdp.REFRESH_CALLS)


def _sum_calls(before: dict[str, int]) -> dict[str, int]:
    """Refresh computations (projector ``init`` / ``update``) since ``before``, summed over the ranks."""
    now = _calls()
    t = torch.tensor([now[k] - before[k] for k in sorted(now)], dtype=torch.int64)
    dist.all_reduce(t)
    return dict(zip(sorted(now), t.tolist(), strict=True))


def modes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """The FSDP2 mode (:func:`lowrank_optim.distributed.fsdp.mode`) of each parameter, by name."""
    from lowrank_optim.distributed import fsdp

    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {n: fsdp.mode(opt, where[id(p)], p) for n, p in model.named_parameters()}


def entries(model: nn.Module, opt: torch.optim.Optimizer, world: int) -> dict[str, list[int]]:
    """GaLore+'s sparse-residual entries held by each rank, by parameter name (parameters without them left out)."""
    out: dict[str, list[int]] = {}
    for n, p in model.named_parameters():
        idx = opt.state.get(p, {}).get("residual_index")
        t = torch.tensor([-1 if idx is None else idx.numel()], dtype=torch.int64)
        got = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(got, t)
        if int(got[0]) >= 0:
            out[n] = [int(c) for c in got]
    return out


def parity(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, store, source in cases:
        model = sharded_model(world)
        opt = build(name, model, store)
        before = _calls()
        train(model, opt, range(1), rank, world, source)
        first = whole_bases(model, opt) if "+basis_" in name else None  # the first refresh's codes, gathered
        train(model, opt, range(1, STEPS), rank, world, source)
        out[f"{name}/{store}/{source}"] = {"params": whole(model), "bytes": opt.state_bytes(),
                                           "global_bytes": opt.global_state_bytes(), "calls": _sum_calls(before),
                                           "bases": first, "modes": modes(model, opt),
                                           "entries": entries(model, opt, world)}
    return out


def whole_bases(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Each projected matrix's projector-state tensors (stored basis, scales), whole: gathered from the ranks'
    chunks of a sharded parameter (collective), as they are in one process."""
    from lowrank_optim.distributed import bases
    from lowrank_optim.distributed.shards import layout

    out = {}
    for n, p in model.named_parameters():
        pst = opt.state.get(p, {}).get("projector")
        if not isinstance(pst, dict) or "basis" not in pst:
            continue
        if hasattr(p, "full_tensor"):
            pst = bases.gather(pst, int(p.shape[0] if int(pst["side"]) == 0 else p.shape[1]), layout(p))
        out[n] = {k: v.clone() for k, v in pst.items() if isinstance(v, torch.Tensor)}
    return out


def run_jobs(table: dict[str, Any], rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]],
             out_dir: str, prefix: str = "") -> None:
    """One rank of a spawned job list: each ``(job, cases)`` runs ``table[job]``; rank 0 saves the results as
    ``<prefix>result-<world>.pt``, a failing rank its traceback as ``<prefix>error-<world>-<rank>.txt``
    (:func:`helpers.launch_ranks` reads both). Every worker module's ``main`` calls this with its own table."""
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from lowrank_optim.distributed import local

    local.init_gloo(rank, world, init_method, timeout_s=120)
    try:
        result = {job: table[job](cases, rank, world, out_dir) for job, cases in jobs}
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{prefix}result-{world}.pt")
    except Exception:
        Path(out_dir, f"{prefix}error-{world}-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        local.end_process_group()


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    run_jobs(JOBS, rank, world, init_method, jobs, out_dir)


def select(cases: list[tuple[int, int, int, int, int]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """GaLore+'s entry choice through the real collectives: per case ``(m, n, k, levels, seed)`` a score drawn from
    ``levels`` values (many ties), this rank's rows of it (torch's chunk rule) to
    :func:`lowrank_optim.distributed.sparse.select_entries`; returns every rank's global flat indices (rank order)
    and ``first``."""
    from lowrank_optim.distributed.shards import chunk
    from lowrank_optim.distributed.sparse import RowBlock, select_entries

    out: dict[str, Any] = {}
    for m, n, k, levels, seed in cases:
        score = torch.randint(levels, (m, n), generator=torch.Generator().manual_seed(seed)).float()
        offset, size = chunk(m, world, rank)
        idx, first = select_entries(score[offset: offset + size], k, RowBlock(dist.group.WORLD, offset, size, (m, n)))
        got: list[Any] = [None] * world
        dist.all_gather_object(got, ((idx + offset * n).tolist(), first))
        out[f"{m}/{n}/{k}/{levels}/{seed}"] = {"idx": [i for part, _ in got for i in part],
                                               "first": [f for _, f in got]}
    return out


JOBS: dict[str, Any] = {"parity": parity, "select": select}


# -- checkpoints (torch.distributed.checkpoint) ------------------------------------------------------------
def _dcp_save(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def dcp_load(model: nn.Module, opt: torch.optim.Optimizer, path: str, planner: Any = None) -> None:
    """The documented DCP resume: templates from a fresh model and optimizer, ``dcp.load``, set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path, planner=planner)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


@dataclass(frozen=True)
class Run:
    """What a worker module's DCP jobs vary: its sharded model, optimizer factory, training loop, step counts and
    checkpoint paths (``path(out_dir, world, key)``: where the checkpoint of ``key`` saved at ``world`` ranks lives)."""

    make: Callable[[int], nn.Module]
    build: Callable[[str, nn.Module, str], torch.optim.Optimizer]
    train: Callable[..., None]
    save_at: int
    steps: int
    path: Callable[[str, int, str], str]


def save_resume(run: Run, cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: ``run.save_at`` steps, DCP save, the rest (the uninterrupted run); a fresh model and optimizer at this
    world size load the checkpoint and continue; the full (gathered) state dicts are kept."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out: dict[str, Any] = {}
    for name, store, source in cases:
        key = f"{name}/{store}/{source}"
        path = run.path(out_dir, world, key)
        model = run.make(world)
        opt = run.build(name, model, store)
        run.train(model, opt, range(run.save_at), rank, world, source)
        _dcp_save(model, opt, path)
        full = StateDictOptions(full_state_dict=True)
        full_model = get_model_state_dict(model, options=full)
        full_optim = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))  # replicated entries
        # are the live tensors (training goes on below)
        run.train(model, opt, range(run.save_at, run.steps), rank, world, source)
        model2 = run.make(world)
        opt2 = run.build(name, model2, store)
        dcp_load(model2, opt2, path)
        run.train(model2, opt2, range(run.save_at, run.steps), rank, world, source)
        out[key] = {"path": path, "uninterrupted": whole(model), "resumed": whole(model2),
                    "full_model": full_model, "full_optim": full_optim}
    return out


def load_resume(run: Run, cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str,
                saved_world: int = 2) -> dict[str, Any]:
    """Per case: a fresh model and optimizer at this world size load the checkpoint saved at ``saved_world`` ranks
    and continue to ``run.steps``."""
    out: dict[str, Any] = {}
    for name, store, source in cases:
        key = f"{name}/{store}/{source}"
        model = run.make(world)
        opt = run.build(name, model, store)
        dcp_load(model, opt, run.path(out_dir, saved_world, key))
        run.train(model, opt, range(run.save_at, run.steps), rank, world, source)
        out[key] = {"resumed": whole(model)}
    return out


def _path(out_dir: str, world: int, key: str) -> str:
    return str(Path(out_dir) / key.replace("/", "-"))  # one launch saves (2 ranks): no world in the name


RUN = Run(sharded_model, build, train, SAVE_AT, STEPS, _path)


def checkpoint_save(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: 15 steps, DCP save, 15 more (the uninterrupted run); a fresh model and optimizer loaded from
    the checkpoint continue 15 steps (same world size); the full (gathered) state dicts are kept."""
    return save_resume(RUN, cases, rank, world, out_dir)


def checkpoint_load(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: a fresh model and optimizer at this world size load the checkpoint and continue 15 steps."""
    return load_resume(RUN, cases, rank, world, out_dir)


def checkpoint_late(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per case: a DCP save at step :data:`LATE_AT` (late in the run: every warm-up, draw and the second refresh
    behind it), the uninterrupted run to :data:`STEPS`, and a fresh model and optimizer that load the checkpoint
    through ``dcp.load`` into their own template and continue."""
    out: dict[str, Any] = {}
    for name, store, source in cases:
        key = f"{name}/{store}/{source}"
        path = str(Path(out_dir) / ("late-" + key.replace("/", "-")))
        model = sharded_model(world)
        opt = build(name, model, store)
        train(model, opt, range(LATE_AT), rank, world, source)
        _dcp_save(model, opt, path)
        train(model, opt, range(LATE_AT, STEPS), rank, world, source)
        model2 = sharded_model(world)
        opt2 = build(name, model2, store)
        dcp_load(model2, opt2, path)
        train(model2, opt2, range(LATE_AT, STEPS), rank, world, source)
        out[key] = {"uninterrupted": whole(model), "resumed": whole(model2)}
    return out


JOBS.update({"checkpoint_save": checkpoint_save, "checkpoint_load": checkpoint_load,
             "checkpoint_late": checkpoint_late})


# -- accelerate ---------------------------------------------------------------------------------------------
def accelerate_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def accelerate_train(model: nn.Module, opt: Any, backward: Any, rank: int, world: int) -> None:
    for step in range(6):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        part = x.chunk(world)[rank]
        backward(model(part).pow(2).mean())
        opt.step()
        opt.zero_grad()


def accelerate_opt(model: nn.Module) -> torch.optim.Optimizer:
    return lro.GaLoreAdamW(lro.param_groups(model, rank=4, target_modules="all-linear", update_proj_gap=3), lr=1e-2)


def accelerate_job(cases: list[Any], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """accelerate's FSDP2 plugin (``fsdp_version=2``) prepares a model and a GaLoreAdamW built beforehand.
    accelerate turns FSDP on for accelerator devices only, so the CPU test sets the distributed type the GPU
    launch would set; ``prepare`` then runs its own ``fully_shard`` and moves the optimizer to the DTensors."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    model = accelerate_net()
    model, opt = acc.prepare(model, accelerate_opt(model))
    sharded = all(hasattr(p, "full_tensor") for g in opt.optimizer.param_groups for p in g["params"])
    accelerate_train(model, opt, acc.backward, rank, world)
    return {"sharded": sharded, "params": whole(model)}


JOBS["accelerate"] = accelerate_job
