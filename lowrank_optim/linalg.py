"""Decompositions that do not give up: one retry ladder shared by every SVD, eigendecomposition, QR and solve
in the package.

LAPACK (and cuSOLVER) can fail on inputs that are perfectly finite: entries near ``1e19`` overflow the fp32
Gram matrix of a randomized SVD (``(1e19)^2`` is beyond fp32's ``3.4e38``), ill-conditioned matrices make the
divide-and-conquer SVD miss convergence (galore issue #58), and a rank-deficient matrix makes a solve singular.
:func:`robust` runs a decomposition and, when it raises or returns a non-finite result, retries it

1. on ``a / max|a|`` (entries in ``[-1, 1]``: no overflow, no underflow of squares),
2. on that in float64,
3. on the CPU in float64 (another LAPACK than the accelerator's),

and raises :class:`DecompositionError` only when every attempt fails; callers then keep their previous
result with a warning (a projector keeps its previous basis). The first attempt is the plain call, so
results of well-behaved inputs are unchanged, bit for bit.

The ladder assumes what every caller here needs: the quantity computed is invariant under a positive
rescaling of ``a`` (singular vectors, eigenvectors, an orthonormal factor, a polar factor), or the caller
undoes the rescaling itself (``rescaled=True`` tells it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class DecompositionError(RuntimeError):
    """Every attempt of :func:`robust` failed (a ``RuntimeError``, like ``torch.linalg.LinAlgError``)."""


def _finite(result: object) -> bool:
    if isinstance(result, torch.Tensor):
        return bool(torch.isfinite(result).all()) if result.is_floating_point() else True
    if isinstance(result, (tuple, list)):
        return all(_finite(r) for r in result)
    return True


def _cast(result: T, dtype: torch.dtype, device: torch.device) -> T:
    if isinstance(result, torch.Tensor):
        return result.to(device=device, dtype=dtype) if result.is_floating_point() else result.to(device)  # type: ignore[return-value]
    if isinstance(result, tuple):
        return tuple(_cast(r, dtype, device) for r in result)  # type: ignore[return-value]
    if isinstance(result, list):
        return [_cast(r, dtype, device) for r in result]  # type: ignore[return-value]
    return result


def max_abs_scale(a: torch.Tensor) -> float:
    """``max |a|`` as a float, or 1.0 when it is zero or not finite (then there is nothing to rescale) or ``a``
    has no data (meta tensors: shape-only runs such as the memory estimator)."""
    if a.numel() == 0 or a.device.type == "meta":
        return 1.0
    peak = float(a.detach().abs().amax())
    return peak if 0.0 < peak < float("inf") else 1.0


def robust(fn: Callable[[torch.Tensor], T], a: torch.Tensor, *, what: str) -> T:
    """``fn(a)``, retried on ``a / max|a|``, in float64, and on the CPU in float64 (see the module docstring).

    Args:
        fn: the decomposition; takes a floating tensor and returns a tensor or a tuple of tensors whose
            meaning does not change when its input is multiplied by a positive number.
        a: the input (any floating dtype, any device).
        what: a name for the error message (``"SVD"``, ``"eigh"``, ...).

    Returns:
        ``fn``'s result, cast back to ``a``'s floating dtype and device when a retry ran in float64 or
        on the CPU.

    Raises:
        DecompositionError: every attempt raised or returned a non-finite value.
    """
    if a.device.type == "meta":  # shape-only run (memory estimates): nothing can fail, nothing to check
        return fn(a)
    errors: list[str] = []
    try:
        out = fn(a)
        if _finite(out):
            return out
        errors.append("non-finite result")
    except RuntimeError as err:  # torch.linalg.LinAlgError derives from RuntimeError
        errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
    dtype, device = a.dtype, a.device
    scaled = a / max_abs_scale(a)
    attempts = [scaled, scaled.double()]
    if device.type != "cpu":
        attempts.append(scaled.double().cpu())
    for x in attempts:
        try:
            out = fn(x)
        except RuntimeError as err:
            errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        if _finite(out):
            return _cast(out, dtype, device)
        errors.append("non-finite result")
    raise DecompositionError(f"{what} failed on a {tuple(a.shape)} {a.dtype} input on {device} "
                             f"(plain, rescaled, float64{', CPU' if device.type != 'cpu' else ''}): "
                             + "; ".join(errors))


__all__ = ["DecompositionError", "max_abs_scale", "robust"]
