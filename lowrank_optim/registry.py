"""Name -> optimizer class registry: ``create_optimizer`` and ``available_optimizers``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}


def register_optimizer(name: str) -> Callable[[type], type]:
    """Class decorator adding an optimizer under ``name`` (lower case, ``_``-separated)."""

    def wrap(cls: type) -> type:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not cls:
            raise ValueError(f"Invalid optimizer name: {name!r} is already registered")
        OPTIMIZERS[name] = cls
        return cls

    return wrap


def available_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`, sorted."""
    return sorted(OPTIMIZERS)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def create_optimizer(name: str, model_or_params: torch.nn.Module | Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Builds a registered optimizer.

    Args:
        name: a name from :func:`available_optimizers` (case and ``-``/``_`` insensitive; the class name
            works too).
        model_or_params: an ``nn.Module`` (groups are built by :func:`lowrank_optim.param_groups` from
            ``rank`` (128), ``target_modules`` and ``group_options`` in ``kwargs``) or params / param groups.
        **kwargs: optimizer keyword arguments.
    """
    from .groups import param_groups

    if not isinstance(name, str):
        raise TypeError(f"Invalid name: expected a str, got {name!r}")
    key = _normalise(name)
    by_class = {cls.__name__.lower(): n for n, cls in OPTIMIZERS.items()}
    key = by_class.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"Invalid name: {name!r} (available: {available_optimizers()})")
    if isinstance(model_or_params, torch.nn.Module):
        rank = kwargs.pop("rank", 128)
        target = kwargs.pop("target_modules", ("attn", "mlp"))
        group_options = kwargs.pop("group_options", {})
        params: Any = param_groups(model_or_params, rank=rank, target_modules=target, **group_options)
    else:
        params = model_or_params
    return OPTIMIZERS[key](params, **kwargs)
