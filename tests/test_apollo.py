"""APOLLO / APOLLO-Mini: closed forms, the projection-scale property, the pytorch-optimizer oracle, memory."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, make_model, train

import lowrank_optim as lro
from lowrank_optim.memory import LLAMA_CONFIGS, estimate_state_bytes, llama_shapes
from lowrank_optim.projectors.random import RandomProjector
from lowrank_optim.rules.fira_residual import LIMITER_KEY


def _step(opt: torch.optim.Optimizer, w: torch.nn.Parameter, grad: torch.Tensor) -> None:
    w.grad = grad.clone()
    opt.step()


def test_two_by_two_closed_form() -> None:
    """Two steps on a 2 x 2 weight at rank 1, every number written out (the limiter binds at step 2)."""
    lr, alpha, b1, b2, eps, gamma = 0.1, 2.0, 0.9, 0.999, 1e-8, 1.01
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    g1 = [[0.3, -0.4], [1.0, 2.0]]
    g2 = [[3.0, 1.0], [-2.0, 4.0]]
    opt = lro.APOLLO([{"params": [w], "rank": 1}], lr=lr, betas=(b1, b2), eps=eps, scale=alpha)
    _step(opt, w, torch.tensor(g1))
    st = opt.state[w]["projector"]
    assert st["side"] == 1 and st["rank"] == 1  # m >= n: right side, the two rows are the channels
    q = RandomProjector(1).basis(st).flatten().tolist()  # the seeded N(0, 1/r) draw, a 2 x 1 column
    assert len(q) == 2

    w0 = [[1.0, -2.0], [0.5, 3.0]]
    r1 = [g1[i][0] * q[0] + g1[i][1] * q[1] for i in range(2)]  # R = G q, one number per row
    m = [(1 - b1) * r for r in r1]
    v = [(1 - b2) * r * r for r in r1]
    eta1 = lr * math.sqrt(1 - b2) / (1 - b1)
    s1 = [abs(m[i] / (math.sqrt(v[i]) + eps)) / (abs(r1[i]) + 1e-8) for i in range(2)]
    u1 = [[g1[i][j] * s1[i] for j in range(2)] for i in range(2)]
    norm1 = math.sqrt(sum(x * x for row in u1 for x in row))
    w1 = [[w0[i][j] - eta1 * alpha * u1[i][j] for j in range(2)] for i in range(2)]
    assert torch.allclose(w.detach(), torch.tensor(w1), rtol=1e-6, atol=1e-7)
    assert opt.state[w][LIMITER_KEY].item() == pytest.approx(norm1, rel=1e-6)

    _step(opt, w, torch.tensor(g2))
    r2 = [g2[i][0] * q[0] + g2[i][1] * q[1] for i in range(2)]
    m = [b1 * m[i] + (1 - b1) * r2[i] for i in range(2)]
    v = [b2 * v[i] + (1 - b2) * r2[i] ** 2 for i in range(2)]
    eta2 = lr * math.sqrt(1 - b2**2) / (1 - b1**2)
    s2 = [abs(m[i] / (math.sqrt(v[i]) + eps)) / (abs(r2[i]) + 1e-8) for i in range(2)]
    u2 = [[g2[i][j] * s2[i] for j in range(2)] for i in range(2)]
    norm2 = math.sqrt(sum(x * x for row in u2 for x in row))
    assert norm2 > gamma * norm1  # the limiter binds: the step is rescaled to gamma * norm1
    limited = [[x * gamma * norm1 / norm2 for x in row] for row in u2]
    w2 = [[w1[i][j] - eta2 * alpha * limited[i][j] for j in range(2)] for i in range(2)]
    assert torch.allclose(w.detach(), torch.tensor(w2), rtol=1e-6, atol=1e-7)
    assert opt.state[w][LIMITER_KEY].item() == pytest.approx(gamma * norm1, rel=1e-6)


def test_mini_closed_form_one_factor_per_tensor() -> None:
    """APOLLO-Mini's first step: ``eta_1 * sqrt(128) * G * ||R~|| / ||R||`` with one factor for the tensor."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 10))
    g = torch.randn(6, 10)
    w0 = w.detach().clone()
    opt = lro.APOLLOMini([{"params": [w], "rank": 4}], lr=0.01)
    _step(opt, w, g)
    st = opt.state[w]["projector"]
    assert st["rank"] == 1 and st["side"] == 0  # any rank becomes 1; m < n: left side
    p = RandomProjector(1).basis(st)  # (6, 1)
    r = p.T @ g
    eta = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)
    rt = (0.1 * r) / ((0.001 * r * r).sqrt() + 1e-8)
    s = rt.norm() / (r.norm() + 1e-8)
    expected = w0 - eta * lro.optimizers.apollo.MINI_SCALE * s * g
    assert torch.allclose(w.detach(), expected, rtol=1e-6, atol=1e-7)
    assert opt.state[w]["exp_avg"].shape == (1, 10)


