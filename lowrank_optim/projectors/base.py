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

Sign convention of bases computed by a decomposition (``sign`` option of ``svd``, ``rsvd``, ``rsvd_heads``,
``coap``, ``gum``, ``online_pca``'s first basis): a singular vector is only defined up to its sign, and LAPACK's
choice depends on the algorithm, the library and rounding. With moments kept across a refresh (GaLore's
``keep``) a flipped column negates the first moment's coordinate, so the sign is part of the trajectory.

* ``"canonical"``: :func:`canonical_signs`, a function of the basis alone (the first entry of largest
  magnitude of each column is positive), so an SVD, an eigendecomposition of an all-reduced Gram matrix
  and a randomized SVD of the same subspace give the same basis;
* ``"align"`` (default): canonical for a new basis; on a refresh each column takes the sign that makes
  it agree with the previous basis's column (:func:`aligned_signs`), which is what kept moments assume;
  a column nearly orthogonal to its predecessor (``|cos| < ALIGN_MIN_COSINE``) stays canonical;
* ``"raw"``: whatever the decomposition returned (galore-torch's convention; for parity tests).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, ClassVar

import torch

from .._validation import check_choice, check_int
from ..linalg import DecompositionError
from .lazy_refresh import LazyRefresh, subspace_overlap
from .quantized_basis import BASIS_DTYPES, decode_basis, encode_basis, is_encoded, residual_floor

LEFT = 0
RIGHT = 1
SIDE_RULES = ("std", "reverse_std", "left", "right")
SIGN_RULES = ("align", "canonical", "raw")
#: Entries within this relative distance of a column's largest magnitude count as tied for the
#: canonical sign (the first of them decides), so rounding differences between decompositions
#: (~1e-6 relative in fp32) do not move the pivot of an exactly tied column.
SIGN_TIE_RTOL = 1e-4
#: ``"align"`` follows the previous column only when ``|cos(new, old)|`` is at least this; below it the
#: old coordinate says nothing about the new one and the canonical sign is kept.
ALIGN_MIN_COSINE = 1e-3

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


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` (``(d, r)``) with each column multiplied by +-1 so that its pivot is positive.

    The pivot is the first entry (lowest row index) whose magnitude is within :data:`SIGN_TIE_RTOL` of the
    column's largest magnitude. The rule depends on the column alone, so ``canonical_signs(B D) ==
    canonical_signs(B)`` exactly for any diagonal sign matrix ``D`` (a multiplication by -1 is exact). A
    zero column is left as it is. Returns a new tensor of ``basis``'s dtype.
    """
    if basis.dim() != 2 or basis.numel() == 0:
        return basis.clone()
    mag = basis.abs()
    peak = mag.amax(dim=0, keepdim=True)
    tied = mag >= peak * (1.0 - SIGN_TIE_RTOL)
    pivot_row = tied.to(torch.uint8).argmax(dim=0, keepdim=True)  # first True of each column
    pivot = basis.gather(0, pivot_row)
    return basis * torch.where(pivot < 0, -1.0, 1.0).to(dtype=basis.dtype)


def aligned_signs(basis: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``basis`` with each column's sign chosen to agree with the same column of ``previous``.

    A column whose cosine with its predecessor is below :data:`ALIGN_MIN_COSINE` in magnitude (or every
    column, when ``previous`` is ``None`` or of another shape) gets :func:`canonical_signs`'s sign.
    """
    canon = canonical_signs(basis)
    if previous is None or tuple(previous.shape) != tuple(basis.shape) or basis.numel() == 0:
        return canon
    prev = previous.to(device=basis.device, dtype=torch.float32)
    cur = canon.float()
    dots = (cur * prev).sum(dim=0)
    norms = cur.norm(dim=0) * prev.norm(dim=0)
    flip = (dots < 0) & (dots.abs() >= ALIGN_MIN_COSINE * norms)
    return canon * torch.where(flip, -1.0, 1.0).to(dtype=basis.dtype)


def apply_sign_rule(rule: str | None, basis: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``basis`` under a sign rule of :data:`SIGN_RULES` (``None`` or ``"raw"``: unchanged)."""
    if rule == "canonical":
        return canonical_signs(basis)
    if rule == "align":
        return aligned_signs(basis, previous)
    return basis


def cpu_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers: draws are device independent."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(*parts))
    return gen



def no_gradient(grad: torch.Tensor) -> bool:
    """Whether a refresh sees an all-zero gradient (an MoE expert that got no tokens, a masked or skipped layer, a
    zeroed but not freed ``.grad``): its decomposition is arbitrary (any ``r`` orthonormal vectors are a top-``r``
    basis of 0), so a refresh keeps the current subspace instead, as the first step defers it
    (:data:`lowrank_optim.update.PENDING`). One host read, on refresh steps only; ``False`` on the meta device."""
    return grad.device.type != "meta" and not bool(grad.any())

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
    #: Whether the basis has orthonormal columns (``P^T P = I``), so that ``project_back(project(G))`` is
    #: the orthogonal projection of ``G`` onto the subspace and ``G - project_back(project(G))`` its
    #: complement. Residual rules that take that complement (FRUGAL's state-free part, Fira, GaLore+'s
    #: sparse residual) are refused at construction with a projector that says False. Conservative
    #: default: a projector must declare it.
    orthonormal: bool = False
    #: Whether the subspace is chosen from the gradient as its dominant part (top singular vectors, top-energy
    #: DCT components, a tracked principal subspace), so the kept part carries most of each slice's norm. Rules
    #: that read a full slice's scaling off the kept part (Fira's ``phi = ||psi(R)|| / ||R||``) need it: with
    #: random coordinates or a random basis ``||R||`` of a slice can be near 0 and ``phi`` unbounded.
    dominant: bool = False
    #: Whether ``G - project_back(project(G))`` is computed without rounding (coordinate selections, whole
    #: blocks): then no complement is mistaken for rounding noise (:meth:`complement_floor` is 0).
    exact_complement: bool = False
    #: Whether ``project`` / ``project_back`` are the matrix products with :meth:`basis_matrix` (``B^T G`` and
    #: ``B N`` on the left, ``G B`` and ``N B^T`` on the right): what the ``linear`` transfer needs.
    matrix_map: bool = True
    #: Whether :meth:`low_shape` depends on the shape only (not on the state): what the ``keep``, ``linear``
    #: and ``match`` transfers need (FRUGAL's blocks and GUM's full-rank branch change it on a refresh).
    fixed_low_shape: bool = True
    #: Whether the state holds ``indices`` of the selected basis columns / coordinates (what ``match`` needs).
    indexed: bool = False
    #: Sign rule of a basis computed by a decomposition (:data:`SIGN_RULES`); ``None``: the projector has no
    #: sign freedom (selections, fixed or seeded bases).
    sign_rule: str | None = None
    #: Basis storage forms this projector accepts (``("fp32",)``: it stores no basis, or must keep it exact).
    basis_dtypes: ClassVar[tuple[str, ...]] = BASIS_DTYPES
    #: ``None`` when :meth:`configure` accepts ``lazy_refresh``; otherwise why not, for the error message (a
    #: refresh that is a draw rather than a recomputation from the gradient, or that other matrices depend on).
    lazy_refusal: ClassVar[str | None] = None
    #: ``None`` when the group key ``refresh_stagger`` works with this projector; otherwise why not (a refresh that
    #: draws across the group's matrices at once, which per-matrix phases would split over two periods).
    stagger_refusal: ClassVar[str | None] = None
    #: Ints of the state that depend on the matrix's shape and that a refresh may still change for the same shape
    #: (FRUGAL's blocks: ``rank``, ``min(m, n)`` or 0): a loaded checkpoint's values of these are not compared
    #: with a first step's (:func:`lowrank_optim.checkpoint.refuse_misfit_state`).
    varying_ints: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, rank: int, side: str = "std") -> None:
        self.rank = check_int("rank", rank, low=1)
        self.side_rule = check_choice("proj_side", side, SIDE_RULES)
        self.basis_dtype = "fp32"
        self.lazy: LazyRefresh | None = None

    def __repr__(self) -> str:
        sign = "" if self.sign_rule is None else f", sign={self.sign_rule!r}"
        return f"{type(self).__name__}(rank={self.rank}, side={self.side_rule!r}{sign})"

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
            ValueError: an unknown ``basis_dtype``; a quantized basis for a projector that stores no basis
                (``random``, ``dct``, selections) or must keep it exact (``online_pca``); lazy refresh for a
                projector that refuses it (:attr:`lazy_refusal`: ``gum``, ``random``, coordinate selections,
                ``blocks``); bad schedule numbers.
            TypeError: wrong types.
        """
        check_choice("basis_dtype", basis_dtype, BASIS_DTYPES)
        if basis_dtype not in self.basis_dtypes:
            raise ValueError(f"Invalid basis_dtype: {basis_dtype!r} for projector {self.name!r} "
                             f"(it accepts {self.basis_dtypes})")
        if not isinstance(lazy_refresh, bool):
            raise TypeError(f"Invalid lazy_refresh: expected a bool, got {lazy_refresh!r}")
        lazy = LazyRefresh(lazy_threshold, lazy_max_multiple)
        if lazy_refresh and self.lazy_refusal is not None:
            raise ValueError(f"Invalid lazy_refresh: True for projector {self.name!r}: {self.lazy_refusal}")
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
        if self.lazy is not None and not ("basis" in new and new["basis"] is state.get("basis")):
            self.lazy.record(new, self.overlap(state, new))  # (a failed decomposition kept the basis: no record)
        return self._encode(new)

    def overlap(self, old: ProjState, new: ProjState) -> float:
        """How much of the old subspace the new one keeps, in ``[0, 1]``: :func:`subspace_overlap` of the two
        decoded bases (1: same subspace; about ``r / d`` for unrelated ones). Lazy refresh's measure."""
        return subspace_overlap(self.basis_of(old), self.basis_of(new))

    def init_state(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        """Subclass hook of :meth:`init`: side, rank, seed, refresh count and the first fp32 basis."""
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side = choose_side(grad.shape, self.side_rule)
        rank = min(self.rank, int(grad.shape[0]), int(grad.shape[1]))
        state: ProjState = {"side": side, "rank": rank, "seed": int(seed), "refresh": 0}
        state["basis"] = self.fresh_basis(grad, state, None)
        return state

    def refresh(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        """Subclass hook of :meth:`update`: a new state with a new fp32 basis (the old state untouched). An
        all-zero gradient (:func:`no_gradient`) keeps the current basis as stored."""
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        if not no_gradient(grad):
            new["basis"] = self.fresh_basis(grad, new, self.basis_of(state))
        return new

    def signed(self, basis: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """A freshly decomposed ``basis`` under :attr:`sign_rule` (``previous``: the basis it replaces)."""
        return apply_sign_rule(self.sign_rule, basis, previous)

    def fresh_basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_basis` under the sign rule; when the decomposition fails on every path
        (:class:`~lowrank_optim.linalg.DecompositionError`) the previous basis is kept (at the first basis:
        the first ``r`` coordinate vectors), with a ``RuntimeWarning``."""
        try:
            basis = self._basis(grad, state, previous=previous)
        except DecompositionError as err:
            dim = int(grad.shape[0] if state["side"] == LEFT else grad.shape[1])
            return fallback_basis(previous, dim, int(state["rank"]), grad.device, str(err))
        return self.signed(basis, previous)

    def basis_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The ``(d, r)`` matrix ``B`` with ``project(G) = B^T G`` (left) or ``G B`` (right), or ``None`` when
        ``project`` is not such a product (:attr:`matrix_map` False). Default: :meth:`back_matrix`."""
        return self.back_matrix(state, device) if self.matrix_map else None

    def basis_of(self, state: ProjState) -> torch.Tensor:
        """The fp32 ``(d, r)`` basis of ``state``, decoded from its stored form."""
        return decode_basis(state)

    def _encode(self, state: ProjState) -> ProjState:
        """Stores a freshly computed fp32 basis in ``basis_dtype`` (a basis already stored is left alone)."""
        if self.basis_dtype != "fp32" and "basis" in state and not is_encoded(state):
            state.update(encode_basis(state["basis"], self.basis_dtype))
        return state

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a full ``(m, n)`` tensor into the subspace, in the basis' dtype (fp32: a bf16 / fp16 / fp64
        gradient is cast first, as the optimizers cast every gradient)."""
        basis = self.basis_of(state)
        grad = grad if grad.dtype == basis.dtype else grad.to(basis.dtype)
        if state["side"] == LEFT:
            return basis.T @ grad
        return grad @ basis

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a low-rank tensor back to the full ``(m, n)`` space, in the basis' dtype (``low`` cast first)."""
        basis = self.basis_of(state)
        low = low if low.dtype == basis.dtype else low.to(basis.dtype)
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

    def batch_basis(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The fp32 ``(d, r)`` matrix ``B`` with ``project(G) = B^T G`` (left) or ``G B`` (right) and the matching
        ``project_back``, or ``None`` when the projector's maps are not these products. The engine's batched
        step (:mod:`lowrank_optim.stacks`) steps only matrices whose projector gives one; the rest take the
        per-matrix path. A subclass that overrides :meth:`project` or :meth:`project_back` gets ``None``
        unless it overrides this too."""
        cls = type(self)
        if cls.project is not Projector.project or cls.project_back is not Projector.project_back:
            return None
        basis = state.get("basis")
        return basis if isinstance(basis, torch.Tensor) and basis.dim() == 2 else None

    def batch_weights(self, state: ProjState) -> tuple[float, float]:
        """``(w_in, w_out)``: with :meth:`batch_basis` ``B``, ``project(G) = w_in B^T G`` (left; ``w_in G B`` right)
        and ``project_back(X) = w_out B X`` (``w_out X B^T``). ``(1.0, 1.0)`` by default; GUM's debiasing weights
        otherwise."""
        return 1.0, 1.0

    def stack_basis_shape(self, state: ProjState) -> tuple[int, int] | None:
        """``(d, r)`` when the projector draws a whole stack's bases at once (:meth:`stack_basis`, a seeded random
        basis regenerated every step); ``None`` (default): the batched step reads :meth:`batch_basis` per matrix."""
        return None

    def stack_basis(self, states: list[ProjState], device: torch.device) -> torch.Tensor:
        """The ``(B, d, r)`` bases of ``states`` (all of one :meth:`stack_basis_shape`), equal to
        :meth:`batch_basis` of each; only called when :meth:`stack_basis_shape` is not ``None``."""
        raise NotImplementedError

    def orthonormal_basis(self, state: ProjState) -> bool:
        """Whether :meth:`batch_basis` has orthonormal columns (``B^T B = I`` to rounding), which closed forms of
        residual norms need (Fira). Default False; exact and randomized SVD bases say True."""
        return False

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
        of ``G`` (:meth:`add_back`), one full-size buffer in all.

        A complement at or below the basis's rounding floor (:meth:`complement_floor`: ``||E|| <= tau ||G||``)
        is returned as zeros. It is rounding error, not gradient: when the gradient's rank is at most ``r``
        (few tokens in a batch, a rank-deficient layer) the true complement is 0, and scale-invariant rules
        (sign in FRUGAL, Newton-Schulz in GUM, Adam's first steps) would turn that noise into full-size steps.
        The test is a device-side mask: no host read.
        """
        out = grad.clone(memory_format=torch.contiguous_format)
        self.add_back(out, low, state, -alpha)
        tau = self.complement_floor(state)
        if tau > 0 and out.numel():
            above = torch.linalg.vector_norm(out) > tau * torch.linalg.vector_norm(grad)
            out.mul_(above)
        return out

    def complement_floor(self, state: ProjState) -> float:
        """Relative size ``tau`` below which a computed complement is rounding error
        (:data:`~lowrank_optim.projectors.quantized_basis.RESIDUAL_FLOORS`, by the stored basis form); 0 for
        projectors whose complement is exact (coordinate selections, whole blocks)."""
        return 0.0 if self.exact_complement else residual_floor(state)

    def low_shape(self, shape: tuple[int, ...] | torch.Size, state: ProjState | None = None) -> tuple[int, ...]:
        """Shape of ``project(G)`` for a gradient of ``shape`` (no tensor needed).

        Selection projectors whose size depends on the state (e.g. FRUGAL's active blocks) override it.
        """
        m, n = int(shape[0]), int(shape[1])
        r = min(self.rank, m, n)
        return (r, n) if choose_side(shape, self.side_rule) == LEFT else (m, r)

    def index_bound(self, shape: tuple[int, ...] | torch.Size, state: ProjState) -> int:
        """Exclusive upper bound of every entry of the index tensors (int16 / int32 / int64) in ``state`` for a matrix
        of ``shape`` ``(m, n)``: ``m * n`` (flat entries) unless a projector's indices address a shorter axis.
        A checkpoint's indices outside ``[0, bound)`` are refused at load
        (:func:`lowrank_optim.checkpoint.refuse_misfit_state`)."""
        return int(shape[0]) * int(shape[1])

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Elements of float data the projector state holds (closed form, for memory estimates)."""
        m, n = int(shape[0]), int(shape[1])
        r = min(self.rank, m, n)
        return (m if choose_side(shape, self.side_rule) == LEFT else n) * r

    # -- subclass hook --------------------------------------------------------------------------
    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def fallback_basis(previous: torch.Tensor | None, dim: int, rank: int, device: torch.device,
                   reason: str) -> torch.Tensor:
    """The basis a projector keeps when no decomposition succeeded: ``previous``, or the first ``rank``
    columns of the ``dim x dim`` identity when there is none (fp32), with a ``RuntimeWarning`` naming ``reason``."""
    kept = "keeping the previous basis" if previous is not None else "using the first coordinate vectors"
    warnings.warn(f"lowrank_optim: {reason}; {kept}", RuntimeWarning, stacklevel=4)
    if previous is not None:
        return previous
    return torch.eye(dim, rank, dtype=torch.float32, device=device)


def oriented(grad: torch.Tensor, side: int) -> torch.Tensor:
    """The matrix whose *left* singular vectors are the basis for ``side`` (``G`` or ``G^T``), fp32."""
    g = grad.float()
    return g if side == LEFT else g.T
