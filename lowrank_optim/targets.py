"""``target_modules`` resolved by the optimizer itself, for param groups that someone else built.

HF Transformers' ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` builds its own decay / no-decay
groups of bare tensors (no names) and calls ``cls(groups, **kwargs)``. A class-level ``rank`` then
reaches every group, embeddings and output head included. ``target_modules`` restricts the low-rank
path to the weights of the selected modules, with the same semantics as :func:`lowrank_optim.param_groups`.

Names come from one of two sources, checked at construction:

* ``module=model`` (the Trainer route: the Trainer reserves the keyword ``model`` for itself, so the
  optimizer's keyword is ``module``): modules are selected by :func:`select_lowrank_modules`, so
  ``"all-linear"`` and the ``nn.Linear``-only rule work exactly as in :func:`param_groups`;
* torch's named param groups (``params=[(name, tensor), ...]``, kept by torch as
  ``group["param_names"]``): the module path is the name without ``.weight``; ``"all-linear"`` needs
  module types and so needs ``module``.

The selection is resolved into parameter identities lazily, at the first step (and again after
``load_state_dict``), never from tensors captured in ``__init__``, because wrappers (accelerate) may
rebuild parameter objects after the optimizer is constructed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .groups import FLATTENED_HINT, _matches, select_lowrank_modules

_WEIGHT = ".weight"


def _check_type(target: Any) -> None:
    if isinstance(target, str):
        return
    if isinstance(target, Sequence) and target and all(isinstance(t, str) for t in target):
        return
    raise TypeError(f"Invalid target_modules: expected 'all-linear', a regex or a non-empty list of str, "
                    f"got {target!r}")


def validate_target_modules(group: dict[str, Any], module: nn.Module | None) -> None:
    """Checks a group's ``target_modules`` and that names to resolve it exist.

    Raises:
        TypeError: a malformed ``target_modules``.
        ValueError: no name source, ``"all-linear"`` without ``module``, or a selection matching nothing
            (which would silently turn the method into its plain rule).
    """
    target = group["target_modules"]
    _check_type(target)
    if module is None:
        if "param_names" not in group:
            raise ValueError(f"Invalid target_modules: {target!r} needs parameter names; pass module=model "
                             "(e.g. in the kwargs of HF Trainer's optimizer_cls_and_kwargs) or named parameters")
        if target == "all-linear":
            raise ValueError("Invalid target_modules: 'all-linear' needs module types; pass module=model")
        return
    if not select_lowrank_modules(module, target):
        raise ValueError(f"Invalid target_modules: {target!r} matched no nn.Linear weight of "
                         f"{type(module).__name__}; the optimizer would silently use its plain rule")


def resolve_targets(param_groups: list[dict[str, Any]], module: nn.Module | None) -> set[int]:
    """Identities of the parameters that the groups' ``target_modules`` select (at call time).

    Raises:
        ValueError: a selected parameter is not 2-D (e.g. a flattened shard).
    """
    chosen: set[int] = set()
    for group in param_groups:
        target = group.get("target_modules")
        if target is None:
            continue
        if module is not None:
            modules = dict(module.named_modules())
            weights = {id(modules[n].weight): n + _WEIGHT for n in select_lowrank_modules(module, target)}
            named = [(weights[id(p)], p) for p in group["params"] if id(p) in weights]
        else:
            named = [(n, p) for n, p in zip(group["param_names"], group["params"], strict=True)
                     if n.endswith(_WEIGHT) and _matches(n[: -len(_WEIGHT)], target)]
        for name, p in named:
            _check_2d(name, p)
            chosen.add(id(p))
    return chosen


def _check_2d(name: str, p: torch.Tensor) -> None:
    if p.dim() != 2:
        raise ValueError(f"Invalid params: {name!r} is selected by target_modules but has shape {tuple(p.shape)}; "
                         f"{FLATTENED_HINT}")


__all__ = ["resolve_targets", "validate_target_modules"]
