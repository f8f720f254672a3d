"""GUM's stochastic subspace: per period, each matrix either works in its top-r SVD subspace or on the
complement at full size (Pan et al. 2025, "Unbiased Gradient Low-Rank Projection", arXiv:2510.17802)."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_int, check_number
from .base import Projector, ProjState, cpu_generator
from .svd import SVDProjector

WEIGHTINGS = ("paper", "after", "none")
_DRAW_STREAM = 0x47554D  # separates the layer draw's generator from other users of the same seed


def full_rank_draw(count: int, period: int, seed: int, prob: float | None, layers: int | None) -> list[int]:
    """Positions (among ``count`` matrices) that update the complement full-rank in ``period``.

    ``layers`` (gamma): exactly ``min(gamma, count)`` positions without replacement (``randperm``);
    otherwise each position independently with probability ``prob`` (q). Drawn on the CPU from
    ``(seed, period)``, so every data-parallel rank draws the same.
    """
    gen = cpu_generator(seed, period, _DRAW_STREAM)
    if layers is not None:
        perm = torch.randperm(count, generator=gen, dtype=torch.int64, device="cpu")
        return sorted(int(i) for i in perm[: min(layers, count)])
    u = torch.rand(count, generator=gen, dtype=torch.float64, device="cpu")
    return [i for i in range(count) if float(u[i]) < prob]


class GUMProjector(Projector):
    """Top-``r`` SVD basis ``P`` of the period's first gradient plus a branch draw (state ``"full"``).

    * low-rank branch: ``project(G) = w_low P^T G``, ``project_back(X) = P X`` (GaLore-style);
    * full-rank branch: ``project(G) = w_full (G - P P^T G)`` at full size, ``project_back(X) = X``.

    With q the marginal probability of the full branch, ``w_full = 1/q`` and ``w_low = 1/(1-q)``, so the
    lifted estimate ``project_back(project(G))`` is unbiased for ``G`` before the inner rule. ``weighting``:
    ``"paper"`` applies the weights in :meth:`project` (before Newton-Schulz, where they cancel: NS
    normalises its input, and a branch is fixed for a period, so the applied step is the same as with
    ``"none"``); ``"after"`` applies them in :meth:`project_back` (after the orthogonalisation: the step
    magnitudes change, which is a variant, not the paper's method); ``"none"`` drops them.

    Args:
        rank: rank r of the SVD subspace.
        side: side rule.
        full_rank_prob: q, each matrix's probability of the full branch (independent draws).
        full_rank_layers: gamma, the exact number of matrices in the full branch per period (without
            replacement, q = gamma / count). Exactly one of the two must be given.
        weighting: ``"paper"``, ``"after"`` or ``"none"``.
        sign: sign rule of the SVD basis (as :class:`~lowrank_optim.projectors.svd.SVDProjector`; ``"align"``
            default). GUM resets its momentum every period, so the sign does not change the trajectory.
        solver: how the SVD basis is computed, as :class:`~lowrank_optim.projectors.svd.SVDProjector`'s ``solver``
            (``"auto"``: the fp64 Gram eigenvectors on the smaller side; ``"svd"``: ``torch.linalg.svd``, say on a
            GPU with slow fp64; ``"gram"``).
    """

    #: The full-rank branch steps the complement itself (weighted 1/q): residual rules that also take the
    #: complement are refused at construction (:meth:`ResidualRule.check_projector`).
    covers_complement = True

    name = "gum"
    #: the full branch steps the complement: an int4 basis leaves 0.14 of the gradient there as quantization
    #: error (:data:`~lowrank_optim.projectors.quantized_basis.RESIDUAL_FLOORS`)
    basis_dtypes = ("fp32", "bf16", "int8")
    lazy_refusal = ("every period redraws which matrices take the full-rank branch (exactly gamma of them, or each "
                    "with probability q); a matrix that skipped the draw would break it and the 1/q, 1/(1-q) "
                    "weights that make GUM's estimate unbiased")
    stagger_refusal = ("the full-rank branch is drawn for the whole group each period (exactly gamma matrices, or "
                       "each with probability q); with staggered phases each matrix would switch at its own step and "
                       "two periods' draws would overlap (measured: up to 3 full-rank matrices with gamma = 1)")
    wants_layout = True
    orthonormal = True
    dominant = True
    #: ``project`` is weighted and the full branch works at full size: no matrix map, no fixed low shape.
    matrix_map = False
    fixed_low_shape = False

    def __init__(self, rank: int, side: str = "std", *, full_rank_prob: float | None = None,
                 full_rank_layers: int | None = 2, weighting: str = "paper", sign: str = "align",
                 solver: str = "auto") -> None:
        super().__init__(rank, side)
        if (full_rank_prob is None) == (full_rank_layers is None):
            raise ValueError(f"Invalid full_rank_prob / full_rank_layers: give exactly one "
                             f"(got {full_rank_prob!r} and {full_rank_layers!r})")
        if full_rank_prob is not None:
            full_rank_prob = check_number("full_rank_prob", full_rank_prob, low=0.0, high=1.0)
        if full_rank_layers is not None:
            full_rank_layers = check_int("full_rank_layers", full_rank_layers, low=0)
        self.prob = full_rank_prob
        self.layers = full_rank_layers
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self._svd = SVDProjector(rank, side, sign=sign, solver=solver)
        self.sign_rule = self._svd.sign_rule

    def __repr__(self) -> str:
        return (f"GUMProjector(rank={self.rank}, full_rank_prob={self.prob}, full_rank_layers={self.layers}, "
                f"weighting={self.weighting!r})")

    def q(self, count: int) -> float:
        """Marginal probability of the full-rank branch for a group of ``count`` matrices."""
        if self.layers is not None:
            return min(self.layers, count) / max(count, 1)
        return float(self.prob)

    def weight(self, state: ProjState) -> float:
        """``1/q`` (full branch) or ``1/(1-q)`` (low-rank branch); only the drawn branch's is computed."""
        q = self.q(state["count"])
        return 1.0 / q if state["full"] else 1.0 / (1.0 - q)

    def _draw(self, state: ProjState, layout: tuple[int, int, int]) -> ProjState:
        position, count, group_seed = layout
        chosen = full_rank_draw(count, int(state["refresh"]), group_seed, self.prob, self.layers)
        state["full"] = int(position in chosen)
        state["count"] = int(count)
        return state

    # -- contract -------------------------------------------------------------------------------
    def init_state(self, grad: torch.Tensor, *, seed: int = 0, layout: tuple[int, int, int] = (0, 1, 0),
                   **context: Any) -> ProjState:
        return self._draw(self._svd.init(grad, seed=seed), layout)

    def refresh(self, grad: torch.Tensor, state: ProjState, *, layout: tuple[int, int, int] = (0, 1, 0),
               **context: Any) -> ProjState:
        return self._draw(self._svd.update(grad, state), layout)

    def whole(self, state: ProjState) -> bool:
        """Whether the full branch carries the whole gradient: when every matrix of the group is drawn (q = 1,
        e.g. ``full_rank_layers`` >= the group's matrices) there is no low-rank branch to step the top-r
        subspace, and the complement alone would leave it untrained for ever (``E[estimate] = (I - P P^T) G``,
        biased). The unbiased estimate with q = 1 is ``G`` itself, which is what the branch then steps."""
        return bool(state["full"]) and self.q(state["count"]) >= 1.0

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        if self.whole(state):
            return grad.clone(memory_format=torch.contiguous_format)  # weight 1/q = 1
        low = self._svd.project(grad, state)
        out = self._svd.residual(grad, low, state) if state["full"] else low
        if self.weighting == "paper":
            out.mul_(self.weight(state))
        return out

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        if self.whole(state):
            out = low
        elif state["full"]:
            # The full branch steps the complement only. Newton-Schulz keeps its input's row and column
            # spaces, so NS(R) already lies there (this removes rounding only); an elementwise inner rule
            # (Adam, Adafactor, sign) does not, and its output would leak into span(P), where this branch
            # has no gradient: the step is projected onto the complement, (I - P P^T) X.
            out = self._svd.residual(low, self._svd.project(low, state), state)
        else:
            out = self._svd.project_back(low, state)
        if self.weighting == "after":
            out = out * self.weight(state)
        return out

    def batch_basis(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The low-rank branch's basis ``P`` (the batched step's products, with :meth:`batch_weights`); ``None`` for
        the full branch, which works at full size."""
        if state["full"]:
            return None
        basis = state.get("basis")
        return basis if isinstance(basis, torch.Tensor) and basis.dim() == 2 else None

    def batch_weights(self, state: ProjState) -> tuple[float, float]:
        """The low-rank branch's ``1/(1-q)`` on ``project`` (``weighting="paper"``) or ``project_back``
        (``"after"``); ``(1, 1)`` with ``"none"``."""
        w = self.weight(state)
        return {"paper": (w, 1.0), "after": (1.0, w)}.get(self.weighting, (1.0, 1.0))

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        if state is not None and state["full"]:
            return (int(shape[0]), int(shape[1]))
        return self._svd.low_shape(shape)

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        return self._svd.state_numel(shape)


__all__ = ["WEIGHTINGS", "GUMProjector", "full_rank_draw"]
