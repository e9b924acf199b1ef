"""What a block linear layer holds, whatever model it came from: exact ternary codes with scales, or a dense matrix.

GGUF export and `spectra bench` both need the weights of a model in a neutral form, whether the model is a latent
TriLM (`TernaryLinear`), a packed TriLM (`PackedTernaryLinear`), a QuantLM (`QuantLinear`) or a FloatLM (`nn.Linear`).

A ternary weight is kept as codes Ŵ ∈ {-1, 0, 1} (int8, shape (out, in)) and a scale table S of shape (out, G): the
columns of row r are split into G equal groups and group g is scaled by S[r, g], so

    W̃[r, c] = S[r, c // (in / G)] · Ŵ[r, c].

A TriLM trained with N-way tensor parallelism has N scales per matrix: for a column-parallel layer (shard_dim 0) that
is G = 1 with the shard's γ repeated over its rows; for a row-parallel layer (shard_dim 1) it is G = N. A packed
TQ2_0/TQ1_0 matrix has one scale per 256-weight block, G = in / 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TernaryWeight:
    codes: Tensor  # int8 (out, in), values in {-1, 0, 1}
    scales: Tensor  # float32 (out, G); G divides in

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def scale_per_column(self) -> Tensor:
        """(out, in) float32 scale of every weight."""
        group = self.codes.shape[1] // self.scales.shape[1]
        return self.scales.float().repeat_interleave(group, dim=1)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.codes.float() * self.scale_per_column()).to(dtype)


def ternary_weight(module: nn.Module) -> TernaryWeight | None:
    """The exact ternary codes and scales of a latent or packed TriLM linear layer; None for other layers."""
    from spectra.layers import TernaryLinear

    if isinstance(module, TernaryLinear):
        with torch.no_grad():
            codes, scales = module.codes_and_scales()
        if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
            return None  # a multi-level ablation quantizer (uniform k-bit, a progressive stage): not ternary
        out_features, in_features = codes.shape
        n = scales.numel()
        if module.shard_dim == 0:
            table = scales.float().repeat_interleave(out_features // n).view(out_features, 1)
        else:
            table = scales.float().view(1, n).expand(out_features, n).contiguous()
        return TernaryWeight(codes.to(torch.int8).cpu(), table.cpu())
    if type(module).__name__ == "PackedTernaryLinear":  # TQ2_0 or TQ1_0 code bytes `qs`, fp16 `d` (out, in/256)
        codes = torch.from_numpy(module.codes())
        return TernaryWeight(codes.to(torch.int8), module.d.float().cpu())
    return None


def check_plain_linear(module: nn.Module, name: str) -> None:
    """Refuse layers that do more than y = x Wᵀ (BitNet-style input norm / activation quantization)."""
    if getattr(module, "input_norm", None) is not None:
        raise ValueError(
            f"{name} normalises and quantizes its input inside the layer (quantizer "
            f"{getattr(module.quantizer, 'name', '?')!r}); a plain Llama model cannot represent that"
        )


def dense_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) matrix a linear layer multiplies by, for any layer kind we know."""
    tw = ternary_weight(module)
    if tw is not None:
        return tw.dense()
    for method in ("dequantized_weight", "dequantize_weight", "quantized_weight"):
        fn = getattr(module, method, None)
        if callable(fn):
            with torch.no_grad():
                return fn().detach().float().cpu()
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point() and weight.ndim == 2:
        return weight.detach().float().cpu()
    raise ValueError(f"cannot read the weight matrix of a {type(module).__name__} layer")
