"""Weight quantizers for quantization-aware training, selected by `ModelConfig.quantizer` and `quantizer_options`.

A quantizer maps a latent float weight W (out x in) to integer codes Ŵ and one scale per model-parallel shard
(`spectra.ternary`: shards split the output rows for q/k/v/gate/up, `dim=0`, the input columns for o/down, `dim=1`);
the forward pass uses W̃ = s·Ŵ and the backward pass is straight-through to W (∂L/∂W = ∂L/∂W̃). Per shard:

    trilm      γ = ε + mean|W|             Ŵ = round(clip(W/γ, −1, 1)) ∈ {−1, 0, 1}       (Spectra Table 1, ε = 1e-5)
    bitnet158  γ = max(mean|W|, ε)         Ŵ = round(clip(W/γ, −1, 1))                     (BitNet b1.58)
               and activations x̃ = clamp(round(x·a), −128, 127)/a per token, a = 127/max(max|x|, ε), with a
               straight-through gradient, after an RMSNorm inside each linear layer (`TernaryLinear.input_norm`)
    bilm       α = mean|W|                 Ŵ = sign(W − mean W) ∈ {−1, 1}, sign(0) = +1     (Spectra's BiLM ablation)
    twn        Δ = 0.7·mean|W|             Ŵ = sign(W)·[|W| > Δ],  α = mean(|W| : |W| > Δ)  (ternary weight networks)
    uniform    s = max(max|W|, ε)/Q        Ŵ = round(clip(W/s, −Q, Q)),  Q = 2^(k−1) − 1     (k-bit symmetric absmax)

`uniform` is the seed thread's Q(w) = round(w·Q)/Q applied to W/max|W|: 2^k − 1 evenly spaced levels, zero included,
no zero-point. k = 2 is a ternary grid scaled by max|W| (most weights round to 0), k = 8 has 255 levels.

Bits per weight (`Quantizer.bits`, what `spectra.accounting` counts): log2(3) ≈ 1.585 for the ternary quantizers, 1 for
bilm, k for uniform; per-shard scales are not counted (the paper's rule).

Options (`quantizer_options`), on top of any quantizer:

    stochastic_rounding: true   In training, round(v) becomes floor(v + U), U ~ Uniform[0, 1), so E[Ŵ] = clip(v):
                                an unbiased rounding of the (clipped, scaled) latent weight. For bilm the grid is
                                {−1, 1}: Ŵ = +1 with probability (1 + v)/2, v = clip((W − mean W)/α, −1, 1), so
                                again E[Ŵ] = v. Not defined for twn (its zero band is a threshold, not a rounding).
                                In eval mode (`model.eval()`) rounding is to the nearest level.
    learnable_scale: true       The scale becomes s = a·s₀, with s₀ the formula above and `a` a trained parameter, one
                                per shard (one per tensor with the usual single shard), initialised to 1. Its
                                gradient is LSQ's (Esser et al. 2020): W̃ = s·Ŵ with Ŵ = round(clip(W/s, −Q, Q)) gives
                                ∂W̃/∂s = Ŵ − (W/s)·[|W/s| ≤ Q] (and ∂W̃/∂s = Ŵ for bilm and twn, whose codes do not
                                depend on s); no LSQ gradient scaling, since Adam normalises it anyway. The latent
                                weight keeps the plain straight-through gradient.
    progressive: [[0.0, 16], [0.25, 8], [0.5, 4], [0.75, 1.58]]
                                Bit width over training: from each fraction of training on, the given width is used
                                (`set_progress`, called by the trainer every step). A width k in 2..16 is `uniform` k
                                (16 bits: 65535 levels, the "FP16" stage of the seed thread in all but name); the
                                last stage must be the quantizer itself, written as its bits (1.58 for the ternary
                                ones, 1 for bilm, k for uniform-k) or its name ("trilm"). The stage reached is saved
                                with the model (buffer `quantizer.stage`), so a loaded model quantizes as it ended.
    bits: k                     uniform only (required), 2..8.
    threshold: 0.7              twn only: Δ = threshold·mean|W|.

Layers: pure tensor functions and schemes (`stochastic_round`, `AbsmeanTernary`, ...) → `Quantizer` modules that hold
the options' parameters and buffers (a child `quantizer` of every `TernaryLinear`) → `set_progress(model, fraction)`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from spectra.ternary import EPS, absmean, dequantize, per_element, shard_rows, straight_through, ternarize

TERNARY_BITS = math.log2(3)


# ---- pure tensor functions ------------------------------------------------------------------------------------------
def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """floor(x) + [U < x − floor(x)], U ~ Uniform[0, 1): rounds up with probability frac(x), so E[result] = x, and an
    integer x stays itself. (floor(x + U) rounds x + U to the float grid first: x = 1 with U = 1 − 2^-24 gave 2, a
    code outside the clip range, about once in 2^24 draws per weight at the top level.)"""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    low = torch.floor(x)
    return low + (u < x - low).to(x.dtype)


def absmax_quantize_activations(x: Tensor, bits: int = 8, eps: float = EPS) -> Tensor:
    """BitNet b1.58 activations: per token (last dim) a = Qb/max(max|x|, ε), x̃ = clamp(round(x·a), −Qb−1, Qb)/a, with
    Qb = 2^(bits−1) − 1 (127 for 8 bits). Returns x̃ with a straight-through gradient to x."""
    qb = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    a = qb / xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    x_q = (torch.round(xf * a).clamp(-qb - 1, qb) / a).to(x.dtype)
    return x + (x_q - x).detach()


# ---- schemes: scale and codes of one quantization formula -----------------------------------------------------------
class Scheme:
    """`scales(W)` -> one float32 scale per shard; `codes(W, s, stochastic)` -> integer codes given the scales `s`
    broadcast per element. `qmax` is Q for clip-and-round schemes (codes = round(clip(W/s, −Q, Q))), None otherwise."""

    qmax: int | None = None
    bits: float
    stochastic_ok = True

    def __init__(self, num_shards: int, dim: int) -> None:
        self.num_shards, self.dim = num_shards, dim

    def rows(self, W: Tensor) -> Tensor:
        return shard_rows(W, self.num_shards, self.dim)

    def scales(self, W: Tensor) -> Tensor:
        raise NotImplementedError

    def codes(self, W: Tensor, s: Tensor, stochastic: bool = False) -> Tensor:
        v = torch.clamp(W / s, -self.qmax, self.qmax)
        q = stochastic_round(v) if stochastic else torch.round(v)
        return q.to(torch.int8 if self.qmax <= 127 else torch.int16)


class AbsmeanTernary(Scheme):
    """γ = ε + mean|W| (trilm) or max(mean|W|, ε) (bitnet158); Ŵ = round(clip(W/γ, −1, 1))."""

    qmax = 1
    bits = TERNARY_BITS

    def __init__(self, num_shards: int, dim: int, eps: float = EPS, clamp: bool = False) -> None:
        super().__init__(num_shards, dim)
        self.eps, self.clamp = eps, clamp

    def scales(self, W: Tensor) -> Tensor:
        m = absmean(W, self.num_shards, self.dim)  # the same reduction as `ternarize`
        return m.clamp(min=self.eps) if self.clamp else m + self.eps


class SignBinary(Scheme):
    """α = mean|W|; Ŵ = sign(W − mean W) with sign(0) = +1."""

    bits = 1.0

    def scales(self, W: Tensor) -> Tensor:
        return self.rows(W).abs().mean(dim=1)

    def codes(self, W: Tensor, s: Tensor, stochastic: bool = False) -> Tensor:
        centered = W - per_element(self.rows(W).mean(dim=1), W.shape, self.dim)
        if not stochastic:
            return torch.where(centered >= 0, 1, -1).to(torch.int8)
        v = torch.clamp(centered / s.clamp(min=torch.finfo(s.dtype).tiny), -1.0, 1.0)
        return (2 * stochastic_round((v + 1) / 2) - 1).to(torch.int8)


class ThresholdTernary(Scheme):
    """Δ = t·mean|W|; Ŵ = sign(W)·[|W| > Δ]; α = mean of |W| over the kept weights (0 if none is kept)."""

    bits = TERNARY_BITS
    stochastic_ok = False

    def __init__(self, num_shards: int, dim: int, threshold: float = 0.7) -> None:
        super().__init__(num_shards, dim)
        self.threshold = threshold

    def deltas(self, W: Tensor) -> Tensor:
        return self.threshold * self.rows(W).abs().mean(dim=1)

    def scales(self, W: Tensor) -> Tensor:
        a = self.rows(W).abs()
        kept = a > self.deltas(W)[:, None]
        return (a * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)

    def codes(self, W: Tensor, s: Tensor, stochastic: bool = False) -> Tensor:
        kept = W.abs() > per_element(self.deltas(W), W.shape, self.dim)
        return (torch.sign(W) * kept).to(torch.int8)


class UniformSymmetric(Scheme):
    """s = max(max|W|, ε)/Q, Q = 2^(k−1) − 1; Ŵ = round(clip(W/s, −Q, Q))."""

    def __init__(self, num_shards: int, dim: int, bits: int, eps: float = EPS) -> None:
        super().__init__(num_shards, dim)
        self.bits, self.qmax, self.eps = bits, 2 ** (bits - 1) - 1, eps

    def scales(self, W: Tensor) -> Tensor:
        return self.rows(W).abs().amax(dim=1).clamp(min=self.eps) / self.qmax


# ---- modules ---------------------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """The weight (and, for bitnet158, activation) quantizer of one `TernaryLinear`, with the options above.

    Interface used by `TernaryLinear`: `codes_and_scales(W)`, `dequantize(codes, scales)`, `forward_weight(W)`
    (straight-through), `quantize_input(x)`, `cacheable`, `bits`, `input_norm` (whether the layer normalises its input
    first) and `set_progress(fraction)`. Parameters: `scale` (learnable_scale); buffers: `stage` (progressive).
    """

    name = ""
    bits: float = TERNARY_BITS
    cacheable = True  # eval-mode codes depend only on the weight and the tensors of this module
    input_norm = False

    def __init__(
        self,
        *,
        num_shards: int = 1,
        dim: int = 0,
        stochastic_rounding: bool = False,
        learnable_scale: bool = False,
        progressive: list | None = None,
    ) -> None:
        super().__init__()
        self.num_shards, self.dim = num_shards, dim
        self.stochastic_rounding = _flag("stochastic_rounding", stochastic_rounding)
        base = self.make_scheme()
        if self.stochastic_rounding and not base.stochastic_ok:
            raise ValueError(
                f"quantizer_options['stochastic_rounding'] is not defined for {self.name}: it has no rounding"
            )
        self.stages = _parse_progressive(progressive, self, base)  # [(fraction, scheme)], empty: always `base`
        self.base = base
        if _flag("learnable_scale", learnable_scale):
            self.scale = nn.Parameter(torch.ones(num_shards))
        else:
            self.register_parameter("scale", None)
        if self.stages:
            self.register_buffer("stage", torch.zeros((), dtype=torch.int64))

    def make_scheme(self) -> Scheme:
        raise NotImplementedError

    def extra_repr(self) -> str:
        opts = [f"name={self.name}", f"bits={self.bits:.3g}"]
        if self.stochastic_rounding:
            opts.append("stochastic_rounding=True")
        if self.scale is not None:
            opts.append("learnable_scale=True")
        if self.stages:
            opts.append(f"progressive={[[f, _stage_bits(s)] for f, s in self.stages]}")
        return ", ".join(opts)

    # ---- progressive schedule ----
    def stage_at(self, fraction: float) -> int:
        """The index of the progressive schedule's stage in use at `fraction` (0..1) of training done."""
        return max(i for i, (start, _) in enumerate(self.stages) if fraction >= start or i == 0)

    def set_progress(self, fraction: float) -> None:
        """Select the stage of the progressive schedule for `fraction` (0..1) of training done."""
        if self.stages:
            index = self.stage_at(fraction)
            if int(self.stage) != index:
                self.stage.fill_(index)

    @property
    def scheme(self) -> Scheme:
        return self.stages[int(self.stage)][1] if self.stages else self.base

    @property
    def current_bits(self) -> float:
        """Bits per weight of the stage in use (equals `bits` without a progressive schedule or at its end)."""
        return self.scheme.bits

    # ---- quantization ----
    def _scales(self, scheme: Scheme, W: Tensor) -> Tensor:
        s = scheme.scales(W)
        return s * self.scale.float() if self.scale is not None else s

    def codes_and_scales(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes shaped like W (round to nearest) and float32 scales, one per shard."""
        scheme, Wf = self.scheme, W.detach().float()
        s = self._scales(scheme, Wf).detach()
        return scheme.codes(Wf, per_element(s, W.shape, self.dim)), s

    def dequantize(self, codes: Tensor, scales: Tensor) -> Tensor:
        return dequantize(codes.to(scales.device), scales, self.dim)

    def forward_weight(self, W: Tensor) -> Tensor:
        """W̃ = s·Ŵ in W's dtype; gradient straight through to W, LSQ gradient to the learnable scale."""
        scheme, Wf = self.scheme, W.detach().float()
        s = per_element(self._scales(scheme, Wf), W.shape, self.dim)
        codes = scheme.codes(Wf, s.detach(), self.training and self.stochastic_rounding).float()
        if self.scale is None:
            return straight_through(W, (codes * s).to(W.dtype))
        if scheme.qmax is not None:  # q = codes in value, ∂q/∂s = ∂clip(W/s)/∂s
            v = torch.clamp(Wf / s, -scheme.qmax, scheme.qmax)
            codes = v + (codes - v).detach()
        return (codes * s).to(W.dtype) + (W - W.detach())

    def quantize_input(self, x: Tensor) -> Tensor:
        return x


class TriLMQuantizer(Quantizer):
    """The paper's absmean ternary: γ = ε + mean|W| per shard; Ŵ = round(clip(W/γ, −1, 1)); W̃ = γ·Ŵ; STE to W.

    `scale_offset` (a buffer, None unless set; saved and loaded with the model when set) adds a constant δ per
    shard: γ = (ε + mean|W|) + δ. It exists for one purpose, starting exactly from a TriLM whose scales were rounded
    to float16/bfloat16 (an unpacked Hugging Face checkpoint, `spectra.train.init.exact_latent`): the float32 mean
    of n weights moves in steps of up to two floats when n is not a power of two, so some scales are reached by no
    latent weight, and the nearest latent leaves γ one float below the checkpoint's. δ = γ_target − γ(W₀) is then
    a float32 subtraction of two numbers within a factor 2 of each other, hence exact (Sterbenz), and γ(W₀) + δ
    rounds to γ_target itself, so the layer reproduces the checkpoint bit for bit. We chose this over a pinned scale
    that training would have to release at some step: with δ the scale keeps following the latent weight as the
    paper's formula does (δ is about 1e-7 of γ), the gradient is unchanged, and the offset travels in the state
    dict, so saving, loading and resuming stay exact without a special case.
    """

    name = "trilm"

    def __init__(self, *, eps: float = EPS, **options: Any) -> None:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < math.inf:
            raise ValueError(f"quantizer_options['eps'] for trilm must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        super().__init__(**options)
        self.plain = not (self.stochastic_rounding or self.scale is not None or self.stages)
        self.register_buffer("scale_offset", None)

    def make_scheme(self) -> Scheme:
        return AbsmeanTernary(self.num_shards, self.dim, self.eps)

    def _scales(self, scheme: Scheme, W: Tensor) -> Tensor:
        s = scheme.scales(W)
        if self.scale_offset is not None and scheme is self.base:
            s = s + self.scale_offset.to(s.device, torch.float32)
        return s * self.scale.float() if self.scale is not None else s

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "scale_offset" in state_dict and self.scale_offset is None:
            self.scale_offset = torch.zeros(self.num_shards, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codes_and_scales(self, W: Tensor) -> tuple[Tensor, Tensor]:
        if self.plain and self.scale_offset is None:  # `ternarize`: the reference (and fastest) implementation
            return ternarize(W, self.num_shards, self.dim, self.eps)
        return super().codes_and_scales(W)

    def forward_weight(self, W: Tensor) -> Tensor:
        if self.plain and self.scale_offset is None:
            codes, scales = ternarize(W, self.num_shards, self.dim, self.eps)
            return straight_through(W, self.dequantize(codes, scales).to(W.dtype))
        return super().forward_weight(W)


def adopt_scale_offsets(model: nn.Module, state: dict[str, Tensor]) -> int:
    """Give every TriLM quantizer of `model` whose `scale_offset` is in `state` a place for it (before comparing
    state-dict keys or loading a state that carries offsets). Returns how many it adopted."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, TriLMQuantizer) and module.scale_offset is None and f"{name}.scale_offset" in state:
            module.scale_offset = torch.zeros(module.num_shards, dtype=torch.float32)
            n += 1
    return n


class BitNet158Quantizer(Quantizer):
    """BitNet b1.58: absmean ternary weights with max(mean|W|, ε), 8-bit per-token absmax activations, a norm first."""

    name = "bitnet158"
    input_norm = True
    activation_bits = 8

    def make_scheme(self) -> Scheme:
        return AbsmeanTernary(self.num_shards, self.dim, EPS, clamp=True)

    def quantize_input(self, x: Tensor) -> Tensor:
        return absmax_quantize_activations(x, self.activation_bits)


class BiLMQuantizer(Quantizer):
    """Binary: α = mean|W|, Ŵ = sign(W − mean W) (sign(0) = +1), W̃ = α·Ŵ; STE to W."""

    name = "bilm"
    bits = 1.0

    def make_scheme(self) -> Scheme:
        return SignBinary(self.num_shards, self.dim)


class TWNQuantizer(Quantizer):
    """Threshold ternary: Ŵ = sign(W)·[|W| > t·mean|W|], α = mean |W| over the kept weights; STE to W."""

    name = "twn"

    def __init__(self, *, threshold: float = 0.7, **options: Any) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 10:
            raise ValueError(f"quantizer_options['threshold'] for twn must be a number in (0, 10), got {threshold!r}")
        self.threshold = float(threshold)
        super().__init__(**options)

    def make_scheme(self) -> Scheme:
        return ThresholdTernary(self.num_shards, self.dim, self.threshold)


class UniformQuantizer(Quantizer):
    """k-bit symmetric absmax QAT: s = max|W|/(2^(k−1) − 1), Ŵ = round(clip(W/s, −Q, Q)); STE to W."""

    name = "uniform"

    def __init__(self, *, bits: int | None = None, **options: Any) -> None:
        if bits is None:
            raise ValueError("quantizer 'uniform' needs quantizer_options['bits'], an integer 2..8")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"quantizer_options['bits'] for uniform must be an integer 2..8, got {bits!r}")
        self.bits = bits
        super().__init__(**options)

    def make_scheme(self) -> Scheme:
        return UniformSymmetric(self.num_shards, self.dim, self.bits)


QUANTIZER_CLASSES: dict[str, type[Quantizer]] = {
    "trilm": TriLMQuantizer,
    "bilm": BiLMQuantizer,
    "bitnet158": BitNet158Quantizer,
    "twn": TWNQuantizer,
    "uniform": UniformQuantizer,
}
OPTIONS = {
    "trilm": {"eps"},
    "bilm": set(),
    "bitnet158": set(),
    "twn": {"threshold"},
    "uniform": {"bits"},
}
COMMON_OPTIONS = {"stochastic_rounding", "learnable_scale", "progressive"}


def build_quantizer(name: str, *, num_shards: int = 1, dim: int = 0, **options: Any) -> Quantizer:
    """The quantizer `name` for one layer; `options` are `ModelConfig.quantizer_options` (validated here)."""
    if name not in QUANTIZER_CLASSES:
        raise ValueError(f"unknown quantizer {name!r}; accepted: {sorted(QUANTIZER_CLASSES)}")
    accepted = OPTIONS[name] | COMMON_OPTIONS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown quantizer_options {unknown} for quantizer {name!r}; accepted: {sorted(accepted)}")
    return QUANTIZER_CLASSES[name](num_shards=num_shards, dim=dim, **options)


def bits_per_weight(name: str, options: dict[str, Any] | None = None) -> float:
    """Bits the paper's accounting gives one weight of this quantizer at the end of training (log2 3, 1 or k)."""
    return build_quantizer(name, **(options or {})).bits


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell every quantizer in `model` how far training has come (0..1); progressive schedules act on it."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.set_progress(fraction)


# ---- option parsing --------------------------------------------------------------------------------------------------
def _flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"quantizer_options['{option}'] must be true or false, got {value!r}")
    return value


def _stage_bits(scheme: Scheme) -> float:
    return round(scheme.bits, 2)


def _parse_progressive(progressive: Any, quantizer: Quantizer, base: Scheme) -> list[tuple[float, Scheme]]:
    """[[fraction, bits], ...] -> [(fraction, scheme)]; see the module docstring for the rules."""
    if progressive is None:
        return []
    where = "quantizer_options['progressive']"
    if not isinstance(progressive, list | tuple) or not progressive:
        raise ValueError(f"{where} must be a non-empty list of [fraction, bits] pairs, got {progressive!r}")
    stages: list[tuple[float, Scheme]] = []
    for i, entry in enumerate(progressive):
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"{where}[{i}] must be a [fraction, bits] pair, got {entry!r}")
        fraction, bits = entry
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            raise ValueError(f"{where}[{i}]: fraction must be a number in [0, 1), got {fraction!r}")
        if i == 0 and fraction != 0:
            raise ValueError(f"{where}[0]: the first stage must start at fraction 0.0, got {fraction!r}")
        if i > 0 and fraction <= stages[-1][0]:
            raise ValueError(f"{where}[{i}]: fractions must increase, got {fraction!r} after {stages[-1][0]!r}")
        is_number = isinstance(bits, int | float) and not isinstance(bits, bool)
        if bits == quantizer.name or (is_number and abs(bits - quantizer.bits) < 0.01):
            scheme = base
        elif isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16:
            scheme = UniformSymmetric(quantizer.num_shards, quantizer.dim, bits)
        else:
            raise ValueError(
                f"{where}[{i}]: bits must be an integer 2..16 (uniform k-bit) or this quantizer's own "
                f"{round(quantizer.bits, 2)} / {quantizer.name!r}, got {bits!r}"
            )
        stages.append((float(fraction), scheme))
    if stages[-1][1] is not base:
        raise ValueError(
            f"{where}: the last stage must be the quantizer itself ({round(quantizer.bits, 2)} or {quantizer.name!r}), "
            f"so the trained model is a {quantizer.name} model"
        )
    return stages
