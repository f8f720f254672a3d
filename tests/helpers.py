"""Shared test fixtures: tiny models, deterministic gradients, and the optimizer case table."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.distributed import local

#: Per-optimizer keyword overrides for the generic conformance suite (name -> kwargs).
#: Every registered optimizer runs through the suite; add an entry only when defaults need changing
#: for a tiny model (e.g. a short refresh period so refreshes happen inside the test).
CASES: dict[str, dict[str, Any]] = {
    "galore_adamw": {"lr": 1e-2},
    "galore_adafactor": {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
    "dct_adamw": {"lr": 1e-2},
    "online_subspace_descent": {"lr": 1e-2},
    "fira": {"lr": 1e-2},
    "frugal": {"lr": 1e-2, "density": 0.5},  # 2 projectable matrices: one active block per period
    "gum": {"lr": 1e-2, "full_rank_layers": 1},  # one matrix full-rank, one low-rank, redrawn every 3 steps
    "flora": {"lr": 1e-2, "scale_parameter": False},  # resampled every 3 steps (GROUP_OPTIONS)
    "coap": {"lr": 1e-2},  # corrections every 3 steps, randomized SVD every 15
    "galore_plus": {"lr": 1e-2, "residual_warmup": 2},  # sparse residual active from step 3
}

#: Optimizer options every case gets (a short refresh period), passed to the optimizer: a group key would
#: override each method's own value and warn (MethodDefaultWarning).
GROUP_OPTIONS: dict[str, Any] = {"update_proj_gap": 3}

STATE_DTYPES = ("fp32", "bf16", "8bit")


class TinyNet(nn.Module):
    """Two 'attn'/'mlp' linears big enough for 8-bit moments (>= 4096 elements) and a plain head."""

    def __init__(self, d_in: int = 96, d_hidden: int = 80, d_out: int = 5) -> None:
        super().__init__()
        self.attn = nn.Linear(d_in, d_hidden)
        self.mlp = nn.Linear(d_hidden, d_hidden, bias=False)
        self.norm = nn.LayerNorm(d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.mlp(torch.tanh(self.attn(x))))))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def make_data(seed: int = 1, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 96, generator=g)
    y = torch.randn(n, 5, generator=g)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x.to(next(model.parameters()).dtype)).float() - y).pow(2).mean()


def build(name: str, model: nn.Module, state_dtype: str = "fp32", rank: int = 8, **extra: Any) -> torch.optim.Optimizer:
    kwargs = {**CASES.get(name, {}), **extra}
    groups = lro.param_groups(model, rank=rank, target_modules=["attn", "mlp"])
    return lro.create_optimizer(name, groups, state_dtype=state_dtype, **{**GROUP_OPTIONS, **kwargs})


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, data_seed: int = 1) -> list[float]:
    x, y = make_data(data_seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(state_dict: dict) -> dict:
    """``torch.save`` then ``torch.load(weights_only=True)``, as HF Trainer's resume does."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def flat_state(opt: torch.optim.Optimizer) -> list[tuple[str, Any]]:
    """(path, value) pairs of the whole state, for exact comparisons."""
    out: list[tuple[str, Any]] = []

    def visit(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                visit(f"{prefix}.{k}", obj[k])
        elif isinstance(obj, list):  # a stacked parameter's per-matrix states
            for i, v in enumerate(obj):
                visit(f"{prefix}[{i}]", v)
        else:
            out.append((prefix, obj))

    sd = opt.state_dict()
    visit("state", sd["state"])
    return out


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    fa, fb = flat_state(a), flat_state(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, va), (_, vb) in zip(fa, fb, strict=True):
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype, k
            assert torch.equal(va, vb), k
        else:
            assert va == vb, k


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def resume_copy(model: nn.Module, opt: torch.optim.Optimizer, make) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copied model with a fresh optimizer (``make(model)``) loaded from a weights_only round trip of ``opt``;
    asserts the loaded state equals the original, tensor for tensor and dtype for dtype."""
    model2 = clone_model(model)
    opt2 = make(model2)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert_same_state(opt, opt2)
    return model2, opt2


def assert_same_continuation(model: nn.Module, opt: torch.optim.Optimizer, model2: nn.Module,
                             opt2: torch.optim.Optimizer, steps: int) -> None:
    """Both runs continue ``steps`` steps on the same batch: weights and state stay bit-identical."""
    train(model, opt, steps, data_seed=2)
    train(model2, opt2, steps, data_seed=2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# the gloo set-up the distributed tests share with the benchmarks (file:// rendezvous, teardown behind a barrier)
rendezvous = local.rendezvous


def launch_ranks(main: Any, world: int, jobs: list[tuple[str, list[Any]]], out: Any, timeout_s: float,
                 prefix: str = "") -> dict[str, Any]:
    """Spawns ``world`` gloo ranks of a worker's ``main`` (``fsdp2_worker.run_jobs``) on ``jobs`` and returns rank
    0's results; a timeout or a failing rank fails the test with that rank's traceback."""
    import pytest
    import torch.multiprocessing as mp

    try:
        local.spawn(main, world, (world, rendezvous(out), jobs, str(out)), timeout_s)
    except TimeoutError as err:
        pytest.fail(str(err))
    except mp.ProcessRaisedException:
        errors = sorted(out.glob(f"{prefix}error-{world}-*.txt"))
        pytest.fail(errors[0].read_text() if errors else "worker failed")
    return torch.load(out / f"{prefix}result-{world}.pt", weights_only=False)
end_process_group = local.end_process_group


def feed(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    """One ``opt.step()`` per entry of ``grads``, each setting a copy of its gradients on ``params`` (warnings off)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
