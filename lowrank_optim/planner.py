"""Memory planner: weights, gradients and optimizer state of a model before allocating it.

``lowrank-optim estimate --model llama-7b --optimizer galore_adamw --rank 1024 --state-dtype 8bit
--layerwise --budget-gb 24`` (or :func:`plan_memory` from Python). Optimizer state comes from
:func:`lowrank_optim.memory.estimate_state_bytes` (one real ``step()`` on meta tensors, so every method's
exact state layout is counted, including fp32 projector bases); weights and gradients are closed forms:

* weights: every parameter in ``weight_dtype`` (bf16 by default, the GaLore paper's convention);
* gradients: the same, for every trainable parameter; with ``layerwise=True`` (GaLore's per-layer updates,
  :class:`lowrank_optim.layerwise.LayerwiseUpdater`, no gradient accumulation) only the largest single
  gradient, since each one is applied and freed as soon as it exists.

Not counted: activations (batch and sequence length dependent), temporaries of the step (e.g. the SVD at a
refresh), the CUDA context and allocator slack. The GaLore paper's 22.0 GB for LLaMA-7B with 8-bit GaLore
(arXiv:2403.03507, Sec. 5.5) is a measurement that includes activations at a 256-token batch.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ._validation import check_choice, check_int, check_number
from .distributed.rank_share import fullest_bytes, fullest_share
from .engine import LowRankOptimizer
from .memory import LLAMA_CONFIGS, estimate_state_bytes, llama_shapes, n_matrices, state_phases
from .projectors.quantized_basis import BASIS_DTYPES
from .registry import HF_OPTIM, available_optimizers, resolve_optimizer
from .state import STATE_DTYPES

Shape = tuple[int, ...]
GB = 10**9
GIB = 2**30
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: ``--model`` presets: GaLore's LLaMA configs (``configs/llama_*.json``), vocabulary 32000, untied head.
PRESETS = {f"llama-{k.lower()}": k for k in LLAMA_CONFIGS}


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` found (all sizes in bytes).

    Attributes:
        model: the model's name or config path.
        optimizer: the optimizer's registered name.
        n_params: parameter count.
        weights: bytes of the weights.
        gradients: bytes of the gradients alive at the peak.
        state: optimizer state by part (``projector bases``, ``low-rank moments``, ``plain moments``).
        settings: rank, state dtype, weight dtype, layer-wise flag.
        budget: the budget in bytes (``None``: none given).
        n_lowrank: number of projected matrices (an MoE expert stack ``(E, m, n)`` counts ``E``).
        state_peak: the largest optimizer state at any step (GaLore+'s warm-up score, the largest FRUGAL
            window or GUM draw); ``None``: the same as :attr:`state_total`.
        state_steady: the largest once warm-up buffers are freed; ``None``: the same as :attr:`state_total`.
    """

    model: str
    optimizer: str
    n_params: int
    weights: int
    gradients: int
    state: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    n_lowrank: int = 0
    state_peak: int | None = None
    state_steady: int | None = None

    @property
    def state_total(self) -> int:
        """Bytes of the whole optimizer state after the first step (by part in :attr:`state`)."""
        return sum(self.state.values())

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state at its peak (what must fit)."""
        peak = self.state_total if self.state_peak is None else max(self.state_peak, self.state_total)
        return self.weights + self.gradients + peak

    @property
    def fits(self) -> bool | None:
        """Whether :attr:`total` fits :attr:`budget` (``None`` without a budget)."""
        return None if self.budget is None else self.total <= self.budget

    def format(self) -> str:
        """A human-readable table (GB = 10^9 bytes, GiB = 2^30 bytes)."""
        s = self.settings
        rank = "full rank" if s["rank"] is None else f"rank {s['rank']}"
        mode = ", layer-wise" if s["layerwise"] else ""
        if s.get("shards", 1) > 1:
            mode += f", fullest rank (rank 0) of {s['shards']} (FSDP2)"
        rows = [(f"weights ({s['weight_dtype']})", self.weights),
                (f"gradients ({s['weight_dtype']}{', largest single tensor' if s['layerwise'] else ''})",
                 self.gradients),
                (f"optimizer state ({s['state_dtype']} moments)", self.state_total)]
        rows += [(f"  {k}" + (f" ({s.get('basis_dtype', 'fp32')})" if k == "projector bases" else ""), v)
                 for k, v in self.state.items()]
        if self.state_peak is not None and self.state_peak != self.state_total:
            rows.append(("optimizer state, peak (warm-up / largest draw)", self.state_peak))
        if self.state_steady is not None and self.state_steady != self.state_total:
            rows.append(("optimizer state, steady (after warm-up)", self.state_steady))
        rows.append(("total", self.total))
        lines = [f"{self.model}: {self.n_params / 1e9:.3f} B parameters, {self.optimizer}, {rank}, "
                 f"{self.n_lowrank} projected matrices{mode}"]
        lines += [f"  {name:<48} {v / GB:9.2f} GB {v / GIB:9.2f} GiB" for name, v in rows]
        if self.budget is not None:
            left = self.budget - self.total
            verdict = "fits" if left >= 0 else "does NOT fit"
            lines.append(f"  budget {self.budget / GB:.2f} GB: {verdict} ({left / GB:+.2f} GB)")
        lines.append("  not counted: activations, step temporaries (SVD at refresh), CUDA context, allocator slack")
        return "\n".join(lines)


#: Config keys holding the number of routed experts (Mixtral / GPT-OSS, Qwen-MoE / OLMoE, DeepSeek naming).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: ``model_type`` -> width of the per-layer q/k RMSNorms: ``"head"`` (one head_dim vector, Qwen3) or
#: ``"full"`` (the whole projection, OLMo / OLMoE).
QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "olmo2": "full"}


#: MoE ``model_type``\ s whose layout :func:`hf_config_shapes` builds (checked against Transformers' models).
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
#: Config keys whose layout :func:`hf_config_shapes` does not build (a positive value changes the shapes).
UNMODELED_KEYS = {"q_lora_rank": "multi-head latent attention", "kv_lora_rank": "multi-head latent attention",
                  "first_k_dense_replace": "dense first layers", "n_shared_experts": "shared experts"}


def _refuse_unmodeled(config: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for a config whose shapes :func:`hf_config_shapes` would get wrong (DeepSeek-V2/V3's
    MLA, dense first layers and shared experts, GLM-4-MoE, GPT-OSS's ``(E, in, out)`` experts with biases, ...)."""
    model_type = config.get("model_type")
    found = [f"{k}={config[k]!r} ({why})" for k, why in UNMODELED_KEYS.items()
             if isinstance(config.get(k), numbers.Integral) and not isinstance(config.get(k), bool) and config[k] > 0]
    if not found and num_experts(config) and model_type is not None and model_type not in MOE_MODEL_TYPES:
        found = [f"an MoE layout other than {', '.join(MOE_MODEL_TYPES)}"]
    if found:
        raise ValueError(f"Invalid config: model_type {model_type!r} has {'; '.join(found)}, which the planner does "
                         "not model (its plan would be wrong); pass the real shapes instead: build the model on the "
                         "meta device (with torch.device('meta'): model = AutoModelForCausalLM.from_config(config)) "
                         "and give plan_memory {name: tuple(p.shape) for name, p in model.named_parameters()}")


