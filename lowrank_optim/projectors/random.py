"""Seeded random projections, regenerated on demand (Flora, Hao et al. 2024, arXiv:2402.03293).

The state holds ints only (side, rank, seed, refresh count); the basis is drawn again whenever it is needed
from a generator seeded with ``(seed, refresh)``. By default the generator lives on the parameter's device and
the basis is drawn there (no host-to-device copy in a step, as Flora's reference code does): the same checkpoint
decodes the same basis on every device of one type (every data-parallel rank), but a CUDA draw differs from a CPU
one. ``generator="cpu"`` draws on the CPU and moves the basis: the same basis on any device, at the cost of one
copy per matrix and step.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .._validation import check_choice, check_int
from ..linalg import robust
from .base import LEFT, Projector, ProjState, choose_side, derive_seed

DISTRIBUTIONS = ("gaussian", "orthonormal")
GENERATORS = ("device", "cpu")


def _draw(view: torch.Tensor, seed: int, device: torch.device) -> None:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    view.normal_(generator=gen)  # torch.randn's draw (randn is empty + normal_), in place


_POOL: ThreadPoolExecutor | None = None
_POOL_OWNER: tuple[int, int] = (0, 0)


def parallel_draws(draws: list[tuple[torch.Tensor, int]], device: torch.device) -> None:
    """Fills each ``view`` with the standard normal draw of a generator seeded with ``seed`` on ``device``.

    On the CPU a generator's draw runs on one core (its Mersenne Twister stream is sequential), so a stack's draws
    of independent generators are spread over :func:`torch.get_num_threads` Python threads (``normal_`` releases
    the GIL): the values are each generator's own, whatever the threads. On other devices, and while
    ``torch.profiler`` records (it sees the calling thread's ops only), the draws are queued one after another."""
    global _POOL, _POOL_OWNER
    workers = torch.get_num_threads()
    # under torch.profiler the draws stay on the calling thread, whose ops it records (op counts see every draw)
    if device.type != "cpu" or workers < 2 or len(draws) < 2 or torch._C._autograd._profiler_enabled():
        for view, seed in draws:
            _draw(view, seed, device)
        return
    if _POOL is None or (os.getpid(), workers) != _POOL_OWNER:  # a forked child has the pool but not its threads
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank_optim-draws")
        _POOL_OWNER = (os.getpid(), workers)
    for f in [_POOL.submit(_draw, view, seed, device) for view, seed in draws]:
        f.result()


class RandomProjector(Projector):
    """A random ``(d, r)`` basis per parameter and refresh, ``d`` the projected dimension.

    * ``"gaussian"`` (Flora): i.i.d. ``N(0, 1/r)`` entries, so ``E[P P^T] = I``. The basis is **not**
      orthonormal: ``project`` applies ``P^T`` (Flora's "down") and ``project_back`` applies ``P``
      (Flora's "up"), so ``project_back(project(X))`` is an unbiased but noisy estimate of ``X``, not
      a projection, and ``project(project_back(N)) = P^T P N != N``.
    * ``"orthonormal"``: the Q factor of a Gaussian matrix (signs fixed by ``diag(R) > 0``), so
      ``P^T P = I`` and ``project(project_back(N)) == N`` up to rounding.

    A refresh (:meth:`update`) only increments the refresh count: the next basis is a fresh draw.

    Args:
        rank: target rank (clamped to ``min(m, n)``).
        side: side rule.
        distribution: ``"gaussian"`` (default) or ``"orthonormal"``.
        cache_size: how many recently drawn bases to keep (outside the optimizer state, keyed by
            ``(seed, refresh, shape, device)``); 0 regenerates at every use, as Flora does. The default 2
            holds the old and new basis of a refresh and serves a matrix's projection and lift from one
            draw, so a step draws each matrix's basis once (it does not keep bases across steps: that
            would hold the ``d x r`` basis per matrix that Flora exists not to store).
        generator: ``"device"`` (default: a generator on the parameter's device, the draw made there) or
            ``"cpu"`` (drawn on the CPU and moved: the same basis on every device type).
    """

    name = "random"
    #: no stored basis: no quantized basis
    basis_dtypes = ("fp32",)
    lazy_refusal = ("its basis is a fresh seeded random draw every period, independent of the gradient, so "
                    "there is no subspace that could keep still")

    def __init__(self, rank: int, side: str = "std", *, distribution: str = "gaussian", cache_size: int = 2,
                 generator: str = "device") -> None:
        super().__init__(rank, side)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.generator = check_choice("generator", generator, GENERATORS)
        self.cache_size = check_int("cache_size", cache_size, low=0)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, side={self.side_rule!r}, "
                f"distribution={self.distribution!r}, generator={self.generator!r})")

    @property
    def orthonormal(self) -> bool:  # type: ignore[override]
        """True for ``"orthonormal"``; Flora's Gaussian basis is not (``P^T P != I``): ``G - P P^T G`` is then
        noise, not the complement of the subspace."""
        return self.distribution == "orthonormal"

    def init(self, grad: torch.Tensor, *, seed: int = 0) -> ProjState:
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side = choose_side(grad.shape, self.side_rule)
        rank = min(self.rank, int(grad.shape[0]), int(grad.shape[1]))
        return {"side": side, "rank": rank, "seed": int(seed), "refresh": 0,
                "dim": int(grad.shape[0] if side == LEFT else grad.shape[1])}

    def update(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        return new

    def basis(self, state: ProjState, device: torch.device | str = "cpu") -> torch.Tensor:
        """The fp32 ``(d, r)`` basis of ``state`` on ``device`` (drawn there, or on the CPU and moved with
        ``generator="cpu"``; module docstring)."""
        device = torch.device(device)
        key = (int(state["seed"]), int(state["refresh"]), int(state["dim"]), int(state["rank"]), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        d, r = key[2], key[3]
        if device.type == "meta":  # shapes only (memory estimates): no generator lives there
            return torch.empty(d, r, dtype=torch.float32, device=device)
        where = torch.device("cpu") if self.generator == "cpu" else device
        z = torch.empty(d, r, dtype=torch.float32, device=where)
        _draw(z, derive_seed(key[0], key[1]), where)  # torch.randn's values (randn is empty + normal_)
        if self.distribution == "gaussian":
            from ..rules.base import device_scalar  # here: the rules package imports the projectors

            p = z.div_(device_scalar(math.sqrt(r), where))
        else:
            q, rr = robust(lambda x: torch.linalg.qr(x, mode="reduced"), z, what="QR")
            p = q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0).to(dtype=q.dtype, device=q.device)
        if where != device:
            p = p.to(device)
        if self.cache_size:
            self._cache[key] = p
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return p

    def stack_basis_shape(self, state: ProjState) -> tuple[int, int] | None:
        """``(d, r)`` for a Gaussian basis, which :meth:`stack_basis` draws for a whole stack; ``None`` for the
        orthonormal one (its QR is per matrix: :meth:`batch_basis`)."""
        return (int(state["dim"]), int(state["rank"])) if self.distribution == "gaussian" else None

    def stack_basis(self, states: list[ProjState], device: torch.device) -> torch.Tensor:
        """The Gaussian bases of ``B`` matrices with one ``(d, r)`` shape as one fp32 ``(B, d, r)`` tensor on
        ``device``: each matrix's draw from its own generator of ``(seed, refresh)`` (so a basis does not depend on
        which matrices share its stack, and equals :meth:`basis`), written into the stack, one scaling for all.
        Not cached: a steady step draws each basis once."""
        from ..rules.base import device_scalar  # here: the rules package imports the projectors

        d, r = int(states[0]["dim"]), int(states[0]["rank"])
        if torch.device(device).type == "meta":  # shapes only (memory estimates)
            return torch.empty(len(states), d, r, dtype=torch.float32, device=device)
        where = torch.device("cpu") if self.generator == "cpu" else torch.device(device)
        out = torch.empty(len(states) * d, r, dtype=torch.float32, device=where)
        views = [out] if len(states) == 1 else out.split_with_sizes([d] * len(states))
        draws = [(view, derive_seed(int(st["seed"]), int(st["refresh"])))
                 for st, view in zip(states, views, strict=True)]
        parallel_draws(draws, where)
        out = out.view(len(states), d, r).div_(device_scalar(math.sqrt(r), where))
        return out if where == torch.device(device) else out.to(device)

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        """``P^T G`` or ``G P`` in fp32 (a gradient of another dtype is cast, as :meth:`Projector.project`)."""
        p = self.basis(state, grad.device)
        grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
        return p.T @ grad if state["side"] == LEFT else grad @ p

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        p = self.basis(state, low.device)
        low = low if low.dtype == p.dtype else low.to(p.dtype)
        return p @ low if state["side"] == LEFT else low @ p.T

    def back_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        return self.basis(state, device)

    def batch_basis(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        return self.basis(state, device)

    def orthonormal_basis(self, state: ProjState) -> bool:
        return self.distribution == "orthonormal"

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """No float data: the basis is regenerated from the seed."""
        return 0
