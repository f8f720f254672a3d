"""GUM: Unbiased Gradient Low-Rank Projection (Pan et al. 2025, arXiv:2510.17802)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..engine import LowRankOptimizer, ParamsT
from ..registry import register_optimizer
from .projector_options import preset_projector_options


@register_optimizer("gum")
class GUM(LowRankOptimizer):
    """GaLore-Muon with, per period, a random set of matrices updating the SVD complement at full size.

    Every ``update_proj_gap`` (K) steps each projected matrix takes the top-``rank`` SVD basis ``P`` of its
    gradient and a branch, drawn for the whole group from a generator seeded by ``(seed, period)`` (every
    data-parallel rank draws the same): with ``full_rank_layers`` (gamma) exactly gamma matrices, or with
    ``full_rank_prob`` (q) each independently. Low-rank branch: ``R <- mu R + P^T G / (1 - q)``,
    ``W <- W - lr P NS(R)``; full branch: ``R <- mu R + (G - P P^T G) / q``, ``W <- W - lr NS(R)``. The
    momentum restarts at each period (the branch changes its shape). Embeddings, heads, norms and biases
    (groups without ``rank``, 1-D tensors) take AdamW (``plain_inner="adam"``) at the same ``lr``.

    The debiasing weights make the pre-orthogonalisation estimate unbiased, but Newton-Schulz normalises its
    input, so with the paper's placement (``weighting="paper"``) they cancel from the applied step (tested).
    ``weighting="after"`` multiplies the orthogonalised step instead (a variant that changes magnitudes);
    ``"none"`` drops the weights. No official code was available: the momentum reset per period, a draw
    per matrix (not per transformer block) and the plain-sum momentum without Nesterov (the paper's update)
    are our reading. ``muon_lr_adjust="match_rms_adamw"`` (default) scales Muon's step to AdamW's RMS
    (``0.2 sqrt(max(m, n))``, Liu et al. 2025) so one ``lr`` serves both paths.

    Args:
        params: parameters or groups; a group carrying ``rank`` is projected.
        lr: learning rate (both paths).
        momentum: Muon momentum mu (0.95).
        betas: AdamW coefficients of the plain path.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay.
        rank: SVD rank for groups that do not set one.
        update_proj_gap: period K (200).
        full_rank_layers: gamma, matrices in the full branch per period (2 when neither this nor
            ``full_rank_prob`` is given: the paper's fine-tuning setting).
        full_rank_prob: q, independent probability instead of gamma (the paper's pre-training uses 0.5).
        weighting: ``"paper"``, ``"after"`` or ``"none"`` (above).
        nesterov: Nesterov momentum inside Muon (False: the paper's form).
        ns_steps: Newton-Schulz iterations (5).
        ns_dtype: precision of Newton-Schulz's products: ``"fp32"`` (default) or ``"bf16"`` (torch's Muon and
            Keller Jordan's reference; about 1e-2 relative per step, 2-3x faster NS where bf16 matrix units exist).
        muon_lr_adjust: ``"match_rms_adamw"``, ``"original"`` (``sqrt(max(1, m/n))``) or ``"none"``.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        **kwargs: further engine options.
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "muon", "plain_inner": "adam", "residual": "drop",
                                                 "transfer": "reset", "projector": "gum", "scale": 1.0}

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 rank: int | None = None, update_proj_gap: int = 200, full_rank_layers: int | None = None,
                 full_rank_prob: float | None = None, weighting: str = "paper", nesterov: bool = False,
                 ns_steps: int = 5, ns_dtype: str = "fp32", muon_lr_adjust: str = "match_rms_adamw",
                 state_dtype: str = "fp32",
                 **kwargs: Any) -> None:
        if full_rank_prob is None and full_rank_layers is None and kwargs.get("projector", "gum") == "gum":
            full_rank_layers = 2  # the paper's fine-tuning setting
        # GUM's branch options apply to the "gum" projector only; with another they are refused when set
        own = {"full_rank_prob": ("full_rank_prob", full_rank_prob, None),
               "full_rank_layers": ("full_rank_layers", full_rank_layers, None),
               "weighting": ("weighting", weighting, "paper")}
        kwargs["projector_options"] = preset_projector_options(kwargs.get("projector", "gum"), "gum", own,
                                                               kwargs.get("projector_options")) or None
        super().__init__(params, lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                         muon_lr_adjust=muon_lr_adjust, state_dtype=state_dtype, **kwargs)
