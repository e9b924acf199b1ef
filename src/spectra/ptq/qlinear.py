"""`QuantLinear`: a linear layer that runs from the tensors of a GPTQ checkpoint, on CPU (or any torch device).

Buffers, as GPTQModel / AutoGPTQ name and shape them (in = in_features, out = out_features, G = groups):

    qweight  int32 (in·bits/32, out)   codes packed along the input dimension (spectra.ptq.packing)
    qzeros   int32 (G, out·bits/32)    zero-points packed along the output dimension
    scales   fp16  (G, out)
    g_idx    int32 (in,)               group of every input channel

    W[o, i] = scales[g, o] · (q[i, o] − z[g, o]),   g = g_idx[i]

`checkpoint_format` says how z is stored: "gptq" (v1, AutoGPTQ's legacy convention) stores z − 1; "gptq_v2" and
"gptq_p" (GPTQModel's planar layout for 5/6/7 bits) store z itself. The forward pass dequantizes the weight into
the input's dtype and calls `F.linear`. The unpacking can cost more than the matmul it feeds (QuantLM decoding at
6m: 21 tok/s unpacking every token, 290 with the weight kept), so a layer can keep its dequantized weight while it
is frozen for inference (`spectra.layers.freeze_for_inference`), but only when asked: the copy is a float layer in
the input's dtype, so a QuantLM holding it takes the FloatLM's memory in that dtype and is no longer the small model
it is measured as. Opt in with `cache_dequantized(model)` (or `QuantLinear.cache_weight = True` before freezing);
`inference_cache_bytes(model)` reports what it holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectra.layers import InferenceCache, freeze_for_inference
from spectra.ptq.packing import CONTINUOUS_BITS, pack_cols, pack_rows, unpack_cols, unpack_rows, v1_zeros
from spectra.ptq.quantizer import MAX_BITS, MIN_BITS, QuantizedWeight

FORMATS = ("gptq", "gptq_v2", "gptq_p")


def checkpoint_format_for(bits: int, sym: bool) -> str:
    """v1 ("gptq") for symmetric 2/3/4/8 bits, as AutoGPTQ/GPTQModel write; "gptq_v2" for asymmetric ones, because
    v1's stored z − 1 cannot hold a zero-point of 0; GPTQModel's planar "gptq_p" for 5/6/7 bits."""
    if bits not in CONTINUOUS_BITS:
        return "gptq_p"
    return "gptq" if sym else "gptq_v2"


def layout_of(checkpoint_format: str) -> str:
    return "planar" if checkpoint_format == "gptq_p" else "continuous"


class QuantLinear(InferenceCache, nn.Module):
    cache_weight = False  # keep the dequantized weight while frozen for inference: opt-in (module docstring)

    def __init__(
        self, in_features: int, out_features: int, *, bits: int, group_size: int, checkpoint_format: str
    ) -> None:
        super().__init__()
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
        if checkpoint_format not in FORMATS:
            raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
        if checkpoint_format != "gptq_p" and bits not in CONTINUOUS_BITS:
            raise ValueError(f"{bits}-bit GPTQ checkpoints use checkpoint_format 'gptq_p', got {checkpoint_format!r}")
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if n % 32:
                raise ValueError(f"GPTQ packing needs {what} to be a multiple of 32, got {n}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        G = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, checkpoint_format={self.checkpoint_format}")

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, checkpoint_format: str | None = None) -> QuantLinear:
        out_features, in_features = qw.codes.shape
        fmt = checkpoint_format or checkpoint_format_for(qw.bits, qw.sym)
        layer = cls(in_features, out_features, bits=qw.bits, group_size=qw.group_size, checkpoint_format=fmt)
        layout = layout_of(fmt)
        zeros = qw.zeros.to(torch.int64)
        if fmt == "gptq":
            if int(zeros.min()) < 1:
                raise ValueError("checkpoint_format 'gptq' (v1) stores zero − 1 and cannot hold a zero-point of 0; "
                                 "use 'gptq_v2'")
            zeros = zeros - 1
        layer.qweight.copy_(pack_rows(qw.codes.T.cpu(), qw.bits, layout))
        layer.qzeros.copy_(pack_cols(zeros.cpu(), qw.bits, layout))
        layer.scales.copy_(qw.scales.to(torch.float16))
        layer.g_idx.copy_(qw.g_idx)
        return layer.to(qw.codes.device)

    def codes(self) -> Tensor:
        """(in, out) int32 codes."""
        return unpack_rows(self.qweight, self.bits, layout_of(self.checkpoint_format))

    def zeros(self) -> Tensor:
        """(G, out) int32 true zero-points (v1, 'gptq': as GPTQModel reads its zero − 1 words, `packing.v1_zeros`)."""
        layout = layout_of(self.checkpoint_format)
        if self.zero_offset:
            return v1_zeros(self.qzeros, self.bits, layout)
        return unpack_cols(self.qzeros, self.bits, layout)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (out, in)."""
        g = self.g_idx.long()
        scales = self.scales.to(torch.float32)[g]  # (in, out)
        W = scales * (self.codes() - self.zeros()[g]).to(torch.float32)
        return W.T.to(dtype)

    def _build_frozen(self) -> dict | None:
        return {} if self.cache_weight else None  # dtype -> dequantized weight, filled by the first forward

    def forward(self, x: Tensor) -> Tensor:
        if self._frozen is not None and not torch.is_grad_enabled():
            W = self._frozen.get(x.dtype)
            if W is None:
                W = self._frozen[x.dtype] = self.dequantize_weight(x.dtype)
            return F.linear(x, W)
        return F.linear(x, self.dequantize_weight(x.dtype))


def cache_dequantized(model: nn.Module) -> int:
    """Opt every QuantLinear of `model` into keeping its dequantized weight, and freeze the model for inference.
    Returns how many layers keep one. Costs a float copy of each layer in the compute dtype."""
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight = True
            m.unfreeze()
            count += 1
    freeze_for_inference(model)
    return count
