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
    from .fsdp import mode, moment_layout

    pairs = _group_of(opt)
    if not any(is_dtensor(p) for _, p in pairs):
        return state_dict
    out: dict[int, Any] = {}
    for idx, st in state_dict["state"].items():
        group, p = pairs[idx]
        if not is_dtensor(p) or not st or mode(opt, group, p) != "sharded":
            out[idx] = st
            continue
        store = opt._parts(group)[4]
        lay = layout(p)
        st = dict(st)
        rule, low, dim = moment_layout(opt, group, p)
        pst = st.get("projector")
        if isinstance(pst, dict) and "basis" in pst:
            r, d = int(pst["rank"]), int(p.shape[0] if int(pst["side"]) == LEFT else p.shape[1])
            st["projector"] = {**pst, "basis": wrap(pst["basis"], lay, 0, (d, r))}
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
    dequantized by :func:`export_state`, or a full state dict gathered from ranks). Whether a moment is
    quantized follows the whole moment's size, as in one process."""
    from .fsdp import local_store, mode, moment_layout

    for group, p in _group_of(opt):
        st = opt.state.get(p)
        store = opt._parts(group)[4]
        if not st or store.dtype != "8bit":
            continue
        if is_dtensor(p) and mode(opt, group, p) == "sharded":
            rule, low, _ = moment_layout(opt, group, p)
        else:
            low = None
            rule = moment_layout(opt, group, p)[0] if "projector" not in st else opt._parts(group)[1]
        for spec in rule.moments(low if low is not None else (2, 2), group) + \
                (rule.moments((2,), group) if low is None else []):
            t = st.get(spec.name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or spec.name + ABSMAX in st:
                continue
            whole = spec.shape if low is not None else tuple(t.shape)
            numel = 1
            for s in whole:
                numel *= int(s)
            if store.quantized(numel):
                local_store(store, numel).create(st, spec.name, tuple(t.shape), t.device)
                store.save(st, spec.name, t, spec.signed)


__all__ = ["export_state", "import_state", "requantize"]
