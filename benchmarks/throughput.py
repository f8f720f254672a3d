"""Optimizer step time and end-to-end training tokens/s at LLaMA-60M shapes (CPU) or LLaMA-1B shapes (CUDA).

Two modes (``--mode step|e2e|all``, default ``all``):

**step**: only the optimizer is timed: parameters and seeded gradients of the model's shapes are set once
(no forward or backward pass). For each optimizer, in one process beside ``torch.optim.AdamW``:

* steady steps (no subspace refresh): median and p95 over ``steps`` timed steps after a warm-up step and a
  method's own one-off start (GaLore+'s residual warm-up: :func:`warmup_steps`, timed apart as
  ``warmup_median_step_s``);
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
so GPU ratios use AdamW's own record, whose timings are stable.) That AdamW is torch's default, which on the CPU
is a per-tensor loop; ``torch.optim.AdamW(fused=True)`` is timed too, paired the same way (row
``torch:adamw(fused)``, :data:`FUSED_ADAMW`), and every record also carries ``amortized_ratio_to_fused_adamw``
(its ratio divided by fused AdamW's, both over paired default-AdamW steps).

**e2e**: a full training step (``zero_grad``, forward, backward, ``step``) of the benchmark decoder
(:data:`benchmarks.model.LLAMA_DECODERS`, the same LLaMA shapes, vocabulary 32000) on a fixed batch of seeded
random tokens; tokens/s = tokens per batch / median step time. Each optimizer trains its own freshly built model
(same seed), and each of its steps is paired with a step of a second model trained by torch AdamW in the same
process (CPU), so the ratio divides by AdamW's steps measured alongside. Amortized: the first step (initial
subspace, state allocation) stands in for a refresh step, ``(median * (T - 1) + first) / T``.

**Allocator regimes** (CPU; ``--regimes``, default ``warm,pinned``, warm first: the headline): each regime runs
in its own child process, since glibc reads its tunables at start-up (:mod:`benchmarks.malloc`):

* ``warm``: ``GLIBC_TUNABLES`` = :data:`benchmarks.malloc.WARM_HEAP_TUNABLES` (no mmap, no trim: a long run's
  heap, or jemalloc / tcmalloc); page faults do not flatter anyone there;
* ``pinned``: glibc's starting thresholds pinned at 128 KiB (every temporary above that is fresh pages);
* ``dynamic``: glibc's defaults, which depend on the allocation history (for reference only).

Every record carries ``malloc`` (its regime) and ``minor_faults_per_step`` (page faults per steady step, read
from ``getrusage``: the regime's observable effect).

**Repeats** (``--repeats N``): each regime's child process runs ``N`` times (regimes interleaved); every number is
the median over the runs and the table gives the range of the amortized ratio (:mod:`benchmarks.repeats`). One
process's ratio moves by several percent from run to run on a shared machine; a target is judged on the median.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.memory import LLAMA_CONFIGS, count_state_bytes, llama_shapes

from . import common, malloc
from . import repeats as repeats_mod
from .model import LLAMA_DECODERS, DecoderConfig, build_model
from .registry import FULL_RANK_LR, Spec, default_lr, specs

T_REFRESH = 200
MODES = ("step", "e2e")

#: ``torch.optim.AdamW(fused=True)``: timed beside the default (per-tensor loop on the CPU) AdamW that every ratio
#: divides by, so each table also shows how far the fastest torch AdamW is (about 3.4x faster at 60M on 2 cores).
FUSED_ADAMW = Spec("adamw(fused)", "torch", "fp32", FULL_RANK_LR, False,
                   lambda g, lr: torch.optim.AdamW([p for x in g for p in x["params"]], lr=lr, weight_decay=0.0,
                                                   fused=True),
                   {"weight_decay": 0.0, "fused": True}, default_lr(torch.optim.AdamW))


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    common.sync(device)
    t0 = time.perf_counter()
    opt.step()
    common.sync(device)
    return time.perf_counter() - t0


def _timed_steps(opt: torch.optim.Optimizer, n: int, device: torch.device,
                 baseline: torch.optim.Optimizer | None = None,
                 faults: list[int] | None = None) -> tuple[list[float], list[float]]:
    """``n`` step times of ``opt`` and, when given, of ``baseline`` stepped right after each one; appends the
    minor page faults of ``opt``'s steps to ``faults`` when given."""
    out, base = [], []
    for _ in range(n):
        f0 = _minor_faults()
        out.append(_timed_step(opt, device))
        if faults is not None:
            faults.append(_minor_faults() - f0)
        if baseline is not None:
            base.append(_timed_step(baseline, device))
    return out, base


