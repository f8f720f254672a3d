"""Contracts for the three pluggable rules of the engine.

* :class:`InnerRule`: the optimizer run on the (projected) gradient, e.g. Adam. Stateless objects;
  hyper-parameters come from the param group, moments from the state store.
* :class:`ResidualRule`: what happens to the part of the gradient the projection drops.
* :class:`TransferPolicy`: what happens to the moments when the subspace is refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..projectors.base import Projector, ProjState
from ..state import StateStore

Group = dict[str, Any]

_STEP_TENSORS: dict[tuple[str, float], torch.Tensor] = {}
_STEP_CACHE_SIZE = 64


def device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor holding ``value`` on ``device``, shared by every parameter of a step (read-only).

    Made with ``torch.full`` (a fill on the device: no host-to-device copy, no synchronisation) once per
    ``(device, value)`` and cached (the 64 most recently used). An elementwise op with it is one dispatch,
    where a Python number costs a CPU tensor wrapped and cast first. Callers must not modify it.
    """
    key = (str(device), float(value))
    t = _STEP_TENSORS.pop(key, None)  # re-inserted below: the least recently used entry is the first to go
    if t is None:
        if len(_STEP_TENSORS) >= _STEP_CACHE_SIZE:
            _STEP_TENSORS.pop(next(iter(_STEP_TENSORS)))
        t = torch.full((), float(value), dtype=torch.float32, device=device)
    _STEP_TENSORS[key] = t
    return t


def step_tensor(step: int, device: torch.device) -> torch.Tensor:
    """:func:`device_scalar` of ``step``, for kernels that take step counts as tensors (``torch._fused_adamw_``;
    they only read it)."""
    return device_scalar(float(step), device)


@dataclass
class Direction:
    """A step ``-coef * num / den`` (``den`` may be ``None``); ``lr`` is what weight decay uses."""

    num: torch.Tensor
    den: torch.Tensor | None
    coef: float
    lr: float

    def dense(self) -> torch.Tensor:
        """``num / den`` as a new tensor (``coef`` not applied)."""
        return self.num / self.den if self.den is not None else self.num.clone()


@dataclass(frozen=True)
class MomentSpec:
    """One moment tensor a rule keeps: its state key, shape and whether it can be negative."""

    name: str
    shape: tuple[int, ...]
    signed: bool


class InnerRule:
    """An element-wise (or small-matrix) optimizer applied inside the subspace."""

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}

    def check_projector(self, projector: Projector, group: Group) -> None:
        """Raises ``ValueError`` (naming ``projector`` and ``inner``) for a projector whose low-rank tensor this
        rule cannot take; the engine calls it at construction. Default: every projector."""

    def validate(self, group: Group) -> None:
        """Raises ``ValueError``/``TypeError`` naming a bad hyper-parameter of ``group``."""

    def requires_lr(self, group: Group) -> bool:
        """Whether the rule needs the group's ``lr`` (the engine refuses ``lr=None`` at construction when it
        does). Default: True; Adafactor with ``relative_step`` computes its own."""
        return True

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        """The moments kept for a (projected) gradient of ``shape``."""
        raise NotImplementedError

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        """Updates ``moments`` in place from the fp32 ``grad`` and returns the step to take."""
        raise NotImplementedError

    def directions(self, grads: list[torch.Tensor], moments: list[dict[str, torch.Tensor]], steps: list[int],
                   group: Group, params: list[torch.Tensor]) -> list[Direction]:
        """:meth:`direction` for a list of (projected) gradients at once, in order; a rule with a batched kernel
        overrides it (the result must equal the per-tensor calls to rounding). Default: one call each."""
        return [self.direction(g, m, s, group, p) for g, m, s, p in zip(grads, moments, steps, params, strict=True)]

    def stack_direction(self, grads: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                        params: list[torch.Tensor]) -> Direction | None:
        """:meth:`direction` for a stack of ``B`` same-shape (projected) gradients at one step count, as batched
        ops on ``(B, ...)`` tensors: ``grads`` stacks the gradients, ``moments`` each moment's ``(B, ...)`` arena
        (updated in place; :mod:`lowrank_optim.stacks`), ``params`` the ``B`` weights. The returned direction's
        ``num`` / ``den`` are ``(B, ...)``; ``coef`` and ``lr`` are shared. ``None``: no stacked kernel, the engine
        runs :meth:`directions` on per-matrix views instead (the default). Must equal :meth:`direction` per
        matrix to rounding and read no device value on the host."""
        return None

    def plan_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                   group: Group) -> Any:
        """Optionally computes, before the step's non-finite check and without changing ``moments``, reductions of
        a plain parameter's gradient that the check can read in its place (an object with a ``probes`` attribute:
        tensors non-finite whenever an entry of ``grad`` is); :meth:`apply_plain` then gets it as ``plan``.
        ``None`` (the default): the check reads the gradient (:mod:`lowrank_optim.nonfinite`)."""
        return None

    def apply_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                    group: Group, plan: Any = None) -> bool:
        """Optionally performs the whole plain-parameter update (weight decay included) on the fp32 ``target``;
        ``plan`` is what :meth:`plan_plain` returned for this step, if anything.

        Returns True when it did (a fused kernel, say); False lets the engine apply :meth:`direction`.
        """
        return False


