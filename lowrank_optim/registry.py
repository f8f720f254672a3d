"""Name -> optimizer class registry: ``create_optimizer``, ``available_optimizers`` and ``resolve_optimizer``.

Three spellings reach a registered optimizer: our registry name (``galore_adamw``), the class name
(``GaLoreAdamW``), and HF Transformers' ``TrainingArguments.optim`` name where HF has one (:data:`HF_OPTIM`:
``galore_adamw_8bit`` is ``galore_adamw`` with ``state_dtype="8bit"``, ``apollo_adamw`` is ``apollo``).
HF's ``*_layerwise`` forms resolve with ``layerwise=True``: the optimizer is the same, and the layer-wise
stepping is :class:`lowrank_optim.LayerwiseUpdater` around it (see :func:`resolve_optimizer`).
"""

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


#: HF Transformers ``optim`` names (``transformers.training_args.OptimizerNames``) -> (registry name,
#: keyword arguments the name implies). Their ``_layerwise`` forms are accepted too.
HF_OPTIM: dict[str, tuple[str, dict[str, Any]]] = {
    "galore_adamw": ("galore_adamw", {}),
    "galore_adamw_8bit": ("galore_adamw", {"state_dtype": "8bit"}),
    "galore_adafactor": ("galore_adafactor", {}),
    "apollo_adamw": ("apollo", {}),
}
_LAYERWISE = "_layerwise"


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_optimizer(name: str) -> tuple[str, dict[str, Any], bool]:
    """The registry name behind any accepted spelling, the keyword arguments it implies, and whether it asks
    for layer-wise updates.

    Args:
        name: a registry name, a class name (``GaLoreAdamW``) or an HF ``optim`` name (:data:`HF_OPTIM`,
            optionally with ``_layerwise``); case and ``-``/``_`` insensitive.

    Returns:
        ``(registry name, implied kwargs, layerwise)``, e.g. ``("galore_adamw", {"state_dtype": "8bit"},
        True)`` for ``"galore_adamw_8bit_layerwise"``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name, or an HF name whose optimizer is not registered in this version.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid name: expected a str, got {name!r}")
    key = _normalise(name)
    layerwise = key.endswith(_LAYERWISE) and key not in OPTIMIZERS
    if layerwise:
        key = key[: -len(_LAYERWISE)]
    implied: dict[str, Any] = {}
    by_class = {cls.__name__.lower(): n for n, cls in OPTIMIZERS.items()}
    if key in OPTIMIZERS:
        pass
    elif key.replace("_", "") in by_class:
        key = by_class[key.replace("_", "")]
    elif key in HF_OPTIM:
        target, implied = HF_OPTIM[key]
        if target not in OPTIMIZERS:
            raise ValueError(f"Invalid name: {name!r} is HF's name for {target!r}, which is not registered in "
                             f"this version (available: {available_optimizers()})")
        key, implied = target, dict(implied)
    else:
        hf = sorted(HF_OPTIM) + [n + _LAYERWISE for n in sorted(HF_OPTIM)]
        raise ValueError(f"Invalid name: {name!r} (available: {available_optimizers()}; class names; "
                         f"HF optim names: {hf})")
    return key, implied, layerwise


def _merge_implied(name: str, implied: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    for k, v in implied.items():
        if k in kwargs and kwargs[k] != v:
            raise ValueError(f"Invalid {k}: {kwargs[k]!r} contradicts {name!r}, which means {k}={v!r}")
    return {**kwargs, **implied}


def create_optimizer(name: str, model_or_params: torch.nn.Module | Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Builds a registered optimizer.

    Args:
        name: a name from :func:`available_optimizers`, a class name (``GaLoreAdamW``) or an HF ``optim``
            name (``galore_adamw_8bit``, ``apollo_adamw``; see :func:`resolve_optimizer`); case and
            ``-``/``_`` insensitive.
        model_or_params: an ``nn.Module`` (groups are built by :func:`lowrank_optim.param_groups` from
            ``rank`` (128), ``target_modules`` and ``group_options`` in ``kwargs``) or params / param groups.
        **kwargs: optimizer keyword arguments.

    Raises:
        ValueError: unknown name; a keyword that contradicts the name (``state_dtype="fp32"`` with
            ``galore_adamw_8bit``); an HF ``*_layerwise`` name (layer-wise stepping is a wrapper, not an
            optimizer: build the optimizer from the name without ``_layerwise`` and pass it to
            :class:`lowrank_optim.LayerwiseUpdater`).
    """
    from .groups import param_groups

    key, implied, layerwise = resolve_optimizer(name)
    if layerwise:
        plain = name.strip()[: -len(_LAYERWISE)]
        raise ValueError(f"Invalid name: {name!r} asks for layer-wise updates, which wrap an optimizer instead of "
                         f"being one: opt = create_optimizer({plain!r}, ...); updater = "
                         "lowrank_optim.LayerwiseUpdater(opt) (then only loss.backward() in the loop)")
    kwargs = _merge_implied(name, implied, kwargs)
    if isinstance(model_or_params, torch.nn.Module):
        rank = kwargs.pop("rank", 128)
        target = kwargs.pop("target_modules", ("attn", "mlp"))
        group_options = kwargs.pop("group_options", {})
        params: Any = param_groups(model_or_params, rank=rank, target_modules=target, **group_options)
    else:
        params = model_or_params
    return OPTIMIZERS[key](params, **kwargs)
