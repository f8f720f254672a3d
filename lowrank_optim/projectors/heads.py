"""Cross-head shared projection of GaLore+ (Liao et al. 2024, arXiv:2412.19820).

GaLore+ estimates one projection from a single attention head's block of the gradient and shares it
with every head of that matrix. There is no public code; the concrete choices are ours:

* a weight in ``nn.Linear`` layout ``(num_heads * d_head, d_model)`` (query / key / value projections)
  is split into ``num_heads`` row blocks ``G_j`` of shape ``(d_head, d_model)``;
* at each refresh one head ``j`` is drawn uniformly from a CPU generator seeded with
  ``(seed, refresh)`` (deterministic on every device and data-parallel rank) and stored as an int;
* the basis is the top-``r`` right singular subspace of ``G_j`` by randomized subspace iteration
  (warm-started from the previous basis, as :class:`RandomizedSVDProjector`), and the projection is
  always on the right, ``G Q`` (``num_heads * d_head x r``), i.e. every block is projected by the same
  ``Q``; the rank is clamped to ``min(r, d_head)`` because one head's block has rank ``<= d_head``;
* a matrix whose first dimension is not a multiple of ``num_heads`` (or ``num_heads`` in ``(None, 1)``)
  gets an ordinary per-matrix randomized SVD, identical to the ``"rsvd"`` projector.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_int
from .base import RIGHT, ProjState, choose_side, cpu_generator, no_gradient, oriented
from .rsvd import RandomizedSVDProjector, randomized_range


class HeadSharedRSVDProjector(RandomizedSVDProjector):
    """Randomized SVD of one head's gradient block, shared by all heads of the matrix.

    Args:
        rank: target rank.
        side: side rule for matrices that are not split into heads.
        num_heads: heads of the matrices this projector sees (``None``: no head split).
        oversample, power_iters, warm_start, sign: as :class:`RandomizedSVDProjector`.
    """

    name = "rsvd_heads"

    def __init__(self, rank: int, side: str = "std", *, num_heads: int | None = None, oversample: int = 8,
                 power_iters: int = 1, warm_start: bool = True, sign: str = "align") -> None:
        super().__init__(rank, side, oversample=oversample, power_iters=power_iters, warm_start=warm_start,
                         sign=sign)
        self.num_heads = None if num_heads is None else check_int("num_heads", num_heads, low=1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, side={self.side_rule!r}, num_heads={self.num_heads}, "
                f"sign={self.sign_rule!r})")

    def split(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether a matrix of ``shape`` is split into heads."""
        h = self.num_heads
        return h is not None and h > 1 and int(shape[0]) % h == 0

    def _side_rank(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        m, n = int(shape[0]), int(shape[1])
        if self.split(shape):
            return RIGHT, min(self.rank, m // self.num_heads, n)
        return choose_side(shape, self.side_rule), min(self.rank, m, n)

    def init_state(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side, rank = self._side_rank(grad.shape)
        state: ProjState = {"side": side, "rank": rank, "seed": int(seed), "refresh": 0}
        if self.split(grad.shape):
            state["head"] = 0
        state["basis"] = self.fresh_basis(grad, state, None)
        return state

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        if "head" not in state:
            return super()._basis(grad, state, previous)
        h = self.num_heads
        head = int(torch.randint(h, (1,), generator=cpu_generator(state["seed"], state["refresh"], h),
                                 dtype=torch.int64, device="cpu"))
        state["head"] = head
        d_head = grad.shape[0] // h
        block = grad[head * d_head:(head + 1) * d_head]
        if previous is not None and no_gradient(block):  # the drawn head got no gradient: keep the basis
            return previous
        return randomized_range(oriented(block, RIGHT), state["rank"], oversample=self.oversample,
                                power_iters=self.power_iters, seed=(state["seed"], state["refresh"]),
                                warm=previous if self.warm_start else None)

    def orthonormal_basis(self, state: ProjState) -> bool:
        """The range finder's ``Q`` of one head's block (or of the whole matrix when it is not split), kept as is by
        a refresh that finds no gradient: orthonormal, so Fira's and the sparse residual's closed forms apply."""
        return True

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        side, r = self._side_rank(shape)
        return (r, int(shape[1])) if side != RIGHT else (int(shape[0]), r)

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        side, r = self._side_rank(shape)
        return (int(shape[1]) if side == RIGHT else int(shape[0])) * r
