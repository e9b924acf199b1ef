"""Weight quantizers for quantization-aware training, selected by `ModelConfig.quantizer`.

Each quantizer maps a latent weight W to integer codes and per-shard scales, and gives the forward weight with a
straight-through estimator (STE) to W. `trilm` is the paper's absmean ternary (see `spectra.ternary`).
"""

from __future__ import annotations

from torch import Tensor

from spectra.ternary import EPS, dequantize, straight_through, ternarize


class TriLMQuantizer:
    """γ = ε + mean|W| per shard; Ŵ = round(clip(W/γ, −1, 1)); W̃ = γ·Ŵ; STE to W."""

    name = "trilm"
    cacheable = True
    bits = 1.584962500721156  # log2(3): how the paper counts a ternary weight

    def __init__(self, *, num_shards: int = 1, dim: int = 0, eps: float = EPS) -> None:
        self.num_shards, self.dim, self.eps = num_shards, dim, eps

    def __repr__(self) -> str:
        return f"quantizer={self.name}"

    def codes_and_scales(self, W: Tensor) -> tuple[Tensor, Tensor]:
        return ternarize(W, self.num_shards, self.dim, self.eps)

    def dequantize(self, codes: Tensor, scales: Tensor) -> Tensor:
        return dequantize(codes.to(scales.device), scales, self.dim)

    def forward_weight(self, W: Tensor) -> Tensor:
        codes, scales = self.codes_and_scales(W)
        return straight_through(W, self.dequantize(codes, scales).to(W.dtype))

    def quantize_input(self, x: Tensor) -> Tensor:
        return x


QUANTIZER_CLASSES = {"trilm": TriLMQuantizer}


def build_quantizer(name: str, **kwargs):
    if name not in QUANTIZER_CLASSES:
        raise ValueError(f"unknown quantizer {name!r}; accepted: {sorted(QUANTIZER_CLASSES)}")
    return QUANTIZER_CLASSES[name](**kwargs)


def set_progress(model, fraction: float) -> None:
    """Tell every quantizer in `model` how far training has come (0..1); progressive schedules act on it."""
    for module in model.modules():
        quantizer = getattr(module, "quantizer", None)
        if quantizer is not None and hasattr(quantizer, "set_progress"):
            quantizer.set_progress(fraction)
