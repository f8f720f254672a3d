"""Optimizer-state memory at LLaMA 60M-7B shapes: closed form (meta device) and measured, vs AdamW.

Closed form: :func:`lowrank_optim.memory.estimate_state_bytes` runs one step on meta tensors (no
allocation) and counts every state tensor. Measured: the same optimizer on real tensors (seeded weights and
gradients) after one step, counted by :func:`lowrank_optim.memory.count_state_bytes`. Ranks follow the
GaLore paper's configs (60M: 128, 130M/350M: 256, 1B: 512, 7B: 1024).

Also reproduces the GaLore paper's Table 2 "memory estimate" (weights + optimizer states, BF16).
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.memory import LLAMA_CONFIGS, count_state_bytes, estimate_state_bytes, llama_shapes

from . import common
from .registry import Spec, specs

#: GaLore's rank per model size (paper Table 2 / Table 3).
PAPER_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}
#: GaLore paper Table 2 memory estimates (weights + optimizer states in BF16), in "G".
PAPER_TABLE = {"60M": (0.36, 0.24), "130M": (0.76, 0.52), "350M": (2.06, 1.22), "1B": (7.80, 4.38)}
GAP = 200
GIB = 2**30


def size_config(size: str) -> dict[str, int]:
    """LLaMA config of ``size``; ``"60M-1L"`` is LLaMA-60M cut to one decoder layer (cheap to measure)."""
    base, _, layers = size.partition("-")
    cfg = dict(LLAMA_CONFIGS[base])
    if layers:
        cfg["n_layers"] = int(layers.rstrip("L"))
    return cfg


def _groups_meta(spec: Spec, rank: int):
    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        for g in groups:
            if "rank" in g:
                g["update_proj_gap"] = GAP
        return spec.build(groups)

    return build


def closed_form(spec: Spec, shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, Any]:
    """Closed-form state bytes of ``spec`` at ``shapes`` (meta device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_state_bytes(shapes, _groups_meta(spec, rank), rank=rank if spec.lowrank else None)
    return {"closed_form_bytes": est.total, "projector_bytes": est.projector, "method": est.method}


def measured(spec: Spec, shapes: dict[str, tuple[int, ...]], rank: int, device: torch.device) -> int:
    """State bytes after one real step on seeded weights and gradients."""
    params = common.synthetic_params(shapes, device)
    opt = spec.build(common.split_groups(params, rank, GAP))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    n = count_state_bytes(opt)
    del opt, params
    gc.collect()
    return n


def paper_table(sizes: list[str]) -> list[dict[str, Any]]:
    """GaLore Table 2's memory estimate (weights + states, BF16) from our closed forms, vs the paper.

    ``ours_*`` follow the paper's convention: every weight and every state element (moments and the
    projection basis) at 2 bytes; GiB (2^30 bytes) is the unit that matches the paper's 350M row.
    """
    from lowrank_optim.memory import estimate_state_bytes as est

    rows = []
    for size in sizes:
        shapes = llama_shapes(**LLAMA_CONFIGS[size])
        n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        rank = PAPER_RANKS[size]
        adam = est(shapes, lambda g: torch.optim.AdamW([p for x in g for p in x["params"]]), rank=None,
                   param_dtype=torch.bfloat16)
        adam_state = adam.total - 4 * len(shapes)  # torch keeps one fp32 step scalar per tensor
        galore = est(shapes, "galore_adamw", rank=rank, state_dtype="bf16")
        galore_state = galore.moments + galore.projector // 2  # basis at 2 bytes in the paper's convention
        for method, state, paper in (("Adam", adam_state, PAPER_TABLE[size][0]),
                                     ("GaLore", galore_state, PAPER_TABLE[size][1])):
            total = 2 * n_params + state
            rows.append({"size": size, "method": method, "rank": rank if method == "GaLore" else None,
                         "params": n_params, "ours_GiB": total / GIB, "ours_GB": total / 1e9, "paper_G": paper,
                         "diff_pct_GiB": 100 * (total / GIB / paper - 1),
                         "diff_pct_GB": 100 * (total / 1e9 / paper - 1)})
    return rows


def run(sizes: list[str], measure_sizes: list[str], state_dtypes: tuple[str, ...] = ("fp32", "bf16", "8bit"),
        references: bool = True, only: list[str] | None = None, device: str = "cpu",
        shapes_override: dict[str, dict[str, tuple[int, ...]]] | None = None) -> dict[str, Any]:
    """Closed-form (every size) and measured (``measure_sizes``) state bytes for every spec.

    ``shapes_override`` replaces the LLaMA shapes of a size (tests use tiny shapes).
    """
    dev = common.check_device(device)
    todo = specs(state_dtypes, references, only)
    records: list[dict[str, Any]] = []
    jobs = [(size, spec) for size in sizes for spec in todo]
    for size, spec in common.progress(jobs, "memory", total=len(jobs)):
        shapes = (shapes_override or {}).get(size) or llama_shapes(**size_config(size))
        rank = PAPER_RANKS.get(size.split("-")[0], 128)
        rec: dict[str, Any] = {**spec.record(), "size": size, "rank": rank if spec.lowrank else None,
                               "update_proj_gap": GAP, "n_params": sum(torch.Size(s).numel() for s in shapes.values())}
        try:
            rec.update(closed_form(spec, shapes, rank))
        except Exception as err:  # a reference that cannot run on meta is reported, not fatal
            rec.update({"closed_form_bytes": None, "method": None, "error": f"{type(err).__name__}: {err}"[:300]})
        rec["measured_bytes"] = None
        if size in measure_sizes:
            try:
                rec["measured_bytes"] = measured(spec, shapes, rank, dev)
            except Exception as err:
                rec["measure_error"] = f"{type(err).__name__}: {err}"[:300]
        records.append(rec)
    for size in sizes:
        base = next((r for r in records if r["size"] == size and r["impl"] == "torch"), None)
        for r in records:
            if r["size"] == size and base and base.get("closed_form_bytes") and r.get("closed_form_bytes"):
                r["ratio_to_adamw"] = r["closed_form_bytes"] / base["closed_form_bytes"]
                r["closed_form_GiB"] = r["closed_form_bytes"] / GIB
                if r["measured_bytes"] is not None:
                    r["closed_equals_measured"] = r["measured_bytes"] == r["closed_form_bytes"]
    return {"records": records, "paper_table": paper_table([s for s in sizes if s in PAPER_TABLE])}


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    recs = [r for r in result["records"] if r.get("closed_form_bytes")]
    sizes = list(dict.fromkeys(r["size"] for r in recs))
    labels = list(dict.fromkeys(r["label"] for r in recs))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels) + 4), 5))
    width = 0.8 / max(1, len(sizes))
    for i, size in enumerate(sizes):
        vals = [next((r["closed_form_bytes"] / GIB for r in recs if r["size"] == size and r["label"] == lab), 0.0)
                for lab in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=size)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("optimizer state (GiB, log)")
    ax.set_title("Optimizer-state memory at LLaMA shapes (closed form)")
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def summary(result: dict[str, Any]) -> str:
    """Markdown: state at each size relative to AdamW, and the paper table."""
    recs = result["records"]
    sizes = list(dict.fromkeys(r["size"] for r in recs))
    rows = []
    for lab in dict.fromkeys(r["label"] for r in recs):
        row: dict[str, Any] = {"optimizer": lab}
        for size in sizes:
            r = next((x for x in recs if x["label"] == lab and x["size"] == size), None)
            if r and r.get("closed_form_bytes"):
                row[f"{size} GiB"] = r["closed_form_bytes"] / GIB
                row[f"{size} /AdamW"] = r.get("ratio_to_adamw")
        meas = [x for x in recs if x["label"] == lab and x["measured_bytes"] is not None]
        row["measured == closed"] = ("yes" if all(x.get("closed_equals_measured") for x in meas) else "NO") if meas \
            else "-"
        rows.append(row)
    cols = ["optimizer"] + [f"{s} {k}" for s in sizes for k in ("GiB", "/AdamW")] + ["measured == closed"]
    out = markdown_table(rows, cols)
    if result.get("paper_table"):
        out += "\n\nGaLore paper Table 2 memory estimate (weights + states, BF16):\n\n" + markdown_table(
            result["paper_table"], ["size", "method", "params", "ours_GiB", "ours_GB", "paper_G", "diff_pct_GiB"])
    return out


markdown_table = common.markdown_table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--measure", default=None, help="comma-separated sizes to measure (default 60M; full: 60M,130M)")
    args = ap.parse_args(argv)
    common.setup(args)
    sizes: list[str] = list(LLAMA_CONFIGS)
    if args.quick:  # one decoder layer of LLaMA-60M (+ embedding, head) is measured; closed forms at 60M and 1B
        sizes = ["60M-1L", "60M", "1B"]
        measure = ["60M-1L"]
        stores: tuple[str, ...] = ("fp32", "8bit")
    else:
        measure = ["60M", "130M"]
        stores = ("fp32", "bf16", "8bit")
    if args.measure is not None:
        measure = [s for s in args.measure.split(",") if s]
    result = run(sizes, measure, stores, not args.no_references, common.only_list(args.only), args.device)
    config = {"sizes": sizes, "measured_sizes": measure, "state_dtypes": list(stores), "ranks": PAPER_RANKS,
              "update_proj_gap": GAP, "shapes": {s: size_config(s) for s in sizes}, "vocab": 32000}
    common.publish(args, "memory", args.device, config, result, result["records"], plot, summary,
                   paper_table=result["paper_table"])
    return result


if __name__ == "__main__":
    main()
