"""DCT-AdamW: Adam in a subspace of DCT columns chosen by alignment with the gradient (Modoranu et al.,
"FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs", arXiv:2505.17967)."""

from __future__ import annotations

from typing import Any, ClassVar

from .._validation import check_choice
from ..engine import LowRankOptimizer, ParamsT
from ..projectors.dct import DCT_PATHS, DCT_SCORES
from ..registry import register_optimizer
from .projector_options import preset_projector_options


@register_optimizer("dct_adamw")
class DCTAdamW(LowRankOptimizer):
    """Adam on ``r`` DCT-II columns reselected every ``update_proj_gap`` steps; the state stores their indices.

    The ``"dct"`` projector scores every column of the orthonormal DCT-II basis of the projected dimension
    and keeps the top ``r`` (sorted); the ``"match"`` transfer moves each surviving column's moments to its
    new position and starts new columns at zero (the reference's ``rotate_subspace``; on by default here
    because reselecting every step without it mixes the moments of unrelated columns).

    Differences from the reference ``DCTAdamW`` (IST-DASLab), all deliberate: Adam in torch AdamW's
    operation order (eps after the bias correction; the reference folds ``sqrt(1 - beta2^t)`` into eps) with
    per-parameter bias correction; one DCT basis per distinct projected size (the reference shares one
    ``d_model`` matrix and special-cases Llama-3/Qwen shapes); the side follows ``proj_side`` (the reference
    projects the smaller side too); no error feedback; which parameters are projected follows the param
    groups (the reference projects every 2-D parameter below 32000 per side).

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected (see :func:`param_groups`).
        lr: learning rate.
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one.
        update_proj_gap: reselect the columns every this many steps (paper and reference: 1).
        scale: multiplier of the back-projected update (reference: none, so 1).
        dct_path: ``"auto"`` (FFT for large projected sizes, dense product below), ``"dense"`` or ``"fft"``.
        dct_score: column score, ``"l1"`` (the reference's ``ell_norm=1``) or ``"l2"`` (energy-optimal).
        transfer: ``"match"`` (default), or ``"keep"`` / ``"reset"``.
        proj_side: side rule (``"std"`` projects the smaller dimension).
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        projector_options: extra DCT projector options (override ``dct_path`` / ``dct_score``).
        **kwargs: further engine options (``nonfinite``, ``seed``, ...).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "drop", "transfer": "match",
                                                 "projector": "dct", "update_proj_gap": 1, "scale": 1.0}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_proj_gap: int = 1,
                 scale: float = 1.0, dct_path: str = "auto", dct_score: str = "l1", transfer: str = "match",
                 proj_side: str = "std", state_dtype: str = "fp32", projector_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = preset_projector_options(
            kwargs.get("projector", "dct"), "dct",
            {"path": ("dct_path", check_choice("dct_path", dct_path, DCT_PATHS), "auto"),
             "score": ("dct_score", check_choice("dct_score", dct_score, DCT_SCORES), "l1")}, projector_options)
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, transfer=transfer, proj_side=proj_side,
                         state_dtype=state_dtype, projector_options=options, **kwargs)
