"""Param groups from a model, with HF Transformers' ``target_modules`` semantics."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._validation import check_choice, check_int

_REGEX_CHARS = set(".*+?[]()|^$\\{}")


def _output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s): ``get_output_embeddings()`` or modules named ``lm_head``."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "output", "classifier")}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            names |= {n for n, m in model.named_modules() if m is head}
    return names


def is_flattened(p: torch.Tensor) -> bool:
    """Whether ``p`` is a flattened shard: FSDP1 ``FlatParameter`` or its ``use_orig_params`` views (marked
    ``_fsdp_flattened``), or a DeepSpeed ZeRO-3 partition (``ds_id``). Their 2-D structure is gone."""
    return bool(getattr(p, "_fsdp_flattened", False)) or hasattr(p, "ds_id")


FLATTENED_HINT = ("low-rank projection needs each weight as a 2-D tensor, FSDP1 / DeepSpeed ZeRO flatten them: "
                  "use DDP or torch.distributed.optim.ZeroRedundancyOptimizer")


def _matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    for t in target:
        if t in name:
            return True
        if set(t) & _REGEX_CHARS and re.fullmatch(t, name) is not None:
            return True
    return False


def select_lowrank_modules(model: nn.Module, target_modules: str | Sequence[str] = ("attn", "mlp"),
                           module_types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[str]:
    """Qualified names of the modules whose ``weight`` goes low-rank.

    Args:
        model: the model.
        target_modules: ``"all-linear"`` (every linear layer but the output head), a regex that must match
            the whole qualified name, or a list of fragments (substring match; a fragment with regex
            characters also matches by ``re.fullmatch``, as in HF's docs ``[r".*.attn.*"]``).
        module_types: module classes eligible (``nn.Linear`` only by default).
    """
    if isinstance(target_modules, str):
        all_linear = target_modules == "all-linear"
    elif isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        all_linear = False
        if not target_modules:
            raise ValueError("Invalid target_modules: empty list")
    else:
        raise TypeError(f"Invalid target_modules: expected 'all-linear', a regex or a list of str, "
                        f"got {target_modules!r}")
    heads = _output_head_names(model)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, module_types) or getattr(module, "weight", None) is None:
            continue
        if module.weight.dim() != 2:
            continue
        if all_linear:
            if name not in heads:
                chosen.append(name)
        elif _matches(name, target_modules):
            chosen.append(name)
    return chosen


def param_groups(model: nn.Module, rank: int = 128, target_modules: str | Sequence[str] = ("attn", "mlp"), *,
                 on_no_match: str = "raise", plain_options: dict[str, Any] | None = None,
                 **options: Any) -> list[dict[str, Any]]:
    """Splits a model's trainable parameters into a plain group and a low-rank group.

    The ``weight`` of every selected ``nn.Linear`` goes into the low-rank group (which carries ``rank``
    and ``options``, e.g. ``update_proj_gap``, ``scale``, ``projector``); everything else (embeddings,
    output head, norms, biases, unselected layers) goes into the plain group.

    Args:
        model: the model.
        rank: the low-rank group's rank.
        target_modules: see :func:`select_lowrank_modules`.
        on_no_match: ``"raise"`` (default) or ``"warn"`` when nothing matches: a silent fallback would
            turn the method into plain Adam.
        plain_options: extra keys for the plain group (e.g. ``{"weight_decay": 0.0}``).
        **options: extra keys for the low-rank group.

    Returns:
        ``[{"params": plain, ...}, {"params": lowrank, "rank": rank, ...}]`` (empty groups left out).
    """
    check_int("rank", rank, low=1)
    check_choice("on_no_match", on_no_match, ("raise", "warn"))
    if any(is_flattened(p) for p in model.parameters()):
        raise ValueError(f"Invalid model: {type(model).__name__} holds flattened parameters; {FLATTENED_HINT}")
    names = select_lowrank_modules(model, target_modules)
    chosen: set[int] = set()
    lowrank: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    for n in names:
        w = modules[n].weight
        if w.requires_grad and id(w) not in chosen:
            chosen.add(id(w))
            lowrank.append(w)
    if not lowrank:
        msg = (f"target_modules={target_modules!r} matched no nn.Linear weight of {type(model).__name__}; "
               "the optimizer would silently be plain Adam")
        if on_no_match == "raise":
            raise ValueError(f"Invalid target_modules: {msg}")
        warnings.warn(msg, UserWarning, stacklevel=2)
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups: list[dict[str, Any]] = []
    if plain:
        groups.append({"params": plain, **(plain_options or {})})
    if lowrank:
        groups.append({"params": lowrank, "rank": rank, **options})
    return groups
