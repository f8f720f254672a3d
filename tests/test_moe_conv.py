"""N-D weights: MoE expert stacks ``(E, m, n)`` and convolution weights ``(out, in, *kernel)``.

The contract: a 3-D expert parameter is ``E`` matrices ``m x n``, one basis and one set of moments each; a
convolution weight is the matrix ``out x (in * prod(kernel))``. Selection (``param_groups``,
``target_modules`` resolution, the planner) is tested on a tiny HF Mixtral / Qwen2-MoE built from a config
(nothing downloaded; Transformers v5 stores experts as 3-D parameters) and on a small CNN; the optimizer
side checks projector state, closed-form state bytes, training progress and bit-exact resume.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.memory import count_state_bytes, estimate_state_bytes, is_lowrank_shape, n_matrices
from lowrank_optim.planner import hf_config_shapes, num_experts, plan_memory
from lowrank_optim.targets import resolve_targets

transformers = pytest.importorskip("transformers")

HIDDEN, RANK = 64, 16  # rank 1/4 of the expert width (every expert matrix has min(m, n) = 64)
MIXTRAL = {"vocab_size": 128, "hidden_size": HIDDEN, "intermediate_size": HIDDEN, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
           "tie_word_embeddings": False, "router_aux_loss_coef": 0.0}
TARGETS = ["mlp", "self_attn"]


def mixtral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))


class SmallCNN(nn.Module):
    """Conv2d -> Conv2d -> Conv1d over the flattened map -> linear classifier (10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv1d(32, 24, 3, padding=1)
        self.hidden = nn.Linear(24, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x.flatten(2)))
        return self.fc(torch.relu(self.hidden(x.mean(-1))))


def cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def _has_projector(st: dict, p: torch.Tensor) -> bool:
    """A conv's state holds one projector; an expert stack's, one per matrix (``st["matrices"]``)."""
    mats = st.get("matrices")
    return "projector" in st if mats is None else len(mats) == p.shape[0] and all("projector" in m for m in mats)


# -- selection ----------------------------------------------------------------------------------------------------
def test_param_groups_selects_expert_stacks_not_routers() -> None:
    model = mixtral()
    plain, low = lro.param_groups(model, rank=RANK, target_modules=TARGETS)
    names = {id(p): n for n, p in model.named_parameters()}
    low_names = {names[id(p)] for p in low["params"]}
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert experts == {f"model.layers.{i}.mlp.experts.{k}" for i in range(2) for k in ("gate_up_proj", "down_proj")}
    assert experts <= low_names
    assert low_names == experts | {f"model.layers.{i}.self_attn.{k}_proj.weight" for i in range(2) for k in "qkvo"}
    assert all(n.endswith("mlp.gate.weight") or "norm" in n or "embed" in n or "lm_head" in n
               for n in (names[id(p)] for p in plain["params"]))
    # the experts are most of the model: what the selection used to leave at full Adam state
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in experts) / total > 0.8


def test_expert_stacks_selected_by_their_own_name_and_by_all_linear() -> None:
    model = mixtral()
    assert list(lro.select_lowrank_params(model, ["gate_up_proj"])) == [
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    selected = lro.select_lowrank_params(model, "all-linear")
    assert "lm_head.weight" not in selected and "model.layers.0.mlp.gate.weight" not in selected
    assert "model.layers.1.mlp.experts.down_proj" in selected
    assert lro.select_lowrank_modules(model, TARGETS) == [n[: -len(".weight")] for n in selected if "self_attn" in n]


def test_qwen2_moe_shared_expert_and_expert_stacks() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=24)
    model = transformers.Qwen2MoeForCausalLM(cfg)
    selected = lro.select_lowrank_params(model, ["mlp"])
    assert sorted(selected) == sorted(
        ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
         "model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
         "model.layers.0.mlp.shared_expert.down_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight"])


def test_conv_needs_the_opt_in_and_is_named_when_left_plain() -> None:
    model = cnn()
    with pytest.warns(UserWarning, match=r"conv1\.weight \(Conv2d, shape \(16, 3, 3, 3\); pass include_conv=True\)"):
        groups = lro.param_groups(model, rank=4, target_modules="all-linear")
    assert groups[1]["params"] == [model.hidden.weight]  # the top-level fc is the output layer: plain
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = lro.param_groups(model, rank=4, target_modules="all-linear", include_conv=True, scale=0.5)
    # convolutions get their own group: nd_layout="conv" makes the engine read the 3-D Conv1d weight as a conv
    assert groups[1]["params"] == [model.hidden.weight] and "nd_layout" not in groups[1]
    assert groups[2] == {"params": [model.conv1.weight, model.conv2.weight, model.conv3.weight], "rank": 4,
                         "scale": 0.5, "nd_layout": "conv"}
    assert lro.param_groups(model, rank=4, target_modules=["conv2"], include_conv=True)[1:] == [
        {"params": [model.conv2.weight], "rank": 4, "nd_layout": "conv"}]
    with pytest.raises(TypeError, match="include_conv"):
        lro.param_groups(model, rank=4, include_conv="yes")


