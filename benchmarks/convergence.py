"""Convergence: a small LLaMA-style decoder trained byte-level with every optimizer, same everything else.

Every optimizer and reference gets the same initial weights (seed), the same batches in the same order,
the same number of steps and the same schedule (linear warm-up then cosine decay to 10% of the peak lr,
GaLore's recipe). Two modes:

* default / ``--quick``: one run per optimizer at the *fixed* lr of :mod:`benchmarks.registry` (fixed lr,
  not tuned: it shows each method trains, not which is best). Reports validation loss and perplexity,
  wall time, optimizer time per step and state bytes.
* ``--sweep``: the tuned comparison of :mod:`benchmarks.sweep` (lr grid with edge extension, selection on
  validation, seeds), then the memory/loss frontier of :mod:`benchmarks.frontier`.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lowrank_optim import param_groups
from lowrank_optim.memory import count_state_bytes

from . import common
from .data import Corpus, load_corpus
from .model import DecoderConfig, build_model
from .registry import Spec, specs
from .sweep import lr_factor

__all__ = ["lr_factor", "main", "run", "summary", "train_one"]


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, corpus: Corpus, batches: int, batch_size: int, seq_len: int,
                     device: torch.device) -> list[float]:
    """Validation loss of each of ``batches`` fixed validation batches (the same batches for every run)."""
    model.eval()
    losses = []
    for i in range(batches):
        x, y = corpus.batch("val", i, batch_size, seq_len)
        losses.append(float(model(x.to(device), y.to(device))))
    model.train()
    return losses


def evaluate(model: torch.nn.Module, corpus: Corpus, batches: int, batch_size: int, seq_len: int,
             device: torch.device) -> float:
    """Mean validation loss over ``batches`` fixed validation batches."""
    return sum(evaluate_batches(model, corpus, batches, batch_size, seq_len, device)) / batches


def train_one(spec: Spec, cfg: DecoderConfig, corpus: Corpus, steps: int, batch_size: int, seq_len: int,
              rank: int, update_proj_gap: int, eval_every: int, eval_batches: int, device: torch.device,
              seed: int = 0) -> dict[str, Any]:
    """Trains a fresh decoder with ``spec``; returns the record (curves included, and ``val_batch_losses``: the
    last evaluation's loss per validation batch, for paired comparisons between runs)."""
    model = build_model(cfg, seed=seed, device=device)
    groups = param_groups(model, rank=rank, target_modules=["attn", "mlp"], update_proj_gap=update_proj_gap)
    opt = spec.build(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 10)
    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    opt_time = 0.0
    t_start = time.perf_counter()
    diverged = False
    val_batches: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * lr_factor(step, steps, warmup)
            x, y = corpus.batch("train", step, batch_size, seq_len, seed=seed)
            loss = model(x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.sync(device)
            t0 = time.perf_counter()
            opt.step()
            common.sync(device)
            opt_time += time.perf_counter() - t0
            value = float(loss)
            train_curve.append((step + 1, value))
            if not math.isfinite(value):
                diverged = True
                break
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                val_batches = evaluate_batches(model, corpus, eval_batches, batch_size, seq_len, device)
                val_curve.append((step + 1, sum(val_batches) / eval_batches))
    wall = time.perf_counter() - t_start
    val = val_curve[-1][1] if val_curve and not diverged else float("nan")
    return {"val_loss": val, "val_ppl": math.exp(val) if math.isfinite(val) and val < 50 else float("inf"),
            "val_bits_per_byte": val / math.log(2) if math.isfinite(val) else float("nan"),
            "final_train_loss": train_curve[-1][1], "diverged": diverged, "wall_s": wall,
            "optimizer_s_per_step": opt_time / max(1, len(train_curve)), "state_bytes": count_state_bytes(opt),
            "train_curve": train_curve, "val_curve": val_curve,
            "val_batch_losses": val_batches if val_curve and not diverged else []}


def run(cfg: DecoderConfig, steps: int, batch_size: int, seq_len: int, rank: int, update_proj_gap: int,
        eval_every: int, eval_batches: int, state_dtypes: tuple[str, ...] = ("fp32",), references: bool = True,
        only: list[str] | None = None, device: str = "cpu", corpus: Corpus | None = None,
        seed: int = 0) -> list[dict[str, Any]]:
    """Trains once per spec; records carry the val loss ratio to AdamW."""
    dev = common.check_device(device)
    corpus = corpus or load_corpus()
    records = []
    todo = specs(state_dtypes, references, only)
    for spec in common.progress(todo, "convergence", total=len(todo)):
        rec: dict[str, Any] = {**spec.record(), "rank": rank if spec.lowrank else None,
                               "update_proj_gap": update_proj_gap if spec.lowrank else None, "steps": steps,
                               "seed": seed}
        try:
            rec.update(train_one(spec, cfg, corpus, steps, batch_size, seq_len, rank, update_proj_gap, eval_every,
                                 eval_batches, dev, seed))
        except Exception as err:  # a failing reference is reported, not fatal
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        records.append(rec)
    base = next((r for r in records if r["impl"] == "torch" and "val_loss" in r), None)
    for r in records:
        if base and "val_loss" in r:
            r["val_loss_minus_adamw"] = r["val_loss"] - base["val_loss"]
            r["state_ratio_to_adamw"] = r["state_bytes"] / base["state_bytes"]
    return records


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    curves = [r for r in records if "train_curve" in r]
    for i, r in enumerate(curves):
        style = "-" if r["impl"] == "lowrank_optim" else "--"
        color = plt.cm.tab20(i % 20)
        xs, ys = zip(*r["train_curve"], strict=True)
        k = max(1, len(ys) // 50)  # light smoothing: mean over windows of k steps
        sm = [sum(ys[j:j + k]) / len(ys[j:j + k]) for j in range(0, len(ys), k)]
        ax1.plot(xs[::k][: len(sm)], sm, style, color=color, label=r["label"], lw=1)
        if r["val_curve"]:
            vx, vy = zip(*r["val_curve"], strict=True)
            ax2.plot(vx, vy, style + "o", color=color, label=r["label"], lw=1, ms=3)
    ax1.set_title("train loss (smoothed)")
    ax2.set_title("validation loss")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    common.save_figure(fig, path)


def summary(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        rows.append({"optimizer": r["label"] + (" (error)" if "error" in r else ""), "lr": r["lr"],
                     "val loss": r.get("val_loss"), "val ppl": r.get("val_ppl"),
                     "- AdamW": r.get("val_loss_minus_adamw"), "state KiB": (r["state_bytes"] / 1024)
                     if "state_bytes" in r else None, "state /AdamW": r.get("state_ratio_to_adamw"),
                     "opt ms/step": 1e3 * r["optimizer_s_per_step"] if "optimizer_s_per_step" in r else None,
                     "wall s": r.get("wall_s")})
    return common.markdown_table(rows, ["optimizer", "lr", "val loss", "val ppl", "- AdamW", "state KiB",
                                        "state /AdamW", "opt ms/step", "wall s"])


QUICK = {"cfg": DecoderConfig(d_model=128, n_layers=2, n_heads=4, d_ffn=344, max_len=64), "steps": 100,
         "batch_size": 8, "seq_len": 64, "rank": 32, "update_proj_gap": 40, "eval_every": 40, "eval_batches": 4}
FULL = {"cfg": DecoderConfig(d_model=256, n_layers=4, n_heads=8, d_ffn=688, max_len=256), "steps": 2000,
        "batch_size": 16, "seq_len": 256, "rank": 64, "update_proj_gap": 200, "eval_every": 100, "eval_batches": 16}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=None, help="any text file (default: stdlib corpus)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="tuned comparison: lr grid, validation, 3 seeds")
    ap.add_argument("--jobs", type=int, default=2, help="--sweep: worker processes (one torch thread each)")
    ap.add_argument("--sweep-size", choices=("full", "small"), default="full",
                    help="--sweep: full (200 steps x 1024 tokens, 3 stores) or small (100 x 512, fp32 and 8-bit)")
    ap.add_argument("--resume", action="store_true", help="--sweep: keep the runs already in <out>/*_runs.jsonl")
    ap.add_argument("--report-only", action="store_true",
                    help="--sweep: summarise <out>/*_runs.jsonl (JSON, plots, frontier) without running anything")
    args = ap.parse_args(argv)
    common.setup(args)
    if args.sweep:
        from . import sweep

        return sweep.main(args)
    conf = dict(QUICK if args.quick else FULL)
    if args.steps:
        conf["steps"] = args.steps
    corpus = load_corpus(args.corpus)
    stores: tuple[str, ...] = ("fp32",) if args.quick else ("fp32", "8bit")
    records = run(**conf, state_dtypes=stores, references=not args.no_references, only=common.only_list(args.only),
                  device=args.device, corpus=corpus, seed=args.seed)
    config = {k: (v.asdict() if isinstance(v, DecoderConfig) else v) for k, v in conf.items()}
    config.update({"corpus": corpus.source, "corpus_sha256": corpus.sha256, "corpus_bytes": corpus.n_bytes,
                   "schedule": "linear warmup (10% of steps) + cosine to 10% of peak", "state_dtypes": list(stores),
                   "seed": args.seed, "tokens": "utf-8 bytes"})
    config["lr"] = "fixed, not tuned (benchmarks/registry.py); the tuned comparison is --sweep"
    common.publish(args, "convergence", args.device, config, records, records, plot, summary,
                   f"Byte-level decoder, {conf['steps']} steps, {args.device}: fixed lr, not tuned")
    return records


if __name__ == "__main__":
    main()
