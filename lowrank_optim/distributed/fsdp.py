"""One optimizer step for an FSDP2 parameter (a ``DTensor`` placed ``Shard(0)``), equal to one process's step.

Three modes, chosen per parameter from its kind and its group's parts (:func:`mode`):

* ``"sharded"``: basis projectors (``svd``, ``rsvd``, ``rsvd_heads``, ``random``, ``dct``, ``online_pca``, ``coap``;
  any ``basis_dtype`` they accept) with an inner rule that is elementwise or asks
  :mod:`~lowrank_optim.distributed.comm` for its sums (``adam``, ``adafactor``, ``sgd``; ``muon``, whose Newton-Schulz
  is :mod:`~lowrank_optim.distributed.newton_schulz`), the ``drop``, ``fira``, ``apollo`` or ``sparse`` residual and
  the ``keep``, ``reset``, ``linear`` or ``match`` transfer (GaLoreAdamW, GaLoreAdafactor, GaLore+, Fira, Flora,
  APOLLO, APOLLO-Mini, DCT-AdamW, Online Subspace Descent, COAP), FRUGAL's blocks with a state-free residual and a
  resetting transfer (row-local: :func:`_step_elementwise`), and every plain parameter whose rule is one of those;
  GUM (the ``gum`` projector, fp32, bf16 or int8 basis, ``drop`` residual, ``reset`` transfer: its weighted
  projection and full-size branch, :mod:`~lowrank_optim.distributed.gum`). A conv weight ``(out, in, *k)`` is the
  matrix ``out x (in * prod(k))`` (:func:`matrix_shape`), whose rows are the parameter's rows, so it takes this path
  on a view of its shard. Every state tensor is sharded:

  - right side (``m >= n`` under ``"std"``; basis ``Q``, ``n x r``): ``R_i = G_i Q`` and ``W_i -= N_i Q^T``
    are local; the moments are ``m_i x r`` row chunks; ``Q`` is kept as row chunks (``n`` split like ``m``)
    and all-gathered just in time, ``n r`` per step (``r / m`` of FSDP2's own all-gather of ``W``); a quantized
    ``Q`` (``basis_dtype`` bf16 / int8 / int4) is kept as chunks of each stored tensor's own first axis (codes,
    block scales, packed int4 bytes) and its codes and scales are all-gathered and decoded (:mod:`.bases`:
    ``2 n r``, ``n r`` or ``n r / 2`` bytes plus ``4 ceil(n / 256) r`` of scales);
  - left side (basis ``P``, ``m x r``, row chunks aligned with ``W_i``): ``R = sum_i P_i^T G_i`` is one
    all-reduce of ``r x n``; each rank runs the rule on its column chunk of ``R`` (moments ``r x n_j``),
    then one all-gather of the ``r x n`` step and ``W_i -= P_i N`` (a quantized ``P`` decodes its rows from
    local codes, int8 with the all-gathered block scales; int4 gathers its packed codes: :mod:`.bases`; the
    residual, if any, needs ``R`` and ``N`` whole, which this gives; on the right side it sees their row chunks
    and completes its sums through :mod:`~lowrank_optim.distributed.comm`; a complement's rounding floor, by the
    basis's stored form, is tested on the whole matrix: :class:`~.bases.StepBasis`);
  - refresh (SVD, rSVD, DCT selection, OSD's basis step, COAP's correction): computed once per period on an
    owner rank (the parameter's index modulo the world size): one gather of the whole gradient (and of the
    chunked projector state, :data:`~.bases.BASIS_KEYS`; COAP: of the first moment) to the owner, the projector's
    own ``init`` / ``update`` on it (so the basis, and its codes, are bit-identical to one process's, signs
    included), one broadcast; each rank keeps its chunk of each stored tensor (GaLore+'s ``rsvd_heads``: its drawn
    ``head`` travels with the basis). Random bases (Flora, APOLLO) are drawn from the same seed on every rank and
    need no traffic; DCT's basis is built on every rank from its replicated indices;
  - a zero first gradient defers the subspace to the first nonzero one (``subspace_pending``), as in one
    process; stochastic rounding of the stores is keyed by the global element index (:class:`ShardStore`).
  - GaLore+'s sparse residual (:mod:`.sparse`): ``E_i`` and its warm-up score are this rank's rows; the choice of
    the ``k`` entries of the whole score is one all-gather of candidates and one of tie counts, once per matrix;
    each rank keeps the entries of its rows and their moments.

* ``"experts"``: an MoE expert stack ``(E, m, n)`` (:mod:`lowrank_optim.plan`), every preset. ``Shard(0)`` splits
  the expert axis, so each rank holds whole experts and runs the single-process step on them, each known by its
  index in the whole stack (:mod:`.experts`): no traffic, the state divided by whole experts.

* ``"replicated"`` (every other combination: the coordinate selections ``columns`` / ``rows`` / ``entries``, and
  a state-free residual on a basis projector, ``FRUGAL(projector="svd")``; for 2-D and conv weights): the whole
  gradient and weight are all-gathered, the single-process step runs on them with replicated state, and each rank
  keeps its rows. Exact, but the state is not divided. None of these is impossible to shard (``docs/ARCHITECTURE.md``
  says what each would take); they are not sharded yet.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from ..projectors import PROJECTORS
from ..projectors.base import LEFT, Projector, derive_seed
from ..schedule import refresh_due, stagger_phase
from ..state import StateStore
from . import bases as _bases
from . import comm
from . import gum as _gum
from . import sparse as _sparse
from .shards import Layout, Split, all_gather_cols, all_gather_rows, broadcast_from, gather_rows_to, layout, local

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer

#: Parts the sharded mode implements; anything else runs replicated.
SHARDED_PROJECTORS = ("svd", "rsvd", "rsvd_heads", "random", "dct", "online_pca", "coap")
SHARDED_RULES = ("adam", "adafactor", "sgd", "muon")
SHARDED_RESIDUALS = ("drop", "fira", "apollo", "sparse")
SHARDED_TRANSFERS = ("keep", "reset", "linear", "match")

#: Projectors whose state has no tensor and whose ``init`` / ``update`` read only the gradient's shape.
SEEDED_PROJECTORS = ("random",)
#: Projectors whose ``(d, r)`` basis is computed from their small replicated state (``back_matrix``): seeded draws
#: and DCT's column indices; each rank builds it (its rows on the left side), no traffic.
STATE_BASIS_PROJECTORS = ("random", "dct")
#: Projectors whose subspace is all of a tensor or nothing (FRUGAL's blocks): ``project``, the lift and the
#: complement act on a rank's rows alone, and their state is ints (from the shape and the group's layout), so
#: they run on every rank; with a state-free residual and a resetting transfer the whole step is row-local.
ELEMENTWISE_PROJECTORS = ("blocks",)
ELEMENTWISE_RESIDUALS = ("drop", "sign", "sgd")
ELEMENTWISE_TRANSFERS = ("reset", "reset_on_change")

_BASIS = Projector(rank=1)  # the base class's matrix products on an explicit ``basis`` (a view of a shard)

#: Calls of projector ``init`` / ``update`` made by this process (tests count them: one per refresh per job).
REFRESH_CALLS: dict[str, int] = {"init": 0, "update": 0, "engine": 0}


def mode(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> str:
    """``"sharded"``, ``"experts"`` or ``"replicated"`` for an FSDP2 parameter ``p`` of ``group`` (see the module
    docstring)."""
    proj = opt._parts(group)[0]
    if not _lowrank(opt, group, p):
        plain = group.get("plain_inner") or group["inner"]
        return "sharded" if plain in SHARDED_RULES else "replicated"
    if opt._planner.kind(group, p) == "experts":  # whole experts per rank, every preset (.experts)
        return "experts"
    ok = (type(proj) is PROJECTORS.get(proj.name)  # a conv weight is the row-sharded matrix out x (in * prod(k))
          and sharded_parts(proj.name, group["inner"], group["residual"], group["transfer"]))
    return "sharded" if ok else "replicated"


def sharded_parts(projector: str, inner: str, residual: str, transfer: str) -> bool:
    """Whether a projected matrix with these parts (registry names) runs in the sharded mode (the memory planner
    asks too)."""
    if inner not in SHARDED_RULES:
        return False
    if projector in ELEMENTWISE_PROJECTORS:
        return residual in ELEMENTWISE_RESIDUALS and transfer in ELEMENTWISE_TRANSFERS
    if projector in _gum.PROJECTORS:  # GUM: its own step (lowrank_optim.distributed.gum)
        return residual == "drop" and transfer in _gum.TRANSFERS
    return projector in SHARDED_PROJECTORS and residual in SHARDED_RESIDUALS and transfer in SHARDED_TRANSFERS


def elementwise(proj: Projector | None) -> bool:
    """Whether ``proj`` is one of :data:`ELEMENTWISE_PROJECTORS` (its own class, not a subclass)."""
    return proj is not None and proj.name in ELEMENTWISE_PROJECTORS and type(proj) is PROJECTORS.get(proj.name)


def _lowrank(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> bool:
    # the planner's kind (a Conv1d / Conv3d weight selected by target_modules is a conv whatever its dimensions)
    return opt._parts(group)[0] is not None and opt._planner.kind(group, p) is not None


def moment_layout(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> tuple[Any, tuple[int, ...],
                                                                                     int]:
    """``(rule, global shape, split axis)`` of the tensor the inner rule of a sharded parameter sees: the
    low-rank gradient (``(m, r)`` split along 0, or ``(r, n)`` along 1) or the parameter (along 0)."""
    proj, rule, _, _, _ = opt._parts(group)
    if _lowrank(opt, group, p) and elementwise(proj):  # the widest shape (an inactive block's moments are empty)
        return rule, tuple(int(s) for s in proj.low_shape(matrix_shape(opt, group, p))), 0
    if _lowrank(opt, group, p):
        pst = opt.state[p]["projector"]
        (m, n), r = matrix_shape(opt, group, p), int(pst["rank"])
        if _gum.full_size(proj, pst):  # GUM's full-size branch: row chunks like W
            return rule, (m, n), 0
        return (rule, (r, n), 1) if int(pst["side"]) == LEFT else (rule, (m, r), 0)
    if group.get("plain_inner") is not None:
        from ..rules import INNER_RULES

        rule = INNER_RULES[group["plain_inner"]]
    return rule, tuple(p.shape), 0


class ShardStore(StateStore):
    """The group's store for one rank's chunks of a sharded parameter's moments.

    It quantizes a chunk exactly when one process would quantize the whole moment (``min_8bit_size`` applies to
    the whole tensor, never to a shard), and its ``save`` keys the stochastic rounding (bf16, 8-bit) by each
    element's index in the whole moment (:class:`~.shards.Split`), so a chunk rounds as the whole moment would,
    at any world size; 8-bit blocks are still the chunk's own.
    """

    def __init__(self, store: StateStore, global_numel: int | None, split: Split | None) -> None:
        small = store.min_8bit_size
        if store.dtype == "8bit" and global_numel is not None:
            small = 1 if store.quantized(global_numel) else 1 << 62
        super().__init__(store.dtype, min_8bit_size=small)
        self.split = split

    def save(self, state: dict, name: str, value: torch.Tensor, signed: bool = True, *,  # type: ignore[override]
             origin: tuple[int, ...] | None = None, global_shape: tuple[int, ...] | None = None) -> None:
        if origin is None and self.split is not None:
            origin, global_shape = self.split.place(name, tuple(value.shape))
        StateStore.save(state, name, value, signed, origin=origin, global_shape=global_shape)


def local_store(store: StateStore, global_numel: int | None, split: Split | None = None) -> ShardStore:
    """The :class:`ShardStore` of ``store`` for moments of ``global_numel`` elements in all (``None``: decide
    by the chunk's own size) placed by ``split`` (``None``: whole on this rank)."""
    return ShardStore(store, global_numel, split)


def shard_split(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> Split:
    """The :class:`~.shards.Split` of a sharded parameter's moments on this rank (after its state exists)."""
    _, low, dim = moment_layout(opt, group, p)
    return Split(dim, layout(p).rows(int(low[dim]))[0], tuple(int(s) for s in low))


def _create(store: StateStore, state: dict, specs: list[Any], global_specs: list[Any], device: torch.device,
            seed: int) -> None:
    for spec, whole in zip(specs, global_specs, strict=True):
        local_store(store, _numel(whole.shape)).create(state, spec.name, spec.shape, device, seed=seed)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


_ONCE: ContextVar[Layout | None] = ContextVar("lowrank_optim_refresh_group", default=None)


def divide_refresh(optimizer: LowRankOptimizer, process_group: Any = None) -> None:
    """Under DDP, computes each parameter's refresh (SVD, rSVD, DCT selection ...) on one rank and broadcasts it,
    instead of repeating it on every rank; replicas stay bit-identical (the owner runs the very computation every
    rank would). Every rank must call it, and every rank's optimizer must hold the same parameters with the same
    gradients (DDP; not ``ZeroRedundancyOptimizer``, whose ranks hold different parameters). FSDP2 parameters need
    no call: their refreshes are divided already.

    Args:
        optimizer: a lowrank_optim optimizer.
        process_group: the data-parallel group (default: the default group).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        TypeError: ``optimizer`` is not a lowrank_optim optimizer (a ``ZeroRedundancyOptimizer``, say).
        ValueError: the ranks hold different parameters (a ``ZeroRedundancyOptimizer``'s local optimizer), which
            would hang the first refresh (:mod:`.replicas`).
    """
    import torch.distributed as dist

    from .replicas import check_replica

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("divide_refresh: torch.distributed is not initialized")
    group = process_group if process_group is not None else dist.group.WORLD
    check_replica(optimizer, group)
    optimizer._refresh_layout = Layout(None, group, dist.get_rank(group), dist.get_world_size(group))


def once(opt: LowRankOptimizer, compute: Callable[[], dict[str, Any]], index: int, matrix: int = 0) -> dict[str, Any]:
    """``compute()`` (a projector ``init`` or ``update`` on a whole gradient), run on the owner rank of matrix
    ``matrix`` of the parameter at ``index`` (``owner(index + matrix)``: an MoE expert stack's experts go round robin
    too, instead of all to one rank) and broadcast when refreshes are divided (:func:`divide_refresh`, FSDP2's
    replicated mode); else run here."""
    lay = _ONCE.get() or getattr(opt, "_refresh_layout", None)
    if lay is None or lay.world == 1:
        REFRESH_CALLS["engine"] += 1
        return compute()
    own = owner(index + matrix, lay.world)
    new = None
    if lay.rank == own:
        REFRESH_CALLS["engine"] += 1
        new = compute()
    with comm.phase("refresh"):
        return broadcast_from(new, lay, own)


def owner(index: int, world: int) -> int:
    """The rank that computes the refreshes of the parameter at ``index`` (round robin over the group)."""
    return index % world


def step_param(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int) -> None:
    """One step of the FSDP2 parameter ``p`` (every rank of its mesh calls this, in the same order)."""
    lay = layout(p)
    how = mode(opt, group, p)
    if how == "experts":
        from . import experts

        experts.step(opt, group, p, index, lay)
    elif how == "replicated":
        _step_replicated(opt, group, p, index, lay)
    elif _lowrank(opt, group, p):
        _step_lowrank(opt, group, p, index, lay)
    else:
        _step_plain(opt, group, p, lay, index)


def _step_replicated(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int,
                     lay: Layout) -> None:
    m = int(p.shape[0])
    grad = all_gather_rows(local(p.grad), m, lay)
    full = all_gather_rows(local(p).detach(), m, lay)
    token = _ONCE.set(lay)  # the engine's refreshes of this parameter run on its owner rank only
    try:
        opt._step_param(group, p, index, param=full, grad=grad)
    finally:
        _ONCE.reset(token)
    offset, size = lay.rows(m)
    local(p).copy_(full[offset: offset + size])


def _step_plain(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, lay: Layout, index: int) -> None:
    _, rule, _, _, store = opt._parts(group)
    if group.get("plain_inner") is not None:
        from ..rules import INNER_RULES

        rule = INNER_RULES[group["plain_inner"]]
    state = opt.state[p]
    w = local(p)
    grad = local(p.grad)
    grad = grad if grad.dtype == torch.float32 else grad.float()
    if not state:
        state["step"], state["inner_step"] = 0, 0
        _create(store, state, rule.moments(tuple(w.shape), group), rule.moments(tuple(p.shape), group), w.device,
                derive_seed(group["seed"], index))
    target = w if w.dtype == torch.float32 else w.float()
    d = _inner_step(group, rule, store, state, grad, target, comm.Sharding(lay.group, 0, tuple(p.shape), p.numel()),
                    Split(0, lay.rows(int(p.shape[0]))[0], tuple(int(s) for s in p.shape)), plain=True)
    if d is not None:
        if d.den is None:
            target.add_(d.num, alpha=-d.coef)
        else:
            target.addcdiv_(d.num, d.den, value=-d.coef)
    if target is not w:
        w.copy_(target)


# -- the low-rank path -------------------------------------------------------------------------------------
def _dim(pst: dict[str, Any], shape: torch.Size) -> int:
    """Length of the projected axis (rows of the basis): ``m`` on the left side, ``n`` on the right."""
    return int(shape[0]) if int(pst["side"]) == LEFT else int(shape[1])


def _refreshed(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int, lay: Layout,
               old: dict[str, Any] | None, *, full_old: bool) -> tuple[dict[str, Any], dict[str, Any],
                                                                       dict[str, Any] | None]:
    """``(local, full, full_old)`` projector states after ``init`` (``old`` is None) or ``update``.

    Seeded projectors run on every rank (no traffic). Others run once, on the owner rank, on the whole
    gradient; the result is broadcast and each rank keeps its rows of the basis. ``full_old`` asks for the
    old state with its whole basis too (the linear transfer needs both bases)."""
    proj = opt._parts(group)[0]
    shape = matrix_shape(opt, group, p)
    m = int(shape[0])
    seed = derive_seed(group["seed"], index)
    if proj.name in SEEDED_PROJECTORS or elementwise(proj):
        shape_only = torch.empty(tuple(shape), dtype=torch.float32, device="meta")
        ctx = {"layout": opt._layout(group, p)} if getattr(proj, "wants_layout", False) else {}
        if old is None:
            REFRESH_CALLS["init"] += 1
            new = proj.init(shape_only, seed=seed, **ctx)
        else:
            REFRESH_CALLS["update"] += 1
            new = proj.update(shape_only, old, **ctx)
        return new, new, old
    own = owner(index, lay.world)
    with comm.phase("refresh"):
        grad = gather_rows_to(_rows(local(p.grad), shape).float(), m, lay, own)
        old_whole = None
        if old is not None:  # every basis tensor (codes, scales, OSD's moments) whole: bases.gather(_to)
            d = _dim(old, shape)
            old_whole = _bases.gather(old, d, lay) if full_old else _bases.gather_to(old, d, lay, own)
        moments = _moments_to(opt, group, p, lay, own, old) if old is not None and proj.wants_moments else None
        new = None
        if lay.rank == own:
            # GUM's layer draw reads the parameter's place in its group (the same on every rank)
            ctx = {"layout": opt._layout(group, p)} if getattr(proj, "wants_layout", False) else {}
            if old is None:
                REFRESH_CALLS["init"] += 1
                new = proj.init(grad, seed=seed, **ctx)
            else:
                REFRESH_CALLS["update"] += 1
                if getattr(proj, "wants_lr", False):
                    ctx.update(lr=group["lr"], initial_lr=group.get("initial_lr", group["lr"]))
                if moments is not None:  # COAP's correction reads the first moment
                    ctx["moments"] = moments
                new = proj.update(grad, old_whole, **ctx)
        new = broadcast_from(new, lay, own)
    return _bases.cut(new, lay), new, (old_whole if full_old else None)  # each tensor's chunk of its own axis 0


def _moments_to(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, lay: Layout, own: int,
                old: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The whole moments shaped like the low-rank gradient (fp32, as the store loads them) on the owner rank,
    ``None`` elsewhere: one gather of row chunks (right side) or column chunks (left side) per moment, for a
    projector that reads them on a refresh (:attr:`~lowrank_optim.projectors.base.Projector.wants_moments`:
    COAP). Factored statistics (another shape) are not passed, as the projectors read only full moments."""
    proj, rule, _, _, store = opt._parts(group)
    state = opt.state[p]
    shape = matrix_shape(opt, group, p)
    low = _low_shape(old, shape, lay, proj)
    whole = _low_shape(old, shape, None, proj)
    out: dict[str, torch.Tensor] = {}
    for spec in rule.moments(low, group):
        if tuple(spec.shape) != tuple(low) or spec.name not in state:
            continue
        value = store.load(state, spec.name, spec.signed).float()
        if int(old["side"]) == LEFT:  # (r, n_j) column chunks
            got = gather_rows_to(value.T.contiguous(), whole[1], lay, own)
            got = got.T.contiguous() if got is not None else None
        else:
            got = gather_rows_to(value.contiguous(), whole[0], lay, own)
        if got is not None:
            out[spec.name] = got
    return out if lay.rank == own else None


def _step_lowrank(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int, lay: Layout) -> None:
    from ..engine import PENDING

    proj, rule, residual, transfer, store = opt._parts(group)
    state = opt.state[p]
    shape = matrix_shape(opt, group, p)  # a conv weight (out, in, *k): the row-sharded matrix out x (in * prod(k))
    m, n = int(shape[0]), int(shape[1])
    w = _rows(local(p), shape)
    grad = _rows(local(p.grad), shape)
    grad = grad if grad.dtype == torch.float32 else grad.float()
    if not state:
        state["step"], state["inner_step"] = 0, 0
        state["projector"], _, _ = _refreshed(opt, group, p, index, lay, None, full_old=False)
        _create(store, state, rule.moments(_low_shape(state["projector"], shape, lay, proj), group),
                rule.moments(_low_shape(state["projector"], shape, None, proj), group), w.device,
                derive_seed(group["seed"], index))
        if grad.device.type != "meta" and not _any_nonzero(grad, lay):
            state[PENDING] = 1  # as in one process: the subspace is chosen at the first nonzero gradient
    elif PENDING in state:
        if _any_nonzero(grad, lay):
            del state[PENDING]
            state["projector"], _, _ = _refreshed(opt, group, p, index, lay, None, full_old=False)
            pst = state["projector"]
            for spec, whole in zip(rule.moments(_low_shape(pst, shape, lay, proj), group),
                                   rule.moments(_low_shape(pst, shape, None, proj), group), strict=True):
                if tuple(state[spec.name].shape) != tuple(spec.shape):
                    local_store(store, _numel(whole.shape)).create(state, spec.name, spec.shape, w.device)
    elif refresh_due(state["step"], group["update_proj_gap"], _phase(opt, group, p)):
        old = state["projector"]
        linear = group["transfer"] == "linear" and "basis" in old
        new, new_full, old_full = _refreshed(opt, group, p, index, lay, old, full_old=linear)
        specs = rule.moments(_low_shape(new, shape, lay, proj), group)
        whole = _numel(rule.moments(_low_shape(new, shape, None, proj), group)[0].shape) if specs else 0
        transfer.apply(state, old_full if linear else old, new_full if linear else new, proj, specs,
                       local_store(store, whole, _split(new, shape, lay, proj)))
        for spec in specs:
            if tuple(state[spec.name].shape) != tuple(spec.shape):
                raise ValueError(f"Invalid transfer: {group['transfer']!r} kept moment {spec.name!r} of shape "
                                 f"{tuple(state[spec.name].shape)} but the new subspace needs {tuple(spec.shape)}")
        state["projector"] = new
    pst = state["projector"]
    if elementwise(proj):
        _step_elementwise(opt, group, p, lay, state, w, grad)
        _write_back(p, w)
        return
    if proj.name in _gum.PROJECTORS:
        _gum.step(opt, group, p, lay, state, w, grad)
        _write_back(p, w)
        return
    side, r = int(pst["side"]), int(pst["rank"])
    offset, size = lay.rows(m)
    if proj.name in STATE_BASIS_PROJECTORS:
        basis = proj.back_matrix(pst, w.device)
        basis = basis[offset: offset + size] if side == LEFT else basis
    else:  # P_i (left) or the whole Q (right), fp32, decoded from any stored form (bases.step_basis)
        basis = _bases.step_basis(pst, m if side == LEFT else n, lay, side == LEFT)
    if side == LEFT:
        whole = comm.all_reduce(basis.T @ grad, lay.group)  # R = sum_i P_i^T G_i, (r, n)
        c0, cn = lay.rows(n)
        low = whole[:, c0: c0 + cn].contiguous()
        spec = comm.Sharding(lay.group, 1, (r, n), m * n)
    else:
        whole = None
        low = grad @ basis  # (m_i, r)
        spec = comm.Sharding(lay.group, 0, (m, r), m * n)
    target = w if w.dtype == torch.float32 else w.float()
    d = _inner_step(group, rule, store, state, low, target, spec, _split(pst, shape, lay, proj))
    low_update = d.num if d.den is None else d.num / d.den
    alpha = -d.coef * group["scale"]
    view = {"side": side, "rank": r, "basis": basis}
    if side == LEFT:
        low_update = all_gather_cols(low_update, n, lay)  # N, (r, n)
        low = whole
    step_proj = _bases.step_projector(pst)  # the view's maps, with the stored form's complement floor
    if low_update.numel() and not getattr(residual, "replaces_lift", False):  # APOLLO applies its own update
        step_proj.add_back(target, low_update, view, alpha)
    ctx = {"coef": d.coef, "lr": d.lr} if getattr(residual, "wants_coef", False) else {}
    if getattr(residual, "wants_target", False):
        ctx["target"] = target
    # the residual sees R and N whole on the left side, as row chunks on the right; GaLore+'s sparse residual
    # learns this rank's rows of the matrix (.sparse)
    with comm.sharded(comm.Sharding(lay.group, None if side == LEFT else 0, (r, n) if side == LEFT else (m, r),
                                    m * n)), _sparse.rows(_sparse.RowBlock(lay.group, offset, size, (m, n))):
        extra = residual.step(grad, low, low_update, step_proj, view, state, group, **ctx)
    if extra is not None:
        target.sub_(extra)
    if target is not w:
        w.copy_(target)
    _write_back(p, w)


def _inner_step(group: dict[str, Any], rule: Any, store: StateStore, state: dict, low: torch.Tensor,
                target: torch.Tensor, spec: comm.Sharding, split: Split, *, plain: bool = False) -> Any:
    """The inner rule on this rank's part ``low`` of the tensor it sees, shared by the basis, elementwise and
    plain paths: loads the moments, runs ``rule.direction`` with its sums completed over ``spec``'s ranks, saves
    the moments (rounding keyed by ``split``'s global indices), counts the step and applies decoupled weight decay
    to ``target``. Returns the :class:`~lowrank_optim.rules.base.Direction`, or ``None`` when ``plain`` and the
    rule applied the whole update itself (``apply_plain``: a fused kernel, weight decay included)."""
    inner_step = state["inner_step"] + 1
    specs = rule.moments(tuple(low.shape), group)
    moments = {s.name: store.load(state, s.name, s.signed) for s in specs}
    with comm.sharded(spec):
        if plain and rule.apply_plain(target, low, moments, inner_step, group):
            d = None
        else:
            d = rule.direction(low, moments, inner_step, group, target)
    saver = local_store(store, None, split)
    for s in specs:
        saver.save(state, s.name, moments[s.name], s.signed)
    state["step"], state["inner_step"] = state["step"] + 1, inner_step
    if d is not None and group["weight_decay"] != 0:
        target.mul_(1 - d.lr * group["weight_decay"])
    return d


def _step_elementwise(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, lay: Layout, state: dict,
                      w: torch.Tensor, grad: torch.Tensor) -> None:
    """The step of an elementwise projector (FRUGAL's blocks) on this rank's rows: the rule on ``project(G_i)``
    (``G_i`` itself for an active block, nothing for an inactive one), the lift, and the state-free residual on
    the complement, all local."""
    proj, rule, residual, _, store = opt._parts(group)
    pst = state["projector"]
    shape = matrix_shape(opt, group, p)
    m, n = int(shape[0]), int(shape[1])
    low = proj.project(grad, pst)
    target = w if w.dtype == torch.float32 else w.float()
    whole = tuple(int(s) for s in proj.low_shape(shape, pst))
    d = _inner_step(group, rule, store, state, low, target, comm.Sharding(lay.group, 0, whole, m * n),
                    _split(pst, shape, lay, proj))
    low_update = d.num if d.den is None else d.num / d.den
    if low_update.numel():
        proj.add_back(target, low_update, pst, -d.coef * group["scale"])
    with comm.sharded(comm.Sharding(lay.group, 0, (m, n), m * n)):
        extra = residual.step(grad, low, low_update, proj, pst, state, group)
    if extra is not None:
        target.sub_(extra)
    if target is not w:
        w.copy_(target)


def _split(pst: dict[str, Any], shape: torch.Size, lay: Layout, proj: Projector | None = None) -> Split:
    """Where this rank's part of the low-rank gradient sits: rows of ``(m, r)`` (right) or columns of ``(r, n)``
    (an elementwise projector: rows of its own shape)."""
    whole = _low_shape(pst, shape, None, proj)
    dim = 0 if elementwise(proj) or _gum.full_size(proj, pst) or int(pst["side"]) != LEFT else 1
    return Split(dim, lay.rows(whole[dim])[0], whole)


def matrix_shape(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
    """The whole shape ``p`` is stepped as: its own, or for a conv weight ``(out, in, *k)`` the matrix
    ``out x (in * prod(k))`` (:func:`lowrank_optim.plan.matrix_shape`), whose rows are ``p``'s rows."""
    from ..plan import matrix_shape as shape_of

    kind = opt._planner.kind(group, p) if opt._parts(group)[0] is not None else None
    return shape_of(p, kind) if kind == "conv" else tuple(int(s) for s in p.shape)


def _rows(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's rows ``t`` of a parameter seen as rows of the matrix ``shape`` (a view of a contiguous shard;
    a copy otherwise, written back by :func:`_write_back`)."""
    if t.dim() == len(shape):
        return t
    try:
        return t.view(t.shape[0], *shape[1:])
    except RuntimeError:
        return t.reshape(t.shape[0], *shape[1:]).clone()


def _write_back(p: torch.Tensor, w: torch.Tensor) -> None:
    """Copies the matrix rows ``w`` into ``p``'s local shard when :func:`_rows` had to copy."""
    mine = local(p)
    if w.data_ptr() != mine.data_ptr():
        mine.copy_(w.view(mine.shape))


def _phase(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> int:
    """The refresh phase of a sharded matrix: 0, or with ``refresh_stagger`` its place in the group's staggered
    schedule (:mod:`lowrank_optim.schedule`), the same as one process's (it was always 0 here)."""
    if not group.get("refresh_stagger"):
        return 0
    phases = opt._phases(group)
    return stagger_phase(phases.get(id(p), -1), phases["count"], group["update_proj_gap"])


def _any_nonzero(grad: torch.Tensor, lay: Layout) -> bool:
    """Whether the whole gradient has a nonzero element (one MAX all-reduce of a flag)."""
    flag = torch.tensor([1.0 if bool(grad.any()) else 0.0], dtype=torch.float32, device=grad.device)
    return bool(comm.all_reduce_max(flag, lay.group).item() > 0)


def _low_shape(pst: dict[str, Any], shape: torch.Size, lay: Layout | None,
               proj: Projector | None = None) -> tuple[int, ...]:
    """This rank's part of the low-rank gradient: ``(m_i, r)`` on the right side, ``(r, n_j)`` on the left
    (``lay`` None: the whole ``(m, r)`` or ``(r, n)``); an elementwise projector's own shape of the rank's rows."""
    if elementwise(proj):
        rows = lay.rows(int(shape[0]))[1] if lay is not None else int(shape[0])
        return tuple(int(s) for s in proj.low_shape((rows, *tuple(shape)[1:]), pst))
    if _gum.full_size(proj, pst):  # GUM's full-size branch: this rank's rows of the parameter
        return (lay.rows(int(shape[0]))[1] if lay is not None else int(shape[0])), int(shape[1])
    r = int(pst["rank"])
    if int(pst["side"]) == LEFT:
        return r, (lay.rows(int(shape[1]))[1] if lay is not None else int(shape[1]))
    return (lay.rows(int(shape[0]))[1] if lay is not None else int(shape[0])), r


__all__ = ["ELEMENTWISE_PROJECTORS", "REFRESH_CALLS", "SHARDED_PROJECTORS", "SHARDED_RESIDUALS", "SHARDED_RULES",
           "SHARDED_TRANSFERS", "divide_refresh", "elementwise", "mode", "once", "owner", "sharded_parts", "step_param"]


def agree_finite(finite: bool, params: list[torch.Tensor]) -> bool:
    """The job-wide verdict of the non-finite check: a NaN in one rank's rows skips the step on every rank.
    One MAX all-reduce of a flag per distinct mesh group of the ``DTensor`` parameters (none in one process)."""
    import torch.distributed as dist

    from .shards import is_dtensor

    groups: list[Any] = []
    for p in params:
        if is_dtensor(p):
            g = p.device_mesh.get_group()
            if all(g is not h for h in groups):
                groups.append(g)
    if not groups or not dist.is_initialized():
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], dtype=torch.float32, device=params[0].device)
    for g in groups:
        comm.all_reduce_max(flag, g)
    return bool(flag.item() == 0.0)


def sum_over_ranks(value: int) -> int:
    """``value`` summed over the default process group (``value`` itself without one)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())
