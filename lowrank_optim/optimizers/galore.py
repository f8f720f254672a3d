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

    Adafactor follows HF Transformers' formulation, as galore-torch's does: ``lr=None`` with
    ``relative_step=True`` (default) uses the relative step size; pass ``lr`` and
    ``relative_step=False`` for a fixed learning rate. Weight decay is applied from the pre-update
    weight with Adafactor's effective learning rate.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adafactor", "residual": "drop", "transfer": "keep"}

    def __init__(self, params: ParamsT, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 0.25, projector: str = "svd", proj_side: str = "std", state_dtype: str = "fp32",
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                         weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                         warmup_init=warmup_init, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         projector=projector, proj_side=proj_side, state_dtype=state_dtype, **kwargs)
