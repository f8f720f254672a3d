"""Optimizer state of FSDP2 parameters through ``torch.distributed.checkpoint`` (DCP).

In memory, every state tensor of a sharded parameter is this rank's chunk (plain tensors: the engine's math
stays local). :func:`export_state` wraps each chunk as a ``DTensor`` on the parameter's mesh, sharing storage,
with the placement that says how the whole tensor is split:

* moments shaped like the rank's part of the low-rank gradient: ``Shard(0)`` of ``(m, r)`` (right side, and
  plain parameters: ``Shard(0)`` of the parameter's shape) or ``Shard(1)`` of ``(r, n)`` (left side);
* Adafactor's factored statistics: the one along the split axis is ``Shard(0)``, the other is replicated;
* the basis: ``Shard(0)`` of ``(n, r)`` (right) or ``(m, r)`` (left); ints stay ints; other tensors (Fira's
  limiter norm) are whole on every rank (replicated).

So DCP saves each element once, reshards on load at any world size, and ``get_optimizer_state_dict(...,
options=StateDictOptions(full_state_dict=True))`` yields exactly a single-process state dict.

8-bit moments: blockwise codes are blocks of 256 *flattened local* elements, which a different split would
cut differently, so the exported value is the dequantized fp32 moment (no ``_absmax``); :func:`requantize`
quantizes it again on load, in the loading rank's own blocks. (For one process, or a checkpoint of another
world size, a code survives its round trip exactly when requantizing reproduces its block's absmax, which
the dynamic map's exact 1.0 entry guarantees; see the tests.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..projectors.base import LEFT
from ..state import ABSMAX
from .shards import is_dtensor, layout, wrap

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer


def _group_of(opt: LowRankOptimizer) -> list[tuple[dict[str, Any], torch.Tensor]]:
    return [(g, p) for g in opt.param_groups for p in g["params"]]


def _split_axis(name: str, ndim: int, low_ndim: int, dim: int) -> int | None:
    """The axis of moment ``name`` split across ranks when the rule's tensor is split along ``dim``."""
    if ndim == low_ndim:
        return dim
    if ndim == 1 and ((name.endswith("_row") and dim == 0) or (name.endswith("_col") and dim == 1)):
        return 0
    return None


def export_state(opt: LowRankOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the sharded state of FSDP2 parameters wrapped as ``DTensor``s (see the module)."""
    from .fsdp import _lowrank, mode

    pairs = _group_of(opt)
    if not any(is_dtensor(p) for _, p in pairs):
        return state_dict
    out: dict[int, Any] = {}
    for idx, st in state_dict["state"].items():
        group, p = pairs[idx]
        if not is_dtensor(p) or not st or mode(opt, group, p) != "sharded":
            out[idx] = st
            continue
        proj, rule, _, _, store = opt._parts(group)
        lay = layout(p)
        st = dict(st)
        if _lowrank(opt, group, p):
            pst = st["projector"]
            r, m, n = int(pst["rank"]), int(p.shape[0]), int(p.shape[1])
            left = int(pst["side"]) == LEFT
            low, dim = ((r, n), 1) if left else ((m, r), 0)
            if "basis" in pst:
                st["projector"] = {**pst, "basis": wrap(pst["basis"], lay, 0, (m if left else n, r))}
        else:
            if group.get("plain_inner") is not None:
                from ..rules import INNER_RULES

                rule = INNER_RULES[group["plain_inner"]]
            low, dim = tuple(p.shape), 0
        for spec in rule.moments(low, group):
            if spec.name not in st:
                continue
            t = st[spec.name]
            if t.dtype == torch.uint8:
                t = store.load(st, spec.name, spec.signed).clone()
                st.pop(spec.name + ABSMAX, None)
            st[spec.name] = wrap(t, lay, _split_axis(spec.name, len(spec.shape), len(low), dim), spec.shape)
        out[idx] = st
    return {**state_dict, "state": out}


def _unwrap(obj: Any) -> Any:
    if is_dtensor(obj):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def import_state(opt: LowRankOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every ``DTensor`` replaced by this rank's chunk (the inverse of :func:`export_state`
    once DCP has resharded the chunks to this optimizer's layout)."""
    return {**state_dict, "state": {k: _unwrap(v) for k, v in state_dict["state"].items()}}


def requantize(opt: LowRankOptimizer) -> None:
    """Quantizes, in place, every fp32 moment that an ``"8bit"`` group keeps as codes (a moment exported
    dequantized by :func:`export_state`, or a full state dict gathered from ranks)."""
    for group, p in _group_of(opt):
        st = opt.state.get(p)
        if not st:
            continue
        _, rule, _, _, store = opt._parts(group)
        if store.dtype != "8bit":
            continue
        rules = [rule]
        if group.get("plain_inner") is not None:
            from ..rules import INNER_RULES

            rules.append(INNER_RULES[group["plain_inner"]])
        for r in rules:
            for spec in [*r.moments((2, 2), group), *r.moments((2,), group)]:
                t = st.get(spec.name)
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and spec.name + ABSMAX not in st \
                        and store.quantized(t.numel()):
                    store.create(st, spec.name, tuple(t.shape), t.device)
                    store.save(st, spec.name, t, spec.signed)


__all__ = ["export_state", "import_state", "requantize"]
