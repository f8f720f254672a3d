"""Optimizer-state memory: exact counting of a live optimizer, and estimates from shapes without allocation.

``estimate_state_bytes`` builds the parameters on PyTorch's ``meta`` device (shapes and dtypes, no
storage), gives them meta gradients and runs one real ``step()`` of the optimizer: every state tensor the
optimizer allocates is then a meta tensor whose ``numel() * element_size()`` is the exact byte count the
same step allocates on a real device. This covers every registered optimizer (and any reference optimizer
built by a callable) without a hand-written formula per method. When a step needs tensor *values* (e.g.
Adafactor's parameter RMS), the estimate falls back to allocating the engine's state the way its first step
does (``method="meta-init"``); for the engine's presets that allocation is the whole state.

The closed forms behind it (GaLore, arXiv:2403.03507, for an ``m x n`` weight with ``r`` the rank):
basis ``min(m, n) r`` fp32 values plus the inner rule's moments of shape ``max(m, n) x r`` in the state
store (``fp32`` 4 bytes, ``bf16`` 2 bytes, ``8bit`` 1 byte per element plus 4 bytes per 256-element block
for tensors of at least 4096 elements). With ``projector_options={"basis_dtype": ...}`` the basis takes
:func:`lowrank_optim.projectors.quantized_basis.basis_bytes` instead: ``2 d r`` (bf16), ``d r + 4 r ceil(d / 256)``
(int8), ``ceil(d / 2) r + 4 r ceil(d / 256)`` (int4), ``d = min(m, n)``. APOLLO keeps no basis: two ``r x max(m, n)``
moments and one fp32 norm per matrix. An MoE expert stack ``(E, m, n)`` is ``E`` such matrices (``E`` bases,
``E`` sets of moments); a convolution weight ``(out, in, *kernel)`` is the matrix ``out x (in * prod(kernel))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import LowRankOptimizer
from .groups import _matches, is_expert_name, moe_router_weights
from .projectors.blocks import BlockProjector, active_blocks
from .projectors.gum import GUMProjector
from .registry import create_optimizer
from .rules.sparse_residual import residual_count

Shape = tuple[int, ...]

#: LLaMA shapes used by GaLore's pre-training configs (``configs/llama_*.json``): layers, d_model, d_ffn, heads.
LLAMA_CONFIGS: dict[str, dict[str, int]] = {
    "60M": {"n_layers": 8, "d_model": 512, "d_ffn": 1376, "n_heads": 8},
    "130M": {"n_layers": 12, "d_model": 768, "d_ffn": 2048, "n_heads": 12},
    "350M": {"n_layers": 24, "d_model": 1024, "d_ffn": 2736, "n_heads": 16},
    "1B": {"n_layers": 24, "d_model": 2048, "d_ffn": 5461, "n_heads": 32},
    "7B": {"n_layers": 32, "d_model": 4096, "d_ffn": 11008, "n_heads": 32},
}


def llama_shapes(n_layers: int, d_model: int, d_ffn: int, vocab: int = 32000, tie_embeddings: bool = False,
                 **_: Any) -> dict[str, Shape]:
    """Parameter names (HF ``LlamaForCausalLM`` naming) and shapes of a LLaMA decoder.

    Args:
        n_layers: decoder layers.
        d_model: hidden size.
        d_ffn: SwiGLU intermediate size.
        vocab: vocabulary size (GaLore's configs: 32000).
        tie_embeddings: leave out ``lm_head.weight`` (shared with the embedding).
    """
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (vocab, d_model)}
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"] = (d_model, d_model)
        shapes[f"{pre}mlp.gate_proj.weight"] = (d_ffn, d_model)
        shapes[f"{pre}mlp.up_proj.weight"] = (d_ffn, d_model)
        shapes[f"{pre}mlp.down_proj.weight"] = (d_model, d_ffn)
        shapes[f"{pre}input_layernorm.weight"] = (d_model,)
        shapes[f"{pre}post_attention_layernorm.weight"] = (d_model,)
    shapes["model.norm.weight"] = (d_model,)
    if not tie_embeddings:
        shapes["lm_head.weight"] = (vocab, d_model)
    return shapes


def _tensor_bytes(obj: Any, seen: set, depth: int = 0) -> int:
    """Bytes of the tensors reachable from ``obj`` (dicts, lists, tuples, plain objects' attributes)."""
    if depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()  # a view keeps its whole storage alive: count the storage
        ident = storage._cdata if obj.device.type == "meta" else storage.data_ptr()
        key: Any = (str(obj.device), ident)
        size = storage.nbytes()
        if key in seen:
            return 0
        seen.add(key)
        return size
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def count_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes held in ``optimizer.state``, for any optimizer (storage shared by tensors counted once).

    Also looks inside plain objects kept in state (galore-torch's and fira's projector objects), so
    reference optimizers are counted the same way as ours. A view counts its whole storage (galore-torch's
    basis is a slice of the full SVD factor, which stays allocated), on real and on meta tensors alike.
    """
    seen: set = set()
    return sum(_tensor_bytes(st, seen) for st in optimizer.state.values())


@dataclass
class StateEstimate:
    """Result of :func:`estimate_state_bytes`.

    Attributes:
        total: bytes of every state tensor.
        per_param: bytes per parameter name.
        projector: bytes under the engine's ``state["projector"]`` (bases, indices; 0 for references).
        moments: ``total - projector``.
        method: ``"meta-step"`` (one real step on meta tensors) or ``"meta-init"`` (engine state allocation).
        lowrank: names that took the low-rank group.
        optimizer: the optimizer after its meta step (meta tensors, no storage), for :func:`state_phases`.
        names: ``id(param) -> name`` of its parameters.
    """

    total: int
    per_param: dict[str, int]
    projector: int
    moments: int
    method: str
    lowrank: list[str] = field(default_factory=list)
    optimizer: Any = field(default=None, repr=False, compare=False)
    names: dict[int, str] = field(default_factory=dict, repr=False, compare=False)


def is_lowrank_shape(name: str, shape: Shape, target: str | Sequence[str], include_conv: bool = False) -> bool:
    """Whether parameter ``name`` of ``shape`` goes low-rank, by the rules of
    :func:`lowrank_optim.select_lowrank_params` read from names and shapes alone: a 2-D ``<module>.weight``
    of a matched module, a 3-D MoE expert stack (``"expert"`` in the name; its module or its own name
    matched), and with ``include_conv`` a 3-D to 5-D ``<module>.weight`` (a convolution)."""
    dims = len(shape)
    if is_expert_name(name, shape):
        return _matches(name.rpartition(".")[0], target) or _matches(name, target)
    if not name.endswith(".weight") or not _matches(name[: -len(".weight")], target):
        return False
    return dims == 2 or (include_conv and 3 <= dims <= 5)


def _is_conv_shape(name: str, shape: Shape) -> bool:
    """Whether a low-rank parameter (:func:`is_lowrank_shape`) is a convolution weight: more than two dimensions
    and not a 3-D MoE expert stack (the engine reads it as the one matrix ``out x (in * prod(kernel))``)."""
    return len(shape) > 2 and not is_expert_name(name, shape)


def n_matrices(name: str, shape: Shape) -> int:
    """Projected matrices in a low-rank parameter: ``E`` for an expert stack ``(E, m, n)``, else 1."""
    return shape[0] if is_expert_name(name, shape) else 1


def _build(optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
           groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    opt = optimizer(groups) if callable(optimizer) else create_optimizer(optimizer, groups, **kwargs)
    if isinstance(opt, LowRankOptimizer):
        for group in opt.param_groups:
            group["nonfinite"] = "ignore"  # the finiteness check reads values; meta tensors have none
    return opt


def estimate_state_bytes(named_shapes: Mapping[str, Sequence[int]],
                         optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = "galore_adamw",
                         *, rank: int | None = 128, target_modules: str | Sequence[str] = ("attn", "mlp"),
                         include_conv: bool = False, group_options: Mapping[str, Any] | None = None,
                         param_dtype: torch.dtype = torch.float32,
                         **kwargs: Any) -> StateEstimate:
    """Optimizer-state bytes after one step, from shapes alone (meta device, nothing allocated).

    Args:
        named_shapes: parameter name -> shape (e.g. :func:`llama_shapes`).
        optimizer: a registered name (see :func:`lowrank_optim.available_optimizers`) or a callable taking
            param groups ``[{"params": plain}, {"params": lowrank, "rank": rank, **group_options}]`` and
            returning any ``torch.optim.Optimizer`` (e.g. a reference implementation); with ``include_conv``
            the convolution weights come in a third group ``{"params": convs, "rank": rank, **group_options,
            "nd_layout": "conv"}``, as :func:`lowrank_optim.param_groups` builds it (so a 3-D ``Conv1d`` and a
            5-D ``Conv3d`` weight are each the one matrix ``out x (in * prod(kernel))``, not a stack of experts
            or a refused tensor).
        rank: rank of the low-rank group (``None``: every parameter plain).
        target_modules: name fragments (substring of the module name) or a regex (full match) selecting
            the weights that go low-rank, as :func:`lowrank_optim.param_groups` does on a model
            (:func:`is_lowrank_shape`: 2-D weights and 3-D MoE expert stacks; MoE routers stay plain).
        include_conv: also project 3-D to 5-D ``.weight`` tensors of matched modules (convolutions).
        group_options: extra keys for the low-rank group (``update_proj_gap``, ``scale``, ...).
        param_dtype: dtype of the (meta) parameters and gradients.
        **kwargs: optimizer keyword arguments (``lr``, ``state_dtype``, ...), for a registered name.

    Returns:
        A :class:`StateEstimate`.
    """
    if not isinstance(named_shapes, Mapping) or not named_shapes:
        raise ValueError(f"Invalid named_shapes: expected a non-empty mapping name -> shape, got {named_shapes!r}")
    if not (isinstance(optimizer, str) or callable(optimizer)):
        raise TypeError(f"Invalid optimizer: expected a registered name or a callable, got {optimizer!r}")
    names = list(named_shapes)
    shapes = {n: tuple(int(s) for s in named_shapes[n]) for n in names}
    routers = moe_router_weights(names)
    lowrank_names = [n for n in names if rank is not None and n not in routers
                     and is_lowrank_shape(n, shapes[n], target_modules, include_conv)]
    if rank is not None and not lowrank_names:
        raise ValueError(f"Invalid target_modules: {target_modules!r} matched no 2-D weight or expert stack name")

    def fresh() -> tuple[dict[str, torch.nn.Parameter], list[dict[str, Any]]]:
        params = {n: torch.nn.Parameter(torch.empty(shapes[n], device="meta", dtype=param_dtype)) for n in names}
        for p in params.values():
            p.grad = torch.empty_like(p)
        low = set(lowrank_names)
        convs = {n for n in low if _is_conv_shape(n, shapes[n])}
        groups: list[dict[str, Any]] = []
        plain = [params[n] for n in names if n not in low]
        if plain:
            groups.append({"params": plain})
        if low - convs:
            groups.append({"params": [params[n] for n in names if n in low and n not in convs], "rank": rank,
                           **dict(group_options or {})})
        if convs:  # as lro.param_groups(include_conv=True): their own group, every N-D tensor read as a conv
            groups.append({"params": [params[n] for n in names if n in convs], "rank": rank,
                           **dict(group_options or {}), "nd_layout": "conv"})
        return params, groups

    params, groups = fresh()
    opt = _build(optimizer, groups, kwargs)
    method = "meta-step"
    try:
        opt.step()
    except (RuntimeError, NotImplementedError):
        if not isinstance(opt, LowRankOptimizer):
            raise
        params, groups = fresh()
        opt = _build(optimizer, groups, kwargs)
        method = "meta-init"
        _allocate_engine_state(opt)
    return _summarise(opt, params, method, lowrank_names)


def _projector_bytes(st: dict[str, Any]) -> int:
    """Bytes under ``state["projector"]`` of one parameter's engine state (an expert stack: of each expert's)."""
    if "projector" in st:
        return _tensor_bytes(st["projector"], set())
    subs = st.get("matrices")
    if isinstance(subs, list):
        return sum(_tensor_bytes(sub["projector"], set()) for sub in subs
                   if isinstance(sub, dict) and "projector" in sub)
    return 0


def _summarise(opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], method: str,
               lowrank_names: list[str]) -> StateEstimate:
    by_param = {id(p): n for n, p in params.items()}
    seen: set = set()
    per_param: dict[str, int] = {}
    projector = 0
    for p, st in opt.state.items():
        name = by_param.get(id(p), str(id(p)))
        per_param[name] = _tensor_bytes(st, seen)
        if isinstance(opt, LowRankOptimizer) and isinstance(st, dict):
            projector += _projector_bytes(st)
    total = sum(per_param.values())
    est = StateEstimate(total=total, per_param=per_param, projector=projector, moments=total - projector,
                        method=method, lowrank=lowrank_names)
    est.optimizer, est.names = opt, by_param
    return est


@dataclass
class StatePhases:
    """Optimizer-state bytes where a method's state changes size over a run (see :func:`estimate_state_phases`).

    Attributes:
        first: after the first step (:func:`estimate_state_bytes`).
        peak: the largest at any step: transient warm-up buffers and the largest period draw included.
        steady: the largest once the warm-up buffers are freed, over every period draw: what a long run holds.
        varying: names of the parameters whose state changes size, with the reason.
    """

    first: int
    peak: int
    steady: int
    varying: dict[str, str] = field(default_factory=dict)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def state_phases(opt: LowRankOptimizer, names: Mapping[int, str] | None = None) -> StatePhases:
    """Closed-form peak and steady state of an engine optimizer whose state exists (after one step).

    Three parts change the state's size after the first step, each computed from shapes and the store's
    closed form (:meth:`lowrank_optim.state.StateStore.bytes_for`):

    * the sparse residual (GaLore+): during its warm-up a full-size fp32 ``E^2`` score per matrix, then
      ``k = floor(density m n)`` indices (int32 below 2^31 entries) and two moments of ``k`` in the store;
    * whole-tensor blocks (FRUGAL): a period's active tensors hold full-size moments, the others none; the
      largest total over a whole cycle of windows (``random`` order: the ``k`` largest tensors);
    * GUM's full-rank draw: a drawn matrix's moments are full size for its period; the worst draw is the
      ``gamma`` matrices with the largest increase (``full_rank_prob > 0``: every matrix).

    The peak adds each parameter's own largest phase (exact for every preset, where warm-up and draws never
    meet; an upper bound for a custom mix of both). Under FSDP2, before GaLore+'s entries are chosen, a rank's
    share of the ``k`` entries depends on where the largest scores fall, so its after-warm-up bytes are bounded by
    the whole matrix's ``k`` (what this counts); once chosen, each rank's state holds its own entries exactly.

    Args:
        opt: an engine optimizer after at least one step.
        names: ``id(param) -> name`` for :attr:`StatePhases.varying` (default: the parameter index).

    Raises:
        ValueError: the optimizer holds no state yet.
    """
    if not opt.state:
        raise ValueError("Invalid opt: no state yet; run one step (or use estimate_state_phases)")
    first = steady = peak = 0
    varying: dict[str, str] = {}
    index = 0
    for group in opt.param_groups:
        proj, rule, _, _, store = opt._parts(group)
        chosen = [q for q in group["params"] if q in opt.state and "projector" in opt.state[q]]
        draws: list[tuple[int, int]] = []  # (bytes with the small state, bytes with the full-size state)
        for p in group["params"]:
            index += 1
            if p not in opt.state:
                continue
            st = opt.state[p]
            base = _tensor_bytes(st, set())
            first += base
            if "projector" not in st or proj is None:
                steady += base
                peak += base
                continue
            name = (names or {}).get(id(p), str(index - 1))

            after = base
            if "residual_score" in st:  # GaLore+'s warm-up
                k = residual_count(group["residual_density"], p.shape)
                after = (base - _tensor_bytes(st["residual_score"], set()) + k * (4 if p.numel() < 2**31 else 8)
                         + 2 * store.bytes_for(k))
                varying[name] = "sparse-residual warm-up score"
            if isinstance(proj, (BlockProjector, GUMProjector)):
                pst = st["projector"]
                cur = _moment_bytes(rule, store, proj.low_shape(p.shape, pst), group)
                small = (0,) if isinstance(proj, BlockProjector) else proj.low_shape(p.shape, None)
                draws.append((after - cur + _moment_bytes(rule, store, small, group),
                              after - cur + _moment_bytes(rule, store, p.shape, group)))
                varying[name] = "block switch" if isinstance(proj, BlockProjector) else "full-rank draw"
                peak += max(base - after, 0)
                continue
            steady += after
            peak += max(base, after)
        if draws:
            worst = _worst_draw(proj, draws, len(chosen), int(group["seed"]))
            steady += worst
            peak += worst
    return StatePhases(first=first, peak=max(peak, first), steady=steady, varying=varying)


def _moment_bytes(rule: Any, store: Any, shape: Sequence[int], group: dict[str, Any]) -> int:
    """Closed-form bytes of an inner rule's moments for a low-rank tensor of ``shape`` in ``store``."""
    return sum(store.bytes_for(_numel(s.shape)) for s in rule.moments(tuple(int(x) for x in shape), group))


