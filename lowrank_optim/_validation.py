"""Argument checks that name the parameter and the offending value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Checks that ``value`` is a real number in the given range and returns it as a float.

    Raises:
        TypeError: ``value`` is not a real number (bools are rejected).
        ValueError: ``value`` is NaN or outside the range.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"Invalid {name}: expected a number or a one-element tensor, got shape "
                            f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: expected a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if v != v:
        raise ValueError(f"Invalid {name}: {value!r} (NaN)")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'<' if high_open else '<='} {high})")
    return v


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """Checks that ``value`` is an integer (not a bool) at least ``low`` and returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: expected an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
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
