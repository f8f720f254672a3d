"""``target_modules`` resolved by the optimizer (groups built elsewhere, e.g. by HF Trainer) and the
refusal of flattened parameters (FSDP1 / DeepSpeed ZeRO)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, loss_fn, make_data, make_model, roundtrip

import lowrank_optim as lro


def trainer_style_groups(model: torch.nn.Module) -> list[dict]:
    """HF Trainer's layout: decay / no-decay groups of bare tensors, no names, no rank."""
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    x, y = make_data()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def projected(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for p, st in opt.state.items() if "projector" in st)


def test_class_level_rank_without_targets_projects_every_matrix() -> None:
    model = make_model()
    opt = lro.GaLoreAdamW(trainer_style_groups(model), rank=4, update_proj_gap=2)
    run(model, opt)
    assert projected(model, opt) == ["attn.weight", "head.weight", "mlp.weight"]


@pytest.mark.parametrize("source", ["module", "param_names"])
def test_target_modules_select_exactly_the_targeted_weights(source: str) -> None:
    model = make_model()
    if source == "module":
        opt = lro.GaLoreAdamW(trainer_style_groups(model), rank=4, update_proj_gap=2, target_modules=["attn", "mlp"],
                              module=model)
    else:
        named = [(n, p) for n, p in model.named_parameters()]
        opt = lro.GaLoreAdamW([{"params": named}], rank=4, update_proj_gap=2, target_modules=["attn", "mlp"])
    run(model, opt)
    assert projected(model, opt) == ["attn.weight", "mlp.weight"]


def test_target_modules_equal_param_groups_route_and_resume() -> None:
    """Resolving targets at the first step gives the same trajectory as ``param_groups``; resumes exactly."""
    ref = make_model()
    ref_opt = lro.GaLoreAdamW(lro.param_groups(ref, rank=4, target_modules="all-linear", update_proj_gap=2), lr=1e-2)
    model = make_model()
    opt = lro.GaLoreAdamW(list(model.parameters()), lr=1e-2, rank=4, update_proj_gap=2, target_modules="all-linear",
                          module=model)
    run(ref, ref_opt)
    run(model, opt)
    assert projected(model, opt) == ["attn.weight", "mlp.weight"]  # TinyNet's top-level head is its output layer
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    fresh = make_model()
    fresh.load_state_dict(model.state_dict())
    opt2 = lro.GaLoreAdamW(list(fresh.parameters()), lr=1e-2, rank=4, update_proj_gap=2,
                           target_modules="all-linear", module=fresh)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    run(model, opt, 3)
    run(fresh, opt2, 3)
    assert_same_state(opt, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def test_targets_resolve_at_first_step_after_parameter_swap() -> None:
    """Wrappers may replace parameter objects after construction: resolution uses the objects at step time."""
    model = make_model()
    opt = lro.GaLoreAdamW(trainer_style_groups(model), rank=4, target_modules=["mlp"], module=model)
    old = model.mlp.weight
    new = torch.nn.Parameter(old.detach().clone())
    model.mlp.weight = new
    for group in opt.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    run(model, opt, 1)
    assert projected(model, opt) == ["mlp.weight"]


def test_bad_target_modules_are_named() -> None:
    model = make_model()
    groups = trainer_style_groups(model)
    with pytest.raises(ValueError, match=r"target_modules.*module=model"):
        lro.GaLoreAdamW(groups, rank=4, target_modules=["attn"])  # no names anywhere
    with pytest.raises(ValueError, match="all-linear"):
        lro.GaLoreAdamW([{"params": list(model.named_parameters())}], rank=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="matched no"):
        lro.GaLoreAdamW(trainer_style_groups(model), rank=4, target_modules=["nothing_here"], module=model)
    with pytest.raises(TypeError, match="target_modules"):
        lro.GaLoreAdamW(trainer_style_groups(model), rank=4, target_modules=[1, 2], module=model)
    with pytest.raises(TypeError, match="module"):
        lro.GaLoreAdamW(trainer_style_groups(model), rank=4, target_modules=["attn"], module="model")


def test_flattened_parameters_are_refused() -> None:
    """FSDP1 marks its FlatParameter (and use_orig_params views) ``_fsdp_flattened``; ZeRO-3 sets ``ds_id``."""
    flat = torch.nn.Parameter(torch.zeros(96 * 80))
    flat._fsdp_flattened = True
    with pytest.raises(ValueError, match=r"flattened.*ZeroRedundancyOptimizer"):
        lro.GaLoreAdamW([{"params": [flat], "rank": 4}])
    ds = torch.nn.Parameter(torch.zeros(0))
    ds.ds_id = 3
    with pytest.raises(ValueError, match="flattened"):
        lro.GaLoreAdamW([ds], rank=4)
    lro.GaLoreAdamW([flat])  # plain (no rank): fine, the plain rule is element-wise
    model = make_model()
    model.attn.weight._fsdp_flattened = True
    with pytest.raises(ValueError, match=r"Invalid model.*flattened"):
        lro.param_groups(model, rank=4)
    # a 1-D tensor named as a targeted weight (e.g. a flattened shard under use_orig_params) is refused too
    named = [("attn.weight", torch.nn.Parameter(torch.zeros(10)))]
    opt = lro.GaLoreAdamW([{"params": named}], rank=4, target_modules=["attn"])
    named[0][1].grad = torch.ones(10)
    with pytest.raises(ValueError, match=r"'attn\.weight'.*shape"):
        opt.step()
