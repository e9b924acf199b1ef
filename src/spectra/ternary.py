"""TriLM's ternary linear layer (Spectra, arXiv 2407.12327, §3.1 and Table 1).

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

In eval mode the codes and scales are computed once and cached until the latent weight changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5

# Linear layers of a block and the dimension their shards split: Megatron column-parallel (0) / row-parallel (1).
SHARD_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def _shards(W: Tensor, num_shards: int, dim: int) -> list[Tensor]:
    if dim not in (0, 1):
        raise ValueError(f"shard dim must be 0 (output) or 1 (input), got {dim}")
    if W.shape[dim] % num_shards:
        raise ValueError(f"weight of shape {tuple(W.shape)} cannot be split into {num_shards} shards along dim {dim}")
    return list(W.chunk(num_shards, dim=dim))


def ternarize(W: Tensor, num_shards: int = 1, dim: int = 0, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Absmean ternarization. Returns (codes int8 in {-1,0,1} shaped like W, scales float32 of shape [num_shards])."""
    W = W.detach().float()
    if num_shards == 1 and dim in (0, 1):  # the common case: one pass for γ, one fused in-place pass for the codes
        gamma = W.abs().mean() + eps
        return (W / gamma).clamp_(-1.0, 1.0).round_().to(torch.int8), gamma.reshape(1)
    codes, scales = [], []
    for shard in _shards(W, num_shards, dim):
        gamma = shard.abs().mean() + eps
        codes.append(torch.round(torch.clamp(shard / gamma, -1.0, 1.0)).to(torch.int8))
        scales.append(gamma)
    return torch.cat(codes, dim=dim), torch.stack(scales)


def dequantize(codes: Tensor, scales: Tensor, dim: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """W̃ = γ·Ŵ with one γ per shard along `dim`."""
    n = scales.numel()
    if n == 1:
        return codes.to(torch.float32).mul_(scales.float()).to(dtype)
    size = codes.shape[dim] // n
    shape = [1, 1]
    shape[dim] = codes.shape[dim]
    per_index = scales.float().repeat_interleave(size).view(shape)
    return (codes.float() * per_index).to(dtype)


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


class TernaryLinear(nn.Linear):
    """nn.Linear whose forward uses the quantized weight; the latent weight is trained through the STE.

    The quantizer is `config.quantizer` (default "trilm", the paper's), a child module `quantizer`; see
    `spectra.quantizers` for the ablations. Quantizers that ask for it (`bitnet158`) get an RMSNorm over the input
    features inside the layer, `input_norm` (state-dict key `...<proj>.input_norm.weight`), applied before the input is
    quantized: BitNet's norm before every linear layer, which a Llama checkpoint cannot represent.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_shards: int = 1,
        shard_dim: int = 0,
        quantizer: str = "trilm",
        quantizer_options: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        from spectra.quantizers import build_quantizer

        self.num_shards = num_shards
        self.shard_dim = shard_dim
        self.quantizer = build_quantizer(quantizer, num_shards=num_shards, dim=shard_dim, **(quantizer_options or {}))
        self.quantizer.to(device=device, dtype=dtype)
        self._stateless_quantizer = not [*self.quantizer.parameters(), *self.quantizer.buffers()]
        if self.quantizer.input_norm:
            from spectra.model import RMSNorm

            self.input_norm = RMSNorm(in_features).to(device=device, dtype=dtype)
        else:
            self.input_norm = None
        self._cache: tuple[tuple[int, ...], torch.dtype, Tensor, Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_shards={self.num_shards}, shard_dim={self.shard_dim}"

    def _key(self) -> tuple[int, ...]:
        # the codes depend on the latent weight and on the quantizer's own tensors (learnable scale, progressive stage)
        key = (self.weight._version, self.weight.data_ptr())
        if self._stateless_quantizer:  # the common case, kept cheap: decoding calls this for every layer
            return key
        return (*key, *(t._version for t in (*self.quantizer.parameters(), *self.quantizer.buffers())))

    def codes_and_scales(self) -> tuple[Tensor, Tensor]:
        """Integer codes (ternary: int8 in {-1, 0, 1}) and per-shard scales of the current weight, cached until the
        weight or the quantizer changes."""
        cache = self._cache
        if cache is not None and cache[0] == self._key():
            return cache[2], cache[3]
        return self.quantizer.codes_and_scales(self.weight)

    def set_exact(self, codes: Tensor, scales: Tensor) -> None:
        """Load exact codes and scales (e.g. recovered from an unpacked checkpoint).

        The latent weight is set to Ŵ·(γ−ε)/p per shard (p = fraction of nonzero codes), which the absmean formula maps
        back to the same codes and, up to float rounding, the same γ, so training can continue from here. Inference
        uses the exact codes and scales until the weight is changed.
        """
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match weight {tuple(self.weight.shape)}")
        if scales.numel() != self.num_shards:
            raise ValueError(f"{scales.numel()} scales given for a layer with {self.num_shards} shards")
        latent = []
        for c, g in zip(_shards(codes.float(), self.num_shards, self.shard_dim), scales.float(), strict=True):
            p = c.abs().mean()
            latent.append(c * ((g - EPS).clamp(min=0) / p) if p > 0 else torch.zeros_like(c))
        with torch.no_grad():
            self.weight.copy_(torch.cat(latent, dim=self.shard_dim))
        W_q = dequantize(codes, scales, self.shard_dim, self.weight.dtype).to(self.weight.device)
        self._cache = (self._key(), self.weight.dtype, codes.to(torch.int8), scales.float(), W_q)

    def quantized_weight(self) -> Tensor:
        """W̃ in the weight's dtype (no autograd)."""
        cache = self._cache
        if cache is not None and cache[:2] == (self._key(), self.weight.dtype):
            return cache[4]
        codes, scales = self.quantizer.codes_and_scales(self.weight)
        W_q = self.quantizer.dequantize(codes, scales).to(self.weight.dtype)
        self._cache = (self._key(), self.weight.dtype, codes, scales, W_q)
        return W_q

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        if not self.training and not torch.is_grad_enabled() and self.quantizer.cacheable:
            return F.linear(self.quantizer.quantize_input(x), self.quantized_weight())
        self._cache = None
        return F.linear(self.quantizer.quantize_input(x), self.quantizer.forward_weight(self.weight))


def convert_to_ternary(
    model: nn.Module,
    *,
    num_shards: int = 1,
    quantizer: str = "trilm",
    quantizer_options: dict | None = None,
) -> int:
    """Swap every block linear layer (q/k/v/o/gate/up/down) for a TernaryLinear, keeping the latent weight.

    Embeddings and lm_head are never converted. Returns how many layers were converted.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in SHARD_DIM or type(child) is not nn.Linear:
                continue
            if child.bias is not None:
                raise ValueError(f"{name} has a bias; TriLM linear layers have none")
            new = TernaryLinear(
                child.in_features,
                child.out_features,
                num_shards=num_shards,
                shard_dim=SHARD_DIM[name],
                quantizer=quantizer,
                quantizer_options=quantizer_options,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            with torch.no_grad():
                new.weight.copy_(child.weight)
            setattr(parent, name, new)
            count += 1
    return count
