"""Adafactor (Shazeer and Stern 2018, arXiv:1804.04235), as used by GaLore-Adafactor and Flora."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._validation import check_number
from ..distributed import comm
from .base import Direction, Group, InnerRule, MomentSpec

#: Elements per row block of the factored update on the CPU (4 MB of fp32): each block's temporaries stay
#: in cache and are reused, instead of two full-size temporaries per step (a 16M-element embedding would
#: otherwise allocate, and page-fault in, 128 MB every step).
CPU_BLOCK_ELEMENTS = 1 << 20


def _rms(t: torch.Tensor, *, param: bool = False) -> float:
    # RMS of the whole tensor (a row shard's under FSDP2: :mod:`lowrank_optim.distributed.comm`)
    return comm.rms(t, param=param)


def _row_blocks(grad: torch.Tensor) -> list[slice]:
    """Row slices of a 2-D tensor: one block off the CPU (the caching allocator reuses the temporaries)."""
    m, n = int(grad.shape[0]), int(grad.shape[1])
    rows = max(1, CPU_BLOCK_ELEMENTS // max(n, 1)) if grad.device.type == "cpu" else max(m, 1)
    return [slice(i, min(i + rows, m)) for i in range(0, m, rows)] or [slice(0, 0)]


class AdafactorRule(InnerRule):
    """Adafactor with the factored second moment, in the HF Transformers formulation.

    ``beta2_t = 1 - t^decay_rate``; for a matrix the second moment is kept as row and column means of
    ``g^2 + eps[0]``; the update ``g / sqrt(v_hat)`` is clipped to RMS ``clip_threshold``, multiplied by
    the learning rate (relative ``min(1e-2, 1/sqrt(t))`` when ``relative_step``, times
    ``max(eps[1], RMS(param))`` when ``scale_parameter``), then averaged by ``beta1`` when given.
    As in HF, the first moment averages lr-scaled updates. Set ``relative_step=False`` to use ``lr``.

    A matrix's update is computed block by block of rows (:data:`CPU_BLOCK_ELEMENTS` on the CPU): three
    reads of the gradient and no full-size temporary; a plain matrix's whole step (moment, weight decay,
    parameter) is applied in the same blocks. The low-rank path uses the same blocks and operation order.
    """

    name = "adafactor"
    defaults: ClassVar[dict[str, Any]] = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8,
                                          "beta1": None, "scale_parameter": True, "relative_step": True,
                                          "warmup_init": False}

    def validate(self, group: Group) -> None:
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"Invalid eps: Adafactor takes a pair (eps1, eps2), got {eps!r}")
        for i, e in enumerate(eps):
            check_number(f"eps[{i}]", e, low=0.0)
        check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        check_number("decay_rate", group["decay_rate"], high=0.0)
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        if group["lr"] is None and not group["relative_step"]:
            raise ValueError("Invalid lr: None needs relative_step=True")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("Invalid warmup_init: True needs relative_step=True")

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        specs = []
        if len(shape) == 2:
            specs += [MomentSpec("exp_avg_sq_row", (shape[0],), False),
                      MomentSpec("exp_avg_sq_col", (shape[1],), False)]
        else:
            specs.append(MomentSpec("exp_avg_sq", tuple(shape), False))
        if group["beta1"] is not None:
            specs.append(MomentSpec("exp_avg", tuple(shape), True))
        return specs

    def _lr(self, group: Group, step: int, param: torch.Tensor) -> float:
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        else:
            lr = float(group["lr"])
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], _rms(param.float(), param=True))
        return lr

    def _factored(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  lr: float, blocks: list[slice], buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates the row/column statistics; returns ``c`` (``(n,)``) and ``rs`` (``(m, 1)``) such that
        the clipped, lr-scaled update is ``(g * c) * rs``."""
        # under FSDP2 ``grad`` may be a shard of a bigger matrix: sums over a split axis are completed by ``comm``
        m, n = comm.length(0, int(grad.shape[0])), comm.length(1, int(grad.shape[1]))
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        eps1 = group["eps"][0]
        row_sum = torch.empty(int(grad.shape[0]), dtype=grad.dtype, device=grad.device)
        col_sum = torch.zeros(int(grad.shape[1]), dtype=grad.dtype, device=grad.device)
        for b in blocks:  # pass 1: row and column sums of g^2
            sq = torch.mul(grad[b], grad[b], out=buf[: b.stop - b.start])
            torch.sum(sq, dim=1, out=row_sum[b])
            col_sum.add_(sq.sum(dim=0))
        comm.reduce_split(row_sum, 1)
        comm.reduce_split(col_sum, 0)
        # row / column means of g^2 + eps1 (= mean(g^2) + eps1: eps1 is added to the small vectors only)
        row, col = moments["exp_avg_sq_row"], moments["exp_avg_sq_col"]
        row.mul_(beta2t).add_(row_sum.div_(n).add_(eps1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(col_sum.div_(m).add_(eps1), alpha=1.0 - beta2t)
        r = (row / comm.mean(row, 0)).rsqrt_()
        c = col.rsqrt()
        for b in blocks:  # pass 2: RMS of the update g * r c^T, from the row norms of g * c
            gc = torch.mul(grad[b], c, out=buf[: b.stop - b.start])
            torch.linalg.vector_norm(gc, dim=1, out=row_sum[b])
        rms = math.sqrt(float(comm.reduce_total(row_sum.mul_(r).square_().sum())) / max(m * n, 1))
        # RMS clipping and the learning rate in the row factor
        return c, r.mul_(lr / max(1.0, rms / group["clip_threshold"])).unsqueeze(1)

    def _blocked(self, grad: torch.Tensor) -> tuple[list[slice], torch.Tensor]:
        blocks = _row_blocks(grad)
        rows = max(b.stop - b.start for b in blocks)
        return blocks, torch.empty(rows, int(grad.shape[1]), dtype=grad.dtype, device=grad.device)

    def apply_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                    group: Group) -> bool:
        """A plain matrix's whole step, block by block (see the class docstring); other shapes: False."""
        if grad.dim() != 2 or grad.numel() == 0:
            return False
        lr = self._lr(group, step, target)
        blocks, buf = self._blocked(grad)
        c, rs = self._factored(grad, moments, step, group, lr, blocks, buf)
        exp_avg, beta1 = moments.get("exp_avg"), group["beta1"]
        decay = 1.0 - lr * group["weight_decay"]
        for b in blocks:  # pass 3: moment, weight decay and parameter, one block at a time
            u = torch.mul(grad[b], c, out=buf[: b.stop - b.start]).mul_(rs[b])
            if exp_avg is not None:
                u = exp_avg[b].lerp_(u, 1 - beta1)
            if decay != 1.0:
                target[b].mul_(decay)
            target[b].sub_(u)
        return True

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        lr = self._lr(group, step, param)
        if "exp_avg_sq_row" in moments:
            blocks, buf = self._blocked(grad)
            c, rs = self._factored(grad, moments, step, group, lr, blocks, buf)
            # one block (a small matrix, or off the CPU): the scratch buffer is full-size, reuse it
            update = torch.mul(grad, c, out=buf if len(blocks) == 1 else None).mul_(rs)
        else:
            beta2t = 1.0 - math.pow(step, group["decay_rate"])
            v = moments["exp_avg_sq"]
            v.mul_(beta2t).addcmul_(grad, grad, value=1.0 - beta2t).add_(group["eps"][0] * (1.0 - beta2t))
            update = v.rsqrt().mul_(grad)
            # RMS clipping and the learning rate in one multiply
            update.mul_(lr / max(1.0, _rms(update) / group["clip_threshold"]))
        if group["beta1"] is not None:
            exp_avg = moments["exp_avg"]
            exp_avg.lerp_(update, 1 - group["beta1"])
            update = exp_avg
        return Direction(update, None, 1.0, lr)
