"""Coordinate subspaces: a random subset of columns, rows or entries (FRUGAL, Zmushko et al. 2025,
arXiv:2411.07837). The state holds indices only, no basis."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_number
from .base import LEFT, RIGHT, Projector, ProjState, cpu_generator


class CoordinateProjector(Projector):
    """Keeps ``k`` random columns (rows, entries) of the gradient; redrawn on every refresh.

    ``project`` gathers them (``(m, k)`` for columns, ``(k, n)`` for rows, ``(k,)`` for entries),
    ``project_back`` scatters into zeros, :meth:`complement` zeroes them in a copy of ``G``.
    Indices are drawn on the CPU from ``(seed, refresh)`` (:func:`cpu_generator`) and sorted, so every
    device and data-parallel rank picks the same coordinates.

    Args:
        rank: number of columns / rows / entries kept when ``density`` is ``None``.
        side: accepted for the common signature; the kept axis comes from the choice, not the side rule.
        density: fraction ``rho`` of columns / rows / entries kept, ``k = int(rho * count)`` (FRUGAL's rule);
            overrides ``rank``.
    """

    name = "coords"
    #: no stored basis: no quantized basis
    basis_dtypes = ("fp32",)
    lazy_refusal = ("its coordinates are a fresh random draw every period, independent of the gradient, so "
                    "the overlap of two draws says nothing about whether the subspace keeps still")
    choice: ClassVar[str] = "columns"
    orthonormal = True  # coordinate vectors: the complement zeroes the kept coordinates exactly
    exact_complement = True
    indexed = True

    def __init__(self, rank: int, side: str = "std", *, density: float | None = None) -> None:
        super().__init__(rank, side)
        if density is not None:
            density = check_number("density", density, low=0.0, high=1.0)
        self.density = density

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, density={self.density})"

    def _count(self, shape: tuple[int, ...] | torch.Size) -> int:
        m, n = int(shape[0]), int(shape[1])
        return {"columns": n, "rows": m, "entries": m * n}[self.choice]

    def _k(self, shape: tuple[int, ...] | torch.Size) -> int:
        count = self._count(shape)
        if self.density is not None:
            return int(self.density * count)
        return min(self.rank, count)

    def _draw(self, state: ProjState, device: torch.device) -> torch.Tensor:
        count = self._count((state["rows"], state["cols"]))
        perm = torch.randperm(count, generator=cpu_generator(state["seed"], state["refresh"]),
                              dtype=torch.int64, device="cpu")
        return perm[: state["rank"]].sort().values.to(device)

    # -- contract -------------------------------------------------------------------------------
    def init(self, grad: torch.Tensor, *, seed: int = 0) -> ProjState:
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        m, n = int(grad.shape[0]), int(grad.shape[1])
        side = LEFT if self.choice == "rows" else RIGHT
        state: ProjState = {"side": side, "rank": self._k(grad.shape), "seed": int(seed), "refresh": 0,
                            "rows": m, "cols": n}
        state["indices"] = self._draw(state, grad.device)
        return state

    def update(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        new["indices"] = self._draw(new, grad.device)
        return new

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        idx = state["indices"]
        if self.choice == "columns":
            return grad.index_select(1, idx)
        if self.choice == "rows":
            return grad.index_select(0, idx)
        return grad.reshape(-1).index_select(0, idx)

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        idx = state["indices"]
        out = low.new_zeros((state["rows"], state["cols"]))
        if self.choice == "columns":
            return out.index_copy_(1, idx, low)
        if self.choice == "rows":
            return out.index_copy_(0, idx, low)
        out.view(-1).index_copy_(0, idx, low)
        return out

    @property
    def matrix_map(self) -> bool:  # type: ignore[override]
        """Columns and rows are products with a 0/1 selection matrix; entries (a 1-D gather) are not."""
        return self.choice != "entries"

    def basis_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The 0/1 ``(d, k)`` selection matrix ``I[:, indices]`` (``d`` = columns or rows), built on demand;
        ``None`` for entries."""
        if self.choice == "entries":
            return None
        d = int(state["cols"] if self.choice == "columns" else state["rows"])
        idx = state["indices"].to(device)
        out = torch.zeros(d, idx.numel(), dtype=torch.float32, device=device)
        out[idx, torch.arange(idx.numel(), dtype=torch.int64, device=device)] = 1.0
        return out

    def complement(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor | None:
        """``G`` with the kept coordinates zeroed (``None`` when every coordinate is kept)."""
        idx = state["indices"]
        if idx.numel() == self._count((state["rows"], state["cols"])):
            return None
        out = grad.clone(memory_format=torch.contiguous_format)  # view(-1) below needs a row-major copy
        if self.choice == "columns":
            return out.index_fill_(1, idx, 0.0)
        if self.choice == "rows":
            return out.index_fill_(0, idx, 0.0)
        out.view(-1).index_fill_(0, idx, 0.0)
        return out

    def same_subspace(self, old: ProjState, new: ProjState) -> bool:
        """Whether a refresh kept exactly the same coordinates (e.g. density 1)."""
        return torch.equal(old["indices"], new["indices"].to(old["indices"].device))

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        m, n = int(shape[0]), int(shape[1])
        k = self._k(shape)
        return {"columns": (m, k), "rows": (k, n), "entries": (k,)}[self.choice]

    def index_bound(self, shape: tuple[int, ...] | torch.Size, state: ProjState) -> int:
        """The kept indices count columns ``n``, rows ``m`` or entries ``m * n``."""
        return self._count(shape)

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """No float data: the state holds ``k`` int64 indices."""
        return 0


class ColumnsProjector(CoordinateProjector):
    """Random columns (FRUGAL's ``coord_choice='columns'``, its GLUE default)."""

    name = "columns"
    choice = "columns"


class RowsProjector(CoordinateProjector):
    """Random rows."""

    name = "rows"
    choice = "rows"


class EntriesProjector(CoordinateProjector):
    """Random entries (FRUGAL's ``randk``); the low-rank tensor is 1-D."""

    name = "entries"
    choice = "entries"


__all__ = ["ColumnsProjector", "CoordinateProjector", "EntriesProjector", "RowsProjector"]
