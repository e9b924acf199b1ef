"""Matrices with several scale shards per row (real TriLM checkpoints: row-parallel o/down with 2+ input shards) run
through every compiled kernel shape bit-identically to the pure-torch reference."""

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.packed import kernels as K

COMPILED = [p for p in K.PATHS if p in K.supported_paths()]
needs_ext = pytest.mark.skipif(K.extension() is None, reason="spectra's C extension is not built")


def _sharded(N, bounds, seed):
    """Random codes [N, 256·nb] with a different scale per row and per segment (bounds in blocks)."""
    g = torch.Generator().manual_seed(seed)
    nb = bounds[-1]
    codes = torch.randint(-1, 2, (N, 256 * nb), generator=g, dtype=torch.int8)
    qs = torch.from_numpy(F.pack_codes(codes.numpy()))
    seg_d = (0.005 + 0.05 * torch.rand(N, len(bounds) - 1, generator=g)).half().float()
    return qs, torch.tensor(bounds, dtype=torch.int32), seg_d


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("bounds", [[0, 4, 7], [0, 1, 7], [0, 3, 5, 7], [0, 10, 20]])
def test_multi_segment_every_tile_shape(path, bounds):
    """Segments of the 1.1B's shapes (dim 1792 = 7 blocks, split 4 + 3 as `--lossy` packing gives o_proj; down_proj's
    20 blocks split 10 + 10), at every GEMM tile height (N mod 4) and token tail (T mod 4), across the 64-token chunk,
    and the GEMV's 16-row groups plus leftover rows."""
    for N in (16, 33, 34, 35, 36):
        qs, b, seg_d = _sharded(N, bounds, seed=N)
        for T in (1, 2, 3, 4, 5, 6, 7, 8, 69):
            x = torch.randn(T, 256 * bounds[-1]) * (1 + torch.rand(T, 1))
            ref = K.reference_matmul(x, qs, b, seg_d)
            for threads in (1, 2):
                y = K.ternary_matmul(x, qs, b, seg_d, path=path, n_threads=threads)
                assert torch.equal(y, ref), f"{path} bounds={bounds} N={N} T={T} threads={threads}"


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_segments_with_one_scale_equal_one_segment(path):
    """The same weights split into 2 segments that carry the same scale give the 1-segment result exactly when the
    float epilogue adds exact values (power-of-two scales, small sums): the segment sums are integer-exact."""
    N, nb = 37, 7
    qs, _, _ = _sharded(N, [0, nb], seed=3)
    d = torch.full((N, 1), 2.0**-6)
    x = torch.randint(-3, 4, (5, 256 * nb)).float()
    x[:, 0] = 127.0  # amax 127: the int8 activations are x itself, s = 1
    one = K.ternary_matmul(x, qs, torch.tensor([0, nb], dtype=torch.int32), d, path=path)
    two = K.ternary_matmul(x, qs, torch.tensor([0, 4, nb], dtype=torch.int32), d.repeat(1, 2).contiguous(), path=path)
    codes = torch.from_numpy(F.unpack_codes(qs.numpy())).double()
    exact = (x.double() @ codes.T) * 2.0**-6
    assert torch.equal(one, two) and torch.equal(one.double(), exact)
    assert np.isfinite(one.numpy()).all()
