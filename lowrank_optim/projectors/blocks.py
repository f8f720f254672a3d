"""Whole-tensor blocks: a fraction of a group's matrices is state-full, the rest state-free (FRUGAL's
block variant, Zmushko et al. 2025, arXiv:2411.07837; BAdam-style block order)."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_number
from .base import Projector, ProjState, choose_side, cpu_generator

BLOCK_ORDERS = ("descending", "ascending", "random", "mirror")


def active_blocks(count: int, period: int, density: float, order: str, seed: int) -> list[int]:
    """Positions of the active tensors among ``count`` for refresh ``period``.

    ``round(count * density)`` tensors are active. ``ascending`` walks forward from tensor 0,
    ``descending`` backward from the last one (both wrap around, one window per period), ``random`` is a
    fresh ``randperm`` from ``(seed, period)`` on the CPU, ``mirror`` activates pairs ``(i, count-1-i)``
    walking forward (an odd active count is rounded down to even). Depends on integers only, so every
    data-parallel rank agrees.
    """
    k = min(count, round(count * density))
    if k == 0:
        return []
    if order == "ascending":
        return sorted({(period * k + j) % count for j in range(k)})
    if order == "descending":
        return sorted({count - 1 - (period * k + j) % count for j in range(k)})
    if order == "random":
        perm = torch.randperm(count, generator=cpu_generator(seed, period), dtype=torch.int64, device="cpu")
        return sorted(int(i) for i in perm[:k])
    half, pairs = k // 2, count // 2
    if half == 0 or pairs == 0:
        return []
    base = {(period * half + j) % pairs for j in range(half)}
    return sorted(base | {count - 1 - b for b in base})


class BlockProjector(Projector):
    """An active tensor's subspace is the whole tensor (``project`` is the identity); an inactive one's is
    empty (``project`` gives a ``(0,)`` tensor, its moments are empty, :meth:`complement` is ``G``).

    Which tensors are active is a draw across the group's projected parameters, so the engine passes
    ``layout=(position, count, group_seed)`` (:attr:`wants_layout`). The low-rank shape depends on the state:
    the moments change shape on a switch, so use it with ``transfer="reset"`` or ``"reset_on_change"``.

    Args:
        rank: unused (the subspace is all or nothing); kept for the common signature.
        side: side rule (only recorded).
        density: fraction ``rho`` of the group's tensors that are active.
        order: ``"descending"`` (FRUGAL's pre-training scripts), ``"ascending"``, ``"random"`` or ``"mirror"``.
    """

    name = "blocks"
    #: no stored basis: no quantized basis
    basis_dtypes = ("fp32",)
    lazy_refusal = ("which tensors are active follows a schedule across the group's tensors every period; a "
                    "tensor that skipped a switch would break the active fraction (density)")
    stagger_refusal = ("which tensors are active is chosen for the whole group at each switch; with staggered "
                       "phases each tensor would switch at its own step, so tensors of two periods' choices would be "
                       "active together (measured: 3 of 4 at density 0.25, twice the state)")
    wants_layout = True
    orthonormal = True  # the subspace is all of the tensor or nothing: its complement is exact
    exact_complement = True
    matrix_map = False
    fixed_low_shape = False  # the moments change shape when a tensor switches between active and inactive
    varying_ints = frozenset({"rank"})  # min(m, n) while active, 0 while not

    def __init__(self, rank: int, side: str = "std", *, density: float = 0.25, order: str = "descending") -> None:
        super().__init__(rank, side)
        self.density = check_number("density", density, low=0.0, high=1.0)
        self.order = check_choice("order", order, BLOCK_ORDERS)

    def __repr__(self) -> str:
        return f"BlockProjector(density={self.density}, order={self.order!r})"

    def _state(self, grad: torch.Tensor, seed: int, refresh: int, layout: tuple[int, int, int]) -> ProjState:
        position, count, group_seed = layout
        active = int(position in active_blocks(count, refresh, self.density, self.order, group_seed))
        m, n = int(grad.shape[0]), int(grad.shape[1])
        return {"side": choose_side(grad.shape, self.side_rule), "rank": min(m, n) if active else 0,
                "seed": int(seed), "refresh": refresh, "rows": m, "cols": n, "active": active}

    def init(self, grad: torch.Tensor, *, seed: int = 0, layout: tuple[int, int, int] = (0, 1, 0)) -> ProjState:
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        return self._state(grad, seed, 0, layout)

    def update(self, grad: torch.Tensor, state: ProjState, *, layout: tuple[int, int, int] = (0, 1, 0),
               **context: Any) -> ProjState:
        return self._state(grad, state["seed"], int(state["refresh"]) + 1, layout)

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        return grad if state["active"] else grad.new_zeros(0)

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        return low if state["active"] else low.new_zeros((state["rows"], state["cols"]))

    def complement(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor | None:
        """``None`` (nothing left) for an active tensor, ``G`` itself for an inactive one."""
        return None if state["active"] else grad

    def same_subspace(self, old: ProjState, new: ProjState) -> bool:
        """Whether the tensor stays active (its subspace is the whole tensor) or stays inactive (empty)."""
        return bool(old["active"]) == bool(new["active"])

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        if state is None or state["active"]:
            return (int(shape[0]), int(shape[1]))
        return (0,)

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        return 0


__all__ = ["BLOCK_ORDERS", "BlockProjector", "active_blocks"]
