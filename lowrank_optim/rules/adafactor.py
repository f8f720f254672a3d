"""Adafactor (Shazeer and Stern 2018, arXiv:1804.04235), as used by GaLore-Adafactor and Flora."""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch

from .._validation import check_number
from ..distributed import comm
from .base import Direction, Group, InnerRule, MomentSpec, device_scalar

#: Elements per row block of the factored update on the CPU (16 MB of fp32): one scratch block is reused,
#: instead of two full-size temporaries per step (a 16M-element embedding would otherwise allocate, and
#: page-fault in, 128 MB every step); blocks are few (4 for LLaMA-60M's embedding), each costing a dozen
#: dispatches.
CPU_BLOCK_ELEMENTS = 1 << 22


def _rms(t: torch.Tensor, *, param: bool = False) -> torch.Tensor:
    """RMS of the whole tensor ``t`` is a shard of (the rule's tensor, or the parameter with ``param``) as a 0-d
    tensor: no host read (:func:`lowrank_optim.distributed.comm.rms` semantics under FSDP2)."""
    spec = comm.current()
    if spec is None or (not param and spec.dim is None):
        return torch.linalg.vector_norm(t).div_(math.sqrt(max(t.numel(), 1)))
    numel = spec.param_numel if param else math.prod(spec.shape)
    total = comm.all_reduce(t.float().square().sum().reshape(1), spec.group).reshape(())
    return total.div_(max(numel, 1)).sqrt_()


