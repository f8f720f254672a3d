"""Optimizer step time at LLaMA-60M shapes (CPU) or LLaMA-1B shapes (CUDA), synthetic gradients.

Only the optimizer is timed: parameters and seeded gradients of the model's shapes are set once
(no forward or backward pass). For each optimizer, in one process beside ``torch.optim.AdamW``:

* steady steps (no subspace refresh): median and p95 over ``steps`` timed steps after a warm-up step;
* the refresh step, timed separately: a fresh optimizer with ``update_proj_gap=1`` refreshes every step,
  its median step time is the cost of a step that includes the refresh (quick mode, ``refresh_steps=0``:
  the first step, which computes the initial subspace, stands in for it);
* amortized step time for refresh period ``T`` (200): ``(median * (T - 1) + refresh) / T``, and its ratio
  to AdamW's median;
* on CUDA, peak memory (``torch.cuda.max_memory_allocated``) of parameters + gradients + state + step.

On the CPU every timed steady step is followed by a timed step of one ``torch.optim.AdamW`` kept alive for
the whole run (paired steps), and each ratio divides by the median of *those* AdamW steps: a shared or
throttled machine slows both sides of a ratio alike, where a single AdamW measurement at the start of the
run would drift by 10-20% against the later ones. (On CUDA the AdamW's state would enter the peak memory,
so GPU ratios use AdamW's own record, whose timings are stable.)
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.memory import LLAMA_CONFIGS, count_state_bytes, llama_shapes

from . import common
from .registry import Spec, specs

T_REFRESH = 200


def _timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    common.sync(device)
    t0 = time.perf_counter()
    opt.step()
    common.sync(device)
    return time.perf_counter() - t0


def _timed_steps(opt: torch.optim.Optimizer, n: int, device: torch.device,
                 baseline: torch.optim.Optimizer | None = None) -> tuple[list[float], list[float]]:
    """``n`` step times of ``opt`` and, when given, of ``baseline`` stepped right after each one."""
    out, base = [], []
    for _ in range(n):
        out.append(_timed_step(opt, device))
        if baseline is not None:
            base.append(_timed_step(baseline, device))
    return out, base


def time_spec(spec: Spec, params: dict[str, torch.nn.Parameter], rank: int, steps: int, refresh_steps: int,
              device: torch.device, period: int = T_REFRESH,
              baseline: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Steady and refresh step times of ``spec`` on ``params`` (their gradients are already set); with a
    ``baseline`` optimizer, its step times paired with the steady steps too."""
    snapshot = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}  # off-device: not in the peak
    rec: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        opt = spec.build(common.split_groups(params, rank, 10**9))
        first = _timed_step(opt, device)  # state allocation + initial subspace
        steady, paired = _timed_steps(opt, steps, device, baseline)
        if device.type == "cuda":
            rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        rec["state_bytes"] = count_state_bytes(opt)
        del opt
        refresh = None
        if spec.lowrank and refresh_steps == 0:
            refresh = first  # quick mode: the first step (initial subspace + allocation) stands in for a refresh
        elif spec.lowrank:
            opt = spec.build(common.split_groups(params, rank, 1))
            _timed_step(opt, device)
            refresh = common.median(_timed_steps(opt, refresh_steps, device)[0])
            del opt
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    gc.collect()
    med = common.median(steady)
    rec.update({"first_step_s": first, "median_step_s": med, "p95_step_s": common.quantile(steady, 0.95),
                "refresh_step_s": refresh,
                "amortized_step_s": med if refresh is None else (med * (period - 1) + refresh) / period,
                "steps": steps, "refresh_steps": refresh_steps if refresh is not None else 0,
                "refresh_source": None if refresh is None else ("first_step" if refresh_steps == 0 else "gap_1")})
    if paired:
        rec["paired_adamw_median_step_s"] = common.median(paired)
    return rec


