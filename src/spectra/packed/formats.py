"""Packed ternary formats: llama.cpp's TQ2_0 (2.0625 bits/weight) and TQ1_0 (1.6875 bits/weight), and our layout.

Both llama.cpp formats cut every weight row into blocks of 256 (QK_K) and store, per block, ternary codes
c = q + 1 ∈ {0, 1, 2} for q ∈ {-1, 0, 1} and one fp16 scale d = max|w| of the block *after* the codes; w = d·q.
A TriLM weight W̃ = γ·Ŵ (one γ per model-parallel shard) is therefore stored exactly, up to rounding γ to fp16, as long
as no block straddles two shards with different γ: then every block has d = γ (or d = 0 if all its codes are 0, as
llama.cpp writes it) and q = Ŵ.

TQ2_0 block, 66 bytes: `qs[64]` then `d`. Byte 32h + m (h = 0, 1; m = 0..31) holds the codes of elements
128h + 32l + m in bits 2l..2l+1 (l = 0..3). Worked example: if elements 5, 37, 69 and 101 have q = +1, 0, -1, +1, byte 5
is c₀ | c₁<<2 | c₂<<4 | c₃<<6 = 2 | 1<<2 | 0<<4 | 2<<6 = 0b10_00_01_10 = 134; decoding takes ((134 >> 2l) & 3) − 1.

TQ1_0 block, 54 bytes: `qs[48]`, `qh[4]`, then `d`. Five codes per byte in base 3, most significant first,
v = 81c₀ + 27c₁ + 9c₂ + 3c₃ + c₄ ∈ [0, 242], stored as the fixed-point fraction ⌈256·v/243⌉ = (256v + 242) // 243:
  qs[m], m < 32:      elements m + 32n        (n = 0..4), elements 0..159
  qs[32 + m], m < 16: elements 160 + m + 16n  (n = 0..4), elements 160..239
  qh[m], m < 4:       elements 240 + m + 4n   (n = 0..3) with c₄ = 0, elements 240..255
Decoding needs no division: code n of byte b is ((b·3ⁿ mod 256)·3) >> 8. Example: codes (2, 0, 1, 1, 2) give
v = 162 + 0 + 9 + 3 + 2 = 176 and the byte ⌈256·176/243⌉ = 186; (186·1 mod 256)·3 >> 8 = 2, (186·3 mod 256 = 46)·3 >> 8
= 0, (186·9 mod 256 = 138)·3 >> 8 = 1, and so on. Only 243 of the 256 byte values (81 for qh) are valid encodings.

Our kernel layouts ("blocks") are the llama.cpp blocks with the scales pulled out, rows contiguous (one sequential
stream per row): `qs` uint8 [N, K/4], the 64 code bytes of each TQ2_0 block, or for TQ1_0 `q1` uint8 [N, K/256·52],
the 52 code bytes (qs[48] then qh[4]) of each TQ1_0 block; and `d` fp16 [N, K/256]. Both convert losslessly to and
from both llama.cpp formats. In canonical form a block with d = 0 has all codes 0 (q = 0), which is what llama.cpp
writes.

All functions take and return numpy arrays (torch tensors are accepted as input).
"""

from __future__ import annotations

import numpy as np