def num_experts(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer read from an HF config (0: a dense model); see :data:`EXPERT_COUNT_KEYS`."""
    for key in EXPERT_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return 0


def _is_sparse_layer(config: Mapping[str, Any], i: int) -> bool:
    """Qwen-MoE's rule (``decoder_sparse_step``, ``mlp_only_layers``); every layer for Mixtral / OLMoE."""
    step = config.get("decoder_sparse_step") or 1
    return i not in (config.get("mlp_only_layers") or ()) and (i + 1) % step == 0


def hf_config_shapes(config: Mapping[str, Any]) -> dict[str, Shape]:
    """Parameter names and shapes of a LLaMA-style decoder, dense or MoE, from an HF ``config.json`` dict.

    Reads ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``vocab_size`` and, when present, ``num_key_value_heads`` (grouped-query attention), ``head_dim``,
    ``tie_word_embeddings``, ``attention_bias`` (q, k, v, o), ``qkv_bias`` (q, k, v: Qwen2-MoE) and
    ``mlp_bias`` (LLaMA, Mistral, Qwen2 naming), the q/k norms of :data:`QK_NORM`'s model types and
    Qwen2's q, k, v biases (built unconditionally by its attention).

    MoE (HF Transformers v5 layout: experts as 3-D parameters ``(E, out, in)``): the number of experts
    ``E`` from :data:`EXPERT_COUNT_KEYS`; the expert width from ``moe_intermediate_size`` (Qwen-MoE,
    DeepSeek) or else ``intermediate_size`` (Mixtral, OLMoE); a router ``mlp.gate.weight`` ``(E, d)``,
    ``mlp.experts.gate_up_proj`` ``(E, 2 f, d)`` and ``mlp.experts.down_proj`` ``(E, d, f)``; a shared
    expert of ``shared_expert_intermediate_size`` with its ``(1, d)`` gate (Qwen2-MoE); layers in
    ``mlp_only_layers`` or off the ``decoder_sparse_step`` are dense MLPs of ``intermediate_size``.
    Checked against the models Transformers builds for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE configs.
    Other layouts are refused rather than planned wrong: DeepSeek's MLA (``q_lora_rank`` / ``kv_lora_rank``), dense
    first layers (``first_k_dense_replace``), shared experts ``n_shared_experts``, and an MoE ``model_type`` other
    than :data:`MOE_MODEL_TYPES` (GPT-OSS's ``(E, in, out)`` experts with biases, ...).

    Raises:
        ValueError: a required key is missing or not an int; a layout above that is not modeled (the message
            gives the meta-device route to the real shapes).
    """
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required
               if isinstance(config.get(k), bool) or not isinstance(config.get(k), numbers.Integral)]
    if missing:
        raise ValueError(f"Invalid config: a LLaMA-style config needs integer {missing} "
                         f"(model_type {config.get('model_type')!r})")
    _refuse_unmodeled(config)
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    attn_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    qkv_bias = attn_bias or bool(config.get("qkv_bias", False)) or config.get("model_type") == "qwen2"
    experts = num_experts(config)
    expert_ff = config.get("moe_intermediate_size") or ff
    shared_ff = config.get("shared_expert_intermediate_size") or 0
    qk_norm = QK_NORM.get(str(config.get("model_type")))
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        outs = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
        for name, out in outs.items():
            shapes[f"{pre}self_attn.{name}.weight"] = (out, d)
            if qkv_bias:
                shapes[f"{pre}self_attn.{name}.bias"] = (out,)
        shapes[f"{pre}self_attn.o_proj.weight"] = (d, heads * head_dim)
        if attn_bias:
            shapes[f"{pre}self_attn.o_proj.bias"] = (d,)
        if qk_norm is not None:
            full = qk_norm == "full"
            shapes[f"{pre}self_attn.q_norm.weight"] = (heads * head_dim if full else head_dim,)
            shapes[f"{pre}self_attn.k_norm.weight"] = (kv_heads * head_dim if full else head_dim,)
        if experts and _is_sparse_layer(config, i):
            shapes[f"{pre}mlp.gate.weight"] = (experts, d)
            shapes[f"{pre}mlp.experts.gate_up_proj"] = (experts, 2 * expert_ff, d)
            shapes[f"{pre}mlp.experts.down_proj"] = (experts, d, expert_ff)
            mlps = {"mlp.shared_expert.": shared_ff} if shared_ff else {}
        else:
            mlps = {"mlp.": ff}
        for sub, width in mlps.items():
            for name, shape in (("gate_proj", (width, d)), ("up_proj", (width, d)), ("down_proj", (d, width))):
                shapes[f"{pre}{sub}{name}.weight"] = shape
                if mlp_bias:
                    shapes[f"{pre}{sub}{name}.bias"] = (shape[0],)
        if experts and shared_ff and _is_sparse_layer(config, i):
            shapes[f"{pre}mlp.shared_expert_gate.weight"] = (1, d)
        shapes[f"{pre}input_layernorm.weight"] = (d,)
        shapes[f"{pre}post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def model_shapes(model: str | Path | Mapping[str, Sequence[int]]) -> dict[str, Shape]:
    """Named shapes from a preset name (``llama-60m`` ... ``llama-7b``), an HF ``config.json`` path, or a
    mapping name -> shape."""
    if isinstance(model, Mapping):
        return {str(n): tuple(int(s) for s in shape) for n, shape in model.items()}
    if not isinstance(model, (str, Path)):
        raise TypeError(f"Invalid model: expected a preset name, a config.json path or a mapping, got {model!r}")
    key = str(model).lower()
    if key in PRESETS:
        return llama_shapes(**LLAMA_CONFIGS[PRESETS[key]])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"Invalid model: {str(model)!r} is neither a preset {sorted(PRESETS)} nor a config.json")
    return hf_config_shapes(json.loads(path.read_text()))


