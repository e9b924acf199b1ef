"""Bit packing of GPTQ checkpoints: integer codes <-> int32 words, along dim 0 (`qweight`) or dim 1 (`qzeros`).

Every 32 consecutive codes along the packed dimension occupy exactly `bits` int32 words, in one of two layouts.

Continuous (`checkpoint_format` "gptq" / "gptq_v2"; 2, 3, 4, 8 bits): the 32 codes form one little-endian bit
stream of 32·bits bits, code j at bit offset bits·j; word k holds stream bits [32k, 32k + 32).
    4 bits: word k holds codes 8k .. 8k+7, code 8k+j at bits 4j .. 4j+3.
    3 bits (worked example): 32 codes = 96 bits = 3 words. Word 0 holds v0..v9 (bits 0–29) and the low 2 bits of v10
    (bits 30–31); word 1 the high bit of v10 (bit 0), v11..v20 (bits 1–30) and the low bit of v21 (bit 31); word 2
    the high 2 bits of v21 (bits 0–1) and v22..v31 (bits 2–31).

Planar (`checkpoint_format` "gptq_p", GPTQModel's split-plane layout, the only one for 5, 6, 7 bits): a code is cut
into planes whose widths divide 32 — 6 bits = a 4-bit low plane + a 2-bit high plane (5 = 4+1, 7 = 4+2+1, 3 = 2+1;
2/4/8 are one plane, bit-identical to the continuous layout). For each block of 32 codes the plane words are stored
low plane first: for 6 bits words 0–3 hold the low nibbles (word k: codes 8k..8k+7 at bits 4j) and words 4–5 the high
2-bit fields (word 4+k: codes 16k..16k+15 at bits 2j); code = low | high << 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORD_BITS = 32
CODES_PER_BLOCK = 32  # 32 codes always fill exactly `bits` words
PLANES = {  # bits -> ((plane width, bit offset in the code), ...), low plane first
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
    5: ((4, 0), (1, 4)),
    6: ((4, 0), (2, 4)),
    7: ((4, 0), (2, 4), (1, 6)),
    8: ((8, 0),),
}
LAYOUTS = ("continuous", "planar")
CONTINUOUS_BITS = (2, 3, 4, 8)


def _check(bits: int, layout: str, n: int, what: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "continuous" and bits not in CONTINUOUS_BITS:
        raise ValueError(f"the continuous GPTQ layout holds {CONTINUOUS_BITS} bits, got {bits}; use the planar layout")
    if bits not in PLANES:
        raise ValueError(f"bits must be one of {sorted(PLANES)}, got {bits}")
    if n % CODES_PER_BLOCK:
        raise ValueError(f"{what}: the packed dimension ({n}) must be a multiple of {CODES_PER_BLOCK}")


def _to_int32(words: Tensor) -> Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _fields(bits: int, layout: str) -> list[tuple[int, int, int, int, int]]:
    """(code j, word, shift in word, bit offset in code, field width) of every field of a 32-code block."""
    fields = []
    if layout == "continuous":
        for j in range(CODES_PER_BLOCK):
            start = bits * j
            word, shift = divmod(start, WORD_BITS)
            low = min(bits, WORD_BITS - shift)
            fields.append((j, word, shift, 0, low))
            if low < bits:  # the code straddles into the next word
                fields.append((j, word + 1, 0, low, bits - low))
        return fields
    first_word = 0
    for width, offset in PLANES[bits]:
        per_word = WORD_BITS // width
        for j in range(CODES_PER_BLOCK):
            fields.append((j, first_word + j // per_word, width * (j % per_word), offset, width))
        first_word += width  # a plane of width w takes 32·w/32 = w words
    return fields


def pack_rows(codes: Tensor, bits: int, layout: str = "continuous") -> Tensor:
    """codes (n, cols), integers in [0, 2^bits) -> int32 words (n·bits/32, cols)."""
    n, cols = codes.shape
    _check(bits, layout, n, "pack_rows")
    x = codes.to(torch.int64).reshape(n // CODES_PER_BLOCK, CODES_PER_BLOCK, cols)  # (blocks, 32, cols)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    words = torch.zeros(x.shape[0], bits, cols, dtype=torch.int64, device=codes.device)  # (blocks, bits, cols)
    for j, word, shift, offset, width in _fields(bits, layout):
        words[:, word] |= ((x[:, j] >> offset) & ((1 << width) - 1)) << shift
    return _to_int32(words.reshape(-1, cols))


def unpack_rows(words: Tensor, bits: int, layout: str = "continuous") -> Tensor:
    """int32 words (n·bits/32, cols) -> codes (n, cols) as int32."""
    rows, cols = words.shape
    if rows % bits:
        raise ValueError(f"unpack_rows: {rows} packed rows is not a multiple of bits={bits}")
    _check(bits, layout, rows // bits * CODES_PER_BLOCK, "unpack_rows")
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, cols)  # (blocks, bits, cols)
    codes = torch.zeros(w.shape[0], CODES_PER_BLOCK, cols, dtype=torch.int64, device=words.device)
    for j, word, shift, offset, width in _fields(bits, layout):
        codes[:, j] |= ((w[:, word] >> shift) & ((1 << width) - 1)) << offset
    return codes.reshape(-1, cols).to(torch.int32)


def pack_cols(codes: Tensor, bits: int, layout: str = "continuous") -> Tensor:
    """codes (rows, n) -> int32 words (rows, n·bits/32): the `qzeros` orientation."""
    return pack_rows(codes.T, bits, layout).T.contiguous()


def unpack_cols(words: Tensor, bits: int, layout: str = "continuous") -> Tensor:
    return unpack_rows(words.T, bits, layout).T.contiguous()


def v1_zeros(qzeros: Tensor, bits: int, layout: str = "continuous") -> Tensor:
    """The true zero-points (G, out) of GPTQ v1 `qzeros`, which store zero − 1. At 2, 4 and 8 bits GPTQModel writes
    them by subtracting a one in every field from each whole word (a zero-point of 0 borrows from the field above)
    and reads them back by adding the same word constant, carries included; so does this. Unpacking each field and
    adding 1 read a zero-point of 0 as 2^bits and the field above it one too low (both agree wherever no zero-point is
    0). At 3 bits, whose fields straddle words, each field is read and 1 added (the v1 kernels' reading)."""
    n = qzeros.shape[1]
    if 32 % bits:
        return unpack_cols(qzeros, bits, layout) + 1
    if n % bits:
        raise ValueError(f"v1_zeros: {n} qzeros words a row is not a multiple of bits={bits}")
    ones = pack_cols(torch.ones(1, CODES_PER_BLOCK, dtype=torch.int64), bits, layout).to(torch.int64) & 0xFFFFFFFF
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones.repeat(1, n // bits).to(qzeros.device)) % 2**32
    return unpack_cols(_to_int32(words), bits, layout)
