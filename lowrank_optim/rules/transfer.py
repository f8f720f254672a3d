"""Transfer policies applied to the moments when a subspace is refreshed."""

from __future__ import annotations

import warnings

import torch

from ..projectors.base import LEFT, Projector, ProjState
from ..projectors.lazy_refresh import LazyRefresh
from ..state import StateStore
from .base import MomentSpec, TransferPolicy


class KeepTransfer(TransferPolicy):
    """GaLore's choice: moments keep their coordinates and are reused in the new basis."""

    name = "keep"

    def check_projector(self, projector: Projector, group: dict) -> None:
        _need_fixed_shape(self.name, projector)

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        return None


class ResetTransfer(TransferPolicy):
    """Moments restart from zero and so does the bias-correction step (FRUGAL's ``reset_statistics``).

    A refresh that lazy refresh skipped (:meth:`~lowrank_optim.projectors.lazy_refresh.LazyRefresh.was_skipped`:
    the same subspace, no refresh counted) resets nothing: the moments still belong to the subspace.
    """

    name = "reset"

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        if LazyRefresh.was_skipped(old, new):
            return
        for spec in specs:
            store.create(state, spec.name, spec.shape, state[spec.name].device)
        state["inner_step"] = 0


def same_projection(old: ProjState, new: ProjState) -> bool:
    """Whether two projector states describe the same basis.

    States that store a ``basis`` tensor are compared on side, rank and basis (counters do not change
    the decoding); others (bases regenerated from ints, e.g. a seed and a refresh count) on every entry.
    """
    keys = ("side", "rank", "basis") if "basis" in old and "basis" in new else tuple(old)
    if old.keys() != new.keys():
        return False
    for k in keys:
        a = old[k]
        b = new[k]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
                    or a.shape != b.shape or not torch.equal(a, b.to(a.device)):
                return False
        elif a != b:
            return False
    return True


def _need_fixed_shape(transfer: str, projector: Projector) -> None:
    if not projector.fixed_low_shape:
        raise ValueError(f"Invalid transfer: {transfer!r} with projector={projector.name!r}, whose low-rank shape "
                         "changes on a refresh (the moments cannot be kept or moved); use transfer='reset' or "
                         "'reset_on_change'")


