"""Tensor parallelism (`train.tp = N`), Megatron's layout on PyTorch's DTensor, applied from outside the model.

In every block, q/k/v/gate/up are column-parallel (each rank holds 1/N of the output rows, `Shard(0)`) and o/down
row-parallel (1/N of the input columns, `Shard(1)`): `torch.distributed.tensor.parallel.ColwiseParallel` and
`RowwiseParallel`. The attention sees H/N heads per rank (heads are whole on one rank, so attention needs no
communication) and the MLP glu_dim/N hidden units; one all-reduce after o_proj and one after down_proj in the
forward, one before q/k/v and one before gate/up in the backward. Embeddings, norms and lm_head stay replicated: every
rank of a tensor-parallel group computes them on the same batch and gets the same gradients.

TriLM (Spectra §3.1): each rank's ternary layer computes γ on its own shard, with no communication, the paper's
mechanism. The layer's latent weight is a DTensor; its quantizer runs on the local shard (`to_local`), whose split is
the model's `num_scale_shards` split restricted to one rank, so a model with `num_scale_shards = N·k` trained with
`tp = N` is exactly the single-device `num_scale_shards = N·k` model: same losses, and its (DCP or exported)
checkpoint loads as that model. The straight-through gradient reaches the local shard of the latent weight as a
DTensor gradient.

Composes with FSDP2 for tp × dp (`apply` first, then `fully_shard` over the "dp" mesh dimension, `spectra.train.dist`);
ranks r = d·N + t form the mesh (dp, tp), so the N ranks of a tensor-parallel group are consecutive (one node).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spectra.config import ModelConfig
from spectra.layers import TernaryLinear
from spectra.quantizers import build_quantizer
from spectra.ternary import SHARD_DIM


def check(model_cfg: ModelConfig, tp: int, world: int) -> None:
    """Refuse a tensor-parallel configuration that cannot run, naming the field and what would be accepted."""
    if tp < 1 or world % tp:
        raise ValueError(f"train.tp ({tp}) must be a positive divisor of the number of processes ({world})")
    if tp == 1:
        return
    for what, size in (("n_heads", model_cfg.n_heads), ("glu_dim", model_cfg.glu_dim)):
        if size % tp:
            raise ValueError(f"train.tp ({tp}) must divide model.{what} ({size})")
    if model_cfg.family == "trilm":
        if model_cfg.num_scale_shards % tp:
            raise ValueError(f"train.tp = {tp} computes γ on each rank's shard: model.num_scale_shards "
                             f"({model_cfg.num_scale_shards}) must be a multiple of it (e.g. {tp})")
        if model_cfg.quantizer == "bitnet158":
            raise ValueError("train.tp > 1 does not support quantizer 'bitnet158' (its per-token activation "
                             "quantizer and input norm would see only a row-parallel rank's slice of the features)")
        options = model_cfg.quantizer_options or {}
        for name in ("learnable_scale", "progressive"):
            if options.get(name):
                raise ValueError(f"train.tp > 1 does not support quantizer_options.{name}")
        if options.get("stochastic_rounding"):
            raise ValueError("train.tp > 1 does not support quantizer_options.stochastic_rounding (ranks would draw "
                             "different random numbers than the single-device model)")


def device_mesh(device: torch.device, world: int, tp: int):
    """The (dp, tp) mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def _local_quantizer(layer: TernaryLinear, tp: int) -> None:
    """Make `layer` quantize the local shard of its DTensor weight: a quantizer for num_shards / tp shards, the same
    options, run on `weight.to_local()`; the result goes back into a DTensor with the weight's layout."""
    from torch.distributed.tensor import DTensor

    q = layer.quantizer
    local = build_quantizer(q.name, num_shards=q.num_shards // tp, dim=q.dim, **_options(q))
    inner = local.forward_weight

    def forward_weight(W: Tensor) -> Tensor:
        if not isinstance(W, DTensor):
            raise TypeError("a tensor-parallel TernaryLinear expects its weight as a DTensor")
        local.train(q.training)
        W_q = inner(W.to_local())
        return DTensor.from_local(W_q, W.device_mesh, W.placements, run_check=False, shape=W.shape, stride=W.stride())

    q.forward_weight = forward_weight  # an instance attribute: `local` is not registered as a child module


def _options(q) -> dict:
    """The options `q` was built with that shape its codes (those `check` lets through)."""
    opts = {}
    for name in ("eps", "threshold"):
        if hasattr(q, name):
            opts[name] = getattr(q, name)
    if q.name == "uniform":
        opts["bits"] = q.bits
    return opts


def _styles() -> dict:
    """ColwiseParallel / RowwiseParallel that shard the layer's own weight only (a TernaryLinear's child modules,
    the quantizer, are left alone; torch's styles visit every submodule)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def partition(dim: int):
        def fn(self, name: str, module: nn.Module, mesh) -> None:
            if name == "":
                weight = distribute_tensor(module.weight, mesh, [Shard(dim)])
                module.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))

        return fn

    colwise = type("Colwise", (ColwiseParallel,), {"_partition_linear_fn": partition(0)})
    rowwise = type("Rowwise", (RowwiseParallel,), {"_partition_linear_fn": partition(1)})
    return {0: colwise, 1: rowwise}


def apply(model: nn.Module, tp_mesh) -> int:
    """Parallelize every block of `model` over the 1-D mesh `tp_mesh` (Megatron layout, see the module docstring).
    Returns how many linear layers were parallelized."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    if tp == 1:
        return 0
    style = _styles()
    count = 0
    for block in model.layers:
        plan = {}
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(block, parent_name)
            for name, child in parent.named_children():
                if name in SHARD_DIM:
                    plan[f"{parent_name}.{name}"] = style[SHARD_DIM[name]]()
                    if isinstance(child, TernaryLinear):
                        _local_quantizer(child, tp)
        parallelize_module(block, tp_mesh, plan)
        block.self_attn.n_heads //= tp  # the heads of this rank's q/k/v columns
        count += len(plan)
    return count


def clip_grad_norm_(params, max_norm: float) -> float:
    """Global L2 norm of the gradients of a mix of DTensor (sharded) and plain (replicated) parameters, clipped to
    `max_norm` like `torch.nn.utils.clip_grad_norm_`. Each DTensor's norm is over its global tensor."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in grads:
        n = g.detach().float().norm(2)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = sq + n.cpu() ** 2
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if torch.isfinite(total):
        for g in grads:
            g.detach().mul_(coef.to(g.device))
    return float(total)
