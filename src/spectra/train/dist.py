"""torch.distributed in one place. World size 1 is the same code path with every collective a no-op.

Launch with `torchrun --nproc_per_node N -m spectra train ...`: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, we
join a process group (gloo on CPU, nccl on CUDA). Rank 0 alone writes files and logs; metrics are all-reduced as sums
and divided once. Models are wrapped here, never in the model file: DDP, or FSDP2 (`fully_shard` on each block, then
the root), on CPUs (gloo) and GPUs alike.

FSDP2 with `train.precision = "bf16"` takes a `MixedPrecisionPolicy`: parameters are all-gathered and computed in
bfloat16, gradients reduce-scattered in float32 into float32 shards that the optimizer updates (the fp32 master
copy is the shard itself). Gradient accumulation under FSDP reduce-scatters every micro-batch into the sharded
gradient, so no rank ever holds a whole unsharded gradient between micro-batches (`set_requires_gradient_sync(False)`
would keep the unsharded gradients of every block until the last micro-batch: less communication, a full model's
worth of gradient memory). Activation checkpointing (`train.activation_checkpointing`) keeps only each block's input
for the backward pass and recomputes the block (`checkpoint_blocks`), applied from outside the model, before
sharding, as FSDP2 expects.

Defaults by device (`device_defaults`): on CUDA, the paper's sizes train in bf16 with FSDP and TF32 matmuls; on CPU
(and for the small sizes) a run stays fp32 with DDP. FSDP and CUDA runs rebuild each ternary layer's W̃ in backward
instead of keeping it (`train.recompute_ternary`, bit-identical gradients; `spectra.layers.TernaryLinear`).
Tensor parallelism (`train.tp`) is applied first, then FSDP2 over the data-parallel mesh dimension
(`spectra.train.tp`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from spectra.config import ModelConfig
from spectra.train.config import CPU_SIZES, TrainConfig, table_size

# How long a rank waits in a training collective for the others (a hung or stopped peer) before it fails with an error
# and torchrun ends the run: explicit, instead of torch's per-backend default (30 min for gloo).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("SPECTRA_DIST_TIMEOUT", 1800))


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
        from datetime import timedelta

        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                      timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
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


# How long the other ranks wait for rank 0 to prepare data (tokenizing a corpus can take hours): explicit and generous,
# instead of the process group's default collective timeout.
DATA_TIMEOUT_S = float(os.environ.get("SPECTRA_DATA_TIMEOUT", 6 * 3600))


def broadcast_object(obj, info: DistInfo, timeout_s: float | None = None):
    """Rank 0's `obj` on every rank. With `timeout_s`, over a gloo group of its own that waits that long."""
    if info.world == 1:
        return obj
    group = None
    if timeout_s is not None:
        from datetime import timedelta

        group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0, group=group)
    if group is not None:
        torch_dist.destroy_process_group(group)
    return box[0]


def device_defaults(train_cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> TrainConfig:
    """Fill `precision` and `parallel` left None: bf16 + FSDP on CUDA for the paper's sizes, fp32 + DDP otherwise
    (CPU, and the small sizes anywhere). Turns on TF32 matmuls for CUDA runs of the paper's sizes."""
    big_gpu = device.type == "cuda" and table_size(model_cfg) not in CPU_SIZES
    if big_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parallel = train_cfg.parallel or ("fsdp" if big_gpu else "ddp")
    recompute = train_cfg.recompute_ternary
    if recompute is None:  # where W̃ copies cost most; compile's partitioner decides what to save on its own
        recompute = (device.type == "cuda" or parallel == "fsdp") and not train_cfg.compile
    # activation checkpointing already keeps no W̃, and the layer's saved-tensor hooks would keep its inputs
    recompute = recompute and not train_cfg.activation_checkpointing
    return dataclasses.replace(
        train_cfg,
        precision=train_cfg.precision or ("bf16" if big_gpu else "fp32"),
        parallel=parallel,
        recompute_ternary=recompute,
    )


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per transformer block: each block's forward runs under
    `torch.utils.checkpoint.checkpoint` (non-reentrant), so the backward pass keeps only the block's inputs and
    recomputes the rest. The module tree and state-dict names stay those of the plain model (the block's `forward`
    is replaced on the instance, not wrapped in another module). Returns how many blocks were changed."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for layer in model.layers:
        if getattr(layer, "_spectra_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._spectra_checkpointed = True
        count += 1
    return count


def mixed_precision(precision: str):
    """FSDP2's policy for `train.precision`: bf16 (or fp16) parameters and compute, float32 reductions; None for
    fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def wrap(model: nn.Module, info: DistInfo, parallel: str, *, precision: str = "fp32",
         activation_checkpointing: bool = False, tp: int = 1) -> nn.Module:
    """DDP or FSDP2 around `model` when world > 1; `model` itself otherwise. With `tp` > 1, tensor parallelism
    first (`spectra.train.tp`, groups of `tp` consecutive ranks), then FSDP2 over the data-parallel groups if there
    are several. Activation checkpointing is applied before sharding (at any world size)."""
    mesh = None
    if tp > 1:
        from spectra.train import tp as tensor_parallel

        mesh = tensor_parallel.device_mesh(info.device, info.world, tp)
        tensor_parallel.apply(model, mesh["tp"])
    if activation_checkpointing:
        checkpoint_blocks(model)
    if info.world // tp == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kw = {} if mesh is None else {"mesh": mesh["dp"]}
        policy = mixed_precision(precision)
        if policy is not None:
            kw["mp_policy"] = policy
        for layer in model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