QK = 256  # weights per block
TQ2_BLOCK_BYTES = 66  # 64 code bytes + fp16 d
TQ1_BLOCK_BYTES = 54  # 48 + 4 code bytes + fp16 d
TQ1_CODE_BYTES = 52  # code bytes of a TQ1_0 block (its fp16 d kept apart)
FORMATS = {"tq2": "tq2_0", "tq1": "tq1_0", "tq2_0": "tq2_0", "tq1_0": "tq1_0"}
BLOCK_BYTES = {"tq2_0": TQ2_BLOCK_BYTES, "tq1_0": TQ1_BLOCK_BYTES}
CODE_BYTES = {"tq2_0": 64, "tq1_0": TQ1_CODE_BYTES}  # per block in a PackedTernaryLinear's qs (d kept apart)

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)
# Every valid TQ1_0 byte: ⌈256·v/243⌉ for v in [0, 242]; for qh, v must be a multiple of 3 (its fifth code is 0).
_TQ1_VALID = np.zeros(256, dtype=bool)
_TQ1_VALID[(np.arange(243) * 256 + 242) // 243] = True
_TQ1_VALID_QH = np.zeros(256, dtype=bool)
_TQ1_VALID_QH[(np.arange(0, 243, 3) * 256 + 242) // 243] = True


def canonical_format(fmt: str) -> str:
    """'tq2' | 'tq2_0' -> 'tq2_0'; 'tq1' | 'tq1_0' -> 'tq1_0'."""
    key = str(fmt).lower()
    if key not in FORMATS:
        raise ValueError(
            f"unknown packed format {fmt!r}; accepted: 'tq2' (TQ2_0, 2.0625 bpw), 'tq1' (TQ1_0, 1.6875 bpw)"
        )
    return FORMATS[key]


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_cols(K: int, what: str) -> int:
    if K <= 0 or K % QK:
        raise ValueError(
            f"{what}: row length {K} is not a positive multiple of {QK}; TQ1_0/TQ2_0 need 256-weight blocks"
        )
    return K // QK


# ---- codes <-> the 64 code bytes of TQ2_0 blocks ------------------------------------------------------------------


def pack_codes(codes) -> np.ndarray:
    """Ternary codes q ∈ {-1,0,1} of shape [N, K] -> TQ2_0 code bytes `qs` uint8 [N, K/4] (no scales)."""
    q = _numpy(codes)
    if q.ndim != 2:
        raise ValueError(f"codes must be a 2-D matrix, got shape {q.shape}")
    N, K = q.shape
    nb = _check_cols(K, "codes")
    if q.size and (q.min() < -1 or q.max() > 1):
        raise ValueError(f"codes must be ternary (-1, 0, 1); found values in [{q.min()}, {q.max()}]")
    c = (q.astype(np.int16) + 1).astype(np.uint8).reshape(N, nb, 2, 4, 32)  # (N, block, h, l, m)
    qs = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)  # (N, block, h, m)
    return np.ascontiguousarray(qs.reshape(N, nb * 64))


def unpack_codes(qs) -> np.ndarray:
    """TQ2_0 code bytes uint8 [N, K/4] -> codes int8 [N, K]. A 2-bit field equal to 3 is rejected (not ternary)."""
    qs = _numpy(qs)
    if qs.ndim != 2 or qs.dtype != np.uint8 or qs.shape[1] % 64:
        raise ValueError(f"code bytes must be uint8 [N, K/4] with K a multiple of 256, got {qs.dtype} {qs.shape}")
    check_tq2_codes(qs)
    N, nb = qs.shape[0], qs.shape[1] // 64
    fields = (qs.reshape(N, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3  # (N,b,h,l,m)
    return (fields.astype(np.int8) - 1).reshape(N, nb * QK)


def check_tq2_codes(qs: np.ndarray) -> None:
    """Raise if any 2-bit field of TQ2_0 code bytes is 3 (llama.cpp: 'should not be 3')."""
    bad = (qs & (qs >> 1) & 0x55) != 0
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"corrupt TQ2_0 data: code 3 (not ternary) in row {row}, byte {col} (value {qs[row, col]})")


# ---- ternary weights -> blocks (codes + per-block d) --------------------------------------------------------------


def blocks_from_ternary(codes, scales, shard_dim: int = 0, *, lossy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """TriLM codes Ŵ [N, K] and per-shard scales γ [S] along `shard_dim` -> (qs uint8 [N, K/4], d fp16 [N, K/256]).

    Every block gets d = γ of its shard (fp16), or 0 when all its codes are 0 (as llama.cpp writes it). A block that
    straddles two shards with different γ cannot be stored exactly: that is a ValueError unless `lossy=True`, which
    quantizes W̃ = γ·Ŵ the way llama.cpp does (d = block absmax, q = round(w/d)).
    """
    q = _numpy(codes)
    g = _numpy(scales).astype(np.float32).reshape(-1)
    if q.ndim != 2:
        raise ValueError(f"codes must be a 2-D matrix, got shape {q.shape}")
    N, K = q.shape
    nb = _check_cols(K, "codes")
    if shard_dim not in (0, 1) or q.shape[shard_dim] % g.size:
        raise ValueError(f"{g.size} shards cannot split codes of shape {q.shape} along dim {shard_dim}")
    if not np.all(np.isfinite(g)) or np.any(np.abs(g) > 65504):
        raise ValueError(f"scales must be finite and fit fp16 (|γ| <= 65504), got {g.tolist()}")
    if q.size and (q.min() < -1 or q.max() > 1):
        raise ValueError(f"codes must be ternary (-1, 0, 1); found values in [{q.min()}, {q.max()}]")
    size = q.shape[shard_dim] // g.size
    if shard_dim == 0 or size % QK == 0:  # every block inside one shard: exact
        if shard_dim == 0:
            gamma = np.repeat(g, size)[:, None] * np.ones((1, nb), dtype=np.float32)  # (N, nb)
        else:
            gamma = np.repeat(g, size // QK)[None, :] * np.ones((N, 1), dtype=np.float32)
        nonzero = (q.reshape(N, nb, QK) != 0).any(axis=2)
        d = np.where(nonzero, gamma, 0.0).astype(np.float16)
        return pack_codes(q), d
    weight = q.astype(np.float32) * np.repeat(g, size)[None, :]
    try:
        return blocks_from_weight(weight, lossy=lossy)
    except ValueError as e:
        raise ValueError(
            f"shards of {size} input columns are not a multiple of {QK}, so some TQ blocks straddle two shards whose "
            f"scales differ ({g.tolist()}); one fp16 scale per block cannot store that exactly. Pass lossy=True "
            f"(CLI: --lossy) to round those blocks to their absmax like llama.cpp does. ({e})"
        ) from None


def blocks_from_weight(weight, *, lossy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A claimed-ternary float matrix W [N, K] (each 256-block in {-d, 0, d}) -> (qs, d), bit-equal to llama.cpp.

    d = max|w| per block (fp16); q = round(w/d). Unless `lossy`, any element other than ±d or 0 is a ValueError.
    With `lossy=True` this is exactly llama.cpp's / gguf-py's TQ quantizer (round half away from zero).
    """
    w = _numpy(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {w.shape}")
    N, K = w.shape
    nb = _check_cols(K, "weight")
    blocks = w.astype(np.float32, copy=False).reshape(N, nb, QK)
    if not np.all(np.isfinite(blocks)):
        raise ValueError("weight has NaN or infinite values")
    amax = np.abs(blocks).max(axis=2, keepdims=True)  # (N, nb, 1)
    if np.any(amax > 65504):
        raise ValueError("weight has blocks whose absmax exceeds the fp16 range (65504)")
    with np.errstate(divide="ignore"):
        inv = np.where(amax == 0, 0, 1 / amax).astype(np.float32)
    x = blocks * inv
    a = np.abs(x)
    q = np.sign(x) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # round half away from zero (llama.cpp's roundf)
    if not lossy:
        bad = (blocks != 0) & (np.abs(blocks) != amax)
        if bad.any():
            n, b, e = np.argwhere(bad)[0]
            raise ValueError(
                f"weight is not ternary per 256-block: row {n}, column {b * QK + e} is {float(blocks[n, b, e])!r} "
                f"but its block's values must be 0 or ±{float(amax[n, b, 0])!r}"
            )
    q = q.astype(np.int8).reshape(N, K)
    return pack_codes(q), amax[..., 0].astype(np.float16)


def canonicalize(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks whose scale is 0 get all codes 0 (their weights are 0 either way). Returns new code bytes."""
    zero = d == 0
    if not zero.any():
        return qs
    qs = qs.copy().reshape(d.shape[0], d.shape[1], 64)
    qs[zero] = 0x55  # every field c = 1, i.e. q = 0
    return qs.reshape(d.shape[0], -1)


def dequantize_blocks(qs, d, dtype=np.float32) -> np.ndarray:
    """(qs, d) -> W = d·q as a float matrix [N, K]."""
    q = unpack_codes(qs).astype(np.float32)
    d = _numpy(d).astype(np.float32)
    N, nb = d.shape
    return (q.reshape(N, nb, QK) * d[..., None]).reshape(N, nb * QK).astype(dtype)


def shard_scales(d, num_shards: int, shard_dim: int) -> np.ndarray:
    """Recover per-shard scales γ [S] (float32) from per-block scales: the largest |d| in the shard (0 if all zero)."""
    d = np.abs(_numpy(d).astype(np.float32))
    N, nb = d.shape
    if shard_dim == 0:
        if N % num_shards:
            raise ValueError(f"{N} rows cannot be split into {num_shards} shards")
        return d.reshape(num_shards, -1).max(axis=1)
    K = nb * QK
    if K % num_shards:
        raise ValueError(f"{K} columns cannot be split into {num_shards} shards")
    col = np.repeat(d, QK, axis=1)  # (N, K)
    return col.reshape(N, num_shards, -1).max(axis=(0, 2))


# ---- llama.cpp TQ2_0 ----------------------------------------------------------------------------------------------


def to_tq2(qs, d) -> np.ndarray:
    """(qs [N, K/4], d fp16 [N, K/256]) -> TQ2_0 blocks uint8 [N, K/256·66]."""
    qs, d = _numpy(qs), _numpy(d).astype(np.float16)
    N, nb = d.shape
    out = np.empty((N, nb, TQ2_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :64] = qs.reshape(N, nb, 64)
    out[:, :, 64:] = d.reshape(N, nb, 1).view(np.uint8)
    return out.reshape(N, nb * TQ2_BLOCK_BYTES)


def from_tq2(raw, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 blocks (any array of their bytes) of a matrix `shape` = (N, K) -> canonical (qs, d), validated."""
    N, _ = shape
    blocks = _read_blocks(raw, shape, "TQ2_0", TQ2_BLOCK_BYTES)
    nb = blocks.shape[1]
    qs = np.ascontiguousarray(blocks[:, :, :64]).reshape(N, nb * 64)
    d = _block_scales(blocks, "TQ2_0")
    check_tq2_codes(qs)
    return canonicalize(qs, d), d


def _read_blocks(raw, shape: tuple[int, int], fmt: str, block_bytes: int) -> np.ndarray:
    """The bytes of a (N, K) matrix in `fmt` as uint8 blocks [N, K/256, block_bytes], size-checked."""
    N, K = shape
    nb = _check_cols(K, f"{fmt} matrix")
    raw = _numpy(raw)
    if raw.dtype != np.uint8 or raw.size != N * nb * block_bytes:
        raise ValueError(
            f"corrupt {fmt} data: {raw.size} bytes of {raw.dtype}, a [{N}, {K}] matrix needs "
            f"{N * nb * block_bytes} uint8 ({nb} blocks of {block_bytes} bytes per row)"
        )
    return raw.reshape(N, nb, block_bytes)


def _block_scales(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """The fp16 scale stored in the last two bytes of every block, [N, nb]; a non-finite scale is corrupt data."""
    N, nb, _ = blocks.shape
    d = np.ascontiguousarray(blocks[:, :, -2:]).view(np.float16).reshape(N, nb)
    if not np.all(np.isfinite(d)):
        row, blk = np.argwhere(~np.isfinite(d))[0]
        raise ValueError(f"corrupt {fmt} data: scale of row {row}, block {blk} is {d[row, blk]}")
    return d


# ---- llama.cpp TQ1_0 ----------------------------------------------------------------------------------------------


def tq1_code_bytes(qs) -> np.ndarray:
    """TQ2_0 code bytes `qs` uint8 [N, K/4] -> TQ1_0 code bytes `q1` uint8 [N, K/256·52] (per block qs[48], qh[4])."""
    qs = _numpy(qs)
    N, nb = qs.shape[0], qs.shape[1] // 64
    c = (unpack_codes(qs).astype(np.int32) + 1).reshape(N, nb, QK)
    head = (c[:, :, :160].reshape(N, nb, 5, 32) * _POW3.reshape(5, 1)).sum(axis=2)  # (N, nb, 32)
    mid = (c[:, :, 160:240].reshape(N, nb, 5, 16) * _POW3.reshape(5, 1)).sum(axis=2)  # (N, nb, 16)
    tail = (c[:, :, 240:].reshape(N, nb, 4, 4) * _POW3[:4].reshape(4, 1)).sum(axis=2)  # (N, nb, 4)
    v = np.concatenate([head, mid, tail], axis=2)
    return ((v * 256 + 242) // 243).astype(np.uint8).reshape(N, nb * TQ1_CODE_BYTES)


def tq1_kernel_order(q1, enc: np.ndarray | None = None) -> np.ndarray:
    """TQ1_0 code bytes uint8 [N, nb·52] -> the kernels' order (`csrc/tq1_kernels.h`): each row's 48 qs bytes of every
    block, then its 4 qh bytes of every block, each byte mapped through `enc` (uint8 [256], the kernels' encoding;
    None: unchanged). Same size."""
    q1 = _numpy(q1)
    N, nb = q1.shape[0], q1.shape[1] // TQ1_CODE_BYTES
    blocks = q1.reshape(N, nb, TQ1_CODE_BYTES)
    out = np.concatenate([blocks[:, :, :48].reshape(N, nb * 48), blocks[:, :, 48:].reshape(N, nb * 4)], axis=1)
    return np.ascontiguousarray(out if enc is None else enc[out])


def tq1_llama_order(qk, dec: np.ndarray | None = None) -> np.ndarray:
    """The inverse of `tq1_kernel_order` (`dec`: the inverse permutation of its `enc`)."""
    qk = _numpy(qk)
    N, nb = qk.shape[0], qk.shape[1] // TQ1_CODE_BYTES
    q = qk if dec is None else dec[qk]
    blocks = np.concatenate([q[:, : nb * 48].reshape(N, nb, 48), q[:, nb * 48 :].reshape(N, nb, 4)], axis=2)
    return np.ascontiguousarray(blocks.reshape(N, nb * TQ1_CODE_BYTES))


def check_tq1_codes(q1: np.ndarray) -> None:
    """Raise if a TQ1_0 code byte is not a valid base-3 encoding (243 of 256 values for qs, 81 for qh)."""
    N = q1.shape[0]
    blocks = q1.reshape(N, -1, TQ1_CODE_BYTES)
    for part, valid, name, off in (
        (blocks[:, :, :48], _TQ1_VALID, "qs", 0),
        (blocks[:, :, 48:52], _TQ1_VALID_QH, "qh", 48),
    ):
        bad = ~valid[part]
        if bad.any():
            row, blk, byte = np.argwhere(bad)[0]
            raise ValueError(
                f"corrupt TQ1_0 data: row {row}, block {blk}, {name} byte {byte} = {part[row, blk, byte]} is not a "
                "valid base-3 encoding"
            )


def tq2_code_bytes(q1) -> np.ndarray:
    """TQ1_0 code bytes `q1` uint8 [N, K/256·52] (validated) -> TQ2_0 code bytes `qs` uint8 [N, K/4]."""
    q1 = _numpy(q1)
    if q1.ndim != 2 or q1.dtype != np.uint8 or q1.shape[1] % TQ1_CODE_BYTES:
        raise ValueError(f"TQ1_0 code bytes must be uint8 [N, K/256*52], got {q1.dtype} {q1.shape}")
    check_tq1_codes(q1)
    N, nb = q1.shape[0], q1.shape[1] // TQ1_CODE_BYTES
    blocks = q1.reshape(N, nb, TQ1_CODE_BYTES)
    head = _trits(blocks[:, :, :32], 5).reshape(N, nb, 160)
    mid = _trits(blocks[:, :, 32:48], 5).reshape(N, nb, 80)
    tail = _trits(blocks[:, :, 48:52], 4).reshape(N, nb, 16)
    codes = (np.concatenate([head, mid, tail], axis=2).astype(np.int8) - 1).reshape(N, nb * QK)
    return pack_codes(codes)


_TQ1_ZERO_BLOCK = None  # the TQ1_0 code bytes of a block whose codes are all 0 (filled on first use)


def canonicalize_tq1(q1: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ1_0 code bytes: blocks whose scale is 0 get all codes 0 (as `canonicalize` does for TQ2_0)."""
    global _TQ1_ZERO_BLOCK
    zero = d == 0
    if not zero.any():
        return q1
    if _TQ1_ZERO_BLOCK is None:
        _TQ1_ZERO_BLOCK = tq1_code_bytes(np.full((1, 64), 0x55, dtype=np.uint8))[0]
    q1 = q1.copy().reshape(d.shape[0], d.shape[1], TQ1_CODE_BYTES)
    q1[zero] = _TQ1_ZERO_BLOCK
    return q1.reshape(d.shape[0], -1)


def to_tq1(qs, d) -> np.ndarray:
    """(qs [N, K/4], d fp16 [N, K/256]) -> TQ1_0 blocks uint8 [N, K/256·54]."""
    return tq1_blocks(tq1_code_bytes(qs), d)


def tq1_blocks(q1, d) -> np.ndarray:
    """(TQ1_0 code bytes q1 [N, K/256·52], d fp16 [N, K/256]) -> TQ1_0 blocks uint8 [N, K/256·54]."""
    d = _numpy(d).astype(np.float16)
    N, nb = d.shape
    out = np.empty((N, nb, TQ1_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :TQ1_CODE_BYTES] = _numpy(q1).reshape(N, nb, TQ1_CODE_BYTES)
    out[:, :, TQ1_CODE_BYTES:] = d.reshape(N, nb, 1).view(np.uint8)
    return out.reshape(N, nb * TQ1_BLOCK_BYTES)


def from_tq1_codes(raw, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 blocks of a matrix `shape` = (N, K) -> canonical (q1 code bytes [N, K/256·52], d), validated, kept in
    base 3 (for the TQ1 kernels). Out-of-range bytes and non-finite scales are a ValueError."""
    N, _ = shape
    blocks = _read_blocks(raw, shape, "TQ1_0", TQ1_BLOCK_BYTES)
    nb = blocks.shape[1]
    q1 = np.ascontiguousarray(blocks[:, :, :TQ1_CODE_BYTES]).reshape(N, nb * TQ1_CODE_BYTES)
    check_tq1_codes(q1)
    d = _block_scales(blocks, "TQ1_0")
    return canonicalize_tq1(q1, d), d


def from_tq1(raw, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 blocks of a matrix `shape` = (N, K) -> canonical (qs, d). Out-of-range bytes are a ValueError."""
    q1, d = from_tq1_codes(raw, shape)
    return canonicalize(tq2_code_bytes(q1), d), d


def _trits(b: np.ndarray, n: int) -> np.ndarray:
    """Codes 0..n-1 of TQ1_0 bytes b (N, nb, m) -> (N, nb, n, m): ((b·3ⁿ mod 256)·3) >> 8."""
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)[:n, None]
    return (((b.astype(np.uint16)[:, :, None, :] * pow3) & 0xFF) * 3) >> 8


def to_format(qs, d, fmt: str) -> np.ndarray:
    """Blocks -> llama.cpp bytes of format 'tq2'/'tq2_0' or 'tq1'/'tq1_0'."""
    return to_tq2(qs, d) if canonical_format(fmt) == "tq2_0" else to_tq1(qs, d)


def from_format(raw, shape: tuple[int, int], fmt: str) -> tuple[np.ndarray, np.ndarray]:
    return from_tq2(raw, shape) if canonical_format(fmt) == "tq2_0" else from_tq1(raw, shape)


# ---- scale segments for the kernels -------------------------------------------------------------------------------


def scale_segments(d) -> tuple[np.ndarray, np.ndarray]:
    """Split the blocks of a row into the fewest runs over which every row's scale is constant.

    Returns (bounds int32 [S+1] block indices, seg_d float32 [N, S]). All-zero blocks (d = 0, canonical form) take the
    scale of their neighbours: their integer contribution Σ(q+1)a − Σa is exactly 0 whatever scale multiplies it.
    A TriLM layer has one segment (shards along the output rows) or one per input shard; a general TQ file may have
    one per block.
    """
    d = _numpy(d).astype(np.float32)
    N, nb = d.shape
    filled = d.copy()
    if nb > 1 and (filled == 0).any():
        idx = np.where(filled != 0, np.arange(nb)[None, :], 0)
        np.maximum.accumulate(idx, axis=1, out=idx)  # forward fill from the last nonzero block
        filled = np.take_along_axis(filled, idx, axis=1)
        first = np.argmax(d != 0, axis=1)  # leading zeros take the first nonzero scale
        lead = np.arange(nb)[None, :] < first[:, None]
        filled = np.where(lead, d[np.arange(N), first][:, None], filled)
    change = np.ones(nb, dtype=bool)
    if nb > 1:
        change[1:] = (filled[:, 1:] != filled[:, :-1]).any(axis=0)
    starts = np.flatnonzero(change)
    bounds = np.append(starts, nb).astype(np.int32)
    return bounds, np.ascontiguousarray(filled[:, starts])
