"""DCT column selection (Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for LLMs" /
"FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs", arXiv:2505.17967).

The subspace is spanned by ``r`` vectors of a *fixed* orthonormal basis, the DCT-II cosines of the projected
dimension ``d``: ``q_k[j] = s_k cos(pi k (2j + 1) / (2d))`` with ``s_0 = sqrt(1/d)`` and ``s_k = sqrt(2/d)``.
Stacked as rows they form the orthonormal DCT-II matrix ``C`` (``C x == scipy.fft.dct(x, norm="ortho")``);
the basis *columns* are ``Q = C^T``. On every refresh each column is scored by its alignment with the
gradient and the ``r`` best are kept, sorted ascending; the projector state holds only their int64 indices.

Two paths compute the scores ``S = G Q`` (right side) or ``Q^T G`` (left side), i.e. a DCT-II along the
projected dimension:

* ``"dense"``: a matrix product with ``C`` (built once per ``(size, dtype, device)`` and cached outside the
  optimizer state);
* ``"fft"``: Makhoul's method (Makhoul 1980): reorder the sequence (even samples ascending, odd samples
  descending), take a real FFT, rotate by ``exp(-i pi k / (2d))`` and keep the real part. No ``d x d``
  matrix is ever built on this path: back-projection uses the ``r`` selected cosines from the closed form.

Differences from the reference ``DCTAdamW`` (IST-DASLab), all deliberate:

* one basis for both paths (the reference's ``matmul`` mode scores the columns of ``C``, its ``makhoul``
  mode the columns of ``C^T``: two different bases), so the two paths select the same columns;
* one basis per distinct projected size, not one ``d_model`` matrix for the whole model;
* indices are sorted, so without a transfer policy the moment columns keep a stable order;
* ties in the score are broken towards the lower index (stable sort), so selection is deterministic;
* the FFT runs in fp32 whatever the gradient dtype (the reference's cast is commented out);
* the default score is ``"l2"``: the top-``r`` columns by l2 norm capture the most gradient energy
  ``||G Q_sel||_F^2`` of any ``r`` basis columns (the reference defaults to l1; the ``DCTAdamW`` preset
  follows the reference).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import check_choice
from .base import LEFT, Projector, ProjState, choose_side, no_gradient

DCT_PATHS = ("auto", "dense", "fft")
DCT_SCORES = ("l2", "l1")
#: ``path="auto"`` uses the FFT for projected dimensions at least this large, the dense product below
#: (a rough single-thread CPU check with 1376 rows put the crossover between d = 512 and d = 1024).
AUTO_FFT_MIN_SIZE = 1024

_MATRICES: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}
_TWIDDLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def dct_rows(indices: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``indices`` of the orthonormal DCT-II matrix of ``size`` (``(len(indices), size)``), on their device.

    Computed in float64 from the closed form (the cosine's argument reduced exactly in integers), then
    cast: entries are correctly rounded to ``dtype`` up to float64 error. (MPS has no float64: built on
    the CPU there.)
    """
    device = indices.device
    work = torch.device("cpu") if device.type == "mps" else device
    k = indices.detach().to(device=work, dtype=torch.int64).reshape(-1, 1)
    j = torch.arange(size, dtype=torch.int64, device=work).reshape(1, -1)
    phase = (k * (2 * j + 1)) % (4 * size)  # cos(pi * phase / (2 size)) has period 4 size in phase
    rows = torch.cos(phase.to(torch.float64) * (math.pi / (2 * size)))
    scale = torch.full(k.shape, math.sqrt(2.0 / size), dtype=torch.float64, device=work)
    scale[k == 0] = math.sqrt(1.0 / size)
    return (rows * scale).to(device=device, dtype=dtype)


