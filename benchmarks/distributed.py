"""FSDP2 (``fully_shard``) on CPU with gloo: per-rank state, step time and the optimizer's own communication.

``python -m benchmarks.distributed`` runs the small LLaMA-style decoder of :mod:`benchmarks.model` on k = 1, 2
and 4 processes (one mesh of k ranks; k = 1 is FSDP2 on one rank) with GaLoreAdamW, Fira, Flora and
``torch.optim.AdamW``. Per optimizer and k it records rank 0's state bytes, the median ``step()`` time over
steady steps, and the bytes the optimizer's own collectives move into a rank (ring model, averaged over ranks,
:data:`lowrank_optim.distributed.comm.TRAFFIC`) per steady step and per refresh step, beside what FSDP2 itself
moves for the projected weights per step (one all-gather plus one reduce-scatter: ``2 (k-1)/k`` of their fp32
bytes). Results: ``benchmarks/results/distributed.json`` (+ PNG).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import lowrank_optim as lro
from lowrank_optim.distributed import local

from . import common
from .model import DecoderConfig, build_model

NAME = "distributed"
OPTIMIZERS = ("adamw", "galore_adamw", "fira", "flora")
RANK = 32
GAP = 10  # refresh at step 10
STEPS = 13
BATCH, SEQ = 8, 64
TIMEOUT_S = 1800  # per world size


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, lro.LowRankOptimizer):
        return opt.state_bytes()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def _worker(rank: int, world: int, init_method: str, cfg: DecoderConfig, out: str,
            names: tuple[str, ...] = OPTIMIZERS) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowrank_optim.distributed import comm

    torch.set_num_threads(1)
    local.init_gloo(rank, world, init_method, timeout_s=300)
    records = []
    try:
        for name in names:
            model = build_model(cfg)
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            groups = lro.param_groups(model, rank=RANK, target_modules=["attn", "mlp"], update_proj_gap=GAP)
            projected = sum(p.numel() for g in groups if g.get("rank") for p in g["params"])
            if name == "adamw":
                opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            else:
                opt = lro.create_optimizer(name, groups, lr=1e-3)
            gen = torch.Generator().manual_seed(0)
            times, steady, refresh = [], [], 0.0
            for step in range(STEPS):
                tokens = torch.randint(0, cfg.vocab, (BATCH * world, SEQ + 1), generator=gen)
                part = tokens.chunk(world)[rank]
                loss = model(part[:, :-1], part[:, 1:])
                loss.backward()
                before = dict(comm.TRAFFIC)
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
                opt.zero_grad()
                moved = {k: comm.TRAFFIC[k] - before.get(k, 0.0) for k in comm.TRAFFIC}
                if step == GAP:
                    refresh = sum(moved.values())
                elif step > 1:
                    steady.append(sum(moved.values()))
            steady_times = [t for i, t in enumerate(times) if i > 1 and i != GAP]
            records.append({"optimizer": name, "world": world, "state_bytes_rank0": _state_bytes(opt),
                            "step_ms": 1e3 * statistics.median(steady_times),
                            "refresh_step_ms": 1e3 * times[GAP],
                            "comm_bytes_steady_step": max(steady) if steady else 0.0,
                            "comm_bytes_refresh_step": refresh,
                            "fsdp2_bytes_per_step_projected": 2 * (world - 1) / world * 4 * projected})
        if rank == 0:
            torch.save(records, out)
    finally:
        local.end_process_group()


def run(worlds: tuple[int, ...], cfg: DecoderConfig, names: tuple[str, ...] = OPTIMIZERS) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = str(Path(tmp) / f"{world}.pt")
            local.spawn(_worker, world, (world, local.rendezvous(tmp), cfg, out, names), timeout_s=TIMEOUT_S)
            records += torch.load(out, weights_only=False)
    single = {r["optimizer"]: r["state_bytes_rank0"] for r in records if r["world"] == 1}
    for r in records:
        r["state_fraction_of_one_process"] = r["state_bytes_rank0"] / single[r["optimizer"]]
    return records


def plot(records: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["optimizer"] for r in records):
        rows = [r for r in records if r["optimizer"] == name]
        ax.plot([r["world"] for r in rows], [r["state_bytes_rank0"] / 1e6 for r in rows], marker="o", label=name)
    ax.set_xlabel("ranks (FSDP2, gloo, CPU)")
    ax.set_ylabel("optimizer state per rank (MB)")
    ax.legend()
    common.save_figure(fig, path)


def summary(records: list[dict[str, Any]]) -> str:
    return common.markdown_table(records, ["optimizer", "world", "state_bytes_rank0", "state_fraction_of_one_process",
                                           "step_ms", "comm_bytes_steady_step", "comm_bytes_refresh_step",
                                           "fsdp2_bytes_per_step_projected"])


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,4", help="comma-separated process counts")
    args = ap.parse_args(argv)
    os.environ.setdefault("LRO_BENCH_QUIET", "1")
    worlds = tuple(int(w) for w in args.worlds.split(","))
    cfg = DecoderConfig()
    names = tuple(args.only.split(",")) if args.only else OPTIMIZERS  # "adamw" or any registered preset
    records = run(worlds, cfg, names)
    common.publish(args, NAME, "cpu", {"model": cfg.asdict(), "rank": RANK, "update_proj_gap": GAP,
                                       "batch_per_rank": BATCH, "seq": SEQ, "worlds": worlds}, records, records,
                   plot, summary)


if __name__ == "__main__":
    main()
