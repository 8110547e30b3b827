"""Process-group set-up for ``torchrun`` (env:// rendezvous): NCCL on GPUs, gloo on CPU."""
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
    host_group: object = None  # a gloo group beside NCCL, for flags the host needs without waiting on the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    host_group = None
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        if dev.type == "cuda":  # an NCCL collective read by the host would wait for all the work queued before it
            host_group = dist.new_group(backend="gloo")
    return DistInfo(rank, world_size, local_rank, dev, host_group)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_have_data(has: bool, info: DistInfo) -> bool:
    """True while every rank still has a batch: the ranks leave an epoch together, so none waits forever."""
    if not info.distributed:
        return has
    on_host = info.host_group is not None or info.device.type == "cpu"  # gloo: no wait on the device's queue
    flag = torch.tensor([1 if has else 0], device="cpu" if on_host else info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=info.host_group)
    return bool(flag.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
