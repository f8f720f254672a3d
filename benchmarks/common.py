"""Shared plumbing: command line, result files, tables, progress bars and synthetic parameters."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import lowrank_optim as lro

from . import malloc

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every benchmark shares (``--quick``, ``--device``, ``--out``, ``--only``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small, fast configuration (what `make bench` runs)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    ap.add_argument("--only", default=None, help="comma-separated optimizer names to run (default: all)")
    ap.add_argument("--no-references", action="store_true", help="skip the reference implementations")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dynamic-malloc", action="store_true",
                    help="leave glibc's malloc thresholds dynamic (default: pinned, see benchmarks/malloc.py)")
    return ap


def setup(args: argparse.Namespace) -> torch.device:
    """Applies ``--threads``, pins the allocator (unless ``--dynamic-malloc`` or a warm-heap process, see
    :mod:`benchmarks.malloc`) and checks ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not getattr(args, "dynamic_malloc", False) and not malloc.is_warm():  # a warm heap stays warm
        malloc.pin()
    return check_device(args.device)


def check_device(device: str) -> torch.device:
    """The torch device, or a clear error when CUDA is asked for and absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(device)


def only_list(only: str | None) -> list[str] | None:
    return None if not only else [s.strip() for s in only.split(",") if s.strip()]


def environment(device: str) -> dict[str, Any]:
    """Where a result was measured."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "lowrank_optim": lro.__version__, "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                           "malloc": malloc.describe(), "malloc_regime": malloc.regime(),
                           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def result_path(out: Path, name: str, device: str, ext: str) -> Path:
    """``out/<name>.<ext>`` on CPU, ``out/<name>_cuda.<ext>`` on a GPU."""
    suffix = "" if device == "cpu" else f"_{device}"
    return Path(out) / f"{name}{suffix}.{ext}"


def write_json(out: Path, name: str, device: str, quick: bool, config: Mapping[str, Any],
               records: list[dict[str, Any]], **extra: Any) -> Path:
    """Writes ``{"benchmark", "quick", "environment", "config", "records", ...}`` and returns the path."""
    path = result_path(out, name, device, "json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "quick": quick, "environment": environment(device), "config": dict(config),
               "records": records, **extra}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def publish(args: argparse.Namespace, name: str, device: str, config: Mapping[str, Any], result: Any,
            records: list[dict[str, Any]], plot: Callable[..., None], summary: Callable[[Any], str],
            *plot_args: Any, **extra: Any) -> Path:
    """The common end of every benchmark: JSON, PNG plot, printed summary table; returns the JSON path."""
    path = write_json(args.out, name, device, args.quick, config, records, **extra)
    plot(result, result_path(args.out, name, device, "png"), *plot_args)
    print(summary(result))
    print(f"wrote {path}")
    return path


def progress(items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing or LRO_BENCH_QUIET is set)."""
    if os.environ.get("LRO_BENCH_QUIET"):
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (None when matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lays out, writes (110 dpi) and closes a matplotlib figure."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if plt is not None:
        plt.close(fig)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def is_lowrank_name(name: str, shape: Sequence[int], target: Sequence[str] = ("attn", "mlp")) -> bool:
    """Whether parameter ``name`` goes low-rank: 2-D and its module name contains a target fragment."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    return len(shape) == 2 and any(t in module for t in target)


def synthetic_params(named_shapes: Mapping[str, Sequence[int]], device: torch.device, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Parameter]:
    """Parameters of the given shapes with seeded weights (std 0.02) and seeded gradients.

    Gradients have a decaying singular spectrum on 2-D tensors (a random matrix times a random
    low-rank-dominated one would cost more than the optimizer step; this uses ``u * s`` row scaling
    of a Gaussian matrix, which gives the SVD a realistic non-flat spectrum at Gaussian cost).
    """
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, torch.nn.Parameter] = {}
    for name, shape in named_shapes.items():
        w = torch.randn(tuple(shape), generator=gen) * 0.02
        g = torch.randn(tuple(shape), generator=gen) * 1e-3
        if len(shape) == 2:
            decay = torch.arange(1, shape[0] + 1, dtype=torch.float32).rsqrt()
            g = g * decay[torch.randperm(shape[0], generator=gen)].unsqueeze(1)
        p = torch.nn.Parameter(w.to(device=device, dtype=dtype))
        p.grad = g.to(device=device, dtype=dtype)
        params[name] = p
    return params


def split_groups(named: Mapping[str, torch.nn.Parameter], rank: int, update_proj_gap: int,
                 target: Sequence[str] = ("attn", "mlp")) -> list[dict[str, Any]]:
    """``[{"params": plain}, {"params": lowrank, "rank": rank, "update_proj_gap": gap}]`` from names."""
    low = [p for n, p in named.items() if is_lowrank_name(n, tuple(p.shape), target)]
    plain = [p for n, p in named.items() if not is_lowrank_name(n, tuple(p.shape), target)]
    return [{"params": plain}, {"params": low, "rank": rank, "update_proj_gap": update_proj_gap}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
