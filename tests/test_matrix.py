"""The advertised matrix, as a property suite: every preset x projector x transfer x state store, on every
parameter layout and dtype, under more than one global default dtype.

Each combination either

* runs: every value stays finite, the loss of a least-squares toy falls, ``state_dict()`` -> ``torch.load(
  weights_only=True)`` -> ``load_state_dict()`` resumes bit-exactly, the result does not depend on
  ``torch.get_default_dtype()``, and plain parameters equal ``torch.optim.AdamW`` to 1e-6 where the method
  reduces to it (Adam on the plain path, fp32 store); or
* is refused at construction with a ``ValueError``/``TypeError`` whose message names the offending
  argument and its value.

Anything else (an error at ``step()``, a silent non-finite value, a refusal that does not say what was
wrong) fails. The full cross of preset x projector x transfer x store runs on one shape; hypothesis then
draws shapes, layouts, parameter dtypes, default dtypes and seeds over the same cross.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import CASES, default_dtype, roundtrip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank_optim as lro
from lowrank_optim.projectors import PROJECTORS
from lowrank_optim.rules import TRANSFER_POLICIES

PRESETS = lro.available_optimizers()
PROJECTOR_NAMES = sorted(PROJECTORS)
TRANSFERS = sorted(TRANSFER_POLICIES)
STORES = ("fp32", "bf16", "8bit")

#: Low-rank weight shapes by name. ``big`` has a 8 x 512 low-rank moment, so the 8-bit store quantizes it
#: (moments under 4096 elements stay fp32).
SHAPES: dict[str, tuple[int, ...]] = {
    "square": (12, 12),
    "tall": (20, 8),
    "wide": (8, 20),
    "row": (1, 16),
    "col": (16, 1),
    "transposed": (10, 16),  # stored as the transpose of a (16, 10) row-major tensor
    "big": (64, 512),
}

#: Presets whose plain path is Adam with the group's lr, betas, eps and decoupled weight decay
#: (torch.optim.AdamW); the others' plain rule is Adafactor (GaLore-Adafactor, Flora).
ADAM_PLAIN = {"coap", "dct_adamw", "fira", "frugal", "galore_adamw", "galore_plus", "gum",
              "online_subspace_descent", "apollo", "apollo_mini"}

LR = 1e-2
STEPS = 6
RESUME_AT = 3


@dataclass
class Problem:
    """A least-squares toy: ``sum_p 0.5 * ||A_p(p) - T_p||^2 / numel`` for one low-rank weight and plain
    parameters of awkward layouts (transposed, channels_last 4-D, a non-contiguous slice view, a bias)."""

    lowrank: torch.nn.Parameter
    plain: list[torch.nn.Parameter]
    inputs: torch.Tensor
    targets: list[torch.Tensor]

    def params(self) -> list[torch.nn.Parameter]:
        return [self.lowrank, *self.plain]

    def loss(self) -> torch.Tensor:
        w = self.lowrank.float()
        lhs = w.reshape(w.shape[0], -1) @ self.inputs[: w[0].numel()]
        total = (lhs - self.targets[0]).pow(2).mean()
        for p, t in zip(self.plain, self.targets[1:], strict=True):
            total = total + (p.float() - t).pow(2).mean()
        return total


def make_problem(shape_name: str, param_dtype: torch.dtype, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    shape = SHAPES[shape_name]
    # "transposed" is stored as the transpose of a row-major tensor
    w = 0.1 * (randn(shape[1], shape[0]).t() if shape_name == "transposed" else randn(*shape))
    lowrank = torch.nn.Parameter(w.to(param_dtype))
    cols = shape[1] if len(shape) == 2 else int(torch.tensor(shape[1:]).prod())
    inputs = randn(max(cols, 1), 24)
    targets = [randn(shape[0], 24)]
    plain_values = [
        randn(72, 64).t(),  # transposed 2-D (64 x 72 with strides (1, 64)), >= 4096 elements
        randn(3, 8, 16, 16).contiguous(memory_format=torch.channels_last),  # channels_last 4-D
        randn(6),  # a bias
    ]
    plain = [torch.nn.Parameter(v.to(param_dtype)) for v in plain_values]
    plain_targets = [randn(*p.shape) for p in plain]
    return Problem(lowrank, plain, inputs, targets + plain_targets)


def clone_problem(prob: Problem) -> Problem:
    return copy.deepcopy(prob)


def build(preset: str, prob: Problem, projector: str, transfer: str, store: str) -> torch.optim.Optimizer:
    kwargs = {**CASES.get(preset, {}), "lr": LR}
    rank = max(1, min(prob.lowrank.shape[0], prob.lowrank[0].numel()) // 2)
    groups = [
        {"params": [prob.lowrank], "rank": rank, "projector": projector, "transfer": transfer,
         "update_proj_gap": 2},
        {"params": prob.plain},
    ]
    return lro.create_optimizer(preset, groups, state_dtype=store, **kwargs)


def run(prob: Problem, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = prob.loss()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def refusal_names_argument(err: Exception, named: dict[str, Any]) -> bool:
    """Whether the message names one of the arguments and its value (``projector`` and ``'random'``, ...)."""
    msg = str(err)
    return any(key in msg and (repr(value) in msg or str(value) in msg) for key, value in named.items())


def assert_state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()

    def same(x: Any, y: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), path
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), path
            for k in x:
                same(x[k], y[k], f"{path}.{k}")
        else:
            assert x == y, path

    for k in sa:
        same(sa[k], sb[k], str(k))


def check_combination(preset: str, projector: str, transfer: str, store: str, shape_name: str = "square",
                      param_dtype: torch.dtype = torch.float32, seed: int = 0,
                      compare_default_dtype: bool = False, default: torch.dtype = torch.float32) -> str:
    """Runs one combination under ``default`` global dtype; returns ``"ran"`` or ``"refused"``."""
    with default_dtype(default):
        prob = make_problem(shape_name, param_dtype, seed)
        named = {"projector": projector, "transfer": transfer, "state_dtype": store}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = build(preset, prob, projector, transfer, store)
        except (ValueError, TypeError) as err:
            assert refusal_names_argument(err, named), f"refusal does not name its argument: {err}"
            return "refused"
        reference = clone_problem(prob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = run(prob, opt, RESUME_AT)
            # bit-exact resume through weights_only, continued on a copy
            resumed = clone_problem(prob)
            opt2 = build(preset, resumed, projector, transfer, store)
            opt2.load_state_dict(roundtrip(opt.state_dict()))
            assert_state_equal(opt, opt2)
            losses += run(prob, opt, STEPS - RESUME_AT)
            run(resumed, opt2, STEPS - RESUME_AT)
        for p, q in zip(prob.params(), resumed.params(), strict=True):
            assert torch.equal(p, q), "resume is not bit-exact"
        assert_state_equal(opt, opt2)
        assert all(torch.isfinite(p.float()).all() for p in prob.params()), "non-finite parameter"
        final = float(prob.loss())
        assert final < losses[0], f"loss did not fall: {losses[0]} -> {final}"
        assert lowrank_has_projector(opt, prob), "the low-rank weight kept full state"
        if preset in ADAM_PLAIN and store == "fp32" and param_dtype == torch.float32:
            assert_plain_equals_adamw(reference, prob, opt)
    if compare_default_dtype and default != torch.float32:
        again = make_problem(shape_name, param_dtype, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(again, build(preset, again, projector, transfer, store), STEPS)
        for p, q in zip(prob.params(), again.params(), strict=True):
            assert torch.equal(p, q), f"result depends on the default dtype ({default})"
    return "ran"


def lowrank_has_projector(opt: torch.optim.Optimizer, prob: Problem) -> bool:
    st = opt.state.get(prob.lowrank, {})
    return "projector" in st or any(isinstance(k, str) and k.startswith("projector") for k in st)


def assert_plain_equals_adamw(reference: Problem, prob: Problem, opt: torch.optim.Optimizer) -> None:
    group = opt.param_groups[1]
    betas = group.get("betas", (0.9, 0.999))
    adamw = torch.optim.AdamW(reference.plain, lr=group["lr"], betas=betas, eps=group.get("eps", 1e-8),
                              weight_decay=group["weight_decay"])
    for _ in range(STEPS):
        adamw.zero_grad()
        sum((p.float() - t).pow(2).mean() for p, t in zip(reference.plain, reference.targets[1:], strict=True)
            ).backward()
        adamw.step()
    for p, q in zip(prob.plain, reference.plain, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


FULL_CROSS = [(p, j, t, s) for p in PRESETS for j in PROJECTOR_NAMES for t in TRANSFERS for s in STORES]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "projector"), [(p, j) for p in PRESETS for j in PROJECTOR_NAMES])
def test_every_combination_runs_or_is_refused(preset: str, projector: str) -> None:
    """preset x projector, over every transfer and store, on a square fp32 weight."""
    for transfer in TRANSFERS:
        for store in STORES:
            check_combination(preset, projector, transfer, store)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_defaults_on_every_shape(preset: str) -> None:
    """Each preset with its own projector and transfer on every shape, store and parameter dtype."""
    cls = lro.registry.OPTIMIZERS[preset]
    projector = cls.preset_defaults.get("projector", "svd")
    transfer = cls.preset_defaults.get("transfer", "keep")
    for shape_name in SHAPES:
        for store in STORES:
            assert check_combination(preset, projector, transfer, store, shape_name) == "ran"
        assert check_combination(preset, projector, transfer, "fp32", shape_name, torch.bfloat16) == "ran"


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("LRO_MATRIX_EXAMPLES", "120")), deadline=None,
          derandomize=os.environ.get("LRO_MATRIX_RANDOM") is None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(preset=st.sampled_from(PRESETS), projector=st.sampled_from(PROJECTOR_NAMES),
       transfer=st.sampled_from(TRANSFERS), store=st.sampled_from(STORES), shape_name=st.sampled_from(sorted(SHAPES)),
       param_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       default=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**16))
def test_matrix_property(preset: str, projector: str, transfer: str, store: str, shape_name: str,
                         param_dtype: torch.dtype, default: torch.dtype, seed: int) -> None:
    check_combination(preset, projector, transfer, store, shape_name, param_dtype, seed,
                      compare_default_dtype=True, default=default)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_preset_independent_of_default_dtype(preset: str, default: torch.dtype) -> None:
    cls = lro.registry.OPTIMIZERS[preset]
    projector = cls.preset_defaults.get("projector", "svd")
    transfer = cls.preset_defaults.get("transfer", "keep")
    check_combination(preset, projector, transfer, "fp32", "tall", compare_default_dtype=True, default=default)


@pytest.mark.parametrize(("preset", "projector", "transfer", "store", "param_dtype", "seed", "default"), [
    ("frugal", "entries", "keep", "fp32", torch.bfloat16, 11973, torch.float64),
    ("frugal", "entries", "reset_on_change", "bf16", torch.bfloat16, 38730, torch.bfloat16),
    ("frugal", "entries", "keep", "fp32", torch.float32, 1, torch.float32),
])
def test_found_by_random_seeds(preset: str, projector: str, transfer: str, store: str, param_dtype: torch.dtype,
                               seed: int, default: torch.dtype) -> None:
    """Random-seed property runs once the presets' projector options stopped hiding these pairs: the entries
    projector's complement viewed a transposed gradient's copy as 1-D (``view`` needs a row-major copy)."""
    assert check_combination(preset, projector, transfer, store, "transposed", param_dtype, seed,
                             compare_default_dtype=True, default=default) == "ran"
