"""``target_modules`` resolved by the optimizer itself, for param groups that someone else built.

HF Transformers' ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` builds its own decay / no-decay
groups of bare tensors (no names) and calls ``cls(groups, **kwargs)``. A class-level ``rank`` then
reaches every group, embeddings and output head included. ``target_modules`` restricts the low-rank
path to the weights of the selected modules, with the same semantics as :func:`lowrank_optim.param_groups`.

Names come from one of two sources, checked at construction:

* ``module=model`` (the Trainer route: the Trainer reserves the keyword ``model`` for itself, so the
  optimizer's keyword is ``module``): modules are selected by :func:`select_lowrank_modules`, so
  ``"all-linear"``, MoE expert stacks and the ``include_conv`` opt-in work exactly as in
  :func:`param_groups` (a group's ``include_conv`` key, default ``False``);
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

from .groups import CONV_TYPES, FLATTENED_HINT, _matches, is_expert_name, moe_router_weights, select_lowrank_params

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
    if not select_lowrank_params(module, target, include_conv=_include_conv(group), warn=False):
        raise ValueError(f"Invalid target_modules: {target!r} matched no nn.Linear weight or MoE expert stack of "
                         f"{type(module).__name__}; the optimizer would silently use its plain rule")


def _include_conv(group: dict[str, Any]) -> bool:
    flag = group.get("include_conv", False)
    if not isinstance(flag, bool):
        raise TypeError(f"Invalid include_conv: expected a bool, got {flag!r}")
    return flag


def _named_selected(name: str, p: torch.Tensor, target: str | Sequence[str]) -> bool:
    """The selection of :func:`select_lowrank_params` from a parameter's name and shape alone (no module
    types): ``<module>.weight`` 2-D (a linear layer), 3-D with ``"expert"`` in the name (an MoE expert stack,
    matched by its module or its own name), and any other matched ``<module>.weight``, which
    :func:`_check_selected` then accepts (3-D to 5-D with ``include_conv``: a convolution) or refuses."""
    module = name[: -len(_WEIGHT)] if name.endswith(_WEIGHT) else name.rpartition(".")[0]
    if is_expert_name(name, p.shape):
        return _matches(module, target) or _matches(name, target)
    return name.endswith(_WEIGHT) and _matches(module, target)


def resolve_targets(param_groups: list[dict[str, Any]], module: nn.Module | None) -> set[int]:
    """Identities of the parameters that the groups' ``target_modules`` select (at call time); see
    :func:`resolve_target_kinds`."""
    return set(resolve_target_kinds(param_groups, module))


def resolve_target_kinds(param_groups: list[dict[str, Any]], module: nn.Module | None) -> dict[int, bool]:
    """The parameters that the groups' ``target_modules`` select (at call time): identity -> whether it is a
    convolution weight (a ``Conv1d`` weight is 3-D and a ``Conv3d`` one 5-D, so only the module tells; the
    planner reads such a weight as ``"conv"`` under ``nd_layout="auto"``).

    With ``module``, the selection is :func:`lowrank_optim.select_lowrank_params` (``nn.Linear`` weights,
    MoE expert stacks, and convolution weights when the group sets ``include_conv=True``); from torch's
    ``param_names``, the same rules read from names and shapes (MoE routers recognised by
    :func:`lowrank_optim.groups.moe_router_weights` stay plain).

    Raises:
        ValueError: a selected parameter has fewer than 2 dimensions (e.g. a flattened shard), or, named
            ``<module>.weight`` in ``param_names``, more than 2 without ``include_conv`` (or more than 5).
    """
    chosen: dict[int, bool] = {}
    for group in param_groups:
        target = group.get("target_modules")
        if target is None:
            continue
        include_conv = _include_conv(group)
        if module is not None:
            selected = select_lowrank_params(module, target, include_conv=include_conv)
            names = {id(p): n for n, p in selected.items()}
            named = [(names[id(p)], p) for p in group["params"] if id(p) in names]
            convs = {id(m.weight) for m in module.modules() if isinstance(m, CONV_TYPES)}
        else:
            routers = moe_router_weights(group["param_names"])
            named = [(n, p) for n, p in zip(group["param_names"], group["params"], strict=True)
                     if n not in routers and _named_selected(n, p, target)]
            convs = {id(p) for n, p in named if p.dim() > 2 and not is_expert_name(n, p.shape)}
        for name, p in named:
            _check_selected(name, p, include_conv)
            _check_layout(name, p, id(p) in convs, group.get("nd_layout", "auto"))
            chosen[id(p)] = id(p) in convs
    return chosen


def _check_layout(name: str, p: torch.Tensor, conv: bool, layout: str) -> None:
    """Refuses a selected N-D tensor that the group's ``nd_layout`` would read as the other kind: with
    ``"auto"`` a selected convolution weight is a convolution whatever its dimensions (the planner knows it from
    its module) and another 3-D tensor a stack of experts (:mod:`lowrank_optim.plan`)."""
    if p.dim() <= 2:
        return
    if conv:
        ok = layout in ("conv", "auto")
        want = "nd_layout='conv' or 'auto'"
    else:
        ok = layout == "experts" or (layout == "auto" and p.dim() == 3)
        want = "nd_layout='auto' or 'experts'"
    if not ok:
        kind = "convolution weight" if conv else "MoE expert stack"
        raise ValueError(f"Invalid params: {name!r} (shape {tuple(p.shape)}) is a {kind} selected by target_modules, "
                         f"but its group's nd_layout={layout!r} would read it as the other kind; put it in a group "
                         f"with {want} (lowrank_optim.param_groups does)")


def _check_selected(name: str, p: torch.Tensor, include_conv: bool) -> None:
    if p.dim() < 2:
        raise ValueError(f"Invalid params: {name!r} is selected by target_modules but has shape {tuple(p.shape)}; "
                         f"{FLATTENED_HINT}")
    if p.dim() == 2 or is_expert_name(name, p.shape):
        return
    if not include_conv:
        raise ValueError(f"Invalid params: {name!r} is selected by target_modules but has shape {tuple(p.shape)}; "
                         "a convolution weight is projected only with include_conv=True (as the matrix "
                         "out x in*prod(kernel)); otherwise leave it out of target_modules")
    if p.dim() > 5:
        raise ValueError(f"Invalid params: {name!r} is selected by target_modules but has shape {tuple(p.shape)}; "
                         "no low-rank layout for a tensor of more than 5 dimensions")


__all__ = ["resolve_targets", "validate_target_modules"]
