"""Multi-process training: torchrun / torch.multiprocessing launch, process groups, reductions.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the
environment) :func:`init_distributed` joins the process group (NCCL on CUDA, gloo on CPU). For CPU tests
and single-machine runs without torchrun, :func:`launch_local` spawns ``nprocs`` processes with
``torch.multiprocessing`` on ``127.0.0.1`` and a free port (``sam3d train CONFIG --nproc 2``).

Data parallelism: each process gets ``1 / world`` of every epoch through ``DistributedSampler`` and
``DistributedDataParallel`` averages the gradients, so a run with world size W and per-process batch b
takes the same optimiser steps as one process with batch W*b (the losses are batch means).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

__all__ = ["DistInfo", "init_distributed", "cleanup", "free_port", "launch_local", "all_reduce_mean",
           "barrier", "broadcast_object"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group described by the torchrun environment (no-op for a single process)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun "
                               "or `sam3d train CONFIG --nproc N`")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend)


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return float(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, entry: Callable[[List[str]], int], argv: List[str],
            threads: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    rc = entry(list(argv))
    if rc:
        raise SystemExit(rc)


def launch_local(nprocs: int, entry: Callable[[List[str]], int], argv: Sequence[str],
                 threads_per_proc: Optional[int] = None) -> int:
    """Run ``entry(argv)`` (``sam3d train``'s main: a module-level function, so that it pickles) in
    ``nprocs`` local processes (gloo on CPU); returns 0 on success."""
    import torch.multiprocessing as mp

    if threads_per_proc is None:
        threads_per_proc = max(1, (os.cpu_count() or 1) // nprocs)
    port = free_port()
    mp.spawn(_worker, args=(nprocs, port, entry, list(argv), threads_per_proc), nprocs=nprocs, join=True)
    return 0
