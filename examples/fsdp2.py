"""GaLore under FSDP2 (``fully_shard``) with a DCP checkpoint, on CPU (gloo) or GPUs (nccl).

    torchrun --nproc-per-node 2 examples/fsdp2.py

Every rank holds 1/k of each weight and of the optimizer state (moments and projection bases); the run
computes the same update as one process on the same global batch.
"""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import lowrank_optim as lro


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" on GPUs (and move the model to the rank's device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    groups = lro.param_groups(model, rank=16, target_modules="all-linear", update_proj_gap=10)
    opt = lro.GaLoreAdamW(groups, lr=1e-3)  # the mesh is found from the parameters
    data = torch.randn(20, 8 * world, 64, generator=torch.Generator().manual_seed(0))
    for step in range(20):
        x = data[step].chunk(world)[rank]  # this rank's part of the global batch
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    local, total = opt.state_bytes(), opt.global_state_bytes()
    # DCP: each rank writes its shards; the checkpoint reloads at any world size
    path = tempfile.mkdtemp() if rank == 0 else None
    box = [path]
    dist.broadcast_object_list(box)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=box[0])
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=box[0])
    set_optimizer_state_dict(model, opt, state["optim"])
    print(f"rank {rank}/{world}: loss {loss.item():.4f}, optimizer state {local} bytes here, {total} in all")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
