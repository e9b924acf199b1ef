"""Quantization warm-up for turning a FloatLM into a TriLM (`train.quant_warmup_tokens`, `train.quant_warmup_shape`).

Every ternary layer's forward pass uses

    W_used = W + λ·(Q(W) − W),       λ = λ(tokens seen) going from 0 to 1 over the warm-up

with Q the layer's quantizer as it stands at that step (any of `spectra.quantizers`, at its current progressive
stage), so the run starts from the float model (λ = 0) and ends as the TriLM (λ = 1). The gradient is straight
through to the latent weight: ∂W_used/∂W = (1 − λ)·I + λ·∂Q/∂W = I, since the quantizer's own backward is the
identity; a learnable scale receives λ times its LSQ gradient.

With u = tokens / warm-up tokens clipped to [0, 1]:

    linear    λ = u
    sigmoid   λ = (σ(k(u − ½)) − σ(−k/2)) / (σ(k/2) − σ(−k/2)),  k = 10   (a logistic ramp that is exactly 0 at u = 0
                                                                            and exactly 1 at u = 1)

λ is a pure function of the tokens seen, so a resumed run recomputes it; it is not saved with the model (a saved
TriLM always quantizes fully).
"""

from __future__ import annotations

import math

from torch import nn

from spectra.layers import set_on_ternary_layers

SIGMOID_STEEPNESS = 10.0


def warmup_lambda(tokens: float, warmup_tokens: float, shape: str = "linear") -> float:
    """λ after `tokens` tokens of a warm-up lasting `warmup_tokens` (0: no warm-up, λ = 1)."""
    if warmup_tokens <= 0:
        return 1.0
    u = min(max(tokens / warmup_tokens, 0.0), 1.0)
    if shape == "linear":
        return u
    if shape == "sigmoid":
        k = SIGMOID_STEEPNESS

        def sig(x: float) -> float:
            return 1.0 / (1.0 + math.exp(-x))

        lo, hi = sig(-k / 2), sig(k / 2)
        return min(1.0, max(0.0, (sig(k * (u - 0.5)) - lo) / (hi - lo)))
    raise ValueError(f"quant_warmup_shape must be 'linear' or 'sigmoid', got {shape!r}")


def set_quant_mix(model: nn.Module, mix: float) -> int:
    """Set λ on every ternary layer of `model`; returns how many layers were set."""
    return set_on_ternary_layers(model, quant_mix=float(mix))
