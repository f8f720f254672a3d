"""Which parameters of a group take the low-rank path, as which matrices, and where each sits among them.

A parameter is *projected* when its group carries ``rank`` (not ``None``), ``target_modules`` (if the group
has it) selects it, and it has at least two dimensions. Everything else (0-D and 1-D tensors, groups without
``rank``) takes the plain inner rule. A projected parameter is seen as matrices, by its *kind*:

* ``"matrix"``: a 2-D weight ``(m, n)``, one matrix.
* ``"experts"``: a stack of matrices ``(E, m, n)`` (more leading dimensions are flattened into ``E``), each with
  its own basis and moments: HF Transformers' MoE expert weights (``experts.gate_up_proj``, ``(E, ., .)``).
* ``"conv"``: a convolution weight ``(out, in, k1, ...)`` projected as the one matrix ``out x (in * k1 * ...)``
  (GaLore's conv support, Zhao et al. 2024).

The group key ``nd_layout`` picks the kind of a tensor with more than two dimensions: ``"auto"`` (default): 3-D
is ``"experts"``, 4-D is ``"conv"``, anything else is refused by name; ``"experts"`` or ``"conv"``: every such
tensor of the group (``"conv"`` for a ``Conv1d`` weight, which is 3-D). No tensor of a low-rank group is ever
kept at full state silently.

The position of a projected matrix among its group's projected matrices (its *layout*; an ``(E, m, n)`` weight
counts ``E``) depends only on the group's parameter order, never on the process rank or on how the engine
batches the work, so every data-parallel rank and every batching computes the same.
"""

from __future__ import annotations

from typing import Any

import torch

from .groups import FLATTENED_HINT, is_flattened
from .targets import resolve_target_kinds

Group = dict[str, Any]

ND_LAYOUTS = ("auto", "experts", "conv")
KINDS = ("matrix", "experts", "conv")


def nd_kind(group: Group, p: torch.Tensor, index: int | None = None) -> str | None:
    """The kind of ``p`` if it is projected by shape in ``group`` (``None``: plain), see the module docstring.

    Raises:
        ValueError: a tensor of more than two dimensions that ``nd_layout`` cannot see as matrices (``"auto"``
            with 5 or more dimensions), named by ``index`` and shape.
    """
    if group.get("rank") is None or p.dim() < 2:
        return None
    if p.dim() == 2:
        return "matrix"
    layout = group.get("nd_layout", "auto")
    if layout == "auto":
        if p.dim() == 3:
            return "experts"
        if p.dim() == 4:
            return "conv"
        where = f"parameter {index} " if index is not None else "a parameter "
        raise ValueError(f"Invalid params: {where}of shape {tuple(p.shape)} in a group with rank={group['rank']} "
                         "has more than 4 dimensions; set nd_layout='experts' (a stack of matrices over the "
                         "leading dimensions) or 'conv' (out x everything else) for its group, or put it in a "
                         "group without rank")
    return layout


def matrix_shape(p: torch.Tensor | torch.Size, kind: str) -> tuple[int, ...]:
    """``(m, n)`` or ``(E, m, n)``: the shape a projected parameter of ``kind`` is stepped as."""
    shape = tuple(int(s) for s in (p.shape if isinstance(p, torch.Tensor) else p))
    if kind == "matrix":
        return shape
    if kind == "conv":
        rest = 1
        for s in shape[1:]:
            rest *= s
        return (shape[0], rest)
    lead = 1
    for s in shape[:-2]:
        lead *= s
    return (lead, shape[-2], shape[-1])


def n_matrices(p: torch.Tensor | torch.Size, kind: str) -> int:
    """How many matrices a projected parameter of ``kind`` holds (``E`` for experts, else 1)."""
    return matrix_shape(p, kind)[0] if kind == "experts" else 1


class Planner:
    """Resolves, once, what each parameter of an optimizer's groups is.

    Args:
        param_groups: the optimizer's groups (read at call time, so groups added later are seen).
        module: the model ``target_modules`` resolves against (``None``: names from the groups).
    """

    def __init__(self, param_groups: list[Group], module: torch.nn.Module | None) -> None:
        self.param_groups = param_groups
        self.module = module
        self._target_ids: dict[int, bool] | None = None  # selected parameter -> is a convolution weight

    def reset(self) -> None:
        """Forgets the resolved ``target_modules`` (after new groups or a state-dict load)."""
        self._target_ids = None

    @staticmethod
    def is_lowrank(group: Group, p: torch.Tensor) -> bool:
        """Whether ``p``'s shape takes the low-rank path in ``group`` (before ``target_modules``)."""
        return nd_kind(group, p) is not None

    def kind(self, group: Group, p: torch.Tensor) -> str | None:
        """``p``'s kind if it is projected in ``group`` (``None``: plain). The group's ``target_modules`` are
        resolved (and a selected tensor that cannot be projected, such as a 1-D shard named as a weight, refused)
        before the shape is looked at; a convolution weight they select is ``"conv"`` under ``nd_layout="auto"``
        whatever its dimensions (a ``Conv1d`` weight is 3-D, a ``Conv3d`` one 5-D)."""
        if group.get("rank") is None or not self.targeted(group, p):
            return None
        if (group.get("target_modules") is not None and p.dim() > 2 and group.get("nd_layout", "auto") == "auto"
                and self._target_ids is not None and self._target_ids.get(id(p))):
            return "conv"
        return nd_kind(group, p)

    def targeted(self, group: Group, p: torch.Tensor) -> bool:
        """Whether ``group["target_modules"]`` (if any) selects ``p``; resolved once, at the first use."""
        if group.get("target_modules") is None:
            return True
        if self._target_ids is None:
            self._target_ids = resolve_target_kinds(self.param_groups, self.module)
        return id(p) in self._target_ids

    def projected(self, group: Group, p: torch.Tensor) -> bool:
        """Whether ``p`` is projected in ``group``."""
        return self.kind(group, p) is not None

    def layout(self, group: Group, p: torch.Tensor, matrix: int = 0) -> tuple[int, int, int]:
        """``(position, count, group seed)`` of matrix ``matrix`` of ``p`` among the group's projected matrices,
        for projectors that draw across parameters (``wants_layout``: FRUGAL blocks, GUM's layer draw)."""
        position, count = -1, 0
        for q in group["params"]:
            kind = self.kind(group, q)
            if kind is None:
                continue
            if q is p:
                position = count + matrix
            count += n_matrices(q, kind)
        return position, count, int(group["seed"])


def refuse_flattened(group: Group) -> None:
    """Raises for a flattened parameter in a low-rank group (FSDP1 ``FlatParameter`` or its
    ``use_orig_params`` views, DeepSpeed ZeRO-3 partitions): its 2-D structure is gone, and taking the
    plain path silently would turn the method into plain Adam."""
    for i, p in enumerate(group["params"]):
        if is_flattened(p):
            raise ValueError(f"Invalid params: parameter {i} (shape {tuple(p.shape)}) of a group with "
                             f"rank={group['rank']} is a flattened shard; {FLATTENED_HINT}")


__all__ = ["KINDS", "ND_LAYOUTS", "Planner", "matrix_shape", "n_matrices", "nd_kind", "refuse_flattened"]
