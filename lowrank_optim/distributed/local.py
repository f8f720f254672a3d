"""k processes of one machine joined by gloo: the set-up the distributed tests and benchmarks share.

A ``file://`` rendezvous (no server thread, no port: a ``tcp://`` port picked free in the parent can be taken by
another job's gloo sockets before rank 0 binds it), a teardown behind a barrier (no rank tears gloo down while a
peer still talks), and a spawn bounded in time.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist


def rendezvous(directory: str | os.PathLike[str]) -> str:
    """A fresh ``file://`` init method for ``dist.init_process_group`` in ``directory`` (which must exist)."""
    path = Path(directory) / f"rendezvous-{uuid.uuid4().hex}"
    return f"file://{path}"


def init_gloo(rank: int, world: int, init_method: str, timeout_s: float = 120.0) -> None:
    """Joins the default process group over gloo (CPU) as ``rank`` of ``world``.

    Args:
        rank: this process's rank.
        world: number of processes.
        init_method: from :func:`rendezvous`.
        timeout_s: collective timeout in seconds (120).
    """
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def end_process_group() -> None:
    """Leaves the process group together: a barrier first, so no rank tears down gloo while a peer still talks."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        gc.collect()  # DDP reducers and FSDP hooks that still hold the group go before it
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, args: tuple[Any, ...], timeout_s: float) -> None:
    """Runs ``fn(rank, *args)`` in ``world`` spawned processes and waits at most ``timeout_s`` seconds.

    Raises:
        TimeoutError: the processes did not finish in time (they are terminated).
        torch.multiprocessing.ProcessRaisedException: a process raised (the first one's error).
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


__all__ = ["end_process_group", "init_gloo", "rendezvous", "spawn"]
