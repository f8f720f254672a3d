"""Projector quality and cost: refresh time and captured fraction of the optimal top-r gradient energy.

For every registered projector (``lowrank_optim.projectors.PROJECTORS``) with default options, on
matrices of LLaMA shapes (512x512, 1376x512 and 2048x5461; ranks 128/128/512):

* real gradients of the small decoder (:mod:`benchmarks.model`) at those shapes, two consecutive
  training steps: ``init`` on the first gradient, ``update`` (the refresh, timed) on the second;
* random matrices with a decaying spectrum ``sigma_i = i^-1`` (seeded).

Captured energy of the refreshed subspace: ``||Q^T G||^2`` (or ``||G Q||^2``) with ``Q`` an orthonormal
basis of the span of ``project_back`` (so scaled random projections are measured fairly); for projectors
whose low-rank tensor is not a matrix, ``<project_back(project(G)), G>``. Whole-tensor selections
(``blocks``) capture all or nothing of a single matrix by design. The optimum
is the top-r singular energy (Eckart-Young); both are reported as fractions of ``||G||_F^2``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.projectors import PROJECTORS, make_projector

from . import common
from .data import load_corpus
from .model import DecoderConfig, build_model

#: Learning rate handed to projectors that step with the optimizer (online PCA).
LR = 1e-2
SHAPES = {"512x512": (512, 512, 128), "1376x512": (1376, 512, 128), "2048x5461": (2048, 5461, 512)}


def decaying_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``U diag(1/i) V^T`` with seeded random orthonormal ``U``, ``V``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return (u * s) @ v.T


def decoder_gradients(shape_names: list[str], steps: int = 3, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Two consecutive gradients of a one-layer decoder weight of each shape (after ``steps`` AdamW steps)."""
    corpus = load_corpus()
    out: dict[str, list[torch.Tensor]] = {}
    by_dims: dict[tuple[int, int], list[str]] = {}
    for name in shape_names:
        m, n, _ = SHAPES[name]
        d, f = (m, n) if m == n else (min(m, n), max(m, n))
        by_dims.setdefault((d, f if m != n else 4 * d), []).append(name)
    for (d, f), names in by_dims.items():
        model = build_model(DecoderConfig(d_model=d, n_layers=1, n_heads=max(1, d // 64), d_ffn=f, max_len=64),
                            seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for step in range(steps + 2):
            x, y = corpus.batch("train", step, 64, 64, seed=seed)
            opt.zero_grad()
            model(x, y).backward()
            if step >= steps:
                layer = model.layers[0]
                for name in names:
                    m, n, _ = SHAPES[name]
                    w = layer.attn.q_proj.weight if m == n else (layer.mlp.gate_proj.weight if m > n
                                                                 else layer.mlp.down_proj.weight)
                    grads[name].append(w.grad.detach().clone())
            opt.step()
        out.update(grads)
    return out


def captured_energy(proj: Any, state: dict[str, Any], g: torch.Tensor) -> tuple[float, str]:
    """Captured fraction of ``||g||^2`` by the projector state, and which measure was used.

    The subspace is read off the lift itself: ``project_back`` of the identity pattern in the low-rank
    space gives the spanning vectors (the basis columns, the selected coordinates, ...), which are then
    orthonormalised, so scaled or non-orthonormal bases (random projections) are measured fairly.
    """
    total = float(g.pow(2).sum())
    m, n = g.shape
    low = proj.project(g, state)
    if low.dim() == 2 and low.numel() > 0:
        rows, cols = low.shape
        right = rows == m and (cols != n or state.get("side", 1) == 1)
        k = cols if right else rows
        if k <= min(rows, cols):
            probe = torch.zeros_like(low)
            probe[:k, :k] = torch.eye(k)
            span = proj.project_back(probe, state).float()
            if right:  # lift N -> N Q^T: the first k rows are Q^T
                q = torch.linalg.qr(span[:k].T).Q
                return float((g @ q).pow(2).sum()) / total, "span of project_back"
            q = torch.linalg.qr(span[:, :k]).Q  # lift N -> P N: the first k columns are P
            return float((q.T @ g).pow(2).sum()) / total, "span of project_back"
    back = proj.project_back(low, state)
    return float((back * g).sum()) / total, "<project_back(project(G)), G>"


def optimal_energy(g: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(g.float())
    return float(s[:rank].pow(2).sum() / s.pow(2).sum())


def measure(name: str, g0: torch.Tensor, g1: torch.Tensor, rank: int, repeats: int = 1) -> dict[str, Any]:
    """Init on ``g0``, timed refresh (``update``) on ``g1``; captured energy of the refreshed state on ``g1``."""
    proj = make_projector(name, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        state = proj.init(g0, seed=1)
        init_s = time.perf_counter() - t0
        context: dict[str, Any] = {}
        if getattr(proj, "wants_moments", False):
            low = proj.low_shape(g1.shape, state)
            context["moments"] = {"exp_avg": torch.zeros(low), "exp_avg_sq": torch.zeros(low)}
        if getattr(proj, "wants_lr", False):
            context["lr"] = context["initial_lr"] = LR
        times = []
        new = state
        for _ in range(repeats):
            t0 = time.perf_counter()
            new = proj.update(g1, state, **context)
            times.append(time.perf_counter() - t0)
    captured, metric = captured_energy(proj, new, g1.float())
    return {"init_s": init_s, "refresh_s": common.median(times), "captured": captured, "metric": metric}


def run(shape_names: list[str], repeats: int = 1, only: list[str] | None = None, decoder_steps: int = 3,
        shapes: dict[str, tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """Every projector on every matrix; ``shapes`` may add or replace entries of :data:`SHAPES`."""
    table = {**SHAPES, **(shapes or {})}
    names = [n for n in sorted(PROJECTORS) if not only or n in only]
    mats: list[tuple[str, str, torch.Tensor, torch.Tensor, int]] = []
    real = decoder_gradients([s for s in shape_names if s in SHAPES], decoder_steps) \
        if any(s in SHAPES for s in shape_names) else {}
    for s in shape_names:
        m, n, r = table[s]
        if s in real:
            mats.append((s, "decoder_grad", real[s][0], real[s][1], r))
        a, b = decaying_matrix(m, n, seed=0), decaying_matrix(m, n, seed=1)
        mats.append((s, "decaying_spectrum", a, 0.5 * a + 0.5 * b, r))
    records = []
    jobs = [(p, mat) for mat in mats for p in names]
    optimal = {}
    for pname, (shape, kind, g0, g1, r) in common.progress(jobs, "projectors", total=len(jobs)):
        key = (shape, kind)
        if key not in optimal:
            optimal[key] = optimal_energy(g1, r)
        rec: dict[str, Any] = {"optimizer": None, "projector": pname, "impl": "lowrank_optim", "state_dtype": None,
                               "shape": shape, "rank": r, "matrix": kind, "optimal": optimal[key]}
        try:
            rec.update(measure(pname, g0, g1, r, repeats))
            rec["fraction_of_optimal"] = rec["captured"] / optimal[key]
        except Exception as err:  # a projector that rejects a shape is reported
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        records.append(rec)
    return records


def plot(records: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 6))
    for r in records:
        if "refresh_s" not in r:
            continue
        marker = "o" if r["matrix"] == "decoder_grad" else "x"
        ax.scatter(r["refresh_s"] * 1e3, r["fraction_of_optimal"], marker=marker, s=18)
        ax.annotate(f"{r['projector']} {r['shape']}", (r["refresh_s"] * 1e3, r["fraction_of_optimal"]), fontsize=5)
    ax.set_xscale("log")
    ax.set_xlabel("refresh time (ms, log)")
    ax.set_ylabel("captured energy / optimal top-r energy")
    ax.set_title("Projectors: quality vs refresh cost (o: decoder gradients, x: decaying spectrum)")
    common.save_figure(fig, path)


def summary(records: list[dict[str, Any]]) -> str:
    rows = [{"projector": r["projector"], "shape": r["shape"], "rank": r["rank"], "matrix": r["matrix"],
             "refresh ms": 1e3 * r["refresh_s"] if "refresh_s" in r else None, "captured": r.get("captured"),
             "optimal": r["optimal"], "/optimal": r.get("fraction_of_optimal"),
             "note": r.get("error", "")[:60]} for r in records]
    return common.markdown_table(rows, ["projector", "shape", "rank", "matrix", "refresh ms", "captured", "optimal",
                                        "/optimal", "note"])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = common.parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    common.setup(args)  # projectors always run on the CPU (refresh cost as a user on CPU sees it)
    shape_names = ["512x512", "1376x512"] if args.quick else list(SHAPES)
    repeats = 1 if args.quick else 3
    records = run(shape_names, repeats, common.only_list(args.only))
    config = {"shapes": {s: SHAPES[s] for s in shape_names}, "repeats": repeats, "decoder_steps": 3,
              "spectrum": "sigma_i = 1/i", "device": "cpu"}
    common.publish(args, "projectors", "cpu", config, records, records, plot, summary)
    return records


if __name__ == "__main__":
    main()
