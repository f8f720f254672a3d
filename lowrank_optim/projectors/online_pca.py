"""Online PCA projector of Online Subspace Descent (Liang et al., "Memory-Efficient LLM Training with Online
Subspace Descent", NeurIPS 2024, arXiv:2408.12857).

``P`` (``(d, r)``, ``d`` the projected dimension) starts as the top-``r`` singular vectors of the first
gradient; every refresh then takes ONE optimizer step on ``P`` for the reconstruction loss of the
normalised gradient. With ``A`` the gradient oriented so that ``P`` spans its columns (``G`` on the left
side, ``G^T`` on the right) and ``Â = A / ||A||_F``::

    L(P) = ||Â - P P^T Â||_F^2
    dL/dP = 2 (Â B (P^T P - 2 I) + P B^T B),   B = Â^T P

(the closed form; no autograd). Its minimisers are the orthonormal bases of the top-``r`` left singular
subspace of ``A``, so ``P`` tracks that subspace and is pulled towards orthonormality only implicitly.

P's optimizer is Adam (default) or plain SGD; its moments live in the projector state as plain fp32
tensors (``p_exp_avg``, ``p_exp_avg_sq``) with an int step ``p_step``, so ``state_bytes()`` counts them.

P's learning rate (``lr_rule``):

* ``"reference"`` (default, the authors' code): ``lr * lr_t / lr_0``: the base ``lr`` (the code's
  ``1 / update_proj_gap``, 1/200 = 0.005 in its LLaMA-60M recipe) follows the weight schedule; ``lr_t`` is
  the group's current lr and ``lr_0`` its ``initial_lr`` (set by torch's LR schedulers; without a scheduler,
  or when :meth:`update` gets no ``lr``, the ratio is 1);
* ``"ratio"`` (the paper's recommendation): ``lr_ratio * lr``, with ``lr`` the weight learning rate the
  engine passes on every refresh (paper: ratio 5); without an ``lr`` in the context, the base ``lr``;
* ``"fixed"``: ``lr``.

Why the default follows the code, not the paper: P's loss is scale-free (``Â`` has unit norm) and Adam's step
on P moves each entry by about its lr whatever the gradient scale, while P's entries are about ``1/sqrt(d)``
(0.031 at ``d = 1024``). The paper's ``5 * lr`` is 0.05 at the published weight lr 0.01, larger than the
entries themselves: issue 11 measured, at ``d = 1024``, 0.098 of the gradient energy captured (0.127 if P
never moves, 0.745 at the code's 0.005) and column norms drifting to 1.6-4.0. The code's 0.005 tracks the
subspace with column norms near 1 (``tests/test_projector_contract.py`` checks it at ``d = 1024``), and it does
not tie P's rate to the weights' lr, which has nothing to do with P's scale.

Differences from the reference code, all deliberate:

* the engine refreshes *before* projecting (as GaLore does), so the step on ``P`` already sees the current
  gradient; the reference projects with ``P_t`` and moves ``P`` afterwards (one step of lag);
* P's weight decay is an explicit option, default 0 (the reference's torch AdamW silently uses 0.01; the
  paper suggests ``lambda_P = lambda_W``);
* ``P`` is fp32 whatever the parameter dtype (the reference keeps it in the parameter dtype);
* an optional QR re-orthonormalisation after each step (the reference never re-orthonormalises);
* a zero gradient leaves ``P`` and its moments untouched (``Â`` is undefined).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_betas, check_choice, check_number
from ..linalg import max_abs_scale, robust
from .base import ProjState, oriented
from .svd import SVDProjector

P_OPTIMIZERS = ("adam", "sgd")
P_LR_RULES = ("ratio", "reference", "fixed")


def reconstruction_loss(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||Â - P P^T Â||_F^2`` with ``Â = a / ||a||_F`` (fp32 scalar tensor)."""
    a = a.float()
    a = a / a.norm()
    return (a - basis @ (basis.T @ a)).square().sum()


