"""The memory/loss frontier: state bytes at LLaMA-1B shapes against tuned validation loss, Pareto front drawn.

Reads the tuned sweep (``<out>/convergence_sweep.json``, written by ``python -m benchmarks.convergence
--sweep``) and, for every optimizer and state store in it (torch AdamW and the references included), puts

* x: optimizer-state bytes at LLaMA-1B shapes (24 layers, d 2048, ffn 5461, vocab 32000), rank 512 on the
  attention and MLP weights, closed form from :func:`lowrank_optim.memory.estimate_state_bytes` on the meta
  device (:func:`benchmarks.memory.closed_form`);
* y: the held-out validation loss of its tuned lr, mean over the seeds, with the min-max range as an error
  bar.

A point is on the Pareto front when no other point has both fewer state bytes and a lower mean loss.
Writes ``<out>/frontier.json`` and ``<out>/frontier.png``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowrank_optim.memory import LLAMA_CONFIGS, llama_shapes

from . import common
from .registry import specs

SIZE = "1B"
RANK = 512  # GaLore's rank at 1B (paper Table 2)


def state_bytes_at(labels: Sequence[str], size: str = SIZE, rank: int = RANK) -> dict[str, int | None]:
    """Closed-form state bytes of each spec label at LLaMA-``size`` shapes (None when it cannot be built)."""
    from .memory import closed_form

    shapes = llama_shapes(**LLAMA_CONFIGS[size])
    wanted = set(labels)
    out: dict[str, int | None] = {}
    for spec in specs(controls=True):
        if spec.label in wanted:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[spec.label] = int(closed_form(spec, shapes, rank)["closed_form_bytes"])
            except Exception:  # a reference that cannot run on the meta device is left out of the plot
                out[spec.label] = None
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(bytes, loss)`` points on the Pareto front, sorted by bytes.

    A point is dominated when another is no worse in both coordinates and better in at least one.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def build(sweep: dict[str, Any], state_bytes: dict[str, int | None]) -> list[dict[str, Any]]:
    """One record per spec with a finite tuned loss and known bytes; ``on_front`` marks the Pareto front."""
    recs = []
    for r in sweep["records"]:
        h = r.get("heldout") or {}
        b = state_bytes.get(r["label"])
        if h.get("mean") is None or b is None:
            continue
        recs.append({"label": r["label"], "optimizer": r["optimizer"], "impl": r["impl"],
                     "state_dtype": r["state_dtype"], "tuned_lr": r.get("best_lr"), "at_edge": r.get("at_edge"),
                     "state_bytes_1b": b, "state_GiB_1b": b / 2**30, "heldout_mean": h["mean"],
                     "heldout_std": h["std"], "heldout_min": h["min"], "heldout_max": h["max"],
                     "seeds": r.get("seeds_done"), "heldout_minus_adamw": r.get("heldout_minus_adamw")})
    front = set(pareto_front([(r["state_bytes_1b"], r["heldout_mean"]) for r in recs]))
    for i, r in enumerate(recs):
        r["on_front"] = i in front
    return recs


def plot(recs: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = common.pyplot()
    if plt is None or not recs:
        return
    fig, ax = plt.subplots(figsize=(11, 7))
    markers = {"fp32": "o", "bf16": "s", "8bit": "^"}
    for r in recs:
        x, y = r["state_GiB_1b"], r["heldout_mean"]
        color = "black" if r["impl"] == "torch" else ("tab:blue" if r["impl"] == "lowrank_optim" else "tab:orange")
        ax.errorbar([x], [y], yerr=[[y - r["heldout_min"]], [r["heldout_max"] - y]], fmt=markers.get(
            r["state_dtype"], "o"), color=color, ms=6 if r["on_front"] else 4, capsize=2, lw=0.8,
                    mfc=color if r["on_front"] else "none")
        ax.annotate(r["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in recs if r["on_front"]), key=lambda r: r["state_bytes_1b"])
    ax.step([r["state_GiB_1b"] for r in front], [r["heldout_mean"] for r in front], where="post", color="red",
            lw=1.2, label="Pareto front (fewer bytes and lower loss)")
    adamw = next((r for r in recs if r["label"] == "torch:adamw"), None)
    if adamw:
        ax.axhline(adamw["heldout_mean"], color="black", ls=":", lw=0.8, label="torch AdamW (tuned)")
    for sd, m in markers.items():
        ax.plot([], [], m, color="gray", mfc="none", label=f"state {sd}")
    ax.plot([], [], "o", color="tab:blue", label="lowrank_optim")
    ax.plot([], [], "o", color="tab:orange", label="reference implementations")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"optimizer state at LLaMA-{SIZE} shapes, rank {RANK} (GiB, log scale)")
    ax.set_ylabel("held-out validation loss at the tuned lr, mean over seeds, min-max bars (nats/byte)")
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax.set_title(title, fontsize=9)
    common.save_figure(fig, path)


def summary(recs: list[dict[str, Any]]) -> str:
    rows = [{"optimizer": r["label"], "state GiB @1B": r["state_GiB_1b"], "tuned lr": r["tuned_lr"],
             "held-out loss": f"{r['heldout_mean']:.4f} ± {r['heldout_std']:.4f}", "- AdamW": r["heldout_minus_adamw"],
             "front": "yes" if r["on_front"] else ""} for r in sorted(recs, key=lambda r: r["state_bytes_1b"])]
    return common.markdown_table(rows, ["optimizer", "state GiB @1B", "tuned lr", "held-out loss", "- AdamW", "front"])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = common.parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    sweep_path = Path(args.out) / "convergence_sweep.json"
    if not sweep_path.exists():
        raise SystemExit(f"{sweep_path} not found: run `python -m benchmarks.convergence --sweep` first")
    sweep = json.loads(sweep_path.read_text())
    state = state_bytes_at([r["label"] for r in sweep["records"]])
    recs = build(sweep, state)
    conf = sweep["config"]
    title = (f"Tuned loss vs optimizer state: byte-level decoder d{conf['model']['d_model']} x "
             f"{conf['model']['n_layers']} layers, {conf['steps']} steps x {conf['batch_size'] * conf['seq_len']} "
             f"tokens, {conf['seeds']} seeds; state at LLaMA-{SIZE} shapes")
    config = {"size": SIZE, "rank": RANK, "shapes": LLAMA_CONFIGS[SIZE], "sweep": str(sweep_path.name),
              "sweep_config": conf, "missing": sorted(k for k, v in state.items() if v is None)}
    common.write_json(Path(args.out), "frontier", "cpu", False, config, recs)
    plot(recs, Path(args.out) / "frontier.png", title)
    print(summary(recs))
    return recs


if __name__ == "__main__":
    main()

