"""param_groups (HF target_modules semantics) and the optimizer registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "o_proj": nn.Linear(16, 16)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})
        self.norm = nn.LayerNorm(16)


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.gate = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def _lowrank(groups) -> set[int]:
    return {id(p) for g in groups if "rank" in g for p in g["params"]}


def _names(model, ids) -> set[str]:
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_default_targets_attn_and_mlp_linear_weights_only() -> None:
    model = LM()
    groups = lro.param_groups(model, rank=4)
    names = _names(model, _lowrank(groups))
    assert names == {f"layers.{i}.{m}.weight" for i in range(2) for m in
                     ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # nothing lost
    assert groups[-1]["rank"] == 4


def test_all_linear_excludes_output_head_and_embeddings() -> None:
    model = LM()
    names = _names(model, _lowrank(lro.param_groups(model, target_modules="all-linear")))
    assert "gate.weight" in names and "lm_head.weight" not in names and "embed_tokens.weight" not in names
    assert len(names) == 9


def test_regex_is_full_match_and_fragments_can_be_regexes() -> None:
    model = LM()
    names = _names(model, _lowrank(lro.param_groups(model, target_modules=r"layers\.0\..*_proj")))
    assert names == {f"layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                                       "mlp.down_proj")}
    names = _names(model, _lowrank(lro.param_groups(model, target_modules=[r".*\.mlp\..*"])))
    assert len(names) == 4 and all(".mlp." in n for n in names)


def test_head_goes_low_rank_only_when_named() -> None:
    model = LM()
    names = _names(model, _lowrank(lro.param_groups(model, target_modules=["attn", "lm_head"])))
    assert "lm_head.weight" in names


def test_no_match_raises_or_warns_loudly() -> None:
    model = LM()
    with pytest.raises(ValueError, match="target_modules"):
        lro.param_groups(model, target_modules=["attention"])
    with pytest.warns(UserWarning, match="plain Adam"):
        groups = lro.param_groups(model, target_modules=["attention"], on_no_match="warn")
    assert not _lowrank(groups)


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"target_modules": 3}, TypeError, "target_modules"), ({"target_modules": []}, ValueError, "target_modules"),
    ({"rank": 0}, ValueError, "rank"), ({"on_no_match": "ignore"}, ValueError, "on_no_match"),
])
def test_bad_group_arguments(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        lro.param_groups(LM(), **kwargs)


def test_frozen_params_left_out_and_options_forwarded() -> None:
    model = LM()
    model.embed_tokens.weight.requires_grad_(False)
    groups = lro.param_groups(model, rank=8, update_proj_gap=50, plain_options={"weight_decay": 0.0})
    assert all(p is not model.embed_tokens.weight for g in groups for p in g["params"])
    assert groups[-1]["update_proj_gap"] == 50 and groups[0]["weight_decay"] == 0.0


def test_include_frozen_keeps_them_and_they_train_once_unfrozen() -> None:
    """A user's report: a parameter frozen when the groups were built never trained after ``requires_grad_(True)``
    (left out silently). ``include_frozen=True`` keeps it: no state while frozen, stepped once unfrozen."""
    model = LM()
    frozen = model.layers[0].self_attn["q_proj"].weight
    frozen.requires_grad_(False)
    assert not any(p is frozen for g in lro.param_groups(model, rank=4) for p in g["params"])
    groups = lro.param_groups(model, rank=4, include_frozen=True)
    assert any(p is frozen for g in groups if "rank" in g for p in g["params"])
    opt = lro.GaLoreAdamW(groups, lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def backward() -> None:  # what autograd leaves: a gradient for every parameter that requires one
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None

    backward()
    opt.step()
    assert not opt.state.get(frozen)
    frozen.requires_grad_(True)
    before = frozen.detach().clone()
    backward()
    opt.step()
    assert not torch.equal(before, frozen.detach()) and opt.state[frozen]["step"] == 1
    with pytest.raises(TypeError, match="include_frozen"):
        lro.param_groups(model, include_frozen="yes")


def test_registry_create_from_model_and_names() -> None:
    assert {"galore_adamw", "galore_adafactor"} <= set(lro.available_optimizers())
    model = LM()
    for name in ("galore_adamw", "GaLoreAdamW", "galore-adamw"):
        opt = lro.create_optimizer(name, model, lr=1e-3, rank=4)
        assert isinstance(opt, lro.GaLoreAdamW)
        assert opt.param_groups[-1]["rank"] == 4
    opt = lro.create_optimizer("galore_adamw", list(model.parameters()))
    assert opt.param_groups[0]["rank"] is None


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="name"):
        lro.create_optimizer("adamw_but_better", LM())
    with pytest.raises(TypeError, match="name"):
        lro.create_optimizer(None, LM())  # type: ignore[arg-type]


def test_every_registered_optimizer_runs_from_a_model() -> None:
    model = LM()
    x = torch.randint(0, 50, (4, 6))
    for name in lro.available_optimizers():
        opt = lro.create_optimizer(name, model, rank=4, lr=1e-3)
        h = model.embed_tokens(x)
        for blk in model.layers:
            h = h + blk.mlp["down_proj"](torch.relu(blk.mlp["up_proj"](blk.self_attn["o_proj"](
                blk.self_attn["q_proj"](blk.norm(h))))))
        model.lm_head(model.gate(h)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_one_group_list_builds_two_independent_optimizers() -> None:
    model = LM()
    groups = lro.param_groups(model, rank=4)
    a = lro.GaLoreAdamW(groups, lr=1e-3)
    b = lro.GaLoreAdamW(groups, lr=5e-2, scale=1.0)
    assert a.param_groups[-1]["scale"] == 0.25 and b.param_groups[-1]["scale"] == 1.0
    assert b.param_groups[0]["lr"] == 5e-2 and "lr" not in groups[0]


def test_group_projector_options_refine_optimizer_level_ones() -> None:
    model = LM()
    groups = lro.param_groups(model, rank=4, projector="rsvd", projector_options={"power_iters": 3})
    opt = lro.GaLoreAdamW(groups, projector_options={"oversample": 2})
    proj = opt._parts(opt.param_groups[-1])[0]
    assert (proj.power_iters, proj.oversample) == (3, 2)


# -- names users already type: registry, class and HF Transformers `optim` names ------------------------------
HF_NAMES = {"galore_adamw": ("galore_adamw", {}), "galore_adamw_8bit": ("galore_adamw", {"state_dtype": "8bit"}),
            "galore_adafactor": ("galore_adafactor", {})}


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_every_registry_and_class_name_resolves(name: str) -> None:
    from lowrank_optim.registry import OPTIMIZERS

    cls_name = OPTIMIZERS[name].__name__
    for spelling in (name, cls_name, cls_name.upper(), name.replace("_", "-")):
        assert lro.resolve_optimizer(spelling) == (name, {}, False), spelling


@pytest.mark.parametrize(("hf", "expected"), sorted(HF_NAMES.items()))
def test_hf_optim_names_resolve_with_their_implied_kwargs(hf: str, expected: tuple) -> None:
    assert lro.resolve_optimizer(hf) == (*expected, False)
    assert lro.resolve_optimizer(hf + "_layerwise") == (*expected, True)
    opt = lro.create_optimizer(hf, LM(), rank=4)
    assert type(opt).__name__ == {"galore_adamw": "GaLoreAdamW", "galore_adafactor": "GaLoreAdafactor"}[expected[0]]
    assert opt.param_groups[-1]["state_dtype"] == expected[1].get("state_dtype", "fp32")


def test_hf_name_contradicted_by_a_keyword_and_layerwise_names_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"state_dtype.*galore_adamw_8bit"):
        lro.create_optimizer("galore_adamw_8bit", LM(), rank=4, state_dtype="fp32")
    assert lro.create_optimizer("galore_adamw_8bit", LM(), rank=4, state_dtype="8bit").param_groups[-1][
        "state_dtype"] == "8bit"
    with pytest.raises(ValueError, match=r"galore_adamw_layerwise.*LayerwiseUpdater"):
        lro.create_optimizer("galore_adamw_layerwise", LM(), rank=4)


def test_apollo_adamw_maps_to_apollo() -> None:
    """HF's ``apollo_adamw`` is our ``apollo`` preset; a clear message while that preset is not registered."""
    if "apollo" in lro.available_optimizers():
        assert lro.resolve_optimizer("apollo_adamw") == ("apollo", {}, False)
        assert lro.resolve_optimizer("apollo_adamw_layerwise") == ("apollo", {}, True)
        assert type(lro.create_optimizer("apollo_adamw", LM(), rank=4)).__name__ == "APOLLO"
    else:
        with pytest.raises(ValueError, match=r"apollo_adamw.*'apollo'.*not registered"):
            lro.resolve_optimizer("apollo_adamw")