def _solve_sym(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """``gram^{-1} rhs`` for a symmetric positive (semi-)definite float64 ``gram``: a solve, else the
    pseudo-inverse (singular ``gram``), else the pseudo-inverse on the CPU; ``None`` when all three fail."""
    try:
        return torch.linalg.solve(gram, rhs)
    except RuntimeError:
        pass
    for device in (gram.device, torch.device("cpu")):
        try:
            out = torch.linalg.pinv(gram.to(device), hermitian=True) @ rhs.to(device)
        except RuntimeError:
            continue
        if bool(torch.isfinite(out).all()):
            return out.to(rhs.device)
    return None


class LinearTransfer(TransferPolicy):
    """Moves low-rank moments into the new basis (Flora's momentum transfer; COAP's ``restore_state``).

    With ``P_old``, ``P_new`` the bases (``(d, r)``, columns span the subspace), the first moment ``M``
    (right side, ``(m, r)``) becomes the least-squares solution of ``M' P_new^T = M P_old^T``::

        M' = M (P_old^T P_new) (P_new^T P_new)^{-1}          (left side: the transpose of this)

    so the new moment decodes to the orthogonal projection of the old decoded moment onto the new
    subspace. For orthonormal bases this is ``M P_old^T P_new`` (COAP); for Flora's Gaussian bases it
    differs from the reference's ``M P_old^T P_new`` (unbiased, but its decoding carries noise of about
    ``d / r`` times the momentum's energy): we take the smallest-error transfer instead. A moment that
    may be negative (a first moment) moves linearly, ``M' = M C`` with ``C`` the coefficient above.

    A non-negative moment (Adam's second moment ``V``, a per-coordinate mean of ``g^2``) moves as the second
    moment of the same linear map of independent coordinates: ``g'_j = sum_k g_k C_kj`` has
    ``E[g'_j^2] = sum_k C_kj^2 E[g_k^2]``, so ``V' = V (C o C)`` (left: ``(C o C) V``), ``o`` the entrywise
    product. It cannot cancel: ``V'_j >= C_kj^2 V_k`` for every ``k``, and by Cauchy-Schwarz
    ``|M'_j| / sqrt(V'_j) <= sqrt(sum_k M_k^2 / V_k)``, so Adam's normalised step stays of the order it had.
    (COAP's and this policy's former ``V' = (sqrt(V) C)^2`` lets signed terms cancel to ~0 while ``M'`` does
    not: ``max |m_hat| / sqrt(v_hat)`` jumped from ~1 to 30-110 on the step after every subspace change, and
    the step RMS grew 2.6-3.9x, for Flora with Adam, GaLore with a random basis and COAP with
    ``restore_state``.) For a 0/1 matching ``C`` (coordinates kept by both selections) both rules move entries
    unchanged. Moments whose shape is not the low-rank shape (Adafactor's factored statistics) are kept. When
    the basis is unchanged (equal projector states) nothing is touched, so the policy is exactly the identity.

    ``C`` comes from :meth:`~lowrank_optim.projectors.base.Projector.basis_matrix` of the old and new states,
    so every projector whose ``project`` is a matrix product works (stored, regenerated, DCT and 0/1
    column / row selection bases); entries, blocks and GUM's branches are refused at construction. If the
    ``r x r`` solve fails on every path the moments are reset, with a warning. A "reset" of the second
    moment alone is not offered: Adam's bias correction would then restart for ``v`` but not for ``m``,
    making the next steps about ``1 / sqrt(1 - beta2)`` times too large; use ``reset`` for a clean restart
    of every moment.
    """

    name = "linear"

    def check_projector(self, projector: Projector, group: dict) -> None:
        _need_fixed_shape(self.name, projector)
        if not projector.matrix_map:
            raise ValueError(f"Invalid transfer: 'linear' with projector={projector.name!r}, whose projection is "
                             "not a product with a basis matrix; use transfer='match', 'keep' or 'reset'")

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        if same_projection(old, new):
            return
        side = int(new["side"])
        if int(old["side"]) != side:
            raise ValueError(f"Invalid transfer: the projection side changed ({old['side']} -> {side})")
        r_old, r_new = int(old["rank"]), int(new["rank"])
        axis = 0 if side == LEFT else 1
        moved = [s for s in specs if len(s.shape) == 2 and state[s.name].shape[axis] == r_old
                 and s.shape[axis] == r_new]
        if not moved:
            return
        device = state[moved[0].name].device
        b_old, b_new = projector.basis_matrix(old, device), projector.basis_matrix(new, device)
        if b_old is None or b_new is None:
            raise ValueError(f"Invalid transfer: 'linear' needs a basis matrix; projector {projector.name!r} "
                             "has none")
        b_old, b_new = b_old.to(device=device, dtype=torch.float64), b_new.to(device=device, dtype=torch.float64)
        cross = b_new.T @ b_old  # (r_new, r_old); d x r products in fp64 cost little next to a refresh
        gram = b_new.T @ b_new
        gram = 0.5 * (gram + gram.T)
        solved = _solve_sym(gram, cross)  # (r_new, r_old): left M' = solved @ M, right M' = M @ solved^T
        if solved is None:
            warnings.warn("lowrank_optim: the linear transfer's solve failed; the moments are reset",
                          RuntimeWarning, stacklevel=3)
            ResetTransfer().apply(state, old, new, projector, specs, store)
            return
        coef = (solved if side == LEFT else solved.T).float()
        coef_sq = coef.square()
        for spec in moved:
            value = store.load(state, spec.name, spec.signed)
            if spec.signed:
                out = coef @ value if side == LEFT else value @ coef
            else:
                value = value.clamp(min=0)
                out = coef_sq @ value if side == LEFT else value @ coef_sq
            if tuple(state[spec.name].shape) != tuple(spec.shape):
                store.create(state, spec.name, spec.shape, device)
            store.save(state, spec.name, out, spec.signed)


def _match_positions(old_idx: torch.Tensor, new_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_pos, old_pos)``: where each index kept by both selections sits in the new and the old list."""
    old_idx = old_idx.to(new_idx.device)
    order = torch.argsort(old_idx, stable=True)
    sorted_old = old_idx[order]
    pos = torch.searchsorted(sorted_old, new_idx).clamp(max=max(sorted_old.numel() - 1, 0))
    found = sorted_old[pos] == new_idx if sorted_old.numel() else torch.zeros_like(new_idx, dtype=torch.bool)
    new_pos = torch.nonzero(found).flatten()
    return new_pos, order[pos[new_pos]]


class MatchTransfer(TransferPolicy):
    """Index matching for selection projectors (DCT-AdamW's ``rotate_subspace``, arXiv:2505.17967).

    The projector state must hold ``indices`` (the selected basis columns, e.g. the ``"dct"`` projector).
    A column selected both before and after the refresh keeps its moment entries, moved to its new
    position (the order of the new ``indices``); a newly selected column starts at zero; a dropped column
    is discarded. This equals the reference's product with the 0/1 matching matrix
    ``R = Q[:, old]^T Q[:, new]``, for the first moment and (``|V R|``) the second alike: for a 0/1
    matrix with at most one 1 per row and column, the second moment moves entry by entry too. Adam's
    bias-correction step is not reset (as in the reference), so a new column's first steps are larger
    than a warmed-up column's.

    The moment axis that indexes the selection is axis 0 on the left side and axis 1 on the right; a
    full-shape 2-D moment is matched along it, a 1-D factored statistic (Adafactor) is matched when its
    name ends in ``_row`` (left) or ``_col`` (right), the moments of a 1-D low-rank tensor (the ``entries``
    selection) are matched along their only axis, and every other moment is kept. Projectors without
    ``indices`` (:attr:`~lowrank_optim.projectors.base.Projector.indexed` False) are refused at construction.

    Storage: each moment is loaded through the store (fp32 view), rebuilt in fp32 and saved back. In fp32
    and bf16 the surviving entries are bit-exact copies; in 8-bit they are re-quantized, because the
    256-element blocks (and so their ``absmax``) change with the columns they hold: survivors then agree
    to one quantization step, and new columns hold zero as the blockwise code stores it (bitsandbytes
    encodes 0 within about 1e-4 of the block's ``absmax``).
    """

    name = "match"

    def check_projector(self, projector: Projector, group: dict) -> None:
        if not projector.indexed:
            raise ValueError(f"Invalid transfer: 'match' with projector={projector.name!r}, which selects no "
                             "indexed columns or coordinates (use it with 'dct', 'columns', 'rows' or 'entries')")

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        if "indices" not in old or "indices" not in new:
            raise ValueError(f"Invalid transfer: 'match' needs a selection projector whose state holds "
                             f"'indices'; {type(projector).__name__} ({projector.name!r}) has none")
        if int(old["side"]) != int(new["side"]):
            raise ValueError(f"Invalid transfer: the projection side changed ({old['side']} -> {new['side']})")
        old_idx, new_idx = old["indices"], new["indices"]
        if old_idx.shape == new_idx.shape and torch.equal(old_idx, new_idx.to(old_idx.device)):
            return
        axis = 0 if int(new["side"]) == LEFT else 1
        suffix = "_row" if axis == 0 else "_col"
        new_pos, old_pos = _match_positions(old_idx, new_idx)
        # a 1-D low-rank tensor (entries): its moments (not factored statistics) are indexed along dim 0
        flat = all(len(s.shape) == 1 and not s.name.endswith(("_row", "_col")) for s in specs)
        for spec in specs:
            if len(spec.shape) == 2:
                dim = axis
            elif (flat and spec.shape[0] == new_idx.numel()) or (len(spec.shape) == 1 and spec.name.endswith(suffix)):
                dim = 0
            else:
                continue
            device = state[spec.name].device
            value = store.load(state, spec.name, spec.signed)
            out = torch.zeros(spec.shape, dtype=torch.float32, device=device)
            out.index_copy_(dim, new_pos.to(device), value.index_select(dim, old_pos.to(device)))
            store.create(state, spec.name, spec.shape, device)
            store.save(state, spec.name, out, spec.signed)
