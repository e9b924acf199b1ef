"""The Spectra language model: a Llama-style decoder shared by FloatLM and TriLM (arXiv 2407.12327, §3.1).

Pre-norm RMSNorm with a learned weight twice per block, rotary position embeddings (θ = 10000), causal multi-head
attention (`spectra.kernels.attention.causal_attention`: torch's SDPA, or a dense CPU kernel while training), a SwiGLU
MLP, a final norm and an untied `lm_head`; no biases anywhere. The norms, rotary tables and the ternary linear layer
are primitives in `spectra.layers`.
FloatLM and TriLM differ in one thing only: the linear layer inside the blocks (`make_linear`). Embeddings, lm_head
and norms stay in floating point in both families.

`Transformer.forward(idx)` returns logits. It can also return the final-norm hidden states (`return_hidden=True`,
for callers that apply the head to a few positions only), take a KV cache (decoding), per-row positions and a
boolean attention mask (scoring packs a shared context and its continuations into one row this way).

Module names follow Hugging Face's `LlamaForCausalLM` (without its `model.` prefix), so HF import/export is a
near-identity map (`spectra.interop.hf`). Ablations: `norm="layernorm"`, `mlp_act="gelu" | "relu"` (non-gated MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectra.accounting import flops_per_token
from spectra.config import ModelConfig
from spectra.kernels.attention import causal_attention
from spectra.layers import (  # noqa: F401 - RMSNorm, rope_cache and freeze_for_inference are part of the model's API
    RMSNorm,
    apply_rope,
    freeze_for_inference,
    make_block_norm,
    make_linear,
    make_norm,
    rope_cache,
)

Q8_TINY = 2.0**-100  # a row with max|x| below it quantizes to zeros: 127 / max|x| overflows float32 under 3.7e-37


def q8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of x (..., D) as int8 and one float32 scale each (..., 1): s = max|x| / 127, a = x * (127 / max|x|)
    rounded to nearest even, so x ~ s * a (the packed kernels' activation rule; a row with max|x| < Q8_TINY = 2^-100
    gives a = 0, s = 0, a row with a NaN or infinity a = 0, s = NaN). The q8 KV cache's rows (`KVCache`), as
    `kv_store_q8` in the C kernels writes them, byte for byte."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    bad = ~torch.isfinite(x).all(-1, keepdim=True)
    ok = (amax >= Q8_TINY) & ~bad  # below it 127 / max|x| overflows float32: a zero row
    inv = torch.where(ok, 127.0 / amax, torch.zeros_like(amax))
    a = torch.where(ok, (torch.where(ok, x, 0) * inv).round().clamp(-127, 127), 0).to(torch.int8)
    s = torch.where(bad, torch.full_like(amax, float("nan")), torch.where(ok, amax / 127.0, torch.zeros_like(amax)))
    return a, s


def kv_store(buf: Tensor, x: Tensor) -> None:
    """Write keys or values x (..., T, D) into a cache slice buf (..., T, D): copied (rounded to a 16-bit cache's
    dtype), or, for a q8 cache (int8 rows of D + 4 bytes), as `q8_rows`' values and then the scale's 4 bytes."""
    if buf.dtype != torch.int8:
        buf.copy_(x)
        return
    D = x.shape[-1]
    a, s = q8_rows(x)
    buf[..., :D] = a
    buf[..., D:].view(torch.float32).copy_(s)


def kv_load(buf: Tensor, dtype: torch.dtype) -> Tensor:
    """Cache rows buf (..., S, D) in `dtype`: widened exactly from a 16-bit cache, or a q8 cache's s * a."""
    if buf.dtype != torch.int8:
        return buf if buf.dtype == dtype else buf.to(dtype)
    D = buf.shape[-1] - 4
    return (buf[..., :D].float() * buf[..., D:].view(torch.float32)).to(dtype)


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, H, max_len, D), float32, float16 or bfloat16; or
    int8 (the q8 cache, llama.cpp's `-ctk q8_0` in spirit): (n_layers, B, H, max_len, D + 4), each row D int8 values
    and its float32 scale in the last 4 bytes (`q8_rows`), 0.53x a float16 cache at head size 64. `pos` tokens are
    filled."""

    k: Tensor
    v: Tensor
    pos: int = 0

    @staticmethod
    def row_len(head_dim: int, dtype: torch.dtype) -> int:
        """Elements of one cached row: head_dim, or head_dim + 4 bytes for q8 (its scale after the values)."""
        return head_dim + 4 if dtype == torch.int8 else head_dim

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cls.row_len(cfg.head_dim, dtype))
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
        causal. cos/sin are (T, D), or (B, 1, T, D) for per-row positions."""
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
            kv_store(cache.k[self.layer_idx, :, :, start:end], k)
            kv_store(cache.v[self.layer_idx, :, :, start:end], v)
            # (B, H, S, D); a 16-bit cache of a float32 model: stored rounded, widened exactly to attend
            k = kv_load(cache.k[self.layer_idx, :, :, :end], q.dtype)
            v = kv_load(cache.v[self.layer_idx, :, :, :end], q.dtype)
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
    """A pre-norm Llama block (without its norms where every linear layer normalises its own input:
    `make_block_norm`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_block_norm(cfg, cfg.dim)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_block_norm(cfg, cfg.dim)
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
        """Normal(0, init_std) for every matrix, ones for norm weights (HF Llama's `initializer_range` scheme); with
        `init_scheme = "scaled"` the residual branches' output projections draw with init_std / sqrt(2 · n_layers)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        cfg = self.config
        branch_out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.init_scheme == "scaled" else cfg.init_std
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.ndim == 2:
                    branch_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                    p.normal_(0.0, branch_out_std if branch_out else cfg.init_std, generator=gen)
                else:
                    p.fill_(1.0)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables, non-persistent buffers that no checkpoint holds."""
        cos, sin = rope_cache(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """idx (B, T) -> logits (B, T, V), or the final-norm hidden states (B, T, C) with `return_hidden`.

        `positions` (B, T): each token's rotary position, per row (default 0..T-1, or after the cache's `pos`).
        `mask` (B, T, T), boolean: which keys each query sees (default causal); not with a cache."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        end = start + T if positions is None else int(positions.max()) + 1 if positions.numel() else 0
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {start + T} needed")
        if cache is not None and (positions is not None or mask is not None):
            raise ValueError("positions and mask are for calls without a KV cache")
        x = self.embed_tokens(idx)  # (B, T, C)
        if positions is None:
            cos = self.rope_cos[start : start + T].to(x.dtype)  # (T, D)
            sin = self.rope_sin[start : start + T].to(x.dtype)
        else:
            cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)  # (B, 1, T, D)
            sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        attn_mask = mask.unsqueeze(1) if mask is not None else None  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)  # (B, T, C)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache. `dtype`: default the residual stream's (a packed model's embedding table may be 16-bit);
        torch.float16 halves a float32 model's cache (keys and values rounded to nearest when stored, as llama.cpp's
        default f16 cache does); torch.int8 is the q8 cache (`KVCache`)."""
        p = self.norm.weight
        return KVCache.empty(self.config, batch_size, max_len or self.config.max_seq_len, p.device, dtype or p.dtype)

    # ---- accounting -------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward+backward FLOPs per token (`spectra.accounting.flops_per_token`)."""
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
