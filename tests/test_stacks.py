"""The batched step (lowrank_optim.stacks) equals the per-matrix path to rounding, for every preset; Fira's
closed form equals its two-lift formula; a steady step builds no per-parameter tensor from a Python number and
reads one device value (the non-finite check); staggered refresh spreads a group's refreshes (issue 12)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import CASES, STATE_DTYPES, assert_same_state, feed, roundtrip
from torch import nn

import lowrank_optim as lro
from lowrank_optim.projectors import entries
from lowrank_optim.rules import sparse_stack
from lowrank_optim.rules.base import _STEP_TENSORS
from lowrank_optim.schedule import refresh_due, stagger_phase


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (24, 16), (16, 24), (16, 24), (24, 16), (3, 12, 10), (8, 4, 3, 3), (12,)]
    return [nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in shapes]


def _grads(params: list[nn.Parameter], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


def _make(name: str, params: list[nn.Parameter], batched: bool, state_dtype: str = "fp32",
          **group: object) -> torch.optim.Optimizer:
    kwargs = {**CASES.get(name, {}), "state_dtype": state_dtype}
    opt = lro.create_optimizer(name, [{"params": params[:-1], "rank": 4, "update_proj_gap": 3, **group},
                                      {"params": params[-1:]}], **kwargs)
    opt.batched = batched
    return opt


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    feed(opt, params, grads)


def _close_states(a: torch.optim.Optimizer, b: torch.optim.Optimizer, atol: float) -> None:
    sa, sb = roundtrip(a.state_dict())["state"], roundtrip(b.state_dict())["state"]

    def cmp(x: object, y: object, path: str) -> None:
        if isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), path
            for k in x:
                cmp(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                cmp(u, v, f"{path}[{i}]")
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, path
            if x.dtype == torch.uint8:  # 8-bit codes may differ by one step where fp32 values differ by rounding
                assert (x.int() - y.int()).abs().max() <= 1 if x.numel() else True, path
            else:
                torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=1e-4, msg=path)
        else:
            assert x == y, path

    cmp(sa, sb, "state")


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_batched_equals_per_matrix(name: str) -> None:
    """Same weights and state to rounding after steps that cross refreshes (period 3), fp32 store."""
    a, b = _params(), _params()
    grads = _grads(a, 7)
    oa, ob = _make(name, a, True), _make(name, b, False)
    _run(oa, a, grads)
    _run(ob, b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    _close_states(oa, ob, atol=1e-5)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES[1:])
@pytest.mark.parametrize("name", ["galore_adamw", "fira", "apollo", "apollo_mini"])
def test_batched_equals_per_matrix_low_precision_stores(name: str, state_dtype: str) -> None:
    a, b = _params(), _params()
    grads = _grads(a, 5)
    oa, ob = _make(name, a, True, state_dtype), _make(name, b, False, state_dtype)
    _run(oa, a, grads)
    _run(ob, b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["reference", "orthogonal"])
@pytest.mark.parametrize("gamma", [1.01, None])
@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_fira_closed_form_equals_two_lift_formula(mode: str, gamma: float | None, scale: float) -> None:
    a, b = _params(), _params()
    grads = _grads(a, 6)
    kw = {"fira_residual": mode, "limiter_gamma": gamma, "scale": scale}
    oa, ob = _make("fira", a, True, **kw), _make("fira", b, False, **kw)
    _run(oa, a, grads)
    _run(ob, b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    _close_states(oa, ob, atol=1e-5)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("gamma", [1.01, None])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_apollo_stacked_equals_per_matrix_rule(scale_type: str, gamma: float | None, scale: float) -> None:
    """APOLLO's stacked step (factors, closed-form limiter norm, one ``addcmul_`` per matrix) equals the
    per-matrix rule, including a zero-lr step in the middle (the limiter's placeholder, no update)."""
    a, b = _params(), _params()
    grads = _grads(a, 6)
    kw = {"scale_type": scale_type, "limiter_gamma": gamma, "scale": scale}
    oa, ob = _make("apollo", a, True, **kw), _make("apollo", b, False, **kw)
    for i, step in enumerate(grads):
        for opt in (oa, ob):
            for g in opt.param_groups:
                g["lr"] = 0.0 if i == 2 else 1e-2
        _run(oa, a, [step])
        _run(ob, b, [step])
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    _close_states(oa, ob, atol=1e-5)


def test_batched_resume_from_per_matrix_checkpoint_is_bit_exact() -> None:
    """A checkpoint written by the per-matrix path loads into the batched engine and continues exactly like
    the batched run that wrote the same checkpoint (the state format does not depend on batching)."""
    base = _params()
    grads = _grads(base, 8)
    ref = _make("fira", base, False)
    _run(ref, base, grads[:4])
    sd = roundtrip(ref.state_dict())
    runs = []
    for _ in range(2):
        ps = [nn.Parameter(p.detach().clone()) for p in base]
        opt = _make("fira", ps, True)
        opt.load_state_dict(sd)
        _run(opt, ps, grads[4:])
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for p, q in zip(pa, pb, strict=True):
        assert torch.equal(p, q)
    assert_same_state(oa, ob)


def _spy(fn, name: str, log: list[str]):
    def wrapper(*args, **kwargs):
        log.append(name)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name,extra", [*((n, {}) for n in lro.available_optimizers()), ("flora", {"inner": "adam"}),
                                        ("flora", {"projector_options": {"generator": "cpu"}})])
