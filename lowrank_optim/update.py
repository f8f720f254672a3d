"""The per-matrix step: the reference path every parameter can take.

For one parameter (or one matrix of a stacked parameter) with fp32 gradient ``grad``:

1. first step: the projector's initial state and zero moments; later, on the refresh schedule, a refresh
   and the transfer policy;
2. ``low = project(grad)``; the inner rule updates the moments (loaded through the state store) and returns
   a :class:`~lowrank_optim.rules.base.Direction`;
3. decoupled weight decay from the pre-update weight, ``p -= coef * scale * lift(num / den)``, and the residual
   rule's full-size step.

The batched path (:mod:`lowrank_optim.stacks`) must equal this one to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .projectors import Projector
from .projectors.base import derive_seed
from .rules import InnerRule, MomentSpec, ResidualRule, TransferPolicy
from .state import StateStore

Group = dict[str, Any]
#: State key (int 1) of a low-rank matrix whose gradients so far were all exactly zero: its subspace is
#: chosen at its first nonzero gradient instead of from the zero matrix (arbitrary for a whole period).
PENDING = "subspace_pending"
Layout = Callable[[], tuple[int, int, int]]
#: Runs a projector's ``init`` / ``update`` (given as a thunk) and returns its state: here, or on one rank and
#: broadcast (:func:`lowrank_optim.distributed.fsdp.once`).
Once = Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]


def _here(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return compute()


class Parts(NamedTuple):
    """The strategy objects a group's keys select (``projector`` is ``None`` for a plain group)."""

    projector: Projector | None
    inner: InnerRule
    residual: ResidualRule
    transfer: TransferPolicy
    store: StateStore


def init_state(state: dict, group: Group, p: torch.Tensor, grad: torch.Tensor, proj: Projector | None,
               rule: InnerRule, store: StateStore, index: int, layout: Layout | None = None,
               matrix: int | None = None, *, once: Once = _here) -> None:
    """Allocates the state of a parameter (or of matrix ``matrix`` of a stacked parameter) at its first step:
    counters, projector state (``proj`` not ``None``, computed through ``once``) seeded from ``(group seed,
    index)`` (or ``(group seed, index, matrix)``), and zero moments in the low-rank (or full) shape."""
    state["step"] = 0
    state["inner_step"] = 0
    seed = derive_seed(group["seed"], index) if matrix is None else derive_seed(group["seed"], index, matrix)
    if proj is not None:
        ctx = {"layout": layout()} if getattr(proj, "wants_layout", False) and layout is not None else {}
        state["projector"] = once(lambda: proj.init(grad, seed=seed, **ctx))
        shape = proj.low_shape(p.shape, state["projector"])
        if grad.device.type != "meta" and not bool(grad.any()):
            state[PENDING] = 1  # a zero gradient defines no subspace: choose it at the first nonzero one
    else:
        shape = tuple(p.shape)
    for spec in rule.moments(tuple(shape), group):
        store.create(state, spec.name, spec.shape, p.device, like=None if proj is not None else p,
                     seed=seed)


def init_subspace(state: dict, group: Group, p: torch.Tensor, grad: torch.Tensor, proj: Projector,
                  rule: InnerRule, store: StateStore, index: int, layout: Layout | None = None,
                  matrix: int | None = None) -> None:
    """Chooses the subspace from the first nonzero gradient of a matrix whose earlier gradients were all exactly
    zero (a layer feeding a zero-initialised one): those steps' moments are zero in any subspace, so only the
    projector state is rebuilt (and moments of another shape recreated, as zeros)."""
    if not bool(grad.any()):
        return
    del state[PENDING]
    ctx = {"layout": layout()} if getattr(proj, "wants_layout", False) and layout is not None else {}
    seed = derive_seed(group["seed"], index) if matrix is None else derive_seed(group["seed"], index, matrix)
    state["projector"] = proj.init(grad, seed=seed, **ctx)
    for spec in rule.moments(proj.low_shape(p.shape, state["projector"]), group):
        if tuple(state[spec.name].shape) != tuple(spec.shape):
            store.create(state, spec.name, spec.shape, p.device)


def refresh(state: dict, group: Group, p: torch.Tensor, grad: torch.Tensor, proj: Projector, rule: InnerRule,
            transfer: TransferPolicy, store: StateStore, layout: Layout | None = None, *, once: Once = _here) -> None:
    """Refreshes the projector state from ``grad`` (the projector's ``update``, run through ``once``) and moves
    the moments with the transfer policy.

    Raises:
        ValueError: the transfer left a moment in a shape the new subspace does not have.
    """
    old = state["projector"]
    specs: list[MomentSpec] = rule.moments(proj.low_shape(p.shape, old), group)
    ctx: dict[str, Any] = {}
    if proj.wants_moments:
        ctx["moments"] = {s.name: store.load(state, s.name, s.signed) for s in specs}
    if getattr(proj, "wants_layout", False) and layout is not None:
        ctx["layout"] = layout()
    if getattr(proj, "wants_lr", False):  # the group's lr now and at the start (LR schedulers' initial_lr)
        ctx["lr"], ctx["initial_lr"] = group["lr"], group.get("initial_lr", group["lr"])
    new = once(lambda: proj.update(grad, old, **ctx))
    specs = rule.moments(proj.low_shape(p.shape, new), group)
    transfer.apply(state, old, new, proj, specs, store)
    for spec in specs:
        if tuple(state[spec.name].shape) != tuple(spec.shape):
            raise ValueError(f"Invalid transfer: {group['transfer']!r} kept moment {spec.name!r} of shape "
                             f"{tuple(state[spec.name].shape)} but the new subspace needs {tuple(spec.shape)}; "
                             "use a transfer that rebuilds moments (e.g. 'reset') with this projector")
    state["projector"] = new


def apply_step(state: dict, group: Group, p: torch.Tensor, grad: torch.Tensor, parts: Parts,
               lowrank: bool, plan: Any = None) -> None:
    """Steps ``p`` (fp32 ``grad``) once, its state initialised and refreshed already (steps 2-3 above); ``plan`` is
    the inner rule's :meth:`~lowrank_optim.rules.base.InnerRule.plan_plain` for a plain ``p`` made before the
    non-finite check, if any."""
    proj, rule, residual, _, store = parts
    step = state["step"] + 1
    inner_step = state["inner_step"] + 1
    low = proj.project(grad, state["projector"]) if lowrank else grad
    specs = rule.moments(tuple(low.shape), group)
    moments = {s.name: store.load(state, s.name, s.signed) for s in specs}
    target = p if p.dtype == torch.float32 else p.float()
    if not lowrank and rule.apply_plain(target, low, moments, inner_step, group, plan=plan):
        d = None  # the rule applied the whole update (fused kernel), weight decay included
    else:
        d = rule.direction(low, moments, inner_step, group, p)
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
        # a residual rule with ``wants_coef`` also gets the inner step's coefficient and lr (Fira); one with
        # ``wants_target`` the fp32 weight, to apply a sparse step in place (GaLore+'s residual)
        ctx = {"coef": d.coef, "lr": d.lr} if getattr(residual, "wants_coef", False) else {}
        if getattr(residual, "wants_target", False):
            ctx["target"] = target
        extra = residual.step(grad, low, low_update, proj, pst, state, group, **ctx)
        if extra is not None:
            target.sub_(extra)
    if target is not p:
        p.copy_(target)


__all__ = ["PENDING", "Once", "Parts", "apply_step", "init_state", "init_subspace", "refresh"]