def _worst_draw(proj: Any, draws: list[tuple[int, int]], count: int, seed: int) -> int:
    """Largest total over the period draws of a group's variable-size parameters (in layout order)."""
    low = sum(a for a, _ in draws)
    gains = [b - a for a, b in draws]
    if isinstance(proj, BlockProjector):
        k = min(count, round(count * proj.density))
        if proj.order == "random":
            return low + sum(sorted(gains, reverse=True)[:k])
        totals = [low + sum(gains[i] for i in active_blocks(count, period, proj.density, proj.order, seed))
                  for period in range(max(count, 1))]  # every window order cycles within ``count`` periods
        return max(totals)
    if proj.layers is not None:
        return low + sum(sorted(gains, reverse=True)[: min(proj.layers, count)])
    return low + (sum(gains) if proj.prob > 0 else 0)


def estimate_state_phases(named_shapes: Mapping[str, Sequence[int]], optimizer: str = "galore_plus", *,
                          rank: int | None = 128, target_modules: str | Sequence[str] = ("attn", "mlp"),
                          group_options: Mapping[str, Any] | None = None, param_dtype: torch.dtype = torch.float32,
                          **kwargs: Any) -> StatePhases:
    """First-step, peak and steady optimizer-state bytes from shapes alone (meta device, nothing allocated).

    Same arguments as :func:`estimate_state_bytes` (a registered engine optimizer). GaLore+ at LLaMA-1B
    shapes, rank 512, fp32: 8.38 GiB in its warm-up (the full-size ``E^2`` score), about 4.0 GiB after it.
    """
    est = estimate_state_bytes(named_shapes, optimizer, rank=rank, target_modules=target_modules,
                               group_options=group_options, param_dtype=param_dtype, **kwargs)
    opt = est.optimizer
    if not isinstance(opt, LowRankOptimizer):
        raise TypeError(f"Invalid optimizer: {optimizer!r} is not an engine optimizer")
    return state_phases(opt, est.names)


def _allocate_engine_state(opt: LowRankOptimizer) -> None:
    """Allocates each parameter's state through the engine's own first-step initialisation (no rule math)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                opt.init_param_state(p)


__all__ = ["LLAMA_CONFIGS", "StateEstimate", "StatePhases", "count_state_bytes", "estimate_state_bytes",
           "estimate_state_phases", "is_lowrank_shape", "llama_shapes", "n_matrices", "state_phases"]
