"""COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection (Xiao et al., CVPR 2025,
arXiv:2412.00071)."""

from __future__ import annotations

from typing import Any, ClassVar

from .._validation import check_int
from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer
from .projector_options import preset_projector_options


@register_optimizer("coap")
class COAP(LowRankOptimizer):
    """Adam in a subspace corrected every ``update_interval`` steps and re-estimated every
    ``update_interval * reproject_factor`` steps by a warm-started randomized SVD.

    See :class:`lowrank_optim.projectors.coap.COAPProjector` for the correction and how it differs
    from the reference (normalised, so that it moves the basis at realistic gradient scales). Moments
    are kept as they are by default (the reference's ``restore_state=False``); ``restore_state=True``
    moves them into the new basis (the ``"linear"`` transfer: first moment linearly, ``M' = M C``; second moment
    as ``V' = V (C o C)``, not the reference's ``(sqrt(V) C)^2``, whose signed terms cancel and inflate the
    step after each re-estimation, see :class:`~lowrank_optim.rules.transfer.LinearTransfer`). Adam follows
    torch's order with torch's ``eps`` (the reference: HF order, 1e-6), and weight decay is computed from the
    pre-update weight.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate.
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one.
        update_interval: steps between two refreshes (correction or randomized SVD), T_u = 32;
            ``update_proj_gap`` is the engine's name and wins if given.
        reproject_factor: a randomized SVD every this many refreshes (K = 5).
        restore_state: move the moments into the new basis on every refresh.
        correction_lr: step size of the correction (0.1).
        normalize: scale-free correction (True, ours) or the reference's loss (False).
        scale: multiplier of the back-projected update (1.0).
        proj_side: side rule.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        projector_options: extra projector options (override the arguments above).
        **kwargs: further engine options (``transfer`` overrides ``restore_state``).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "drop", "transfer": "keep",
                                                 "projector": "coap", "update_proj_gap": 32, "scale": 1.0}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_interval: int = 32,
                 reproject_factor: int = 5, restore_state: bool = False, correction_lr: float = 0.1,
                 normalize: bool = True, scale: float = 1.0, proj_side: str = "std", state_dtype: str = "fp32",
                 projector_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not isinstance(restore_state, bool):
            raise TypeError(f"Invalid restore_state: expected a bool, got {restore_state!r}")
        gap = kwargs.pop("update_proj_gap", check_int("update_interval", update_interval, low=1))
        transfer = kwargs.pop("transfer", "linear" if restore_state else "keep")
        options = preset_projector_options(
            kwargs.get("projector", "coap"), "coap",
            {"reproject_factor": ("reproject_factor", reproject_factor, 5),
             "correction_lr": ("correction_lr", correction_lr, 0.1), "normalize": ("normalize", normalize, True)},
            projector_options)
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=gap, transfer=transfer, scale=scale, proj_side=proj_side,
                         state_dtype=state_dtype, projector_options=options, **kwargs)
