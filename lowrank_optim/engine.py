"""The one optimizer engine every named method is a preset of: construction, groups, step orchestration.

For each parameter with a gradient, one ``step()``:

1. checks every gradient once for inf/NaN (:mod:`lowrank_optim.nonfinite`) before any state changes;
2. decides low-rank or plain (:mod:`lowrank_optim.plan`): a 2-D parameter in a group that carries ``rank``
   (not ``None``) goes low-rank; everything else (1-D tensors, other groups) gets the plain inner rule;
3. refreshes the projector on its schedule (:mod:`lowrank_optim.schedule`: every ``update_proj_gap`` steps,
   at steps ``T, 2T, ...`` after the first), then lets the transfer policy rewrite the moments;
4. projects the gradient, runs the inner rule with moments loaded from the state store, adds the residual
   rule's full-rank step, projects back, and applies decoupled weight decay computed from the pre-update
   weight (``p <- p (1 - lr wd)`` first, torch AdamW's order) (:mod:`lowrank_optim.update`).

All math runs in fp32. Optimizer state is plain tensors and ints, so ``state_dict()`` survives
``torch.load(weights_only=True)``; :meth:`load_state_dict` keeps every saved dtype
(:mod:`lowrank_optim.checkpoint`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ._validation import TORCH_SPEED_FLAGS, check_choice, check_int, check_number, check_torch_flag, plain
from .checkpoint import adopt_foreign_state, closed_form_bytes, load_state, refuse_misfit_state, state_bytes
from .distributed import checkpoint as _checkpoint
from .distributed import fsdp as _fsdp
from .distributed import shards as _shards
from .groups import method_overrides, warn_method_overrides
from .nonfinite import NONFINITE_POLICIES, check_grad, gradients_ok, probed
from .plan import ND_LAYOUTS, Planner, matrix_shape, n_matrices, nd_kind, refuse_flattened
from .projectors import COMMON_OPTIONS, PROJECTORS, SIDE_RULES, make_projector, refuse_misplaced_options
from .rules import INNER_RULES, RESIDUAL_RULES, TRANSFER_POLICIES
from .schedule import refresh_due, stagger_phase
from .stacks import StackCache, Unit, apply_units
from .state import STATE_DTYPES, StateStore
from .targets import validate_target_modules
from .update import PENDING, Parts, apply_step, init_state, init_subspace, refresh

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

#: Keys every group has (engine-level); rule hyper-parameters come on top.
ENGINE_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.0,
    "rank": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "projector": "svd",
    "proj_side": "std",
    "projector_options": None,
    "state_dtype": "fp32",
    "inner": "adam",
    "plain_inner": None,
    "residual": "drop",
    "transfer": "keep",
    "nonfinite": "skip",
    "seed": 0,
    "target_modules": None,
    "nd_layout": "auto",
    "refresh_stagger": False,
    "include_conv": False,  # with target_modules: also select convolution weights (lowrank_optim.targets)
    "differentiable": False,  # torch's __setstate__ adds it on load; kept so groups round-trip unchanged
    "maximize": False,  # torch.optim's meaning: step along +grad (the rules see -grad), p.grad left unchanged
}


class LowRankOptimizer(torch.optim.Optimizer):
    """Base class of every optimizer in the package (see the module docstring for the loop).

    Args:
        params: parameters or param groups. A group is low-rank when it carries ``rank``.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        rank: default rank for every group (``None``: groups are plain unless they set ``rank``).
        update_proj_gap: refresh the subspace every this many steps.
        scale: multiplier of the back-projected low-rank update (GaLore's alpha).
        projector: projector name (``"svd"``, ``"rsvd"``, ...), see :func:`make_projector`.
        proj_side: side rule, ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"``.
        projector_options: extra keyword options for the projector.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"`` moment storage.
        inner: inner rule name (``"adam"``, ``"adafactor"``, ``"sgd"``, ``"muon"``, ...).
        plain_inner: inner rule of the plain path (params that are not projected); ``None``: same as
            ``inner`` (GUM: Muon on projected matrices, Adam on embeddings, norms and biases).
        residual: residual rule name (``"drop"``, ...).
        transfer: transfer policy on refresh (``"keep"``, ``"reset"``, ...).
        nonfinite: what a step does when any gradient holds inf/NaN: ``"skip"`` (default: the whole
            step is skipped, no state changes, a ``RuntimeWarning``), ``"raise"``
            (``FloatingPointError``, no state changes) or ``"ignore"`` (no check; use only when a
            ``GradScaler`` already skips such steps).
        seed: base seed of every random choice (random projectors, rsvd sketches).
        nd_layout: how a tensor of more than two dimensions in a low-rank group is seen as matrices:
            ``"auto"`` (3-D: MoE experts, a stack of matrices; 4-D: conv, ``out x (in * kh * kw)``; others
            refused), ``"experts"`` or ``"conv"`` (:mod:`lowrank_optim.plan`).
        refresh_stagger: spread the group's refreshes over the period, each matrix at its own phase
            (default False; :mod:`lowrank_optim.schedule`).
        target_modules: restricts the low-rank path of a group carrying ``rank`` to the weights of the
            modules it selects (:func:`lowrank_optim.select_lowrank_modules` semantics), resolved at the
            first step; for groups built by someone else (HF Trainer's ``optimizer_cls_and_kwargs``).
            Parameter names come from ``module`` or from torch's named param groups (``param_names``).
        include_conv: with ``target_modules``, also project the selected convolution weights (default
            ``False``; see :func:`lowrank_optim.select_lowrank_params`).
        maximize: step to maximize the objective (default False), as in ``torch.optim``: every rule sees
            ``-grad``; ``p.grad`` is left unchanged.
        foreach: accepted for ``torch.optim`` compatibility (``None``, ``True`` or ``False``) and ignored: the
            engine batches its matrices itself and the result does not depend on it; not a group key.
        fused, capturable: accepted when ``None`` or ``False`` (``torch.optim``'s defaults); ``True`` raises a
            ``ValueError`` naming the flag (no fused kernel; a step cannot be CUDA-graph captured).
        differentiable: only ``False`` (steps run under ``torch.no_grad``); ``True`` raises a ``ValueError``.
        module: the model whose ``named_modules()`` resolve ``target_modules`` (kept by reference, never
            saved in the state dict; not a group key).
        **hyper: hyper-parameters of the inner / residual rule (``betas``, ``eps``, ...).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {}
    #: Step the projected matrices of a group together (:mod:`lowrank_optim.stacks`); False: one by one through
    #: :func:`lowrank_optim.update.apply_step` (the reference path; equal to rounding).
    batched: bool = True

    def __init__(self, params: ParamsT, lr: float | None = 1e-3, **kwargs: Any) -> None:
        module = kwargs.pop("module", None)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"Invalid module: expected an nn.Module, got {type(module).__name__}")
        self._module: torch.nn.Module | None = module
        for flag in TORCH_SPEED_FLAGS:  # torch's implementation switches: checked, not stored (_validation)
            if flag in kwargs:
                check_torch_flag(flag, kwargs.pop(flag))
        defaults: dict[str, Any] = {"lr": lr, **ENGINE_DEFAULTS, **self.preset_defaults}
        if "proj_type" in kwargs:  # galore-torch's name for the side rule, checked under it
            kwargs["proj_side"] = check_choice("proj_type", kwargs.pop("proj_type"), SIDE_RULES)
        inner = kwargs.get("inner", defaults["inner"])
        residual = kwargs.get("residual", defaults["residual"])
        plain = kwargs.get("plain_inner", defaults["plain_inner"])
        plain = inner if plain is None else plain
        for table, name, key in ((INNER_RULES, inner, "inner"), (RESIDUAL_RULES, residual, "residual"),
                                 (INNER_RULES, plain, "plain_inner")):
            if isinstance(name, str) and name in table:
                for k, v in table[name].defaults.items():
                    defaults.setdefault(k, v)
            else:
                check_choice(key, name, sorted(table))
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            owners = sorted(n for n, rule in {**INNER_RULES, **RESIDUAL_RULES}.items()
                            if set(unknown) <= set(rule.defaults))
            hint = ""
            if owners and type(self) is not LowRankOptimizer:
                # a preset passes its own rule's settings (GaLoreAdamW: Adam's betas and eps), which the rules chosen
                # instead do not read
                hint = (f": they are settings of {owners} (this preset passes its own), which inner={inner!r}, "
                        f"plain_inner={kwargs.get('plain_inner', defaults['plain_inner'])!r} and "
                        f"residual={residual!r} do not read; keep the preset's rule for the plain parameters with "
                        f"plain_inner={owners[0]!r}, or build LowRankOptimizer(inner={inner!r}, ...)")
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}{hint}")
        defaults.update(kwargs)
        self._parts_cache: dict[tuple, Parts] = {}
        self._stacks = StackCache()  # arenas and transposed bases kept between steps (lowrank_optim.stacks)
        self._planner = Planner([], module)
        super().__init__(params, defaults)
        self._planner.param_groups = self.param_groups
        if (any(g["target_modules"] is not None for g in self.param_groups)
                and all(g["rank"] is None for g in self.param_groups)):
            raise ValueError(f"Invalid target_modules: {self.param_groups[0]['target_modules']!r} without rank: only "
                             f"a group with rank is projected, so every weight would keep full {inner!r} state; give "
                             "rank= (GaLore's paper: 128 at 60M, 512 at 1B) or groups from lro.param_groups(model, "
                             "rank=...)")

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group (torch semantics) after validating every hyper-parameter it will use.

        The group dict is copied first, so one ``param_groups(...)`` list can build several optimizers
        without the first one's defaults leaking into the second. A group that explicitly contradicts a
        value defining this optimizer's method (its own refresh period, scale, parts) gets a
        :class:`lowrank_optim.groups.MethodDefaultWarning` naming the key and both values.
        """
        given: set[str] = set()
        if isinstance(param_group, dict):
            param_group = dict(param_group)
            if "proj_type" in param_group:
                param_group["proj_side"] = check_choice("proj_type", param_group.pop("proj_type"), SIDE_RULES)
            if "projector" in param_group and "projector_options" not in param_group:
                param_group["projector_options"] = self._inherited_options(param_group["projector"])
            given = set(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        warn_method_overrides(type(self).__name__, len(self.param_groups) - 1,  # before a refusal, to explain it
                              method_overrides(group, given, self.defaults, ENGINE_DEFAULTS, set(self.preset_defaults)))
        try:
            self._validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        inner = INNER_RULES[check_choice("inner", group["inner"], sorted(INNER_RULES))]
        residual = RESIDUAL_RULES[check_choice("residual", group["residual"], sorted(RESIDUAL_RULES))]
        plain = group.get("plain_inner")
        plain_rule = inner if plain is None else INNER_RULES[check_choice("plain_inner", plain, sorted(INNER_RULES))]
        for rule in (inner, residual, plain_rule):
            for k, v in rule.defaults.items():
                group.setdefault(k, v)
        for k, v in group.items():  # plain numbers in the group (and so in the state dict), see _plain_value
            if k != "params":
                group[k] = _plain_value(k, v)
        for flag in TORCH_SPEED_FLAGS:  # a group built for torch.optim.AdamW(fused=True, ...) is refused, not ignored
            if flag in group:
                check_torch_flag(flag, group[flag])
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"Invalid maximize: expected a bool, got {group['maximize']!r}")
        if group["differentiable"] is not False:
            raise ValueError(f"Invalid differentiable: {group['differentiable']!r} (steps run under torch.no_grad "
                             "and in place: no gradient flows through the update; only False is supported)")
        if group["lr"] is not None:
            group["lr"] = check_number("lr", group["lr"], low=0.0)
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["rank"] is not None:
            group["rank"] = check_int("rank", group["rank"], low=1)
        group["update_proj_gap"] = check_int("update_proj_gap", group["update_proj_gap"], low=1)
        group["scale"] = check_number("scale", group["scale"], low=0.0, low_open=True)
        check_choice("projector", group["projector"], sorted(PROJECTORS))
        check_choice("proj_side", group["proj_side"], SIDE_RULES)
        opts = group["projector_options"]
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"Invalid projector_options: expected a dict, got {opts!r}")
        check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        check_choice("transfer", group["transfer"], sorted(TRANSFER_POLICIES))
        check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
        group["seed"] = check_int("seed", group["seed"], low=0)
        if group["target_modules"] is not None:
            validate_target_modules(group, self._module)
            self._planner.reset()
        check_choice("nd_layout", group["nd_layout"], ND_LAYOUTS)
        refuse_duplicates(group)
        if group["include_conv"] is True and group["target_modules"] is None and group["rank"] is not None:
            raise ValueError("Invalid include_conv: True without target_modules (it adds convolution weights to "
                             "what target_modules selects; without target_modules every weight of a group with "
                             "rank, convolutions included, is projected already)")
        if not isinstance(group["refresh_stagger"], bool):
            raise TypeError(f"Invalid refresh_stagger: expected a bool, got {group['refresh_stagger']!r}")
        if group["rank"] is not None:
            refuse_flattened(group)
            if group["target_modules"] is None:  # else refused at the first step, once the targets are known
                for i, p in enumerate(group["params"]):
                    nd_kind(group, p, i)
        for i, p in enumerate(group["params"]):
            if _shards.is_dtensor(p):
                _shards.check_placement(p, f"parameter {i} (shape {tuple(p.shape)})")
        inner.validate(group)
        residual.validate(group)
        if plain_rule is not inner:
            plain_rule.validate(group)
        if group["lr"] is None:
            for key, rule in (("inner", inner), ("plain_inner", plain_rule)):
                if rule.requires_lr(group):
                    raise ValueError(f"Invalid lr: None ({key}={rule.name!r} needs a learning rate; only "
                                     "inner='adafactor' with relative_step=True computes its own)")
        if group["rank"] is not None:
            parts = self._parts(group)  # builds the projector now: bad options fail here
            if group["refresh_stagger"] and parts.projector.stagger_refusal is not None:
                raise ValueError(f"Invalid refresh_stagger: True for projector {parts.projector.name!r}: "
                                 f"{parts.projector.stagger_refusal}")
            refuse_misplaced_options(group, parts.projector, {*self.defaults, *ENGINE_DEFAULTS, *inner.defaults,
                                                              *residual.defaults, *plain_rule.defaults},
                                     {**self._inherited_options(group["projector"]),
                                      **(group["projector_options"] or {})})
            # combinations that cannot work are refused by name
            parts.residual.check_projector(parts.projector, group)
            parts.transfer.check_projector(parts.projector, group)
            parts.inner.check_projector(parts.projector, group)
        self.__dict__.setdefault("_validated", {})[id(group)] = (group, _snapshot(group))

    def _revalidate(self, group: dict[str, Any]) -> None:
        """Validates ``group`` again when a key differs from its last validation (a value set on
        ``param_groups`` after construction, a group loaded from a state dict), raising the same
        ``ValueError`` / ``TypeError`` as at construction instead of an error deep in the step.

        Cost per call: one comparison per key, on the host (no device read); a float ``lr`` (an LR scheduler's
        per-step change) is checked on its own, so it never triggers a full validation."""
        entry = self.__dict__.setdefault("_validated", {}).get(id(group))
        lr = group.get("lr")
        if (entry is not None and entry[0] is group and type(lr) is float and lr >= 0.0
                and len(group) - sum(k in group for k in _UNSNAPPED) == len(entry[1])  # no key added since
                and all(k in group and _same(group[k], v) for k, v in entry[1].items())):
            return
        self._validate_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._parts_cache = {}
        self._stacks = StackCache()
        self.__dict__.setdefault("_module", None)
        self._planner = Planner(self.param_groups, self._module)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def _inherited_options(self, projector: Any) -> dict[str, Any]:
        """The optimizer-level ``projector_options`` a group with ``projector`` inherits: all of them for the
        optimizer's own projector; for another one those it takes (its keyword arguments and
        :data:`COMMON_OPTIONS`). A preset's options belong to its projector (APOLLO's and Flora's ``distribution``,
        COAP's correction, DCT-AdamW's path and score), so ``APOLLO`` with a group on ``"svd"`` (the paper's SVD
        variant) is not refused, while an ``oversample`` given for groups on ``"rsvd"`` still reaches them."""
        inherited = dict(self.defaults.get("projector_options") or {})
        if projector != self.defaults.get("projector") and projector in PROJECTORS:
            params = inspect.signature(PROJECTORS[projector].__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                inherited = {k: v for k, v in inherited.items() if k in params or k in COMMON_OPTIONS}
        return inherited

    def _parts(self, group: dict[str, Any]) -> Parts:
        """The (cached) strategy objects a group's keys select."""
        # a group's own options refine the optimizer-level ones instead of replacing them
        opts = {**self._inherited_options(group["projector"]), **(group["projector_options"] or {})}
        key = (group["projector"], group["rank"], group["proj_side"], repr(sorted(opts.items())), group["inner"],
               group["residual"], group["transfer"], group["state_dtype"])
        parts = self._parts_cache.get(key)
        if parts is None:
            proj = None
            if group["rank"] is not None:
                proj = make_projector(group["projector"], group["rank"], side=group["proj_side"], **opts)
            parts = Parts(proj, INNER_RULES[group["inner"]], RESIDUAL_RULES[group["residual"]],
                          TRANSFER_POLICIES[group["transfer"]], StateStore(group["state_dtype"]))
            self._parts_cache[key] = parts
        return parts

    @staticmethod
    def is_lowrank(group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``p``'s shape takes the low-rank path in ``group`` (before ``target_modules``)."""
        return Planner.is_lowrank(group, p)

    def _layout(self, group: dict[str, Any], p: torch.Tensor) -> tuple[int, int, int]:
        """``(position, count, group seed)`` of ``p`` among the group's projected matrices
        (:meth:`lowrank_optim.plan.Planner.layout`; FSDP2's row-local projectors ask for it)."""
        return self._planner.layout(group, p)

    def _targeted(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``group["target_modules"]`` (if any) selects ``p`` (:meth:`lowrank_optim.plan.Planner.targeted`)."""
        return self._planner.targeted(group, p)

    # -- step -----------------------------------------------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step (torch conventions: the closure runs with grad enabled).

        Runs eagerly inside ``torch.compile``d code (a graph break): refreshes (SVD, QR, index choice),
        8-bit codecs and per-step int counters are data-dependent, and tracing them would recompile on
        every step; the model's forward and backward around it still compile.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # values changed since construction: refused before any state changes
            self._revalidate(group)
        work: list[tuple[dict[str, Any], torch.Tensor, int]] = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                check_grad(type(self).__name__, p, index - 1)
                work.append((group, p, index - 1))
        plans = self._plain_plans(work)
        if not work or not gradients_ok(type(self).__name__, [(g, p) for g, p, _ in work],
                                        {key: plan.probes for key, plan in plans.items()}):
            return loss
        by_group: dict[int, list[tuple[torch.Tensor, int]]] = {}
        groups: dict[int, dict[str, Any]] = {}
        for group, p, idx in work:
            if _shards.is_dtensor(p):  # FSDP2: lowrank_optim.distributed.fsdp
                _fsdp.step_param(self, group, p, idx)
                continue
            by_group.setdefault(id(group), []).append((p, idx))
            groups[id(group)] = group
        for key, items in by_group.items():
            self._step_group(groups[key], items, plans=plans)
        return loss

    def _plain_plans(self, work: list[tuple[dict[str, Any], torch.Tensor, int]]) -> dict[int, Any]:
        """``{id(p): plan}`` for the plain parameters of ``work`` whose inner rule computes, before the non-finite
        check, reductions of the gradient the check reads in its place (:func:`lowrank_optim.nonfinite.probed`:
        large fp32 matrices on the CPU with existing state; Adafactor's statistics,
        :meth:`~lowrank_optim.rules.base.InnerRule.plan_plain`). Nothing in the state changes here."""
        plans: dict[int, Any] = {}
        for group, p, _ in work:
            state = self.state.get(p)
            if not state or not probed(group, p):
                continue
            parts, kind = self._route(group, p)
            if kind is not None or parts.store.dtype != "fp32":
                continue
            specs = parts.inner.moments(tuple(p.shape), group)
            if any(s.name not in state for s in specs):  # a state the step itself will refuse
                continue
            moments = {s.name: state[s.name] for s in specs}
            plan = parts.inner.plan_plain(p, p.grad, moments, state["inner_step"] + 1, group)
            if plan is not None:
                plans[id(p)] = plan
        return plans

    @torch.compiler.disable
    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Steps ``param`` alone, with the same state, seeds and math as :meth:`step` (for layer-wise
        updates from gradient hooks, :mod:`lowrank_optim.layerwise`); the non-finite check covers this
        one gradient. A parameter without a gradient is left alone."""
        group, index = self._locate(param)
        if _shards.is_dtensor(param):
            raise ValueError("Invalid param: step_parameter does not support FSDP2 (DTensor) parameters; call step()")
        if param.grad is not None:
            check_grad(type(self).__name__, param, index)
            if gradients_ok(type(self).__name__, [(group, param)]):
                self._step_group(group, [(param, index)])

    def _locate(self, param: torch.Tensor) -> tuple[dict[str, Any], int]:
        """``(group, index)`` of ``param`` (its position over all groups, the seed's identity)."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return group, index
                index += 1
        raise ValueError(f"Invalid param: a tensor of shape {tuple(param.shape)} that is not in this optimizer")

    def _route(self, group: dict[str, Any], p: torch.Tensor) -> tuple[Parts, str | None]:
        """The parts that step ``p`` and its kind (``None``: plain, which gets ``plain_inner``), see
        :mod:`lowrank_optim.plan`."""
        parts = self._parts(group)
        kind = self._planner.kind(group, p) if parts.projector is not None else None
        if kind is None and group.get("plain_inner") is not None:
            parts = parts._replace(inner=INNER_RULES[group["plain_inner"]])
        return parts, kind

    def _step_param(self, group: dict[str, Any], p: torch.Tensor, index: int, *, param: torch.Tensor | None = None,
                    grad: torch.Tensor | None = None, first_matrix: int = 0) -> None:
        """Steps ``p`` (state ``self.state[p]``, same math as :meth:`step`); ``param`` / ``grad`` replace ``p`` /
        ``p.grad`` as the tensors computed on (FSDP2's replicated mode passes the gathered weight and gradient; its
        expert-sharded mode this rank's experts, whose first is matrix ``first_matrix`` of the whole stack)."""
        tensors = None if param is None and grad is None else {
            id(p): (p if param is None else param, p.grad if grad is None else grad)}
        self._step_group(group, [(p, index)], tensors=tensors, first_matrix=first_matrix)

    def _step_group(self, group: dict[str, Any], items: list[tuple[torch.Tensor, int]], init_only: bool = False,
                    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    first_matrix: int = 0, plans: dict[int, Any] | None = None) -> None:
        """Steps the parameters ``items`` (``(param, index)``) of ``group``: plain ones one by one, projected
        matrices initialised / refreshed one by one, then stepped together (:func:`lowrank_optim.stacks.apply_units`)
        with the ones the batched kernels cannot take going through :func:`lowrank_optim.update.apply_step`.
        ``init_only`` allocates missing state and steps nothing (:meth:`init_param_state`); ``tensors`` maps
        ``id(param)`` to the ``(weight, gradient)`` computed on in its place (:meth:`_step_param`); an expert stack's
        matrices there are matrices ``first_matrix, first_matrix + 1, ...`` of the whole stack (their seeds, layout
        positions and refresh phases); ``plans`` the plain parameters' plans made before the non-finite check
        (:meth:`_plain_plans`)."""
        self._revalidate(group)
        group_parts = self._parts(group)
        phases = self._phases(group) if group.get("refresh_stagger") and group_parts.projector is not None else None
        units: list[Unit] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p, index in items:
            parts, kind = self._route(group, p)
            state = self.state[p]
            w, g = tensors.get(id(p), (p, p.grad)) if tensors is not None else (p, p.grad)
            grad = g if g.dtype == torch.float32 else g.float()
            if group.get("maximize"):  # a new tensor: p.grad keeps the user's value, as in torch.optim
                grad = torch.neg(grad)
            if kind is None:
                if not state:
                    init_state(state, group, w, grad, None, parts.inner, parts.store, index)
                if not init_only:
                    apply_step(state, group, w, grad, parts, False, plans.get(id(p)) if plans else None)
                continue
            if kind == "matrix":  # already (m, n): no view to dispatch
                pm, gm = w, grad
            else:
                shape = matrix_shape(w, kind)  # w: the whole parameter, or an FSDP2 rank's experts
                pm, gm = _view_or_copy(w, shape), grad.reshape(shape)
            first = phases[id(p)] if phases is not None else 0
            if kind == "experts":
                if not state:
                    state["step"] = 0
                    state["matrices"] = [{} for _ in range(shape[0])]
                for e, sub in enumerate(state["matrices"], start=first_matrix):
                    phase = stagger_phase(first + e, phases["count"], group["update_proj_gap"]) if phases else 0
                    unit = self._prepare(sub, group, p, pm[e - first_matrix], gm[e - first_matrix], parts, index, e,
                                         phase, init_only)
                    if unit is not None:
                        units.append(unit)
                if not init_only:
                    state["step"] += 1
            else:
                phase = stagger_phase(first, phases["count"], group["update_proj_gap"]) if phases else 0
                unit = self._prepare(state, group, p, pm, gm, parts, index, None, phase, init_only)
                if unit is not None:
                    units.append(unit)
            if pm.data_ptr() != w.data_ptr():  # stepped through a copy (a non-contiguous conv weight)
                copies.append((w, pm))
        if init_only:
            return
        rest = apply_units(units, group, group_parts, self._stacks) if self.batched else units
        for u in rest:
            apply_step(u.state, group, u.param, u.grad, group_parts, True)
        for p, pm in copies:
            p.copy_(pm.view(p.shape))

    def _prepare(self, state: dict, group: dict[str, Any], p: torch.Tensor, pm: torch.Tensor, gm: torch.Tensor,
                 parts: Parts, index: int, matrix: int | None, phase: int, init_only: bool) -> Unit | None:
        """Initialises (first step) or refreshes (on schedule) one projected matrix ``pm`` of parameter ``p``
        (matrix ``matrix`` of a stack); returns the unit to step (``None`` with ``init_only``)."""
        layout = lambda: self._planner.layout(group, p, matrix or 0)  # noqa: E731
        # a projector's init / update runs on one rank and is broadcast when refreshes are divided (DDP's
        # divide_refresh, FSDP2's replicated mode), lowrank_optim.distributed.fsdp.once
        once = lambda compute: _fsdp.once(self, compute, index, matrix or 0)  # noqa: E731 (an expert stack's
        # matrices are spread over the ranks too)
        if not state:
            init_state(state, group, pm, gm, parts.projector, parts.inner, parts.store, index, layout, matrix,
                       once=once)
        elif init_only:
            return None
        elif PENDING in state:
            init_subspace(state, group, pm, gm, parts.projector, parts.inner, parts.store, index, layout, matrix)
        elif refresh_due(state["step"], group["update_proj_gap"], phase):
            refresh(state, group, pm, gm, parts.projector, parts.inner, parts.transfer, parts.store, layout,
                    once=once)
        return None if init_only else Unit(state, pm, gm)

    def _phases(self, group: dict[str, Any]) -> dict[Any, int]:
        """``{id(p): position of p's first matrix, "count": matrices}`` over the group's projected parameters
        (the staggered schedule's identity of a matrix, :mod:`lowrank_optim.schedule`). Memoized per group and
        keyed by its parameter list's identity and length: FSDP2 and the layer-wise updater ask once per parameter
        per step, which recomputing made quadratic in the group's size."""
        params = group["params"]
        memo = self.__dict__.setdefault("_phase_memo", {})
        hit = memo.get(id(group))
        if hit is not None and hit[0] is params and hit[1] == len(params):
            return hit[2]
        out: dict[Any, int] = {}
        count = 0
        for q in group["params"]:
            kind = self._planner.kind(group, q)
            if kind is not None:
                out[id(q)] = count
                count += n_matrices(q, kind)
        out["count"] = count
        memo[id(group)] = (params, len(params), out)
        return out

    def init_param_state(self, param: torch.Tensor) -> None:
        """Allocates ``param``'s state exactly as its first step would, from ``param.grad`` (no rule math);
        for closed-form memory estimates on the meta device (:mod:`lowrank_optim.memory`)."""
        group, index = self._locate(param)
        self._step_group(group, [(param, index)], init_only=True)

    # -- memory and checkpoints -----------------------------------------------------------------
    def state_bytes(self) -> int:
        """Exact bytes of every tensor held in optimizer state (storage shared by tensors counted once)."""
        return state_bytes(list(self.state.values()))

    def global_state_bytes(self) -> int:
        """Bytes of optimizer state held by all ranks together: :meth:`state_bytes` summed over the default
        process group (equal to :meth:`state_bytes` in one process). Every rank must call it."""
        return _fsdp.sum_over_ranks(self.state_bytes())

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; under FSDP2 the sharded state of each ``DTensor`` parameter is wrapped as
        ``DTensor``s on its mesh (row or column chunks; 8-bit moments dequantized to fp32, requantized on load),
        so ``torch.distributed.checkpoint`` saves, gathers and reshards it."""
        return _checkpoint.export_state(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping every saved tensor's dtype (only the device follows the parameter).

        ``torch.optim.Optimizer.load_state_dict`` casts each state tensor of a floating-point parameter to
        the parameter's dtype, which would turn 8-bit codes, int indices and fp32 moments of bf16
        parameters into something else; here tensors are copied to the parameter's device unchanged.
        """
        state_dict = state_dict.copy()  # torch's order: pre-hooks first, on the whole state dict (their result wins)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        warn_method_changes(type(self).__name__, self.param_groups, state_dict)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # load_state runs torch's load on the groups
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # alone: its hooks would see an empty state
        before = {"state": self.state, "param_groups": self.param_groups}
        try:
            load_state(self, adopt_foreign_state(self, _checkpoint.import_state(self, state_dict)))
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        self._parts_cache = {}
        self._stacks = StackCache()
        _checkpoint.requantize(self)  # first: 8-bit moments exported with per-element scales get their blocks back
        self._planner.reset()
        try:
            refuse_misfit_state(self)  # state of another model's parameters: refused before it reaches a kernel
        except ValueError:
            self.__setstate__(before)  # the optimizer as it was before the call
            self._planner.reset()
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():  # on the loaded state, as torch's
            post_hook(self)


def refuse_duplicates(group: dict[str, Any]) -> None:
    """Raises for a tensor listed twice in one group's ``params``.

    torch only warns ("in future, this will cause an error"), and both entries share one state: the
    per-matrix path steps the tensor twice per ``step()`` (two Adam updates from one gradient, ``step`` counted
    twice), while the batched path (:mod:`lowrank_optim.stacks`) puts both entries in one stack whose arena
    gives the shared state the second entry's view, so the two paths silently disagree. Two groups sharing a
    tensor are refused by torch already.

    Raises:
        ValueError: naming both positions and the shape.
    """
    seen: dict[int, int] = {}
    for i, p in enumerate(group["params"]):
        j = seen.setdefault(id(p), i)
        if j != i:
            raise ValueError(f"Invalid params: parameters {j} and {i} of a group are the same tensor (shape "
                             f"{tuple(p.shape)}); list each parameter once (a tied weight is one parameter)")


#: Group keys that define the method: a state dict whose groups carry other values turns this optimizer into
#: another method on load (torch semantics: the saved hyper-parameters win), which :func:`warn_method_changes` says.
METHOD_KEYS = ("inner", "plain_inner", "residual", "transfer", "projector", "rank", "state_dtype", "projector_options")


def warn_method_changes(name: str, groups: list[dict[str, Any]], state_dict: Any) -> None:
    """Warns (:class:`lowrank_optim.groups.MethodDefaultWarning`) for each :data:`METHOD_KEYS` value a state dict's
    groups would replace in ``groups`` on load (``GaLoreAdamW`` loading a GUM checkpoint runs GUM afterwards; an
    8-bit optimizer loading an fp32 checkpoint stores fp32). The load goes on, as ``torch.optim`` loads the saved
    hyper-parameters; build the optimizer as it was saved to silence it."""
    import warnings

    from .groups import MethodDefaultWarning

    saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved, list) or len(saved) != len(groups):
        return
    changes = [f"group {i} {k}={old[k]!r} -> {new[k]!r}" for i, (old, new) in enumerate(zip(groups, saved, strict=True))
               if isinstance(new, dict) for k in METHOD_KEYS if k in new and k in old and not _same(old[k], new[k])
               and not (k == "projector_options" and (old[k] or None) == (new[k] or None))]
    if changes:
        warnings.warn(f"{name}.load_state_dict: the state dict's groups replace this optimizer's method keys ("
                      f"{'; '.join(changes)}); the loaded optimizer runs the saved method (torch semantics: saved "
                      "hyper-parameters win). Build the optimizer with the saved settings to silence this.",
                      MethodDefaultWarning, stacklevel=3)


#: Group keys a snapshot leaves out: the parameters, and the lr a scheduler changes every step (checked alone).
_UNSNAPPED = ("params", "lr", "initial_lr")


def _snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """The validated values of ``group`` (copies of its dicts and lists, so an in-place edit shows)."""
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in group.items() if k not in _UNSNAPPED}


def _same(a: Any, b: Any) -> bool:
    """Whether a group value equals its snapshot (same type first, so a tensor is never compared to a number)."""
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


def _plain_value(key: str, value: Any) -> Any:
    """A group value as stored: NumPy scalars as Python numbers (:func:`lowrank_optim._validation.plain`) and a
    one-element tensor hyper-parameter (``lr=torch.tensor(1e-3)``, ``betas`` of tensors, which ``torch.optim``
    accepts) as the Python number it holds. The engine computes its per-step scalars in Python, so a tensor ``lr``
    would cost a host sync every step; stored as a number it costs one, here, and the state dict stays plain."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise TypeError(f"Invalid {key}: a tensor of shape {tuple(value.shape)}"
                            f"{' that requires grad' if value.requires_grad else ''} (expected a number)")
        return check_int(key, value) if not value.is_floating_point() else check_number(key, value)
    if isinstance(value, tuple):  # betas=(torch.tensor(0.9), ...), as torch.optim takes them
        return tuple(_plain_value(f"{key}[{i}]", v) for i, v in enumerate(value))
    return plain(value)


def _view_or_copy(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``p`` seen as ``shape``: a view when its strides allow (writes go straight to ``p``), else a copy."""
    try:
        return p.view(shape)
    except RuntimeError:
        return p.reshape(shape).clone()


__all__ = ["ENGINE_DEFAULTS", "NONFINITE_POLICIES", "LowRankOptimizer", "closed_form_bytes"]
