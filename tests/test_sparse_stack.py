"""GaLore+'s sparse residual stepped per stack (``lowrank_optim.rules.sparse_stack``) equals the rule run matrix by
matrix after the same stacked lifts, bit for bit: the batched sampled product, the closed-form test with one host
read per stack, the fallbacks (formed complement at the floor, stacks still in their warm-up) and a resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim import stacks
from lowrank_optim.rules import sparse_stack


def _per_matrix(residual, units, low, lows, updates, bases, left, group, proj, cache, key) -> None:
    """The stacked step's residual before ``rules.sparse_stack``: the rule per matrix, in stack order."""
    for u, out, upd in zip(units, lows, updates, strict=True):
        extra = residual.step(u.grad, out, upd, proj, u.state["projector"], u.state, group, target=u.param)
        if extra is not None:
            u.param.sub_(extra)


SHAPES = [(24, 16)] * 3 + [(16, 24)] * 3 + [(32, 16)] * 2


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in SHAPES]


def _grads(steps: int, low_rank: tuple[int, ...] = (), zero_until: dict[int, int] | None = None,
           low_from: int = 0, seed: int = 1) -> list[list[torch.Tensor]]:
    """Seeded gradients; those of matrices in ``low_rank`` have rank 2 from step index ``low_from`` on (in fixed
    spaces), those of ``zero_until = {matrix: step}`` are zero before that step (their warm-up lasts longer)."""
    g = torch.Generator().manual_seed(seed)
    spaces = {i: (torch.randn(SHAPES[i][0], 2, generator=g), torch.randn(2, SHAPES[i][1], generator=g))
              for i in low_rank}  # fixed column and row spaces: every basis drawn from a gradient holds them
    out = []
    for step in range(steps):
        grads = []
        for i, s in enumerate(SHAPES):
            x = torch.randn(s, generator=g)
            if i in low_rank and step >= low_from:
                x = spaces[i][0] @ torch.randn(2, 2, generator=g) @ spaces[i][1]
            if zero_until and step < zero_until.get(i, 0):
                x = torch.zeros(s)
            grads.append(x)
        out.append(grads)
    return out


def _make(params: list[nn.Parameter], **kwargs: object) -> torch.optim.Optimizer:
    return lro.create_optimizer("galore_plus", [{"params": params, "rank": 4, "update_proj_gap": 3}], lr=1e-2,
                                residual_warmup=2, residual_density=0.05, **kwargs)


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]],
         per_matrix: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        if per_matrix:
            m.setattr(stacks, "stack_residual_step", _per_matrix)
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()


def _assert_same(oa: torch.optim.Optimizer, a: list[nn.Parameter], ob: torch.optim.Optimizer,
                 b: list[nn.Parameter]) -> None:
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(a, b, strict=True):
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sb[k]), k
            elif k != "projector":
                assert v == sb[k], k
        for k, v in sa["projector"].items():
            assert torch.equal(v, sb["projector"][k]) if isinstance(v, torch.Tensor) else v == sb["projector"][k], k


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(sparse_stack, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_stack, name, wrapper)
    return calls


