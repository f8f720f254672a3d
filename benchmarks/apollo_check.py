"""Issue 14's acceptance figures on the byte-level decoder of :mod:`benchmarks.convergence`.

Same model, data, seed and schedule for every run (``convergence.train_one``); prints and saves
(``benchmarks/results/apollo_check.json``):

* APOLLO and APOLLO-Mini validation loss against torch AdamW (bars: within 1% and 3%);
* GaLore-AdamW with fp32 / bf16 / int8 / int4 projector bases (bars: |delta| <= 0.005 for bf16, 0.01 for int8;
  int4 is reported against the int8 bar);
* GaLore-AdamW with lazy refresh at two thresholds: the fraction of scheduled refreshes saved (bar: >= 30%)
  and the validation-loss change against the fixed schedule (bar: |delta| <= 0.005);
* the noise floor of those deltas: the fp32 run again with two threads (only the summation order differs).

``python -m benchmarks.apollo_check`` (9 runs of 200 steps, one CPU thread; ``--steps`` to change).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import lowrank_optim as lro

from . import common
from .convergence import train_one
from .data import load_corpus
from .model import DecoderConfig
from .registry import FULL_RANK_LR, LOWRANK_LR, Spec

CONFIG: dict[str, Any] = {"cfg": DecoderConfig(d_model=128, n_layers=2, n_heads=4, d_ffn=344, max_len=64),
                          "steps": 200, "batch_size": 8, "seq_len": 64, "rank": 32, "update_proj_gap": 20,
                          "eval_every": 100, "eval_batches": 8}


def _spec(label: str, name: str, lr: float, made: list[torch.optim.Optimizer], **kwargs: Any) -> Spec:
    def factory(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        if name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=lr,
                                                           weight_decay=0.0)
        else:
            opt = lro.create_optimizer(name, groups, lr=lr, **kwargs)
        made.append(opt)
        return opt

    return Spec(label, "torch" if name == "adamw" else "lowrank_optim", "fp32", lr, name != "adamw", factory,
                kwargs)


def _refreshes(opt: torch.optim.Optimizer) -> int:
    return sum(int(st["projector"]["refresh"]) for st in opt.state.values() if "projector" in st)


def _figures(records: dict[str, dict[str, Any]], conf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """The issue's figures and bars from whichever records exist (a partial ``--only`` run gives fewer)."""

    def val(label: str) -> float | None:
        return records[label]["val_loss"] if label in records else None

    figures: dict[str, Any] = {}
    bars: dict[str, bool] = {}
    adamw, base = val("adamw"), val("galore_adamw[basis fp32]")
    for name, bar in (("apollo", 0.01), ("apollo_mini", 0.03)):
        if adamw is not None and val(name) is not None:
            figures[f"{name}_vs_adamw"] = val(name) / adamw - 1.0
            bars[f"{name} within {bar:.0%} of AdamW"] = figures[f"{name}_vs_adamw"] <= bar
    if base is None:
        return figures, bars
    fp32 = records["galore_adamw[basis fp32]"]
    figures["scheduled_refreshes"] = fp32["projected"] * ((conf["steps"] - 1) // conf["update_proj_gap"])
    if val("galore_adamw[basis fp32 2threads]") is not None:
        figures["noise_floor_delta"] = val("galore_adamw[basis fp32 2threads]") - base
    for dt, bar in (("bf16", 0.005), ("int8", 0.01), ("int4", 0.01)):
        if val(f"galore_adamw[basis {dt}]") is not None:
            figures[f"basis_{dt}_delta"] = val(f"galore_adamw[basis {dt}]") - base
            bars[f"{dt} bases |delta| <= {bar}"] = abs(figures[f"basis_{dt}_delta"]) <= bar
    for threshold in (0.9, 0.5):
        label = f"galore_adamw[lazy {threshold}]"
        if label in records:
            figures[f"lazy_{threshold}_saved"] = 1.0 - records[label]["refreshes"] / fp32["refreshes"]
            figures[f"lazy_{threshold}_delta"] = records[label]["val_loss"] - base
            bars[f"lazy {threshold}: >= 30% saved, |delta| <= 0.005"] = (
                figures[f"lazy_{threshold}_saved"] >= 0.30 and abs(figures[f"lazy_{threshold}_delta"]) <= 0.005)
    return figures, bars


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=CONFIG["steps"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="model and data seed (results: apollo_check[_seedN].json)")
    ap.add_argument("--only", default=None,
                    help="comma-separated run labels to (re)run; the other records are read from the last result")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    conf = {**CONFIG, "steps": args.steps}
    corpus = load_corpus()
    runs: list[tuple[str, str, float, dict[str, Any]]] = [
        ("adamw", "adamw", FULL_RANK_LR, {}),
        ("apollo", "apollo", LOWRANK_LR, {}),
        ("apollo_mini", "apollo_mini", LOWRANK_LR, {}),
    ]
    for dt in ("fp32", "bf16", "int8"):
        runs.append((f"galore_adamw[basis {dt}]", "galore_adamw", LOWRANK_LR,
                     {"projector_options": {"basis_dtype": dt}}))
    runs.append(("galore_adamw[lazy 0.9]", "galore_adamw", LOWRANK_LR,
                 {"projector_options": {"lazy_refresh": True, "lazy_threshold": 0.9}}))
    runs.append(("galore_adamw[basis int4]", "galore_adamw", LOWRANK_LR,
                 {"projector_options": {"basis_dtype": "int4"}}))
    runs.append(("galore_adamw[lazy 0.5]", "galore_adamw", LOWRANK_LR,
                 {"projector_options": {"lazy_refresh": True, "lazy_threshold": 0.5}}))
    # the noise floor: fp32 bases again with two threads (another summation order, perturbations ~1e-7)
    runs.append(("galore_adamw[basis fp32 2threads]", "galore_adamw", LOWRANK_LR, {}))
    records: dict[str, dict[str, Any]] = {}
    path = args.out / ("apollo_check.json" if args.seed == 0 else f"apollo_check_seed{args.seed}.json")
    only = common.only_list(args.only)
    if only:
        records = json.loads(path.read_text())["records"] if path.exists() else {}
        runs = [r for r in runs if r[0] in only]
    for label, name, lr, kwargs in runs:
        torch.set_num_threads(2 if "2threads" in label else args.threads)
        made: list[torch.optim.Optimizer] = []
        t0 = time.perf_counter()
        rec = train_one(_spec(label, name, lr, made, **kwargs), conf["cfg"], corpus, conf["steps"],
                        conf["batch_size"], conf["seq_len"], conf["rank"], conf["update_proj_gap"],
                        conf["eval_every"], conf["eval_batches"], torch.device("cpu"), seed=args.seed)
        out = {k: rec[k] for k in ("val_loss", "state_bytes", "wall_s", "diverged")}
        out["refreshes"] = _refreshes(made[0]) if name != "adamw" else None
        out["projected"] = sum(1 for st in made[0].state.values() if "projector" in st)
        out["lr"], out["kwargs"] = lr, kwargs
        records[label] = out
        print(f"{label:32s} val {out['val_loss']:.4f} state {out['state_bytes']} B refreshes {out['refreshes']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    figures, bars = _figures(records, conf)
    result = {"benchmark": "apollo_check", "command": "python -m benchmarks.apollo_check"
              + (f" --steps {args.steps}" if args.steps != CONFIG["steps"] else "")
              + (f" --seed {args.seed}" if args.seed else "") + (f" --only '{args.only}'" if args.only else ""),
              "environment": common.environment("cpu"),
              "config": {**{k: v for k, v in conf.items() if k != "cfg"}, "cfg": conf["cfg"].asdict()},
              "records": records, "figures": figures, "bars": bars}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for k, v in figures.items():
        print(f"{k:32s} {v:+.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    for k, v in bars.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
