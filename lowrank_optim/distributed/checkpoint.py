"""Optimizer state of FSDP2 parameters through ``torch.distributed.checkpoint`` (DCP).

In memory, every state tensor of a sharded parameter is this rank's chunk (plain tensors: the engine's math
stays local). :func:`export_state` wraps each chunk as a ``DTensor`` on the parameter's mesh, sharing storage,
with the placement that says how the whole tensor is split:

* moments shaped like the rank's part of the low-rank gradient: ``Shard(0)`` of ``(m, r)`` (right side, and
  plain parameters: ``Shard(0)`` of the parameter's shape) or ``Shard(1)`` of ``(r, n)`` (left side);
* Adafactor's factored statistics: the one along the split axis is ``Shard(0)``, the other is replicated;
* the basis: ``Shard(0)`` of ``(n, r)`` (right) or ``(m, r)`` (left); a quantized basis: each stored tensor
  ``Shard(0)`` of its own shape (int8 codes ``(d, r)``, int4 bytes ``(ceil(d / 2), r)``, scales
  ``(ceil(d / 256), r)``: :mod:`.bases`), so DCP moves the codes themselves at any world size and they are never
  requantized; ints stay ints; other tensors (Fira's limiter norm) are whole on every rank (replicated).

So DCP saves each element once, reshards on load at any world size, and ``get_optimizer_state_dict(...,
options=StateDictOptions(full_state_dict=True))`` yields exactly a single-process state dict.

GaLore+'s sparse residual keeps a varying number of entries per rank: they are exported in one process's form,
replicated (:mod:`.sparse`).

8-bit moments: the codes are exported as they are (``uint8``, placed like the moment) and ``<name>_absmax``
as one fp32 scale per code (its block's ``absmax``, placed like the moment too), so DCP can move every code with
the scale that decodes it to any world size. :func:`requantize` restores the block ``absmax`` on load: when this
rank's blocks (256 row-major elements of its own chunk) are the blocks the codes were made in (the same world
size), the codes and scales are kept as they are and the resume is bit-exact; otherwise (another world size, or
a gathered full state dict loaded in one process) the exact decoded values are requantized in this rank's
blocks, with the stochastic rounding keyed by each element's index in the whole moment. A checkpoint holds 5
bytes per 8-bit element (1 in memory); a plain, non-FSDP2 template in one process keeps its block ``absmax``
layout, so a sharded 8-bit checkpoint loads in one process through a 1-rank mesh or the full state dict.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..projectors.base import LEFT
from ..state import ABSMAX, BLOCKSIZE, StateStore, n_blocks, qmap
from . import gum as _gum
from . import sparse as _sparse
from .shards import is_dtensor, layout, split_axis, wrap
from .shards import local as local_tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer


def _group_of(opt: LowRankOptimizer) -> list[tuple[dict[str, Any], torch.Tensor]]:
    return [(g, p) for g in opt.param_groups for p in g["params"]]


#: Key of an int set to 1 in a state whose moments :func:`export_state` packed into fixed-size byte buffers.
PACKED = "moments_packed"


def _variable(opt: LowRankOptimizer, group: dict[str, Any]) -> bool:
    """Whether the group's projector changes the moments' shape on a refresh (GUM's draw; FRUGAL's blocks are
    widened instead, see :func:`_widen`)."""
    from .fsdp import elementwise

    proj = opt._parts(group)[0]
    return proj is not None and not proj.fixed_low_shape and not elementwise(proj)


def _gum_sharded(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: Any) -> bool:
    """Whether ``st`` is the state of a GUM parameter stepped sharded under FSDP2 (:mod:`.gum`), which checkpoints
    in one process's form."""
    from .fsdp import mode

    proj = opt._parts(group)[0]
    return (isinstance(st, dict) and "projector" in st and is_dtensor(p) and proj is not None
            and proj.name in _gum.PROJECTORS and mode(opt, group, p) == "sharded")


