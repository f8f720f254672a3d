"""The batched step: the projected matrices of a group stepped as stacks of same-shape matrices.

The engine hands over the projected matrices of one group (``Unit``: the matrix's state, its fp32 weight view
and fp32 gradient), already initialised and refreshed. :func:`apply_units` steps those it can and returns the
others, which then take the per-matrix path (:func:`lowrank_optim.update.apply_step`). That is the whole seam: a
projector, rule or residual that cannot batch simply gets its matrices back.

A matrix is batched when:

* its projector gives a dense basis (:meth:`~lowrank_optim.projectors.base.Projector.batch_basis`: exact,
  randomized, online-PCA, COAP and seeded random bases; not selections, blocks or DCT columns);
* its weight is fp32 (bf16 weights are stepped through fp32 copies on the per-matrix path);
* the group's residual is ``"drop"``, Fira's with an orthonormal basis (closed form,
  :mod:`lowrank_optim.rules.fira_closed_form`), APOLLO's scaling, or GaLore+'s sparse residual (run per matrix
  after the stack's lifts, with unit weights only).

The batched matrices are cut into *stacks*: matrices of the same shape, side, device and inner step count, in
group order. Per stack:

* ``project`` is one matrix product per matrix, written into one ``(B, ...)`` low-rank tensor;
* the inner rule runs once on the stack (:meth:`~lowrank_optim.rules.base.InnerRule.stack_direction`: Adam is one
  fused kernel call on ``(B, ...)`` tensors, Adafactor batched row / column statistics and RMS clipping). For it,
  each moment of the stack's matrices lives in one ``(B, ...)`` tensor, the *arena*, and each matrix's state
  holds its ``(...)`` view (:class:`StackCache`): the state format is unchanged (a checkpoint holds the same keys,
  shapes and values; ``torch.save`` writes a shared storage once), the per-matrix path reads and writes the
  same views, and an arena whose views were replaced (a load, a transfer that rebuilt a moment, a new stack
  composition) is rebuilt from the state at the next step;
* Fira's residual (norms, scaling, limiter) is stacked math on ``(B, ...)`` tensors, its stored norms an arena;
* the lift is one ``addmm_`` into each weight (plus one ``addcmul_`` for Fira's scaled gradient).

So a steady step dispatches per matrix only the two products (and Fira's slice norm of the gradient and its
scaled add), and everything else per stack; nothing reads a device value on the host. A rule without a stacked
kernel (``stack_direction`` returns ``None``) gets per-matrix views and runs
:meth:`~lowrank_optim.rules.base.InnerRule.directions`. Moments kept in bf16 or 8-bit take the list form too
(their codecs are per matrix). The result equals the per-matrix path to rounding (``tests/test_stacks.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .projectors.base import LEFT
from .rules.apollo_scaling import APOLLOScaling, apollo_stack_step
from .rules.base import Direction, device_scalar
from .rules.fira_closed_form import CANCELLATION, fira_closed_form_step
from .rules.fira_residual import _TINY, LIMITER_KEY, adam_step_size
from .rules.sparse_stack import stack_residual_step
from .update import Parts

Group = dict[str, Any]

#: Residual rules the batched step applies itself (``"fira"`` only with an orthonormal basis).
BATCHED_RESIDUALS = ("drop", "fira", "apollo", "sparse")
#: Residual rules the batched step runs per matrix after the stack's lifts (GaLore+'s sparse residual: its ``k``
#: entries and moments are each matrix's own; it adds its step to the weight in place, ``wants_target``).
_PER_MATRIX_RESIDUALS = ("sparse",)
#: Residual rules whose stacked form reads the inner step as one ``(B, ...)`` tensor.
_STACKED_UPDATE = ("fira", "apollo")


class Unit(NamedTuple):
    """One projected matrix of this step: its state dict, fp32 ``(m, n)`` weight view and fp32 gradient."""

    state: dict
    param: torch.Tensor
    grad: torch.Tensor


class StackCache:
    """What the batched step keeps between steps (the engine holds one per optimizer, reset on load).

    * ``transposed``: ``basis.T`` of each stored basis (:func:`transposed`);
    * per stack (keyed by its matrices' state dicts, in order): *arenas*, one ``(B, ...)`` tensor per moment
      (and Fira's stored norm) whose per-matrix views are the state's tensors, and small per-matrix buffers
      with their views (Fira's slice norms and factors, ``B`` rows of a few hundred floats).

    Nothing here is state: an entry that no longer matches the state is rebuilt, and :meth:`sweep` drops those
    whose matrices left the stack, so the cache holds no tensor the state does not also hold, but the small
    buffers.
    """

    def __init__(self) -> None:
        self.transposed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.entries: dict[tuple[int, ...], dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]]] = {}
        self.groups: dict[int, set[tuple[int, ...]]] = {}

    def arena(self, key: tuple[int, ...], states: list[dict], name: str) -> torch.Tensor:
        """The ``(B, ...)`` arena of state tensor ``name`` of ``states``; built (one copy, the state's tensors
        replaced by its views) unless every state still holds the views of the current one. A stack of one
        matrix needs no arena: its tensor seen as ``(1, ...)``; on the meta device (memory estimates, no values)
        the state keeps its own tensors, so each parameter's bytes stay its own."""
        if len(states) == 1:
            return states[0][name].unsqueeze(0)
        if states[0][name].device.type == "meta":  # shapes only (memory estimates): keep the state's own tensors
            return torch.stack([st[name] for st in states])
        entry = self.entries.setdefault(key, {})
        hit = entry.get(name)
        if hit is not None and all(st.get(name) is v for st, v in zip(states, hit[1], strict=True)):
            return hit[0]
        stack = torch.stack([st[name] for st in states])
        views = stack.unbind(0)
        for st, v in zip(states, views, strict=True):
            st[name] = v
        entry[name] = (stack, views)
        return stack

    def buffer(self, key: tuple[int, ...], name: str, shape: tuple[int, ...], device: torch.device
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A scratch ``(B, ...)`` fp32 tensor of the stack and its per-matrix views, kept between steps."""
        entry = self.entries.setdefault(key, {})
        hit = entry.get("buffer:" + name)
        if hit is None or tuple(hit[0].shape) != shape or hit[0].device != device:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            hit = (t, t.unbind(0))
            entry["buffer:" + name] = hit
        return hit

    def sweep(self, group: Group, used: set[tuple[int, ...]]) -> None:
        """Drops the entries of the stacks ``group`` stepped last time but not now (``used``): their matrices
        moved to other stacks or were stepped apart, and their arenas would only pin replaced storage."""
        for key in self.groups.get(id(group), set()) - used:
            self.entries.pop(key, None)
        self.groups[id(group)] = used


def matrices(stack: torch.Tensor) -> list[torch.Tensor]:
    """The ``B`` matrices of a contiguous ``(B, p, q)`` stack as views (``split_with_sizes`` of its ``(B p, q)``
    view: one dispatch per matrix, where ``unbind`` takes two)."""
    b, p, q = (int(s) for s in stack.shape)
    return list(stack.view(b * p, q).split_with_sizes([p] * b))


def transposed(basis: torch.Tensor, state: dict, views: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
               ) -> torch.Tensor:
    """``basis.T``, kept in ``views`` (keyed by the matrix's state) while ``basis`` is the stored basis: a steady
    step then dispatches no transpose (a view is free in time but not in dispatches, the cost a GPU pays per op).
    A basis made for this step only (Flora's regenerated one) is not kept, so ``views`` never holds more than
    views of the stored bases."""
    if views is None or basis is not state["projector"].get("basis"):
        return basis.T
    key = id(state)
    hit = views.get(key)
    if hit is not None and hit[0] is basis:
        return hit[1]
    t = basis.T
    views[key] = (basis, t)
    return t


def apply_units(units: list[Unit], group: Group, parts: Parts, cache: StackCache | None = None) -> list[Unit]:
    """Steps the units the batched kernels can take (module docstring), stack by stack; returns the rest,
    untouched. ``cache`` keeps arenas and transposed bases between steps (:class:`StackCache`; ``None``: a
    throwaway one)."""
    proj, residual = parts.projector, parts.residual
    if proj is None or not units or residual.name not in BATCHED_RESIDUALS:
        return units
    cache = StackCache() if cache is None else cache
    fira = residual.name == "fira"
    stacks: dict[tuple, list[tuple[Unit, torch.Tensor]]] = {}
    rest: list[Unit] = []
    for u in units:
        pst = u.state["projector"]
        drawn = proj.stack_basis_shape(pst) if u.param.dtype == torch.float32 else None  # drawn per stack below
        basis = None if drawn is not None or u.param.dtype != torch.float32 else proj.batch_basis(pst, u.grad.device)
        if (drawn is None and (basis is None or basis.dtype != torch.float32)) or (
                fira and not proj.orthonormal_basis(pst)) or (
                residual.name != "drop" and proj.batch_weights(pst) != (1.0, 1.0)):
            rest.append(u)
        else:
            shape = drawn if drawn is not None else tuple(basis.shape)
            key = (tuple(u.grad.shape), pst["side"], shape, drawn is not None, u.grad.device, u.state["inner_step"])
            stacks.setdefault(key, []).append((u, basis))
    used = set()
    for members in stacks.values():
        used.add(_step_stack(members, group, parts, cache))
    cache.sweep(group, used)
    return rest


def _step_stack(members: list[tuple[Unit, torch.Tensor]], group: Group, parts: Parts, cache: StackCache
                ) -> tuple[int, ...]:
    """One stack: ``B`` matrices of one shape, side, device and inner step count (module docstring); returns the
    stack's cache key."""
    proj, rule, residual, _, store = parts
    states = [u.state for u, _ in members]
    key = tuple(id(s) for s in states)
    first, basis0 = members[0]
    side = first.state["projector"]["side"]
    left = side == LEFT
    device = first.grad.device
    m, n = (int(s) for s in first.grad.shape)
    b = len(members)
    views = cache.transposed
    if basis0 is None:  # a basis regenerated every step (Flora), drawn for the whole stack
        drawn = proj.stack_basis([st["projector"] for st in states], device)
        bases, flipped = matrices(drawn), drawn.mT.unbind(0)
    else:
        bases = [basis for _, basis in members]
        flipped = [transposed(basis, u.state, views) for u, basis in members]
    r = int(bases[0].shape[1])
    low = torch.empty((b, r, n) if left else (b, m, r), dtype=torch.float32, device=device)
    lows = matrices(low)
    backs = bases if left else flipped
    for u, basis, flip, out in zip((u for u, _ in members), bases, flipped, lows, strict=True):
        if left:
            torch.mm(flip, u.grad, out=out)
        else:
            torch.mm(u.grad, basis, out=out)
    weights = [proj.batch_weights(st["projector"]) for st in states]  # GUM's debiasing weights, else (1, 1)
    w_in = [w for w, _ in weights]
    if all(w == w_in[0] for w in w_in):
        if w_in[0] != 1.0:
            low.mul_(w_in[0])
    else:
        for out, w in zip(lows, w_in, strict=True):
            out.mul_(w)
    step = first.state["inner_step"] + 1
    specs = rule.moments(tuple(lows[0].shape), group)
    d = None
    if store.dtype == "fp32":
        arenas = {s.name: cache.arena(key, states, s.name) for s in specs}
        d = rule.stack_direction(low, arenas, step, group, [u.param for u, _ in members])
    if d is not None:
        update = d.num if d.den is None else d.num / d.den
        # a moment's arena as the update (Adafactor's momentum): its matrices are the states' views already
        owner = next((name for name, arena in arenas.items() if arena is update), None) if b > 1 else None
        if residual.name in _STACKED_UPDATE:
            updates = []
        else:
            updates = [st[owner] for st in states] if owner is not None else matrices(update)
        ds = [d] * b if isinstance(d.lr, float) else [Direction(d.num, d.den, d.coef, lr) for lr in d.lr.unbind(0)]
    else:  # per-matrix views through the list form (bf16 / 8-bit codecs, rules without a stacked kernel)
        moments = [{s.name: store.load(st, s.name, s.signed) for s in specs} for st in states]
        ds = rule.directions(list(lows), moments, [step] * b, group, [u.param for u, _ in members])
        for st, mom in zip(states, moments, strict=True):
            for s in specs:
                store.save(st, s.name, mom[s.name], s.signed)
        updates = [x.num if x.den is None else x.num / x.den for x in ds]
        update = torch.stack(updates) if residual.name in _STACKED_UPDATE else None
    for st in states:
        st["step"] += 1
        st["inner_step"] += 1
    wd = group["weight_decay"]
    if wd != 0:
        for (u, _), x in zip(members, ds, strict=True):
            u.param.mul_(1 - x.lr * wd)
    if residual.name == "fira":
        _fira_stack(members, low, lows, update, backs, left, ds, group, proj, cache, key, states)
        return key
    if residual.name == "apollo":
        _apollo_stack(members, low, lows, update, side, ds, group, proj, residual, cache, key, states)
        return key
    scale = group["scale"]
    # an empty subspace (FRUGAL's inactive block) adds nothing
    lifts = zip(members, backs, updates, ds, weights, strict=True) if low.numel() else ()
    for (u, _), back, upd, x, (_, w_out) in lifts:
        if left:
            u.param.addmm_(back, upd, alpha=-x.coef * scale * w_out)
        else:
            u.param.addmm_(upd, back, alpha=-x.coef * scale * w_out)
    if residual.name in _PER_MATRIX_RESIDUALS:  # after the lift, as the per-matrix path (update.apply_step)
        stack_residual_step(residual, [u for u, _ in members], low, lows, updates, bases, left, group, proj, cache,
                            key)
    return key


def _fira_stack(members: list[tuple[Unit, torch.Tensor]], low: torch.Tensor, lows: list[torch.Tensor],
                update: torch.Tensor, backs: list[torch.Tensor], left: bool, ds: list[Direction], group: Group,
                proj: Any, cache: StackCache,
                key: tuple[int, ...], states: list[dict]) -> None:
    """Fira's closed form (:mod:`lowrank_optim.rules.fira_closed_form`) on a stack: slice norms, the complement's
    floor, the scaling and the limiter as ``(B, ...)`` tensors; per matrix only the gradient's slice norms, the
    scaled gradient added and the one lift. ``low`` (whose matrices ``lows`` are) is overwritten with the lift's
    operand."""
    d = ds[0]
    scale = float(group["scale"])
    gamma = group["limiter_gamma"]
    b = len(members)
    shared = all(isinstance(x.lr, float) and isinstance(x.coef, float) and x.coef == d.coef and x.lr == d.lr
                 for x in ds)
    eta = adam_step_size(d.lr, states[0], group) if shared else 0.0
    if eta == 0.0:  # a zero-lr step (the per-matrix form reserves the limiter) or per-matrix coefficients
        for (u, basis), back, lw, upd, x in zip(members, backs, lows, matrices(update), ds, strict=True):
            fira_closed_form_step(u.param, u.grad, lw, upd, basis, u.state["projector"]["side"], x.coef, x.lr,
                                  u.state, group, proj.complement_floor(u.state["projector"]),
                                  None if left else back)
        return
    coef = float(d.coef)
    device = low.device
    alpha = scale if group["fira_residual"] == "reference" else 1.0
    dim = 1 if left else 2  # the axis a slice runs along in the (B, ., .) stack
    slices = int(low.shape[2] if left else low.shape[1])
    sq, sq_views = cache.buffer(key, "grad_norm", (b, 1, slices) if left else (b, slices, 1), device)
    for (u, _), out in zip(members, sq_views, strict=True):
        torch.linalg.vector_norm(u.grad, dim=dim - 1, keepdim=True, out=out)
    sq = torch.mul(sq, sq)
    total = sq.sum(dim=(1, 2))  # ||G||^2 per matrix
    rho = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
    sq.addcmul_(rho, rho, value=-(2.0 * alpha - alpha * alpha)).clamp_min_(0.0)
    floor = proj.complement_floor(states[0]["projector"])
    above = sq.sum(dim=(1, 2)).gt_(total.mul_(device_scalar(max(floor * floor, CANCELLATION), device)))
    factor, factor_views = cache.buffer(key, "factor", tuple(rho.shape), device)
    torch.linalg.vector_norm(update, dim=dim, keepdim=True, out=factor)
    factor.div_(rho.add_(device_scalar(_TINY, device))).mul_(above.view(b, 1, 1))
    if gamma is not None:
        for st in states:  # -1: not measured yet (the first step stores the norm, as the per-matrix rule)
            if LIMITER_KEY not in st:
                st[LIMITER_KEY] = torch.full((), -1.0, dtype=torch.float32, device=device)
        stored = cache.arena(key, states, LIMITER_KEY)
        norm = sq.mul_(factor).mul_(factor).sum(dim=(1, 2)).sqrt_().mul_(device_scalar(coef / eta, device))
        limit = torch.div(norm, stored.add(device_scalar(_TINY, device))).div_(device_scalar(float(gamma), device))
        limit.clamp_min_(1.0)
        limit = torch.where(stored.gt(device_scalar(0.0, device)), limit, device_scalar(1.0, device))  # armed
        factor.div_(limit.view(b, 1, 1))
        torch.div(norm, limit, out=stored)
    low.mul_(factor).sub_(update, alpha=scale / alpha)  # -(scale / alpha * update - low * m), in place
    for (u, _), back, f, lf in zip(members, backs, factor_views, lows, strict=True):
        u.param.addcmul_(u.grad, f, value=-coef)
        if left:
            u.param.addmm_(back, lf, alpha=alpha * coef)
        else:
            u.param.addmm_(lf, back, alpha=alpha * coef)


def _apollo_stack(members: list[tuple[Unit, torch.Tensor]], low: torch.Tensor, lows: list[torch.Tensor],
                  update: torch.Tensor, side: int, ds: list[Direction], group: Group, proj: Any,
                  residual: APOLLOScaling, cache: StackCache, key: tuple[int, ...], states: list[dict]) -> None:
    """APOLLO's scaled-gradient step on a stack (:func:`~lowrank_optim.rules.apollo_scaling.apollo_stack_step`);
    per matrix through the rule itself when the stack's matrices carry different coefficients, and nothing but
    the limiter's placeholder on a zero step size (as the per-matrix rule)."""
    d = ds[0]
    shared = all(isinstance(x.lr, float) and isinstance(x.coef, float) and x.coef == d.coef and x.lr == d.lr
                 for x in ds)
    eta = adam_step_size(d.lr, states[0], group) if shared else 0.0
    if eta == 0.0:
        for (u, _), lw, upd, x in zip(members, lows, update.unbind(0), ds, strict=True):
            extra = residual.step(u.grad, lw, upd, proj, u.state["projector"], u.state, group, coef=x.coef,
                                  lr=x.lr)
            if extra is not None:
                u.param.sub_(extra)
        return
    stored = None
    b = len(members)
    if group["limiter_gamma"] is not None:
        for st in states:  # -1: not measured yet (the first step stores the norm, as the per-matrix rule)
            if LIMITER_KEY not in st:
                st[LIMITER_KEY] = torch.full((), -1.0, dtype=torch.float32, device=low.device)
        stored = cache.arena(key, states, LIMITER_KEY)
    left = side == LEFT
    if group["scale_type"] == "tensor":
        shape = (b, 1, 1)
    else:
        shape = (b, 1, int(low.shape[2])) if left else (b, int(low.shape[1]), 1)
    norms = cache.buffer(key, "grad_norm", shape, low.device)
    apollo_stack_step([u.param for u, _ in members], [u.grad for u, _ in members], low, update, side,
                      float(d.coef), eta, states, group, norms, stored)


__all__ = ["BATCHED_RESIDUALS", "StackCache", "Unit", "apply_units"]