def _row_blocks(grad: torch.Tensor) -> list[int]:
    """Row counts of the blocks of a 2-D tensor: one block off the CPU (the caching allocator reuses the
    temporaries)."""
    m, n = int(grad.shape[0]), int(grad.shape[1])
    rows = max(1, CPU_BLOCK_ELEMENTS // max(n, 1)) if grad.device.type == "cpu" else max(m, 1)
    return [min(rows, m - i) for i in range(0, m, rows)] or [0]


def _rows(t: torch.Tensor, sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
    """``t`` cut into blocks of ``sizes`` along ``dim`` (the row blocks of a matrix, or with ``dim=1`` the matching
    columns of a ``(2, m)`` weight matrix; views; ``[t]`` for one block: no dispatch)."""
    return [t] if len(sizes) == 1 else list(t.split(sizes, dim=dim))


def _scratch(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The scratch block seen with each block's row count (a full block is ``buf`` itself)."""
    return [buf if k == buf.shape[0] else buf[:k] for k in sizes]


def _average(exp_avg: torch.Tensor, update: torch.Tensor, beta1: float) -> torch.Tensor:
    """``exp_avg <- beta1 exp_avg + (1 - beta1) update`` in place, HF's operations (``mul_`` then ``add_``): the plain
    path's form where torch's fused SGD step (which computes the same, ``momentum = dampening = beta1``; bit for bit
    but for the last entries of an odd length, ``tests/test_adafactor_rule.py``) cannot run."""
    return exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)


def _fusable(target: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor) -> bool:
    """Whether a plain matrix's momentum and parameter update can be torch's fused SGD kernel (one pass instead of
    two: 8.6 against 12.5 ms for a 32000 x 512 matrix on 2 cores): same dtype and device, contiguous."""
    return (target.dtype == grad.dtype == exp_avg.dtype and target.device == grad.device == exp_avg.device
            and target.is_contiguous() and exp_avg.is_contiguous())


class PlainPlan(NamedTuple):
    """A plain matrix's factored statistics computed before the step's non-finite check
    (:meth:`AdafactorRule.plan_plain`), into copies: the state is untouched until :meth:`AdafactorRule.apply_plain`
    commits them. ``row`` / ``col`` (``(m,)`` / ``(n,)``) are the new statistics, which the check reads in place of
    the gradient (:mod:`lowrank_optim.nonfinite`); ``c`` and ``rs`` the update's factors (:meth:`_factored`)."""

    lr: float | torch.Tensor
    blocks: list[int]
    buf: torch.Tensor
    c: torch.Tensor
    rs: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    @property
    def probes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors the non-finite check reads for this matrix: non-finite whenever a gradient entry is (an inf
        or NaN square propagates into its row's and column's sums), and, conservatively, when a finite entry's
        square or a row / column sum of squares overflows fp32 (``|g| > 1.8e19``), which would make the stored
        statistic inf and every later one NaN."""
        return self.row, self.col


class AdafactorRule(InnerRule):
    """Adafactor with the factored second moment, in the HF Transformers formulation.

    ``beta2_t = 1 - t^decay_rate``; for a matrix the second moment is kept as row and column means of
    ``g^2 + eps[0]``; the update ``g / sqrt(v_hat)`` is clipped to RMS ``clip_threshold``, multiplied by
    the learning rate (relative ``min(1e-2, 1/sqrt(t))`` when ``relative_step``, times
    ``max(eps[1], RMS(param))`` when ``scale_parameter``), then averaged by ``beta1`` when given.
    As in HF, the first moment averages lr-scaled updates. Set ``relative_step=False`` to use ``lr``.

    A matrix's update is computed block by block of rows (:data:`CPU_BLOCK_ELEMENTS` on the CPU): two reads of
    the gradient (its squares, which give the row and column statistics and, in closed form, the update's RMS:
    see :meth:`_factored`; then the update itself) and no full-size temporary; a plain matrix's whole step
    (moment, weight decay, parameter) is applied in the same blocks. The low-rank path uses the same blocks and
    operation order.
    """

    name = "adafactor"
    defaults: ClassVar[dict[str, Any]] = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8,
                                          "beta1": None, "scale_parameter": True, "relative_step": True,
                                          "warmup_init": False}

    def requires_lr(self, group: Group) -> bool:
        """Only without ``relative_step``: the relative step replaces ``lr``."""
        return not group["relative_step"]

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

    def _lr(self, group: Group, step: int, param: torch.Tensor) -> float | torch.Tensor:
        """The step's learning rate: a Python number, or a 0-d tensor with ``scale_parameter`` (times
        ``max(eps[1], RMS(param))``, kept on the device)."""
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        else:
            lr = float(group["lr"])
        if group["scale_parameter"]:
            return _rms(param.float(), param=True).clamp_min_(group["eps"][1]).mul_(lr)
        return lr

    def _factored(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  lr: float | torch.Tensor, blocks: list[int], buf: torch.Tensor, row: torch.Tensor | None = None,
                  col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates the row/column statistics (``moments``', or ``row`` / ``col`` in their place: copies, for
        :meth:`plan_plain`); returns ``c`` (``(n,)``) and ``rs`` (``(m, 1)``) such that the clipped, lr-scaled
        update is ``(g * c) * rs``.

        One read of the gradient and no pass over the update: with ``S = g o g``, new row statistics ``R``
        (known block by block, once a block's row sums are) and new column statistics ``C``, the update is
        ``u = r c^T o g`` with ``r_i^2 = mean(R) / R_i`` and ``c_j^2 = 1 / C_j``, so
        ``sum(u^2) = sum_j h_j q_j^2`` with ``h = S^T (1 / R)`` and ``q = sqrt(mean(R)) c``; ``h`` and the column
        sums ``S^T 1`` are one ``(2, rows) x (rows, n)`` product per row block. Every intermediate stays in fp32's
        range (``S_ij / R_i <= n / (1 - beta2_t)``; ``c`` and ``q`` as HF's ``(R / mean(R))^(-1/2)``) as long as
        ``1 / R`` does: ``R >= (1 - beta2_t) eps[0]``, so while ``(1 - beta2_t) eps[0]`` is at least fp32's
        smallest normal (with the default ``eps[0] = 1e-30``: the first 8e9 steps). Otherwise (a smaller ``eps[0]``,
        0 included, where a tiny gradient's ``1 / R`` would be inf and ``0 * inf`` NaN) the scratch block is divided
        row by row first, ``h = (S / R)^T 1`` and ``S^T 1 = (S / R)^T R``: one more pass over the block in cache.
        """
        # under FSDP2 ``grad`` may be a shard of a bigger matrix: sums over a split axis are completed by ``comm``
        m, n = comm.length(0, int(grad.shape[0])), comm.length(1, int(grad.shape[1]))
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        eps1 = group["eps"][0]
        row = moments["exp_avg_sq_row"] if row is None else row
        col = moments["exp_avg_sq_col"] if col is None else col
        spec = comm.current()
        split_rows = spec is not None and spec.dim == 1  # a row's sum needs every rank: all rows first
        row_sum = torch.empty(int(grad.shape[0]), dtype=grad.dtype, device=grad.device)
        # [1; 1 / R] for S, or [R; 1] for S / R (the docstring): either way the product is [S^T 1; h]
        reciprocal = (1.0 - beta2t) * eps1 >= torch.finfo(torch.float32).tiny
        weights = torch.ones(2, int(grad.shape[0]), dtype=grad.dtype, device=grad.device)
        sums = torch.zeros(2, int(grad.shape[1]), dtype=grad.dtype, device=grad.device)
        # row means of g^2 + eps1 (= mean(g^2) + eps1: eps1 is added to the small vectors only)
        if split_rows:
            torch.linalg.vector_norm(grad, dim=1, out=row_sum).square_()
            row.lerp_(comm.reduce_split(row_sum, 1).div_(n).add_(eps1), 1.0 - beta2t)
        parts = zip(_rows(grad, blocks), _scratch(buf, blocks), _rows(row_sum, blocks), _rows(row, blocks),
                    _rows(weights[1 if reciprocal else 0], blocks), _rows(weights, blocks, dim=1), strict=True)
        for g, bf, rsum, r_block, w_row, w in parts:
            sq = torch.mul(g, g, out=bf)
            if not split_rows:
                r_block.lerp_(torch.sum(sq, dim=1, out=rsum).div_(n).add_(eps1), 1.0 - beta2t)
            if reciprocal:
                torch.reciprocal(r_block, out=w_row)
            else:
                w_row.copy_(r_block)
                sq = sq.div_(r_block.unsqueeze(1))
            sums.addmm_(w, sq)
        comm.reduce_split(sums, 0)
        col.lerp_(sums[0].div_(m).add_(eps1), 1.0 - beta2t)
        row_mean = comm.mean(row, 0)
        r = torch.div(row, row_mean).rsqrt_()
        c = col.rsqrt()
        q = c.mul(row_mean.sqrt())
        # RMS of the update (a sum over this rank's columns: completed when the columns are split)
        total = torch.dot(sums[1].mul_(q), q)
        if split_rows:
            total = comm.reduce_split(total.reshape(1), 1).reshape(())
        rms = total.div_(max(m * n, 1)).sqrt_()
        # RMS clipping and the learning rate in the row factor (device-side: no host read)
        return c, r.mul_(lr).div_(rms.div_(group["clip_threshold"]).clamp_min_(1.0)).unsqueeze(1)

    def _blocked(self, grad: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        blocks = _row_blocks(grad)
        rows = max(blocks)
        return blocks, torch.empty(rows, int(grad.shape[1]), dtype=grad.dtype, device=grad.device)

    def plan_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                   group: Group) -> PlainPlan | None:
        """The first half of :meth:`apply_plain` for an ``(m, n)`` matrix, run before the step's non-finite check:
        the learning rate, the new row / column statistics (written to copies; ``moments`` is only read) and the
        update's factors. The check then reads the two small statistics instead of the gradient, one read of the
        gradient fewer per step (:mod:`lowrank_optim.nonfinite`); :meth:`apply_plain` given the plan commits the
        statistics and applies the update, the same operations in the same order as without a plan, so the same
        bits. ``None`` for other shapes and under FSDP2 sharding (whose sums are collectives)."""
        if grad.dim() != 2 or grad.numel() == 0 or comm.current() is not None or "exp_avg_sq_row" not in moments:
            return None
        row, col = moments["exp_avg_sq_row"].clone(), moments["exp_avg_sq_col"].clone()
        return PlainPlan(*self._statistics(target, grad, moments, step, group, row, col), row, col)

    def _statistics(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                    group: Group, row: torch.Tensor | None = None, col: torch.Tensor | None = None
                    ) -> tuple[float | torch.Tensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """A plain matrix's ``(lr, blocks, buf, c, rs)``: the step's learning rate, its row blocks and scratch, and
        :meth:`_factored`'s update factors (the statistics updated in ``moments``, or in ``row`` / ``col``)."""
        lr = self._lr(group, step, target)
        blocks, buf = self._blocked(grad)
        return lr, blocks, buf, *self._factored(grad, moments, step, group, lr, blocks, buf, row=row, col=col)

    def apply_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                    group: Group, plan: Any = None) -> bool:
        """A plain matrix's whole step, block by block (see the class docstring); other shapes: False. With the
        :class:`PlainPlan` of :meth:`plan_plain` (same gradient, moments and step) its statistics are committed and
        only the update remains."""
        if grad.dim() != 2 or grad.numel() == 0:
            return False
        if plan is None:
            lr, blocks, buf, c, rs = self._statistics(target, grad, moments, step, group)
        else:
            moments["exp_avg_sq_row"].copy_(plan.row)
            moments["exp_avg_sq_col"].copy_(plan.col)
            lr, blocks, buf, c, rs = plan.lr, plan.blocks, plan.buf, plan.c, plan.rs
        exp_avg, beta1 = moments.get("exp_avg"), group["beta1"]
        wd = group["weight_decay"]
        decay = 1.0 - lr * wd
        avgs = _rows(exp_avg, blocks) if exp_avg is not None else [None] * len(blocks)
        parts = zip(_rows(grad, blocks), _scratch(buf, blocks), _rows(rs, blocks), avgs, _rows(target, blocks),
                    strict=True)
        fused = exp_avg is not None and _fusable(target, grad, exp_avg)
        for g, bf, r, avg, w in parts:  # the update: moment, weight decay and parameter, one block at a time
            u = torch.mul(g, c, out=bf).mul_(r)
            if wd != 0:
                w.mul_(decay)
            if fused:  # avg = beta1 avg + (1 - beta1) u; w -= avg: torch's fused SGD with momentum = dampening
                torch._fused_sgd_([w], [u], [avg], weight_decay=0.0, momentum=beta1, lr=1.0, dampening=beta1,
                                  nesterov=False, maximize=False, is_first_step=False)
                continue
            w.sub_(u if avg is None else _average(avg, u, beta1))
        return True

    def stack_direction(self, grads: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                        params: list[torch.Tensor]) -> Direction | None:
        """The factored update of a stack ``(B, m, n)`` of projected gradients at once (same operations as
        :meth:`direction`, over the stack: row / column statistics, RMS clipping and the learning rate as
        ``(B, ...)`` tensors). ``None`` for unfactored moments or under FSDP2 sharding (per-matrix path)."""
        if "exp_avg_sq_row" not in moments or grads.dim() != 3 or comm.current() is not None:
            return None
        m, n = int(grads.shape[1]), int(grads.shape[2])
        dev = grads.device
        lrs = [self._lr(group, step, p) for p in params]
        lr: float | torch.Tensor = lrs[0] if isinstance(lrs[0], float) else torch.stack(lrs)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        eps1 = device_scalar(group["eps"][0], dev)
        sq = torch.mul(grads, grads)
        row, col = moments["exp_avg_sq_row"], moments["exp_avg_sq_col"]
        row.lerp_(sq.sum(2).div_(device_scalar(float(n), dev)).add_(eps1), 1.0 - beta2t)
        col.lerp_(sq.sum(1).div_(device_scalar(float(m), dev)).add_(eps1), 1.0 - beta2t)
        r = torch.div(row, row.sum(1, keepdim=True).div_(device_scalar(float(m), dev))).rsqrt_()
        update = torch.mul(grads, col.rsqrt().unsqueeze(1), out=sq)
        rms = torch.linalg.vector_norm(update, dim=2).mul_(r).square_().sum(1)
        rms.div_(device_scalar(float(max(m * n, 1)), dev)).sqrt_()
        clip = rms.div_(device_scalar(float(group["clip_threshold"]), dev)).clamp_min_(1.0)
        factor = r.mul_(lr.unsqueeze(1) if isinstance(lr, torch.Tensor) else device_scalar(lr, dev))
        update.mul_(factor.div_(clip.unsqueeze(1)).unsqueeze(2))
        if group["beta1"] is not None:
            update = moments["exp_avg"].lerp_(update, 1 - group["beta1"])
        return Direction(update, None, 1.0, lr)

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
            # RMS clipping and the learning rate (device-side: no host read)
            clip = _rms(update).div_(group["clip_threshold"]).clamp_min_(1.0)
            update.mul_(lr).div_(clip)
        if group["beta1"] is not None:
            update = moments["exp_avg"].lerp_(update, 1 - group["beta1"])
        return Direction(update, None, 1.0, lr)
