"""A ``torch.distributed.checkpoint`` load planner for sharded 8-bit checkpoints read by a plain optimizer.

An FSDP2 checkpoint exports each 8-bit moment as its codes plus one fp32 scale per code (``<name>_absmax`` shaped
like the codes, :mod:`.checkpoint`), so that every code travels with the scale that decodes it at any world size.
A plain optimizer (parameters that are not ``DTensor``s, one process) exports ``<name>_absmax`` as one scale per
block of 256 codes, and ``dcp.load`` with torch's default planner refuses the pair (``Size mismatch between saved
... and current ... for ..._absmax``). :class:`LoadPlanner` receives such a checkpoint's per-code scales in place
of the template's per-block ones; ``set_optimizer_state_dict`` (the optimizer's ``load_state_dict``) then
requantizes the exact decoded values in the plain optimizer's own blocks, as it does after any resharding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..state import ABSMAX
from .shards import is_dtensor


class LoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that lets an 8-bit template take a sharded checkpoint's per-code scales.

    For every template tensor named ``*_absmax`` whose saved tensor has another size, the size of its codes
    (the saved tensor named without ``_absmax``), the template entry is replaced by an empty fp32 tensor of the
    saved size, which the load fills. Everything else is the default planner's.

    Example:
        >>> sd = {"optim": get_optimizer_state_dict(model, opt)}  # doctest: +SKIP
        >>> dcp.load(sd, checkpoint_id=path, planner=lro.distributed.LoadPlanner())  # doctest: +SKIP
        >>> set_optimizer_state_dict(model, opt, sd["optim"])  # doctest: +SKIP
    """

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is None:
            return
        saved = metadata.state_dict_metadata
        for fqn, obj in list(self.state_dict.items()):
            if not fqn.endswith(ABSMAX) or not isinstance(obj, torch.Tensor) or is_dtensor(obj):
                continue
            md, codes = saved.get(fqn), saved.get(fqn[: -len(ABSMAX)])
            if not isinstance(md, TensorStorageMetadata) or not isinstance(codes, TensorStorageMetadata):
                continue
            if md.size == obj.size() or md.size != codes.size:
                continue
            scales = torch.empty(md.size, dtype=md.properties.dtype, device=obj.device)
            self.state_dict[fqn] = scales
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[fqn], scales)


__all__ = ["LoadPlanner"]
