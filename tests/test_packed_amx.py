"""The AMX-INT8 GEMM (csrc/amx_kernels.h) equals the pure-torch reference and the AVX-512 GEMM bit for bit: TQ2_0 and
TQ1_0 codes, token counts around its 16-token tiles and 32-row panels, ragged row counts, several scale segments,
one and two threads, matmul and matmul_group; the token-major GEMM with and without the row-lane copy."""

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.packed import kernels as K
from tests.conftest import ternary_codes

HAS_AMX = K.extension() is not None and K.cpu_features().get("amx_int8", False)
pytestmark = pytest.mark.skipif(
    not HAS_AMX or "avx512vnni" not in K.supported_paths(), reason="needs a CPU with AMX-INT8 and the C extension"
)


@pytest.fixture
def amx_off_after():
    yield
    K.use_amx(True)


def _vnni(x, *args, **kw):
    before = K.use_amx(False)
    try:
        return K.ternary_matmul(x, *args, path="avx512vnni", **kw)
    finally:
        K.use_amx(before)


@pytest.mark.parametrize("T", [5, 15, 16, 17, 32, 33, 67])
def test_amx_equals_reference_and_avx512(T):
    # rows: fewer than one tile, one panel and a half (the one-A-tile tail), several panels; 1, 2 and 3 segments
    for N, Kdim, shards, dim in ((9, 256, 1, 0), (48, 1536, 3, 1), (100, 768, 2, 0), (70, 1024, 1, 0)):
        qs, q1, bounds, seg_d = ternary_codes(N, Kdim, shards, dim, seed=T + N)
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 5] = 40.0
        x[1] = 0.0  # amax 0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        for threads in (1, 2):
            y2 = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni", n_threads=threads)
            y1 = K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1_0", path="avx512vnni", n_threads=threads)
            assert torch.equal(y2, ref), f"TQ2 T={T} N={N} K={Kdim} threads={threads}"
            assert torch.equal(y1, ref), f"TQ1 T={T} N={N} K={Kdim} threads={threads}"
        assert torch.equal(_vnni(x, qs, bounds, seg_d), ref)
        assert torch.equal(_vnni(x, q1, bounds, seg_d, fmt="tq1_0"), ref)


def test_amx_per_block_scales_non_finite_input_and_mixed_group():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((40, 1280)).astype(np.float32)
    qs, d = F.blocks_from_weight(W, lossy=True)  # a scale per block: 5 segments
    bounds, seg_d = F.scale_segments(d)
    args = [torch.from_numpy(a) for a in (qs, bounds, seg_d)]
    q1 = torch.from_numpy(F.tq1_code_bytes(qs))
    x = torch.randn(20, 1280)
    x[2, 3] = float("nan")
    x[17, 9] = float("inf")
    ref = K.reference_matmul(x, *args)
    ok = torch.ones(20, dtype=torch.bool)
    ok[[2, 17]] = False
    y = K.ternary_matmul(x, *args, path="avx512vnni")
    assert torch.equal(y[ok], ref[ok]) and y[~ok].isnan().all()
    other = ternary_codes(38, 1280, 2, 0, seed=5)
    mats = [(*args, "tq2_0"), (q1, args[1], args[2], "tq1_0"), (other[1], other[2], other[3], "tq1_0")]
    ys = K.ternary_matmul_group(x, mats, path="avx512vnni", n_threads=2)
    for yg, m in zip(ys, mats):
        r = K.reference_matmul(x, *m[:3], fmt=m[3])
        assert torch.equal(yg[ok], r[ok]) and yg[~ok].isnan().all()


@pytest.fixture
def amx_tm():
    before = K.use_amx_tm(64)
    yield K.use_amx_tm
    K.use_amx_tm(before)


@pytest.mark.parametrize("T", [2, 3, 5, 8, 15, 16, 17, 33, 64, 67, 130])
def test_token_major_amx_equals_reference_with_and_without_the_row_lane_copy(amx_tm, T):
    # the token-major GEMM from the row-lane copy (from 2 tokens), from the code bytes by transposes (from
    # amx_tm_min_t; 1 here: every T AMX takes), and switched off; rows ragged and in several chunks (two threads),
    # 1-3 segments, a short last token group, an all-zero row and a large value
    for N, Kdim, shards, dim in ((9, 256, 1, 0), (48, 1536, 3, 1), (100, 768, 2, 0), (70, 1280, 1, 0)):
        qs, _, bounds, seg_d = ternary_codes(N, Kdim, shards, dim, seed=T + N)
        rl = K.rowlane_codes(qs)
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 5] = 40.0
        x[1] = 0.0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        for setting in (1, 64, 0):
            amx_tm(setting)
            for threads in (1, 2):
                for copy in (rl, None):
                    (y,) = K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0", copy)], n_threads=threads)
                    assert torch.equal(y, ref), f"T={T} N={N} K={Kdim} tm={setting} {threads}T rl={copy is not None}"


