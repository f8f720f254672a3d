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
from typing import Any

import torch

from .._validation import check_choice, check_int

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

    Args:
        rank: target rank ``r``; clamped to ``min(m, n)`` per matrix.
        side: side rule, one of ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``.
    """

    name = "base"
    #: When True the engine passes ``moments={name: fp32 tensor}`` (low-rank moments before the
    #: refresh) to :meth:`update`, e.g. for COAP's correlation-aware correction.
    wants_moments = False

    def __init__(self, rank: int, side: str = "std") -> None:
        self.rank = check_int("rank", rank, low=1)
        self.side_rule = check_choice("proj_side", side, SIDE_RULES)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, side={self.side_rule!r})"

    # -- contract -------------------------------------------------------------------------------
    def init(self, grad: torch.Tensor, *, seed: int = 0) -> ProjState:
        """Creates the projector state from the first gradient of a parameter."""
        if grad.dim() != 2:
            raise ValueError(f"Invalid grad: projectors take 2-D tensors, got shape {tuple(grad.shape)}")
        side = choose_side(grad.shape, self.side_rule)
        rank = min(self.rank, int(grad.shape[0]), int(grad.shape[1]))
        state: ProjState = {"side": side, "rank": rank, "seed": int(seed), "refresh": 0}
        state["basis"] = self._basis(grad, state, previous=None)
        return state

    def update(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        """Returns a refreshed state (the old one is not modified).

        ``context`` carries ``moments`` when :attr:`wants_moments` is set.
        """
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        new["basis"] = self._basis(grad, new, previous=state["basis"])
        return new

    def project(self, grad: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a full ``(m, n)`` tensor into the subspace."""
        basis = state["basis"]
        if state["side"] == LEFT:
            return basis.T @ grad
        return grad @ basis

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        """Maps a low-rank tensor back to the full ``(m, n)`` space."""
        basis = state["basis"]
        if state["side"] == LEFT:
            return basis @ low
        return low @ basis.T

    def back_matrix(self, state: ProjState, device: torch.device) -> torch.Tensor | None:
        """The ``(d, r)`` matrix ``B`` with ``project_back(N) = B N`` (left) or ``N B^T`` (right), or ``None``
        when the map back is not a matrix product (selections, blocks). A subclass that overrides
        :meth:`project_back` gets ``None`` unless it overrides this too."""
        if type(self).project_back is not Projector.project_back:
            return None
        return state["basis"]

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
