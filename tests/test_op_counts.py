"""aten ops per steady step stay bounded (issue 12: on a GPU each dispatched op is a kernel launch).

Counted with ``torch.profiler`` on the CPU (:func:`benchmarks.op_counts.aten_ops`, every aten op, nested ones
included, as the issue measured) on a small LLaMA-shaped decoder: ``L`` layers of 7 projected matrices and two
norms, plus a tied embedding and the final norm. The slope over ``L`` (ops per decoder layer) is what a big model
multiplies, so it is bounded apart from the total. Bounds sit a little above today's counts (per layer / at one
layer: GaLoreAdamW 82 / 107, Fira 332 / 362, Flora 849 / 993; the per-parameter engine before issue 12: 213 / 256,
729 / 772, 901 / 1064), so a change that brings back per-parameter dispatches fails here. At LLaMA-60M shapes:
``python -m benchmarks.op_counts``. That no steady step builds a per-parameter tensor from a Python number or
reads a device value besides the non-finite check is ``tests/test_stacks.py``'s spy test.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_optim as lro
from benchmarks import common
from benchmarks.op_counts import aten_ops
from lowrank_optim.memory import llama_shapes

#: name -> (ops per decoder layer, ops per step at one layer)
BOUNDS = {"galore_adamw": (90, 120), "fira": (350, 390), "flora": (900, 1050)}


def _ops(name: str, layers: int) -> int:
    shapes = llama_shapes(n_layers=layers, d_model=32, d_ffn=48, vocab=64, tie_embeddings=True)
    params = common.synthetic_params(shapes, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lro.create_optimizer(name, common.split_groups(params, 8, 10**9), lr=1e-3)
        opt.step()
        opt.step()
        every, _ = aten_ops(opt.step)
    return sum(every.values())


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_ops_per_steady_step_are_bounded(name: str) -> None:
    one, three = _ops(name, 1), _ops(name, 3)
    per_layer = (three - one) / 2
    bound_layer, bound_one = BOUNDS[name]
    assert per_layer <= bound_layer, (name, per_layer)
    assert one <= bound_one, (name, one)


def test_galore_steady_step_has_one_matmul_each_way_per_matrix() -> None:
    """GaLoreAdamW's steady step: one projection and one lift per projected matrix, one fused Adam kernel for
    all projected matrices and one per plain tensor, one fused non-finite check, nothing else per matrix."""
    shapes = llama_shapes(n_layers=2, d_model=32, d_ffn=48, vocab=64, tie_embeddings=True)
    params = common.synthetic_params(shapes, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lro.GaLoreAdamW(common.split_groups(params, 8, 10**9), lr=1e-3)
        opt.step()
        opt.step()
        _, top = aten_ops(opt.step)
    plain = sum(1 for p in params.values() if p.dim() < 2 or p.shape[0] == 64)
    assert top["aten::mm"] == 14 and top["aten::addmm_"] == 14, top
    assert top["aten::_fused_adamw_"] == 1 + plain, top
    assert top["aten::_amp_foreach_non_finite_check_and_unscale_"] == 1, top
    assert "aten::numpy_T" not in top and "aten::sum" not in top, top
