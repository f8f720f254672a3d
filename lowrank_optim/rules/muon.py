"""Muon: momentum orthogonalised by a Newton-Schulz iteration (Jordan et al. 2024; Liu et al. 2025,
arXiv:2502.16982), as the inner rule of GUM (arXiv:2510.17802)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._validation import check_int, check_number
from ..distributed import comm
from ..projectors.base import Projector
from .base import Direction, Group, InnerRule, MomentSpec

#: The quintic coefficients (a, b, c) of Keller Jordan's Muon: a steep slope at 0, no convergence to
#: exactly 1 (singular values end up roughly in [0.7, 1.2]), which is enough for the step direction.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
LR_ADJUST = ("original", "match_rms_adamw", "none")
#: fp32 Newton-Schulz of a matrix whose long side is at least this many times its short one iterates on the short
#: side's Gram matrix (:func:`_gram_iterate`: about 0.7x the multiply-adds at 2x, 0.5x at 10x).
GRAM_ASPECT = 2
#: Iterations between two formings of the iterate in :func:`_gram_iterate` (3 keeps fp32's accuracy; see there).
GRAM_RESTART = 3
#: Precisions of the Newton-Schulz products (the ``ns_dtype`` group key).
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def newton_schulz(x: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate polar factor ``U V^T`` of a 2-D ``x`` (a new fp32 tensor).

    ``x`` is first divided by its largest magnitude and then by its Frobenius norm (clamped below at
    ``eps``), so ``NS(c x) = NS(x)`` for ``c > 0`` up to rounding, and entries near ``1e19`` (whose squares
    overflow fp32, making the norm infinite and the result silently zero) are handled like any other; then
    ``steps`` iterations of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` run on the wide orientation
    (the Gram matrix is ``min(m, n)`` square). A zero ``x`` gives zero. The products are arranged to copy the large
    matrix once and, in fp32, to iterate on the small side when one side is at least twice the other
    (:func:`_iterate`, :func:`_gram_iterate`); the result equals the plain iteration to fp32 rounding.

    ``dtype`` is the precision of the iteration's products (``torch.float32``, or ``torch.bfloat16`` as in
    torch's Muon and Keller Jordan's reference): the normalisation is done in fp32 either way, the normalised
    matrix is rounded to ``dtype`` once and each product is rounded to it; the result is returned as fp32. In
    bf16 the result differs from fp32's by about 1e-2 relative (bf16's 8-bit mantissa), which Muon's step
    tolerates (its singular values are only brought into about [0.7, 1.2] anyway).

    Under an FSDP2 sharding (:func:`lowrank_optim.distributed.comm.sharded` with a split axis) ``x`` is this rank's
    chunk of the matrix and the result is its chunk of the whole matrix's iteration
    (:func:`lowrank_optim.distributed.newton_schulz.sharded_newton_schulz`: a Gram all-reduce per iteration, or
    one all-gather).
    """
    if x.dim() != 2:
        raise ValueError(f"Invalid grad: Newton-Schulz needs a 2-D tensor, got shape {tuple(x.shape)}")
    spec = comm.current()
    if spec is not None and spec.dim is not None:
        from ..distributed.newton_schulz import sharded_newton_schulz

        return sharded_newton_schulz(x, spec, steps, eps, coefficients, dtype)
    return _iterate(x, steps, eps, coefficients, dtype)


