"""Layer-wise updates: each parameter steps from its own gradient hook and its gradient is freed at once.

The per-layer weight update of GaLore (Zhao et al., arXiv:2403.03507, Sec. 4.3, after LOMO, Lv et al.,
arXiv:2306.09782): a full model's gradients never coexist, which with 8-bit GaLore puts LLaMA-7B
pre-training on a 24 GB GPU. Differences from the reference scripts (all deliberate):

* One optimizer holds every parameter and :meth:`LowRankOptimizer.step_parameter` steps one at a time,
  so seeds, cross-parameter draws (FRUGAL's blocks, GUM's layers) and the state dict are exactly those of
  the ordinary loop: with the same gradients a layer-wise run equals a ``step()`` run bit for bit.
  (galore-torch builds one optimizer per parameter.)
* Gradient accumulation is respected: a parameter steps on the last backward pass of each cycle of
  ``accumulation_steps`` and keeps accumulating before (GaLore issue #78 and HF Transformers step on
  every backward or refuse accumulation). Steps and refresh periods count optimizer steps.
* The LR scheduler steps once per cycle, at the end of the backward pass that completes it, so every
  parameter's schedule stays in step (no doubled schedule, no per-parameter schedulers).
* Clipping is per parameter (``max_grad_norm`` bounds each gradient's own norm, as
  ``clip_grad_norm_([p], max_grad_norm)``). Global-norm clipping is impossible here: the global norm is
  known only once every gradient exists, by which time the earlier ones are already applied and freed.
* The non-finite gradient policy (``nonfinite``) applies per parameter: a bad gradient skips (or raises
  for) that parameter's step only.

* The parameter set may change during training. At the end of every backward pass the updater looks at
  the optimizer's parameters again: one unfrozen later (``requires_grad_(True)``) or added later
  (``add_param_group``) gets its hook then, and a gradient that arrived without a hook (that first backward)
  is stepped at the end of the cycle, from the callback, exactly as ``optimizer.step()`` would step it. A
  parameter frozen later simply stops receiving gradients, and an accumulated gradient it still holds at a
  cycle end is stepped and freed as ``step()`` would. The one case the updater cannot see is a backward pass
  in which no hooked parameter receives a gradient (every parameter it hooked is frozen): call
  :meth:`LayerwiseUpdater.refresh` after changing which parameters train, which hooks them at once.

Not for DistributedDataParallel: DDP all-reduces gradients after the hooks have already consumed them, so each
rank would step on its own gradient. An optimizer given to :func:`lowrank_optim.distributed.divide_refresh` is
refused; in any other job of more than one rank the updater warns (pipeline stages may ignore it).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ._validation import check_int, check_number
from .engine import LowRankOptimizer


def _refuse_data_parallel(optimizer: LowRankOptimizer) -> None:
    """Refuses an optimizer prepared for DDP (:func:`lowrank_optim.distributed.divide_refresh`) and warns under any
    ``torch.distributed`` job of more than one rank: under DistributedDataParallel (or any wrapper that reduces
    gradients after backward) each rank would step on its own unreduced gradient and the replicas would silently
    diverge. Pipeline stages, whose gradients are complete on their own rank, may ignore the warning.

    Raises:
        ValueError: ``divide_refresh(optimizer)`` was called (the optimizer is a DDP replica).
    """
    import warnings

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    if getattr(optimizer, "_refresh_layout", None) is not None:
        raise ValueError("Invalid optimizer: divide_refresh(optimizer) was called, so its ranks are data-parallel "
                         "replicas; LayerwiseUpdater steps each parameter from its gradient hook, before "
                         "DistributedDataParallel all-reduces that gradient, and the replicas would diverge; "
                         "call optimizer.step() after backward() instead")
    warnings.warn(f"LayerwiseUpdater in a torch.distributed job of {dist.get_world_size()} ranks: under "
                  "DistributedDataParallel each rank steps on its own unreduced gradient (the hooks run before the "
                  "all-reduce) and the replicas silently diverge; use optimizer.step() there. Ignore this only if "
                  "each rank's gradients are complete on their own (pipeline stages, independent models).",
                  UserWarning, stacklevel=3)


class LayerwiseUpdater:
    """Steps an optimizer's parameters from their post-accumulate-grad hooks during ``backward()``.

    The training loop only calls ``loss.backward()`` (one per micro-batch, the loss divided by
    ``accumulation_steps`` as usual); no ``optimizer.step()``, ``zero_grad()`` or ``scheduler.step()``.

    Args:
        optimizer: any optimizer of this package, built on the model's parameters as usual.
        accumulation_steps: backward passes per optimizer step.
        max_grad_norm: per-parameter gradient-norm bound (``None``: no clipping).
        lr_scheduler: a scheduler of ``optimizer``, stepped once per accumulation cycle.

    Raises:
        TypeError: ``optimizer`` is not an optimizer of this package.
        ValueError: FSDP2 (``DTensor``) parameters; an optimizer given to
            :func:`lowrank_optim.distributed.divide_refresh` (DDP); bad ``accumulation_steps``, ``max_grad_norm`` or
            ``lr_scheduler``. In any other ``torch.distributed`` job of more than one rank a ``UserWarning`` says
            that DDP replicas would diverge.
    """

    def __init__(self, optimizer: LowRankOptimizer, *, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"Invalid optimizer: expected a lowrank_optim optimizer, got {type(optimizer).__name__}")
        from .distributed.shards import is_dtensor

        if any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("Invalid optimizer: LayerwiseUpdater does not support FSDP2 (DTensor) parameters: "
                             "FSDP2 reduce-scatters a gradient after its accumulation hook, and a sharded step "
                             "needs every rank in the same collective order; call optimizer.step() instead")
        _refuse_data_parallel(optimizer)
        self.optimizer = optimizer
        self.accumulation_steps = check_int("accumulation_steps", accumulation_steps, low=1)
        self.max_grad_norm = None if max_grad_norm is None else check_number("max_grad_norm", max_grad_norm,
                                                                              low=0.0, low_open=True)
        if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is not optimizer:
            raise ValueError("Invalid lr_scheduler: it must be a scheduler of this optimizer")
        self.lr_scheduler = lr_scheduler
        self.backward_passes = 0
        self._in_backward = False
        self._handles: list[Any] = []
        self._hooked: dict[int, weakref.ref] = {}  # id -> weak reference, checked with ``is``
        self._removed = False
        self.refresh()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def refresh(self) -> int:
        """Hooks every parameter of the optimizer that requires a gradient and has no hook yet.

        Runs by itself at the end of every backward pass; call it after freezing / unfreezing parameters or
        ``add_param_group`` when the next backward pass might reach no hooked parameter at all.

        Returns:
            The number of hooks added.
        """
        if self._removed:
            return 0
        added = 0
        for p in self._params():
            ref = self._hooked.get(id(p))
            if p.requires_grad and (ref is None or ref() is not p):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
                self._hooked[id(p)] = weakref.ref(p)
                added += 1
        return added

    @property
    def optimizer_steps(self) -> int:
        """Completed accumulation cycles (optimizer steps)."""
        return self.backward_passes // self.accumulation_steps

    def _hook(self, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if (self.backward_passes + 1) % self.accumulation_steps:
            return  # not the last micro-batch of the cycle: keep accumulating
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step_parameter(p)
        p.grad = None

    def _end_backward(self) -> None:
        self._in_backward = False
        self.backward_passes += 1
        if self.backward_passes % self.accumulation_steps == 0:
            # gradients no hook consumed: a parameter unfrozen or added since the hooks were made, or one whose
            # last micro-batch of the cycle gave it no gradient; step() would step them all now
            for p in self._params():
                if p.grad is not None:
                    if self.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
                    self.optimizer.step_parameter(p)
                    p.grad = None
            if self.lr_scheduler is not None:
                # the optimizer did step (parameter by parameter): tell torch's order check so it does not warn
                self.optimizer._opt_called = True  # type: ignore[attr-defined]
                self.lr_scheduler.step()
        self.refresh()

    def remove(self) -> None:
        """Removes the hooks (the optimizer and its state stay usable with ordinary ``step()``)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = {}
        self._removed = True

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and counter state (plain tensors and ints; ``weights_only``-safe).

        Raises:
            RuntimeError: in the middle of an accumulation cycle (pending gradients are not saved).
        """
        if self.backward_passes % self.accumulation_steps:
            raise RuntimeError(f"LayerwiseUpdater.state_dict: {self.backward_passes % self.accumulation_steps} of "
                               f"{self.accumulation_steps} backward passes into a cycle; save at a cycle end")
        return {"optimizer": self.optimizer.state_dict(), "backward_passes": self.backward_passes,
                "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if (state_dict["lr_scheduler"] is None) != (self.lr_scheduler is None):
            raise ValueError("Invalid state_dict: lr_scheduler saved and configured must both be present or absent")
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])
        self.backward_passes = check_int("backward_passes", state_dict["backward_passes"], low=0)


__all__ = ["LayerwiseUpdater"]
