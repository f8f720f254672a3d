"""GaLore+: Boosting Low-Rank Adaptation for LLMs with Cross-Head Projection (Liao et al. 2024,
arXiv:2412.19820).

There is no public code: the cross-head projection (:mod:`lowrank_optim.projectors.heads`) and the
sparse residual (:mod:`lowrank_optim.rules.sparse_residual`) are our reconstruction from the paper's
text, and their docstrings list the choices we made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from .._validation import check_int
from ..engine import LowRankOptimizer, ParamsT
from ..groups import param_groups, select_lowrank_modules
from ..registry import register_optimizer
from .projector_options import preset_projector_options

#: Name fragments of the attention projections whose output rows are head blocks.
QUERY_MODULES = ("q_proj", "query")
KEY_VALUE_MODULES = ("k_proj", "v_proj", "key", "value")


def galore_plus_groups(model: nn.Module, rank: int = 128, target_modules: str | Sequence[str] = ("attn", "mlp"), *,
                       num_heads: int | None = None, num_kv_heads: int | None = None,
                       **options: Any) -> list[dict[str, Any]]:
    """:func:`lowrank_optim.param_groups` with the attention projections split into head-shared groups.

    Query projections (module names containing ``q_proj`` / ``query``) get
    ``projector_options={"num_heads": num_heads}`` and key / value projections (``k_proj``, ``v_proj``,
    ``key``, ``value``) ``{"num_heads": num_kv_heads}``; every other selected matrix keeps an ordinary
    per-matrix basis. Head counts default to ``model.config.num_attention_heads`` and
    ``num_key_value_heads`` (falling back to the query count); without head information the groups are
    those of :func:`param_groups`.

    Args:
        model: the model.
        rank: rank of every low-rank group.
        target_modules: see :func:`lowrank_optim.select_lowrank_modules`.
        num_heads: query heads (``None``: read from ``model.config``).
        num_kv_heads: key / value heads (``None``: from ``model.config``, else ``num_heads``).
        **options: extra keys of every low-rank group (``update_proj_gap``, ``scale``, ...).
    """
    config = getattr(model, "config", None)
    if num_heads is None:
        num_heads = getattr(config, "num_attention_heads", None)
    if num_kv_heads is None:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads is not None:
        num_heads = check_int("num_heads", num_heads, low=1)
    if num_kv_heads is not None:
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
    groups = param_groups(model, rank=rank, target_modules=target_modules, **options)
    if num_heads is None or not groups or "rank" not in groups[-1]:
        return groups
    names = dict(model.named_modules())
    heads_of: dict[int, int] = {}
    for name in select_lowrank_modules(model, target_modules):
        leaf = name.split(".")[-1]
        h = num_heads if any(f in leaf for f in QUERY_MODULES) else (
            num_kv_heads if any(f in leaf for f in KEY_VALUE_MODULES) else None)
        if h is not None and h > 1:
            heads_of[id(names[name].weight)] = h
    lowrank = groups.pop()
    base = {k: v for k, v in lowrank.items() if k != "params"}
    opts = base.pop("projector_options", None) or {}
    rest = [p for p in lowrank["params"] if id(p) not in heads_of]
    if rest:
        groups.append({"params": rest, **base, **({"projector_options": opts} if opts else {})})
    for h in sorted(set(heads_of.values())):
        ps = [p for p in lowrank["params"] if heads_of.get(id(p)) == h]
        groups.append({"params": ps, **base, "projector_options": {**opts, "num_heads": h}})
    return groups


@register_optimizer("galore_plus")
class GaLorePlus(LowRankOptimizer):
    """GaLore with a randomized SVD shared across attention heads and a sparse residual.

    The projector is ``"rsvd_heads"``: a matrix in a group whose ``projector_options`` carry
    ``num_heads`` (built by :func:`galore_plus_groups`, or by hand) gets one basis estimated from a single
    head's block and shared by all heads; other matrices get an ordinary randomized SVD (``"rsvd"``).
    The ``"sparse"`` residual keeps Adam moments for the ``residual_density`` fraction of entries where
    the dropped part of the gradient was largest during the first ``residual_warmup`` steps. Adam and
    weight decay as in :class:`GaLoreAdamW`; moments are kept on a refresh.

    Args:
        params: parameters or groups (see :func:`galore_plus_groups`).
        lr: learning rate.
        betas: Adam coefficients.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        rank: default rank for groups that do not set one.
        update_proj_gap: refresh period (200).
        scale: multiplier of the back-projected update and of the residual step (0.25).
        num_heads: heads for *every* low-rank group without its own ``projector_options`` (only when all
            of them are attention projections; ``None``: per-group options decide).
        residual_density: fraction of entries with a sparse residual (0.01; 0 turns it off exactly).
        residual_warmup: steps during which the residual's entries are chosen (10).
        oversample: extra sketch columns of the randomized SVD (8).
        power_iters: subspace iterations of the randomized SVD (1).
        proj_side: side rule for matrices without head split.
        state_dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"`` (the residual's moments included).
        **kwargs: further engine options (``transfer``, ``nonfinite``, ``seed``, ``residual_betas``, ...).
    """

    preset_defaults: ClassVar[dict[str, Any]] = {"inner": "adam", "residual": "sparse", "transfer": "keep",
                                                 "projector": "rsvd_heads", "residual_density": 0.01,
                                                 "residual_warmup": 10}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25, num_heads: int | None = None,
                 residual_density: float = 0.01, residual_warmup: int = 10, oversample: int = 8,
                 power_iters: int = 1, proj_side: str = "std", state_dtype: str = "fp32",
                 projector_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # the randomized SVD's options reach "rsvd_heads" and "rsvd", num_heads only "rsvd_heads"; with another
        # projector they are refused when set (preset_projector_options)
        projector = kwargs.get("projector", "rsvd_heads")
        sketch = {"oversample": ("oversample", oversample, 8), "power_iters": ("power_iters", power_iters, 1)}
        heads = {"num_heads": ("num_heads", num_heads, None)}
        if projector == "rsvd":
            preset_projector_options(projector, "rsvd_heads", heads, None)
            options = preset_projector_options(projector, "rsvd", sketch, projector_options)
        else:
            options = preset_projector_options(projector, "rsvd_heads", {**sketch, **heads}, projector_options)
            if options.get("num_heads", 0) is None:
                del options["num_heads"]  # the group's projector_options decide (galore_plus_groups)
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, residual_density=residual_density,
                         residual_warmup=residual_warmup, proj_side=proj_side, state_dtype=state_dtype,
                         projector_options=options, **kwargs)