def test_other_nd_tensor_of_a_targeted_module_is_named() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.zeros(2, 3, 4))
            self.proj = nn.Linear(4, 4)

    model = nn.Sequential()
    model.add_module("attn", Odd())
    with pytest.warns(UserWarning, match=r"attn\.kernel \(Odd, shape \(2, 3, 4\); no low-rank layout\)"):
        groups = lro.param_groups(model, rank=2, target_modules=["attn"])
    assert groups[1]["params"] == [model.attn.proj.weight]
    assert any(p is model.attn.kernel for p in groups[0]["params"])


def test_target_modules_resolution_follows_the_same_rules() -> None:
    """``target_modules`` resolved by the optimizer (module= or torch's named params) selects the experts too."""
    model = mixtral()
    expect = set(map(id, lro.param_groups(model, rank=RANK, target_modules=TARGETS)[1]["params"]))
    opt = lro.GaLoreAdamW(model.parameters(), rank=RANK, target_modules=TARGETS, module=model)
    assert resolve_targets(opt.param_groups, model) == expect
    named = lro.GaLoreAdamW(list(model.named_parameters()), rank=RANK, target_modules=TARGETS)
    assert resolve_targets(named.param_groups, None) == expect
    # a convolution weight named in param_names: refused by name without include_conv, taken with it
    conv = cnn()
    bad = lro.GaLoreAdamW(list(conv.named_parameters()), rank=4, target_modules=["conv1"])
    with pytest.raises(ValueError, match=r"'conv1\.weight'.*include_conv=True"):
        resolve_targets(bad.param_groups, None)
    ok = lro.GaLoreAdamW(list(conv.named_parameters()), rank=4, target_modules=["conv1"], include_conv=True)
    assert resolve_targets(ok.param_groups, None) == {id(conv.conv1.weight)}
    via_module = lro.GaLoreAdamW([{"params": list(conv.parameters()), "nd_layout": "conv"}], rank=4,
                                 target_modules=["conv"], module=conv, include_conv=True)
    assert resolve_targets(via_module.param_groups, conv) == {id(conv.conv1.weight), id(conv.conv2.weight),
                                                              id(conv.conv3.weight)}
    # with the default nd_layout ("auto") a selected convolution weight is a convolution whatever its dimensions
    # (a user's report: the 3-D Conv1d weight was refused at the first step, a Conv3d one too), from the module
    # or from the names
    for auto in (lro.GaLoreAdamW(conv.parameters(), rank=4, target_modules=["conv"], module=conv, include_conv=True),
                 lro.GaLoreAdamW(list(conv.named_parameters()), rank=4, target_modules=["conv"], include_conv=True)):
        assert resolve_targets(auto.param_groups, auto._planner.module) == {
            id(conv.conv1.weight), id(conv.conv2.weight), id(conv.conv3.weight)}
        assert auto._planner.kind(auto.param_groups[0], conv.conv3.weight) == "conv"
    # a group that says its N-D tensors are experts cannot hold a selected convolution: refused by name
    experts = lro.GaLoreAdamW([{"params": list(conv.parameters()), "nd_layout": "experts"}], rank=4,
                              target_modules=["conv"], module=conv, include_conv=True)
    with pytest.raises(ValueError, match=r"'conv1\.weight' \(shape .*\) is a convolution weight"):
        resolve_targets(experts.param_groups, conv)


# -- planner ------------------------------------------------------------------------------------------------------
MOE_CONFIGS = [
    ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 16,
                                               "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2,
                                               "mlp_only_layers": [2]}),
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 16,
                                               "mlp_only_layers": [0]}),
    ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4}),
    ("Qwen2Config", "Qwen2ForCausalLM", {}),
    ("Qwen3Config", "Qwen3ForCausalLM", {}),
]


@pytest.mark.parametrize(("config_cls", "model_cls", "extra"), MOE_CONFIGS, ids=[c[0] for c in MOE_CONFIGS])
def test_planner_shapes_are_the_real_moe_models(config_cls: str, model_cls: str, extra: dict) -> None:
    cfg = getattr(transformers, config_cls)(vocab_size=128, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_cls)(cfg)
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert hf_config_shapes(cfg.to_dict()) == real
    assert num_experts(cfg.to_dict()) == extra.get("num_experts", extra.get("num_local_experts", 0))
    # the planner's name rules select exactly what param_groups selects on the real model
    planned = estimate_state_bytes(real, rank=RANK, target_modules=TARGETS).lowrank
    assert planned == list(lro.select_lowrank_params(model, TARGETS))


def test_planner_counts_expert_matrices_and_conv_opt_in() -> None:
    shapes = hf_config_shapes({**MIXTRAL, "model_type": "mixtral"})
    plan = plan_memory(shapes, "galore_adamw", rank=RANK, state_dtype="fp32", target_modules=TARGETS)
    assert plan.n_lowrank == 2 * (4 + 2 * 8)  # 4 attention matrices + 2 stacks of 8 experts per layer
    assert n_matrices("model.layers.0.mlp.experts.down_proj", (8, 64, 64)) == 8
    conv = {"conv.weight": (32, 16, 3, 3), "conv.bias": (32,), "head.weight": (10, 32)}
    assert not is_lowrank_shape("conv.weight", conv["conv.weight"], ["conv"])
    assert is_lowrank_shape("conv.weight", conv["conv.weight"], ["conv"], include_conv=True)
    assert plan_memory(conv, rank=4, target_modules=["conv"], include_conv=True).n_lowrank == 1