def dct_matrix(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C`` (``C @ x == scipy.fft.dct(x, norm="ortho")``), cached.

    The cache is keyed by ``(size, dtype, device)`` and lives outside every optimizer state; use
    :func:`clear_dct_cache` to free it. Do not modify the returned tensor.
    """
    device = torch.device(device)
    key = (int(size), dtype, str(device))
    mat = _MATRICES.get(key)
    if mat is None:
        mat = dct_rows(torch.arange(size, dtype=torch.int64, device="cpu"), size,
                       torch.float64).to(device=device, dtype=dtype)
        _MATRICES[key] = mat
    return mat


def clear_dct_cache() -> None:
    """Frees every cached DCT matrix and FFT twiddle table."""
    _MATRICES.clear()
    _TWIDDLES.clear()


def _twiddles(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reorder permutation, cos, sin, ortho scale) for Makhoul's DCT-II of length ``size``, cached per device."""
    key = (int(size), str(device))
    tw = _TWIDDLES.get(key)
    if tw is None:
        perm = torch.cat([torch.arange(0, size, 2, dtype=torch.int64, device="cpu"),
                          torch.arange(1, size, 2, dtype=torch.int64, device="cpu").flip(0)])
        theta = torch.arange(size, dtype=torch.float64, device="cpu") * (math.pi / (2 * size))
        scale = torch.full((size,), math.sqrt(2.0 / size), dtype=torch.float64, device="cpu")
        scale[0] = math.sqrt(1.0 / size)
        tw = (perm.to(device), torch.cos(theta).to(device=device, dtype=torch.float32),
              torch.sin(theta).to(device=device, dtype=torch.float32), scale.to(device=device, dtype=torch.float32))
        _TWIDDLES[key] = tw
    return tw


def dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension by Makhoul's method (one real FFT), in fp32.

    ``dct_fft(x) == x @ dct_matrix(x.shape[-1]).T == scipy.fft.dct(x, norm="ortho")`` up to rounding.
    """
    x = x.float()
    size = x.shape[-1]
    perm, cos, sin, scale = _twiddles(size, x.device)
    spec = torch.fft.rfft(x.index_select(-1, perm), dim=-1)
    # Full spectrum of a real sequence: V[size - k] = conj(V[k]); only the real rotation is needed.
    tail = spec[..., 1:size - size // 2].flip(-1)
    re = torch.cat([spec.real, tail.real], dim=-1)
    im = torch.cat([spec.imag, -tail.imag], dim=-1)
    return (re * cos + im * sin) * scale


class DCTProjector(Projector):
    """Top-``r`` columns of the DCT-II basis by alignment with the gradient; state = int64 indices.

    Args:
        rank: number of basis columns kept (clamped to the projected dimension).
        side: side rule (``"std"`` projects the smaller dimension).
        score: ``"l2"`` (default; maximises the captured energy) or ``"l1"`` (the reference's default)
            norm of each column's coefficients over the other dimension.
        path: ``"dense"`` (matrix product with the cached DCT matrix), ``"fft"`` (Makhoul's method; no
            ``d x d`` matrix) or ``"auto"`` (FFT when the projected dimension is at least
            :data:`AUTO_FFT_MIN_SIZE`, else dense).

    The state is ``{"side", "rank", "seed", "refresh", "dim"}`` (ints; ``dim`` is the projected size) and
    ``"indices"`` (int64, ``(r,)``, ascending). ``project`` is ``G Q[:, idx]`` (dense: gather of cached
    columns then a thin product; fft: full transform then index-select); ``project_back`` multiplies by the
    ``r`` selected cosines.
    """

    name = "dct"
    orthonormal = True  # columns of the orthonormal DCT-II matrix
    dominant = True
    indexed = True
    #: indices, no stored basis: no quantized basis (lazy refresh measures the overlap on the indices)
    basis_dtypes = ("fp32",)

    def __init__(self, rank: int, side: str = "std", *, score: str = "l2", path: str = "auto") -> None:
        super().__init__(rank, side)
        self.score = check_choice("score", score, DCT_SCORES)
        self.path = check_choice("path", path, DCT_PATHS)

    def __repr__(self) -> str:
        return f"DCTProjector(rank={self.rank}, side={self.side_rule!r}, score={self.score!r}, path={self.path!r})"

    # -- helpers ----------------------------------------------------------------------------------
    def resolved_path(self, size: int) -> str:
        """``"dense"`` or ``"fft"``: the path used for a projected dimension of ``size``."""
        if self.path != "auto":
            return self.path
        return "fft" if size >= AUTO_FFT_MIN_SIZE else "dense"

    @staticmethod
    def _rows_first(grad: torch.Tensor, side: int) -> torch.Tensor:
        """The gradient with the projected dimension last, in fp32: ``G`` (right) or ``G^T`` (left)."""
        g = grad.float()
        return g.T if side == LEFT else g

    def _transform(self, grad: torch.Tensor, side: int) -> torch.Tensor:
        """All DCT coefficients along the projected dimension, ``(other, d)`` (``G Q`` or ``(Q^T G)^T``)."""
        a = self._rows_first(grad, side)
        d = a.shape[-1]
        if self.resolved_path(d) == "fft":
            return dct_fft(a)
        return a @ dct_matrix(d, torch.float32, a.device).T

    def _selected(self, state: ProjState, size: int, device: torch.device) -> torch.Tensor:
        """The selected cosines as rows, ``(r, d)`` fp32 (gathered from the cache, or from the closed form)."""
        idx = state["indices"].to(device)
        if self.resolved_path(size) == "fft":
            return dct_rows(idx, size)
        return dct_matrix(size, torch.float32, device).index_select(0, idx)

    def select(self, grad: torch.Tensor, side: int, rank: int) -> torch.Tensor:
        """Indices (int64, ascending) of the ``rank`` basis columns best aligned with ``grad``."""
        coef = self._transform(grad, side)
        scores = coef.abs().sum(0) if self.score == "l1" else coef.square().sum(0)
        order = torch.sort(scores, descending=True, stable=True).indices[:rank]
        return torch.sort(order).values.to(torch.int64)

    def index_bound(self, shape: tuple[int, ...] | torch.Size, state: ProjState) -> int:
        """The selected columns index the DCT basis of the projected axis: ``m`` on the left side, ``n`` on the
        right."""
        return int(shape[0] if int(state["side"]) == LEFT else shape[1])

    def dense_basis(self, state: ProjState, device: torch.device | str = "cpu") -> torch.Tensor:
        """The selected basis columns as a ``(d, r)`` fp32 matrix (for tests and diagnostics; never stored)."""
        return self._selected(state, int(state["dim"]), torch.device(device)).T.contiguous()

    # -- contract ---------------------------------------------------------------------------------
    def init_state(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side = choose_side(grad.shape, self.side_rule)
        rank = min(self.rank, int(grad.shape[0]), int(grad.shape[1]))
        dim = int(grad.shape[0] if side == LEFT else grad.shape[1])
        return {"side": side, "rank": rank, "seed": int(seed), "refresh": 0, "dim": dim,
                "indices": self.select(grad, side, rank)}

    def refresh(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        if not no_gradient(grad):  # a zero gradient ranks every column alike: keep the selection
            new["indices"] = self.select(grad, int(state["side"]), int(state["rank"]))
        return new

    def overlap(self, old: ProjState, new: ProjState) -> float:
        """Fraction of the new selection's columns that the old one held: ``||Q_old^T Q_new||_F^2 / r`` exactly,
        since the DCT columns are orthonormal (lazy refresh's measure)."""
        r = int(new["indices"].numel())
        if r == 0:
            return 1.0
        kept = torch.isin(new["indices"], old["indices"].to(new["indices"].device))
        return int(kept.sum()) / r

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        side = state["side"]
        a = self._rows_first(grad, side)
        d = a.shape[-1]
        if self.resolved_path(d) == "fft":
            low = dct_fft(a).index_select(-1, state["indices"].to(a.device))
        else:
            low = a @ self._selected(state, d, a.device).T
        return low.T.contiguous() if side == LEFT else low

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        side = state["side"]
        rows = self._selected(state, int(state["dim"]), low.device)
        low = low.float()
        return rows.T @ low if side == LEFT else low @ rows

    def back_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        return self._selected(state, int(state["dim"]), device).T

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Zero: the state holds ``r`` int64 indices and ints, no float basis."""
        return 0
