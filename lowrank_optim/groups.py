"""Param groups from a model, with HF Transformers' ``target_modules`` semantics, and the check that a group
does not silently change what a method is.

Where method hyper-parameters belong: on the optimizer (``lro.OnlineSubspaceDescent(groups, update_proj_gap=1)``),
not in the group. A group key overrides the optimizer's value (torch semantics), so a group built once with
GaLore's keys (``update_proj_gap=200, scale=0.25``) and handed to another method would silently turn OSD's
every-step P update into one every 200 steps, Flora's 1000-step resampling into 200, COAP's 32 into 200, and the
1.0 scale of FRUGAL, Flora, COAP, DCT-AdamW and GUM into 0.25. The optimizer therefore warns
(:class:`MethodDefaultWarning`) when a group *explicitly* sets a method-defining key (:data:`METHOD_KEYS` and
every key of the preset's ``preset_defaults``) to a value other than the optimizer's own, whenever that own value
was chosen by the preset or by a constructor argument (not the engine-wide default): GaLore's own pattern of
per-group ``update_proj_gap`` (galore-torch's) stays silent under the GaLore presets.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._validation import check_choice, check_int

_REGEX_CHARS = set(".*+?[]()|^$\\{}")


#: Group keys that define what a method is (its refresh period, back-projection scale and parts).
METHOD_KEYS: tuple[str, ...] = ("update_proj_gap", "scale", "projector", "proj_side", "inner", "plain_inner",
                                "residual", "transfer")


class MethodDefaultWarning(UserWarning):
    """A param group overrides a value that defines the optimizer's method (see :func:`method_overrides`)."""


def method_overrides(group: dict[str, Any], given: set[str], method: dict[str, Any], engine: dict[str, Any],
                     preset_keys: set[str]) -> list[tuple[str, Any, Any]]:
    """The method-defining keys a group contradicts: ``(key, group value, method value)`` for each.

    Args:
        group: the group after defaults were filled in.
        given: the keys the caller wrote in the group (before any defaults).
        method: the optimizer's own values (``optimizer.defaults``: preset defaults and constructor arguments).
        engine: the engine-wide defaults (``ENGINE_DEFAULTS``); a key whose method value equals the engine
            default is a free per-group choice (GaLore's own convention), not a contradiction.
        preset_keys: the preset's ``preset_defaults`` keys, method-defining on top of :data:`METHOD_KEYS`.
    """
    missing = object()
    found = []
    for key in sorted((set(METHOD_KEYS) | preset_keys) & given):
        if key not in method:
            continue
        own = method[key]
        if engine.get(key, missing) == own:
            continue
        if group[key] != own:
            found.append((key, group[key], own))
    return found


def warn_method_overrides(optimizer_name: str, index: int, found: list[tuple[str, Any, Any]]) -> None:
    """Warns once per group for :func:`method_overrides`' findings, naming key, group value and method value."""
    if not found:
        return
    what = ", ".join(f"{k}={g!r} (the method's value: {m!r})" for k, g, m in found)
    warnings.warn(f"{optimizer_name}: param group {index} sets {what}; the group's value wins and changes the "
                  f"method. Keep method hyper-parameters on the optimizer (lro.param_groups(model, rank=...) then "
                  f"{optimizer_name}(groups, <key>=...)) or drop the key from the group",
                  MethodDefaultWarning, stacklevel=4)


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
    and ``options``); everything else (embeddings, output head, norms, biases, unselected layers) goes into
    the plain group.

    Pass method hyper-parameters (``update_proj_gap``, ``scale``, ``projector``, ...) to the optimizer, not
    here: a group key overrides the optimizer's value, so groups built with GaLore's ``update_proj_gap=200``
    would make Online Subspace Descent (period 1), DCT-AdamW (1), COAP (32) and Flora (1000) all refresh every
    200 steps. The optimizers warn (:class:`MethodDefaultWarning`) when a group contradicts such a value of
    their method; ``options`` is for deliberate per-group choices (e.g. ``weight_decay``, or a second group
    with another rank).

    Args:
        model: the model.
        rank: the low-rank group's rank.
        target_modules: see :func:`select_lowrank_modules`.
        on_no_match: ``"raise"`` (default) or ``"warn"`` when nothing matches: a silent fallback would
            turn the method into plain Adam.
        plain_options: extra keys for the plain group (e.g. ``{"weight_decay": 0.0}``).
        **options: extra keys for the low-rank group (they override the optimizer's values for it).

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
