"""torch.distributed in one place. World size 1 is the same code path with every collective a no-op.

Launch with `torchrun --nproc_per_node N -m spectra train ...`: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, we
join a process group (gloo on CPU, nccl on CUDA). Rank 0 alone writes files and logs; metrics are all-reduced as sums
and divided once. Models are wrapped here, never in the model file: DDP for every device, or FSDP2 (`fully_shard` on
each block, then the root) for GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1; pick the device ('auto': this rank's GPU, else CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but no CUDA device is available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    owns = False
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, owns)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        torch_dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few scalars over ranks (float64, on the rank's device)."""
    if info.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, info: DistInfo):
    if info.world == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """DDP or FSDP2 around `model` when world > 1; `model` itself otherwise."""
    if info.world == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
