"""GPU check: every preset x state store on CUDA, no host sync in steady steps, CPU vs CUDA, LLaMA-1B speed.

``python -m benchmarks.gpu_check`` (one GPU, under 8 minutes on one H200) runs three parts and writes
``benchmarks/results/cuda/gpu_check.json`` (or ``--out DIR``):

1. **matrix**: every registered optimizer x state store (``fp32``, ``bf16``, ``8bit``) for a few steps on small
   LLaMA-style shapes. The first step (state allocation, initial subspace) runs normally; then ``steady_steps``
   steps without a refresh run under ``torch.cuda.set_sync_debug_mode("error")`` with ``nonfinite="ignore"``
   (any host read of a device value raises), and the same steps with the default ``nonfinite="skip"`` run
   under ``"warn"``, counting the host syncs per step (the non-finite check's one read is allowed).
2. **trajectories**: each optimizer (``fp32``) trained for ``trajectory_steps`` steps (refreshes included) from
   the same weights on the same seeded gradients on the CPU and on CUDA; the largest relative difference of
   the final weights, ``max |w_cpu - w_cuda| / max |w_cpu|``, must stay under ``tolerance``.
3. **speed**: end-to-end training steps (forward in bf16 autocast, backward, optimizer step) of the benchmark
   decoder at LLaMA-1B shapes (24 layers, width 2048, SwiGLU 5461, vocabulary 32000, fp32 master weights):
   step time, tokens/s and peak memory (``torch.cuda.max_memory_allocated``) for torch ``AdamW(fused=True)``,
   bitsandbytes ``AdamW8bit`` (when installed), ``GaLoreAdamW`` in ``fp32`` and ``8bit`` stores and every
   other preset in ``fp32``, rank 512 (GaLore's 1B setting).

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

from . import common
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


def _new_grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    """Seeded gradients for ``step``, drawn on the CPU (same values on every device)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype)


