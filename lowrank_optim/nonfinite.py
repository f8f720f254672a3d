"""The global non-finite check: one host read per device and step, before any state changes.

The gradients of a step are checked per device and dtype by one call of the kernel ``torch.amp.GradScaler`` uses
(``torch._amp_foreach_non_finite_check_and_unscale_``, with an unscale factor of exactly 1, so every gradient
keeps its bits: ``x * 1 == x`` for every float, subnormals, signed zeros and infinities included): one dispatch
for all of them, raising one flag per device if any entry is inf or NaN; reading the flag is the only host read
of a device value in a steady step. Gradients of other dtypes (float64) are reduced one by one to an fp32 sum
instead, which is non-finite whenever an entry is (and, conservatively, when finite entries near the fp32 range
overflow it). Under FSDP2 each rank checks its own rows and
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
    finite = all_finite([_shards.local(p.grad) for _, p in checked])  # FSDP2: this rank's rows, agreed below
    finite = _fsdp.agree_finite(finite, [p for _, p in checked])
    if finite:
        return True
    if any(g["nonfinite"] == "raise" for g, _ in checked):
        raise FloatingPointError(f"{owner}: non-finite gradient; no state was changed (nonfinite='raise')")
    warnings.warn(f"{owner}: non-finite gradient, step skipped (nonfinite='skip'); optimizer state is unchanged",
                  RuntimeWarning, stacklevel=4)
    return False


def all_finite(grads: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor in ``grads`` is finite (see the module docstring): one kernel per
    device and dtype, one host read per device. The tensors are not changed."""
    lists: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        lists.setdefault((g.device, g.dtype), []).append(g)
    flags: dict[torch.device, torch.Tensor] = {}
    for (device, dtype), tensors in lists.items():
        flag = flags.get(device)
        if flag is None:
            flag = flags[device] = torch.zeros(1, dtype=torch.float32, device=device)
        if dtype in _AMP_DTYPES:
            one = torch.ones(1, dtype=torch.float32, device=device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, one)
                continue
            except (RuntimeError, NotImplementedError):  # a device without the kernel: the sums below
                pass
        sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
        flag.add_(torch.isfinite(sums).all().logical_not())
    return not any(bool(flag) for flag in flags.values())


#: Dtypes the fused check takes (torch's GradScaler kernel).
_AMP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["NONFINITE_POLICIES", "all_finite", "check_grad", "gradients_ok"]
