"""HF Transformers Trainer, both routes, on a tiny LlamaForCausalLM built from a config (nothing downloaded).

Each route trains 4 steps with a checkpoint at step 2, then a fresh Trainer resumes from that checkpoint
(the Trainer reloads ``optimizer.pt`` with ``torch.load(weights_only=True)``) and must end on the very
same weights as the uninterrupted run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowrank_optim as lro  # noqa: E402

TARGETS = ["self_attn", "mlp"]
N_LINEAR = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        ids = torch.randint(0, 64, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def args(out: Path) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, save_strategy="steps", per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)


def route_groups(model: torch.nn.Module) -> dict[str, Any]:
    groups = lro.param_groups(model, rank=4, target_modules=TARGETS, update_proj_gap=2)
    opt = lro.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, state_dtype="8bit")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return {"optimizers": (opt, sched)}


def route_cls(model: torch.nn.Module) -> dict[str, Any]:
    kwargs = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "target_modules": TARGETS, "module": model,
              "state_dtype": "8bit"}
    return {"optimizer_cls_and_kwargs": (lro.GaLoreAdamW, kwargs)}


def route_hf_names(model: torch.nn.Module) -> dict[str, Any]:
    """HF's own strings: ``optim``, ``optim_args``, ``optim_target_modules`` (read from TrainingArguments)."""
    hf_args = transformers.TrainingArguments(output_dir="unused", optim="galore_adamw_8bit", learning_rate=1e-2,
                                             optim_args="rank=4, update_proj_gap=2", optim_target_modules=TARGETS,
                                             report_to=[], use_cpu=True)
    cls, kwargs = lro.hf.from_training_args(hf_args, model)
    assert cls is lro.GaLoreAdamW
    assert kwargs == {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "lr": 1e-2, "state_dtype": "8bit",
                      "target_modules": TARGETS, "module": model}
    return {"optimizer_cls_and_kwargs": (cls, kwargs)}


def inner(opt: torch.optim.Optimizer) -> lro.LowRankOptimizer:
    while not isinstance(opt, lro.LowRankOptimizer):  # accelerate's AcceleratedOptimizer wraps it
        opt = opt.optimizer
    return opt


@pytest.mark.parametrize("route", [route_groups, route_cls, route_hf_names],
                         ids=["optimizers", "optimizer_cls_and_kwargs", "hf_optim_strings"])
def test_trainer_trains_and_resumes_exactly(route: Callable[[torch.nn.Module], dict[str, Any]],
                                            tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "a"), train_dataset=dataset(), **route(model))
    trainer.train()
    opt = inner(trainer.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for p, st in opt.state.items() if "projector" in st)
    # exactly the 2-D weights of the targeted nn.Linear modules are projected: not embed_tokens, not lm_head
    assert len(projected) == N_LINEAR
    assert all(("self_attn" in n or "mlp" in n) and n.endswith(".weight") for n in projected)
    assert all(st["step"] == 4 for st in opt.state.values())
    # the Trainer's decay / no-decay groups are kept as built (route 2) or ours are (route 1)
    assert {g["weight_decay"] for g in opt.param_groups} <= {0.0, 0.1}
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = tmp_path / "a" / "checkpoint-2"
    assert os.path.isfile(ckpt / "optimizer.pt")
    resumed_model = tiny_llama()
    resumed = transformers.Trainer(model=resumed_model, args=args(tmp_path / "b"), train_dataset=dataset(),
                                   **route(resumed_model))
    resumed.train(resume_from_checkpoint=str(ckpt))
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, uninterrupted[k]), k
    assert all(st["step"] == 4 for st in inner(resumed.optimizer).state.values())


