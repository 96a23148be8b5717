"""Process-group setup for ``torchrun`` (DDP; gloo on CPU, NCCL on GPU) and small collective helpers.

Single-process runs need no setup: every helper here degrades to the identity when no group is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def set_cpu_threads(threads: int | None, device: torch.device) -> int | None:
    """Intra-op CPU threads per process: ``threads`` (None: torch's default) unless ``OMP_NUM_THREADS`` is set, which
    wins. Returns the threads in use on CPU, None on other devices."""
    if device.type != "cpu":
        return None
    if threads is not None and threads < 1:
        raise ValueError(f"fastvl: 'threads' must be >= 1, got {threads}")
    if threads and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s value of a picklable object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group: a barrier first, so no rank tears gloo down while another still talks to it (that
    aborts the other process: 'terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
