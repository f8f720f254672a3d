"""The global non-finite check: one host read per step, before any state changes.

Every gradient of a step is reduced on its own device to one fp32 sum; the sums of a device are stacked and
checked with one ``isfinite().all()``, the only host read of a device value in a steady step. A sum is
non-finite whenever any entry is inf or NaN (it can also overflow for finite entries near the fp32 range,
which then skips a step that was finite: a conservative error). Under FSDP2 each rank checks its own rows and
the ranks agree on one verdict (:func:`lowrank_optim.distributed.fsdp.agree_finite`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .distributed import fsdp as _fsdp
from .distributed import shards as _shards

NONFINITE_POLICIES = ("skip", "raise", "ignore")


def check_grad(owner: str, p: torch.Tensor, index: int) -> None:
    """Raises ``TypeError`` for a gradient the engine cannot step (sparse or complex), naming parameter ``index``."""
    if p.grad.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients (parameter {index}, shape {tuple(p.shape)})")
    if torch.is_complex(p.grad):
        raise TypeError(f"{owner} does not support complex parameters (parameter {index}, dtype {p.grad.dtype})")


def gradients_ok(owner: str, work: Sequence[tuple[dict[str, Any], torch.Tensor]]) -> bool:
    """Whether the step may go on: checks every gradient of ``work`` (``(group, param)`` pairs) whose group's
    ``nonfinite`` policy is not ``"ignore"``.

    Returns False (with a ``RuntimeWarning``) under ``"skip"``; raises ``FloatingPointError`` under ``"raise"``.
    """
    checked = [(g, p) for g, p in work if g["nonfinite"] != "ignore"]
    if not checked:
        return True
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, p in checked:
        grad = _shards.local(p.grad)  # FSDP2: this rank's rows; the verdict is agreed below
        by_device.setdefault(grad.device, []).append(grad.sum(dtype=torch.float32))
    finite = all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())
    finite = _fsdp.agree_finite(finite, [p for _, p in checked])
    if finite:
        return True
    if any(g["nonfinite"] == "raise" for g, _ in checked):
        raise FloatingPointError(f"{owner}: non-finite gradient; no state was changed (nonfinite='raise')")
    warnings.warn(f"{owner}: non-finite gradient, step skipped (nonfinite='skip'); optimizer state is unchanged",
                  RuntimeWarning, stacklevel=4)
    return False


__all__ = ["NONFINITE_POLICIES", "check_grad", "gradients_ok"]