def test_steady_step_builds_no_tensor_from_python_scalars(name: str, extra: dict, monkeypatch) -> None:
    """In a steady step: scalar-built tensors do not grow with the number of parameters (step counts and constants
    are shared per device and value, per-step scalars are made once per stack), and the only host read of a
    device value is the non-finite check (issue 12, item 3)."""
    counts = {}
    for n_extra in (0, 6):
        params = _params()[:-1] + [nn.Parameter(torch.randn(24, 16)) for _ in range(n_extra)]
        opt = lro.create_optimizer(name, [{"params": params, "rank": 4, "update_proj_gap": 1000}],
                                   **{**CASES.get(name, {}), **extra})
        grads = _grads(params, 3)
        _run(opt, params, grads[:2])
        built: list[str] = []
        reads: list[str] = []
        _STEP_TENSORS.clear()  # every shared scalar is made again: their number must not depend on the parameters
        for fn in ("tensor", "full", "as_tensor", "scalar_tensor", "from_numpy"):
            monkeypatch.setattr(torch, fn, _spy(getattr(torch, fn), fn, built))
        for meth in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, meth, _spy(getattr(torch.Tensor, meth), meth, reads))
        floor_tests: list[str] = []  # GaLore+'s CPU-only choice of the closed-form entries: one read per matrix
        monkeypatch.setattr(entries, "clearly_above_floor",
                            _spy(entries.clearly_above_floor, "__bool__", floor_tests))
        stack_tests: list[str] = []  # the same choice for a whole stack (rules.sparse_stack): one read per stack
        monkeypatch.setattr(sparse_stack, "_above_floor", _spy(sparse_stack._above_floor, "tolist", stack_tests))
        _run(opt, params, grads[2:])
        monkeypatch.undo()
        assert sorted(reads) == sorted(["__bool__"] * (1 + len(floor_tests)) + stack_tests), reads
        assert not floor_tests + stack_tests or name == "galore_plus", (floor_tests, stack_tests)
        assert name != "galore_plus" or len(stack_tests) >= 1, stack_tests  # its 24 x 16 matrices: one stack
        counts[n_extra] = len(built)
    assert counts[0] == counts[6] and counts[0] <= 16, counts  # per device and value, not per parameter


def test_stagger_schedule_spreads_refreshes() -> None:
    gap, count = 8, 5
    phases = [stagger_phase(i, count, gap) for i in range(count)]
    assert phases == [0, 1, 3, 4, 6]
    for phase in phases:  # each matrix refreshes exactly once per period, never at step 0
        due = [s for s in range(1, 4 * gap + 1) if refresh_due(s, gap, phase)]
        assert all(b - a == gap for a, b in itertools.pairwise(due))
        assert len(due) == 4 and due[0] == (phase or gap)


def test_staggered_refresh_in_the_engine() -> None:
    """With refresh_stagger each matrix refreshes every update_proj_gap steps at its own phase."""
    params = _params()
    opt = _make("galore_adamw", params, True, refresh_stagger=True)
    seen: dict[int, list[int]] = {}
    grads = _grads(params, 9)
    for t, step in enumerate(grads, start=1):
        _run(opt, params, [step])
        mats = []
        for p in params[:-1]:
            st = opt.state[p]
            mats += st.get("matrices", [st])
        for i, st in enumerate(mats):
            seen.setdefault(i, [])
            if st["projector"]["refresh"] > len(seen[i]):
                seen[i].append(t - 1)  # the refresh happens before step t's update (state["step"] == t - 1)
    count = len(seen)
    assert count == 9
    for i, steps in seen.items():
        phase = stagger_phase(i, count, 3)
        assert steps == [s for s in range(1, 9) if refresh_due(s, 3, phase)], (i, steps)
    assert len({tuple(v) for v in seen.values()}) == 3  # three phases in a period of 3


