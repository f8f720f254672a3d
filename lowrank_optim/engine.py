"""The one optimizer engine every named method is a preset of.

For each parameter with a gradient, one ``step()``:

1. decides low-rank or plain: a 2-D parameter in a group that carries ``rank`` (not ``None``) goes
   low-rank; everything else (1-D tensors, other groups) gets the plain inner rule;
2. refreshes the projector every ``update_proj_gap`` steps (at steps ``T, 2T, ...`` after the first),
   then lets the transfer policy rewrite the moments for the new subspace;
3. projects the gradient, runs the inner rule on it with moments loaded from the state store,
   and writes the moments back;
4. adds the residual rule's full-rank step, projects back, and applies decoupled weight decay computed
   from the pre-update weight (``p <- p (1 - lr wd)`` first, torch AdamW's order).

All math runs in fp32. Optimizer state is plain tensors and ints, so ``state_dict()`` survives
``torch.load(weights_only=True)``; :meth:`load_state_dict` keeps every saved dtype (torch's default
would cast uint8 codes and int64 indices to the parameter's dtype).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ._validation import check_choice, check_int, check_number
from .distributed import checkpoint as _checkpoint
from .distributed import fsdp as _fsdp
from .distributed import shards as _shards
from .groups import FLATTENED_HINT, is_flattened, method_overrides, warn_method_overrides
from .projectors import PROJECTORS, SIDE_RULES, Projector, make_projector
from .projectors.base import derive_seed
from .rules import INNER_RULES, RESIDUAL_RULES, TRANSFER_POLICIES, InnerRule, MomentSpec, ResidualRule, TransferPolicy
from .state import STATE_DTYPES, StateStore
from .targets import resolve_targets, validate_target_modules

NONFINITE_POLICIES = ("skip", "raise", "ignore")
#: State key (int 1) of a low-rank parameter whose gradients so far were all exactly zero: its subspace is
#: chosen at its first nonzero gradient instead of from the zero matrix (arbitrary for a whole period).
PENDING = "subspace_pending"

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
    "include_conv": False,  # with target_modules: also select convolution weights (lowrank_optim.targets)
    "differentiable": False,  # torch's __setstate__ adds it on load; kept so groups round-trip unchanged
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
        target_modules: restricts the low-rank path of a group carrying ``rank`` to the weights of the
            modules it selects (:func:`lowrank_optim.select_lowrank_modules` semantics), resolved at the
            first step; for groups built by someone else (HF Trainer's ``optimizer_cls_and_kwargs``).
            Parameter names come from ``module`` or from torch's named param groups (``param_names``).
        include_conv: with ``target_modules``, also project the selected convolution weights (default
            ``False``; see :func:`lowrank_optim.select_lowrank_params`).
        module: the model whose ``named_modules()`` resolve ``target_modules`` (kept by reference, never
            saved in the state dict; not a group key).
        **hyper: hyper-parameters of the inner / residual rule (``betas``, ``eps``, ...).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: ParamsT, lr: float | None = 1e-3, **kwargs: Any) -> None:
        module = kwargs.pop("module", None)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"Invalid module: expected an nn.Module, got {type(module).__name__}")
        self._module: torch.nn.Module | None = module
        self._target_ids: set[int] | None = None
        defaults: dict[str, Any] = {"lr": lr, **ENGINE_DEFAULTS, **self.preset_defaults}
        if "proj_type" in kwargs:  # galore-torch's name for the side rule
            kwargs["proj_side"] = kwargs.pop("proj_type")
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
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}")
        defaults.update(kwargs)
        self._parts_cache: dict[tuple, tuple] = {}
        super().__init__(params, defaults)

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
                param_group["proj_side"] = param_group.pop("proj_type")
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
        if group["lr"] is not None:
            check_number("lr", group["lr"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["rank"] is not None:
            check_int("rank", group["rank"], low=1)
        check_int("update_proj_gap", group["update_proj_gap"], low=1)
        check_number("scale", group["scale"], low=0.0, low_open=True)
        check_choice("projector", group["projector"], sorted(PROJECTORS))
        check_choice("proj_side", group["proj_side"], SIDE_RULES)
        opts = group["projector_options"]
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"Invalid projector_options: expected a dict, got {opts!r}")
        check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        check_choice("transfer", group["transfer"], sorted(TRANSFER_POLICIES))
        check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
        check_int("seed", group["seed"], low=0)
        if group["target_modules"] is not None:
            validate_target_modules(group, self._module)
            self._target_ids = None
        if group["rank"] is not None:
            _refuse_flattened(group)
        for i, p in enumerate(group["params"]):
            if _shards.is_dtensor(p):
                _shards.check_placement(p, f"parameter {i} (shape {tuple(p.shape)})")
        inner.validate(group)
        residual.validate(group)
        if plain_rule is not inner:
            plain_rule.validate(group)
        if group["rank"] is not None:
            proj, _, _, transfer, _ = self._parts(group)  # builds the projector now: bad options fail here
            residual.check_projector(proj, group)  # combinations that cannot work are refused by name
            transfer.check_projector(proj, group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._parts_cache = {}
        self.__dict__.setdefault("_module", None)
        self._target_ids = None
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def _parts(self, group: dict[str, Any]) -> tuple[Projector | None, InnerRule, ResidualRule, TransferPolicy,
                                                     StateStore]:
        """The (cached) strategy objects a group's keys select."""
        # a group's own options refine the optimizer-level ones instead of replacing them
        opts = {**(self.defaults.get("projector_options") or {}), **(group["projector_options"] or {})}
        key = (group["projector"], group["rank"], group["proj_side"], repr(sorted(opts.items())), group["inner"],
               group["residual"], group["transfer"], group["state_dtype"])
        parts = self._parts_cache.get(key)
        if parts is None:
            proj = None
            if group["rank"] is not None:
                proj = make_projector(group["projector"], group["rank"], side=group["proj_side"], **opts)
            parts = (proj, INNER_RULES[group["inner"]], RESIDUAL_RULES[group["residual"]],
                     TRANSFER_POLICIES[group["transfer"]], StateStore(group["state_dtype"]))
            self._parts_cache[key] = parts
        return parts

    @staticmethod
    def is_lowrank(group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``p`` takes the low-rank path in ``group``."""
        return group.get("rank") is not None and p.dim() == 2

    def _targeted(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``group["target_modules"]`` (if any) selects ``p``; resolved once, at the first step."""
        if group.get("target_modules") is None:
            return True
        if self._target_ids is None:
            self._target_ids = resolve_targets(self.param_groups, self._module)
        return id(p) in self._target_ids

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
        work: list[tuple[dict[str, Any], torch.Tensor, int]] = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                self._check_grad(p, index - 1)
                work.append((group, p, index - 1))
        if not work or not self._gradients_ok(work):
            return loss
        for group, p, idx in work:
            if _shards.is_dtensor(p):  # FSDP2: lowrank_optim.distributed.fsdp
                _fsdp.step_param(self, group, p, idx)
            else:
                self._step_param(group, p, idx)
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Steps ``param`` alone, with the same state, seeds and math as :meth:`step` (for layer-wise
        updates from gradient hooks, :mod:`lowrank_optim.layerwise`); the non-finite check covers this
        one gradient. A parameter without a gradient is left alone."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    if _shards.is_dtensor(p):
                        raise ValueError("Invalid param: step_parameter does not support FSDP2 (DTensor) parameters; "
                                         "call step()")
                    if p.grad is not None:
                        self._check_grad(p, index)
                        if self._gradients_ok([(group, p, index)]):
                            self._step_param(group, p, index)
                    return
                index += 1
        raise ValueError(f"Invalid param: a tensor of shape {tuple(param.shape)} that is not in this optimizer")

    def _check_grad(self, p: torch.Tensor, index: int) -> None:
        if p.grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                            f"(parameter {index}, shape {tuple(p.shape)})")
        if torch.is_complex(p.grad):
            raise TypeError(f"{type(self).__name__} does not support complex parameters "
                            f"(parameter {index}, dtype {p.grad.dtype})")

    def _gradients_ok(self, work: list[tuple[dict[str, Any], torch.Tensor, int]]) -> bool:
        """Checks every gradient for inf/NaN before any state changes (policy per group)."""
        checked = [(g, p) for g, p, _ in work if g["nonfinite"] != "ignore"]
        if not checked:
            return True
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, p in checked:
            grad = _shards.local(p.grad)  # FSDP2: this rank's rows; the verdict is agreed below
            by_device.setdefault(grad.device, []).append(grad.sum(dtype=torch.float32))
        finite = all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())
        finite = _fsdp.agree_finite(finite, [p for _, p in checked])
        if finite:
            return True
        if any(g["nonfinite"] == "raise" for g, _ in checked):
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient; no state was changed "
                                     "(nonfinite='raise')")
        warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped (nonfinite='skip'); "
                      "optimizer state is unchanged", RuntimeWarning, stacklevel=3)
        return False

    def _step_param(self, group: dict[str, Any], p: torch.Tensor, index: int, *, param: torch.Tensor | None = None,
                    grad: torch.Tensor | None = None) -> None:
        """Steps ``p`` (state ``self.state[p]``); ``param`` / ``grad`` replace ``p`` / ``p.grad`` as the tensors
        computed on (FSDP2's replicated mode passes the gathered weight and gradient)."""
        proj, rule, residual, transfer, store = self._parts(group)
        state = self.state[p]
        grad = p.grad if grad is None else grad
        grad = grad if grad.dtype == torch.float32 else grad.float()
        param = p if param is None else param
        lowrank = proj is not None and self._targeted(group, p) and self.is_lowrank(group, p)
        if not lowrank and group.get("plain_inner") is not None:
            rule = INNER_RULES[group["plain_inner"]]
        if not state:
            self._init_state(state, group, p, grad, proj if lowrank else None, rule, store, index)
        elif lowrank and PENDING in state:
            self._init_subspace(state, group, p, grad, proj, rule, store, index)
        elif lowrank and state["step"] % group["update_proj_gap"] == 0:
            self._refresh(state, group, p, grad, proj, rule, transfer, store)
        step = state["step"] + 1
        inner_step = state["inner_step"] + 1
        low = proj.project(grad, state["projector"]) if lowrank else grad
        specs = rule.moments(tuple(low.shape), group)
        moments = {s.name: store.load(state, s.name, s.signed) for s in specs}
        target = param if param.dtype == torch.float32 else param.float()
        if not lowrank and rule.apply_plain(target, low, moments, inner_step, group):
            d = None  # the rule applied the whole update (fused kernel), weight decay included
        else:
            d = rule.direction(low, moments, inner_step, group, param)
        for s in specs:
            store.save(state, s.name, moments[s.name], s.signed)
        state["step"], state["inner_step"] = step, inner_step

        wd = group["weight_decay"]
        if d is not None and wd != 0:
            target.mul_(1 - d.lr * wd)
        if d is None:
            pass
        elif not lowrank:
            if d.den is None:
                target.add_(d.num, alpha=-d.coef)
            else:
                target.addcdiv_(d.num, d.den, value=-d.coef)
        else:
            pst = state["projector"]
            low_update = d.num if d.den is None else d.num / d.den
            # an empty subspace (FRUGAL's inactive block) adds nothing; a residual rule that ``replaces_lift``
            # (APOLLO) returns the whole update itself
            if low_update.numel() and not getattr(residual, "replaces_lift", False):
                proj.add_back(target, low_update, pst, -d.coef * group["scale"])
            # a residual rule with ``wants_coef`` also gets the inner step's coefficient and lr (Fira)
            ctx = {"coef": d.coef, "lr": d.lr} if getattr(residual, "wants_coef", False) else {}
            extra = residual.step(grad, low, low_update, proj, pst, state, group, **ctx)
            if extra is not None:
                target.sub_(extra)
        if target is not param:
            param.copy_(target)

    def _init_state(self, state: dict, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                    proj: Projector | None, rule: InnerRule, store: StateStore, index: int) -> None:
        state["step"] = 0
        state["inner_step"] = 0
        if proj is not None:
            ctx = {"layout": self._layout(group, p)} if getattr(proj, "wants_layout", False) else {}
            seed = derive_seed(group["seed"], index)
            state["projector"] = _fsdp.once(self, lambda: proj.init(grad, seed=seed, **ctx), index)
            shape = proj.low_shape(p.shape, state["projector"])
            if grad.device.type != "meta" and not bool(grad.any()):
                state[PENDING] = 1  # a zero gradient defines no subspace: choose it at the first nonzero one
        else:
            shape = tuple(p.shape)
        for spec in rule.moments(tuple(shape), group):
            store.create(state, spec.name, spec.shape, p.device, like=None if proj is not None else p,
                         seed=derive_seed(group["seed"], index))

    def _init_subspace(self, state: dict, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                       proj: Projector, rule: InnerRule, store: StateStore, index: int) -> None:
        """Chooses the subspace from the first nonzero gradient of a parameter whose earlier gradients were all
        exactly zero (a layer feeding a zero-initialised one): those steps' moments are zero in any subspace,
        so only the projector state is rebuilt (and moments of another shape recreated, as zeros)."""
        if not bool(grad.any()):
            return
        del state[PENDING]
        ctx = {"layout": self._layout(group, p)} if getattr(proj, "wants_layout", False) else {}
        state["projector"] = proj.init(grad, seed=derive_seed(group["seed"], index), **ctx)
        for spec in rule.moments(proj.low_shape(p.shape, state["projector"]), group):
            if tuple(state[spec.name].shape) != tuple(spec.shape):
                store.create(state, spec.name, spec.shape, p.device)

    def _refresh(self, state: dict, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, proj: Projector,
                 rule: InnerRule, transfer: TransferPolicy, store: StateStore) -> None:
        old = state["projector"]
        specs: list[MomentSpec] = rule.moments(proj.low_shape(p.shape, old), group)
        ctx: dict[str, Any] = {}
        if proj.wants_moments:
            ctx["moments"] = {s.name: store.load(state, s.name, s.signed) for s in specs}
        if getattr(proj, "wants_layout", False):
            ctx["layout"] = self._layout(group, p)
        if getattr(proj, "wants_lr", False):  # the group's lr now and at the start (LR schedulers' initial_lr)
            ctx["lr"], ctx["initial_lr"] = group["lr"], group.get("initial_lr", group["lr"])
        new = _fsdp.once(self, lambda: proj.update(grad, old, **ctx), self._index_of(p))
        specs = rule.moments(proj.low_shape(p.shape, new), group)
        transfer.apply(state, old, new, proj, specs, store)
        for spec in specs:
            if tuple(state[spec.name].shape) != tuple(spec.shape):
                raise ValueError(f"Invalid transfer: {group['transfer']!r} kept moment {spec.name!r} of shape "
                                 f"{tuple(state[spec.name].shape)} but the new subspace needs {tuple(spec.shape)}; "
                                 "use a transfer that rebuilds moments (e.g. 'reset') with this projector")
        state["projector"] = new

    def _index_of(self, p: torch.Tensor) -> int:
        """Position of ``p`` among all the optimizer's parameters (its seed and refresh-owner index)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _layout(self, group: dict[str, Any], p: torch.Tensor) -> tuple[int, int, int]:
        """``(position, count, group seed)`` of ``p`` among the group's projected params, for projectors
        that draw across parameters (``wants_layout``: FRUGAL blocks, GUM's layer draw). Depends only on
        the group's parameter order, so every data-parallel rank computes the same."""
        chosen = [q for q in group["params"] if self.is_lowrank(group, q) and self._targeted(group, q)]
        position = next(i for i, q in enumerate(chosen) if q is p)
        return position, len(chosen), int(group["seed"])

    # -- memory and checkpoints -----------------------------------------------------------------
    def state_bytes(self) -> int:
        """Exact bytes of every tensor held in optimizer state (storage shared by tensors counted once)."""
        seen: set[tuple[str, int]] = set()
        total = 0

        def visit(obj: Any) -> None:
            nonlocal total
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                key = (str(obj.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
            elif isinstance(obj, dict):
                for v in obj.values():
                    visit(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    visit(v)

        for st in self.state.values():
            visit(st)
        return total

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
        state_dict = _checkpoint.import_state(self, state_dict)
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        id_map = dict(zip(saved_ids, params, strict=True))
        for key, value in saved.items():
            if key in id_map:
                p = id_map[key]
                self.state[p] = _to_device(value, p.device)
        self._parts_cache = {}
        _checkpoint.requantize(self)
        self._target_ids = None


def _refuse_flattened(group: dict[str, Any]) -> None:
    """Raises for a flattened parameter in a low-rank group (FSDP1 ``FlatParameter`` or its
    ``use_orig_params`` views, DeepSpeed ZeRO-3 partitions): its 2-D structure is gone, and taking the
    plain path silently would turn the method into plain Adam."""
    for i, p in enumerate(group["params"]):
        if is_flattened(p):
            raise ValueError(f"Invalid params: parameter {i} (shape {tuple(p.shape)}) of a group with "
                             f"rank={group['rank']} is a flattened shard; {FLATTENED_HINT}")


def _to_device(obj: Any, device: torch.device) -> Any:
    """Deep copy of plain state with tensors moved (not cast) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def closed_form_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one moment of ``numel`` elements in a store (``8bit``: 1 byte + 4 per 256 block)."""
    return StateStore(state_dtype).bytes_for(numel)


__all__ = ["ENGINE_DEFAULTS", "NONFINITE_POLICIES", "LowRankOptimizer", "closed_form_bytes"]
