"""FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training (Zmushko et al.,
ICML 2025, arXiv:2411.07837)."""

from __future__ import annotations

from typing import Any, ClassVar

from .._validation import check_choice, check_int, check_number
from ..engine import LowRankOptimizer, ParamsT
from ..projectors.blocks import BLOCK_ORDERS
from ..registry import register_optimizer

#: ``inactive_update_rule`` -> residual rule of the state-free part.
STATE_FREE_RULES = {"sign_sgd": "sign", "sgd": "sgd", "no": "drop"}
COORDINATES = ("columns", "rows", "entries")


@register_optimizer("frugal")
class FRUGAL(LowRankOptimizer):
    """Adam on a state-full subspace, a state-free rule (signSGD by default) on the rest of the gradient.

    For every projected weight, each step: the state-full part ``lift(Adam(project(G)))`` at
    ``lr * proj_params_lr_scale`` and the state-free part ``sign(G - lift(project(G)))`` (or the plain
    complement, or nothing) at ``lr * proj_params_lr_scale * inactive_lr_scale``. Weights of groups without
    ``rank`` (embeddings, norms, output head) take plain AdamW. The subspace is redrawn every
    ``update_gap`` steps and, with ``reset_statistics``, moments and the bias-correction step restart.

    Subspaces (``projector``): ``"blocks"`` (default: whole tensors, ``round(density * count)`` of the
    group's matrices state-full, walked in ``block_order``), ``"columns"`` / ``"rows"`` / ``"entries"``
    (``int(density * count)`` random coordinates per matrix), or any registered basis projector
    (``"svd"``, ``"random"``, ...), whose size is the group's ``rank`` (``density`` applies to coordinates
    and blocks only). ``"random"`` defaults to the orthonormal random basis (the QR of a seeded Gaussian, as
    FRUGAL's reference), because the state-free part is the complement ``G - P P^T G``; Flora's Gaussian basis
    (``projector_options={"distribution": "gaussian"}``), online PCA without ``orthonormalize`` and COAP are
    not orthonormal and are refused (a ``ValueError`` naming ``projector`` and the residual). Defaults are the
    paper's pre-training configuration: blocks, descending, density 0.25,
    gap 200, signSGD, reset on. ``density=1`` is AdamW; ``density=0`` is signSGD on the projected weights.

    Differences from the reference code: an unknown ``inactive_update_rule`` raises (its driver's default
    ``"same"`` silently did nothing); ``reset_statistics=False`` with blocks raises (the reference always
    rebuilds a block's state); a tensor whose subspace a switch leaves unchanged (every coordinate at
    ``density=1``, a block that stays active) keeps its moments (transfer ``"reset_on_change"``; the
    reference rebuilds them), so ``density=1`` is AdamW across switches too; Adam follows torch's AdamW order
    (the reference does too).

    Args:
        params: parameters or groups; a group carrying ``rank`` is projectable.
        lr: learning rate.
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (applied to state-full and state-free parts alike).
        density: rho, fraction of tensors (blocks) or coordinates that keep Adam state.
        projector: ``"blocks"``, ``"columns"``, ``"rows"``, ``"entries"`` or a registered projector name.
        block_order: ``"descending"``, ``"ascending"``, ``"random"`` or ``"mirror"`` (blocks only).
        update_gap: steps between subspace switches (the engine's ``update_proj_gap``).
        inactive_update_rule: ``"sign_sgd"``, ``"sgd"`` or ``"no"``.
        proj_params_lr_scale: lr multiplier of the projected weights (the engine's ``scale``).
        inactive_lr_scale: extra lr multiplier of the state-free part.
        reset_statistics: restart moments and bias correction on a switch (transfer ``"reset_on_change"``).
        rank: subspace size for basis projectors (``None``: only groups that carry ``rank`` are projected).
        projector_options: options of a basis projector (blocks and coordinates get theirs from above).
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        **kwargs: further engine options (``update_proj_gap`` / ``scale`` / ``transfer`` override the above).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "sign", "transfer": "reset_on_change",
                                                 "projector": "blocks", "scale": 1.0}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, density: float = 0.25, projector: str = "blocks",
                 block_order: str = "descending", update_gap: int = 200, inactive_update_rule: str = "sign_sgd",
                 proj_params_lr_scale: float = 1.0, inactive_lr_scale: float = 1.0, reset_statistics: bool = True,
                 rank: int | None = None, projector_options: dict[str, Any] | None = None, state_dtype: str = "fp32",
                 **kwargs: Any) -> None:
        rule = STATE_FREE_RULES[check_choice("inactive_update_rule", inactive_update_rule, sorted(STATE_FREE_RULES))]
        if not isinstance(reset_statistics, bool):
            raise TypeError(f"Invalid reset_statistics: expected a bool, got {reset_statistics!r}")
        check_choice("block_order", block_order, BLOCK_ORDERS)
        if projector == "blocks":
            if not reset_statistics:
                raise ValueError("Invalid reset_statistics: False with projector='blocks' (a block's state is "
                                 "rebuilt on every switch; use a coordinate or basis projector to keep moments)")
            projector_options = {"density": density, "order": block_order, **(projector_options or {})}
        elif projector in COORDINATES:
            projector_options = {"density": density, **(projector_options or {})}
        elif projector == "random":  # the state-free part is the complement: the basis must be orthonormal
            projector_options = {"distribution": "orthonormal", **(projector_options or {})}
        if rule == "drop":  # no state-free part: the scale is unused, but still checked
            check_number("inactive_lr_scale", inactive_lr_scale, low=0.0)
        else:
            kwargs["inactive_lr_scale"] = inactive_lr_scale
        kwargs.setdefault("update_proj_gap", check_int("update_gap", update_gap, low=1))
        kwargs.setdefault("scale", check_number("proj_params_lr_scale", proj_params_lr_scale, low=0.0, low_open=True))
        kwargs.setdefault("transfer", "reset_on_change" if reset_statistics else "keep")
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, projector=projector,
                         residual=rule, rank=rank, projector_options=projector_options, state_dtype=state_dtype,
                         **kwargs)
