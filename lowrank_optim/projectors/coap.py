"""COAP's projector: warm-started randomized SVD plus a correlation-aware correction
(Xiao et al., "COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection", CVPR 2025,
arXiv:2412.00071).

Written in the *oriented* form used by every projector here: ``A`` is ``G`` (left side) or ``G^T``
(right side), ``p x q``; the basis ``U`` is ``p x r``; the first moment in oriented form is ``Mo``
(``r x q``: ``M`` on the left side, ``M^T`` on the right), decoded as ``D = U Mo``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_int, check_number
from ..linalg import max_abs_scale
from .base import LEFT, SIGN_RULES, Projector, ProjState, no_gradient, oriented
from .rsvd import randomized_range

#: Moment names (in order of preference) read as "the previous first moment".
FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")


def correction_objective(a: torch.Tensor, u: torch.Tensor, mo: torch.Tensor | None, *,
                         normalize: bool = True) -> tuple[float, float, torch.Tensor]:
    """COAP's correction loss ``L = f(U) h(U)`` and its closed-form gradient.

    ``f`` is the reconstruction error ``||A - U U^T A||^2`` and ``h = 1 - mean_j cos(D_j, A_j)`` the
    misalignment of the decoded moment with the gradient, column by column (each column is one vector
    the basis acts on). With ``normalize`` (ours) ``A`` is divided by its Frobenius norm, so ``f`` lies
    in ``[0, 1]`` and the gradient does not depend on the gradient's scale; without it ``f`` is the
    reference's mean over the ``p q`` entries, whose gradient is ``||A||^2 / (p q)`` times smaller.

    Returns:
        ``(f, h, dL/dU)``.
    """
    p, q = a.shape
    if normalize:
        norm = a.norm()
        a = a / norm if norm > 0 else a
        weight = 1.0
    else:
        weight = 1.0 / (p * q)
    b = u.T @ a
    err = a - u @ b
    f = float(err.square().sum()) * weight
    grad_f = (err @ b.T + a @ (err.T @ u)).mul_(-2.0 * weight)
    h = 1.0
    grad_h = None
    if mo is not None:
        d = u @ mo
        dn = d.norm(dim=0)
        an = a.norm(dim=0)
        valid = (dn > 0) & (an > 0)
        if bool(valid.any()):
            dn_s = torch.where(valid, dn, torch.ones_like(dn))
            an_s = torch.where(valid, an, torch.ones_like(an))
            cos = torch.where(valid, (d * a).sum(dim=0) / (dn_s * an_s), torch.zeros_like(dn))
            h = 1.0 - float(cos.mean())
            w = a / (dn_s * an_s) - d * (cos / dn_s.square())
            w = w * valid
            grad_h = (w @ mo.T).mul_(-1.0 / q)
    grad = grad_f.mul_(h)
    if grad_h is not None:
        grad.add_(grad_h, alpha=f)
    return f, h, grad


class COAPProjector(Projector):
    """Randomized SVD warm-started from the previous basis every ``reproject_factor``-th refresh, and a
    correlation-aware gradient step on the basis at the other refreshes.

    The engine refreshes every ``update_proj_gap`` steps (COAP's ``update_interval``, 32); refresh ``k``
    is a randomized SVD when ``k % reproject_factor == 0`` and a correction otherwise. The correction
    minimises :func:`correction_objective` by one gradient step, its norm clipped to ``clip``
    (reference: 1) and its size ``correction_lr`` (reference: 0.1), with no re-orthonormalisation.

    Deliberate difference: the reference takes the mean of the squared reconstruction error over all
    ``m n`` entries, so at realistic gradient scales (entries ~1e-3) the step moves ``P`` by ~1e-10
    relative (below bf16 resolution) and COAP degenerates into "warm-started randomized SVD every
    ``T_u K`` steps". We normalise the gradient (``normalize=True``), which makes the step scale-free;
    ``normalize=False`` reproduces the reference's loss. The cosine is taken per column of the oriented
    gradient (per vector the basis acts on) on both sides; the reference uses rows of ``G`` on both.

    The randomized SVD is the reference's: one multiplication by the gradient from the previous basis,
    a QR and a small SVD (``oversample=0``, ``power_iters=0``); the first basis comes from a Gaussian
    sketch drawn on the CPU from ``(seed, refresh)``.

    Args:
        rank: target rank.
        side: side rule.
        reproject_factor: a randomized SVD every this many refreshes (K = 5).
        correction_lr: step size of the correction (0.1).
        clip: maximum norm of the correction's gradient (1.0).
        normalize: scale-free correction (True) or the reference's mean-reduced loss (False).
        oversample: extra sketch columns of the randomized SVD.
        power_iters: extra subspace iterations of the randomized SVD.
        sign: sign rule of the randomized SVD's basis (``"align"`` default: the re-estimated basis agrees
            column by column with the corrected one it replaces, so kept moments stay in their coordinates;
            ``"canonical"``; ``"raw"``). The correction moves the basis continuously and needs no sign rule.

    The basis is not orthonormal after a correction (:attr:`orthonormal` is False), so residual rules that
    take the complement ``G - P P^T G`` are refused with this projector.
    """

    name = "coap"
    lazy_refusal = ("most of its refreshes are one incremental correction step of the basis (a randomized SVD only "
                    "every reproject_factor-th): a high overlap after a small step is the normal case, so skipping "
                    "refreshes would slow the basis's own learning instead of saving a decomposition")
    wants_moments = True
    orthonormal = False
    dominant = True

    def __init__(self, rank: int, side: str = "std", *, reproject_factor: int = 5, correction_lr: float = 0.1,
                 clip: float = 1.0, normalize: bool = True, oversample: int = 0, power_iters: int = 0,
                 sign: str = "align") -> None:
        super().__init__(rank, side)
        self.sign_rule = check_choice("sign", sign, SIGN_RULES)
        self.reproject_factor = check_int("reproject_factor", reproject_factor, low=1)
        self.correction_lr = check_number("correction_lr", correction_lr, low=0.0)
        self.clip = check_number("clip", clip, low=0.0, low_open=True)
        if not isinstance(normalize, bool):
            raise TypeError(f"Invalid normalize: expected a bool, got {normalize!r}")
        self.normalize = normalize
        self.oversample = check_int("oversample", oversample, low=0)
        self.power_iters = check_int("power_iters", power_iters, low=0)

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        return randomized_range(oriented(grad, state["side"]), state["rank"], oversample=self.oversample,
                                power_iters=self.power_iters, seed=(state["seed"], state["refresh"]), warm=previous)

    def refresh(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        if new["refresh"] % self.reproject_factor == 0:
            if not no_gradient(grad):  # a zero gradient's SVD is arbitrary: keep the basis
                new["basis"] = self.fresh_basis(grad, new, self.basis_of(state))
        else:
            new["basis"] = self.correct(grad, state, context.get("moments"))
        return new

    def correct(self, grad: torch.Tensor, state: ProjState, moments: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """One correlation-aware step on the basis of ``state`` (a new tensor; ``state`` is untouched)."""
        u = self.basis_of(state)
        a = oriented(grad, state["side"])
        if self.normalize:  # the normalised objective is scale-free: divide first so no norm overflows fp32
            a = a / max_abs_scale(a)
        mo = self._oriented_moment(moments, state, tuple(a.shape))
        _, _, g = correction_objective(a, u, mo, normalize=self.normalize)
        norm = float(g.norm())
        if norm > self.clip:
            g.mul_(self.clip / norm)
        return u - self.correction_lr * g

    @staticmethod
    def _oriented_moment(moments: dict[str, torch.Tensor] | None, state: ProjState,
                         a_shape: tuple[int, int]) -> torch.Tensor | None:
        if not moments:
            return None
        r, q = int(state["rank"]), a_shape[1]
        for key in FIRST_MOMENT_KEYS:
            m = moments.get(key)
            if m is None or m.dim() != 2:
                continue
            mo = m if state["side"] == LEFT else m.T
            if tuple(mo.shape) == (r, q):
                return mo.float()
        return None
