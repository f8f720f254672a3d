"""Flora: Low-Rank Adapters Are Secretly Gradient Compressors (Hao, Cao and Mou, ICML 2024, arXiv:2402.03293)."""

from __future__ import annotations

from typing import Any, ClassVar

from .._validation import check_int
from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer
from .projector_options import preset_projector_options


@register_optimizer("flora")
class Flora(LowRankOptimizer):
    """Moments kept in a seeded random subspace that is resampled every ``kappa`` steps.

    The ``"random"`` projector draws a Gaussian ``N(0, 1/r)`` basis from ``(seed, parameter index,
    resample count)`` on the CPU whenever it is needed, so the state holds the seed and counters, never
    the projection. On each resample the compressed first moment is moved into the new basis (the
    ``"linear"`` transfer). Inside the subspace the default rule is Adafactor with momentum
    (``beta1=0.9``), fixed ``lr`` scaled by the parameter's RMS, as in Flora's torch code; ``inner="adam"``
    is the Adam variant users of the reference asked for, with both moments compressed (on a resample the
    second moves as ``V (C o C)``, the variance of the linear map that moves the first).

    Deliberate differences from ``flora-opt`` (the engine projects first, then runs the rule):

    * Adafactor's factored second moment is kept for the *projected* gradient (``m + r`` floats for an
      ``m x n`` matrix projected on the right) instead of the full one (``m + n``), the normalised
      update is formed in the subspace, and the back-projected update replaces Flora's
      ``(1 - beta1) u + beta1 Up(c)`` mix of the full current update and the decompressed history.
    * The momentum transfer solves for the closest representable momentum (see
      :class:`lowrank_optim.rules.transfer.LinearTransfer`) instead of ``c P_old^T P_new``.
    * The basis is drawn on the parameter's device, as the reference does (same device type and seed: same
      basis); ``projector_options={"generator": "cpu"}`` draws it on the CPU for one basis on every device.
    * Momentum compression is not disabled for the Adam variant or for unfactored second moments.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate, an absolute step like AdamW's (1e-3); with ``scale_parameter=True`` it is
            multiplied by ``max(eps[1], RMS(W))`` as in ``flora-opt``.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one.
        kappa: resampling period in steps (1000); ``update_proj_gap`` is the engine's name and wins if given.
        inner: ``"adafactor"`` (default) or ``"adam"``.
        distribution: ``"gaussian"`` (Flora) or ``"orthonormal"`` random basis.
        scale: multiplier of the back-projected update (1.0).
        proj_side: side rule (``"std"``: project the smaller dimension, as Flora).
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        projector_options: extra options of the random projector (``cache_size``, ``generator``).
        **kwargs: rule hyper-parameters (Adafactor: ``beta1``, ``eps``, ``clip_threshold``, ``decay_rate``,
            ``scale_parameter`` (False here, True in ``flora-opt``: see above), ``relative_step``; Adam:
            ``betas``, ``eps``) and engine options.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adafactor", "residual": "drop", "transfer": "linear",
                                                 "projector": "random", "update_proj_gap": 1000, "scale": 1.0,
                                                 "beta1": 0.9, "relative_step": False,
                                                 "scale_parameter": False}

    def __init__(self, params: ParamsT, lr: float = 1e-3, weight_decay: float = 0.0, *, rank: int | None = None,
                 kappa: int = 1000, inner: str = "adafactor", distribution: str = "gaussian", scale: float = 1.0,
                 proj_side: str = "std", state_dtype: str = "fp32", projector_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        gap = kwargs.pop("update_proj_gap", check_int("kappa", kappa, low=1))
        options = preset_projector_options(kwargs.get("projector", "random"), "random",
                                           {"distribution": ("distribution", distribution, "gaussian")},
                                           projector_options)
        super().__init__(params, lr, weight_decay=weight_decay, rank=rank, update_proj_gap=gap, inner=inner,
                         scale=scale, proj_side=proj_side, state_dtype=state_dtype, projector_options=options,
                         **kwargs)