def _matrix_shape(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
    """The shape the engine projects ``p`` as: a conv weight ``(out, in, *k)`` is the matrix ``out x (in * prod(k))``
    (:func:`lowrank_optim.plan.matrix_shape`); any other parameter its own shape."""
    from ..plan import matrix_shape

    kind = opt._planner.kind(group, p) if opt._parts(group)[0] is not None else None
    return matrix_shape(p, kind) if kind == "conv" else tuple(int(s) for s in p.shape)


def _rows_shape(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
    """The shape of this rank's rows of ``p`` seen as its matrix (the whole matrix when the state is whole here: not
    a ``DTensor``, or FSDP2's replicated mode)."""
    from .fsdp import mode

    whole = _matrix_shape(opt, group, p)
    if not is_dtensor(p) or mode(opt, group, p) != "sharded":
        return whole
    return (int(p.to_local().shape[0]), *whole[1:])


def _widen(opt: LowRankOptimizer, group: dict[str, Any], shape: tuple[int, ...], rows: tuple[int, ...],
           st: dict[str, Any]) -> dict[str, Any]:
    """The state of an elementwise projector's matrix (FRUGAL's blocks: moments of the tensor's shape when
    active, empty when not) with every moment at the widest shape, zero when empty, so its keys and shapes do
    not depend on which blocks are active (``torch.distributed.checkpoint`` checks shapes); :func:`_narrow`
    empties them again on load, from the loaded projector state. ``shape``: the whole matrix; ``rows``: this
    rank's rows of it."""
    from .fsdp import local_store

    proj, rule, _, _, store = opt._parts(group)
    widest = tuple(int(s) for s in proj.low_shape(rows))
    whole = 1
    for s_ in proj.low_shape(shape):
        whole *= int(s_)
    st = dict(st)
    for spec in rule.moments(widest, group):
        t = st.get(spec.name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) == tuple(spec.shape):
            continue
        zero: dict[str, Any] = {}
        local_store(store, whole).create(zero, spec.name, spec.shape, t.device)
        st.pop(spec.name + ABSMAX, None)
        st.update(zero)
    return st


def _narrow(opt: LowRankOptimizer) -> None:
    """Empties, after a load, the widened moments (:func:`_widen`) of every block the loaded state says is
    inactive."""
    from .fsdp import elementwise

    for group, p in _group_of(opt):
        st = opt.state.get(p)
        proj, rule, _, _, store = opt._parts(group)
        if not st or not elementwise(proj):
            continue
        if isinstance(st.get("matrices"), list):  # an expert stack: each expert whole on its rank
            subs, rows = st["matrices"], tuple(int(s) for s in p.shape[-2:])
        else:
            subs, rows = [st], _rows_shape(opt, group, p)
        for sub in subs:
            if "projector" not in sub:
                continue
            low = proj.low_shape(rows, sub["projector"])
            for spec in rule.moments(tuple(int(s) for s in low), group):
                t = sub.get(spec.name)
                if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(spec.shape) and not math.prod(spec.shape):
                    store.create(sub, spec.name, spec.shape, t.device)


def _envelope(opt: LowRankOptimizer, group: dict[str, Any], whole: tuple[int, ...]) -> tuple[list[Any], int]:
    """``(moment specs, bytes)``: the moments of a variable-shape projector and the size of the byte buffer that
    holds each of them (with its 8-bit ``absmax``) in any of the shapes it can take (the projector's widest
    low-rank shape, or the whole matrix ``whole``)."""
    proj, rule, _, _, store = opt._parts(group)
    shapes = [tuple(proj.low_shape(whole)), whole]
    size = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= int(s)
        size = max(size, store.bytes_for(numel))
    return rule.moments(shapes[0], group), size


def _pack(st: dict[str, Any], specs: list[Any], size: int) -> dict[str, Any]:
    """The state with each moment (and its ``absmax``) as a ``uint8`` buffer of ``size`` bytes (zero padded)."""
    st = dict(st)
    for spec in specs:
        if spec.name not in st:
            continue
        parts = [st.pop(spec.name).contiguous().reshape(-1).view(torch.uint8)]
        if spec.name + ABSMAX in st:
            parts.append(st.pop(spec.name + ABSMAX).contiguous().view(torch.uint8))
        raw = torch.cat(parts)
        buf = torch.zeros(size, dtype=torch.uint8, device=raw.device)
        buf[: raw.numel()] = raw
        st[spec.name] = buf
    st[PACKED] = 1
    return st


def _unpack(opt: LowRankOptimizer, group: dict[str, Any], whole: tuple[int, ...], st: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_pack`: each buffer read back as the moment of the shape the loaded projector state
    gives for the matrix ``whole`` (bit-exact, any store)."""
    proj, rule, _, _, store = opt._parts(group)
    st = {k: v for k, v in st.items() if k != PACKED}
    packed = _envelope(opt, group, whole)[1]  # what _pack gives each moment of a ``whole`` matrix, whatever its draw
    for spec in rule.moments(tuple(proj.low_shape(whole, st["projector"])), group):
        if spec.name not in st:
            continue
        shape = tuple(int(s) for s in spec.shape)
        numel = math.prod(shape)
        buf = st[spec.name]
        need = numel + 4 * n_blocks(numel) if store.quantized(numel) else numel * (2 if store.dtype == "bf16" else 4)
        if buf.numel() < need or buf.numel() != packed:  # another model's checkpoint: refused by name, not a view
            # error; an exact size, since a wider buffer (a full-rank draw of a larger matrix) would hold enough bytes
            raise ValueError(f"Invalid state_dict: packed moment {spec.name!r} holds {buf.numel()} bytes, a moment of "
                             f"shape {shape} for a {whole} matrix needs {need} (packed in {packed}): a checkpoint of "
                             "another model?")
        if store.quantized(numel):
            st[spec.name] = buf[:numel].clone().view(shape)
            st[spec.name + ABSMAX] = buf[numel: numel + 4 * n_blocks(numel)].clone().view(torch.float32)
        else:
            dt = torch.bfloat16 if store.dtype == "bf16" else torch.float32
            size = numel * (2 if dt == torch.bfloat16 else 4)
            st[spec.name] = buf[:size].clone().view(dt).view(shape)
    return st


def _pending_key() -> str:
    from ..engine import PENDING

    return PENDING


def _export_matrix(opt: LowRankOptimizer, group: dict[str, Any], st: Any, whole: tuple[int, ...],
                   rows: tuple[int, ...]) -> Any:
    """One projected matrix's state (``whole``: its shape; ``rows``: this rank's rows of it) in the form whose keys
    and shapes never depend on its history (see :func:`export_state`): ``subspace_pending`` present (0 or 1), the
    residual rule's exported skeleton, variable-shape moments packed, an elementwise projector's moments widened.
    Anything else (plain parameters' states) is returned as it is."""
    from .fsdp import elementwise

    if not isinstance(st, dict) or "projector" not in st or opt._parts(group)[0] is None:
        return st
    key = _pending_key()
    st = {**st, key: int(st.get(key, 0))}  # a fresh template holds a pending subspace, a trained state does not
    st = opt._parts(group)[2].export_state(st, group, whole)
    if _variable(opt, group):
        return _pack(st, *_envelope(opt, group, whole))
    if elementwise(opt._parts(group)[0]):
        return _widen(opt, group, whole, rows, st)
    return st


def _import_matrix(opt: LowRankOptimizer, group: dict[str, Any] | None, st: Any, whole: tuple[int, ...]) -> Any:
    """The inverse of :func:`_export_matrix` (``group`` ``None``: a state of a parameter this optimizer does not
    hold, only ``subspace_pending == 0`` dropped)."""
    key = _pending_key()
    if isinstance(st, dict) and key in st and not int(st[key]):
        st = {n: t for n, t in st.items() if n != key}
    if group is None or not isinstance(st, dict):
        return st
    if st.get(PACKED):
        st = _unpack(opt, group, whole, st)
    if opt._parts(group)[0] is not None and "projector" in st:
        st = opt._parts(group)[2].import_state(st, group, whole)
    return st


def _expert_stack(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether ``p`` is projected as a stack of matrices in ``group`` (:mod:`lowrank_optim.plan`'s ``"experts"``)."""
    return opt._parts(group)[0] is not None and opt._planner.kind(group, p) == "experts"


def _export_experts(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int,
                    st: dict[str, Any]) -> dict[str, Any]:
    """An expert stack's state with its per-matrix states stacked (:func:`.experts.stack`)."""
    from . import experts

    shape = tuple(int(s) for s in p.shape[-2:])
    subs = [_export_matrix(opt, group, sub, shape, shape) for sub in st["matrices"]]
    like = subs[0] if subs else _export_matrix(opt, group, experts.skeleton(opt, group, p, index), shape, shape)
    lay = layout(p) if is_dtensor(p) else None
    lead = tuple(int(s) for s in p.shape[:-2])
    return {**st, "matrices": experts.stack(subs, like, lead, lay, local_tensor(p).device)}


def export_state(opt: LowRankOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the sharded state of FSDP2 parameters wrapped as ``DTensor``s (see the module), and
    ``subspace_pending`` present (0 or 1) in every low-rank parameter's state, so that the set of keys never
    depends on whether a subspace is still pending (``torch.distributed.checkpoint`` loads by keys and checks
    shapes). For the same reason, a projector whose moments change shape on a refresh (``fixed_low_shape``
    false: GUM's full-rank draw) has each moment packed into a ``uint8`` buffer of the size its widest shape takes
    (``moments_packed = 1``), unpacked bit-exactly on load; FRUGAL's blocks (a moment is the tensor's shape or
    empty) export empty moments as zeros of the tensor's shape, emptied again on load. A residual rule whose state
    changes keys over a run exports one skeleton in every phase (``ResidualRule.export_state``: GaLore+'s sparse
    residual)."""
    from .bases import BASIS_KEYS, export
    from .fsdp import mode, moment_layout

    pairs = _group_of(opt)
    packed = {}
    for idx, st in state_dict["state"].items():
        group, p = pairs[idx]
        if isinstance(st, dict) and isinstance(st.get("matrices"), list) and _expert_stack(opt, group, p):
            packed[idx] = _export_experts(opt, group, p, idx, st)
        else:
            if _gum_sharded(opt, group, p, st):  # one process's form (collective), packed below like it
                st = _gum.whole_state(opt, group, p, st)
            packed[idx] = _export_matrix(opt, group, st, _matrix_shape(opt, group, p), _rows_shape(opt, group, p))
            packed[idx] = _sparse.whole_state(opt, group, p, packed[idx])  # GaLore+'s entries: one process's form
    state_dict = {**state_dict, "state": packed}
    if not any(is_dtensor(p) for _, p in pairs):
        return state_dict
    out: dict[int, Any] = {}
    for idx, st in state_dict["state"].items():
        group, p = pairs[idx]
        if not is_dtensor(p) or not st or mode(opt, group, p) != "sharded" or _gum_sharded(opt, group, p, st):
            out[idx] = st
            continue
        lay = layout(p)
        st = dict(st)
        rule, low, dim = moment_layout(opt, group, p)
        pst = st.get("projector")
        if isinstance(pst, dict) and any(k in pst for k in BASIS_KEYS):  # Shard(0) of each tensor's own shape
            m, n = _matrix_shape(opt, group, p)
            st["projector"] = export(pst, int(m if int(pst["side"]) == LEFT else n), lay)
        for spec in rule.moments(low, group):
            if spec.name not in st:
                continue
            t = st[spec.name]
            axis = split_axis(spec.name, len(spec.shape), len(low), dim)
            if t.dtype == torch.uint8:  # codes as they are, each with its block's scale (see the module)
                scales = element_scales(st[spec.name + ABSMAX], t)
                st[spec.name + ABSMAX] = wrap(scales, lay, axis, spec.shape)
            st[spec.name] = wrap(t, lay, axis, spec.shape)
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
    once DCP has resharded the chunks to this optimizer's layout); ``subspace_pending == 0`` is dropped (the
    engine's state holds the key only while a subspace is pending), packed moments are unpacked and residual
    rules drop their exported placeholders."""
    from . import experts

    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    pairs = dict(zip(ids, _group_of(opt), strict=False))
    saved = state_dict["param_groups"]
    if len(saved) == len(opt.param_groups):  # our own groups, saved by another method (GUM's packed moments into an
        # 8-bit GaLoreAdamW): read with the saved method's keys, which the load installs (torch: saved values win)
        as_saved = {id(g): {**g, **{k: v for k, v in s.items() if k != "params"}} if "inner" in s else g
                    for g, s in zip(opt.param_groups, saved, strict=True)}
        pairs = {k: (as_saved[id(g)], p) for k, (g, p) in pairs.items()}
    out = {}
    for k, v in state_dict["state"].items():
        v = _unwrap(v)
        group, p = pairs.get(k, (None, None))
        if p is not None and isinstance(v, dict) and isinstance(v.get("matrices"), (dict, list)) \
                and _expert_stack(opt, group, p):
            shape = tuple(int(s) for s in p.shape[-2:])
            subs = v["matrices"]
            if isinstance(subs, dict):  # the stacked export form (a list: a state dict of an earlier version)
                subs = experts.unstack(subs, p.dim() - 2)
            v = {**v, "matrices": [_import_matrix(opt, group, sub, shape) for sub in subs]}
        else:
            v = _import_matrix(opt, group, v, _matrix_shape(opt, group, p) if p is not None else ())
            if p is not None and _gum_sharded(opt, group, p, v):
                v = _gum.local_state(opt, group, p, v)
            if p is not None:
                v = _sparse.local_state(opt, group, p, v)  # GaLore+'s entries of this rank's rows
        out[k] = v
    return {**state_dict, "state": out}


def element_scales(absmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The block scale of every code: ``absmax`` (one per block of :data:`~lowrank_optim.state.BLOCKSIZE`
    row-major codes) repeated over its block, shaped like ``codes`` (fp32)."""
    return absmax.repeat_interleave(BLOCKSIZE)[: codes.numel()].reshape(codes.shape).clone()


def block_absmax(scales: torch.Tensor) -> torch.Tensor | None:
    """The per-block ``absmax`` that :func:`element_scales` expanded, when ``scales`` (row-major) is constant on
    each of this tensor's own blocks; ``None`` when a block mixes scales (the codes were quantized in other
    blocks: a checkpoint of another world size, or gathered from ranks)."""
    flat = scales.reshape(-1)
    first = flat[::BLOCKSIZE].clone()
    if not bool((flat == first.repeat_interleave(BLOCKSIZE)[: flat.numel()]).all()):
        return None
    return first


def _from_scales(st: dict[str, Any], name: str, signed: bool, store: StateStore) -> None:
    """Turns exported codes + per-element scales back into codes + block ``absmax``: as they were when the blocks
    are the ones they were saved in (same world size: bit-exact), else requantized from their exact values."""
    codes, scales = st[name], st[name + ABSMAX]
    absmax = block_absmax(scales)
    if absmax is not None:
        st[name + ABSMAX] = absmax
        return
    value = qmap(signed, codes.device)[codes.long()] * scales  # each code's exact fp32 value, as dequantized
    st[name + ABSMAX] = torch.zeros(n_blocks(codes.numel()), dtype=torch.float32, device=codes.device)
    store.save(st, name, value, signed)


def requantize(opt: LowRankOptimizer) -> None:
    """Restores, in place, the 8-bit moments of ``"8bit"`` groups after a load: codes exported with per-element
    scales by :func:`export_state` get their block ``absmax`` back (bit-exact in the blocks they were saved in,
    requantized in this rank's blocks otherwise), and fp32 moments that the store keeps as codes are quantized.
    Whether a moment is quantized follows the whole moment's size, as in one process."""
    from .fsdp import local_store, mode, moment_layout, shard_split

    _narrow(opt)
    for group, p in _group_of(opt):
        st = opt.state.get(p)
        store = opt._parts(group)[4]
        if not st or store.dtype != "8bit" or "matrices" in st:  # an expert's codes and blocks are its own
            continue
        _sparse.requantize(opt, group, p, st)  # GaLore+'s residual moments, exported with per-code scales
        split = None
        if is_dtensor(p) and mode(opt, group, p) == "sharded":
            rule, low, _ = moment_layout(opt, group, p)
            split = shard_split(opt, group, p)
        else:
            low = None
            rule = moment_layout(opt, group, p)[0] if "projector" not in st else opt._parts(group)[1]
        for spec in rule.moments(low if low is not None else (2, 2), group) + \
                (rule.moments((2,), group) if low is None else []):
            t = st.get(spec.name)
            if not isinstance(t, torch.Tensor):
                continue
            absmax = st.get(spec.name + ABSMAX)
            if t.dtype == torch.uint8 and absmax is not None and absmax.numel() == t.numel() > 1:
                _from_scales(st, spec.name, spec.signed, local_store(store, None, split))
                continue
            if t.dtype != torch.float32 or absmax is not None:
                continue
            whole = spec.shape if low is not None else tuple(t.shape)
            numel = 1
            for s in whole:
                numel *= int(s)
            if store.quantized(numel):
                saver = local_store(store, numel, split)
                saver.create(st, spec.name, tuple(t.shape), t.device)
                saver.save(st, spec.name, t, spec.signed)


__all__ = ["PACKED", "block_absmax", "element_scales", "export_state", "import_state", "requantize"]