def test_stagger_phase_table_is_built_once_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 and the layer-wise updater ask for a matrix's phase once per parameter and step: the group's table is
    built once (it was rebuilt on every call, quadratic in the group's size) and rebuilt when the group grows."""
    params = _params()
    opt = _make("galore_adamw", params, True, refresh_stagger=True)
    group = opt.param_groups[0]
    calls = []
    kind = opt._planner.kind
    monkeypatch.setattr(opt._planner, "kind", lambda g, q: calls.append(id(q)) or kind(g, q))
    first = opt._phases(group)
    assert len(calls) == len(group["params"])
    for _ in range(2 * len(group["params"])):
        assert opt._phases(group) is first
    assert len(calls) == len(group["params"])
    extra = nn.Parameter(torch.randn(6, 5))
    group["params"].append(extra)
    grown = opt._phases(group)
    assert grown["count"] == first["count"] + 1 and grown[id(extra)] == first["count"]


@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_fira_closed_form_floors_a_rounding_error_complement(lr: float) -> None:
    """Gradients of rank below the projection's (a complement that is rounding error, zeroed by
    Projector.residual) then full-rank ones: the closed form agrees with the per-matrix path, the limiter's
    stored norm included (not armed on noise), and a zero-lr step leaves the same -1 placeholder."""
    shapes = [(64, 48), (48, 64)]
    runs = []
    for batched in (True, False):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        opt = lro.Fira([{"params": ps, "rank": 8}], lr=lr, fira_residual="orthogonal", update_proj_gap=1000)
        opt.batched = batched
        g = torch.Generator().manual_seed(1)
        for t in range(6):
            k = 4 if t < 3 else 32
            for p in ps:
                p.grad = torch.randn(p.shape[0], k, generator=g) @ torch.randn(k, p.shape[1], generator=g) / 100
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        na, nb = oa.state[a]["fira_residual_norm"], ob.state[b]["fira_residual_norm"]
        torch.testing.assert_close(na, nb, atol=1e-6, rtol=1e-4)
        assert float(na) == -1.0 if lr == 0.0 else float(na) > 1.0


@pytest.mark.parametrize(("weighting", "ns_dtype", "extra"), [
    ("paper", "fp32", {}), ("after", "fp32", {}), ("none", "fp32", {}), ("paper", "bf16", {}),
    ("after", "fp32", {"full_rank_prob": 0.4, "full_rank_layers": None}), ("paper", "fp32", {"nesterov": True})])
def test_gum_stacked_equals_per_matrix(weighting: str, ns_dtype: str, extra: dict, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """GUM's low-rank branch is stacked (one batched Newton-Schulz per stack, its debiasing weight on the projection
    or on the lift); the full branch takes the per-matrix path. Same weights and momentum as the per-matrix path to
    rounding, across three periods (period 3: the draws and the momentum resets change), in every weighting."""
    from lowrank_optim.rules import muon

    calls = []
    batched = muon.batched_newton_schulz
    monkeypatch.setattr(muon, "batched_newton_schulz",
                        lambda x, *a, **k: calls.append(x.shape[0]) or batched(x, *a, **k))
    a, b = _params(), _params()
    grads = _grads(a, 8)
    kw = {"weighting": weighting, "ns_dtype": ns_dtype, "full_rank_layers": 2, **extra}

    def make(params: list[nn.Parameter], batched: bool) -> lro.GUM:
        opt = lro.GUM([{"params": params[:-1], "rank": 4}, {"params": params[-1:]}], update_proj_gap=3, **kw)
        assert opt._parts(opt.param_groups[0])[0].weighting == weighting
        opt.batched = batched
        return opt

    oa, ob = make(a, True), make(b, False)
    _run(oa, a, grads)
    assert calls and max(calls) >= 2  # stacks of two or more low-rank matrices ran batched
    calls.clear()
    _run(ob, b, grads)
    assert not calls
    tol = 1e-5 if ns_dtype == "fp32" else 2e-3  # bf16 products: a batched kernel may round a product differently
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=tol, rtol=1e-4 if ns_dtype == "fp32" else 1e-2)
    _close_states(oa, ob, atol=1e-5)


@pytest.mark.parametrize("num_heads", [None, 4])
def test_galore_plus_sparse_residual_is_stacked(num_heads: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """GaLore+'s matrices take the batched step (its sparse residual runs per matrix after the stack's lifts) and
    equal the per-matrix path across the residual's warm-up, its entry choice and refreshes."""
    from lowrank_optim import stacks

    left: list[int] = []
    real = stacks.apply_units
    monkeypatch.setattr(stacks, "apply_units", lambda units, *a, **k: left.append(len(rest := real(units, *a, **k)))
                        or rest)
    import lowrank_optim.engine as engine

    monkeypatch.setattr(engine, "apply_units", stacks.apply_units)
    a, b = _params(), _params()
    grads = _grads(a, 8)
    extra = {} if num_heads is None else {"projector_options": {"num_heads": num_heads}}
    oa, ob = _make("galore_plus", a, True, **extra), _make("galore_plus", b, False, **extra)
    _run(oa, a, grads)
    assert left and set(left) == {0}  # no projected matrix fell back to the per-matrix path
    _run(ob, b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    _close_states(oa, ob, atol=1e-5)
