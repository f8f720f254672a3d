"""Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint? (Chen et al. 2024,
arXiv:2410.01623)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer


@register_optimizer("fira")
class Fira(LowRankOptimizer):
    """GaLore's low-rank Adam plus the residual the projection drops, rescaled and norm-growth limited.

    Per projected matrix: ``R = project(G)``, Adam on ``R`` gives ``N``; the residual ``S = phi * (G - lift(R))``
    with one factor ``phi_j = ||N_j|| / ||R_j||`` per row (right projection) or column (left projection),
    i.e. per slice along the side the projection keeps; the limiter rescales ``S`` so that its norm grows by
    at most ``limiter_gamma`` per step (one stored norm per matrix); the step is ``scale * lift(N) + S``.

    Residual forms (``fira_residual``):

    * ``"reference"`` (default): ``G - scale * P R``, as in the authors' code (``xichen-fy/Fira``, the PyPI
      ``fira`` package): the lift carries GaLore's alpha, so with the published ``scale=0.25`` the residual
      keeps 75% of the in-subspace gradient. We follow the code because it produced the published numbers.
    * ``"orthogonal"``: ``G - P R``, the paper's equation (only what lies outside the subspace).

    Differences from ``fira.FiraAdamW`` (all deliberate, see ``tests/test_fira.py``): Adam follows torch's
    order (``eps`` added after the second-moment bias correction; the reference adds it before, so the two
    differ by ``eps (1 - sqrt(1 - beta2^t))`` in the denominator) and torch's default ``eps=1e-8`` (the
    reference: 1e-6); weight decay is decoupled from the *pre-update* weight (the reference decays the
    updated weight); ``limiter_gamma`` is an option (fixed 1.01 in the reference); state is plain tensors.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate (paper pre-training: 0.01).
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one (``None``: only groups with ``rank``).
        update_proj_gap: SVD refresh period (200).
        scale: alpha, multiplier of the back-projected low-rank step (0.25 in the published 60M-350M runs).
        projector: ``"svd"`` or any registered projector.
        proj_side: side rule.
        fira_residual: ``"reference"`` or ``"orthogonal"`` (above).
        limiter_gamma: norm-growth bound gamma (1.01); ``None`` disables the limiter.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        **kwargs: further engine options.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "fira", "transfer": "keep"}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25, projector: str = "svd", proj_side: str = "std",
                 fira_residual: str = "reference", limiter_gamma: float | None = 1.01, state_dtype: str = "fp32",
                 **kwargs: Any) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, projector=projector, proj_side=proj_side,
                         fira_residual=fira_residual, limiter_gamma=limiter_gamma, state_dtype=state_dtype,
                         **kwargs)