@pytest.mark.parametrize("num_heads", [None, 4])
def test_stacked_sparse_residual_is_bitwise_the_per_matrix_rule(num_heads: int | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Across the warm-up, the entry choice and three refreshes (the bases' arena rebuilt each time)."""
    extra = {} if num_heads is None else {"projector_options": {"num_heads": num_heads}}
    a, b = _params(), _params()
    grads = _grads(10)
    oa, ob = _make(a, **extra), _make(b, **extra)
    sampled = _spy(monkeypatch, "_sampled")
    _run(oa, a, grads, False, monkeypatch)
    assert len(sampled) >= 3 * 7  # every stack (three shapes) batched from step 3 on
    _run(ob, b, grads, True, monkeypatch)
    _assert_same(oa, a, ob, b)


def test_complement_at_the_floor_takes_the_formed_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """From step 4 on, two matrices of a stack get rank-2 gradients in fixed spaces, which the bases refreshed from
    them at steps 4, 7 and 10 hold: their complement is then rounding error, which the formed test zeroes (``E = 0``
    exactly), next to a full-rank matrix whose entries are sampled: the stack mixes both kinds of entries."""
    a, b = _params(), _params()
    grads = _grads(10, low_rank=(0, 1), low_from=3)
    oa, ob = _make(a), _make(b)
    sampled = _spy(monkeypatch, "_sampled")
    tests = _spy(monkeypatch, "_above_floor")
    _run(oa, a, grads[:-1], False, monkeypatch)
    avg = oa.state[a[0]]["residual_exp_avg"].clone()
    _run(oa, a, grads[-1:], False, monkeypatch)
    assert len(tests) == 3 * 8  # every stack from step 3 on
    assert len(sampled) == 3 * 8 - 7  # but the (24, 16) one at steps 4 to 10 (two matrices at their floor)
    assert torch.equal(oa.state[a[0]]["residual_exp_avg"], avg.lerp(torch.zeros_like(avg), 0.1))  # E = 0
    _run(ob, b, grads, True, monkeypatch)
    _assert_same(oa, a, ob, b)


def test_stack_with_a_longer_warmup_steps_per_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix whose gradient is zero for its first steps chooses its entries later: its stack goes per matrix
    until every matrix is past the warm-up at the same step count, and stays equal to the rule."""
    a, b = _params(), _params()
    grads = _grads(9, zero_until={1: 3})
    oa, ob = _make(a), _make(b)
    _run(oa, a, grads, False, monkeypatch)
    _run(ob, b, grads, True, monkeypatch)
    _assert_same(oa, a, ob, b)
    assert int(oa.state[a[1]]["residual_step"]) < int(oa.state[a[0]]["residual_step"])


def test_resume_from_a_checkpoint_of_the_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state's entries, moments and bases are views of the stack's arenas: a checkpoint (torch.save) loads into
    a fresh optimizer that continues exactly as the uninterrupted one."""
    a, b = _params(), _params()
    grads = _grads(9)
    oa = _make(a)
    _run(oa, a, grads[:6], False, monkeypatch)
    st = oa.state[a[0]]
    assert st["residual_exp_avg"]._base is not None and st["projector"]["basis"]._base is not None  # arena views
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    with torch.no_grad():
        for p, q in zip(a, b, strict=True):
            q.copy_(p)
    ob = _make(b)
    buf.seek(0)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    _run(oa, a, grads[6:], False, monkeypatch)
    _run(ob, b, grads[6:], False, monkeypatch)
    _assert_same(oa, a, ob, b)


def test_floor_test_resolves_a_large_matrix() -> None:
    """``clearly_above_floor`` on a 4096 x 1024 gradient whose complement is 4x the ``CANCELLATION`` margin (in
    ``||E||^2 / ||G||^2``, fp64): a whole-tensor fp32 norm misses it (its row-major accumulation loses about 1.6e-4
    of ``||G||^2`` at this size), the norm of the row norms resolves it; a gradient inside the basis stays below."""
    from lowrank_optim.projectors import entries, make_projector
    from lowrank_optim.rules.fira_closed_form import CANCELLATION

    g = torch.Generator().manual_seed(0)
    m, n, r = 4096, 1024, 64
    q, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    inside = q @ torch.randn(r, n, generator=g, dtype=torch.float64)
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    noise -= q @ (q.T @ noise)
    noise *= (4 * CANCELLATION * inside.square().sum() / noise.square().sum()).sqrt()
    proj = make_projector("svd", rank=r)
    for grad, above in (((inside + noise).float(), True), (inside.float(), False)):
        st = proj.init(inside.float())
        low = proj.project(grad, st)
        gd, ld = grad.double(), low.double()
        ratio = float((gd.square().sum() - ld.square().sum()) / gd.square().sum())
        assert (ratio > 3 * CANCELLATION) == above, ratio
        assert entries.clearly_above_floor(proj, grad, low, st) == above
        whole = torch.linalg.vector_norm(grad).double().square() - torch.linalg.vector_norm(low).double().square()
        assert not bool(whole > torch.linalg.vector_norm(grad).double().square() * CANCELLATION)  # what it was
