"""The Spectra language model: a Llama-style decoder shared by FloatLM and TriLM (arXiv 2407.12327, §3.1).

Pre-norm RMSNorm with a learned weight twice per block, rotary position embeddings (θ = 10000), multi-head attention
through `scaled_dot_product_attention` (while training on CPU, `causal_attention`'s dense kernel), a SwiGLU MLP, a
final norm and an untied `lm_head`; no biases anywhere.
FloatLM and TriLM differ in one thing only: the linear layer inside the blocks (`make_linear`). Embeddings, lm_head
and norms stay in floating point in both families.

Module names follow Hugging Face's `LlamaForCausalLM` (without its `model.` prefix), so HF import/export is a
near-identity map (`spectra.interop.hf`). Ablations: `norm="layernorm"`, `mlp_act="gelu" | "relu"` (non-gated MLP).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectra.config import ModelConfig
from spectra.ternary import SHARD_DIM, TernaryLinear


def make_linear(cfg: ModelConfig, name: str, in_features: int, out_features: int) -> nn.Linear:
    if cfg.family == "trilm":  # TriLM: ternary weights x one absmean scale per model-parallel shard
        return TernaryLinear(
            in_features,
            out_features,
            num_shards=cfg.num_scale_shards,
            shard_dim=SHARD_DIM[name],
            quantizer=cfg.quantizer,
            quantizer_options=cfg.quantizer_options,
        )
    return nn.Linear(in_features, out_features, bias=False)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False)
    return RMSNorm(dim, eps=cfg.norm_eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 like HF Llama."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_seq_len, head_dim), halves repeated (HF's rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). The result keeps x's dtype (under autocast, bf16 q and k with float32
    cos/sin would otherwise come out float32, only for attention to cast them back)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# Training on CPU: up to this many positions, attention that keeps its probabilities (`_DenseCausalAttention`: a C
# kernel for bf16, batched matmuls otherwise) trains faster than torch's flash kernel for CPUs (benchmarks/
# attention.py). Keeping the (B·H, T, T) probabilities for the backward pass, it stops at a length, and at a number
# of probabilities per layer (64 MiB in bf16), where they stay small; GPUs, longer sequences and larger micro-batches
# use SDPA.
DENSE_ATTENTION_MAX_LEN = 512
DENSE_ATTENTION_MAX_PROBS = 1 << 25


@functools.cache
def attention_kernel():
    """`spectra.train._kernels` when it is built and this CPU runs its causal attention kernel (AVX-512 BF16), else
    None. The kernel takes bfloat16 heads whose size is a multiple of 16; `_DenseCausalAttention` uses it then."""
    from spectra.train.loss import extension  # spectra.train imports this module: import when first asked

    ext = extension()
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


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, H, max_len, D). `pos` tokens are filled."""

    k: Tensor
    v: Tensor
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = make_linear(cfg, "q_proj", cfg.dim, cfg.attn_dim)
        self.k_proj = make_linear(cfg, "k_proj", cfg.dim, cfg.attn_dim)
        self.v_proj = make_linear(cfg, "v_proj", cfg.dim, cfg.attn_dim)
        self.o_proj = make_linear(cfg, "o_proj", cfg.attn_dim, cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None = None) -> Tensor:
        """`mask` (without a cache): which keys each query sees, boolean (B, 1, T, T) or broadcastable; default
        causal. Scoring packs a shared context and its continuations into one row this way (`spectra.eval.scoring`),
        with per-row positions in `cos`/`sin` (B, 1, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            if mask is None:
                y = causal_attention(q, k, v)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            start, end = cache.pos, cache.pos + T
            cache.k[self.layer_idx, :, :, start:end] = k
            cache.v[self.layer_idx, :, :, start:end] = v
            k = cache.k[self.layer_idx, :, :, :end]  # (B, H, S, D)
            v = cache.v[self.layer_idx, :, :, :end]
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # query i sits at position start + i and sees keys 0 .. start + i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Ablations gelu/relu: down(act(up(x))), no gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = cfg.mlp_act
        if self.act == "swiglu":
            self.gate_proj = make_linear(cfg, "gate_proj", cfg.dim, cfg.glu_dim)
        self.up_proj = make_linear(cfg, "up_proj", cfg.dim, cfg.glu_dim)
        self.down_proj = make_linear(cfg, "down_proj", cfg.glu_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(F.gelu(h) if self.act == "gelu" else F.relu(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.dim)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norm weights (HF Llama's `initializer_range` scheme)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.ndim == 2:
                    p.normal_(0.0, self.config.init_std, generator=gen)
                else:
                    p.fill_(1.0)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables, non-persistent buffers that no checkpoint holds."""
        cos, sin = rope_cache(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {start + T} needed")
        x = self.embed_tokens(idx)  # (B, T, C)
        cos = self.rope_cos[start : start + T].to(x.dtype)
        sin = self.rope_sin[start : start + T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache.empty(self.config, batch_size, max_len or self.config.max_seq_len, p.device, p.dtype)

    # ---- accounting -------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward+backward FLOPs per token (`spectra.accounting.flops_per_token`)."""
        from spectra.accounting import flops_per_token

        return flops_per_token(self.config, seq_len)


def empty_model(cfg: ModelConfig, device=None) -> Transformer:
    """A Transformer to load a checkpoint into: built on the meta device and allocated on `device` without the random
    initialisation (which costs more than reading the weights for large models), RoPE tables computed. Every
    parameter and persistent buffer holds garbage until a full state dict is loaded."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device or "cpu")
    model.reset_rope()
    return model


def build_model(
    cfg: ModelConfig, *, seed: int | None = 0, device=None, dtype: torch.dtype | None = None
) -> Transformer:
    """A freshly initialised model (deterministic for a given seed)."""
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    model.reset_parameters(seed)
    if dtype is not None:
        model.to(dtype)
    return model
