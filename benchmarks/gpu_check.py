"""GPU check: every preset x state store on CUDA, no host sync in steady steps, CPU vs CUDA, LLaMA-1B speed.

``python -m benchmarks.gpu_check`` (one GPU, under 8 minutes on one H200) runs its parts (``--parts``; ``refresh``
times each refresh decomposition at 1B shapes and ``profile`` breaks one steady step per preset down by kernel, as
their functions say) and writes ``benchmarks/results/cuda/gpu_check.json`` (or ``--out DIR``):

0. **codecs**: the fused (``torch.compile``d) stochastic-rounding codecs of the bf16 / 8-bit stores write the eager
   codecs' bits on CUDA (:func:`check_codecs`); after every part the JSON records whether they are still on
   (``fused_codecs``: a compile or run error turns them off for the process) and how many calls they served.
1. **matrix**: every registered optimizer x state store (``fp32``, ``bf16``, ``8bit``) for a few steps on small
   LLaMA-style shapes. The first step (state allocation, initial subspace) runs normally; then ``steady_steps``
   steps without a refresh run under ``torch.cuda.set_sync_debug_mode("error")`` with ``nonfinite="ignore"``
   (any host read of a device value raises), and the same steps with the default ``nonfinite="skip"`` run
   under ``"warn"``, counting the host syncs per step (the non-finite check's one read is allowed).
2. **trajectories**: each optimizer (``fp32``) trained for ``trajectory_steps`` steps (refreshes included) from
   the same weights on the same seeded gradients on the CPU and on CUDA; the largest relative difference of
   the final weights, ``max |w_cpu - w_cuda| / max |w_cpu|``, must stay under ``tolerance`` or under
   4x what a 1e-6 relative perturbation of the gradients does on the CPU alone (:func:`check_trajectories`).
3. **speed**: end-to-end training steps (forward in bf16 autocast, backward, optimizer step) of the benchmark
   decoder at LLaMA-1B shapes (24 layers, width 2048, SwiGLU 5461, vocabulary 32000, fp32 master weights):
   step time, ``opt.step()`` time alone, first-step time (the initial subspace), tokens/s and peak memory
   (``torch.cuda.max_memory_allocated``) for torch ``AdamW(fused=True)``, bitsandbytes ``AdamW8bit`` (when
   installed), ``GaLoreAdamW`` in ``fp32`` and ``8bit`` stores, ``GaLoreAdamW`` with TF32 matmuls
   (``torch.set_float32_matmul_precision("high")`` for that case: the projection and lift follow torch's global
   fp32 matmul precision) and every other preset in ``fp32``, rank 512 (GaLore's 1B setting), each preset at its
   own default refresh period. GaLore+'s one-off residual warm-up (its first ``residual_warmup`` steps) is timed
   apart (``warmup_median_step_s``) before the timed steps.

All parts share one wall-clock budget (``--budget-s``, default 420 s): a case that would start after it is spent
is recorded as ``"skipped: time budget"``, and the JSON is rewritten after every case, so a run stopped from
outside keeps what it measured. The speed part runs GaLore right after the baselines and the presets whose first
step takes an SVD of every 1B matrix last (``SPEED_ORDER``).

Anchor (GaLore paper, arXiv:2403.03507, LLaMA-1B, one GPU): 8-bit GaLore 1109 tokens/s and 7.95 GB against
AdamW 1257 tokens/s and 13.60 GB. Their setting (bf16 weights, layer-wise updates, batch and sequence of
the paper's script) differs from ours (fp32 master weights, whole-model step): compare ratios, not values.

Without bitsandbytes (the device machine lacks it unless its wheel travels), every ``8bit`` case and the
AdamW8bit reference are reported as skipped, and everything else runs. To carry it (from the repository root,
where ``.git/info/exclude`` ignores ``/.whl/``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2

then, with the device tool: ``run(carry=[".whl"], timeout_s=540, command="python3 -m pip install -q --no-index
--no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site ||
exit; PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT")`` and commit the JSON that comes back
under ``benchmarks/results/cuda/``.

``--device cpu --tiny`` runs the same code paths on the CPU with tiny shapes in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.memory import count_state_bytes, llama_shapes
from lowrank_optim.projectors.random import RandomProjector

from . import common, throughput
from .model import LLAMA_DECODERS, DecoderConfig, build_model
from .registry import STATE_DTYPES, Spec, specs

#: GaLore paper (arXiv:2403.03507), LLaMA-1B on one GPU: tokens/s and memory (GB) of 8-bit GaLore and AdamW.
PAPER_ANCHOR = {"source": "GaLore paper (arXiv:2403.03507), LLaMA-1B",
                "galore_8bit": {"tokens_per_s": 1109, "memory_GB": 7.95},
                "adamw": {"tokens_per_s": 1257, "memory_GB": 13.60}}
RESULTS = common.RESULTS_DIR / "cuda"


def _have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


@contextlib.contextmanager
def _sync_debug(device: torch.device, mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block on CUDA; nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _params(shapes: dict[str, tuple[int, ...]], device: torch.device, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    return common.synthetic_params(shapes, device, seed=seed)


def _draw_grads(params: dict[str, torch.nn.Parameter], step: int) -> dict[str, torch.Tensor]:
    """Seeded gradients for ``step``, drawn on the CPU (same values on every device), moved to each parameter.

    The move is a host-to-device copy, which ``set_sync_debug_mode`` counts as a synchronization: the steady steps
    draw their gradients before entering the sync-debug block and only assign them inside it."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype) for n, p in params.items()}


