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
from collections.abc import Iterable, Sequence
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


#: Last name components of output heads anywhere in a model: causal LMs (``lm_head``, ``output``), HF sequence
#: classifiers (``score``, ``classifier``).
HEAD_NAMES = ("lm_head", "output", "classifier", "score")
#: Names of heads only as a direct child of the model (``fc`` of torchvision's ResNets, ``head`` of timm's ViTs): inside
#: blocks the same names are hidden layers (an MLP's ``fc``, an attention ``head``).
TOP_HEAD_NAMES = ("fc", "head")


def _output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s), which ``"all-linear"`` leaves plain (as PEFT's ``"all-linear"`` does
    and GaLore's paper, which keeps the output layer full-rank):

    * ``model.get_output_embeddings()`` (HF models);
    * modules whose last name component is in :data:`HEAD_NAMES`, and direct children of the model named in
      :data:`TOP_HEAD_NAMES`;
    * of such a head that is a container (torchvision VGG's ``classifier = Sequential(Linear, ..., Linear)``), its
      last ``nn.Linear`` only: the ones before it are hidden layers (VGG's 4096 x 25088 and 4096 x 4096), which
      gain the most from a low rank.
    """
    modules = dict(model.named_modules())
    heads = {n for n in modules if n and (n.split(".")[-1] in HEAD_NAMES or n in TOP_HEAD_NAMES)}
    names = set()
    for n in heads:
        if isinstance(modules[n], nn.Linear) or not any(True for _ in modules[n].children()):
            names.add(n)
            continue
        linear = [f"{n}.{c}" for c, m in modules[n].named_modules() if c and isinstance(m, nn.Linear)]
        if linear:
            names.add(linear[-1])
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            names |= {n for n, m in modules.items() if m is head}
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


#: Module types whose ``weight`` is projected as the matrix ``out x (in * prod(kernel))`` with ``include_conv``.
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_target(target_modules: Any) -> bool:
    """Validates ``target_modules``; returns whether it is ``"all-linear"``."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear"
    if isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        if not target_modules:
            raise ValueError("Invalid target_modules: empty list")
        return False
    raise TypeError(f"Invalid target_modules: expected 'all-linear', a regex or a list of str, "
                    f"got {target_modules!r}")


def is_expert_param(module_name: str, module: nn.Module, p: torch.Tensor) -> bool:
    """Whether ``p`` (held directly by ``module``) is a stack of MoE expert matrices ``(E, ., .)``.

    HF Transformers (v5) keeps the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS,
    GraniteMoE ... as 3-D parameters (``experts.gate_up_proj``, ``experts.down_proj``) of a module named
    ``experts`` or of a class named ``*Experts``; the rule is exactly that: 3-D, and ``"expert"`` in the
    module's qualified name or class name (case-insensitive). Their 2-D per-expert biases are not stacks.
    """
    return p.dim() == 3 and ("expert" in module_name.lower() or "expert" in type(module).__name__.lower())


def is_expert_name(name: str, shape: Sequence[int] | torch.Size) -> bool:
    """:func:`is_expert_param`'s rule from a parameter's qualified ``name`` and ``shape`` alone (memory estimates,
    ``target_modules``): 3-D, and ``"expert"`` in the name (case-insensitive)."""
    return len(shape) == 3 and "expert" in name.lower()


#: Names of an MoE block's router module, a sibling of its ``experts`` (HF: ``mlp.gate`` in Mixtral, Qwen-MoE,
#: OLMoE, DeepSeek; ``mlp.router`` in GPT-OSS).
ROUTER_NAMES = ("gate", "router")


def moe_router_weights(names: Iterable[str]) -> set[str]:
    """Router weights among parameter names: ``<block>.gate.weight`` / ``<block>.router.weight`` where
    ``<block>.experts.*`` also exists. For name-only selection (no module types), where a 2-D
    ``<module>.weight`` otherwise reads as a linear layer; routers stay plain, as with ``param_groups``."""
    names = list(names)
    blocks = {n.rpartition(".experts.")[0] for n in names if ".experts." in n}
    return {f"{b}.{r}.weight" for b in blocks for r in ROUTER_NAMES} & set(names)


def _module_matches(name: str, all_linear: bool, heads: set[str], target: str | Sequence[str]) -> bool:
    return name not in heads if all_linear else _matches(name, target)


def select_lowrank_modules(model: nn.Module, target_modules: str | Sequence[str] = ("attn", "mlp"),
                           module_types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[str]:
    """Qualified names of the modules whose ``weight`` goes low-rank.

    Args:
        model: the model.
        target_modules: ``"all-linear"`` (every linear layer but the output head), a regex that must match
            the whole qualified name, or a list of fragments (substring match; a fragment with regex
            characters also matches by ``re.fullmatch``, as in HF's docs ``[r".*.attn.*"]``).
        module_types: module classes eligible (``nn.Linear`` only by default).

    See :func:`select_lowrank_params` for the full selection (MoE experts, convolutions).
    """
    all_linear = _check_target(target_modules)
    heads = _output_head_names(model)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, module_types) or getattr(module, "weight", None) is None:
            continue
        if module.weight.dim() != 2:
            continue
        if _module_matches(name, all_linear, heads, target_modules):
            chosen.append(name)
    return chosen


def select_lowrank_params(model: nn.Module, target_modules: str | Sequence[str] = ("attn", "mlp"), *,
                          include_conv: bool = False, warn: bool = True) -> dict[str, torch.Tensor]:
    """Qualified names -> tensors of the parameters that go low-rank, in ``named_parameters()`` order.

    Selected, in modules that ``target_modules`` selects (semantics of :func:`select_lowrank_modules`;
    ``"all-linear"`` selects every module but the output head):

    * the 2-D ``weight`` of every ``nn.Linear``;
    * every MoE expert stack (:func:`is_expert_param`), a 3-D ``(E, m, n)`` tensor projected as ``E``
      matrices ``m x n``, one basis each; a target may also name the parameter itself
      (``target_modules=["gate_up_proj"]`` selects ``mlp.experts.gate_up_proj``);
    * with ``include_conv=True``, the weight ``(out, in / groups, *kernel)`` of every ``nn.Conv1d/2d/3d``,
      projected as the matrix ``out x (in / groups * prod(kernel))`` (the mode-1 matricization; Tucker-style
      per-mode projection, as in Tensor-GaLore, arXiv:2501.02379, is not implemented).

    Args:
        model: the model.
        target_modules: see :func:`select_lowrank_modules`.
        include_conv: also select convolution weights (default ``False``: they stay plain, with a warning
            when a targeted module is one).
        warn: warn, by name, about every tensor of more than 2 dimensions held by a targeted module that
            is left plain (full optimizer state), e.g. a convolution without ``include_conv``.

    Raises:
        TypeError, ValueError: a malformed ``target_modules``.
    """
    all_linear = _check_target(target_modules)
    heads = _output_head_names(model)
    chosen: dict[str, torch.Tensor] = {}
    left: list[str] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        targeted = _module_matches(mname, all_linear, heads, target_modules)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            qual = f"{mname}.{pname}" if mname else pname
            if isinstance(module, nn.Linear) and pname == "weight" and p.dim() == 2:
                ok = targeted
            elif is_expert_param(mname, module, p):
                ok = targeted or (not all_linear and _matches(qual, target_modules))
            elif isinstance(module, CONV_TYPES) and pname == "weight":
                ok = targeted and include_conv
                if targeted and not include_conv:
                    left.append(f"{qual} ({type(module).__name__}, shape {tuple(p.shape)}; pass include_conv=True)")
            else:
                ok = False
                if targeted and p.dim() > 2:
                    left.append(f"{qual} ({type(module).__name__}, shape {tuple(p.shape)}; no low-rank layout)")
            if ok:
                seen.add(id(p))
                chosen[qual] = p
    if warn and left:
        what = ("'all-linear' projects nn.Linear weights and MoE expert stacks only; these weights of the modules it "
                "covers" if all_linear else f"{target_modules!r} selects modules holding weights that")
        warnings.warn(f"target_modules={what} stay plain (full optimizer state): {', '.join(left)}", UserWarning,
                      stacklevel=3)
    return chosen


def param_groups(model: nn.Module, rank: int = 128, target_modules: str | Sequence[str] = ("attn", "mlp"), *,
                 include_conv: bool = False, on_no_match: str = "raise", plain_options: dict[str, Any] | None = None,
                 include_frozen: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Splits a model's trainable parameters into a plain group and a low-rank group.

    Parameters frozen when it runs (``requires_grad=False``) are left out, as HF's Trainer does, so an optimizer
    built from these groups never steps them, even after ``requires_grad_(True)``: pass ``include_frozen=True``
    to keep them (they get no state and no step while frozen, and are stepped, hooked by
    :class:`~lowrank_optim.LayerwiseUpdater` too, once unfrozen).

    The low-rank group (which carries ``rank`` and ``options``, e.g. ``update_proj_gap``, ``scale``,
    ``projector``) holds what :func:`select_lowrank_params` selects: the ``weight`` of every selected
    ``nn.Linear``, the 3-D MoE expert stacks of selected modules (``(E, m, n)``: ``E`` matrices, one basis
    each) and, with ``include_conv=True``, convolution weights (the matrix ``out x (in * prod(kernel))``).
    Everything else (embeddings, output head, norms, biases, routers, unselected layers) goes into the
    plain group.

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
        include_conv: project the weights of selected ``nn.Conv1d/2d/3d`` modules (default ``False``, with
            a warning naming each targeted convolution left plain).
        on_no_match: ``"raise"`` (default) or ``"warn"`` when nothing matches: a silent fallback would
            turn the method into plain Adam.
        plain_options: extra keys for the plain group (e.g. ``{"weight_decay": 0.0}``).
        include_frozen: keep parameters with ``requires_grad=False`` (default ``False``: left out).
        **options: extra keys for the low-rank group (they override the optimizer's values for it).

    Returns:
        ``[{"params": plain, ...}, {"params": lowrank, "rank": rank, ...}]``, plus, with ``include_conv``, a
        third group ``{"params": convs, "rank": rank, ..., "nd_layout": "conv"}`` (the engine's group key that
        reads every N-D tensor of the group as a convolution, a 3-D ``Conv1d`` weight included); empty groups
        left out.

    Raises:
        ValueError: a bad ``rank`` / ``on_no_match``, flattened parameters (FSDP1, ZeRO-3), or nothing
            selected with ``on_no_match="raise"``.
        TypeError: a malformed ``target_modules``, ``include_conv`` or ``include_frozen``.
    """
    check_int("rank", rank, low=1)
    check_choice("on_no_match", on_no_match, ("raise", "warn"))
    for flag, value in (("include_conv", include_conv), ("include_frozen", include_frozen)):
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {flag}: expected a bool, got {value!r}")
    if any(is_flattened(p) for p in model.parameters()):
        raise ValueError(f"Invalid model: {type(model).__name__} holds flattened parameters; {FLATTENED_HINT}")
    selected = select_lowrank_params(model, target_modules, include_conv=include_conv)
    convs = {id(m.weight) for m in model.modules() if isinstance(m, CONV_TYPES)}
    lowrank = [p for p in selected.values() if p.requires_grad or include_frozen]
    chosen = {id(p) for p in lowrank}
    conv_params = [p for p in lowrank if id(p) in convs]
    lowrank = [p for p in lowrank if id(p) not in convs]
    if not lowrank and not conv_params:
        kinds = ("nn.Linear weight, MoE expert stack or convolution weight" if include_conv
                 else "nn.Linear weight or MoE expert stack")
        msg = (f"target_modules={target_modules!r} matched no {kinds} of {type(model).__name__}; "
               "the optimizer would silently be plain Adam")
        if on_no_match == "raise":
            raise ValueError(f"Invalid target_modules: {msg}")
        warnings.warn(msg, UserWarning, stacklevel=2)
    plain = [p for p in model.parameters() if (p.requires_grad or include_frozen) and id(p) not in chosen]
    groups: list[dict[str, Any]] = []
    if plain:
        groups.append({"params": plain, **(plain_options or {})})
    if lowrank:
        groups.append({"params": lowrank, "rank": rank, **options})
    if conv_params:  # their own group: a Conv1d weight is 3-D, which the engine would otherwise read as experts
        groups.append({"params": conv_params, "rank": rank, **options, "nd_layout": "conv"})
    return groups