def test_hf_optim_args_are_typed_like_hf_parses_them() -> None:
    model = tiny_llama()
    cls, kw = lro.hf.optimizer_cls_and_kwargs("galore_adafactor", model, "rank=8,scale=0.5,beta1=0.9,"
                                              "relative_step=false", "all-linear")
    assert cls is lro.GaLoreAdafactor and kw["rank"] == 8 and isinstance(kw["rank"], int)
    assert kw["scale"] == 0.5 and kw["beta1"] == 0.9 and kw["relative_step"] is False
    assert kw["update_proj_gap"] == 200 and kw["target_modules"] == "all-linear" and "lr" not in kw
    # our own names keep the preset's defaults (Fira's scale is not HF GaLore's), plus HF's rank
    cls, kw = lro.hf.optimizer_cls_and_kwargs("Fira", model, None, ["mlp"], lr=3e-3)
    assert cls is lro.Fira and kw == {"rank": 128, "lr": 3e-3, "target_modules": ["mlp"], "module": model}
    opt = cls([p for p in model.parameters()], **kw)
    assert opt.param_groups[0]["rank"] == 128


def test_hf_apollo_keys_and_scale_follow_hf_and_the_authors() -> None:
    """HF's APOLLO-Mini recipe (``proj``, ``scale_type``, ``proj_type``, ``scale=128``) builds our APOLLO with
    ``projector``, ``scale_type``, ``proj_side`` and ``scale = sqrt(128)``: the step equals the direct
    construction bit for bit (the authors' code and pytorch-optimizer apply ``sqrt(scale)``)."""
    torch.manual_seed(0)
    model = tiny_llama()
    cls, kw = lro.hf.optimizer_cls_and_kwargs(
        "apollo_adamw", model, "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200,proj_type=std",
        ["mlp"], lr=1e-3)
    assert cls is lro.APOLLO and kw["scale"] == math.sqrt(128.0) and kw["scale_type"] == "tensor"
    assert kw["projector"] == "random" and kw["proj_side"] == "std" and "proj" not in kw and "proj_type" not in kw
    other = tiny_llama()
    other.load_state_dict(model.state_dict())
    a = cls(list(model.parameters()), **kw)
    b = lro.APOLLO(list(other.parameters()), lr=1e-3, rank=1, scale=math.sqrt(128.0), scale_type="tensor",
                   update_proj_gap=200, target_modules=["mlp"], module=other)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for m, opt in ((model, a), (other, b)):
        m(ids, labels=ids).loss.backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), n
    # HF's default APOLLO scale is 1 (sqrt(1) = 1); a keyword given directly is ours, unchanged
    assert lro.hf.optimizer_cls_and_kwargs("apollo_adamw", model, None, ["mlp"])[1]["scale"] == 1.0
    assert lro.hf.optimizer_cls_and_kwargs("apollo_adamw", model, None, ["mlp"], scale=2.0)[1]["scale"] == 2.0
    # GaLore's proj_type is our proj_side; our own names keep our keys
    assert lro.hf.optimizer_cls_and_kwargs("galore_adamw", model, "proj_type=reverse_std", ["mlp"])[1][
        "proj_side"] == "reverse_std"
    with pytest.raises(ValueError, match="scale"):
        lro.hf.optimizer_cls_and_kwargs("apollo_adamw", model, "scale=-1", ["mlp"])


@pytest.mark.parametrize(("args", "exc", "word"), [
    (("galore_adamw", "rank=8,oops", ["mlp"]), ValueError, "optim_args"),
    (("galore_adamw", "rank=eight", ["mlp"]), ValueError, "rank"),
    (("galore_adamw", 5, ["mlp"]), TypeError, "optim_args"),
    (("galore_adamw", None, None), ValueError, "optim_target_modules"),
    (("galore_adamw_layerwise", None, ["mlp"]), ValueError, "LayerwiseUpdater"),
    (("adamw_torch", None, ["mlp"]), ValueError, "name"),
])
def test_hf_helper_refuses_bad_input_by_name(args: tuple, exc: type, word: str) -> None:
    with pytest.raises(exc, match=word):
        lro.hf.optimizer_cls_and_kwargs(args[0], tiny_llama(), args[1], args[2])