def _set_grads(params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.grad = grads[n]


def _new_grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    _set_grads(params, _draw_grads(params, step))


class Budget:
    """A wall-clock budget shared by the parts, and the partial result written after every record.

    Args:
        seconds: the budget (``inf``: none). A case that would start after it is spent is recorded as
            ``"skipped: time budget"``, so one slow case cannot cost the rest of a device lease.
        save: called after every record (writes the partial JSON), or None.
    """

    def __init__(self, seconds: float = float("inf"), save: Any = None) -> None:
        self.deadline = time.perf_counter() + seconds
        self.save = save

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def spent(self, need: float = 0.0) -> bool:
        """Whether less than ``need`` seconds are left."""
        return self.left() < need

    def done(self, records: list[dict[str, Any]], rec: dict[str, Any]) -> None:
        records.append(rec)
        print(f"  {rec.get('label')}: {rec.get('status')} {rec.get('error', '')}"[:300], flush=True)
        if self.save is not None:
            self.save()


def check_matrix(device: torch.device, shapes: dict[str, tuple[int, ...]], rank: int, steady_steps: int,
                 stores: tuple[str, ...] = STATE_DTYPES, only: list[str] | None = None,
                 budget: Budget | None = None, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every preset x store: a first step, then steady steps under sync-debug ``error`` (``nonfinite="ignore"``)
    and ``warn`` (default ``nonfinite``, syncs counted). Records ``ok``, ``skipped`` or ``error``."""
    bnb = _have_bnb()
    budget = budget or Budget()
    records = [] if records is None else records
    for spec in specs(stores, references=False, only=only):
        if spec.impl != "lowrank_optim":
            continue
        rec: dict[str, Any] = {"label": spec.label, "optimizer": spec.optimizer, "state_dtype": spec.state_dtype}
        if budget.spent():
            rec["status"] = "skipped: time budget"
            budget.done(records, rec)
            continue
        if spec.state_dtype == "8bit" and not bnb:
            rec["status"] = "skipped: bitsandbytes is not installed"
            budget.done(records, rec)
            continue
        try:
            for nonfinite, mode in (("ignore", "error"), ("skip", "warn")):
                params = _params(shapes, device)
                opt = spec.build(common.split_groups(params, rank, 10**6))
                for g in opt.param_groups:
                    g["nonfinite"] = nonfinite
                _new_grads(params, 0)
                opt.step()  # allocation + initial subspace: host reads allowed
                grads = [_draw_grads(params, i + 1) for i in range(steady_steps)]
                common.sync(device)
                with warnings.catch_warnings(record=True) as caught, _sync_debug(device, mode):
                    warnings.simplefilter("always")
                    for g in grads:
                        _set_grads(params, g)
                        opt.step()
                common.sync(device)
                said = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}"[:300] for w in caught
                        if "synchroniz" in str(w.message).lower()]
                rec[f"syncs_per_step_nonfinite_{nonfinite}"] = len(said) / steady_steps
                if said and nonfinite == "ignore":  # what raised no error but spoke of a synchronization
                    rec["sync_messages_nonfinite_ignore"] = sorted(set(said))
                if not all(torch.isfinite(p).all() for p in params.values()):
                    raise FloatingPointError("non-finite weights after the steady steps")
                rec["state_bytes"] = count_state_bytes(opt)
                del opt, params
            rec["status"] = "ok"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        budget.done(records, rec)
        gc.collect()
    return records


def _cpu_draws(opt: torch.optim.Optimizer) -> None:
    """Seeded random projectors (Flora, APOLLO) draw on the CPU (``generator="cpu"``): by default they draw on the
    parameter's device, whose stream differs between CPU and CUDA, so the two trajectories would use other bases."""
    for group in opt.param_groups:
        if group.get("rank") is None or not hasattr(opt, "_parts"):
            continue
        projector = opt._parts(group).projector  # builds (and caches) the group's projector before any step
        if isinstance(projector, RandomProjector):
            projector.generator = "cpu"


#: Relative size of the gradient perturbation whose effect measures a trajectory's sensitivity to rounding.
PERTURBATION = 1e-6
#: A CPU-vs-CUDA difference within this many times the rounding sensitivity is rounding, not a fault.
SENSITIVITY_FACTOR = 4.0


def _trajectory(spec: Spec, shapes: dict[str, tuple[int, ...]], rank: int, steps: int, period: int,
                device: torch.device, perturb: float = 0.0) -> dict[str, torch.Tensor]:
    """Final weights after ``steps`` steps on the seeded gradients, each multiplied elementwise by
    ``1 + perturb * z`` (``z`` standard normal from its own seeded stream) when ``perturb`` is nonzero."""
    params = _params(shapes, device)
    opt = spec.build(common.split_groups(params, rank, period))
    _cpu_draws(opt)
    for i in range(steps):
        grads = _draw_grads(params, i)
        if perturb:
            gen = torch.Generator().manual_seed(7 + i)
            grads = {n: g * (1 + perturb * torch.randn(g.shape, generator=gen)).to(g.device)
                     for n, g in grads.items()}
        _set_grads(params, grads)
        opt.step()
    return {n: p.detach().to("cpu", torch.float32) for n, p in params.items()}


def check_trajectories(device: torch.device, shapes: dict[str, tuple[int, ...]], rank: int, steps: int,
                       period: int, tolerance: float, only: list[str] | None = None, budget: Budget | None = None,
                       records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each optimizer (fp32 store) on the CPU and on ``device``, same weights and gradients: final weights'
    largest difference relative to the largest CPU weight, per optimizer.

    Two correct implementations differ by rounding, and how far rounding moves a trajectory is the problem's own
    property: an SVD's trailing kept vectors are determined only to ``eps * sigma_1 / gap``, and Adam's first
    steps act like ``sign`` on coordinates near zero. On Gaussian gradients, multiplying them by
    ``1 + 1e-6 z`` moves GaLore's, Fira's, COAP's and OSD's final weights by ~5e-3 on the CPU alone. So each
    optimizer's CPU trajectory is also run with that perturbation (:data:`PERTURBATION`), and the device
    difference is ``ok`` when it is under ``max(tolerance, SENSITIVITY_FACTOR * sensitivity)`` (both recorded):
    a fault (a wrong basis, a lost moment) moves weights by O(1) relative, far above either."""
    budget = budget or Budget()
    records = [] if records is None else records
    cpu = torch.device("cpu")
    for spec in specs(("fp32",), references=False, only=only):
        if spec.impl != "lowrank_optim":
            continue
        rec: dict[str, Any] = {"label": spec.label, "steps": steps, "update_proj_gap": period}
        if budget.spent():
            rec["status"] = "skipped: time budget"
            budget.done(records, rec)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = _trajectory(spec, shapes, rank, steps, period, cpu)
                b = _trajectory(spec, shapes, rank, steps, period, device)
                c = _trajectory(spec, shapes, rank, steps, period, cpu, perturb=PERTURBATION)
            scale = max(float(a[n].abs().max()) for n in a)
            rec["max_rel_diff"] = max(float((a[n] - b[n]).abs().max()) for n in a) / scale
            rec["rounding_sensitivity"] = max(float((a[n] - c[n]).abs().max()) for n in a) / scale
            rec["bound"] = max(tolerance, SENSITIVITY_FACTOR * rec["rounding_sensitivity"])
            rec["status"] = "ok" if rec["max_rel_diff"] <= rec["bound"] else "mismatch"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        budget.done(records, rec)
    return records


#: The speed part's order after the baselines: GaLore first (the paper's anchor), then the presets whose first
#: step needs no SVD of every matrix, then the rest. A case starts only while the budget lasts.
SPEED_ORDER = ("galore_adamw", "flora", "apollo_mini", "apollo", "online_subspace_descent", "dct_adamw", "fira",
               "frugal", "coap", "galore_adafactor", "gum", "galore_plus")


def _speed_specs(stores_8bit: bool) -> list[tuple[str, Spec | None, dict[str, Any]]]:
    """(label, spec or None for fused AdamW, extra) of the speed part."""
    out: list[tuple[str, Spec | None, dict[str, Any]]] = [("torch:adamw(fused)", None, {})]
    refs = {s.label: s for s in specs(("fp32",), references=True)}
    if stores_8bit and "bitsandbytes:adamw8bit" in refs:
        out.append(("bitsandbytes:adamw8bit", refs["bitsandbytes:adamw8bit"], {}))
    ours = [s for s in specs(("fp32", "8bit") if stores_8bit else ("fp32",), references=False)
            if s.impl == "lowrank_optim" and (s.state_dtype == "fp32" or s.optimizer == "galore_adamw")]
    rank = {name: i for i, name in enumerate(SPEED_ORDER)}
    ours.sort(key=lambda s: (rank.get(s.optimizer, len(rank)), s.optimizer, s.state_dtype != "fp32"))
    out.extend((s.label, s, {}) for s in ours)
    galore = next((i for i, t in enumerate(out) if t[0] == "galore_adamw[fp32]"), None)
    if galore is not None:  # TF32 projection and lift: torch's global fp32 matmul precision, which the step follows
        out.insert(galore + 1, ("galore_adamw[fp32,tf32]", out[galore][1], {"matmul_precision": "high"}))
    return out


def check_speed(device: torch.device, cfg: DecoderConfig, rank: int, steps: int, batch_size: int, seq_len: int,
                only: list[str] | None = None, budget: Budget | None = None,
                records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """End-to-end training steps of the decoder ``cfg``: median step time (and of ``opt.step()`` alone), tokens/s,
    peak memory per optimizer, each preset at its own default refresh period. A case starts only while the budget
    lasts (presets whose first step needs an SVD of every matrix come last: ``SPEED_ORDER``)."""
    bnb = _have_bnb()
    budget = budget or Budget()
    records = [] if records is None else records
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (batch_size, seq_len + 1), generator=gen).to(device)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    todo = _speed_specs(bnb)
    if only:
        todo = [t for t in todo if t[1] is None or set(only) & {t[1].optimizer, t[1].label, t[1].impl}]
    if not bnb:
        budget.done(records, {"label": "bitsandbytes:adamw8bit", "status": "skipped: bitsandbytes is not installed"})
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    for label, spec, extra in todo:
        rec: dict[str, Any] = {"label": label, "rank": rank if spec is not None and spec.lowrank else None}
        if budget.spent():
            rec["status"] = "skipped: time budget"
            budget.done(records, rec)
            continue
        model = opt = groups = loss = None
        started = time.perf_counter()
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(extra.get("matmul_precision", precision))
        try:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                rec["memory_before_bytes"] = torch.cuda.memory_allocated()  # the previous case must have left 0
            model = build_model(cfg, seed=0, device=device)
            groups = common.split_groups(dict(model.named_parameters()), rank, 200)
            groups[1].pop("update_proj_gap")  # each preset at its own default refresh period
            if spec is None:
                opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0,
                                        fused=device.type == "cuda")
            else:
                opt = spec.build(groups)
            times, step_times = [], []
            warm = throughput.warmup_steps(opt)  # GaLore+'s one-off residual warm-up: timed apart
            for _ in range(steps + 1 + warm):
                common.sync(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = model(tokens, targets)
                loss.backward()
                common.sync(device)
                t1 = time.perf_counter()
                opt.step()
                common.sync(device)
                times.append(time.perf_counter() - t0)
                step_times.append(time.perf_counter() - t1)
            med = common.median(times[1 + warm:])
            rec.update({"status": "ok", "first_step_s": times[0], "median_step_s": med,
                        "median_optimizer_step_s": common.median(step_times[1 + warm:]),
                        "warmup_steps": warm,
                        "warmup_median_step_s": common.median(times[1:1 + warm]) if warm else None,
                        "matmul_precision": torch.get_float32_matmul_precision(),
                        "tokens_per_s": tokens.numel() / med, "state_bytes": count_state_bytes(opt),
                        "final_loss": float(loss.detach())})
            if device.type == "cuda":
                rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        finally:
            torch.set_float32_matmul_precision(precision)
        del model, opt, groups, loss  # nothing of this case may count in the next one's peak
        rec["case_s"] = time.perf_counter() - started
        budget.done(records, rec)
    base = next((r for r in records if r["label"] == "torch:adamw(fused)" and r.get("status") == "ok"), None)
    for r in records:
        if base is not None and r.get("status") == "ok":
            r["tokens_per_s_ratio_to_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["optimizer_step_ratio_to_adamw"] = r["median_optimizer_step_s"] / base["median_optimizer_step_s"]
            if "peak_memory_bytes" in r:
                r["peak_memory_ratio_to_adamw"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    return records


def _timed(fn: Any, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (device synchronised around each)."""
    fn()
    times = []
    for _ in range(reps):
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return common.median(times)


def _decompositions(g: torch.Tensor, rank: int) -> dict[str, Any]:
    """The ways of getting ``g``'s top-``rank`` left subspace that the refresh part times (name -> callable)."""
    from lowrank_optim.projectors import make_projector

    ways: dict[str, Any] = {"linalg.svd": lambda: torch.linalg.svd(g, full_matrices=False)}
    if g.device.type == "cuda":
        for driver in ("gesvd", "gesvdj", "gesvda"):
            ways[f"linalg.svd[{driver}]"] = (lambda d: lambda: torch.linalg.svd(g, full_matrices=False, driver=d))(
                driver)
    ways["eigh(G G^T) fp32"] = lambda: torch.linalg.eigh(g @ g.T)
    ways["eigh(G G^T) fp64"] = lambda: torch.linalg.eigh((g @ g.T).double())
    for label, name, opts in (("svd.init", "svd", {}), ("svd.init[solver=svd]", "svd", {"solver": "svd"}),
                              ("svd.init[solver=gram]", "svd", {"solver": "gram"}), ("rsvd.init", "rsvd", {})):
        proj = make_projector(name, rank, side="left", **opts)
        ways[f"projector {label}"] = (lambda pr: lambda: pr.init(g, seed=0))(proj)
    return ways


def check_refresh(device: torch.device, shapes: list[tuple[int, int]], rank: int, reps: int,
                  budget: Budget | None = None, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Seconds per matrix of each decomposition a refresh could use, at the given shapes (LLaMA-1B's), and a
    stack of 4 same-shape matrices through one batched ``linalg.svd``: what a GaLore refresh costs on this device,
    and which driver or method would make it cheaper. Records ``{"label", "shape", "seconds"}`` or an error."""
    budget = budget or Budget()
    records = [] if records is None else records
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        g = torch.randn(shape, generator=gen).to(device)
        ways = _decompositions(g, rank)
        stack = g.unsqueeze(0).repeat(4, 1, 1)
        ways["linalg.svd, stack of 4 (per matrix)"] = lambda st=stack: torch.linalg.svd(st, full_matrices=False)
        for label, fn in ways.items():
            rec: dict[str, Any] = {"label": label, "shape": list(shape), "rank": rank}
            if budget.spent():
                rec["status"] = "skipped: time budget"
            else:
                try:
                    sec = _timed(fn, device, reps)
                    rec.update({"status": "ok", "seconds": sec / (4 if "stack of 4" in label else 1)})
                except Exception as err:
                    rec.update({"status": "error", "error": f"{type(err).__name__}: {err}"[:300]})
            budget.done(records, rec)
        del g, stack
    return records


def _op_time(event: Any, cuda: bool) -> float:
    """Microseconds of an averaged profiler event: its kernels' device time on CUDA, its CPU time otherwise."""
    if not cuda:
        return float(event.cpu_time_total)
    return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0) or 0.0)


#: Presets whose steady step the profile part breaks down by kernel (GaLore in both stores: the paper's anchor).
PROFILE_CASES = (("galore_adamw", "fp32"), ("galore_adamw", "8bit"), ("fira", "fp32"), ("flora", "fp32"),
                 ("apollo_mini", "fp32"), ("dct_adamw", "fp32"), ("online_subspace_descent", "fp32"),
                 ("gum", "fp32"), ("galore_plus", "fp32"))


def check_profile(device: torch.device, shapes: dict[str, tuple[int, ...]], rank: int, top: int = 12,
                  only: list[str] | None = None, budget: Budget | None = None,
                  records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One steady ``opt.step()`` per case (after the first step and two warm steps) under ``torch.profiler``: wall
    time, the device time summed over kernels, kernel launches, and the ``top`` ops by device time. Torch
    ``AdamW(fused=True)`` on the same parameters first. GaLoreAdamW also with TF32 matmuls allowed
    (``torch.backends.cuda.matmul.allow_tf32``), to show what the fp32 projection GEMMs cost."""
    from torch.profiler import ProfilerActivity, profile

    budget = budget or Budget()
    records = [] if records is None else records
    bnb = _have_bnb()
    chosen = {(s.optimizer, s.state_dtype): s for s in specs(("fp32", "8bit") if bnb else ("fp32",),
                                                               references=False, only=only)}
    cases: list[tuple[str, Spec | None, bool]] = [("torch:adamw(fused)", None, False)]
    for name, store in PROFILE_CASES:
        if (name, store) in chosen:
            cases.append((chosen[name, store].label, chosen[name, store], False))
    if ("galore_adamw", "fp32") in chosen:
        cases.append(("galore_adamw[fp32] tf32", chosen["galore_adamw", "fp32"], True))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, spec, tf32 in cases:
        rec: dict[str, Any] = {"label": label, "rank": rank}
        if budget.spent():
            rec["status"] = "skipped: time budget"
            budget.done(records, rec)
            continue
        params = opt = None
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            params = _params(shapes, device)
            if spec is None:
                opt = torch.optim.AdamW(params.values(), lr=1e-3, fused=device.type == "cuda")
            else:
                opt = spec.build(common.split_groups(params, rank, 10**6))
            grads = _draw_grads(params, 0)
            _set_grads(params, grads)
            opt.step()  # allocation + initial subspace
            for _ in range(2):
                opt.step()
            common.sync(device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                opt.step()
                common.sync(device)
            rec["wall_s"] = time.perf_counter() - t0
            events = prof.key_averages()
            kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
            rec["kernels"] = len(kernels)
            rec["device_time_s"] = sum(k.time_range.elapsed_us() for k in kernels) * 1e-6 if kernels else None
            aten = sorted((e for e in events if e.key.startswith("aten::")),
                          key=functools.partial(_op_time, cuda=device.type == "cuda"), reverse=True)
            rec["top_ops"] = [{"op": e.key, "calls": e.count,
                               "device_ms": _op_time(e, cuda=device.type == "cuda") / 1e3,
                               "cpu_ms": float(e.cpu_time_total) / 1e3} for e in aten[:top]]
            rec["status"] = "ok"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        del params, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        budget.done(records, rec)
    return records


def check_codecs(device: torch.device, budget: Budget | None = None,
                 records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The fused (``torch.compile``d) stochastic-rounding codecs write the eager path's bits on ``device``
    (:func:`lowrank_optim.fused_codecs.check_against_eager`: every 8-bit code, ``absmax`` and bf16 bit against the
    eager codec on the device and on the CPU). Off CUDA the fused tails do not run: recorded as skipped."""
    from lowrank_optim import fused_codecs

    budget = budget or Budget()
    records = [] if records is None else records
    rec: dict[str, Any] = {"label": "fused codecs == eager"}
    if budget.spent():
        rec["status"] = "skipped: time budget"
    elif device.type not in fused_codecs.DEVICES:
        rec["status"] = f"skipped: the fused codecs run on {sorted(fused_codecs.DEVICES)} only"
    else:
        started = time.perf_counter()
        try:
            rec.update(fused_codecs.check_against_eager(device))
            rec["status"] = "ok"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        rec["seconds"] = time.perf_counter() - started
    budget.done(records, rec)
    return records


def _codec_state() -> dict[str, Any]:
    """Whether the fused codecs are still on (a compile or run error turns them off for the process) and how many
    codec calls they served so far."""
    from lowrank_optim import fused_codecs

    return {"enabled": fused_codecs.ENABLED, "broken": fused_codecs.BROKEN, "calls": fused_codecs.CALLS}


#: Shapes of each part: ``full`` for the GPU (under 8 minutes on one H200), ``tiny`` for the CPU test.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"matrix_shapes": llama_shapes(n_layers=2, d_model=256, d_ffn=688, vocab=1024), "rank": 64,
             "steady_steps": 3, "trajectory_steps": 12, "period": 5, "tolerance": 1e-3,
             "speed_decoder": "1B", "speed_rank": 512, "speed_steps": 5, "batch_size": 4, "seq_len": 256,
             "refresh_shapes": [(2048, 2048), (2048, 5461)], "refresh_reps": 2,
             "profile_shapes": llama_shapes(n_layers=4, d_model=2048, d_ffn=5461, vocab=32000)},
    "tiny": {"matrix_shapes": llama_shapes(n_layers=1, d_model=32, d_ffn=48, vocab=64), "rank": 8,
             "steady_steps": 2, "trajectory_steps": 4, "period": 2, "tolerance": 1e-3,
             "speed_decoder": "tiny", "speed_rank": 8, "speed_steps": 2, "batch_size": 2, "seq_len": 16,
             "refresh_shapes": [(24, 40)], "refresh_reps": 1,
             "profile_shapes": llama_shapes(n_layers=1, d_model=32, d_ffn=48, vocab=64)},
}


def run(device: str = "cuda", tiny: bool = False, only: list[str] | None = None,
        parts: tuple[str, ...] = ("codecs", "matrix", "trajectories", "refresh", "profile", "speed"),
        budget_s: float = float("inf"),
        out_path: Path | None = None) -> dict[str, Any]:
    """Runs the requested parts (``only``: these optimizers' names or labels; the AdamW baselines always run);
    returns ``{"config", "bitsandbytes", "matrix", "trajectories", "speed", "anchor", "seconds"}``.

    Args:
        budget_s: wall-clock seconds for all parts; cases that would start later are recorded as skipped.
        out_path: where the JSON goes; written after every record too, so a run stopped from outside (a lease's
            time limit) still leaves everything it measured.
    """
    dev = common.check_device(device)
    cfg = SETTINGS["tiny" if tiny else "full"]
    out: dict[str, Any] = {"config": {k: v for k, v in cfg.items() if not k.endswith("_shapes") or
                                      k == "refresh_shapes"},
                           "bitsandbytes": _have_bnb(), "anchor": PAPER_ANCHOR, "budget_s": budget_s}
    env = common.environment(device)
    t0 = time.perf_counter()

    def save() -> None:
        out["seconds"] = time.perf_counter() - t0
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"benchmark": "gpu_check", "environment": env, **out}, indent=1,
                                      default=str) + "\n")
            tmp.replace(out_path)

    budget = Budget(budget_s, save)

    def codecs_after(part: str) -> None:
        out.setdefault("fused_codecs", {})[f"after_{part}"] = _codec_state()

    if "codecs" in parts:
        print("codecs:", flush=True)
        check_codecs(dev, budget=budget, records=out.setdefault("codecs", []))
        codecs_after("codecs")
    if "matrix" in parts:
        print("matrix:", flush=True)
        check_matrix(dev, cfg["matrix_shapes"], cfg["rank"], cfg["steady_steps"], only=only, budget=budget,
                     records=out.setdefault("matrix", []))
        codecs_after("matrix")
    if "trajectories" in parts:
        print("trajectories:", flush=True)
        check_trajectories(dev, cfg["matrix_shapes"], cfg["rank"], cfg["trajectory_steps"], cfg["period"],
                           cfg["tolerance"], only, budget=budget, records=out.setdefault("trajectories", []))
        codecs_after("trajectories")
    if "refresh" in parts:
        print("refresh:", flush=True)
        check_refresh(dev, cfg["refresh_shapes"], cfg["speed_rank"], cfg["refresh_reps"], budget=budget,
                      records=out.setdefault("refresh", []))
    if "profile" in parts:
        print("profile:", flush=True)
        check_profile(dev, cfg["profile_shapes"], cfg["speed_rank"], only=only, budget=budget,
                      records=out.setdefault("profile", []))
        codecs_after("profile")
    if "speed" in parts:
        decoder = LLAMA_DECODERS[cfg["speed_decoder"]]
        out["config"]["speed_decoder_config"] = decoder.asdict()
        print("speed:", flush=True)
        check_speed(dev, decoder, cfg["speed_rank"], cfg["speed_steps"], cfg["batch_size"], cfg["seq_len"], only,
                    budget=budget, records=out.setdefault("speed", []))
        codecs_after("speed")
    save()
    return out