def test_projection_scale_is_absorbed_by_alpha(monkeypatch: pytest.MonkeyPatch) -> None:
    """``P -> c P`` leaves Adam's normalised step unchanged and multiplies ``||R||`` by ``c``, so ``s -> s / c``:
    the trajectory with ``(c P, c alpha)`` equals the one with ``(P, alpha)``, and ``(c P, alpha)`` takes
    exactly ``1 / c`` of the first step (the update's direction never depends on ``c``)."""
    c = 7.0

    def run(factor: float, alpha: float, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        original, original_stack = RandomProjector.basis, RandomProjector.stack_basis

        def scaled(self: RandomProjector, state: dict, device: torch.device | str = "cpu") -> torch.Tensor:
            return original(self, state, device) * factor

        def scaled_stack(self: RandomProjector, states: list[dict], device: torch.device) -> torch.Tensor:
            return original_stack(self, states, device) * factor  # the batched step draws a stack's bases at once

        monkeypatch.setattr(RandomProjector, "basis", scaled)
        monkeypatch.setattr(RandomProjector, "stack_basis", scaled_stack)
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(12, 8))
        start = w.detach().clone()
        opt = lro.APOLLO([{"params": [w], "rank": 3, "update_proj_gap": 4}], lr=0.05, eps=0.0, scale=alpha)
        gen = torch.Generator().manual_seed(3)
        deltas = []
        for _ in range(steps):
            before = w.detach().clone()
            _step(opt, w, torch.randn(12, 8, generator=gen) + 0.1 * w.detach())
            deltas.append(w.detach() - before)
        monkeypatch.setattr(RandomProjector, "basis", original)
        monkeypatch.setattr(RandomProjector, "stack_basis", original_stack)
        return [start, w.detach().clone()], deltas

    (_, end), d_ref = run(1.0, 1.0, 10)
    (_, end_c), _ = run(c, c, 10)
    assert torch.allclose(end_c, end, rtol=1e-5, atol=1e-6)
    _, d_plain = run(c, 1.0, 1)
    assert torch.allclose(d_plain[0] * c, d_ref[0], rtol=1e-5, atol=2e-6)  # deltas of ~1 weights