class ResidualRule:
    """Turns the gradient the projection drops into an extra full-rank step (or nothing)."""

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, group: Group) -> None:
        """Raises for bad residual hyper-parameters."""

    #: Whether the rule works on the complement ``G - project_back(project(G))`` (every residual rule but
    #: ``drop``): with a basis that is not orthonormal that difference is not a complement but noise.
    takes_complement: ClassVar[bool] = True
    #: Whether :meth:`step` takes ``target=``, the fp32 weight, to apply its step in place and return ``None`` (a
    #: sparse step: GaLore+'s residual touches 1% of the entries, a full-size tensor to subtract would be waste).
    wants_target: ClassVar[bool] = False

    def check_projector(self, projector: Projector, group: Group) -> None:
        """Raises ``ValueError`` (naming ``projector`` and ``residual``) for a projector this rule cannot use:
        a rule that takes the complement needs an orthonormal basis (:attr:`Projector.orthonormal`)."""
        if self.takes_complement and not projector.orthonormal:
            raise ValueError(
                f"Invalid projector: {projector.name!r} with residual={self.name!r}: the residual takes the "
                f"complement G - P P^T G, which needs an orthonormal basis, and {projector!r} is not "
                "orthonormal (" + _ORTHONORMAL_HINTS.get(projector.name, "use an orthonormal projector") + ")")
        if self.takes_complement and projector.basis_dtype == "int4":
            raise ValueError(
                f"Invalid basis_dtype: 'int4' with residual={self.name!r}: an int4 basis leaves about 0.14 of the "
                "gradient's norm as quantization error in the complement G - P P^T G, as large as the complement "
                "itself; use basis_dtype='int8' or 'bf16' with a complement-taking residual")
        if self.takes_complement and getattr(projector, "covers_complement", False):
            raise ValueError(
                f"Invalid projector: {projector.name!r} with residual={self.name!r}: the projector already "
                "steps the complement G - P P^T G itself (GUM's importance-weighted full-rank draws), so a "
                "residual rule on top would count it twice; use residual='drop' with this projector")

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group) -> torch.Tensor | None:
        """The full-shape tensor to subtract from the parameter, or ``None`` (nothing, or applied to ``target``
        itself by a rule with :attr:`wants_target`)."""
        raise NotImplementedError

    def export_state(self, state: dict, group: Group, shape: tuple[int, ...]) -> dict:
        """The state of a matrix of ``shape`` (``(m, n)``) as a checkpoint holds it (``state``, or a changed copy).

        ``torch.distributed.checkpoint`` loads by the keys and shapes of a fresh optimizer's state (one zero-lr,
        zero-gradient step), so a rule whose state gains or swaps keys over a run (GaLore+'s sparse residual)
        exports the same keys and shapes in every phase; :meth:`import_state` undoes it. Default: unchanged."""
        return state

    def import_state(self, state: dict, group: Group, shape: tuple[int, ...]) -> dict:
        """The inverse of :meth:`export_state` on a loaded ``state``.

        Raises:
            ValueError: the checkpoint lost state that the exported skeleton cannot carry."""
        return state


#: How to get an orthonormal variant of a projector that is not one (for :meth:`ResidualRule.check_projector`).
_ORTHONORMAL_HINTS = {
    "random": "Flora's Gaussian basis; use projector_options={'distribution': 'orthonormal'}, the QR of a seeded "
              "Gaussian that FRUGAL's reference uses",
    "online_pca": "P drifts from orthonormality; use projector_options={'orthonormalize': True}",
    "coap": "the correction step moves P off orthonormality; use projector='rsvd' or 'svd'",
}


class TransferPolicy:
    """Moves (or resets, or keeps) moments when the projector state changes."""

    name: ClassVar[str] = "base"

    def check_projector(self, projector: Projector, group: Group) -> None:
        """Raises ``ValueError`` (naming ``transfer`` and ``projector``) for a projector this policy cannot serve;
        the engine calls it at construction. Default: every projector."""

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        """Rewrites the moments named in ``specs`` inside ``state`` for the new subspace."""
        raise NotImplementedError