def test_planner_cli_accepts_every_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.planner import main, plan_memory

    base = ["estimate", "--model", "llama-60m", "--rank", "128"]
    outputs = {}
    for spelling in ("galore_adamw", "GaLoreAdamW", "galore_adamw_8bit"):
        assert main([*base, "--optimizer", spelling]) == 0
        outputs[spelling] = capsys.readouterr().out
    assert len(set(outputs.values())) == 1  # the CLI's default store is 8-bit: all three are the same plan
    assert main([*base, "--optimizer", "galore_adamw_8bit", "--state-dtype", "fp32"]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert main([*base, "--optimizer", "no_such_optimizer"]) == 2
    assert "galore_adamw_8bit" in capsys.readouterr().err  # the message lists the HF names
    layerwise = plan_memory("llama-60m", "galore_adamw_layerwise", rank=128)
    assert layerwise.settings["layerwise"] and layerwise == plan_memory("llama-60m", "galore_adamw", rank=128,
                                                                        layerwise=True)


class _VGGLike(nn.Module):
    """torchvision VGG's layout: features, then ``classifier = Sequential(Linear, ReLU, Linear, ReLU, Linear)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


class _ResNetLike(nn.Module):
    """torchvision ResNet's ``fc`` and timm ViT's ``head`` as direct children; an MLP's ``fc`` inside a block."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.fc = nn.Linear(16, 16)
        self.block.head = nn.Linear(16, 16)
        setattr(self, head, nn.Linear(16, 10))


class _SeqCls(nn.Module):
    """HF ``*ForSequenceClassification``: the head is ``score``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block()])
        self.score = nn.Linear(16, 3, bias=False)


def test_all_linear_leaves_every_kind_of_output_head_plain() -> None:
    def chosen(model: nn.Module) -> set[str]:
        return _names(model, _lowrank(lro.param_groups(model, target_modules="all-linear", warn=False)))

    # a container head: only its last Linear is the output layer, the hidden ones are projected
    assert chosen(_VGGLike()) == {"classifier.0.weight", "classifier.2.weight"}
    for head in ("fc", "head"):  # a top-level head; the same names inside a block are hidden layers
        assert chosen(_ResNetLike(head)) == {"block.fc.weight", "block.head.weight"}, head
    assert "score.weight" not in chosen(_SeqCls()) and len(chosen(_SeqCls())) == 4
