"""Argument checks that name the parameter and the offending value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


def _scalar(name: str, value: Any) -> Any:
    """The Python number a one-element tensor holds (``value`` itself otherwise); bool tensors are refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"Invalid {name}: expected a number or a one-element real tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.item()
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Checks that ``value`` is a real number in the given range and returns it as a plain Python ``float``.

    Accepts any :class:`numbers.Real` (Python and NumPy ints and floats, ``fractions.Fraction``) and one-element
    real tensors (as ``torch.optim`` does for ``lr``); the returned value is a ``float`` either way, so groups that
    store it stay plain (``torch.load(weights_only=True)``).

    Infinite values are refused too: no hyper-parameter of this package means anything at infinity (``lr``,
    ``scale`` or ``weight_decay`` of ``inf`` made every weight non-finite on the first step).

    Raises:
        TypeError: ``value`` is not a real number (bools, NumPy bools and bool tensors are rejected).
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: expected a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if v != v:
        raise ValueError(f"Invalid {name}: {value!r} (NaN)")
    if v in (math.inf, -math.inf):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'<' if high_open else '<='} {high})")
    return v


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """Checks that ``value`` is an integer (not a bool) at least ``low`` and returns it as a plain Python ``int``.

    Accepts any :class:`numbers.Integral` (Python and NumPy ints) and one-element integer tensors.

    Raises:
        TypeError: ``value`` is not an integer (bools and floats, even integral ones, are rejected).
        ValueError: ``value`` is below ``low``.
    """
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        raise TypeError(f"Invalid {name}: expected an int, got a {value.dtype} tensor")
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name}: expected an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
    return int(value)


def plain(value: Any) -> Any:
    """``value`` with NumPy (and other :mod:`numbers`) scalars turned into Python ``int`` / ``float``, inside
    tuples, lists and dicts too; everything else unchanged. Group values go through it, so a state dict holds
    only plain numbers (``torch.load(weights_only=True)`` refuses NumPy scalars)."""
    if value is None or type(value) in (bool, int, float, str):  # np.float64 subclasses float: type(), not isinstance
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Checks that ``value`` is one of the allowed strings and returns it."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"Invalid {name}: expected one of {choices}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")
    return value


def check_betas(name: str, value: Any, count: int = 2) -> tuple[float, ...]:
    """Checks a tuple of ``count`` coefficients in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        raise TypeError(f"Invalid {name}: expected a tuple of {count} numbers, got {value!r}")
    return tuple(check_number(f"{name}[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(value))


#: ``torch.optim`` keyword arguments that pick an implementation, not the math: ``foreach`` (any value: the engine
#: batches on its own, :mod:`lowrank_optim.stacks`, and the result does not depend on it), ``fused`` and
#: ``capturable`` (only their off values, ``None`` / ``False``: there is no fused kernel, and a step reads host-side
#: counters, so it cannot be captured in a CUDA graph).
TORCH_SPEED_FLAGS = ("foreach", "fused", "capturable")


def check_torch_flag(name: str, value: Any) -> None:
    """Checks one of :data:`TORCH_SPEED_FLAGS` as given to ``torch.optim.AdamW`` (so a line written for torch runs).

    Raises:
        TypeError: ``value`` is neither ``None`` nor a bool.
        ValueError: ``fused=True`` or ``capturable=True`` (named, with the reason), which this package cannot honour.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected None or a bool, got {value!r} ({type(value).__name__})")
    if value and name == "fused":
        raise ValueError("Invalid fused: True (no fused kernel here; the engine batches its matrices itself: leave "
                         "fused unset, None or False)")
    if value and name == "capturable":
        raise ValueError("Invalid capturable: True (a step reads host-side step counters and refresh schedules, so it "
                         "cannot be captured in a CUDA graph; leave capturable unset, None or False)")
