"""Train a tiny LLaMA with the HF Trainer and GaLore (8-bit state), through both of the Trainer's routes.

Runs on CPU in seconds; nothing is downloaded (the model is built from a config, the data is random tokens).

    pip install lowrank_optim transformers accelerate
    python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lowrank_optim as lro


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 128, (32,), generator=g)), "labels": ids} for _ in range(64)]
    out = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
                             weight_decay=0.0, logging_steps=5, save_steps=10, report_to=[], use_cpu=True)

    # Route 1: build the optimizer (and scheduler) yourself from our param groups.
    model = tiny_llama()
    groups = lro.param_groups(model, rank=16, target_modules=["self_attn", "mlp"], update_proj_gap=10)
    opt = lro.GaLoreAdamW(groups, lr=1e-2, state_dtype="8bit")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()

    # Route 2: the Trainer builds its decay / no-decay groups and calls cls(groups, **kwargs); `target_modules`
    # picks the projected weights at the first step, with names taken from `module` (the Trainer keeps the
    # keyword `model` for itself). The scheduler comes from TrainingArguments.
    model = tiny_llama()
    kwargs = {"lr": 1e-2, "rank": 16, "update_proj_gap": 10, "target_modules": ["self_attn", "mlp"],
              "module": model, "state_dtype": "8bit"}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(lro.GaLoreAdamW, kwargs))
    trainer.train()
    # ... and resume from a checkpoint (optimizer state reloads with torch.load(weights_only=True)).
    trainer.train(resume_from_checkpoint=f"{out}/checkpoint-10")


if __name__ == "__main__":
    main()