def _po_apollo(w: torch.nn.Parameter, basis_for_oracle: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector

    opt = pytorch_optimizer.APOLLO([{"params": [w], "rank": basis_for_oracle.shape[0 if w.shape[0] >= w.shape[1]
                                                                                  else 1],
                                     "update_proj_gap": 10**9, "scale": 1.0, "projection_type": "random"}],
                                   lr=lr, betas=(0.9, 0.999), eps=0.0, scale_type="channel", weight_decay=0.0)
    proj = GaLoreProjector(rank=opt.param_groups[0]["rank"], update_proj_gap=10**9, scale=1.0,
                           projection_type="random")
    proj.ortho_matrix = basis_for_oracle
    opt.state[w]["projector"] = proj
    return opt


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
def test_matches_pytorch_optimizer_where_formulas_agree(shape: tuple[int, int]) -> None:
    """The oracle scales the projected gradient and lifts it back (``P (R diag(s))``); we scale the raw gradient
    (``G diag(s)``). With a square orthogonal ``P`` the lift is exact and both formulas agree; the other
    differences are switched off and named here:

    * ``eps``: the oracle adds it to ``sqrt(v)`` before folding the bias correction into the step size (HF
      order), we add it after (torch's order): ``eps=0``;
    * ``scale``: the oracle multiplies by ``sqrt(scale)`` and again by ``scale`` in its ``project_back``, we
      by ``scale`` once: ``scale=1``;
    * weight decay: the oracle decays the updated weight at the bias-corrected step size, we the pre-update
      weight at ``lr``: ``weight_decay=0``;
    * the draw: the oracle draws ``P`` from torch's global RNG on the parameter's device, we from a seeded
      CPU generator: the oracle is given our matrix.
    """
    torch.manual_seed(0)
    w_ours = torch.nn.Parameter(torch.randn(*shape))
    w_ref = torch.nn.Parameter(w_ours.detach().clone())
    d = min(shape)
    ours = lro.APOLLO([{"params": [w_ours], "rank": d, "update_proj_gap": 10**9}], lr=0.02, eps=0.0,
                      distribution="orthonormal")
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(*shape, generator=gen) * (1 + k) for k in range(8)]  # growing: the limiter binds
    _step(ours, w_ours, grads[0])
    st = ours.state[w_ours]["projector"]
    q = RandomProjector(d, distribution="orthonormal").basis(st)  # (d, d), orthogonal
    assert torch.allclose(q.T @ q, torch.eye(d), atol=1e-5)
    ref = _po_apollo(w_ref, q.T if st["side"] == 1 else q, lr=0.02)  # right: (r, n) "vh"; left: (m, r) "u"
    _step(ref, w_ref, grads[0])
    assert torch.allclose(w_ours.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)
    for g in grads[1:]:
        _step(ours, w_ours, g)
        _step(ref, w_ref, g)
    assert torch.allclose(w_ours.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)
    assert ours.state[w_ours][LIMITER_KEY].item() == pytest.approx(float(ref.state[w_ref]["scaling_grad"]),
                                                                   rel=1e-5)


