"""The token-lane GEMM (csrc/lane_kernels.h) equals the pure-torch reference and the 4 x 4 tile GEMM bit for bit:
TQ2_0 and TQ1_0 codes, token counts around its 16-token groups, ragged row counts around its 32-row panels and
16-row passes, scale segments that end inside a panel slice, non-finite inputs, one to three threads, matmul and
matmul_group; and the switch that sets where it starts."""

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.packed import kernels as K
from tests.conftest import assert_rows_or_nan, non_finite_input, ternary_codes

pytestmark = pytest.mark.skipif(
    K.extension() is None or "avx512vnni" not in K.supported_paths(), reason="needs AVX-512 VNNI and the C extension"
)


@pytest.fixture
def lane_from():
    """Set the lane GEMM's first token count (AMX off, so that the lanes run on AMX machines too, and the quad GEMM
    off, which would take the counts below 128 / 256); restored after."""
    amx, before, quad = K.use_amx(False), K.use_lane(32), K.use_quad(0)

    def set_from(n):
        K.use_lane(n)

    yield set_from
    K.use_lane(before)
    K.use_quad(quad)
    K.use_amx(amx)


def _tiles(x, *args, **kw):
    before, quad = K.use_lane(0), K.use_quad(0)
    try:
        return K.ternary_matmul(x, *args, path="avx512vnni", **kw)
    finally:
        K.use_lane(before)
        K.use_quad(quad)


@pytest.mark.parametrize("T", [1, 5, 16, 17, 31, 32, 33, 48, 70])
def test_lane_equals_reference_and_tiles(lane_from, T):
    lane_from(1)  # every token count through the lanes
    # rows: full 32-row panels, a 16-row tail, ragged tails; K: 1 to 7 blocks (slices of 2: a last slice of 1);
    # segments: 1, 2 (ending inside a slice: 3 blocks each), 3, and one per block
    rng = np.random.default_rng(T)
    W = rng.standard_normal((21, 1792)).astype(np.float32)
    qb, db = F.blocks_from_weight(W, lossy=True)
    bb, sb = F.scale_segments(db)
    per_block = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (qb, F.tq1_code_bytes(qb), bb, sb))
    shapes = ((64, 512, 1, 0), (48, 1536, 2, 1), (37, 768, 3, 1), (9, 256, 1, 0), (33, 1792, 1, 0))
    cases = [ternary_codes(*shape, seed=T) for shape in shapes] + [per_block]
    for qs, q1, bounds, seg_d in cases:
        Kdim = qs.shape[1] // 64 * 256
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 7] = 50.0  # an outlier
        if T > 2:
            x[1] = 0.0  # a zero token: scale 0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        tiles = _tiles(x, qs, bounds, seg_d)
        assert torch.equal(tiles, ref)
        for threads in (1, 2, 3):
            y = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni", n_threads=threads)
            assert torch.equal(y, ref), f"tq2 T={T} N={qs.shape[0]} K={Kdim} threads={threads}"
            y1 = K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1", path="avx512vnni", n_threads=threads)
            assert torch.equal(y1, ref), f"tq1 T={T} N={qs.shape[0]} K={Kdim} threads={threads}"


def test_lane_non_finite_input_and_mixed_group(lane_from):
    lane_from(32)  # the default: 40 tokens run in the lanes
    qs, q1, bounds, seg_d = ternary_codes(40, 1280, 5, 1, seed=3)
    x, ok = non_finite_input(40, 1280, 2, 37)
    y = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni")
    assert_rows_or_nan(y, K.reference_matmul(x, qs, bounds, seg_d), ok)
    other = ternary_codes(70, 1280, 1, 0, seed=5)
    mats = [(qs, bounds, seg_d, "tq2_0"), (q1, bounds, seg_d, "tq1_0"), (other[0], other[2], other[3], "tq2_0")]
    ys = K.ternary_matmul_group(x, mats, path="avx512vnni", n_threads=2)
    for yg, m in zip(ys, mats):
        assert_rows_or_nan(yg, K.reference_matmul(x, *m[:3], fmt=m[3]), ok)


def test_use_lane_switch(lane_from):
    assert K.use_lane(0) == 32  # the default: from 32 tokens
    assert K.use_lane(16) == 0
    assert K.use_lane(32) == 16
    with pytest.raises(ValueError, match="min_tokens must be >= 0"):
        K.use_lane(-1)
