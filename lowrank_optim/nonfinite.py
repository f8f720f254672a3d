"""The global non-finite check: one host read per device and step, before any state changes.

The gradients of a step are checked per device and dtype by one call of the kernel ``torch.amp.GradScaler`` uses
(``torch._amp_foreach_non_finite_check_and_unscale_``, with an unscale factor of exactly 1, so every gradient
keeps its value: ``x * 1 == x`` for every float, subnormals, signed zeros and infinities included; a NaN stays a
NaN, though a bf16 / fp16 one may come back with another payload): one dispatch for all of them, raising one flag
per device if any entry is inf or NaN; reading the flag is the only host read of a device value in a steady step.

On the CPU that kernel writes every gradient back, so a gradient of at least :data:`CPU_SUM_MIN_ELEMENTS` entries
(an embedding, an LM head) is first reduced to its fp32 sums over the last axis, read only, and those go to the
kernel in its place, as do the sums of every gradient of another dtype (float64) everywhere. A sum is non-finite
whenever an entry is (an inf or a NaN propagates; ``inf + -inf`` is NaN) and, conservatively, when finite entries
near the fp32 range overflow it (``|sum| > 3.4e38``: gradients no moment could square anyway).

A plain matrix stepped by Adafactor on the CPU (fp32, at least :data:`CPU_SUM_MIN_ELEMENTS` entries, with state
already, not ``maximize``: :func:`probed`) is not read by the check at all: the rule computes its new row and
column statistics (sums of ``g o g`` over each row and column) before the check, into copies
(:meth:`~lowrank_optim.rules.adafactor.AdafactorRule.plan_plain`), and the check reads those ``m + n`` floats in its
place, which saves one read of an embedding's gradient per step (4-5 ms each at LLaMA-60M on 2 cores). A statistic
is non-finite whenever an entry of its row or column is, and, conservatively, when a finite entry's square or a
sum of squares overflows fp32 (``|g| > 1.8e19``), a gradient that would make the stored statistic inf and every
later one NaN: the step is then skipped or raises like a non-finite one.

Under FSDP2 each rank checks its own rows and the ranks agree on one verdict
(:func:`lowrank_optim.distributed.fsdp.agree_finite`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .distributed import fsdp as _fsdp
from .distributed import shards as _shards

NONFINITE_POLICIES = ("skip", "raise", "ignore")


def check_grad(owner: str, p: torch.Tensor, index: int) -> None:
    """Raises ``TypeError`` for a parameter the engine cannot step (sparse or complex gradient, float64 weight),
    naming parameter ``index``.

    The engine computes every step in fp32 (bf16 / fp16 weights get an fp32 working copy, rounded back): a float64
    weight would be rounded to fp32 at every step, losing its precision silently, so it is refused."""
    if p.grad.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients (parameter {index}, shape {tuple(p.shape)})")
    if torch.is_complex(p.grad):
        raise TypeError(f"{owner} does not support complex parameters (parameter {index}, dtype {p.grad.dtype})")
    if p.dtype == torch.float64:
        raise TypeError(f"{owner} does not support float64 parameters (parameter {index}, shape {tuple(p.shape)}): "
                        "it steps in fp32 and would round the weight to fp32 every step; cast the model to float32 "
                        "(or bf16), or give float64 parameters to another optimizer")


def probed(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether plain parameter ``p``'s check may read its inner rule's reductions in place of its gradient (the
    module docstring): a checked group, not ``maximize``, an fp32 weight and gradient on the CPU of at least
    :data:`CPU_SUM_MIN_ELEMENTS` entries, not sharded. Other devices keep the one fused kernel for everything."""
    grad = p.grad
    return (grad is not None and group["nonfinite"] != "ignore" and not group.get("maximize")
            and grad.dtype == p.dtype == torch.float32 and grad.device.type == "cpu" and not grad.is_sparse
            and grad.numel() >= CPU_SUM_MIN_ELEMENTS and not _shards.is_dtensor(p))


def gradients_ok(owner: str, work: Sequence[tuple[dict[str, Any], torch.Tensor]],
                 probes: Mapping[int, Sequence[torch.Tensor]] | None = None) -> bool:
    """Whether the step may go on: checks every gradient of ``work`` (``(group, param)`` pairs) whose group's
    ``nonfinite`` policy is not ``"ignore"``; for a parameter ``p`` with ``id(p)`` in ``probes``, those tensors
    (reductions of its gradient, non-finite whenever an entry is: the module docstring) instead of its gradient.

    Returns False (with a ``RuntimeWarning``) under ``"skip"``; raises ``FloatingPointError`` under ``"raise"``.
    """
    checked = [(g, p) for g, p in work if g["nonfinite"] != "ignore"]
    if not checked:
        return True
    tensors: list[torch.Tensor] = []
    for _, p in checked:
        if probes and id(p) in probes:
            tensors.extend(probes[id(p)])
        else:
            tensors.append(_shards.local(p.grad))  # FSDP2: this rank's rows, agreed below
    finite = all_finite(tensors)
    finite = _fsdp.agree_finite(finite, [p for _, p in checked])
    if finite:
        return True
    if any(g["nonfinite"] == "raise" for g, _ in checked):
        raise FloatingPointError(f"{owner}: non-finite gradient; no state was changed (nonfinite='raise')")
    warnings.warn(f"{owner}: non-finite gradient, step skipped (nonfinite='skip'); optimizer state is unchanged",
                  RuntimeWarning, stacklevel=4)
    return False


def all_finite(grads: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor in ``grads`` is finite (see the module docstring): one fused kernel per
    device and dtype (on the CPU, after one sum per gradient of at least :data:`CPU_SUM_MIN_ELEMENTS` entries),
    one host read per device. The tensors are not changed."""
    lists: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g.dtype not in _AMP_DTYPES or (g.device.type == "cpu" and g.numel() >= CPU_SUM_MIN_ELEMENTS):
            g = g.sum(dim=-1, dtype=torch.float32)  # non-finite where a summed entry is (module docstring)
        lists.setdefault((g.device, g.dtype), []).append(g)
    flags: dict[torch.device, torch.Tensor] = {}
    for (device, _), tensors in lists.items():
        flag = flags.setdefault(device, torch.zeros(1, dtype=torch.float32, device=device))
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag,
                                                             torch.ones(1, dtype=torch.float32, device=device))
        except (RuntimeError, NotImplementedError):  # a device without the kernel
            sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
            flag.add_(torch.isfinite(sums).all().logical_not())
    return not any(bool(flag) for flag in flags.values())


#: On the CPU, gradients of at least this many entries are checked by their sums over the last axis instead of the
#: fused kernel (see the module docstring): a 32000 x 512 embedding's gradient out of cache, 5.9 ms fused, 4.4 ms
#: summed (2 cores). Below it the fused kernel's one dispatch for all of them wins (LLaMA-60M's 512 x 512 and
#: 1376 x 512 matrices: a sum per tensor, 3 CPU ops each, would add 170 ops to a step for 3 ms).
CPU_SUM_MIN_ELEMENTS = 1 << 22

#: Dtypes the fused check takes (torch's GradScaler kernel).
_AMP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["NONFINITE_POLICIES", "all_finite", "check_grad", "gradients_ok", "probed"]