def test_token_major_amx_non_finite_rows(amx_tm):
    qs, _, bounds, seg_d = ternary_codes(64, 512, 2, 0, seed=7)
    x = torch.randn(40, 512)
    x[2, 3], x[37, 9] = float("nan"), float("inf")
    ok = torch.ones(40, dtype=torch.bool)
    ok[[2, 37]] = False
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    for setting, copy in ((1, None), (64, K.rowlane_codes(qs))):
        amx_tm(setting)
        (y,) = K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0", copy)], n_threads=2)
        assert torch.equal(y[ok], ref[ok]) and y[~ok].isnan().all()


def test_use_amx_switch(amx_off_after):
    assert K.use_amx(False) is True  # on by default where available
    assert K.use_amx(True) is False
    assert K.use_amx(True) is True


@pytest.mark.parametrize("T", [5, 16, 33])
def test_amx_int8_weights_equal_reference(T):
    # the output layer's int8 GEMM: full 32-row panels, a 16-row tail, ragged tails copied into a padded buffer
    g = torch.Generator().manual_seed(T)
    for N, Kdim in ((64, 1792), (48, 256), (37, 768), (5, 512)):
        W = torch.randn(N, Kdim, generator=g) * torch.rand(N, 1, generator=g)
        W[N // 2] = 0.0
        u, r = K.quantize_weight_int8(W)
        x = torch.randn(T, Kdim, generator=g) * 3
        x[1] = 0.0
        ref = K.reference_int8_matmul(x, u, r)
        for threads in (1, 2):
            assert torch.equal(K.int8_matmul(x, u, r, path="avx512vnni", n_threads=threads), ref), f"T={T} N={N}"
        before = K.use_amx(False)
        assert torch.equal(K.int8_matmul(x, u, r, path="avx512vnni"), ref)
        K.use_amx(before)


def test_head_rows_token_major_from_the_row_lane_copy_equals_the_tiles():
    """The int8 output layer with its row-lane copy runs token-major on AMX (B tiles read from the copy in place) on
    the copy's whole 16-row groups and the row-major tiles on the rest (a ragged V, pieces cut off 16): the same bits
    as the tiles alone, logits and statistics (also with each piece of the logits in a per-thread buffer, whose row
    stride is the piece's width), at token counts across the 16-token tiles."""
    g = torch.Generator().manual_seed(12)
    C = 512
    before, tm = K.use_amx(True), K.use_amx_tm(64)
    try:
        for V in (2 * 4096 + 37, 1000, 40):
            u, scale = K.quantize_weight_int8(torch.randn(V, C, generator=g) * 0.05)
            rl = K.rowlane_codes(u)
            w = 1 + 0.1 * torch.randn(C, generator=g)
            for B in (1, 2, 4, 5, 16, 17, 33):
                x = torch.randn(B, C, generator=g) * 2
                for threads in (1, 2):
                    K.use_amx_tm(0)
                    want = K.head_rows(x, w, 1e-5, u, scale, lse=True, n_threads=threads, path="avx512vnni")
                    K.use_amx_tm(64)
                    got = K.head_rows(x, w, 1e-5, u, scale, lse=True, n_threads=threads, path="avx512vnni", rl=rl)
                    assert all(torch.equal(a, b) for a, b in zip(got, want)), (V, B, threads)
                    stats = K.head_rows(x, w, 1e-5, u, scale, lse=True, logits=False, n_threads=threads,
                                        path="avx512vnni", rl=rl)  # each piece in a per-thread buffer
                    assert stats[0] is None and all(torch.equal(a, b) for a, b in zip(stats[1:], want[1:])), (V, B)
    finally:
        K.use_amx(before)
        K.use_amx_tm(tm)


def test_head_rows_without_logits_on_the_tiles_and_the_avx512_kernels():
    """`head_rows(logits=False)` runs each piece of the int8 output layer into a per-thread buffer whose row stride is
    the piece's width, not V: on the AMX tiles and, with AMX off, the AVX-512 4 x 4 tiles, with and without the quad
    GEMM, at token counts across both kernels' tile edges, its argmax, log-sum-exp and chosen logit equal those of the
    logits written out, bit for bit."""
    g = torch.Generator().manual_seed(11)
    C, V = 512, 2 * 4096 + 37  # three pieces, the last ragged
    u, scale = K.quantize_weight_int8(torch.randn(V, C, generator=g) * 0.05)
    w = 1 + 0.1 * torch.randn(C, generator=g)
    before = K.use_amx(True)
    try:
        for amx, quad in ((True, 8), (False, 8), (False, 0)):
            K.use_amx(amx)
            was_quad = K.use_quad(quad)
            try:
                for B in (1, 3, 5, 16, 17):
                    x = torch.randn(B, C, generator=g) * 2
                    y, idx, lse, top = K.head_rows(x, w, 1e-5, u, scale, lse=True, n_threads=2, path="avx512vnni")
                    none, idx2, lse2, top2 = K.head_rows(x, w, 1e-5, u, scale, lse=True, logits=False, n_threads=2,
                                                         path="avx512vnni")  # fmt: skip
                    assert none is None and torch.equal(idx2, idx) and torch.equal(lse2, lse), (amx, quad, B)
                    assert torch.equal(top2, top) and torch.equal(top, y.gather(1, idx.view(-1, 1)).view(-1))
            finally:
                K.use_quad(was_quad)
    finally:
        K.use_amx(before)