# -- the optimizer on N-D weights ---------------------------------------------------------------------------------
def _moment_bytes(numel: int) -> int:
    return 4 * numel  # fp32 store


def _matrix_bytes(m: int, n: int, rank: int) -> int:
    """GaLore's closed form for one ``m x n`` matrix: fp32 basis ``min(m, n) x r`` + two moments ``max(m, n) x r``."""
    r = min(rank, m, n)
    return 4 * min(m, n) * r + 2 * _moment_bytes(max(m, n) * r)


def closed_form(model: nn.Module, lowrank: set[int], rank: int) -> int:
    """Plain: two full moments; expert stack ``(E, m, n)``: ``E`` matrices; conv: ``out x (in * prod(kernel))``."""
    total = 0
    for name, p in model.named_parameters():
        if id(p) not in lowrank:
            total += 2 * _moment_bytes(p.numel())
        elif p.dim() == 3 and "expert" in name:
            total += p.shape[0] * _matrix_bytes(p.shape[1], p.shape[2], rank)
        else:
            total += _matrix_bytes(p.shape[0], p[0].numel(), rank)
    return total


def _lm_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MIXTRAL["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(seed))


def _lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    ids = _lm_batch(step % 2)
    return model(input_ids=ids, labels=ids).loss


def _cnn_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step % 2)
    x = torch.randn(8, 3, 6, 6, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


CASES = {  # model, loss, param_groups keys, lr (low-rank updates are scaled by GaLore's 0.25)
    "moe": (mixtral, _lm_loss, {"target_modules": TARGETS, "rank": RANK}, 3e-3),
    "cnn": (cnn, _cnn_loss, {"target_modules": "all-linear", "rank": 4, "include_conv": True}, 1e-1),
}


def _train(model: nn.Module, loss_fn, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, i)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _build(case: str, seed: int = 0) -> tuple[nn.Module, object, torch.optim.Optimizer, set[int]]:
    make, loss_fn, kw, lr = CASES[case]
    model = make(seed)
    groups = lro.param_groups(model, update_proj_gap=5, **kw)
    opt = lro.GaLoreAdamW(groups, lr=lr)
    return model, loss_fn, opt, {id(p) for g in groups[1:] for p in g["params"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nd_weights_carry_projector_state_in_closed_form(case: str) -> None:
    model, loss_fn, opt, low = _build(case)
    _train(model, loss_fn, opt, 1)
    nd = [p for p in model.parameters() if id(p) in low and p.dim() > 2]
    assert nd and all(_has_projector(opt.state[p], p) for p in nd)
    rank = CASES[case][2]["rank"]
    assert opt.state_bytes() == count_state_bytes(opt) == closed_form(model, low, rank)


def test_moe_state_is_under_045_of_adamw() -> None:
    model, loss_fn, opt, _ = _build("moe")
    _train(model, loss_fn, opt, 1)
    ref_model = mixtral()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3)
    _train(ref_model, loss_fn, ref, 1)
    ratio = opt.state_bytes() / count_state_bytes(ref)
    assert ratio <= 0.45, ratio


@pytest.mark.parametrize("case", sorted(CASES))
def test_nd_training_improves_and_resumes_bit_exact(case: str) -> None:
    model, loss_fn, opt, _ = _build(case)
    losses = _train(model, loss_fn, opt, 12)
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    after = _train(model, loss_fn, opt, 7, start=12)  # crosses a refresh (step 15)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, _, opt2, _ = _build(case, seed=1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert _train(model2, loss_fn, opt2, 7, start=12) == after
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_optimizer_side_targets_project_every_conv_like_param_groups(conv_type: type) -> None:
    """``target_modules`` + ``include_conv=True`` given to the optimizer (HF's route) projects a Conv1d / Conv3d
    weight as ``param_groups(include_conv=True)`` does: the same steps, bit for bit (a user's report: both were
    refused at the first step under the default ``nd_layout``)."""
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(nn.Sequential(conv_type(4, 8, 3)))
    x = torch.randn((2, 4) + (6,) * (nets[0][0].weight.dim() - 2), generator=torch.Generator().manual_seed(1))
    a = lro.GaLoreAdamW(list(nets[0].parameters()), lr=1e-2, rank=2, target_modules=["0"], include_conv=True,
                        module=nets[0])
    b = lro.GaLoreAdamW(lro.param_groups(nets[1], rank=2, target_modules=["0"], include_conv=True), lr=1e-2)
    for _ in range(3):
        for net, opt in ((nets[0], a), (nets[1], b)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    assert a.state[nets[0][0].weight]["projector"]["basis"].shape == (8, 2)
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