def batched_newton_schulz(x: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                          coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`newton_schulz` of each matrix of a ``(B, m, n)`` stack, as batched products (``baddbmm``): each
    matrix normalised by its own largest magnitude and Frobenius norm. Equal to :func:`newton_schulz` per matrix
    up to the batched kernels' rounding. Returns a new fp32 ``(B, m, n)`` tensor.

    Raises:
        ValueError: ``x`` is not 3-D.
    """
    if x.dim() != 3:
        raise ValueError(f"Invalid x: a stack of matrices is 3-D, got shape {tuple(x.shape)}")
    return _iterate(x, steps, eps, coefficients, dtype)


def _iterate(x: torch.Tensor, steps: int, eps: float, coefficients: tuple[float, float, float],
             dtype: torch.dtype) -> torch.Tensor:
    """The normalisation and iteration of :func:`newton_schulz` on a matrix or a ``(B, m, n)`` stack.

    Equal to the plain form (``X <- a X + (b A + c A^2) X``, ``A = X X^T`` on the wide orientation) to rounding,
    with no copy of the large matrix beyond the normalised one:

    * a tall ``x`` (``m > n``) iterates in its own orientation, ``X <- a X + X (b A + c A^2)^T`` with
      ``A = X^T X``: the transpose of the wide iteration of ``x^T``, with no transposed copy in or out;
    * the iterates ping-pong between two buffers (products written with ``out=``), the Gram matrix and the
      polynomial into two small ones;
    * fp32 products of a long matrix (long side >= :data:`GRAM_ASPECT` times the short): :func:`_gram_iterate`;
    * other fp32 products: each iteration is ``X <- M X`` with ``M = a I + b A + c A^2``, one product into a buffer,
      where ``baddbmm(X, ., X, beta=a)`` first copies ``X`` into its result; and the division by the Frobenius
      norm ``s`` is folded into the first iteration (``A = Z Z^T / s^2``, ``X_1 = (M / s) Z`` for
      ``Z = x / max|x|``: small matrices divided, not the large one). Products in a narrower ``dtype`` (bf16) keep
      ``a X`` out of the rounded ``M`` (its diagonal near 3.4 would lose about 4e-3 to bf16, doubling the
      iteration's distance from fp32) and the explicitly normalised input: ``baddbmm(X, ., ., beta=a, out=)``.
    """
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    dims = (-2, -1)
    # max |x| as max(max x, -min x): two read-only reductions, no |x| temporary (the inf-norm kernel is 5x slower)
    top = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
    z = x / top.clamp(min=torch.finfo(x.dtype).tiny)  # no device sync, no overflow of squares
    size = torch.linalg.vector_norm(z, dim=dims, keepdim=True).clamp_(min=eps)
    fold = torch.finfo(dtype).bits >= 32
    if not fold or steps < 1:
        z.div_(size)
    cur = z.to(dtype)
    if steps < 1:
        return cur.to(torch.float32)
    if fold and max(x.shape[-2:]) >= GRAM_ASPECT * min(x.shape[-2:]):
        return _gram_iterate(cur, size, steps, coefficients, tall)
    mm, add = (torch.bmm, torch.baddbmm) if x.dim() == 3 else (torch.mm, torch.addmm)
    side = int(x.shape[-1] if tall else x.shape[-2])
    small = (*x.shape[:-2], side, side)
    gram = torch.empty(small, dtype=dtype, device=x.device)
    poly = torch.empty(small, dtype=dtype, device=x.device)
    nxt = torch.empty(cur.shape, dtype=dtype, device=x.device)
    for i in range(steps):
        if tall:
            mm(cur.mT, cur, out=gram)
        else:
            mm(cur, cur.mT, out=gram)
        if fold and i == 0:
            gram.div_(size * size)  # the Gram matrix of x / (max|x| s)
        add(gram, gram, gram, beta=b, alpha=c, out=poly)
        if fold:
            poly.diagonal(dim1=-2, dim2=-1).add_(a)
            if i == 0:
                poly.div_(size)
            if tall:
                mm(cur, poly.mT, out=nxt)
            else:
                mm(poly, cur, out=nxt)
        elif tall:
            add(cur, cur, poly.mT, beta=a, out=nxt)
        else:
            add(cur, poly, cur, beta=a, out=nxt)
        # ping-pong: the previous iterate (ours: the normalised copy or a buffer) takes the next product
        cur, nxt = nxt, (cur if cur.is_contiguous() else torch.empty(cur.shape, dtype=dtype, device=x.device))
    return cur.to(torch.float32)


def _gram_iterate(z: torch.Tensor, size: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                  tall: bool) -> torch.Tensor:
    """:func:`_iterate`'s fp32 iteration carried on the small side (``s x s``, ``s = min(m, n)``, ``l = max(m, n)``):
    every iterate is ``X_k = L_k X_0`` (wide orientation; ``X_0 L_k^T`` for a tall matrix) with
    ``L_{k+1} = M_k L_k``, and ``X_k X_k^T = L_k G L_k^T`` for ``G = X_0 X_0^T``, so an iteration is four ``s x s``
    products instead of two ``s x s x l`` ones. ``X_k`` is formed again every :data:`GRAM_RESTART` iterations
    (its Gram recomputed, ``L`` reset to ``I``): without that, ``G``'s rounding is amplified by ``|L|^2`` (up to
    ``3.4^(2k)``) and an ill-conditioned input ends 1e-4 from the plain iteration; with it the result lies as close
    to the exact (fp64) iteration as the plain fp32 form (measured 2e-6 to 1e-5 relative for condition numbers 1 to
    1e6). Five iterations: ``4 s^2 l + 14 s^3`` multiply-adds instead of ``10 s^2 l + 5 s^3`` (half at
    ``l = 10 s``), chosen when ``l >= GRAM_ASPECT s``. ``z`` is ``x / max|x|`` and ``size`` its Frobenius norm,
    divided out of the Gram matrix and of the first ``L`` (:func:`_iterate`)."""
    a, b, c = coefficients
    mm, add = (torch.bmm, torch.baddbmm) if z.dim() == 3 else (torch.mm, torch.addmm)

    def gram(x: torch.Tensor) -> torch.Tensor:
        return mm(x.mT, x) if tall else mm(x, x.mT)

    def apply(x: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        return mm(x, left.mT) if tall else mm(left, x)

    g = gram(z).div_(size * size)
    left: torch.Tensor | None = None  # None: the identity
    scaled = False  # whether 1 / size has entered an applied L
    for k in range(steps):
        if left is not None and k % GRAM_RESTART == 0:
            if not scaled:
                left.div_(size)
                scaled = True
            z = apply(z, left)
            g, left = gram(z), None
        gk = g if left is None else mm(mm(left, g), left.mT)  # X_k X_k^T
        poly = add(gk, gk, gk, beta=b, alpha=c)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # M_k = a I + b A + c A^2
        left = poly if left is None else mm(poly, left)
    if not scaled:
        left.div_(size)
    return apply(z, left)


def whole_shape(param: torch.Tensor) -> tuple[int, ...]:
    """``param``'s shape; under an FSDP2 sharding (:func:`lowrank_optim.distributed.comm.sharded`), where ``param``
    holds this rank's rows, the whole parameter's (rows from its element count)."""
    shape = tuple(int(s) for s in param.shape)
    spec = comm.current()
    if spec is None:
        return shape
    return (spec.param_numel // max(math.prod(shape[1:]), 1), *shape[1:])


def lr_factor(mode: str, shape: tuple[int, ...] | torch.Size) -> float:
    """Muon's shape-dependent lr factor: ``"original"`` ``sqrt(max(1, rows / cols))`` (Jordan, torch's
    default), ``"match_rms_adamw"`` ``0.2 sqrt(max(rows, cols))`` (Moonlight), ``"none"`` 1."""
    rows, cols = int(shape[0]), int(shape[1])
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonRule(InnerRule):
    """``B <- mu B + g``; step ``lr * f(shape) * NS(g + mu B)`` (Nesterov) or ``NS(B)``.

    Momentum is kept as a plain sum (the paper's ``R <- beta R + g``); torch's Muon keeps the EMA
    ``B <- lerp(B, g, 1 - mu)``, which is ``(1 - mu)`` times ours, and Newton-Schulz normalises its input, so
    both give the same step. The lr factor ``f`` uses the *parameter's* shape, so a low-rank step
    ``P NS(R)`` and a full step ``NS(R)`` of the same matrix get the same factor. Newton-Schulz runs in fp32 by
    default (``ns_dtype="fp32"``: the trajectory is reproducible across devices and equal to a sharded run's to
    1e-5); ``ns_dtype="bf16"`` runs its products in bf16, as torch's Muon and Keller Jordan's reference do, which
    is 2-3x faster on GPUs and on CPUs with bf16 matrix units (AMX) and moves each step by about 1e-2 relative.

    Group keys: ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5), ``ns_eps`` (1e-7), ``ns_dtype``
    (``"fp32"`` or ``"bf16"``), ``muon_lr_adjust`` (``"original"``, ``"match_rms_adamw"`` or ``"none"``).
    """

    name = "muon"
    defaults: ClassVar[dict[str, Any]] = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_eps": 1e-7,
                                          "ns_dtype": "fp32", "muon_lr_adjust": "original"}

    def check_projector(self, projector: Projector, group: Group) -> None:
        """Newton-Schulz orthogonalises a matrix: ``entries`` gives a 1-D vector and ``blocks`` an empty tensor for
        an inactive block, so both are refused by name."""
        if projector.name in ("entries", "blocks"):
            raise ValueError(f"Invalid projector: {projector.name!r} with inner={self.name!r}: Newton-Schulz needs a "
                             "2-D low-rank matrix, and this projector gives a vector or an empty block; use "
                             "'svd', 'rsvd', 'columns', 'rows', 'random', 'dct' or 'gum'")

    def validate(self, group: Group) -> None:
        check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"Invalid nesterov: expected a bool, got {group['nesterov']!r}")
        check_int("ns_steps", group["ns_steps"], low=1)
        check_number("ns_eps", group["ns_eps"], low=0.0)
        if group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (expected one of {tuple(NS_DTYPES)})")
        if group["muon_lr_adjust"] not in LR_ADJUST:
            raise ValueError(f"Invalid muon_lr_adjust: {group['muon_lr_adjust']!r} (expected one of {LR_ADJUST})")

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        return [MomentSpec("momentum_buffer", tuple(shape), True)]

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        if grad.dim() != 2:
            raise ValueError(f"Invalid inner: 'muon' needs 2-D tensors, got shape {tuple(grad.shape)}; give "
                             "embeddings, norms and biases another rule with plain_inner='adam'")
        shape = whole_shape(param) if param.dim() == 2 else tuple(grad.shape)
        return self._step(grad, moments["momentum_buffer"], group, shape)

    def stack_direction(self, grads: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                        params: list[torch.Tensor]) -> Direction | None:
        """:meth:`direction` on a ``(B, ...)`` stack of same-shape low-rank gradients: the momentum arena updated
        in place and one :func:`batched_newton_schulz`; the lr factor of the stack's (same-shape) weights."""
        if grads.dim() != 3 or comm.current() is not None:
            return None
        shape = tuple(params[0].shape) if params[0].dim() == 2 else tuple(grads.shape[1:])
        return self._step(grads, moments["momentum_buffer"], group, shape)

    @staticmethod
    def _step(grad: torch.Tensor, buf: torch.Tensor, group: Group, shape: tuple[int, ...]) -> Direction:
        """The momentum update of ``buf`` in place and the orthogonalised step of a matrix ``(m, n)`` or a stack
        ``(B, m, n)`` (batched Newton-Schulz), with Muon's lr factor of the weights' ``shape``."""
        lr, mu = float(group["lr"]), group["momentum"]
        buf.mul_(mu).add_(grad)
        update = grad.add(buf, alpha=mu) if group["nesterov"] else buf
        ns = batched_newton_schulz if grad.dim() == 3 else newton_schulz
        ortho = ns(update, group["ns_steps"], group["ns_eps"], dtype=NS_DTYPES[group["ns_dtype"]])
        return Direction(ortho, None, lr * lr_factor(group["muon_lr_adjust"], shape), lr)


__all__ = ["GRAM_ASPECT", "GRAM_RESTART", "LR_ADJUST", "NS_COEFFICIENTS", "NS_DTYPES", "MuonRule",
           "batched_newton_schulz", "lr_factor", "newton_schulz", "whole_shape"]
