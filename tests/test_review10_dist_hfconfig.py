"""The memory planner on HF MoE configs it does not model: refused by name, never planned wrong.

``hf_config_shapes`` reads ``n_routed_experts`` (DeepSeek's key), so a DeepSeek-V2/V3, GLM-4-MoE or GPT-OSS
``config.json`` used to be planned as a Mixtral-style model: DeepSeek-V3 (tiny config below) got 39 tensors wrong
(MLA attention, dense first layers, shared experts missing), GPT-OSS 24 (its experts are ``(E, in, out)`` with
biases, its router is ``mlp.router``). Each is now a ``ValueError`` naming the ``model_type`` and what is not
modeled, with the meta-device route to the real shapes, which the test then follows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim.planner import hf_config_shapes

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 2}
MLA = {"n_routed_experts": 4, "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1,
       "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
       "num_experts_per_tok": 2}
CASES = [  # config class, model class, extra keys, what the message names
    ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**MLA, "n_group": 1, "topk_group": 1}, "kv_lora_rank=16"),
    ("DeepseekV2Config", "DeepseekV2ForCausalLM", MLA, "q_lora_rank=16"),
    ("Glm4MoeConfig", "Glm4MoeForCausalLM", {"n_routed_experts": 4, "moe_intermediate_size": 16,
                                             "n_shared_experts": 1, "first_k_dense_replace": 1,
                                             "num_experts_per_tok": 2}, "first_k_dense_replace=1"),
    ("GptOssConfig", "GptOssForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
     "an MoE layout other than mixtral"),
]


@pytest.mark.parametrize(("config_cls", "model_cls", "extra", "named"), CASES, ids=[c[0] for c in CASES])
def test_unmodeled_moe_config_refused_then_planned_from_meta(config_cls: str, model_cls: str, extra: dict,
                                                             named: str, tmp_path: Path) -> None:
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers has no {config_cls}")
    cfg = getattr(transformers, config_cls)(**BASE, **extra)
    config = cfg.to_dict()
    with pytest.raises(ValueError, match=rf"model_type '{config['model_type']}' has .*{named}.*meta device"):
        hf_config_shapes(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        lro.plan_memory(str(path), "galore_adamw", rank=4)
    # the route the message gives: real shapes from a model built on the meta device (nothing allocated)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_cls)(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan = lro.plan_memory(shapes, "galore_adamw", rank=4, target_modules=["self_attn", "mlp"])
    selected = lro.select_lowrank_params(model, ["self_attn", "mlp"])
    assert plan.n_lowrank == sum(shapes[n][0] if len(shapes[n]) == 3 else 1 for n in selected)
    assert plan.weights == 2 * sum(p.numel() for p in model.parameters())  # bf16 weights


def test_modeled_moe_and_dense_configs_still_planned() -> None:
    for cls, extra in (("MixtralConfig", {"num_local_experts": 4}), ("LlamaConfig", {}),
                       ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 16})):
        cfg = getattr(transformers, cls)(**BASE, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, cls.replace("Config", "ForCausalLM"))(cfg)
        assert hf_config_shapes(cfg.to_dict()) == {n: tuple(p.shape) for n, p in model.named_parameters()}, cls
