"""Results do not depend on ``torch.get_default_dtype()`` (issue 11, fault 2).

Every tensor the package creates names its dtype and device, so fp32 parameters and gradients give
bit-identical parameters and state under a float32, bfloat16 or float64 default dtype, for every preset x
projector x transfer (a combination refused at construction, or failing at a step, must do so under every
default alike).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import default_dtype

import lowrank_optim as lro
from lowrank_optim.projectors import PROJECTORS
from lowrank_optim.rules import TRANSFER_POLICIES

PRESETS = lro.available_optimizers()
DEFAULTS = (torch.float32, torch.bfloat16, torch.float64)
STEPS = 5
#: Per-preset options so that every part of it runs within STEPS steps on a (12, 8) weight.
OPTIONS: dict[str, dict[str, Any]] = {
    "frugal": {"density": 0.5},
    "gum": {"full_rank_layers": 1},
    "galore_plus": {"residual_warmup": 1},
    "galore_adafactor": {"beta1": 0.9},
    "flora": {"scale_parameter": False},
}


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 8), (8, 12), (6,), (5, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32)) for s in shapes]


def _run(preset: str, dtype: torch.dtype, **kwargs: Any) -> tuple[str, list[torch.Tensor]]:
    """``("ok", tensors)`` with every parameter and state tensor after STEPS steps, or ``("error", [type])``."""
    with default_dtype(dtype):
        params = _params()
        groups = [{"params": params[:2], "rank": 4, "update_proj_gap": 2}, {"params": params[2:]}]
        try:
            opt = lro.create_optimizer(preset, groups, lr=1e-2, **{**OPTIONS.get(preset, {}), **kwargs})
        except (TypeError, ValueError) as err:
            return "refused", [type(err).__name__]
        g = torch.Generator().manual_seed(1)
        try:
            for _ in range(STEPS):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32)
                opt.step()
        except Exception as err:
            return "error", [type(err).__name__, str(err)[:60]]
        out = [p.detach().clone() for p in params]
        for p in params:
            out += [v for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
            proj = opt.state[p].get("projector", {})
            out += [v for _, v in sorted(proj.items()) if isinstance(v, torch.Tensor)]
        return "ok", out


def _assert_same(a: tuple[str, list], b: tuple[str, list], what: str) -> None:
    assert a[0] == b[0], f"{what}: {a[0]} {a[1] if a[0] != 'ok' else ''} vs {b[0]} {b[1] if b[0] != 'ok' else ''}"
    if a[0] != "ok":
        assert a[1][0] == b[1][0], what
        return
    assert len(a[1]) == len(b[1]), what
    for x, y in zip(a[1], b[1], strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert torch.equal(x, y), f"{what}: max diff {(x.double() - y.double()).abs().max().item():.3g}"


def _check(preset: str, **kwargs: Any) -> None:
    ref = _run(preset, torch.float32, **kwargs)
    for dtype in DEFAULTS[1:]:
        _assert_same(ref, _run(preset, dtype, **kwargs), f"{preset} {kwargs} default {dtype}")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_defaults_do_not_depend_on_default_dtype(preset: str) -> None:
    # each preset with its own parts, its stores in turn (all stores for every preset: the slow sweep)
    _check(preset, state_dtype=("fp32", "bf16", "8bit")[PRESETS.index(preset) % 3])


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_projectors_do_not_depend_on_default_dtype(projector: str) -> None:
    # 'linear' builds identities and solves in fp64; 'reset' re-creates moments
    for transfer in ("linear", "reset"):
        _check("galore_adamw", projector=projector, transfer=transfer)


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_store_does_not_depend_on_default_dtype(preset: str, state_dtype: str) -> None:
    _check(preset, state_dtype=state_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_combination_does_not_depend_on_default_dtype(preset: str) -> None:
    for projector in sorted(PROJECTORS):
        for transfer in sorted(TRANSFER_POLICIES):
            _check(preset, projector=projector, transfer=transfer)


def test_flora_refresh_under_bf16_default_is_the_fp32_run() -> None:
    """The issue's example: Flora crashed at its first refresh under a bf16 default dtype."""
    runs = []
    for dtype in DEFAULTS:
        with default_dtype(dtype):
            w = torch.nn.Parameter(torch.ones(32, 16, dtype=torch.float32))
            opt = lro.Flora([{"params": [w], "rank": 8, "update_proj_gap": 2}])
            g = torch.Generator().manual_seed(3)
            for _ in range(4):
                w.grad = torch.randn(32, 16, generator=g, dtype=torch.float32)
                opt.step()
            runs.append(w.detach().clone())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert not torch.equal(runs[0], torch.ones(32, 16))


def test_fused_adam_step_count_is_fp32_under_any_default() -> None:
    """The per-step tensor handed to the fused kernel: a bf16 step count rounds 257 to 256 (a wrong bias
    correction), a float64 one made the kernel refuse and fall back to other rounding."""
    from lowrank_optim.rules.adam import AdamRule

    rule = AdamRule()
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    results = []
    for dtype in DEFAULTS:
        with default_dtype(dtype):
            g = torch.Generator().manual_seed(5)
            target = torch.randn(7, 5, generator=g, dtype=torch.float32)
            grad = torch.randn(7, 5, generator=g, dtype=torch.float32)
            moments = {"exp_avg": torch.full((7, 5), 0.1, dtype=torch.float32),
                       "exp_avg_sq": torch.full((7, 5), 0.2, dtype=torch.float32)}
            assert rule.apply_plain(target, grad, moments, 257, group)
            results.append([target, moments["exp_avg"], moments["exp_avg_sq"]])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


#: torch factories whose result dtype or device otherwise comes from the global defaults.
FACTORIES = {"tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint",
             "randperm", "arange", "eye", "linspace", "logspace", "empty_strided", "normal", "range"}


def _factory_calls_without_dtype_or_device() -> list[str]:
    import ast
    from pathlib import Path

    root = Path(lro.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            keys = {k.arg for k in node.keywords}
            where = f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}"
            if node.func.attr in FACTORIES and not {"dtype", "device"} <= keys:
                bad.append(where)
            # torch.where(cond, 1.0, -1.0): two Python scalars give the default dtype
            if node.func.attr == "where" and len(node.args) == 3 and all(
                    isinstance(a, (ast.Constant, ast.UnaryOp)) for a in node.args[1:]):
                parent_ok = False
                for outer in ast.walk(ast.parse(path.read_text())):
                    if (isinstance(outer, ast.Call) and isinstance(outer.func, ast.Attribute)
                            and outer.func.attr == "to" and outer.func.value is not None
                            and ast.dump(outer.func.value) == ast.dump(node)
                            and "dtype" in {k.arg for k in outer.keywords}):
                        parent_ok = True
                if not parent_ok:
                    bad.append(where + " (two scalars)")
    return bad


def test_every_tensor_factory_names_dtype_and_device() -> None:
    """The kind behind fault 2: no factory in the package takes the global default dtype or device."""
    assert _factory_calls_without_dtype_or_device() == []
