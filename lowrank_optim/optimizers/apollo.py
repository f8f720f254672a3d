"""APOLLO: SGD-like Memory, AdamW-level Performance (Zhu et al., MLSys 2025, arXiv:2412.05270)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .._validation import check_int
from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer
from .projector_options import preset_projector_options

#: APOLLO-Mini's alpha: sqrt(128), the paper's heuristic for rank 1 (HF Trainer / the authors' README pass
#: ``scale=128``, which their code and ``pytorch-optimizer`` apply as ``sqrt(scale)``).
MINI_SCALE = math.sqrt(128.0)


@register_optimizer("apollo")
class APOLLO(LowRankOptimizer):
    """AdamW-level updates from an SGD-sized state: the raw gradient scaled per channel.

    Per projected ``m x n`` matrix (Algorithm 1 of the paper; ``d`` = the projected dimension, the smaller
    one under ``proj_side="std"``, and the other dimension holds the channels):

    1. ``P``: a seeded Gaussian ``(d, r)`` matrix with i.i.d. ``N(0, 1/r)`` entries (the ``"random"``
       projector: never stored, regenerated from ``(seed, parameter index, refresh count)`` on the CPU),
       redrawn every ``update_proj_gap`` steps;
    2. ``R = P^T G`` (``r x n``) or ``G P`` (``m x r``); an auxiliary Adam on ``R`` (moments kept across
       redraws, as GaLore keeps them) gives ``R~ = m / (sqrt(v) + eps)``, its bias correction folded into
       the step size ``eta_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)``;
    3. ``s_j = ||R~_j|| / ||R_j||`` per channel (``scale_type="channel"``) or one ``||R~|| / ||R||`` per
       tensor (``"tensor"``, APOLLO-Mini);
    4. ``G~ = G diag(s)``, limited so that ``||G~_t|| <= limiter_gamma ||G~_{t-1}||`` (Fira's limiter, the
       first step only arms it; see :class:`lowrank_optim.rules.apollo_scaling.APOLLOScaling`);
    5. ``W <- W - lr * wd * W - eta_t * scale * G~`` (decoupled weight decay from the pre-update weight).

    A random projection approximately keeps norms (``||R_j|| ~ ||G_j||``) but Adam's normalised step in
    ``r`` dimensions has norm about ``sqrt(r / d)`` of the full one, so ``s`` underestimates Adam's
    scaling by about ``sqrt(r / d)``; ``scale`` (alpha) compensates. The paper uses 1 for APOLLO at a
    quarter rank and sqrt(128) for APOLLO-Mini. Because ``s`` is a ratio whose numerator is
    scale-invariant, multiplying ``P`` by ``c`` divides ``s`` by ``c``: the trajectory is unchanged when
    ``scale`` is multiplied by ``c`` (``tests/test_apollo.py::test_projection_scale_is_absorbed_by_alpha``).

    Which formula: we follow the paper and scale the **raw full-rank gradient** ``G``. ``pytorch-optimizer``
    4.1's ``APOLLO`` instead scales the *projected* gradient ``R diag(s)`` and lifts it back through ``P``
    (a rank-``r`` update, multiplied by ``scale ** 1.5``), which throws away everything outside the random
    subspace, the part APOLLO exists to keep. The two coincide when ``P`` is square and orthogonal
    (``tests/test_apollo.py::test_matches_pytorch_optimizer_where_formulas_agree``, which also names the
    other differences: ``eps`` after bias correction (torch's order), ``scale`` as alpha rather than
    alpha squared, weight decay from the pre-update weight, a seeded CPU draw instead of the global RNG).

    State per projected matrix: two ``r x n`` (or ``m x r``) fp32/bf16/8-bit moments, one stored norm
    (fp32 scalar) and the projector's ints (side, rank, seed, refresh count); no basis is stored.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate (paper pre-training: 0.01).
        betas: coefficients of the auxiliary Adam.
        eps: its epsilon (torch's 1e-8; the authors' code: 1e-6).
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one (``None``: only groups with ``rank``); the paper
            pre-trains with a quarter of the hidden size (128 at 60M) and shows half of that suffices.
        update_proj_gap: redraw period of ``P`` (200, the paper's T).
        scale: alpha, multiplier of the scaled gradient (1.0).
        scale_type: ``"channel"`` (default) or ``"tensor"``.
        limiter_gamma: norm-growth bound (1.01); ``None`` disables the limiter.
        distribution: ``"gaussian"`` (the paper) or ``"orthonormal"`` random projection.
        proj_side: side rule (``"std"``: project the smaller dimension, as the paper).
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"`` for the auxiliary moments.
        **kwargs: further engine options.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "apollo", "transfer": "keep",
                                                 "projector": "random", "scale": 1.0, "scale_type": "channel"}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float | None = None, scale_type: str | None = None,
                 limiter_gamma: float | None = 1.01, distribution: str = "gaussian", proj_side: str = "std",
                 state_dtype: str = "fp32", projector_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = preset_projector_options(kwargs.get("projector", "random"), "random",
                                           {"distribution": ("distribution", distribution, "gaussian")},
                                           projector_options)
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap,
                         scale=self.preset_defaults["scale"] if scale is None else scale,
                         scale_type=self.preset_defaults["scale_type"] if scale_type is None else scale_type,
                         limiter_gamma=limiter_gamma, proj_side=proj_side, state_dtype=state_dtype,
                         projector_options=options, **kwargs)


@register_optimizer("apollo_mini")
class APOLLOMini(APOLLO):
    """APOLLO-Mini: a rank-1 auxiliary space and one scaling factor per tensor (an SGD-sized state).

    Same update as :class:`APOLLO` with ``scale_type="tensor"``, ``scale=sqrt(128)`` (the paper's alpha;
    the authors' ``scale=128`` is applied as its square root) and rank 1: every group that carries a
    ``rank`` is projected at rank 1 whatever the value (the rank only marks it as projected); use
    ``APOLLO(scale_type="tensor", rank=r)`` for tensor-wise scaling at another rank. State per projected
    matrix: two ``1 x n`` moments and one stored norm.

    Args:
        params, lr, betas, eps, weight_decay, update_proj_gap, limiter_gamma, distribution, proj_side,
            state_dtype, **kwargs: as :class:`APOLLO`.
        rank: ``None`` (default: only groups with ``rank`` are projected) or any int (every group is
            projected, at rank 1).
        scale: alpha (sqrt(128)).
        scale_type: ``"tensor"`` (default) or ``"channel"``.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {**APOLLO.preset_defaults, "scale": MINI_SCALE,
                                                 "scale_type": "tensor"}

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, rank: int | None = None, **kwargs: Any) -> None:
        if rank is not None:
            check_int("rank", rank, low=1)
        super().__init__(params, lr, rank=None if rank is None else 1, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group (torch semantics); a group carrying ``rank`` is projected at rank 1."""
        if isinstance(param_group, dict) and param_group.get("rank") is not None:
            check_int("rank", param_group["rank"], low=1)
            param_group = {**param_group, "rank": 1}
        super().add_param_group(param_group)


__all__ = ["APOLLO", "MINI_SCALE", "APOLLOMini"]
