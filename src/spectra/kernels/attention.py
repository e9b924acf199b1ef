"""Causal self-attention for the model: one call, `causal_attention(q, k, v)`, for (B, H, T, D) tensors.

GPUs, inference, longer sequences and larger micro-batches use torch's `scaled_dot_product_attention`. While training
on CPU within DENSE_ATTENTION_MAX_LEN positions and DENSE_ATTENTION_MAX_PROBS kept probabilities per layer, a dense
attention that keeps its probabilities P for the backward pass trains faster than torch's CPU flash kernel
(`benchmarks/attention.py`): the C kernel of `spectra.kernels._train` in bfloat16 (AVX-512 BF16, causal half only,
every product accumulated in float32, q, k, v and the output in the caller's strides), batched torch matmuls
otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from spectra.kernels import train_extension

# Training on CPU: up to this many positions, attention that keeps its probabilities (`_DenseCausalAttention`: a C
# kernel for bf16, batched matmuls otherwise) trains faster than torch's flash kernel for CPUs (benchmarks/
# attention.py). Keeping the (B·H, T, T) probabilities for the backward pass, it stops at a length, and at a number
# of probabilities per layer (64 MiB in bf16), where they stay small; GPUs, longer sequences and larger micro-batches
# use SDPA.
DENSE_ATTENTION_MAX_LEN = 512
DENSE_ATTENTION_MAX_PROBS = 1 << 25


@functools.cache
def attention_kernel():
    """`spectra.kernels._train` when it is built and this CPU runs its causal attention kernel (AVX-512 BF16), else
    None. The kernel takes bfloat16 heads whose size is a multiple of 16; `_DenseCausalAttention` uses it then."""
    ext = train_extension()
    return ext if ext is not None and ext.attention_supported() else None


def _kernel_view(t: Tensor) -> tuple[int, int, int, int] | None:
    """(pointer, stride_b, stride_h, stride_t) of a (B, H, T, D) tensor the kernel can read, or None."""
    strides = t.stride()
    if strides[3] != 1 or any(s % 2 for s in strides[:3]) or t.data_ptr() % 4:
        return None
    return t.data_ptr(), strides[0], strides[1], strides[2]


def _kernel_views(*tensors: Tensor) -> list[tuple[int, int, int, int]]:
    views = [_kernel_view(t) for t in tensors]
    if any(v is None for v in views):  # odd strides or a misaligned start: copy once
        views = [_kernel_view(t.contiguous()) for t in tensors]
    return views


class _DenseCausalAttention(torch.autograd.Function):
    """Causal softmax(q kᵀ/√D) v for (B, H, T, D) tensors, keeping the probabilities P for the backward pass.

    forward: S = q kᵀ/√D + M (M = −∞ above the diagonal), P = softmax(S), O = P v.
    backward: dV = Pᵀ dO, dP = dO vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)), dq = dS k/√D, dk = dSᵀ q/√D.
    The scores and the softmax are float32 (bf16 scores measured 1.6x the output error of torch's flash kernel, which
    also keeps them in float32); P, the other matmuls' inputs and dS are in the inputs' dtype, as in the flash kernel.
    bfloat16 with a head size that is a multiple of 16 runs `attention_kernel()` when there is one (`use_kernel`):
    the causal half only, every product accumulated in float32, q, k, v and the output in the caller's strides. Else
    batched torch matmuls (full squares, masked; dP rounded to the dtype)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, use_kernel: bool) -> Tensor:
        B, H, T, D = q.shape
        ext = attention_kernel() if use_kernel else None
        if ext is not None and q.dtype == torch.bfloat16 and D % 16 == 0:
            out = torch.empty(B, T, H, D, dtype=q.dtype).transpose(1, 2)  # what the caller's reshape wants
            probs = torch.empty(B * H, T, T, dtype=q.dtype)
            ext.attention_forward(*_kernel_views(q, k, v), _kernel_view(out), probs.data_ptr(), B, H, T, D, D**-0.5,
                                  torch.get_num_threads())
            ctx.save_for_backward(q, k, v, probs)
            ctx.kernel = ext
            return out
        q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            future = torch.full((T, T), float("-inf"), device=q.device).triu_(1)
            scores = torch.baddbmm(future, q.float(), k.float().transpose(1, 2), alpha=D**-0.5)
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        ctx.kernel = None
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, probs = ctx.saved_tensors
        B, H, T, D = grad_out.shape
        if ctx.kernel is not None:
            dq, dk, dv = (torch.empty(B, H, T, D, dtype=q.dtype) for _ in range(3))
            ctx.kernel.attention_backward(*_kernel_views(q, k, v, grad_out.to(q.dtype)), _kernel_view(dq),
                                          _kernel_view(dk), _kernel_view(dv), probs.data_ptr(), B, H, T, D, D**-0.5,
                                          torch.get_num_threads())
            return dq, dk, dv, None
        with torch.autocast(q.device.type, enabled=False):
            do = grad_out.reshape(B * H, T, D).to(v.dtype)
            dv = torch.bmm(probs.transpose(1, 2), do)
            ds = torch.ops.aten._softmax_backward_data(torch.bmm(do, v.transpose(1, 2)), probs, -1, probs.dtype)
            dq = torch.bmm(ds, k).mul_(D**-0.5)
            dk = torch.bmm(ds.transpose(1, 2), q).mul_(D**-0.5)
        return dq.view(B, H, T, D), dk.view(B, H, T, D), dv.view(B, H, T, D), None


@torch.compiler.disable  # eager aten kernels: inductor's softmax kernels measured slower here
def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, use_kernel: bool = True) -> Tensor:
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype  # as SDPA casts
    return _DenseCausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), use_kernel)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal self-attention for (B, H, T, D) tensors: the dense kernel when training on CPU within
    DENSE_ATTENTION_MAX_LEN and DENSE_ATTENTION_MAX_PROBS, SDPA (flash) otherwise."""
    B, H, T, _ = q.shape
    dense = q.device.type == "cpu" and T <= DENSE_ATTENTION_MAX_LEN and B * H * T * T <= DENSE_ATTENTION_MAX_PROBS
    if dense and torch.is_grad_enabled() and q.requires_grad:
        return dense_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
