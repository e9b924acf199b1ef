"""TriLM's ternary quantizer as pure tensor functions (Spectra, arXiv 2407.12327, §3.1 and Table 1).

For a latent float weight W (out x in), split into `num_shards` model-parallel shards:

    γ  = ε + mean(|W_ij|)                     over the shard, ε = 1e-5
    Ŵ  = round(clip(W / γ, -1, 1)) ∈ {-1, 0, 1}
    W̃ = γ · Ŵ                               used in the forward pass: Y = X W̃ᵀ

Shards follow Megatron's tensor parallelism: column-parallel layers (q, k, v, gate, up) are split along the output
dimension (`dim=0`), row-parallel layers (o, down) along the input dimension (`dim=1`). A model trained with N-way
tensor parallelism therefore carries N scales per matrix; on one device we reproduce that with `num_scale_shards=N`.

Backward is a straight-through estimator: ∂L/∂W = ∂L/∂W̃, as if the quantizer were the identity, so small updates
accumulate in the latent weight until a ternary state flips. Activations, embeddings, lm_head and norms stay in
floating point (unlike BitNet b1.58, which also quantizes activations to 8 bits; see `spectra.quantizers`).

`ternarize` is the one absmean ternarizer: training (`spectra.quantizers.TriLMQuantizer`), export, packing and
analysis all call it. It is vectorised over shards: `shard_rows` views the shards as rows of one matrix. The layer
that holds a latent weight and runs it is `spectra.layers.TernaryLinear`; the ablation quantizers are
`spectra.quantizers`.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-5

# Linear layers of a block and the dimension their shards split: Megatron column-parallel (0) / row-parallel (1).
SHARD_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def shard_rows(W: Tensor, num_shards: int, dim: int) -> Tensor:
    """W as (num_shards, numel/num_shards): row i holds the weights of shard i (split along `dim`)."""
    if dim not in (0, 1):
        raise ValueError(f"shard dim must be 0 (output) or 1 (input), got {dim}")
    if W.ndim != 2 or W.shape[dim] % num_shards:
        raise ValueError(f"weight of shape {tuple(W.shape)} cannot be split into {num_shards} shards along dim {dim}")
    if dim == 0:
        return W.reshape(num_shards, -1)
    return W.reshape(W.shape[0], num_shards, -1).transpose(0, 1).reshape(num_shards, -1)


def per_element(values: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """One value per shard -> a tensor broadcastable against a weight of `shape` (shards split along `dim`)."""
    view = [1, 1]
    view[dim] = shape[dim]
    return values.repeat_interleave(shape[dim] // values.numel()).view(view)


def absmean(W: Tensor, num_shards: int = 1, dim: int = 0) -> Tensor:
    """mean|W| per shard, float32 of shape [num_shards]."""
    if num_shards == 1:
        return W.abs().mean().reshape(1)
    return shard_rows(W, num_shards, dim).abs().mean(dim=1)


def ternarize(W: Tensor, num_shards: int = 1, dim: int = 0, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Absmean ternarization. Returns (codes int8 in {-1,0,1} shaped like W, scales float32 of shape [num_shards])."""
    W = W.detach().float()
    gamma = absmean(W, num_shards, dim) + eps
    divisor = gamma if num_shards == 1 else per_element(gamma, W.shape, dim)
    return (W / divisor).clamp_(-1.0, 1.0).round_().to(torch.int8), gamma


def dequantize(codes: Tensor, scales: Tensor, dim: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """W̃ = γ·Ŵ with one γ per shard along `dim`."""
    if scales.numel() == 1:
        return codes.to(torch.float32).mul_(scales.float()).to(dtype)
    return (codes.float() * per_element(scales.float(), codes.shape, dim)).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized weight; backward passes the gradient to the latent weight unchanged."""

    @staticmethod
    def forward(ctx, W: Tensor, W_q: Tensor) -> Tensor:  # noqa: N803 - paper symbols
        return W_q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def straight_through(W: Tensor, W_q: Tensor) -> Tensor:
    return _StraightThrough.apply(W, W_q)