def test_scales_raw_gradient_not_projected_lift() -> None:
    """The formula we follow (the paper's): at rank r < d the step is ``G diag(s)``, full rank, not the oracle's
    rank-r ``P (R diag(s))``."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 10))
    w0 = w.detach().clone()
    g = torch.randn(16, 10)
    opt = lro.APOLLO([{"params": [w], "rank": 2}], lr=0.01, scale=1.0)
    _step(opt, w, g)
    step = (w0 - w.detach())
    st = opt.state[w]["projector"]
    q = RandomProjector(2).basis(st)  # (10, 2), right side: channels are the 16 rows
    r = g @ q
    eta = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)
    rt = (0.1 * r) / ((0.001 * r * r).sqrt() + 1e-8)
    s = rt.norm(dim=1, keepdim=True) / (r.norm(dim=1, keepdim=True) + 1e-8)
    assert torch.allclose(step, eta * g * s, rtol=1e-5, atol=3e-7)  # differences of ~1 weights
    assert torch.linalg.matrix_rank(step).item() == 10  # full rank; the oracle's lift has rank <= 2
    lifted = eta * (r * s) @ q.T
    assert torch.linalg.matrix_rank(lifted).item() == 2
    assert not torch.allclose(step, lifted, rtol=1e-2)


def test_mini_state_below_a_tenth_of_adamw_at_llama_60m() -> None:
    """LLaMA-60M shapes: APOLLO-Mini on every 2-D weight (embedding and head included) holds < 0.1 of
    AdamW's state; on the attention/MLP weights alone (embedding/head on Adam) its low-rank part is tiny."""
    shapes = llama_shapes(**LLAMA_CONFIGS["60M"])
    adamw = estimate_state_bytes(shapes, "galore_adamw", rank=None).total
    assert adamw == 8 * sum(math.prod(s) for s in shapes.values())
    every = estimate_state_bytes(shapes, "apollo_mini", rank=1, target_modules=r".*")
    assert every.total < 0.1 * adamw
    blocks = estimate_state_bytes(shapes, "apollo_mini", rank=128)
    low = sum(b for n, b in blocks.per_param.items() if n in blocks.lowrank)
    low_adamw = 8 * sum(math.prod(shapes[n]) for n in blocks.lowrank)
    assert low < 0.01 * low_adamw
    # closed form: two (1 x max(m, n)) fp32 moments + one fp32 norm per matrix, no basis
    assert low == sum(2 * 4 * max(shapes[n]) + 4 for n in blocks.lowrank)


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_state_bytes_closed_form(name: str, state_dtype: str) -> None:
    """``state_bytes()`` = two moments in the store per projected matrix + 4 bytes of stored norm + plain
    Adam; the projector holds ints only; the planner's meta-device estimate agrees."""
    model = make_model()
    opt = build(name, model, state_dtype=state_dtype, rank=8)
    train(model, opt, 2)
    store = lro.StateStore(state_dtype)
    expected = 0
    for p in (model.attn.weight, model.mlp.weight):
        m, n = p.shape
        r = 1 if name == "apollo_mini" else 8
        low = (m * r) if m >= n else (r * n)
        expected += 2 * store.bytes_for(low) + 4
        assert not any(isinstance(v, torch.Tensor) for v in opt.state[p]["projector"].values())
    lowrank = {id(model.attn.weight), id(model.mlp.weight)}
    for p in model.parameters():
        if id(p) not in lowrank:
            expected += 2 * store.bytes_for(p.numel())
    assert opt.state_bytes() == expected
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    est = estimate_state_bytes(shapes, name, rank=8, state_dtype=state_dtype)
    assert est.total == expected


def test_rejects_bad_options() -> None:
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="scale_type"):
        lro.APOLLO([{"params": [w], "rank": 2}], scale_type="row")
    with pytest.raises(ValueError, match="limiter_gamma"):
        lro.APOLLO([{"params": [w], "rank": 2}], limiter_gamma=0.5)
    with pytest.raises(TypeError, match="rank"):
        lro.APOLLOMini([{"params": [w], "rank": "big"}])
    with pytest.raises(ValueError, match="distribution"):
        lro.APOLLO([{"params": [w], "rank": 2}], distribution="uniform")


def test_limiter_damps_the_bias_correction_rise() -> None:
    """A constant gradient: Adam's un-corrected step ``c_t = (1 - b1^t) / sqrt(1 - b2^t)`` (per entry) rises
    3.16, 4.25, 4.99, ..., so the default limiter caps the step at ``1.01^(t-1)`` of the first and the
    unlimited step (``limiter_gamma=None``, no stored norm) is ``c_t / (c_1 1.01^(t-1))`` times larger."""

    def steps(gamma: float | None) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(8, 5))
        g = torch.randn(8, 5)
        opt = lro.APOLLO([{"params": [w], "rank": 5}], lr=0.01, eps=0.0, limiter_gamma=gamma)
        out = []
        for _ in range(4):
            before = w.detach().clone()
            _step(opt, w, g)
            out.append(before - w.detach())
        return out, opt.state[w]

    free, st_free = steps(None)
    capped, st_capped = steps(1.01)
    assert LIMITER_KEY not in st_free and LIMITER_KEY in st_capped

    def c(t: int) -> float:
        return (1 - 0.9**t) / math.sqrt(1 - 0.999**t)

    for t in range(1, 5):
        ratio = c(t) / (c(1) * 1.01 ** (t - 1))
        assert torch.allclose(free[t - 1], capped[t - 1] * ratio, rtol=1e-4, atol=1e-7)