def plan_memory(model: str | Path | Mapping[str, Sequence[int]], optimizer: str = "galore_adamw", *,
                rank: int | None = 128, state_dtype: str = "8bit", layerwise: bool = False,
                budget_gb: float | None = None, weight_dtype: str = "bf16",
                target_modules: str | Sequence[str] = ("attn", "mlp"), update_proj_gap: int | None = None,
                include_conv: bool = False, shards: int = 1, basis_dtype: str = "fp32",
                **optimizer_kwargs: Any) -> MemoryPlan:
    """Plans training memory (weights, gradients, optimizer state by part) without allocating the model.

    Args:
        model: preset (``llama-7b``, ...), HF ``config.json`` path (or its folder), or name -> shape.
        optimizer: registered optimizer name (:func:`lowrank_optim.available_optimizers`), class name or HF
            ``optim`` name (:func:`lowrank_optim.resolve_optimizer`: ``galore_adamw_8bit`` sets
            ``state_dtype="8bit"``, a ``*_layerwise`` name sets ``layerwise=True``).
        rank: projection rank (``None`` or 0: every parameter plain, e.g. 8-bit Adam with ``galore_adamw``).
        state_dtype: ``fp32``, ``bf16`` or ``8bit`` moments.
        layerwise: per-layer updates (only the largest gradient is alive at a time).
        budget_gb: memory budget in GB (10^9 bytes; a "24 GB" card has 24 GiB, so this is conservative).
        weight_dtype: ``bf16``, ``fp16`` or ``fp32`` weights and gradients.
        target_modules: name fragments or a regex selecting the projected weights.
        update_proj_gap: refresh period (``None``: the method's own; does not change the sizes). Passed to the
            optimizer, not the group, so it never overrides a method's own period silently.
        include_conv: also project convolution weights (3-D to 5-D ``.weight`` tensors of matched modules,
            for a name -> shape mapping).
        shards: FSDP2 ranks (``fully_shard``): weights, gradients and optimizer state of the fullest rank (rank 0,
            which holds ``ceil(d0 / shards)`` rows of every tensor whose first axis is ``d0``: weights, gradients
            and plain moments exactly; MoE expert stacks ``ceil(E / shards)`` whole experts of ``E``, weights and
            state, with every preset: :mod:`lowrank_optim.distributed.rank_share`). The other projected
            matrices' state: presets whose parts run sharded (:mod:`lowrank_optim.distributed.fsdp`: svd / rsvd /
            rsvd_heads / random / dct / online PCA / COAP projectors with Adam, Adafactor, SGD or Muon and a drop,
            Fira, APOLLO or sparse (GaLore+) residual; FRUGAL's blocks; GUM) divide it by ``shards`` (uneven
            chunks add at most a row of each moment and basis); the others keep it replicated. 1: one process
            or DDP (every rank holds everything). Not counted: FSDP2's all-gathered unit of weights.
        basis_dtype: how projector bases are stored, ``fp32`` (default), ``bf16``, ``int8`` or ``int4``
            (:mod:`lowrank_optim.projectors.quantized_basis`); given to the optimizer as
            ``projector_options={"basis_dtype": ...}``. Under ``shards`` a quantized basis is divided like an fp32
            one (its codes and scales are chunked, :mod:`lowrank_optim.distributed.bases`).
        **optimizer_kwargs: further optimizer keyword arguments.

    Raises:
        ValueError: ``shards < 1``, or ``shards > 1`` with ``layerwise`` (no layer-wise updates under FSDP2).
    """
    if not isinstance(optimizer, str):
        raise TypeError(f"Invalid optimizer: expected a registered name, got {optimizer!r}")
    optimizer, implied, hf_layerwise = resolve_optimizer(optimizer)
    layerwise = layerwise or hf_layerwise
    if "state_dtype" in implied and implied["state_dtype"] != state_dtype:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} contradicts the optimizer name, which means "
                         f"state_dtype={implied['state_dtype']!r}")
    if rank == 0:
        rank = None
    if rank is not None:
        check_int("rank", rank, low=1)
    check_choice("state_dtype", state_dtype, STATE_DTYPES)
    check_choice("weight_dtype", weight_dtype, tuple(WEIGHT_DTYPES))
    budget = None if budget_gb is None else round(check_number("budget_gb", budget_gb, low=0.0) * GB)
    check_int("shards", shards, low=1)
    if shards > 1 and layerwise:
        raise ValueError("Invalid shards: layer-wise updates (layerwise=True) do not run under FSDP2")
    check_choice("basis_dtype", basis_dtype, BASIS_DTYPES)
    if basis_dtype != "fp32":
        options = dict(optimizer_kwargs.get("projector_options") or {})
        optimizer_kwargs["projector_options"] = {**options, "basis_dtype": basis_dtype}
    shapes = model_shapes(model)
    dtype = WEIGHT_DTYPES[weight_dtype]
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    numels = {n: _numel(s) for n, s in shapes.items()}
    if update_proj_gap is not None:
        optimizer_kwargs["update_proj_gap"] = check_int("update_proj_gap", update_proj_gap, low=1)
    est = estimate_state_bytes(shapes, optimizer, rank=rank, target_modules=target_modules,
                               include_conv=include_conv, param_dtype=dtype, state_dtype=state_dtype,
                               **optimizer_kwargs)
    low = set(est.lowrank)
    low_bytes = sum(v for n, v in est.per_param.items() if n in low)
    state = {"projector bases": est.projector, "low-rank moments": low_bytes - est.projector,
             "plain moments (embeddings, head, norms, ...)": est.total - low_bytes}
    grads = max(numels.values()) * size if layerwise else sum(numels.values()) * size
    weights = sum(numels.values()) * size
    if shards > 1:  # the fullest rank (rank 0: torch's Shard rule gives it the largest chunk of every tensor)
        divided = _runs_sharded(optimizer, rank, optimizer_kwargs)
        state = _fullest_state(state, est, low, shapes, shards, divided)
        weights = grads = fullest_bytes(((numels[n] * size, s) for n, s in shapes.items()), shards)
    engine = isinstance(est.optimizer, LowRankOptimizer) and est.method == "meta-step" and bool(est.optimizer.state)
    phases = state_phases(est.optimizer, est.names) if engine else None
    if phases is not None and shards > 1:  # a sharded preset's warm-up buffers (GaLore+'s score) are row chunks too:
        # the fullest rank's state plus its share of what a phase adds to (or frees from) one process's state
        held = sum(state.values())
        phases = type(phases)(**{**vars(phases), "peak": held + -(-(phases.peak - est.total) // shards),
                                 "steady": held + -(-(phases.steady - est.total) // shards)}) if divided else None
    return MemoryPlan(model=str(model) if not isinstance(model, Mapping) else "model", optimizer=optimizer,
                      n_params=sum(numels.values()), weights=weights, gradients=grads,
                      state=state, budget=budget, n_lowrank=sum(n_matrices(n, shapes[n]) for n in low),
                      state_peak=None if phases is None else phases.peak,
                      state_steady=None if phases is None else phases.steady,
                      settings={"rank": rank, "state_dtype": state_dtype, "weight_dtype": weight_dtype,
                                "layerwise": layerwise, "shards": shards,
                                "basis_dtype": basis_dtype})


def _fullest_state(state: dict[str, int], est: Any, low: set[str], shapes: Mapping[str, Sequence[int]], shards: int,
                   divided: bool) -> dict[str, int]:
    """The fullest FSDP2 rank's optimizer state by part (:mod:`lowrank_optim.distributed.rank_share`): plain moments
    by each tensor's row chunk; MoE expert stacks by whole experts (``ceil(E / shards)`` of ``E``), with every preset;
    the other projected matrices' state divided by ``shards`` where the preset runs sharded (``divided``), else
    replicated."""
    stacks = _expert_stacks(est, low)
    out = {}
    for key, i in (("projector bases", 1), ("low-rank moments", 2)):
        rest = Fraction(state[key] - sum(v[i] for v in stacks.values()))
        out[key] = math.ceil((rest / shards if divided else rest) + sum(
            (Fraction(v[i]) * fullest_share(shapes[n], shards) for n, v in stacks.items()), Fraction(0)))
    plain = next(k for k in state if k.startswith("plain"))
    out[plain] = fullest_bytes(((v, shapes[n]) for n, v in est.per_param.items() if n not in low), shards)
    return {k: out[k] for k in state}


def _expert_stacks(est: Any, low: set[str]) -> dict[str, tuple[int, int, int]]:
    """``name -> (experts, basis bytes, moment bytes)`` of each projected MoE expert stack of a meta-step estimate
    (its state holds one state per expert, ``state["matrices"]``)."""
    from .memory import _projector_bytes, _tensor_bytes

    out: dict[str, tuple[int, int, int]] = {}
    opt = est.optimizer
    if opt is None:
        return out
    for p, st in opt.state.items():
        name = est.names.get(id(p))
        if name in low and isinstance(st, dict) and isinstance(st.get("matrices"), list) and st["matrices"]:
            bases = _projector_bytes(st)
            out[name] = (len(st["matrices"]), bases, _tensor_bytes(st, set()) - bases)
    return out


def _runs_sharded(optimizer: str, rank: int | None, kwargs: Mapping[str, Any]) -> bool:
    """Whether the projected matrices of ``optimizer`` run in FSDP2's sharded mode (state divided by ranks)."""
    from .distributed import fsdp
    from .engine import ENGINE_DEFAULTS
    from .registry import OPTIMIZERS

    if rank is None:
        return True
    opts = {**ENGINE_DEFAULTS, **OPTIMIZERS[optimizer].preset_defaults, **kwargs}
    return fsdp.sharded_parts(opts["projector"], opts["inner"], opts["residual"], opts["transfer"])


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``lowrank-optim``; ``estimate`` returns 1 when the plan does not fit ``--budget-gb``."""
    parser = argparse.ArgumentParser(prog="lowrank-optim", description="lowrank_optim tools")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="plan weights + gradients + optimizer-state memory",
                         description=__doc__.split("\n\n")[0])
    est.add_argument("--model", required=True, help=f"{', '.join(sorted(PRESETS))} or PATH/config.json")
    est.add_argument("--optimizer", default="galore_adamw",
                     help=f"registry name ({', '.join(available_optimizers())}), class name (GaLoreAdamW) or HF "
                          f"optim name ({', '.join(sorted(HF_OPTIM))}, and their _layerwise forms)")
    est.add_argument("--rank", type=int, default=128, help="projection rank (0: full rank, no projection)")
    est.add_argument("--state-dtype", default=None, choices=STATE_DTYPES,
                     help="moment storage (default: 8bit, or what the optimizer name implies)")
    est.add_argument("--weight-dtype", default="bf16", choices=tuple(WEIGHT_DTYPES))
    est.add_argument("--layerwise", action="store_true", help="per-layer updates (gradients freed one by one)")
    est.add_argument("--budget-gb", type=float, default=None, help="budget in GB (10^9 bytes)")
    est.add_argument("--target-modules", nargs="+", default=["attn", "mlp"], help="name fragments to project")
    est.add_argument("--shards", type=int, default=1, help="FSDP2 ranks: report per-rank memory (1: one process / DDP)")
    est.add_argument("--basis-dtype", default="fp32", choices=BASIS_DTYPES,
                     help="projector basis storage (blockwise absmax along columns for int8/int4)")
    args = parser.parse_args(argv)
    try:
        if args.state_dtype is None:
            args.state_dtype = resolve_optimizer(args.optimizer)[1].get("state_dtype", "8bit")
        plan = plan_memory(args.model, args.optimizer, rank=args.rank, state_dtype=args.state_dtype,
                           layerwise=args.layerwise, budget_gb=args.budget_gb, weight_dtype=args.weight_dtype,
                           target_modules=args.target_modules, shards=args.shards,
                           basis_dtype=args.basis_dtype)
    except (TypeError, ValueError) as err:
        print(f"lowrank-optim estimate: error: {err}", file=sys.stderr)
        return 2
    print(plan.format())
    return 1 if plan.fits is False else 0


__all__ = ["EXPERT_COUNT_KEYS", "MemoryPlan", "hf_config_shapes", "main", "model_shapes", "num_experts",
           "plan_memory"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
