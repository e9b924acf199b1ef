"""The uniform b-bit weight quantizer shared by GPTQ and round-to-nearest (RTN).

For a slice x of a weight matrix (rows = output channels) each row gets a scale s and an integer zero-point z
(IST-DASLab `quant.Quantizer` with perchannel=True, mse=False):

    xmin = min(min_j x_j, 0)          xmax = max(max_j x_j, 0)            (the range always contains 0)
    symmetric:   xmax = max(|xmin|, xmax),  xmin = −xmax  (when xmin < 0),  z = (maxq + 1) / 2
    asymmetric:  z = round(−xmin / s)
    rows with xmin = xmax = 0 use the range [−1, 1];   s = (xmax − xmin) / maxq,   maxq = 2^bits − 1

    code q = clamp(round(x / s) + z, 0, maxq)         dequantized  x̂ = s · (q − z)

Groups: with `group_size` g the input columns are cut into groups of g; each (row, group) has its own s and z. The
result of quantizing a whole matrix is a `QuantizedWeight` in the orientation of a GPTQ checkpoint: codes (out, in),
scales and zeros (G, out), and `g_idx` (in,) naming the group of every input column (act-order permutes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 8


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group parameters of one (out, in) matrix:
    W[o, i] = scales[g, o] · (codes[o, i] − zeros[g, o]) with g = g_idx[i]."""

    codes: Tensor  # (out, in) uint8 in [0, 2^bits − 1]
    scales: Tensor  # (G, out) float32 (float64 when computed from a float64 layer)
    zeros: Tensor  # (G, out) int32, the true zero-point (not the v1 "zero − 1")
    g_idx: Tensor  # (in,) int32
    bits: int
    group_size: int  # −1: one group per row
    sym: bool

    def dequantize(self) -> Tensor:
        g = self.g_idx.long()
        scales = self.scales[g].T  # (out, in)
        zeros = self.zeros[g].T.to(scales.dtype)
        return scales * (self.codes.to(scales.dtype) - zeros)


class Quantizer:
    """Bits, group size and symmetry of the quantization grid; `find_params` / `quantize` act row-wise on a slice."""

    def __init__(self, bits: int, *, group_size: int = -1, sym: bool = True) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
            raise ValueError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.maxq = 2**bits - 1

    def __repr__(self) -> str:
        return f"Quantizer(bits={self.bits}, group_size={self.group_size}, sym={self.sym})"

    def check_columns(self, columns: int, name: str = "weight") -> None:
        if self.group_size != -1 and columns % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide the {columns} input features of {name}; "
                "choose a divisor of the input features or -1 (one group per row)"
            )

    def find_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero-point of every row of x (..., cols), each of shape (..., 1), in x's dtype."""
        zero_ = torch.zeros((), dtype=x.dtype, device=x.device)
        xmin = torch.minimum(x.amin(-1), zero_)
        xmax = torch.maximum(x.amax(-1), zero_)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -1.0, xmin)
        xmax = torch.where(empty, 1.0, xmax)
        scale = (xmax - xmin) / self.maxq
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale.unsqueeze(-1), zero.unsqueeze(-1)

    def codes(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """q = clamp(round(x / s) + z, 0, maxq), as floats of x's dtype."""
        return torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """x̂ = s · (q − z)."""
        return scale * (self.codes(x, scale, zero) - zero)

    def rtn(self, W: Tensor) -> QuantizedWeight:
        """Round-to-nearest of a whole (out, in) matrix, group by group."""
        rows, cols = W.shape
        self.check_columns(cols)
        W = W.float()
        g = cols if self.group_size == -1 else self.group_size
        Wg = W.reshape(rows, cols // g, g)  # (out, G, g)
        scale, zero = self.find_params(Wg)  # (out, G, 1)
        codes = self.codes(Wg, scale, zero).reshape(rows, cols)
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=scale.squeeze(-1).T.contiguous(),
            zeros=zero.squeeze(-1).T.to(torch.int32).contiguous(),
            g_idx=(torch.arange(cols, device=W.device) // g).to(torch.int32),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
        )
