"""Staggered refresh (issue 12): step time over one full refresh period and validation loss, on and off.

GaLore's schedule refreshes every projected matrix at the same step, so one step in ``update_proj_gap`` (``T``)
carries every SVD of the model. ``refresh_stagger=True`` (:mod:`lowrank_optim.schedule`) gives each matrix its
own phase, so each step carries at most ``ceil(count / T)`` of them. Two measurements decide the default:

* **step time** (``--part time``): ``GaLoreAdamW`` with the ``svd`` projector at LLaMA shapes (default 60M, rank
  128, ``T`` = 200, GaLore's default) on seeded synthetic gradients (:func:`benchmarks.common.synthetic_params`).
  After the first step (the initial subspace, which every matrix needs at once either way), every step of one
  full period is timed: each matrix refreshes exactly once in it, staggered or not. Reports the median step,
  the worst step, ``worst / median`` (issue 12's bar: <= 3 with staggering) and the mean step over the period
  (the amortized cost, which staggering cannot change: the same SVDs, spread);
* **validation loss** (``--part loss``): the tuned sweep's decoder and schedule (:data:`benchmarks.sweep.SWEEP`,
  200 steps, ``T`` = 50, rank 32), ``GaLoreAdamW`` at the lr the sweep selects for it, staggered and not, on
  several seeds. The comparison is paired (same seed: same initial weights and batches), so what is left in the
  delta is staggering's effect plus the trajectory's chaos.

``python -m benchmarks.stagger`` writes ``<out>/stagger.json``; ``--part time`` or ``--part loss`` runs one half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import lowrank_optim as lro
from lowrank_optim.memory import LLAMA_CONFIGS, llama_shapes

from . import common
from .data import load_corpus
from .registry import Spec
from .sweep import SWEEP, train_run

#: The lr the tuned sweep (``benchmarks/results/convergence_sweep.json``) selects for GaLoreAdamW fp32.
SWEEP_LR = 10 ** -1.5


def _refreshes(opt: torch.optim.Optimizer) -> int:
    """Refreshes so far, summed over the optimizer's projected matrices (their projector states' counters)."""
    return sum(int(st["projector"]["refresh"]) for st in opt.state.values() if "projector" in st)


def period_times(stagger: bool, size: str = "60M", rank: int = 128, gap: int = 200,
                 device: str = "cpu") -> dict[str, Any]:
    """Step times (seconds) of GaLoreAdamW + ``svd`` over one full refresh period after the first step.

    Args:
        stagger: the ``refresh_stagger`` group key.
        size: a key of :data:`lowrank_optim.memory.LLAMA_CONFIGS`, or ``"tiny"`` (one layer, width 64: tests).
        rank: projection rank (GaLore's at 60M: 128).
        gap: ``update_proj_gap``; ``gap`` steps are timed, so every matrix refreshes exactly once among them.
        device: ``"cpu"`` or ``"cuda"``.
    """
    dev = common.check_device(device)
    shapes = llama_shapes(n_layers=1, d_model=64, d_ffn=160, vocab=96) if size == "tiny" else \
        llama_shapes(**LLAMA_CONFIGS[size])
    params = common.synthetic_params(shapes, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lro.GaLoreAdamW(common.split_groups(params, rank, gap), lr=1e-3, projector="svd",
                              refresh_stagger=stagger)
        common.sync(dev)
        t0 = time.perf_counter()
        opt.step()
        common.sync(dev)
        first = time.perf_counter() - t0
        times, refreshes = [], []
        done = _refreshes(opt)
        for _ in range(gap):
            t0 = time.perf_counter()
            opt.step()
            common.sync(dev)
            times.append(time.perf_counter() - t0)
            now = _refreshes(opt)
            refreshes.append(now - done)
            done = now
    med = statistics.median(times)
    return {"refresh_stagger": stagger, "size": size, "rank": rank, "update_proj_gap": gap,
            "first_step_s": first, "median_step_s": med, "worst_step_s": max(times),
            "worst_over_median": max(times) / med, "mean_step_s": statistics.fmean(times),
            "step_s": times, "refreshes_per_step": refreshes}


def _spec(stagger: bool) -> Spec:
    def factory(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return lro.GaLoreAdamW(groups, lr=lr, refresh_stagger=stagger)

    return Spec("galore_adamw", "lowrank_optim", "fp32", SWEEP_LR, True, factory, {"refresh_stagger": stagger})


def loss_runs(seeds: list[int]) -> dict[str, Any]:
    """Paired validation losses, staggered minus not, on :data:`benchmarks.sweep.SWEEP`."""
    corpus = load_corpus()
    rows = []
    for seed in common.progress(seeds, "stagger loss", total=len(seeds)):
        off = train_run(_spec(False), SWEEP, corpus, SWEEP_LR, seed)
        on = train_run(_spec(True), SWEEP, corpus, SWEEP_LR, seed)
        rows.append({"seed": seed, "val_loss_off": off["heldout_loss"], "val_loss_on": on["heldout_loss"],
                     "delta": on["heldout_loss"] - off["heldout_loss"]})
    deltas = [r["delta"] for r in rows]
    sd = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
    return {"config": {**SWEEP.asdict(), "lr": SWEEP_LR, "loss": "held-out validation batches"},
            "runs": rows, "mean_delta": statistics.fmean(deltas), "std_delta": sd,
            "stderr_delta": sd / len(deltas) ** 0.5 if len(deltas) > 1 else float("nan")}


def summary(result: dict[str, Any]) -> str:
    lines = []
    for rec in result.get("time", []):
        lines.append(f"stagger={rec['refresh_stagger']}: median {1e3 * rec['median_step_s']:.1f} ms, worst "
                     f"{1e3 * rec['worst_step_s']:.1f} ms ({rec['worst_over_median']:.2f}x median), mean over the "
                     f"period {1e3 * rec['mean_step_s']:.1f} ms, first step {rec['first_step_s']:.2f} s")
    if "loss" in result:
        loss = result["loss"]
        lines.append(f"val loss, staggered - not (paired, {len(loss['runs'])} seeds): {loss['mean_delta']:+.4f} "
                     f"+- {loss['std_delta']:.4f} (stderr {loss['stderr_delta']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("time", "loss", "all"), default="all")
    ap.add_argument("--size", default="60M", help="LLaMA shapes of the timing part")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap of the timing part")
    ap.add_argument("--seeds", default="0,1,2,3", help="seeds of the loss part")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {"environment": common.environment(args.device),
                              "command": " ".join(["python -m benchmarks.stagger", *given])}
    if args.part in ("time", "all"):
        result["time"] = [period_times(s, args.size, gap=args.gap, device=args.device) for s in (False, True)]
    if args.part in ("loss", "all"):
        result["loss"] = loss_runs([int(s) for s in args.seeds.split(",")])
    path = Path(args.out) / f"stagger{'' if args.part == 'all' else '_' + args.part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