def run(size: str = "60M", steps: int = 10, refresh_steps: int = 2, state_dtypes: tuple[str, ...] = ("fp32", "8bit"),
        references: bool = True, only: list[str] | None = None, device: str = "cpu", rank: int = 128,
        shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """Times every spec; returns records with ratios to AdamW's median step."""
    dev = common.check_device(device)
    shapes = shapes or llama_shapes(**LLAMA_CONFIGS[size])
    params = common.synthetic_params(shapes, dev)
    records = []
    todo = specs(state_dtypes, references, only)
    adamw = next(s for s in todo if s.impl == "torch")
    baseline = None
    if dev.type == "cpu":  # paired steps (module docstring); its state lives for the whole run
        baseline = adamw.build(common.split_groups(params, rank, 10**9))
        _timed_step(baseline, dev)
    for spec in common.progress(todo, f"throughput {size}", total=len(todo)):
        rec: dict[str, Any] = {**spec.record(), "size": size, "rank": rank if spec.lowrank else None,
                               "update_proj_gap": T_REFRESH, "device": device}
        try:
            rec.update(time_spec(spec, params, rank, steps, refresh_steps, dev,
                                 baseline=None if spec is adamw else baseline))
        except Exception as err:  # a failing reference is reported, not fatal
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        records.append(rec)
    base = next((r for r in records if r["impl"] == "torch" and "median_step_s" in r), None)
    for r in records:
        ref = r.get("paired_adamw_median_step_s") or (base or {}).get("median_step_s")
        if ref and "amortized_step_s" in r:
            r["amortized_ratio_to_adamw"] = r["amortized_step_s"] / ref
            r["median_ratio_to_adamw"] = r["median_step_s"] / ref
    return records


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    recs = [r for r in records if "median_step_s" in r]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(recs) + 4), 5))
    xs = range(len(recs))
    ax.bar(xs, [r["amortized_step_s"] * 1e3 for r in recs], label=f"amortized (refresh every {T_REFRESH})")
    ax.scatter(xs, [r["median_step_s"] * 1e3 for r in recs], color="k", marker="_", s=200, label="median step",
               zorder=3)
    ax.set_xticks(list(xs), [r["label"] for r in recs], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ms per optimizer step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def summary(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        row = {"optimizer": r["label"], "median ms": None, "p95 ms": None, "refresh ms": None,
               "amortized ms": None, "amortized /AdamW": r.get("amortized_ratio_to_adamw"),
               "paired AdamW ms": None if "paired_adamw_median_step_s" not in r
               else 1e3 * r["paired_adamw_median_step_s"]}
        if "median_step_s" in r:
            row.update({"median ms": 1e3 * r["median_step_s"], "p95 ms": 1e3 * r["p95_step_s"],
                        "refresh ms": None if r["refresh_step_s"] is None else 1e3 * r["refresh_step_s"],
                        "amortized ms": 1e3 * r["amortized_step_s"]})
        if "peak_memory_bytes" in r:
            row["peak GiB"] = r["peak_memory_bytes"] / 2**30
        if "error" in r:
            row["optimizer"] += " (error)"
        rows.append(row)
    cols = ["optimizer", "median ms", "p95 ms", "refresh ms", "amortized ms", "amortized /AdamW"]
    if any(r["paired AdamW ms"] is not None for r in rows):
        cols.append("paired AdamW ms")
    if any("peak GiB" in r for r in rows):
        cols.append("peak GiB")
    return common.markdown_table(rows, cols)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="LLaMA size (default 60M on CPU, 1B on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steady steps")
    args = ap.parse_args(argv)
    common.setup(args)
    size = args.size or ("1B" if args.device == "cuda" else "60M")
    rank = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}[size]
    steps = args.steps or (3 if args.quick else 20)
    refresh_steps = 0 if args.quick else 3
    stores: tuple[str, ...] = ("fp32",) if args.quick else ("fp32", "bf16", "8bit")
    records = run(size, steps, refresh_steps, stores, not args.no_references, common.only_list(args.only),
                  args.device, rank)
    config = {"size": size, "shape": LLAMA_CONFIGS[size], "rank": rank, "steps": steps,
              "refresh_steps": refresh_steps, "update_proj_gap": T_REFRESH, "state_dtypes": list(stores),
              "gradients": "synthetic, seeded, set once"}
    common.publish(args, "throughput", args.device, config, records, records, plot, summary,
                   f"Optimizer step time, LLaMA-{size} shapes, {args.device}")
    return records


if __name__ == "__main__":
    main()
