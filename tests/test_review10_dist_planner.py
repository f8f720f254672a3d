"""The memory planner's ``shards=K`` against a real FSDP2 job (gloo, CPU, 3 ranks) on a tiny HF Mixtral.

``fully_shard`` gives rank 0 ``ceil(d0 / K)`` rows of every tensor (torch's ``Shard`` rule), so rank 0 is the fullest
rank, and an MoE expert stack ``(E, m, n)`` is split by whole experts: 5 experts on 3 ranks are 2 + 2 + 1, so rank 0
holds 2 / 5 of each stack (weights, gradients, state), not 1 / 3; the router ``(5, d)`` likewise. The planner used to
divide the whole model's weights and a sharded preset's expert state by K, under-reporting the fullest rank (by 10%
here; by 2x for 8 experts on 16 ranks). Every other first axis of this model is divisible by 3, so the plan equals
rank 0's measured bytes exactly: weights (= gradients) and the state of GaLoreAdamW and GaLore+ (Fira and DCT-AdamW:
but for their small replicated entries, in closed form); the peak state agrees with the state (it used to stay 1 / K
of one process's).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro

sys.path.insert(0, os.path.dirname(__file__))
from helpers import launch_ranks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 3
TIMEOUT_S = 120
#: First axes: vocab 96, hidden 48, k/v 24, experts 5 (2 + 2 + 1), router 5; the rest divisible by 3.
CFG: dict[str, Any] = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 5,
                       "num_experts_per_tok": 2, "tie_word_embeddings": False}
TARGETS = ["mlp", "self_attn"]
RANK = 8
NAMES = ("galore_adamw", "galore_plus", "fira", "dct_adamw")
#: Bytes a preset keeps replicated on every rank (which the planner divides by K like the rest): Fira's limiter
#: norm (one fp32 per matrix) and DCT's column indices (r int64 per matrix), for the 4 attention matrices.
REPLICATED = {"fira": 4 * 4, "dct_adamw": 4 * RANK * 8}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**CFG))


def _job(names: list[str], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    import fsdp2_moe_worker as moe
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for name in names:
        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = lro.create_optimizer(name, lro.param_groups(model, rank=RANK, target_modules=TARGETS), lr=1e-3,
                                   state_dtype="fp32")
        moe.synthetic_grads(model, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        weights = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        got: list[Any] = [None] * world
        dist.all_gather_object(got, (weights, opt.state_bytes()))
        out[name] = got
    return out


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    import fsdp2_worker as base

    base.run_jobs({"bytes": _job}, rank, world, init_method, jobs, out_dir, prefix="review10-planner-")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("review10_planner")
    return launch_ranks(main, WORLD, [("bytes", list(NAMES))], out, TIMEOUT_S, prefix="review10-planner-")["bytes"]


def _shapes() -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in make_model().named_parameters()}


def test_plan_equals_the_fullest_rank(measured: dict[str, Any]) -> None:
    shapes = _shapes()
    for name in NAMES:
        plan = lro.plan_memory(shapes, name, rank=RANK, state_dtype="fp32", weight_dtype="fp32",
                               target_modules=TARGETS, shards=WORLD)
        ranks = measured[name]
        assert ranks[0] == max(ranks), (name, ranks)  # rank 0 is the fullest, weights and state
        weights, state = ranks[0]
        assert plan.weights == plan.gradients == weights, (name, plan.weights, weights)
        held = sum(plan.state.values())
        extra = REPLICATED.get(name, 0) * (WORLD - 1) / WORLD  # held whole, counted as 1 / K
        assert held + extra - 1 <= state <= held + extra, (name, plan.state, state)
        assert plan.state_peak == held, (name, plan)  # after the first step; GaLore+'s warm-up score included


def test_expert_share_closed_form() -> None:
    """Rank 0's share of each tensor: ``ceil(d0 / K) / d0``; 8 experts on 16 ranks: one expert (1 / 8)."""
    from fractions import Fraction

    from lowrank_optim.distributed.rank_share import fullest_bytes, fullest_share

    assert fullest_share((5, 96, 48), 3) == Fraction(2, 5)
    assert fullest_share((8, 4, 4), 16) == Fraction(1, 8)
    assert fullest_share((48,), 3) == Fraction(1, 3) and fullest_share((), 4) == 1
    assert fullest_bytes([(1000, (5, 10)), (300, (3,))], 3) == 400 + 100
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (8, 32, 16), "model.layers.0.mlp.experts.down_proj":
              (8, 16, 16)}
    one = lro.plan_memory(shapes, "galore_adamw", rank=4, state_dtype="fp32", weight_dtype="fp32",
                          target_modules=TARGETS)
    sixteen = lro.plan_memory(shapes, "galore_adamw", rank=4, state_dtype="fp32", weight_dtype="fp32",
                              target_modules=TARGETS, shards=16)
    assert sixteen.weights == one.weights // 8 and sixteen.gradients == one.gradients // 8
    assert all(sixteen.state[k] == v // 8 for k, v in one.state.items())
