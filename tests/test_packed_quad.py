"""The quad GEMM (csrc/quad_kernels.h) equals the pure-torch reference and the 4 x 4 tiles bit for bit: TQ2_0 and int8
weights, token counts on and between its groups of 4 (the last T % 4 tokens go to a tile), up to where the token-lane
GEMM takes over (128 tokens for K < 1024, 256 from K = 1024) and past it, ragged row counts around its 4-row passes,
several scale segments, non-finite inputs, one to three threads, matmul, matmul_group (TQ2_0 and TQ1_0 in one group)
and the output layer's matmul_i8, with the TQ2_0 code fields decoded by GFNI and by shifts; and the switch that sets
where it starts."""

from pathlib import Path

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.packed import kernels as K
from tests.conftest import assert_rows_or_nan, non_finite_input, ternary_codes

pytestmark = pytest.mark.skipif(
    K.extension() is None or "avx512vnni" not in K.supported_paths(), reason="needs AVX-512 VNNI and the C extension"
)


@pytest.fixture(params=[True, False], ids=["gfni", "shifts"])
def quad_from(request):
    """Set the quad GEMM's first token count (AMX off, so that it runs on AMX machines too), with the TQ2_0 field
    decode by GFNI (where the CPU has it) and by shifts; restored after."""
    amx, before, gfni = K.use_amx(False), K.use_quad(8), K.use_gfni(request.param)
    yield K.use_quad
    K.use_quad(before)
    K.use_gfni(gfni)
    K.use_amx(amx)


def _tiles(fn, *args, **kw):
    before = K.use_quad(0)
    try:
        return fn(*args, path="avx512vnni", **kw)
    finally:
        K.use_quad(before)


@pytest.mark.parametrize("T", [4, 5, 7, 8, 9, 11, 16, 17, 22, 31, 40, 130])
def test_quad_equals_reference_and_tiles(quad_from, T):
    quad_from(5)  # from 5 tokens: one full group and a tile of 1 at T = 5
    rng = np.random.default_rng(T)
    W = rng.standard_normal((23, 1792)).astype(np.float32)
    qb, db = F.blocks_from_weight(W, lossy=True)
    bb, sb = F.scale_segments(db)
    per_block = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (qb, F.tq1_code_bytes(qb), bb, sb))
    # rows: whole 4-row passes and ragged tails; K: 1 to 7 blocks; segments: 1, 2, 3 and one per block
    shapes = ((64, 512, 1, 0), (50, 1536, 2, 1), (37, 768, 3, 1), (9, 256, 1, 0), (6, 1792, 1, 0), (3, 512, 1, 0))
    for qs, q1, bounds, seg_d in [ternary_codes(*shape, seed=T) for shape in shapes] + [per_block]:
        Kdim = qs.shape[1] // 64 * 256
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 7] = 50.0  # an outlier
        x[T // 2] = 0.0  # a zero token: scale 0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        assert torch.equal(_tiles(K.ternary_matmul, x, qs, bounds, seg_d), ref)
        for threads in (1, 2, 3):
            y = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni", n_threads=threads)
            assert torch.equal(y, ref), f"T={T} N={qs.shape[0]} K={Kdim} threads={threads}"
        ys = K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0"), (q1, bounds, seg_d, "tq1_0")], path="avx512vnni")
        assert torch.equal(ys[0], ref) and torch.equal(ys[1], ref), f"group T={T} N={qs.shape[0]}"


@pytest.mark.parametrize("T", [5, 8, 13, 16, 33])
def test_quad_int8_equals_reference_and_tiles(quad_from, T):
    quad_from(5)
    torch.manual_seed(T)
    for N, Kdim in ((801, 512), (37, 1792), (5, 256), (64, 2048)):
        u, scale = K.quantize_weight_int8(torch.randn(N, Kdim))
        x = torch.randn(T, Kdim) * 2
        x[T - 1] = 0.0
        ref = K.reference_int8_matmul(x, u, scale)
        assert torch.equal(_tiles(K.int8_matmul, x, u, scale), ref)
        for threads in (1, 2, 3):
            y = K.int8_matmul(x, u, scale, path="avx512vnni", n_threads=threads)
            assert torch.equal(y, ref), f"int8 T={T} N={N} K={Kdim} threads={threads}"


def test_quad_non_finite_input(quad_from):
    qs, _, bounds, seg_d = ternary_codes(40, 1280, 5, 1, seed=3)
    x, ok = non_finite_input(16, 1280, 2, 13)
    y = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni")
    assert_rows_or_nan(y, K.reference_matmul(x, qs, bounds, seg_d), ok)
    u, scale = K.quantize_weight_int8(torch.randn(37, 1280))
    assert_rows_or_nan(K.int8_matmul(x, u, scale, path="avx512vnni"), K.reference_int8_matmul(x, u, scale), ok)


def test_use_quad_switch(quad_from):
    assert K.use_quad(0) == 8  # the default: from 8 tokens
    assert K.use_quad(5) == 0
    assert K.use_quad(8) == 5
    with pytest.raises(ValueError, match="min_tokens"):
        K.use_quad(-1)


def test_use_gfni_switch():
    """`use_gfni` reports the state it replaces; without GFNI on the CPU it stays off."""
    before = K.use_gfni(False)
    try:
        assert K.use_gfni(True) is False
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            assert K.use_gfni(True) == ("gfni" in cpuinfo.read_text().split())
    finally:
        K.use_gfni(before)


def test_a_tq1_token_alone_takes_another_kernel_when_the_quad_gemm_is_asked_for_it():
    """With the quad GEMM switched on from one token (`use_quad(1)`), a group call of one TQ1_0 token gave the quad
    GEMM a pointer to an activation layout that had not been built (it ran on the TQ1 layout: max |error| 1.9; a
    sanitizer review, 2026-12-07). The layouts are now handed only where they were sized and built."""
    qs, q1, bounds, seg_d = ternary_codes(64, 512, seed=0)
    x = torch.randn(1, 512)
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    before = K.use_quad(1)
    try:
        for fmt, codes in (("tq1_0", q1), ("tq2_0", qs)):
            got = K.ternary_matmul_group(x, [(codes, bounds, seg_d, fmt)], path="avx512vnni", n_threads=1)[0]
            assert torch.equal(got, ref), fmt
    finally:
        K.use_quad(before)


def test_thread_counts_and_split_leads_are_checked():
    """attention with n_threads < 1 returned memory nothing wrote; a lead past the rows overflowed (the review)."""
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        K.attention(torch.randn(4, 64), torch.randn(4, 10, 64), torch.randn(4, 10, 64), n_threads=-1)
    with pytest.raises(ValueError, match=r"lead must lie in 0\.\.8"):
        K.extension().batch_split_cuts(2, (1, 1, 2, 2, 3, 3, 4, 4), 2**63 - 1, 1)
