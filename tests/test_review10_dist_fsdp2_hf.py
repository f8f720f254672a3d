"""FSDP2 (gloo, CPU, 3 ranks) on a tiny HF Mixtral built from a config, groups from ``lro.param_groups`` by name.

5 experts per stack split 2 + 2 + 1 (uneven), attention and embeddings row-sharded, refreshes every 3 steps
(staggered where the preset allows it). Against one process on the same gradients (``fsdp2_moe_worker``'s
synthetic ones, the whole gradient's rows on each rank):

* a NaN in the last rank's expert shard only, at a refresh step, skips the step on every rank with the state
  bit-unchanged; the run (9 steps, refreshes before and after the skip) equals one process that skipped the same
  step (relative 1e-5 per parameter);
* a DCP checkpoint at step 4 resumes bit-exactly at the same world size.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_moe_worker as moe
import fsdp2_worker as base
from helpers import CASES, launch_ranks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 3
STEPS = 8
GAP = 3
NAN_AT = 3  # a refresh step (phase 0)
CFG: dict[str, Any] = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 5,
                       "num_experts_per_tok": 2, "tie_word_embeddings": False}
#: preset (+stagger: refresh_stagger=True)
NAMES = ["galore_adamw+stagger", "flora+stagger", "gum"]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**CFG))


def build(name: str, model: torch.nn.Module, store: str = "fp32") -> torch.optim.Optimizer:
    preset = name.removesuffix("+stagger")
    extra = {"refresh_stagger": True} if name.endswith("+stagger") else {}
    groups = lro.param_groups(model, rank=4, target_modules=["mlp", "self_attn"], update_proj_gap=GAP, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lro.create_optimizer(preset, groups, state_dtype=store, **CASES.get(preset, {}))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          source: str = "synthetic", nan_rank: int | None = None) -> None:
    for step in steps:
        opt.zero_grad()
        moe.synthetic_grads(model, step)
        if step == NAN_AT and nan_rank is not None and rank == nan_rank:
            grad = model.model.layers[0].mlp.experts.down_proj.grad
            grad = grad.to_local() if hasattr(grad, "to_local") else grad
            grad.view(-1)[5] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()


def sharded(world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(_local(a), _local(b))
    return a == b


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _parity(names: list[str], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        model = sharded(world)
        opt = build(name, model)
        train(model, opt, range(NAN_AT))
        before = {p: copy.deepcopy(st) for p, st in opt.state.items()}
        train(model, opt, range(NAN_AT, NAN_AT + 1), rank, world, nan_rank=world - 1)
        unchanged = all(_same(before[p], opt.state[p]) for p in before) and len(before) == len(opt.state)
        verdicts: list[Any] = [None] * world
        dist.all_gather_object(verdicts, unchanged)
        train(model, opt, range(NAN_AT + 1, STEPS + 1))
        out[name] = {"unchanged": verdicts, "after_nan": base.whole(model)}
    return out


def _path(out_dir: str, world: int, key: str) -> str:
    return str(Path(out_dir) / f"review10-hf-{world}-{key.replace('/', '-')}")


RUN = base.Run(sharded, build, train, 4, STEPS, _path)


def _checkpoint(cases: list[tuple[str, str, str]], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    return base.save_resume(RUN, cases, rank, world, out_dir)


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    base.run_jobs({"parity": _parity, "checkpoint": _checkpoint}, rank, world, init_method, jobs, out_dir,
                  prefix="review10-hf-")


def _one_process(name: str) -> dict[str, torch.Tensor]:
    """One process on the same gradients, the NaN step skipped."""
    model = make_model()
    opt = build(name, model)
    train(model, opt, range(STEPS + 1), nan_rank=0)
    return base.whole(model)


def _worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max((float((got[n] - r).norm() / r.norm().clamp_min(1e-30)), n) for n, r in ref.items())


def test_fsdp2_hf_mixtral_equals_one_process(tmp_path: Path) -> None:
    got = launch_ranks(main, WORLD, [("parity", NAMES), ("checkpoint", [("galore_adamw+stagger", "fp32", "x")])],
                       tmp_path, 240, prefix="review10-hf-")
    for name in NAMES:
        res = got["parity"][name]
        assert res["unchanged"] == [True] * WORLD, (name, res["unchanged"])
        rel, pname = _worst(res["after_nan"], _one_process(name))
        assert rel <= 1e-5, (name, "after the skipped step", pname, rel)
    for key, res in got["checkpoint"].items():
        assert all(torch.equal(res["resumed"][n], t) for n, t in res["uninterrupted"].items()), key
