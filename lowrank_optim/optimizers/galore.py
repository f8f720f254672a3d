"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., ICML 2024,
arXiv:2403.03507)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer


@register_optimizer("galore_adamw")
class GaLoreAdamW(LowRankOptimizer):
    """GaLore with Adam inside the subspace (exact SVD every ``update_proj_gap`` steps, moments kept).

    Differences from ``galore_torch.GaLoreAdamW`` (all deliberate):

    * Adam follows ``torch.optim.AdamW``'s order: ``eps`` is added after the second-moment bias
      correction (galore-torch adds it before, HF style) and the default ``eps`` is torch's 1e-8
      (galore-torch: 1e-6).
    * Weight decay is decoupled and computed from the *pre-update* weight, as torch AdamW does
      (galore-torch decays the already-updated weight).
    * The projection side is stored, not re-derived from the low-rank tensor's shape; the basis and
      moments are fp32 whatever the parameter dtype (``state_dtype`` chooses the moment storage).
    * State is plain tensors and ints (no projector object), so checkpoints load with
      ``weights_only=True``; 8-bit state never swaps ``p.data``.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate (paper pre-training: 0.01).
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one (``None``: only groups with ``rank``).
        update_proj_gap: SVD refresh period T (200).
        scale: alpha, multiplier of the back-projected update (0.25).
        projector: ``"svd"`` (default) or any registered projector.
        proj_side: ``"std"`` (project the smaller side), ``"reverse_std"``, ``"left"``, ``"right"``.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        **kwargs: further engine options (``transfer``, ``nonfinite``, ``projector_options``, ``seed``).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "drop", "transfer": "keep"}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25, projector: str = "svd", proj_side: str = "std",
                 state_dtype: str = "fp32", **kwargs: Any) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, projector=projector, proj_side=proj_side,
                         state_dtype=state_dtype, **kwargs)


@register_optimizer("galore_adafactor")
class GaLoreAdafactor(LowRankOptimizer):
    """GaLore with Adafactor inside the subspace (factored second moment of the projected gradient).

    Adafactor follows HF Transformers' formulation, as galore-torch's does, but ``lr`` defaults to an
    *absolute* step (``lr=1e-3``, ``relative_step=False``, ``scale_parameter=False``), the setting HF's
    Trainer uses for ``optim="galore_adafactor"``. So one ``lr`` means the same step size for this
    preset as for :class:`GaLoreAdamW` and ``torch.optim.AdamW``. Adafactor's own defaults
    (``transformers.optimization.Adafactor``, galore-torch) are relative: the step is
    ``min(1e-2, 1/sqrt(t))`` times ``max(eps[1], RMS(W))``, which ignores ``lr`` entirely and is ~50x
    smaller than ``lr=1e-2`` on weights of RMS 0.02. They stay available:
    ``GaLoreAdafactor(params, lr=None, relative_step=True, scale_parameter=True)``. Weight decay is
    applied from the pre-update weight with Adafactor's effective learning rate.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: absolute learning rate (1e-3); ``None`` needs ``relative_step=True``.
        eps: Adafactor's ``(eps1, eps2)``: regulariser of the squared gradient and floor of RMS(W).
        clip_threshold: update RMS clipping threshold (1.0).
        decay_rate: exponent of the second-moment decay ``1 - t**decay_rate`` (-0.8).
        beta1: first-moment coefficient (``None``: no first moment, as Adafactor's default).
        weight_decay: decoupled weight decay.
        scale_parameter: multiply the step by ``max(eps[1], RMS(W))`` (False here; True in Adafactor).
        relative_step: use ``min(1e-2, 1/sqrt(t))`` instead of ``lr`` (False here; True in Adafactor).
        warmup_init: relative step warm-up ``1e-6 * t`` (needs ``relative_step=True``).
        rank: default rank for groups that do not set one.
        update_proj_gap: SVD refresh period T (200).
        scale: alpha, multiplier of the back-projected update (0.25).
        projector: ``"svd"`` (default) or any registered projector.
        proj_side: side rule (``"std"``).
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        **kwargs: further engine options.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adafactor", "residual": "drop", "transfer": "keep"}

    def __init__(self, params: ParamsT, lr: float | None = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = False, relative_step: bool = False,
                 warmup_init: bool = False, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 0.25, projector: str = "svd", proj_side: str = "std", state_dtype: str = "fp32",
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                         weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                         warmup_init=warmup_init, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         projector=projector, proj_side=proj_side, state_dtype=state_dtype, **kwargs)