def reconstruction_grad(a_hat: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Closed-form ``dL/dP`` of ``||Â - P P^T Â||_F^2`` for a normalised ``Â`` (``(d, k)``) and ``P`` (``(d, r)``)."""
    b = a_hat.T @ basis  # (k, r)
    gram = basis.T @ basis  # (r, r)
    gram.diagonal().sub_(2.0)
    return 2.0 * ((a_hat @ b) @ gram + basis @ (b.T @ b))


def _orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """Q factor of ``basis`` with a positive diagonal of R (continuous in ``basis``)."""
    q, r = robust(lambda x: torch.linalg.qr(x, mode="reduced"), basis, what="QR")
    signs = torch.sign(r.diagonal())
    signs[signs == 0] = 1.0
    return (q * signs).contiguous()


class OnlinePCAProjector(SVDProjector):
    """SVD at init, then one optimizer step on ``P`` per refresh (see the module docstring).

    Args:
        rank: target rank.
        side: side rule.
        optimizer: P's optimizer, ``"adam"`` (default) or ``"sgd"``.
        lr_rule: ``"reference"`` (default), ``"ratio"`` or ``"fixed"``: how P's lr is found.
        lr_ratio: P's lr over the weight lr under ``"ratio"`` (paper: 5).
        lr: P's base lr under ``"reference"`` and ``"fixed"`` (default 0.005, the reference's 1/200).
        betas: Adam coefficients of P's optimizer.
        eps: Adam epsilon of P's optimizer.
        weight_decay: decoupled weight decay of ``P`` (default 0).
        orthonormalize: re-orthonormalise ``P`` by QR after each step (default False, as in the paper).
        solver: how the first basis (an SVD) is computed, as :class:`~lowrank_optim.projectors.svd.SVDProjector`'s
            ``solver`` (``"auto"``, ``"svd"`` or ``"gram"``).
    """

    name = "online_pca"
    lazy_refusal = ("its refresh is one incremental optimizer step of P, not a decomposition: a high overlap after "
                    "a small step is the normal case, so skipping refreshes would slow P's own learning instead of "
                    "saving work")
    #: the basis takes a small optimizer step every refresh, which rounding to a coarser form would erase
    basis_dtypes = ("fp32",)
    #: The engine passes ``lr`` (the group's current lr) and ``initial_lr`` to :meth:`update` (both optional).
    wants_lr = True

    def __init__(self, rank: int, side: str = "std", *, optimizer: str = "adam", lr_rule: str = "reference",
                 lr_ratio: float = 5.0, lr: float = 0.005, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, orthonormalize: bool = False,
                 solver: str = "auto") -> None:
        super().__init__(rank, side, solver=solver)
        self.optimizer = check_choice("optimizer", optimizer, P_OPTIMIZERS)
        self.lr_rule = check_choice("lr_rule", lr_rule, P_LR_RULES)
        self.lr_ratio = check_number("lr_ratio", lr_ratio, low=0.0)
        self.lr = check_number("lr", lr, low=0.0)
        self.betas = check_betas("betas", betas)
        self.eps = check_number("eps", eps, low=0.0)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        if not isinstance(orthonormalize, bool):
            raise TypeError(f"Invalid orthonormalize: expected a bool, got {orthonormalize!r}")
        self.orthonormalize = orthonormalize

    @property
    def orthonormal(self) -> bool:  # type: ignore[override]
        """Only with ``orthonormalize=True``: otherwise ``P`` drifts from orthonormality after the first step."""
        return self.orthonormalize

    def __repr__(self) -> str:
        return (f"OnlinePCAProjector(rank={self.rank}, side={self.side_rule!r}, optimizer={self.optimizer!r}, "
                f"lr_rule={self.lr_rule!r}, lr_ratio={self.lr_ratio}, lr={self.lr})")

    def step_lr(self, context: dict[str, Any]) -> float:
        """P's learning rate for one refresh, from the rule and the engine's ``lr`` / ``initial_lr`` context.

        Without ``lr`` in the context (the projector used on its own, ``update(grad, state)``) every rule
        gives the base ``lr``: the projector contract holds with no context.
        """
        lr_w = context.get("lr")
        if self.lr_rule == "fixed" or lr_w is None:
            return self.lr
        if self.lr_rule == "ratio":
            return self.lr_ratio * float(lr_w)
        lr_0 = context.get("initial_lr") or lr_w
        return self.lr * float(lr_w) / float(lr_0) if float(lr_0) != 0 else 0.0

    def init_state(self, grad: torch.Tensor, *, seed: int = 0, **context: Any) -> ProjState:
        state = super().init_state(grad, seed=seed)
        state["p_step"] = 0
        if self.optimizer == "adam":
            state["p_exp_avg"] = torch.zeros_like(state["basis"])
            state["p_exp_avg_sq"] = torch.zeros_like(state["basis"])
        return state

    def refresh(self, grad: torch.Tensor, state: ProjState, **context: Any) -> ProjState:
        new = dict(state)
        new["refresh"] = int(state["refresh"]) + 1
        a = oriented(grad, state["side"])
        a = a / max_abs_scale(a)  # Â is scale-free: dividing first keeps ||A|| finite for entries near 1e19
        norm = a.norm()
        if not bool(norm > 0):
            return new
        basis = state["basis"].to(device=a.device, dtype=torch.float32)
        g = reconstruction_grad(a / norm, basis)
        lr = self.step_lr(context)
        step = int(state["p_step"]) + 1
        basis = basis.mul(1.0 - lr * self.weight_decay) if self.weight_decay else basis.clone()
        if self.optimizer == "adam":
            beta1, beta2 = self.betas
            exp_avg = state["p_exp_avg"].lerp(g, 1 - beta1)
            exp_avg_sq = state["p_exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            basis.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
            new["p_exp_avg"], new["p_exp_avg_sq"] = exp_avg, exp_avg_sq
        else:
            basis.add_(g, alpha=-lr)
        if self.orthonormalize:
            basis = _orthonormalize(basis)
        new["basis"] = basis
        new["p_step"] = step
        return new

    def state_numel(self, shape: tuple[int, ...] | torch.Size) -> int:
        """``P`` plus, under Adam, its two moments (``3 d r``; ``d r`` under SGD)."""
        return super().state_numel(shape) * (3 if self.optimizer == "adam" else 1)