def warmup_steps(opt: torch.optim.Optimizer) -> int:
    """Steps a method takes once at the start of training before its steady steps: GaLore+'s sparse residual
    scores every entry of the complement for its first ``residual_warmup`` steps (a full-size buffer and a formed
    complement each step) and then chooses its entries once for the whole run. The step-time benchmark times these
    apart (``warmup_median_step_s``) and starts the steady steps after them, since a period's amortized cost does not
    include them (10 of a run's thousands of steps)."""
    return max((int(g.get("residual_warmup", 0)) for g in opt.param_groups
                if g.get("residual") == "sparse" and g.get("residual_density", 0) > 0), default=0)


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
        warmup = [_timed_step(opt, device) for _ in range(warmup_steps(opt))]  # once per run, not per period
        faults: list[int] = []
        steady, paired = _timed_steps(opt, steps, device, baseline, faults)
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
                "refresh_step_s": refresh, "warmup_steps": len(warmup),
                "warmup_median_step_s": common.median(warmup) if warmup else None,
                "amortized_step_s": med if refresh is None else (med * (period - 1) + refresh) / period,
                "steps": steps, "refresh_steps": refresh_steps if refresh is not None else 0,
                "minor_faults_per_step": common.median(faults),
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
    if dev.type == "cpu":  # on CUDA the default AdamW is already a foreach / fused kernel
        at = todo.index(adamw) + 1
        todo = [*todo[:at], FUSED_ADAMW, *todo[at:]]  # a new list: ``specs`` may hand out a shared one
    baseline = None
    if dev.type == "cpu":  # paired steps (module docstring); its state lives for the whole run
        baseline = adamw.build(common.split_groups(params, rank, 10**9))
        _timed_step(baseline, dev)
    for spec in common.progress(todo, f"throughput {size}", total=len(todo)):
        rec: dict[str, Any] = {**spec.record(), "mode": "step", "malloc": malloc.regime(), "size": size,
                               "rank": rank if spec.lowrank else None, "update_proj_gap": T_REFRESH, "device": device}
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
    fused = next((r for r in records if r["label"] == FUSED_ADAMW.label and "median_ratio_to_adamw" in r), None)
    for r in records:  # both ratios divide by paired default-AdamW steps: their quotient compares with fused AdamW
        if fused is not None and "amortized_ratio_to_adamw" in r:
            r["amortized_ratio_to_fused_adamw"] = r["amortized_ratio_to_adamw"] / fused["median_ratio_to_adamw"]
    return records


class _Trainer:
    """One model, its optimizer and a fixed batch: ``step()`` is zero_grad + forward + backward + step."""

    def __init__(self, spec: Spec, cfg: DecoderConfig, rank: int, period: int, batch: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device) -> None:
        self.model = build_model(cfg, seed=0, device=device)
        self.opt = spec.build(common.split_groups(dict(self.model.named_parameters()), rank, period))
        self.tokens, self.targets = (t.to(device) for t in batch)
        self.device = device

    def step(self) -> float:
        common.sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model(self.tokens, self.targets).backward()
        self.opt.step()
        common.sync(self.device)
        return time.perf_counter() - t0


