"""Memory planner: agrees with ``state_bytes()`` measured on a real model, and with the closed form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CASES

import lowrank_optim as lro
from lowrank_optim.planner import hf_config_shapes, main, plan_memory

TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
TARGETS = ("self_attn", "mlp")
RANK = 32  # gate/up low-rank moments are 128 x 32 = 4096 elements: 8-bit codes


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def real_llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def test_config_shapes_are_the_real_models(config_path: Path) -> None:
    model = real_llama()
    assert hf_config_shapes(TINY) == {n: tuple(p.shape) for n, p in model.named_parameters()}


CASES_8BIT = [(name, "8bit") for name in lro.available_optimizers()] + [("galore_adamw", "fp32"),
                                                                          ("galore_adamw", "bf16")]


@pytest.mark.parametrize(("name", "state_dtype"), CASES_8BIT)
def test_plan_equals_measured_state_bytes(name: str, state_dtype: str, config_path: Path) -> None:
    kwargs = dict(CASES.get(name, {}))
    plan = plan_memory(config_path, name, rank=RANK, state_dtype=state_dtype, weight_dtype="fp32",
                       target_modules=TARGETS, update_proj_gap=5, **kwargs)
    model = real_llama()
    groups = lro.param_groups(model, rank=RANK, target_modules=list(TARGETS), update_proj_gap=5)
    opt = lro.create_optimizer(name, groups, state_dtype=state_dtype, **kwargs)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt.step()
    assert plan.state_total == opt.state_bytes()
    assert plan.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.gradients == grad_bytes
    assert plan.n_lowrank == sum("projector" in st for st in opt.state.values()) == 2 * 7


def _q8(n: int) -> int:
    """8-bit moment bytes: 1 per element + one fp32 absmax per 256-element block (fp32 under 4096)."""
    return n + 4 * -(-n // 256) if n >= 4096 else 4 * n


def test_llama_60m_closed_form() -> None:
    """GaLore 8-bit, rank 128, layer-wise, on GaLore's LLaMA-60M config, against hand-derived sizes."""
    L, d, ff, V, r = 8, 512, 1376, 32000, 128
    plan = plan_memory("llama-60m", "galore_adamw", rank=r, state_dtype="8bit", layerwise=True)
    n_params = 2 * V * d + L * (4 * d * d + 3 * d * ff + 2 * d) + d
    assert plan.n_params == n_params and plan.weights == 2 * n_params
    assert plan.gradients == 2 * V * d  # layer-wise: only the largest gradient (embedding / head) is alive
    # every projected matrix has min(m, n) = 512: basis 512 x 128 fp32; moments max(m, n) x 128, two of them
    assert plan.state["projector bases"] == L * 7 * d * r * 4
    assert plan.state["low-rank moments"] == L * (4 * 2 * _q8(d * r) + 3 * 2 * _q8(ff * r))
    assert plan.state["plain moments (embeddings, head, norms, ...)"] == 2 * 2 * _q8(V * d) + (2 * L + 1) * 2 * 4 * d
    assert plan.n_lowrank == 7 * L


def test_cli_estimate(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--model", str(config_path), "--optimizer", "galore_adamw", "--rank", "8",
            "--state-dtype", "8bit", "--layerwise", "--target-modules", "self_attn", "mlp"]
    assert main([*argv, "--budget-gb", "24"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer state", "projector bases", "total", "fits"):
        assert word in out
    assert main([*argv, "--budget-gb", "0.0001"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["estimate", "--model", "no-such-model"]) == 2
    assert "Invalid model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="state_dtype"):
        plan_memory("llama-60m", state_dtype="4bit")
    with pytest.raises(ValueError, match="config"):
        hf_config_shapes({"model_type": "gpt2", "n_embd": 8})