def summary(result: dict[str, Any]) -> str:
    """Markdown: failures of the matrix and trajectories, then the speed table with the paper's anchor."""
    lines = []
    for part in ("matrix", "trajectories"):
        recs = result.get(part, [])
        bad = [r for r in recs if r.get("status") not in ("ok",) and not str(r.get("status")).startswith("skipped")]
        skipped = [r for r in recs if str(r.get("status")).startswith("skipped")]
        lines.append(f"{part}: {len(recs) - len(bad) - len(skipped)} ok, {len(skipped)} skipped, {len(bad)} failed"
                     + "".join(f"\n  - {r['label']}: {r.get('error', r.get('status'))}" for r in bad))
    if result.get("speed"):
        rows = [{"optimizer": r["label"], "step ms": 1e3 * r["median_step_s"] if "median_step_s" in r else None,
                 "opt.step ms": 1e3 * r["median_optimizer_step_s"] if "median_optimizer_step_s" in r else None,
                 "opt.step /AdamW": r.get("optimizer_step_ratio_to_adamw"),
                 "first step s": r.get("first_step_s"),
                 "tok/s": r.get("tokens_per_s"), "tok/s /AdamW": r.get("tokens_per_s_ratio_to_adamw"),
                 "peak GB": r["peak_memory_bytes"] / 1e9 if "peak_memory_bytes" in r else None,
                 "status": r.get("status")} for r in result["speed"]]
        lines.append(common.markdown_table(rows, ["optimizer", "step ms", "opt.step ms", "opt.step /AdamW",
                                                  "first step s", "tok/s", "tok/s /AdamW", "peak GB", "status"]))
        g8, adamw = PAPER_ANCHOR["galore_8bit"], PAPER_ANCHOR["adamw"]
        lines.append(f"anchor, {PAPER_ANCHOR['source']}: 8-bit GaLore {g8['tokens_per_s']} tok/s and "
                     f"{g8['memory_GB']} GB vs AdamW {adamw['tokens_per_s']} tok/s and {adamw['memory_GB']} GB "
                     f"(ratios {g8['tokens_per_s'] / adamw['tokens_per_s']:.3f} tok/s, "
                     f"{g8['memory_GB'] / adamw['memory_GB']:.3f} memory)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (seconds; the CPU test)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (gpu_check.json)")
    ap.add_argument("--only", default=None, help="comma-separated optimizers (default: all; AdamW always runs)")
    ap.add_argument("--parts", default="codecs,matrix,trajectories,refresh,profile,speed",
                    help="comma-separated parts to run")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock seconds for all parts (default 420, inside the issue's 8 minutes); cases that "
                         "would start later are recorded as skipped")
    args = ap.parse_args(argv)
    path = args.out / "gpu_check.json"
    result = run(args.device, args.tiny, common.only_list(args.only), tuple(common.only_list(args.parts) or ()),
                 budget_s=args.budget_s, out_path=path)
    print(summary(result))
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
