"""The training loss: token-mean next-token cross-entropy, computed in float32.

    loss = (1/N) Σ_i (lse_i − x_{i,t_i}),   lse_i = m_i + log Σ_j exp(x_ij − m_i),   m_i = max_j x_ij
    ∂loss/∂x_ij = (softmax(x_i)_j − [j = t_i]) / N

`lm_loss` is what the trainer calls. On CPU, for bfloat16 or float32 logits, it runs a compiled kernel
(`spectra.kernels._train.cross_entropy`) that computes the loss and the gradient in one call, three sweeps per row,
and keeps the gradient for the backward pass instead of the logits: that replaces a float32 copy of the logits, a
log-softmax and its backward (at 99m, 1024 × 50304 logits: 97 ms of compiled torch per step against 25 ms here, one
core). Elsewhere (CUDA, float16, no compiled extension) it is `reference_lm_loss`, the same formula in torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from spectra.kernels import train_extension as extension


def reference_lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in float32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


@functools.cache  # asked on every training step; the CPU's features do not change
def kernel_paths() -> tuple[str, ...]:
    """Loss kernel paths this CPU runs, best first (`avx512`, `scalar`); () without the compiled extension."""
    ext = extension()
    return tuple(ext.paths()) if ext is not None else ()


def cross_entropy_rows(logits: Tensor, targets: Tensor, *, scale: float = 0.0, path: str = "auto"
                       ) -> tuple[Tensor, Tensor | None]:
    """The kernel: per-row losses (float32 [N]) and, when scale > 0, the gradient scale·(softmax − onehot) in the
    logits' dtype ([N, V]). logits [N, V] bfloat16/float32 on CPU, targets [N] integers in [0, V)."""
    ext = extension()
    paths = kernel_paths()
    if ext is None:
        raise ValueError("the loss kernel needs spectra's compiled extension (spectra.kernels._train), which is not "
                         "built; reinstall with a C compiler available (pip install .)")
    path = paths[0] if path == "auto" else path
    if path not in paths:
        raise ValueError(f"loss kernel path {path!r} is not available on this CPU; available: {paths}")
    if logits.ndim != 2 or logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"logits must be a 2-D bfloat16 or float32 CPU tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    N, V = logits.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},) to match logits {tuple(logits.shape)}, got "
                         f"{tuple(targets.shape)}")
    logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    if N and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}) (the logits' vocabulary), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    loss = torch.empty(N, dtype=torch.float32)
    grad = torch.empty_like(logits) if scale > 0 else None
    ext.cross_entropy(("scalar", "avx512").index(path), logits.data_ptr(), int(logits.dtype == torch.bfloat16),
                      targets.data_ptr(), N, V, loss.data_ptr(), grad.data_ptr() if grad is not None else 0,
                      float(scale), torch.get_num_threads())
    return loss, grad


class _FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose forward also computes the gradient (saved in place of the logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        x = logits.reshape(-1, logits.shape[-1])
        losses, grad = cross_entropy_rows(x, targets.reshape(-1), scale=1.0 / max(1, x.shape[0]))
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        if not (grad_out.ndim == 0 and float(grad_out) == 1.0):
            grad = grad * grad_out.to(grad.dtype)
        return grad.view(ctx.shape), None


@torch.compiler.disable  # an opaque C call; a compiled caller runs it eagerly
def fused_lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    if not torch.is_grad_enabled() or not logits.requires_grad:
        losses, _ = cross_entropy_rows(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return losses.mean()
    return _FusedCrossEntropy.apply(logits, targets)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in float32 (module docstring). logits (B, T, V), targets (B, T)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32) and kernel_paths():
        return fused_lm_loss(logits, targets)
    return reference_lm_loss(logits, targets)
