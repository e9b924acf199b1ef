"""TQ2_0 / TQ1_0 packing: round trips, byte equality with gguf-py's own quantizer, worked examples, bad input."""

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.ternary import dequantize, ternarize

gguf = pytest.importorskip("gguf")


def _trilm(N, K, shards, dim, seed=0):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.02
    if shards > 1:  # give each shard a visibly different scale
        sizes = [1.0 + 0.5 * i for i in range(shards)]
        W = torch.cat([c * s for c, s in zip(W.chunk(shards, dim=dim), sizes, strict=True)], dim=dim)
    return ternarize(W, shards, dim)


@pytest.mark.parametrize("shards", [1, 2, 3, 6])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_every_shard_count(shards, dim):
    rng = np.random.default_rng(shards * 10 + dim)
    for _ in range(3):
        N = int(rng.integers(1, 8)) * shards * (1 if dim == 1 else 2)
        K = 256 * shards * int(rng.integers(1, 3)) if dim == 1 else 256 * int(rng.integers(1, 5))
        codes, scales = _trilm(N, K, shards, dim, seed=int(rng.integers(1 << 30)))
        codes[0, :256] = 0  # an all-zero block: d = 0 like llama.cpp
        qs, d = F.blocks_from_ternary(codes, scales, dim)
        assert qs.shape == (N, K // 4) and d.shape == (N, K // 256) and d[0, 0] == 0
        assert np.array_equal(F.unpack_codes(qs), codes.numpy())
        W = dequantize(codes, scales.half().float(), dim).numpy()  # γ rounded to fp16 is all that changes
        assert np.array_equal(F.dequantize_blocks(qs, d), W)
        # per-shard γ comes back from the blocks (0 for a shard whose codes are all 0: its γ is not stored)
        nonzero = torch.stack([c.ne(0).any() for c in codes.chunk(shards, dim=dim)])
        expected = torch.where(nonzero, scales.half().float(), torch.zeros(()))
        assert np.array_equal(F.shard_scales(d, shards, dim), expected.numpy())
        for fmt in ("tq2", "tq1"):
            raw = F.to_format(qs, d, fmt)
            assert raw.shape == (N, K // 256 * F.BLOCK_BYTES[F.canonical_format(fmt)])
            qs2, d2 = F.from_format(raw, (N, K), fmt)
            assert np.array_equal(qs2, qs) and np.array_equal(d2, d)


@pytest.mark.parametrize("shape", [(3, 256), (5, 768), (16, 1024)])
def test_bytes_equal_gguf_quantizer(shape):
    for shards, dim in ((1, 0), (shape[0] if shape[0] in (3, 5) else 2, 0), (shape[1] // 256, 1)):
        codes, scales = _trilm(*shape, shards, dim, seed=shape[0])
        W = dequantize(codes, scales, dim).numpy()  # float32 γ·Ŵ, what gguf would be given
        qs, d = F.blocks_from_ternary(codes, scales, dim)
        ours2, ours1 = F.to_tq2(qs, d), F.to_tq1(qs, d)
        ref2 = gguf.quants.quantize(W, gguf.GGMLQuantizationType.TQ2_0)
        ref1 = gguf.quants.quantize(W, gguf.GGMLQuantizationType.TQ1_0)
        assert ours2.dtype == ref2.dtype == np.uint8 and np.array_equal(ours2, ref2)
        assert np.array_equal(ours1, ref1)
        # and gguf-py decodes our bytes to the same matrix
        assert np.array_equal(
            gguf.quants.dequantize(ours2, gguf.GGMLQuantizationType.TQ2_0), F.dequantize_blocks(qs, d)
        )
        assert np.array_equal(
            gguf.quants.dequantize(ours1, gguf.GGMLQuantizationType.TQ1_0), F.dequantize_blocks(qs, d)
        )


def test_worked_examples_from_the_docstring():
    codes = np.zeros((1, 256), dtype=np.int8)
    codes[0, [5, 37, 69, 101]] = [1, 0, -1, 1]
    qs = F.pack_codes(codes)
    assert qs[0, 5] == 134
    # TQ1_0: codes (q+1) = (2, 0, 1, 1, 2) at elements 0, 32, 64, 96, 128 -> byte 186
    codes = np.zeros((1, 256), dtype=np.int8)
    codes[0, [0, 32, 64, 96, 128]] = [1, -1, 0, 0, 1]
    raw = F.to_tq1(F.pack_codes(codes), np.ones((1, 1), dtype=np.float16))
    assert raw[0, 0] == 186
    assert raw.shape == (1, 54) and raw[0, 52:].view(np.float16)[0] == 1.0


def test_tq1_decodes_every_valid_byte():
    # all 3^5 code patterns in the first byte's five elements
    pats = np.array(np.meshgrid(*[np.arange(3)] * 5, indexing="ij")).reshape(5, -1).T  # (243, 5), c0 most significant
    codes = np.zeros((243, 256), dtype=np.int8)
    codes[:, [0, 32, 64, 96, 128]] = pats - 1
    raw = F.to_tq1(F.pack_codes(codes), np.ones((243, 1), dtype=np.float16))
    assert sorted(raw[:, 0].tolist()) == sorted(set(raw[:, 0].tolist()))  # 243 distinct bytes
    assert np.array_equal(raw[:, 0], (pats @ np.array([81, 27, 9, 3, 1]) * 256 + 242) // 243)
    qs, _ = F.from_tq1(raw, (243, 256))
    assert np.array_equal(F.unpack_codes(qs), codes)


def test_lossy_matches_llama_cpp_rounding():
    # shards of 128 columns: blocks straddle two scales -> exact packing refuses, lossy equals gguf-py
    codes, scales = _trilm(4, 512, 4, 1)
    with pytest.raises(ValueError, match="straddle"):
        F.blocks_from_ternary(codes, scales, 1)
    qs, d = F.blocks_from_ternary(codes, scales, 1, lossy=True)
    W = dequantize(codes, scales, 1).numpy()
    assert np.array_equal(F.to_tq2(qs, d), gguf.quants.quantize(W, gguf.GGMLQuantizationType.TQ2_0))
    G = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)  # not ternary at all
    with pytest.raises(ValueError, match="not ternary"):
        F.blocks_from_weight(G)
    qs, d = F.blocks_from_weight(G, lossy=True)
    assert np.array_equal(F.to_tq1(qs, d), gguf.quants.quantize(G, gguf.GGMLQuantizationType.TQ1_0))


def test_scale_segments():
    d = np.array([[1, 1, 0, 2, 2], [0, 3, 3, 3, 3], [0, 0, 0, 0, 0]], dtype=np.float16)
    bounds, seg_d = F.scale_segments(d)
    assert bounds.tolist() == [0, 3, 5]  # the zero block (row 0, block 2) joins either neighbour
    assert seg_d.tolist() == [[1, 2], [3, 3], [0, 0]]
    bounds, seg_d = F.scale_segments(np.full((4, 16), 0.5, dtype=np.float16))
    assert bounds.tolist() == [0, 16] and seg_d.shape == (4, 1)


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 256"):
        F.pack_codes(np.zeros((2, 300), dtype=np.int8))
    with pytest.raises(ValueError, match="ternary"):
        F.pack_codes(np.full((1, 256), 2, dtype=np.int8))
    with pytest.raises(ValueError, match="multiple of 256"):
        F.blocks_from_weight(np.zeros((2, 100), dtype=np.float32))
    codes, scales = _trilm(2, 512, 1, 0)
    qs, d = F.blocks_from_ternary(codes, scales, 0)
    raw2, raw1 = F.to_tq2(qs, d), F.to_tq1(qs, d)
    with pytest.raises(ValueError, match="needs 264 uint8"):
        F.from_tq2(raw2[:, :-1], (2, 512))
    with pytest.raises(ValueError, match="corrupt TQ1_0"):
        F.from_tq1(raw1.reshape(-1)[:-5], (2, 512))
    bad = raw2.copy()
    bad[1, 70] = 0xFF  # a byte of 2-bit fields equal to 3
    with pytest.raises(ValueError, match="code 3"):
        F.from_tq2(bad, (2, 512))
    bad = raw1.copy()
    invalid = next(v for v in range(256) if not F._TQ1_VALID[v])
    bad[0, 10] = invalid
    with pytest.raises(ValueError, match="not a valid base-3"):
        F.from_tq1(bad, (2, 512))
    bad = raw1.copy()
    bad[0, 48] = (1 * 256 + 242) // 243  # qh byte with a nonzero fifth code
    with pytest.raises(ValueError, match="qh byte"):
        F.from_tq1(bad, (2, 512))
    bad = raw2.copy()
    bad[0, 64:66] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="scale of row 0"):
        F.from_tq2(bad, (2, 512))
    with pytest.raises(ValueError, match="unknown packed format"):
        F.canonical_format("q4_0")


def test_zero_scale_blocks_are_canonical():
    qs = np.full((1, 64), 0xAA, dtype=np.uint8)  # every code +1 ...
    d = np.zeros((1, 1), dtype=np.float16)  # ... but d = 0: the weights are 0
    raw = F.to_tq2(qs, d)
    qs2, d2 = F.from_tq2(raw, (1, 256))
    assert np.all(qs2 == 0x55) and np.all(F.dequantize_blocks(qs2, d2) == 0)
