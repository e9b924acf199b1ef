"""Compiled ternary kernels: every path equals the pure-torch reference bit for bit; path selection and its errors."""

import numpy as np
import pytest
import torch

from spectra.packed import formats as F
from spectra.packed import kernels as K

COMPILED = [p for p in K.PATHS if p in K.supported_paths()]
needs_ext = pytest.mark.skipif(K.extension() is None, reason="spectra's C extension is not built")


def _layer(N, Kdim, shards=1, dim=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, Kdim), generator=g, dtype=torch.int8)
    codes[N // 2, : min(Kdim, 512)] = 0  # all-zero blocks (d = 0)
    scales = 0.01 + 0.04 * torch.rand(shards, generator=g)
    qs, d = F.blocks_from_ternary(codes, scales, dim)
    bounds, seg_d = F.scale_segments(d)
    return torch.from_numpy(qs), torch.from_numpy(bounds), torch.from_numpy(seg_d), torch.from_numpy(d)


def test_reference_is_the_math():
    """The reference equals s·Σ_σ d_σ·Σ q·a computed independently from dequantized weights."""
    qs, bounds, seg_d, d = _layer(12, 768, shards=3, dim=1)
    x = torch.randn(5, 768)
    a, s = K.quantize_activations(x)
    amax = x.abs().amax(1)
    assert torch.allclose(s, amax / 127) and a.abs().max() == 127
    assert torch.equal(a, torch.round(x * (127 / amax)[:, None]).to(torch.int8))
    W = torch.from_numpy(F.dequantize_blocks(qs.numpy(), d.numpy())).double()
    expected = (a.double() @ W.T) * s.double()[:, None]
    y = K.reference_matmul(x, qs, bounds, seg_d)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-6)
    # and close to the float product: int8 activations are the only approximation
    exact = x.double() @ W.T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.02


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 13, 67])
def test_path_equals_reference(path, T):
    for N, Kdim, shards, dim in ((37, 1024, 1, 0), (20, 1536, 3, 1), (9, 256, 1, 0), (64, 512, 2, 0)):
        qs, bounds, seg_d, _ = _layer(N, Kdim, shards, dim, seed=T)
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 7] = 50.0  # an outlier
        if T > 2:
            x[1] = 0.0  # a zero token: amax 0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        for threads in (1, 2):
            y = K.ternary_matmul(x, qs, bounds, seg_d, path=path, n_threads=threads)
            assert torch.equal(y, ref), f"{path} T={T} N={N} K={Kdim} threads={threads}"


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_per_block_scales_and_non_finite_input(path):
    # a general TQ2_0 matrix: a different d in every block -> one segment per block
    rng = np.random.default_rng(1)
    W = rng.standard_normal((11, 1280)).astype(np.float32)
    qs, d = F.blocks_from_weight(W, lossy=True)
    bounds, seg_d = F.scale_segments(d)
    assert bounds.size == 1280 // 256 + 1
    x = torch.randn(4, 1280)
    x[2, 3] = float("nan")
    x[3, 9] = float("inf")
    args = (torch.from_numpy(qs), torch.from_numpy(bounds), torch.from_numpy(seg_d))
    ref = K.reference_matmul(x, *args)
    y = K.ternary_matmul(x, *args, path=path)
    assert torch.equal(y[:2], ref[:2]) and y[2:].isnan().all() and ref[2:].isnan().all()


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_kernel_quantizer_equals_reference(path):
    x = torch.randn(6, 1024) * 4
    bounds = torch.tensor([0, 1, 4], dtype=torch.int32)
    a, bsum, s = K.kernel_quantize(x, bounds, path=path)
    a_ref, s_ref = K.quantize_activations(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(a, K.permute_activations(a_ref))
    assert bsum[:, 0].tolist() == a_ref[:, :256].sum(1).tolist()
    assert bsum[:, 1].tolist() == a_ref[:, 256:].sum(1).tolist()


def test_path_selection_and_errors(monkeypatch):
    assert K.resolve_path("torch") == "torch"
    assert K.resolve_path("auto") == K.supported_paths()[0]
    with pytest.raises(ValueError, match="unknown kernel path"):
        K.resolve_path("neon9000")
    if K.extension() is not None:
        assert K.resolve_path("scalar") == "scalar"
        monkeypatch.setattr(K, "cpu_features", lambda: {"avx2": True, "fma": True})  # a CPU without AVX-512
        assert K.resolve_path("auto") == "avx2"
        with pytest.raises(ValueError, match=r"needs CPU features .*lacks \['avx512f', 'avx512bw', 'avx512vl', "):
            K.resolve_path("avx512vnni")
        monkeypatch.setenv("SPECTRA_KERNEL", "scalar")
        assert K.resolve_path("auto") == "scalar"


def test_operand_checks():
    qs, bounds, seg_d, _ = _layer(4, 512)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        K.ternary_matmul(torch.randn(2, 512, dtype=torch.float64), qs, bounds, seg_d)
    with pytest.raises(ValueError, match="qs must be contiguous uint8"):
        K.ternary_matmul(torch.randn(2, 768), qs, bounds, seg_d)
    with pytest.raises(ValueError, match="seg_d must be"):
        K.ternary_matmul(torch.randn(2, 512), qs, bounds, seg_d[:2])