def check_matrix(device: torch.device, shapes: dict[str, tuple[int, ...]], rank: int, steady_steps: int,
                 stores: tuple[str, ...] = STATE_DTYPES, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every preset x store: a first step, then steady steps under sync-debug ``error`` (``nonfinite="ignore"``)
    and ``warn`` (default ``nonfinite``, syncs counted). Records ``ok``, ``skipped`` or ``error``."""
    bnb = _have_bnb()
    records = []
    for spec in specs(stores, references=False, only=only):
        if spec.impl != "lowrank_optim":
            continue
        rec: dict[str, Any] = {"label": spec.label, "optimizer": spec.optimizer, "state_dtype": spec.state_dtype}
        if spec.state_dtype == "8bit" and not bnb:
            rec["status"] = "skipped: bitsandbytes is not installed"
            records.append(rec)
            continue
        try:
            for nonfinite, mode in (("ignore", "error"), ("skip", "warn")):
                params = _params(shapes, device)
                opt = spec.build(common.split_groups(params, rank, 10**6))
                for g in opt.param_groups:
                    g["nonfinite"] = nonfinite
                _new_grads(params, 0)
                opt.step()  # allocation + initial subspace: host reads allowed
                common.sync(device)
                with warnings.catch_warnings(record=True) as caught, _sync_debug(device, mode):
                    warnings.simplefilter("always")
                    for i in range(steady_steps):
                        _new_grads(params, i + 1)
                        opt.step()
                common.sync(device)
                syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
                rec[f"syncs_per_step_nonfinite_{nonfinite}"] = syncs / steady_steps
                if not all(torch.isfinite(p).all() for p in params.values()):
                    raise FloatingPointError("non-finite weights after the steady steps")
                rec["state_bytes"] = count_state_bytes(opt)
                del opt, params
            rec["status"] = "ok"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        records.append(rec)
        gc.collect()
    return records


def _cpu_draws(opt: torch.optim.Optimizer) -> None:
    """Seeded random projectors (Flora, APOLLO) draw on the CPU (``generator="cpu"``): by default they draw on the
    parameter's device, whose stream differs between CPU and CUDA, so the two trajectories would use other bases."""
    for parts in getattr(opt, "_parts_cache", {}).values():
        if isinstance(parts.projector, RandomProjector):
            parts.projector.generator = "cpu"


def _trajectory(spec: Spec, shapes: dict[str, tuple[int, ...]], rank: int, steps: int, period: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    params = _params(shapes, device)
    opt = spec.build(common.split_groups(params, rank, period))
    _cpu_draws(opt)
    for i in range(steps):
        _new_grads(params, i)
        opt.step()
    return {n: p.detach().to("cpu", torch.float32) for n, p in params.items()}


def check_trajectories(device: torch.device, shapes: dict[str, tuple[int, ...]], rank: int, steps: int,
                       period: int, tolerance: float, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Each optimizer (fp32 store) on the CPU and on ``device``, same weights and gradients: final weights'
    largest difference relative to the largest CPU weight, per optimizer (``ok`` when under ``tolerance``)."""
    records = []
    cpu = torch.device("cpu")
    for spec in specs(("fp32",), references=False, only=only):
        if spec.impl != "lowrank_optim":
            continue
        rec: dict[str, Any] = {"label": spec.label, "steps": steps, "update_proj_gap": period}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = _trajectory(spec, shapes, rank, steps, period, cpu)
                b = _trajectory(spec, shapes, rank, steps, period, device)
            diff = max(float((a[n] - b[n]).abs().max()) for n in a)
            scale = max(float(a[n].abs().max()) for n in a)
            rec["max_rel_diff"] = diff / scale
            rec["status"] = "ok" if diff / scale <= tolerance else "mismatch"
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        records.append(rec)
    return records


def _speed_specs(stores_8bit: bool) -> list[tuple[str, Spec | None, dict[str, Any]]]:
    """(label, spec or None for fused AdamW, extra) of the speed part."""
    out: list[tuple[str, Spec | None, dict[str, Any]]] = [("torch:adamw(fused)", None, {})]
    refs = {s.label: s for s in specs(("fp32",), references=True)}
    if stores_8bit and "bitsandbytes:adamw8bit" in refs:
        out.append(("bitsandbytes:adamw8bit", refs["bitsandbytes:adamw8bit"], {}))
    for spec in specs(("fp32", "8bit") if stores_8bit else ("fp32",), references=False):
        if spec.impl == "lowrank_optim" and (spec.state_dtype == "fp32" or spec.optimizer == "galore_adamw"):
            out.append((spec.label, spec, {}))
    return out


def check_speed(device: torch.device, cfg: DecoderConfig, rank: int, steps: int, batch_size: int, seq_len: int,
                only: list[str] | None = None) -> list[dict[str, Any]]:
    """End-to-end training steps of the decoder ``cfg``: median step time, tokens/s, peak memory per optimizer."""
    bnb = _have_bnb()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (batch_size, seq_len + 1), generator=gen).to(device)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    records = []
    todo = _speed_specs(bnb)
    if only:
        todo = [t for t in todo if t[1] is None or set(only) & {t[1].optimizer, t[1].label, t[1].impl}]
    if not bnb:
        records.append({"label": "bitsandbytes:adamw8bit", "status": "skipped: bitsandbytes is not installed"})
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    for label, spec, _ in todo:
        rec: dict[str, Any] = {"label": label, "rank": rank if spec is not None and spec.lowrank else None}
        model = opt = None
        try:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = build_model(cfg, seed=0, device=device)
            groups = common.split_groups(dict(model.named_parameters()), rank, 200)
            if spec is None:
                opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0,
                                        fused=device.type == "cuda")
            else:
                opt = spec.build(groups)
            times = []
            for _ in range(steps + 1):
                common.sync(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = model(tokens, targets)
                loss.backward()
                opt.step()
                common.sync(device)
                times.append(time.perf_counter() - t0)
            med = common.median(times[1:])
            rec.update({"status": "ok", "first_step_s": times[0], "median_step_s": med,
                        "tokens_per_s": tokens.numel() / med, "state_bytes": count_state_bytes(opt),
                        "final_loss": float(loss.detach())})
            if device.type == "cuda":
                rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        except Exception as err:
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"[:400]
        del model, opt
        records.append(rec)
    base = next((r for r in records if r["label"] == "torch:adamw(fused)" and r.get("status") == "ok"), None)
    for r in records:
        if base is not None and r.get("status") == "ok":
            r["tokens_per_s_ratio_to_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
            if "peak_memory_bytes" in r:
                r["peak_memory_ratio_to_adamw"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    return records


#: Shapes of each part: ``full`` for the GPU (under 8 minutes on one H200), ``tiny`` for the CPU test.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"matrix_shapes": llama_shapes(n_layers=2, d_model=256, d_ffn=688, vocab=1024), "rank": 64,
             "steady_steps": 3, "trajectory_steps": 12, "period": 5, "tolerance": 1e-3,
             "speed_decoder": "1B", "speed_rank": 512, "speed_steps": 5, "batch_size": 4, "seq_len": 256},
    "tiny": {"matrix_shapes": llama_shapes(n_layers=1, d_model=32, d_ffn=48, vocab=64), "rank": 8,
             "steady_steps": 2, "trajectory_steps": 4, "period": 2, "tolerance": 1e-3,
             "speed_decoder": "tiny", "speed_rank": 8, "speed_steps": 2, "batch_size": 2, "seq_len": 16},
}


def run(device: str = "cuda", tiny: bool = False, only: list[str] | None = None,
        parts: tuple[str, ...] = ("matrix", "trajectories", "speed")) -> dict[str, Any]:
    """Runs the requested parts (``only``: these optimizers' names or labels; the AdamW baselines always run);
    returns ``{"config", "bitsandbytes", "matrix", "trajectories", "speed", "anchor", "seconds"}``."""
    dev = common.check_device(device)
    cfg = SETTINGS["tiny" if tiny else "full"]
    out: dict[str, Any] = {"config": {k: v for k, v in cfg.items() if k != "matrix_shapes"},
                           "bitsandbytes": _have_bnb(), "anchor": PAPER_ANCHOR}
    t0 = time.perf_counter()
    if "matrix" in parts:
        out["matrix"] = check_matrix(dev, cfg["matrix_shapes"], cfg["rank"], cfg["steady_steps"], only=only)
    if "trajectories" in parts:
        out["trajectories"] = check_trajectories(dev, cfg["matrix_shapes"], cfg["rank"], cfg["trajectory_steps"],
                                                 cfg["period"], cfg["tolerance"], only)
    if "speed" in parts:
        decoder = LLAMA_DECODERS[cfg["speed_decoder"]]
        out["speed"] = check_speed(dev, decoder, cfg["speed_rank"], cfg["speed_steps"], cfg["batch_size"],
                                   cfg["seq_len"], only)
        out["config"]["speed_decoder_config"] = decoder.asdict()
    out["seconds"] = time.perf_counter() - t0
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
                 "tok/s": r.get("tokens_per_s"), "tok/s /AdamW": r.get("tokens_per_s_ratio_to_adamw"),
                 "peak GB": r["peak_memory_bytes"] / 1e9 if "peak_memory_bytes" in r else None,
                 "status": r.get("status")} for r in result["speed"]]
        lines.append(common.markdown_table(rows, ["optimizer", "step ms", "tok/s", "tok/s /AdamW", "peak GB",
                                                  "status"]))
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
    ap.add_argument("--parts", default="matrix,trajectories,speed", help="comma-separated parts to run")
    args = ap.parse_args(argv)
    result = run(args.device, args.tiny, common.only_list(args.only), tuple(common.only_list(args.parts) or ()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps({"benchmark": "gpu_check", "environment": common.environment(args.device),
                                **result}, indent=1, default=str) + "\n")
    print(summary(result))
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
