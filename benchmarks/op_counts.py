"""aten ops dispatched by one steady optimizer step (``torch.profiler``, CPU), at LLaMA shapes.

On a GPU every dispatched op is (at least) one kernel launch, so the count is the step's launch overhead, which a
7B model's hundreds of projected matrices would otherwise pay per parameter. Parameters and seeded gradients of
the shapes are set once (:func:`benchmarks.common.synthetic_params`, grouped as the throughput benchmark groups
them: attention and MLP weights projected at ``rank``, everything else plain); two steps are taken (state
allocation, initial subspace), then the third is profiled. With ``update_proj_gap`` far away no refresh falls in
it.

Counted: every aten op the profiler records (issue 12's measure: an op called from inside another one, such as
the ``aten::empty`` inside ``aten::mm``, counts too), and apart from it the *top-level* ones, not called from
inside another aten op (what the Python code dispatches). Issue 12's targets at LLaMA-60M (56 projected
matrices and the 32000 x 512 embedding, plain; :func:`shapes`), on every op: GaLoreAdamW <= 800, Fira <= 1000,
Flora <= 1200 (before the batched engine: 1941, 4613, 8290; ``torch.optim.AdamW(fused=True)``: 401).
``tests/test_op_counts.py`` bounds the counts on a small model so they cannot creep back.

Usage: ``python -m benchmarks.op_counts [--size 60M] [--rank 128] [--only adamw,galore_adamw,fira,flora] [--full]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch

import lowrank_optim as lro
from lowrank_optim.memory import LLAMA_CONFIGS, llama_shapes

from . import common

#: Issue 12's bounds at LLaMA-60M shapes.
TARGETS_60M = {"galore_adamw": 800, "fira": 1000, "flora": 1200}


def shapes(size: str, *, full: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of LLaMA-``size``: its projected matrices and its (tied) embedding, issue 12's set (60M: 56
    matrices and the 32000 x 512 embedding); ``full``: every tensor of the decoder, norms and untied head too."""
    named = llama_shapes(**LLAMA_CONFIGS[size], tie_embeddings=not full)
    return {n: tuple(s) for n, s in named.items() if full or len(s) == 2}


def aten_ops(run: Callable[[], object]) -> tuple[Counter[str], Counter[str]]:
    """``(every, top_level)``: names of the aten ops ``run()`` dispatches on the CPU, all of them and those not
    called from inside another aten op (see the module docstring)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    every: Counter[str] = Counter()
    top: Counter[str] = Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        every[e.name] += 1
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[e.name] += 1
    return every, top


def steady_step_ops(name: str, params: dict[str, torch.nn.Parameter], rank: int,
                    **kwargs: object) -> tuple[Counter[str], Counter[str]]:
    """Aten ops (every, top-level) of the third step of optimizer ``name`` on ``params`` (gradients set already),
    refreshes out of the way; ``"adamw"`` is ``torch.optim.AdamW(fused=True)``."""
    if name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, fused=True)
    else:
        groups = common.split_groups(params, rank, 10**9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = lro.create_optimizer(name, groups, lr=1e-3, **kwargs)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
        opt.step()
        counts = aten_ops(opt.step)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="60M", choices=sorted(LLAMA_CONFIGS))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--only", default="adamw,galore_adamw,fira,flora")
    ap.add_argument("--top", type=int, default=0, help="also print the N most frequent ops of each optimizer")
    ap.add_argument("--full", action="store_true",
                    help="the whole decoder (norms and an untied head too); default: the projected matrices and the "
                         "embedding, issue 12's set")
    args = ap.parse_args(argv)
    params = common.synthetic_params(shapes(args.size, full=args.full), torch.device("cpu"))
    out: dict[str, int] = {}
    top: dict[str, int] = {}
    for name in args.only.split(","):
        every, first = steady_step_ops(name, params, args.rank)
        out[name], top[name] = sum(every.values()), sum(first.values())
        bound = TARGETS_60M.get(name) if args.size == "60M" else None
        print(f"{name:>14}: {out[name]:5d} aten ops per steady step, {top[name]} top-level"
              + (f" (target <= {bound})" if bound else ""), flush=True)
        if args.top:
            print("   ", ", ".join(f"{k[6:]} {v}" for k, v in every.most_common(args.top)), flush=True)
    print(json.dumps({"size": args.size, "rank": args.rank, "full": args.full, "ops_per_steady_step": out,
                      "top_level": top}))
    return out


if __name__ == "__main__":
    main()
