"""The projector contract shared by every subspace method.

A projector is a small stateless strategy object. Everything it must remember lives in a
dict of tensors and ints (the *projector state*) that the optimizer keeps in
``optimizer.state[p]["projector"]``, so ``state_dict()`` survives ``torch.load(weights_only=True)``.

Conventions, for a gradient ``G`` of shape ``(m, n)`` and rank ``r``:

* side ``LEFT`` (0): basis ``P`` is ``(m, r)``; ``project(G) = P^T G`` is ``(r, n)``;
  ``project_back(N) = P N``.
* side ``RIGHT`` (1): basis ``Q`` is ``(n, r)``; ``project(G) = G Q`` is ``(m, r)``;
  ``project_back(N) = N Q^T``.

The side is chosen once, from the shape and the side rule, and stored as an int; it is never guessed
back from a tensor's shape (galore-torch's ``reverse_std`` bug on square projections).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch

from .._validation import check_choice, check_int
from .lazy_refresh import LazyRefresh, subspace_overlap
from .quantized_basis import BASIS_DTYPES, decode_basis, encode_basis, is_encoded

LEFT = 0
RIGHT = 1
SIDE_RULES = ("std", "reverse_std", "left", "right")

ProjState = dict[str, Any]


def choose_side(shape: tuple[int, ...] | torch.Size, rule: str) -> int:
    """Returns ``LEFT`` or ``RIGHT`` for a 2-D shape under a side rule.

    ``"std"`` (GaLore's default) projects the smaller dimension away, so the low-rank tensor is
    ``max(m, n) x r``; ``"reverse_std"`` projects the larger one.
    """
    m, n = int(shape[0]), int(shape[1])
    if rule == "left":
        return LEFT
    if rule == "right":
        return RIGHT
    if rule == "std":
        return RIGHT if m >= n else LEFT
    if rule == "reverse_std":
        return LEFT if m >= n else RIGHT
    raise ValueError(f"Invalid proj_side: {rule!r} (expected one of {SIDE_RULES})")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical on every machine and device (no Python ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def cpu_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers: draws are device independent."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(*parts))
    return gen


class Projector:
    """Base class: subclasses implement :meth:`_basis` (and may override the rest).

    Two storage/schedule options apply to every projector that stores a basis (set them with
    :meth:`configure`, or through ``projector_options`` / :func:`make_projector`):

    * ``basis_dtype``: ``"fp32"`` (default), ``"bf16"``, ``"int8"`` or ``"int4"``, how the basis is kept in the
      state (:mod:`lowrank_optim.projectors.quantized_basis`); it is decoded to fp32 for every projection.
    * ``lazy_refresh``: skip scheduled refreshes of a matrix whose subspace keeps still
      (:mod:`lowrank_optim.projectors.lazy_refresh`), with ``lazy_threshold`` and ``lazy_max_multiple``.

    Subclasses customise :meth:`init_state` and :meth:`refresh` (or just :meth:`_basis`); the public
    :meth:`init` and :meth:`update` wrap them with the storage and the lazy schedule.

    Args:
        rank: target rank ``r``; clamped to ``min(m, n)`` per matrix.
        side: side rule, one of ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``.
    """

    name = "base"
    #: When True the engine passes ``moments={name: fp32 tensor}`` (low-rank moments before the
    #: refresh) to :meth:`update`, e.g. for COAP's correlation-aware correction.
    wants_moments = False
    #: Basis storage forms this projector accepts (``("fp32",)``: it stores no basis, or must keep it exact).
    basis_dtypes: ClassVar[tuple[str, ...]] = BASIS_DTYPES
    #: Whether :meth:`configure` accepts ``lazy_refresh`` (needs a stored basis to measure the overlap).
    supports_lazy: ClassVar[bool] = True

    def __init__(self, rank: int, side: str = "std") -> None:
        self.rank = check_int("rank", rank, low=1)
        self.side_rule = check_choice("proj_side", side, SIDE_RULES)
        self.basis_dtype = "fp32"
        self.lazy: LazyRefresh | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, side={self.side_rule!r})"

    def configure(self, *, basis_dtype: str = "fp32", lazy_refresh: bool = False, lazy_threshold: float = 0.5,
                  lazy_max_multiple: int = 8) -> Projector:
        """Sets the basis storage and the lazy refresh schedule; returns ``self``.

        Args:
            basis_dtype: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"int4"`` (blockwise absmax along columns).
            lazy_refresh: double the refresh period (up to ``lazy_max_multiple``) while the subspace overlap
                between consecutive refreshes stays at or above ``lazy_threshold``.
            lazy_threshold: overlap ``||P_old^T P_new||_F^2 / r`` counted as still (0.5).
            lazy_max_multiple: longest period in multiples of ``update_proj_gap`` (8).

        Raises:
            ValueError: an unknown ``basis_dtype``, a quantized basis or lazy refresh for a projector that
                stores no basis (``random``, ``dct``, selections) or cannot use it, bad schedule numbers.
            TypeError: wrong types.
        """
        check_choice("basis_dtype", basis_dtype, BASIS_DTYPES)
        if basis_dtype not in self.basis_dtypes:
            raise ValueError(f"Invalid basis_dtype: {basis_dtype!r} for projector {self.name!r} "
                             f"(it accepts {self.basis_dtypes})")
        if not isinstance(lazy_refresh, bool):
            raise TypeError(f"Invalid lazy_refresh: expected a bool, got {lazy_refresh!r}")
        lazy = LazyRefresh(lazy_threshold, lazy_max_multiple)
        if lazy_refresh and not self.supports_lazy:
            raise ValueError(f"Invalid lazy_refresh: True for projector {self.name!r}, which has no stored basis "
                             "whose overlap could be measured (or must refresh every period)")
        self.basis_dtype = basis_dtype
        self.lazy = lazy if lazy_refresh else None
        return self

    # -- contract -------------------------------------------------------------------------------
    def init(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        """Creates the projector state from the first gradient of a parameter (:meth:`init_state`, then the
        basis stored in ``basis_dtype`` and the lazy schedule started)."""
        state = self.init_state(grad, seed=seed, **context)
        if self.lazy is not None:
            LazyRefresh.start(state)
        return self._encode(state)

    def update(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        """Returns a refreshed state (the old one is not modified): :meth:`refresh`, or, under lazy refresh, the
        same state with its countdown lowered when this scheduled refresh is to be skipped.

        ``context`` carries ``moments`` when :attr:`wants_moments` is set.
        """
        if self.lazy is not None and LazyRefresh.skips(state):
            return LazyRefresh.skipped(state)
        new = self.refresh(grad, state, **context)
        if self.lazy is not None and "basis" in new and new["basis"] is not state.get("basis"):
            self.lazy.record(new, subspace_overlap(self.basis_of(state), self.basis_of(new)))
        return self._encode(new)

    def init_state(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        """Subclass hook of :meth:`init`: side, rank, seed, refresh count and the first fp32 basis."""
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side = choose_side(grad.shape, self.side_rule)
        rank = min(self.rank, int(grad.shape[0]), int(grad.shape[1]))
        state: ProjState = {"side": side, "rank": rank, "seed": int(seed), "refresh": 0}
        state["basis"] = self._basis(grad, state, previous=None)
        return state

    def refresh(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        """Subclass hook of :meth:`update`: a new state with a new fp32 basis (the old state untouched)."""
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        new["basis"] = self._basis(grad, new, previous=self.basis_of(state))
        return new

    def basis_of(self, state: ProjState) -> torch.Tensor:
        """The fp32 ``(d, r)`` basis of ``state``, decoded from its stored form."""
        return decode_basis(state)

    def _encode(self, state: ProjState) -> ProjState:
        """Stores a freshly computed fp32 basis in ``basis_dtype`` (a basis already stored is left alone)."""
        if self.basis_dtype != "fp32" and "basis" in state and not is_encoded(state):
            state.update(encode_basis(state["basis"], self.basis_dtype))
        return state

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a full ``(m, n)`` tensor into the subspace."""
        basis = self.basis_of(state)
        if state["side"] == LEFT:
            return basis.T @ grad
        return grad @ basis

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a low-rank tensor back to the full ``(m, n)`` space."""
        basis = self.basis_of(state)
        if state["side"] == LEFT:
            return basis @ low
        return low @ basis.T

    def back_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The ``(d, r)`` matrix ``B`` with ``project_back(N) = B N`` (left) or ``N B^T`` (right), or ``None``
        when the map back is not a matrix product (selections, blocks). A subclass that overrides
        :meth:`project_back` gets ``None`` unless it overrides this too."""
        if type(self).project_back is not Projector.project_back:
            return None
        return self.basis_of(state)

    def add_back(self, target: torch.Tensor, low: torch.Tensor, state: ProjState, alpha: float) -> None:
        """``target += alpha * project_back(low)``; one ``addmm_`` (no full-size temporary) when the map back
        is a matrix product of ``target``'s dtype."""
        b = self.back_matrix(state, target.device)
        if b is None or b.dtype != target.dtype or low.dtype != target.dtype:
            target.add_(self.project_back(low, state), alpha=alpha)
        elif state["side"] == LEFT:
            target.addmm_(b, low, alpha=alpha)
        else:
            target.addmm_(low, b.T, alpha=alpha)

    def residual(self, grad: torch.Tensor, low: torch.Tensor, state: ProjState, alpha: float = 1.0) -> torch.Tensor:
        """``G - alpha * project_back(low)`` as a new contiguous tensor: ``low`` is lifted straight into a copy
        of ``G`` (:meth:`add_back`), one full-size buffer in all."""
        out = grad.clone(memory_format=torch.contiguous_format)
        self.add_back(out, low, state, -alpha)
        return out

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        """Shape of ``project(G)`` for a gradient of ``shape`` (no tensor needed).

        Selection projectors whose size depends on the state (e.g. FRUGAL's active blocks) override it.
        """
        m, n = int(shape[0]), int(shape[1])
        r = min(self.rank, m, n)
        return (r, n) if choose_side(shape, self.side_rule) == LEFT else (m, r)

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Elements of float data the projector state holds (closed form, for memory estimates)."""
        m, n = int(shape[0]), int(shape[1])
        r = min(self.rank, m, n)
        return (m if choose_side(shape, self.side_rule) == LEFT else n) * r

    # -- subclass hook --------------------------------------------------------------------------
    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def oriented(grad: torch.Tensor, side: int) -> torch.Tensor:
    """The matrix whose *left* singular vectors are the basis for ``side`` (``G`` or ``G^T``), fp32."""
    g = grad.float()
    return g if side == LEFT else g.T