def _batch(cfg: DecoderConfig, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (batch_size, seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def time_e2e(spec: Spec, cfg: DecoderConfig, rank: int, steps: int, batch: tuple[torch.Tensor, torch.Tensor],
             device: torch.device, period: int = T_REFRESH, baseline: _Trainer | None = None) -> dict[str, Any]:
    """End-to-end step times of ``spec`` training the decoder ``cfg`` on ``batch``; with a ``baseline``
    trainer (torch AdamW), one of its steps after each steady step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = _Trainer(spec, cfg, rank, period, batch, device)
        first = trainer.step()
        warmup = [trainer.step() for _ in range(warmup_steps(trainer.opt))]  # once per run (GaLore+'s residual)
        steady, paired, faults = [], [], []
        for _ in range(steps):
            f0 = _minor_faults()
            steady.append(trainer.step())
            faults.append(_minor_faults() - f0)
            if baseline is not None:
                paired.append(baseline.step())
        rec: dict[str, Any] = {}
        if device.type == "cuda":
            rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        rec["state_bytes"] = count_state_bytes(trainer.opt)
    del trainer
    gc.collect()
    tokens = batch[0].numel()
    med = common.median(steady)
    amortized = (med * (period - 1) + first) / period if spec.lowrank else med
    rec.update({"tokens_per_step": tokens, "first_step_s": first, "median_step_s": med,
                "p95_step_s": common.quantile(steady, 0.95), "amortized_step_s": amortized,
                "tokens_per_s": tokens / med, "amortized_tokens_per_s": tokens / amortized, "steps": steps,
                "minor_faults_per_step": common.median(faults), "warmup_steps": len(warmup),
                "warmup_median_step_s": common.median(warmup) if warmup else None,
                "refresh_source": "first_step" if spec.lowrank else None})
    if paired:
        rec["paired_adamw_median_step_s"] = common.median(paired)
    return rec


def run_e2e(size: str = "60M", steps: int = 5, state_dtypes: tuple[str, ...] = ("fp32",), references: bool = False,
            only: list[str] | None = None, device: str = "cpu", rank: int = 128, batch_size: int = 4,
            seq_len: int = 128, cfg: DecoderConfig | None = None) -> list[dict[str, Any]]:
    """Tokens/s of full training steps for every spec; ratios to AdamW's (paired on the CPU) tokens/s."""
    dev = common.check_device(device)
    cfg = cfg or LLAMA_DECODERS[size]
    if seq_len > cfg.max_len:
        raise ValueError(f"Invalid seq_len: {seq_len} > the decoder's max_len {cfg.max_len}")
    batch = _batch(cfg, batch_size, seq_len)
    todo = specs(state_dtypes, references, only)
    adamw = next(s for s in todo if s.impl == "torch")
    baseline = None
    if dev.type == "cpu":
        baseline = _Trainer(adamw, cfg, rank, T_REFRESH, batch, dev)
        baseline.step()
    records = []
    for spec in common.progress(todo, f"end-to-end {size}", total=len(todo)):
        rec: dict[str, Any] = {**spec.record(), "mode": "e2e", "malloc": malloc.regime(), "size": size,
                               "decoder": cfg.asdict(), "batch_size": batch_size, "seq_len": seq_len,
                               "rank": rank if spec.lowrank else None, "update_proj_gap": T_REFRESH, "device": device}
        try:
            rec.update(time_e2e(spec, cfg, rank, steps, batch, dev, baseline=None if spec is adamw else baseline))
        except Exception as err:  # a failing reference is reported, not fatal
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        records.append(rec)
    base = next((r for r in records if r["impl"] == "torch" and "median_step_s" in r), None)
    for r in records:
        ref = r.get("paired_adamw_median_step_s") or (base or {}).get("median_step_s")
        if ref and "median_step_s" in r:
            r["adamw_tokens_per_s"] = r["tokens_per_step"] / ref
            r["tokens_per_s_ratio_to_adamw"] = r["tokens_per_s"] / r["adamw_tokens_per_s"]
            r["amortized_tokens_per_s_ratio_to_adamw"] = r["amortized_tokens_per_s"] / r["adamw_tokens_per_s"]
    return records


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Step-mode bars (amortized ms) and median ticks; the first regime present (the headline) only."""
    plt = common.pyplot()
    if plt is None:
        return
    recs = [r for r in records if "median_step_s" in r and r.get("mode", "step") == "step"]
    regimes = [g for g in dict.fromkeys(r.get("malloc") for r in recs)]
    recs = [r for r in recs if r.get("malloc") == regimes[0]] if regimes else recs
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(recs) + 4), 5))
    xs = range(len(recs))
    ax.bar(xs, [r["amortized_step_s"] * 1e3 for r in recs], label=f"amortized (refresh every {T_REFRESH})")
    ax.scatter(xs, [r["median_step_s"] * 1e3 for r in recs], color="k", marker="_", s=200, label="median step",
               zorder=3)
    ax.set_xticks(list(xs), [r["label"] for r in recs], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ms per optimizer step")
    ax.set_title(title + (f" (malloc: {regimes[0]})" if regimes and regimes[0] else ""))
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def _by_label(records: list[dict[str, Any]], mode: str) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    recs = [r for r in records if r.get("mode", "step") == mode]
    labels = list(dict.fromkeys(r["label"] for r in recs))
    regimes = list(dict.fromkeys(str(r.get("malloc")) for r in recs))
    return labels, regimes, {(r["label"], str(r.get("malloc"))): r for r in recs}


def summary(records: list[dict[str, Any]]) -> str:
    """Markdown: the step-time table (one column group per allocator regime, headline first), then the
    end-to-end tokens/s table when present."""
    parts = []
    labels, regimes, table = _by_label(records, "step")
    if labels:
        rows, cols = [], ["optimizer"]
        for g in regimes:
            cols += [f"median ms ({g})", f"refresh ms ({g})", f"amortized /AdamW ({g})",
                     f"range over runs ({g})", f"amortized /fused AdamW ({g})", f"paired AdamW ms ({g})",
                     f"faults/step ({g})"]
        for label in labels:
            row: dict[str, Any] = {"optimizer": label}
            for g in regimes:
                r = table.get((label, g), {})
                if "error" in r:
                    row["optimizer"] = f"{label} (error)"
                if "median_step_s" in r:
                    row[f"median ms ({g})"] = 1e3 * r["median_step_s"]
                    row[f"refresh ms ({g})"] = None if r["refresh_step_s"] is None else 1e3 * r["refresh_step_s"]
                    row[f"amortized /AdamW ({g})"] = r.get("amortized_ratio_to_adamw")
                    row[f"range over runs ({g})"] = repeats_mod.spread(r, "amortized_ratio_to_adamw")
                    row[f"amortized /fused AdamW ({g})"] = r.get("amortized_ratio_to_fused_adamw")
                    if "paired_adamw_median_step_s" in r:
                        row[f"paired AdamW ms ({g})"] = 1e3 * r["paired_adamw_median_step_s"]
                    row[f"faults/step ({g})"] = r.get("minor_faults_per_step")
                if "peak_memory_bytes" in r:
                    row[f"peak GiB ({g})"] = r["peak_memory_bytes"] / 2**30
            rows.append(row)
        cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
        cols += [f"peak GiB ({g})" for g in regimes if any(f"peak GiB ({g})" in r for r in rows)]
        parts.append(common.markdown_table(rows, cols))
    labels, regimes, table = _by_label(records, "e2e")
    if labels:
        rows, cols = [], ["optimizer (end-to-end)"]
        for g in regimes:
            cols += [f"tok/s ({g})", f"/AdamW ({g})", f"amortized /AdamW ({g})", f"step ms ({g})"]
        for label in labels:
            row = {"optimizer (end-to-end)": label}
            for g in regimes:
                r = table.get((label, g), {})
                if "error" in r:
                    row["optimizer (end-to-end)"] = f"{label} (error)"
                if "median_step_s" in r:
                    row.update({f"tok/s ({g})": r["tokens_per_s"],
                                f"/AdamW ({g})": r.get("tokens_per_s_ratio_to_adamw"),
                                f"amortized /AdamW ({g})": r.get("amortized_tokens_per_s_ratio_to_adamw"),
                                f"step ms ({g})": 1e3 * r["median_step_s"]})
            rows.append(row)
        parts.append(common.markdown_table(rows, cols))
    return "\n\n".join(parts)


def _child_argv(argv: Sequence[str], regime: str, records_path: Path) -> list[str]:
    """``argv`` without ``--regimes`` / ``--records-json`` / ``--repeats``, for one regime's child process."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--regimes", "--records-json", "--repeats"):
            skip = True
            continue
        if a.startswith(("--regimes=", "--records-json=", "--repeats=")):
            continue
        out.append(a)
    return [*out, "--regimes", regime, "--records-json", str(records_path)]


def run_regimes(argv: Sequence[str], regimes: Sequence[str], repeats: int = 1
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs this benchmark once per allocator regime, each in a fresh child process (glibc reads its tunables at
    start-up), ``repeats`` times over (regimes interleaved: warm, pinned, warm, pinned, ...); returns the records of
    all regimes (headline first; with ``repeats > 1`` combined over the runs, :func:`benchmarks.repeats.combine`)
    and each regime's first child's environment."""
    runs: dict[str, list[list[dict[str, Any]]]] = {regime: [] for regime in regimes}
    envs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for regime in regimes:
                path = Path(tmp) / f"{regime}{i}.json"
                env = malloc.warm_env() if regime == "warm" else malloc.cold_env()
                cmd = [sys.executable, "-m", "benchmarks.throughput", *_child_argv(argv, regime, path)]
                if regime == "dynamic":
                    cmd.append("--dynamic-malloc")
                subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
                payload = json.loads(path.read_text())
                if payload["environment"]["malloc_regime"] != regime:
                    raise RuntimeError(f"child process for malloc regime {regime!r} ran in "
                                       f"{payload['environment']['malloc_regime']!r}")
                runs[regime].append(payload["records"])
                envs.setdefault(regime, payload["environment"])
    records: list[dict[str, Any]] = []
    for regime in regimes:
        records += repeats_mod.combine(runs[regime])
    return records, envs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = common.parser(__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="LLaMA size (default 60M on CPU, 1B on CUDA; 'tiny' for tests)")
    ap.add_argument("--steps", type=int, default=None, help="timed steady steps")
    ap.add_argument("--mode", default="all", choices=(*MODES, "all"), help="optimizer step, end-to-end, or both")
    ap.add_argument("--regimes", default=None,
                    help="comma-separated malloc regimes, each in its own process: warm, pinned, dynamic "
                         f"(default on CPU: {','.join(malloc.REGIMES)}; on CUDA: this process)")
    ap.add_argument("--batch-size", type=int, default=None, help="end-to-end batch size (default 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="end-to-end sequence length (default 128)")
    ap.add_argument("--stores", default=None, help="comma-separated state stores (default fp32,bf16,8bit; quick fp32)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="child processes per allocator regime; numbers are the median over them, ratios with their "
                         "range (benchmarks/repeats.py; default 1)")
    ap.add_argument("--records-json", type=Path, default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    default_regimes = ["dynamic"] if args.dynamic_malloc else list(malloc.REGIMES)
    regimes = common.only_list(args.regimes) or (default_regimes if args.device == "cpu" else [])
    bad = [g for g in regimes if g not in ("warm", "pinned", "dynamic")]
    if bad:
        raise SystemExit(f"--regimes: unknown regime(s) {bad}")
    size = args.size or ("1B" if args.device == "cuda" else "60M")
    quick_e2e = args.quick and args.size is None
    rank = {"tiny": 16, "60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}[size]
    steps = args.steps or (3 if args.quick else 20)
    e2e_steps = args.steps or (2 if args.quick else 5)
    refresh_steps = 0 if args.quick else 3
    stores = tuple(common.only_list(args.stores) or (("fp32",) if args.quick else ("fp32", "bf16", "8bit")))
    modes = MODES if args.mode == "all" else (args.mode,)
    e2e_size = "quick" if quick_e2e else size
    batch_size = args.batch_size or (2 if args.quick else 4)
    seq_len = args.seq_len or (64 if args.quick or size == "tiny" else 128)
    shapes = llama_shapes(n_layers=1, d_model=64, d_ffn=160, vocab=96) if size == "tiny" else None
    config = {"size": size, "shape": LLAMA_CONFIGS.get(size), "rank": rank, "steps": steps,
              "refresh_steps": refresh_steps, "update_proj_gap": T_REFRESH, "state_dtypes": list(stores),
              "gradients": "synthetic, seeded, set once", "modes": list(modes), "malloc_regimes": regimes,
              "repeats": args.repeats,
              "e2e": {"decoder": e2e_size, "config": LLAMA_DECODERS[e2e_size].asdict(), "batch_size": batch_size,
                      "seq_len": seq_len, "steps": e2e_steps, "state_dtypes": ["fp32"],
                      "batch": "seeded random tokens, fixed", "refresh": "first step stands in"}}
    if args.repeats < 1:
        raise SystemExit(f"--repeats: need a count of at least 1, got {args.repeats}")
    if args.repeats > 1 and not regimes:
        raise SystemExit("--repeats: repeats run child processes, one per allocator regime: give --regimes")
    if len(regimes) > 1 or (regimes and args.records_json is None):
        records, envs = run_regimes(raw, regimes, args.repeats)
        common.publish(args, "throughput", args.device, config, records, records, plot, summary,
                       f"Optimizer step time, LLaMA-{size} shapes, {args.device}", regime_environments=envs)
        return records
    common.setup(args)
    if regimes and malloc.regime() != regimes[0]:
        raise SystemExit(f"--regimes {regimes[0]}: this process runs in {malloc.regime()!r} "
                         "(the warm heap needs GLIBC_TUNABLES at start-up: run without --records-json)")
    records = []
    if "step" in modes:
        records += run(size, steps, refresh_steps, stores, not args.no_references, common.only_list(args.only),
                       args.device, rank, shapes=shapes)
    if "e2e" in modes:
        records += run_e2e(e2e_size, e2e_steps, ("fp32",), False, common.only_list(args.only), args.device, rank,
                           batch_size, seq_len)
    if args.records_json is not None:
        args.records_json.write_text(json.dumps({"environment": common.environment(args.device), "records": records},
                                                default=str))
        return records
    common.publish(args, "throughput", args.device, config, records, records, plot, summary,
                   f"Optimizer step time, LLaMA-{size} shapes, {args.device}")
    return records


if __name__ == "__main__":
    main()
