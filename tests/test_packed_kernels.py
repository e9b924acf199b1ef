"""Compiled ternary kernels: every path equals the pure-torch reference bit for bit; path selection and its errors."""

import importlib.util
import math
import sys
import time
from pathlib import Path

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


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_rows_too_small_for_127_over_amax_are_zero_rows(path):
    """Below max|x| = 3.7e-37, 127 / max|x| overflows float32: C's lrintf(inf) gave -127 for every element (signs
    flipped), torch cast NaN to int8. A row with max|x| < Q8_TINY = 2^-100 is a zero row everywhere: activations,
    int8 weights, the q8 KV cache."""
    from spectra.model import Q8_TINY, q8_rows

    x = torch.randn(4, 1024)
    x[0] = x[0] / x[0].abs().max() * 1e-38
    x[1] = x[1] / x[1].abs().max() * Q8_TINY / 2
    x[2] = x[2] / x[2].abs().max() * Q8_TINY  # at the threshold: quantized as usual
    a, bsum, s = K.kernel_quantize(x, torch.tensor([0, 4], dtype=torch.int32), path=path)
    a_ref, s_ref = K.quantize_activations(x)
    assert torch.equal(a, K.permute_activations(a_ref)) and torch.equal(s, s_ref)
    assert (a_ref[:2] == 0).all() and (s_ref[:2] == 0).all() and a_ref[2].abs().max() == 127
    qs, bounds, seg_d, _ = _layer(8, 1024)
    assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path=path), K.reference_matmul(x, qs, bounds, seg_d))
    w = torch.randn(4, 1024)
    w[1] *= 1e-40
    u, r = K.quantize_weight_int8(w)
    assert r[1] == 0 and (K.unpermute_activations(u)[1] == 128).all()
    assert torch.equal(K.int8_matmul(x, u, r, path=path), K.reference_int8_matmul(x, u, r))
    head = x[:, :64].contiguous()
    rows, scales = q8_rows(head)
    assert (rows[:2] == 0).all() and (scales[:2] == 0).all()
    out = torch.zeros(4, 68, dtype=torch.int8)
    K.extension().to_q8(K._PATH_IDS[path], head.data_ptr(), out.data_ptr(), 64, 4)
    assert torch.equal(out[:, :64], rows)


@needs_ext
def test_empty_batches_and_infinite_row_scales():
    from spectra.packed.linear import Int8Linear

    u, r = K.quantize_weight_int8(torch.randn(16, 512))
    y, idx, lse, top = K.head_rows(torch.zeros(0, 512), torch.ones(512), 1e-5, u, r, argmax=True, lse=True)
    assert y.shape == (0, 16) and idx.shape == lse.shape == top.shape == (0,)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        Int8Linear.from_int8(torch.ones(2, 256, dtype=torch.int8), torch.tensor([1.0, float("inf")]))


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


# ---- several matrices of one input -----------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_group_equals_separate_calls(path, T):
    """q|k|v-style groups: one quantization, each output bit-identical to its own call (and to the reference), for
    matrices with one scale, scales per input shard (2 and 6 segments: the 16-row and the row-by-row GEMV), and rows
    that are not a multiple of 16. On 3 threads a one-token group's ranges over the matrices laid end to end
    (rows_span_chunk) cut inside the first two matrices."""
    rng = np.random.default_rng(T)
    W = rng.standard_normal((19, 1536)).astype(np.float32)
    qs6, d6 = F.blocks_from_weight(W, lossy=True)  # one scale per block: 6 segments
    b6, s6 = F.scale_segments(d6)
    mats = [
        _layer(48, 1536, 1, 0, seed=1)[:3],
        _layer(37, 1536, 2, 1, seed=2)[:3],
        (torch.from_numpy(qs6), torch.from_numpy(b6), torch.from_numpy(s6)),
    ]
    x = torch.randn(T, 1536) * 2
    for threads in (1, 2, 3):
        ys = K.ternary_matmul_group(x, mats, path=path, n_threads=threads)
        for y, m in zip(ys, mats):
            assert torch.equal(y, K.reference_matmul(x, *m))
            assert torch.equal(y, K.ternary_matmul(x, *m, path=path))
    assert all(torch.equal(a, b) for a, b in zip(K.ternary_matmul_group(x, mats, path="torch"), ys))
    with pytest.raises(ValueError, match="1 to 8 matrices"):
        K.ternary_matmul_group(x, mats * 3)
    with pytest.raises(ValueError, match="qs must be contiguous uint8"):
        K.ternary_matmul_group(torch.randn(T, 512), mats)


# ---- int8 weights ------------------------------------------------------------------------------------------------


def test_int8_reference_is_the_math():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(21, 512, generator=g)
    W[4] = 0.0
    u, r = K.quantize_weight_int8(W)
    w = K.unpermute_activations(u).to(torch.int16) - 128
    assert u.dtype == torch.uint8 and w.abs().max() == 127 and (w[4] == 0).all() and r[4] == 0
    assert torch.equal(w[0], torch.round(W[0] * (127 / W[0].abs().max())).to(torch.int16))
    torch.testing.assert_close(r, W.abs().amax(1) / 127)
    x = torch.randn(3, 512, generator=g)
    a, s = K.quantize_activations(x)
    expected = (a.double() @ w.double().T) * r.double()[None] * s.double()[:, None]
    y = K.reference_int8_matmul(x, u, r)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)
    exact = x @ W.T
    assert ((y - exact).norm() / exact.norm()).item() < 0.02  # int8 weights and activations, ~1 % error


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("T", [1, 2, 4, 5, 70])
def test_int8_path_equals_reference(path, T):
    g = torch.Generator().manual_seed(T)
    for N, Kdim in ((37, 1792), (16, 256), (5, 768)):
        W = torch.randn(N, Kdim, generator=g) * torch.rand(N, 1, generator=g)
        W[N // 2] = 0.0
        u, r = K.quantize_weight_int8(W)
        x = torch.randn(T, Kdim, generator=g) * 3
        if T > 1:
            x[1] = 0.0
        ref = K.reference_int8_matmul(x, u, r)
        for threads in (1, 2):
            assert torch.equal(K.int8_matmul(x, u, r, path=path, n_threads=threads), ref), f"{path} T={T} N={N}"


def test_int8_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize_weight_int8(torch.randn(4, 300))
    with pytest.raises(ValueError, match="NaN or infinite"):
        K.quantize_weight_int8(torch.full((2, 256), float("inf")))
    u, r = K.quantize_weight_int8(torch.randn(4, 256))
    with pytest.raises(ValueError, match="u must be contiguous uint8"):
        K.int8_matmul(torch.randn(1, 512), u, r)
    with pytest.raises(ValueError, match="scale must be"):
        K.int8_matmul(torch.randn(1, 256), u, r[:2])


# ---- single-query attention ----------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_attention_close_to_sdpa(path):
    """On slices of a KV-cache-shaped tensor (rows contiguous, heads strided), for D a multiple of 16 (AVX-512) and
    not (scalar), short and long prefixes, and large scores (exp's range)."""
    g = torch.Generator().manual_seed(0)
    for H, D in ((5, 64), (3, 40)):
        cache_k = torch.randn(2, 1, H, 50, D, generator=g)
        cache_v = torch.randn(2, 1, H, 50, D, generator=g)
        for S, scale in ((1, 1.0), (17, 1.0), (50, 1.0), (33, 30.0)):
            q = torch.randn(H, D, generator=g) * scale
            k, v = cache_k[1, 0, :, :S], cache_v[1, 0, :, :S]
            ref = torch.softmax((q[:, None] @ k.transpose(1, 2)).double() / D**0.5, -1) @ v.double()
            out = K.attention(q, k, v, path=path)
            torch.testing.assert_close(out.double(), ref[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(K.reference_attention(q, k, v), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="need q"):
        K.attention(torch.randn(2, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="rows of D"):
        K.attention(torch.randn(2, 8), torch.randn(2, 8, 4).transpose(1, 2), torch.randn(2, 8, 4).transpose(1, 2))


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_attention_weights_below_the_exp_floor_are_zero(path):
    """A key more than 87 below the largest score weighs 0 on every path (its e^d would be a subnormal float, which
    Intel cores compute by a microcode assist: 17x the time of a head of sharp attention); one just above weighs
    e^d. A huge value row makes the weight visible: out = e^d v / (1 + e^d)."""
    D = 16
    v = torch.zeros(1, 2, D)
    v[0, 1] = 1e30
    for d, want in ((-86.5, 1e30 * math.exp(-86.5)), (-87.5, 0.0), (-300.0, 0.0)):
        q = torch.zeros(1, D)
        q[0, 0] = 4 * d  # score d: (4 d * 1) / sqrt(16)
        k = torch.zeros(1, 2, D)
        k[0, 1, 0] = 1.0
        out = K.attention(q, k, v, path=path)[0, 0].item()
        assert out == pytest.approx(want, rel=1e-5, abs=0.0), (d, out)


def _anon_huge_bytes(lo: int, hi: int) -> int:
    """Bytes of anonymous 2 MiB pages that /proc/self/smaps reports in the mappings overlapping [lo, hi)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                inside = a < hi and lo < b
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


@needs_ext
def test_huge_pages_keep_addresses_values_and_results():
    """use_huge_pages works in place: same address, same bytes, same kernel output; where Linux moved the pages (6.1+
    with transparent huge pages enabled), smaps shows them, covering every whole 2 MiB page of the buffer."""
    qs, bounds, seg_d, _ = _layer(2048, 8192)  # 4 MiB of code bytes
    x = torch.randn(1, 8192)
    before, ptr = qs.clone(), qs.data_ptr()
    y0 = K.ternary_matmul(x, qs, bounds, seg_d)
    done = K.use_huge_pages(qs, seg_d)
    assert qs.data_ptr() == ptr and torch.equal(qs, before)
    assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d), y0)
    assert torch.equal(y0, K.reference_matmul(x, qs, bounds, seg_d))
    H = 2 << 20
    if done:
        assert done % H == 0 and done >= (qs.numel() // H - 1) * H
        assert _anon_huge_bytes(ptr, ptr + qs.numel()) >= qs.numel() // H * H - H
    with pytest.raises(ValueError, match="CPU tensors"):
        K.use_huge_pages(torch.empty(4, device="meta"))


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_stream_read_reads_every_byte_it_counts(path):
    """stream_read (the read-rate probe of benchmarks/peers.py) reads exactly the bytes it says it read: the largest
    multiple of 256 x streams x threads, each part by every stream. Its C call also returns the OR of the 64-bit words
    read, folded to 32 bits; a distinct bit is planted every 256 bytes, so a skipped range or a byte read past the count
    changes the answer."""
    n = 256 * 4 * 3 * 5 + 1000  # not a multiple of any unit below; under 64 x 256 bytes, so no bit repeats
    words = np.zeros(n // 8, dtype=np.uint64)
    spots = np.arange(0, n // 8, 32)
    words[spots] = np.uint64(1) << (np.arange(len(spots), dtype=np.uint64) % np.uint64(64))
    buf = torch.from_numpy(words.view(np.uint8).copy())
    for threads in (1, 2, 3):
        for streams, prefetch in ((1, 0), (2, 1024), (4, 64)):
            read = K.stream_read(buf, threads, streams=streams, prefetch=prefetch, path=path)
            unit = 256 * streams * threads
            assert read == n // unit * unit
            v = np.bitwise_or.reduce(buf[:read].numpy().view(np.uint64))
            folded = int(v ^ (v >> np.uint64(32))) & 0xFFFFFFFF
            got = K.extension().stream_read(K._PATH_IDS[path], threads, buf.data_ptr(), n, streams, prefetch)
            assert got == (read, folded), (threads, streams, prefetch)
    with pytest.raises(ValueError, match="streams 1..8"):
        K.extension().stream_read(K._PATH_IDS[path], 2, buf.data_ptr(), n, 9, 0)


@needs_ext
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="the round trip uses Linux's threads")
def test_core_round_trip_measures_and_gives_the_caller_its_cpus_back():
    """core_round_trip_ns (benchmarks/peers.py's placement probe): a cache line's round trip between two spinning
    threads takes tens to hundreds of ns between two cores (and far longer, time slices, when both threads share one
    CPU); the calling thread, pinned to one CPU while it measures, gets all its CPUs back; bad counts raise."""
    import os

    cpus = os.sched_getaffinity(0)
    ns = K.core_round_trip_ns(20_000)
    assert os.sched_getaffinity(0) == cpus
    if len(cpus) >= 2:
        assert ns is not None and 5.0 < ns < 100_000.0
    with pytest.raises(ValueError, match="iters 0"):
        K.extension().core_round_trip(0)


@needs_ext
def test_prefetch_settings_change_no_output():
    """set_prefetch returns the settings it replaces (the ones prefetch_tune chose for this CPU's vendor and family),
    and the GEMV and the int8 output layer give the same bits under any distance, copy count and loop (three copies
    fixed at compile time or counted), since prefetches only move data."""
    qs, bounds, seg_d, _ = _layer(64, 1024, shards=2)
    u, scale = K.quantize_weight_int8(torch.randn(48, 1024))
    x = torch.randn(1, 1024)
    y0, h0 = K.ternary_matmul(x, qs, bounds, seg_d), K.int8_matmul(x, u, scale)
    # 50 rows: three 16-row groups and two rows alone; 5 segments: every row alone (more than GROUP_SEGMENTS)
    ragged = [_layer(50, 1536, shards=3, dim=1, seed=1)[:3], _layer(20, 1280, shards=5, dim=1, seed=2)[:3]]
    xr = [torch.randn(1, 1536), torch.randn(1, 1280)]
    yr = [K.reference_matmul(xi, *op) for xi, op in zip(xr, ragged)]
    before = K.set_prefetch(0, 64, True)
    try:
        assert before in ((3072, 2048, True, 3, 3072, True), (6144, 8192, False, 3, 6144, False),
                          (8192, 8192, False, 3, 6144, False))
        assert K.set_prefetch(1024, 0, False, 1, 512) == (0, 64, True) + before[3:]
        # None keeps the current count, step and loop
        assert K.set_prefetch(2048, 0, False) == (1024, 0, False, 1, 512, before[5])
        for copies, fixed in ((1, False), (2, False), (3, False), (3, True), (1, True)):
            K.set_prefetch(512, 256, copies == 2, copies, 256 * copies, fixed)
            assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d), y0)
            assert torch.equal(K.int8_matmul(x, u, scale), h0)
            for xi, op, yi in zip(xr, ragged, yr):  # both one-token loops (gemv1_avx512, gemv1_pf3_avx512)
                assert torch.equal(K.ternary_matmul(xi, *op), yi)
        assert K.set_prefetch(0, 0, False)[3:] == (1, 256, True)
        assert torch.equal(y0, K.reference_matmul(x, qs, bounds, seg_d))
        with pytest.raises(ValueError, match="prefetch distances"):
            K.set_prefetch(-1, 0, False)
        with pytest.raises(ValueError, match="prefetch distances"):
            K.set_prefetch(0, 0, False, 1, 1 << 21)
        with pytest.raises(ValueError, match="gemv_copies must be 1, 2 or 3"):
            K.set_prefetch(1024, 0, False, 4)
    finally:
        K.set_prefetch(*before)


@needs_ext
def test_kernel_ab_tree_prefetch_changes_only_what_it_names(capsys):
    """benchmarks/kernel_ab.py --tree-prefetch: NAME=VALUE items are parsed (unknown names and non-integers refused)
    and applied to one build's settings, the others kept as its import chose them."""
    spec = importlib.util.spec_from_file_location("kernel_ab", Path(__file__).parents[1] / "benchmarks/kernel_ab.py")
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    assert kernel_ab.parse_prefetch(["gemv_fixed=0", "gemv_step=4096"]) == {"gemv_fixed": 0, "gemv_step": 4096}
    for bad in (["foo=1"], ["gemv_step=4k"], ["gemv_step"]):
        with pytest.raises(SystemExit, match="NAME=INTEGER"):
            kernel_ab.parse_prefetch(bad)
    ext = K.extension()
    before = K.set_prefetch(0, 0, False)
    K.set_prefetch(*before)
    try:
        kernel_ab.set_prefetch_of(ext, {"gemv_fixed": int(not before[5]), "i8_bytes": 1024})
        now = K.set_prefetch(0, 0, False)
        assert now == (before[0], 1024, before[2], before[3], before[4], not before[5])
        assert "gemv_fixed" in capsys.readouterr().out
    finally:
        K.set_prefetch(*before)


@needs_ext
@pytest.mark.skipif("avx512vnni" not in COMPILED, reason="far pairs are the AVX-512 GEMV's")
def test_far_pairs_equal_the_reference():
    """The one-token GEMV's far pairs (use_far_pairs(1): row r of a 16-row group with row r of the group half the range
    away, in one block loop) give the reference's bits at ragged sizes: fewer than 32 rows (no pair), an odd group
    left over, rows past the last whole group, 1-4 scale segments per row and more (such rows go one at a time), on
    1 and 2 threads, with and without the far loop's prefetch; use_far_pairs returns what it replaces and checks its
    arguments."""
    before = K.use_far_pairs(1, 0)
    try:
        assert before[0] == -1  # the default: by CPU and model size
        for N, Kdim, shards, dim in ((16, 512, 1, 0), (31, 512, 1, 0), (48, 1024, 2, 0), (77, 2048, 2, 1),
                                     (130, 768, 3, 1), (96, 1536, 6, 1), (200, 512, 4, 0)):
            qs, bounds, seg_d, _ = _layer(N, Kdim, shards, dim, seed=N)
            x = torch.randn(1, Kdim)
            ref = K.reference_matmul(x, qs, bounds, seg_d)
            for step in (0, 4096):
                K.use_far_pairs(1, step)
                for threads in (1, 2):
                    y = K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni", n_threads=threads)
                    assert torch.equal(y, ref), (N, Kdim, shards, dim, step, threads)
            K.use_far_pairs(0)
            assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path="avx512vnni", n_threads=1), ref)
        assert K.use_far_pairs(-1, 8192) == (0, 4096)
        with pytest.raises(ValueError, match="mode must be -1, 0 or 1"):
            K.use_far_pairs(2)
        with pytest.raises(ValueError, match="prefetch distance"):
            K.use_far_pairs(1, -5)
    finally:
        K.use_far_pairs(*before)


# ---- the kernels' thread pool (pool.h) -------------------------------------------------------------------------------


@needs_ext
def test_pool_any_thread_count_and_concurrent_callers():
    """Rows and heads are split over the pool's workers: every thread count (more threads than cores, more than
    chunks) gives the reference bit for bit, attention too, and two Python threads calling at once (the second runs
    its loop alone while the first holds the pool) both get their own right answers."""
    import threading

    path = COMPILED[-1]
    qs, bounds, seg_d, _ = _layer(203, 1536, 3, 1, seed=5)
    x = torch.randn(3, 1536)
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    for threads in (1, 2, 3, 4, 7, 64):
        assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path=path, n_threads=threads), ref), threads
    q, k, v = torch.randn(6, 64), torch.randn(6, 40, 64), torch.randn(6, 40, 64)
    att = K.attention(q, k, v, path=path, n_threads=1)
    for threads in (2, 3, 16):
        assert torch.equal(K.attention(q, k, v, path=path, n_threads=threads), att), threads

    results, errors = {}, []

    def caller(i: int) -> None:
        try:
            xi = torch.randn(2, 1536, generator=torch.Generator().manual_seed(i))
            want = K.reference_matmul(xi, qs, bounds, seg_d)
            results[i] = all(torch.equal(K.ternary_matmul(xi, qs, bounds, seg_d, path=path, n_threads=2), want)
                             for _ in range(50))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {0: True, 1: True, 2: True}


@needs_ext
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="the pool is Linux's (OpenMP elsewhere)")
def test_pool_after_fork():
    """A child forked after the pool has started workers has none of them: its first parallel call starts a worker
    of its own (the thread count in /proc grows; without the fork handler the child would believe it had one and
    run every call alone) and gives the reference."""
    import os

    path = COMPILED[-1]
    qs, bounds, seg_d, _ = _layer(64, 512, 2, 0, seed=1)
    x = torch.randn(2, 512)
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path=path, n_threads=2), ref)  # workers running
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the answer through the pipe
        try:
            before = len(os.listdir("/proc/self/task"))
            ok = torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path=path, n_threads=2), ref)
            ok = ok and len(os.listdir("/proc/self/task")) == before + 1
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1" and status == 0


# ---- float16 KV cache ------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_kv_half_rounding_equals_torch(path):
    """The C conversion that writes a float16 KV cache rounds exactly as torch's .to(float16) does (the model's own
    forward writes the cache that way): ties to even, subnormals, the overflow threshold 65520, infinities, NaN."""
    two = torch.tensor([2.0], dtype=torch.float64)
    edge = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, float("inf"), float("-inf"),
            2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-25, 2.0**-26, 1e-30, 1e-45,
            1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20, 2.0**-15 + 2.0**-25, 5.9604645e-08, 6.1035156e-05]
    g = torch.Generator().manual_seed(0)
    exps = torch.randint(-30, 17, (4000,), generator=g).double()
    rand = (torch.randn(4000, generator=g, dtype=torch.float64) * two.pow(exps)).float()
    halfway = (torch.arange(-2048, 2048, dtype=torch.float32) + 0.5) * 2.0**-24 * 17  # many exact ties
    x = torch.cat([torch.tensor(edge, dtype=torch.float32), rand, halfway])
    x = torch.cat([x, torch.zeros((-len(x)) % 16)])  # whole rows of 16 for the AVX-512 conversion
    out = torch.empty(len(x), dtype=torch.float16)
    K.extension().to_half(K._PATH_IDS[path], x.data_ptr(), out.data_ptr(), len(x))
    assert torch.equal(out.view(torch.int16), x.to(torch.float16).view(torch.int16))
    nan = torch.tensor([float("nan")] * 16)
    K.extension().to_half(K._PATH_IDS[path], nan.data_ptr(), out.data_ptr(), 16)
    assert torch.isnan(out[:16]).all()


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_attention_over_a_float16_cache(path):
    """Keys and values held in float16 (head-strided cache slices) are widened exactly: the result equals the float32
    kernel on the widened values up to float rounding. Head sizes 64 and 128 (each its own copy of the passes), 32 and
    40; heads short enough to fetch the next one's keys and values as they go, and one past ATT_NEAR_BYTES."""
    g = torch.Generator().manual_seed(3)
    for H, D, S in ((4, 64, 37), (3, 40, 9), (3, 128, 70), (3, 32, 21), (2, 64, 300)):
        k = (torch.randn(2, H, S + 13, D, generator=g) * 3).half()
        v = torch.randn(2, H, S + 13, D, generator=g).half()
        q = torch.randn(H, D, generator=g)
        out = K.attention(q, k[1, :, :S], v[1, :, :S], path=path)
        ref = K.attention(q, k[1, :, :S].float().contiguous(), v[1, :, :S].float().contiguous(), path=path)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(K.reference_attention(q, k[1, :, :S].float(), v[1, :, :S].float()), out,
                                   rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_q8_cache_rows_are_the_models_bytes(path):
    """The C store of a q8 KV cache row (int8 values and a float32 scale after them) writes `model.q8_rows`' bytes:
    rows over nine decades, exact ties (x * 127 / max|x| at k + 0.5 round to even), zero rows (scale 0) and rows
    with a NaN or an infinity (values 0, scale NaN); head sizes 64, 128 and 40 (the scalar tail)."""
    from spectra.model import q8_rows

    g = torch.Generator().manual_seed(0)
    for D in (64, 128, 40):
        x = torch.randn(60, D, generator=g) * torch.logspace(-4, 5, 60)[:, None]
        x[0] = 0.0
        x[1, 3], x[2, 0], x[3, D - 1] = float("nan"), float("inf"), float("-inf")
        x[4] = (torch.arange(D) % 9 - 4) + 0.5  # with max|x| = 127 (x * 1.0): every value a tie at k + 0.5
        x[4, 0] = 127.0
        a, s = q8_rows(x)
        out = torch.zeros(60, D + 4, dtype=torch.int8)
        K.extension().to_q8(K._PATH_IDS[path], x.data_ptr(), out.data_ptr(), D, 60)
        assert torch.equal(out[:, :D], a)
        got = out[:, D:].contiguous().view(torch.float32)
        assert torch.equal(got.isnan(), s.isnan()) and got.isnan()[1:4].all()
        assert torch.equal(got[~got.isnan()], s[~s.isnan()]) and got[0] == 0
    ties = q8_rows(torch.tensor([[0.5, 1.5, -2.5, 127.0]]))[0]
    assert torch.equal(ties, torch.tensor([[0, 2, -2, 127]], dtype=torch.int8))


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_attention_over_a_q8_cache(path):
    """Keys and values held as q8 rows (head-strided cache slices of D + 4 bytes): the C kernel equals attention over
    scale * values (the torch path) up to float rounding, and over the float32 rows they came from up to the
    quantization (a step is 1/127 of a row's largest value). Head sizes 64, 128, 32 and 40 (scalar), short and long."""
    from spectra.model import kv_store

    g = torch.Generator().manual_seed(3)
    for H, D, S in ((4, 64, 37), (3, 40, 9), (3, 128, 70), (3, 32, 21), (2, 64, 300)):
        kf = torch.randn(2, H, S + 13, D, generator=g) * 3
        vf = torch.randn(2, H, S + 13, D, generator=g)
        k = torch.zeros(2, H, S + 13, D + 4, dtype=torch.int8)
        v = torch.zeros_like(k)
        kv_store(k, kf)
        kv_store(v, vf)
        q = torch.randn(H, D, generator=g)
        out = K.attention(q, k[1, :, :S], v[1, :, :S], path=path)
        ref = K.attention(q, k[1, :, :S], v[1, :, :S], path="torch")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        exact = K.reference_attention(q, kf[1, :, :S], vf[1, :, :S])
        assert float((out - exact).abs().max()) < 0.1


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_argmax_equals_torch(path):
    """Greedy decoding's argmax: torch.argmax's answer on random rows of ragged lengths, ties (the first index),
    rows of -inf, and rows holding NaN (torch returns the first NaN)."""
    g = torch.Generator().manual_seed(0)
    for V in (1, 15, 16, 17, 50304, 1000):
        x = torch.randn(5, V, generator=g)
        if V > 3:
            x[1, V // 2] = x[1, V - 1] = x[1].max() + 1  # a tie: the first wins
            x[2] = float("-inf")
            x[3, V - 2] = float("nan")
            x[4, 1] = float("nan")
            x[4, 3] = float("nan")
        assert torch.equal(K.argmax(x, path=path), torch.argmax(x, -1)), (V, path)
    ints = torch.randint(0, 4, (64, 300), generator=g).float()  # many ties everywhere
    assert torch.equal(K.argmax(ints, path=path), torch.argmax(ints, -1))
    assert K.argmax(torch.tensor([1.0, 3.0, 2.0]), path=path).item() == 1  # 1-d


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_argmax_logsumexp_equals_the_two_calls(path, n_threads):
    """The batched step's one call: bit for bit `argmax` and `logsumexp` of every row, over the pool's threads, on
    rows with ties, NaN and -inf; without the log-sum-exp when not asked; torch for a float64 input."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 50304, generator=g) * 4
    x[1, 7] = x[1, 900] = x[1].max() + 1
    x[2] = float("-inf")
    x[3, 40000] = float("nan")
    idx, lse = K.argmax_logsumexp(x, n_threads=n_threads, path=path)
    assert torch.equal(idx, K.argmax(x, path=path)) and torch.equal(idx, torch.argmax(x, -1))
    assert torch.allclose(lse, K.logsumexp(x, path=path), rtol=0, atol=0, equal_nan=True)  # exact, NaN and -inf too
    idx2, none = K.argmax_logsumexp(x[:5], with_lse=False, n_threads=n_threads, path=path)
    assert none is None and torch.equal(idx2, idx[:5])
    i64, l64 = K.argmax_logsumexp(x[4:6].double(), path=path)
    assert torch.equal(i64, idx[4:6]) and torch.allclose(l64.float(), lse[4:6], rtol=2e-6)


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_row_statistics_across_pieces(path, n_threads):
    """Rows longer than one piece of the log-sum-exp (4096 values, taken on different threads in `head_rows`):
    maxima that differ by a lot from piece to piece, a piece of -inf only, a tie between the first and the last piece
    (the first wins), a NaN in a later piece (its index, and NaN), +inf (itself): torch's argmax and logsumexp, and the
    three calls agree bit for bit."""
    g = torch.Generator().manual_seed(7)
    V = 3 * 4096 + 5
    x = torch.randn(6, V, generator=g)
    x[0, 4096:8192] += 50.0  # the middle piece dominates
    x[1, 4096:8192] = float("-inf")  # a piece with nothing in it
    x[1, :4096] -= 30.0
    x[2, 10] = x[2, V - 1] = 20.0  # a tie across pieces: the first index
    x[3, 9000] = float("nan")
    x[3, 20] = 100.0
    x[4, 5000] = float("inf")
    x[5, :4096] = float("-inf")
    x[5, 8192:] = float("-inf")
    idx, lse = K.argmax_logsumexp(x, n_threads=n_threads, path=path)
    assert torch.equal(idx, torch.argmax(x, -1)) and idx[2].item() == 10 and idx[3].item() == 9000
    assert torch.equal(idx, K.argmax(x, path=path))
    assert torch.allclose(lse, K.logsumexp(x, path=path), rtol=0, atol=0, equal_nan=True)
    ref = torch.logsumexp(x, -1)
    assert torch.isnan(lse[3]) and lse[4].item() == float("inf")
    keep = [0, 1, 2, 5]
    torch.testing.assert_close(lse[keep], ref[keep], rtol=2e-6, atol=2e-6)
    # rows of more than 256 pieces: the same rules
    long = torch.randn(3, 256 * 4096 + 100, generator=g)
    long[0, 5 * 4096 + 3] = 40.0
    long[1, 300 * 4096 // 2] = float("nan")
    long[2, : 128 * 4096] -= 60.0
    idx, lse = K.argmax_logsumexp(long, n_threads=n_threads, path=path)
    assert torch.equal(idx, torch.argmax(long, -1)) and torch.isnan(lse[1])
    assert torch.allclose(lse, K.logsumexp(long, path=path), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse[[0, 2]], torch.logsumexp(long[[0, 2]], -1), rtol=2e-6, atol=2e-6)


def _c_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The decoder's C RMSNorm restated in float32 numpy (IEEE single-precision operations, as C's): 16 interleaved
    partial sums of squares, added pairwise, r = 1 / sqrt(sum / C + eps), then (x · r) · w."""
    f32 = np.float32
    rows = []
    for row in x.numpy():
        part = np.zeros(16, f32)
        for i in range(0, row.size, 16):
            part = part + row[i : i + 16] * row[i : i + 16]
        for n in (8, 4, 2, 1):
            part[:n] = part[:n] + part[n : 2 * n]
        r = f32(1) / np.sqrt(part[0] / f32(row.size) + f32(eps))
        rows.append((row * r) * w.numpy())
    return torch.from_numpy(np.stack(rows))


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_head_rows_equals_norm_then_int8_matmul(path, n_threads):
    """A decode step's end in one call: the final RMSNorm (restated in torch), the int8 output layer (its reference,
    bit for bit), then argmax and log-sum-exp as `argmax_logsumexp` gives them and the logit at the argmax, for 1, 5
    and 16 rows; without the statistics when not asked; the same statistics without writing the logits
    (`logits=False`, each piece kept in a per-thread buffer); a bad norm weight is refused by name."""
    g = torch.Generator().manual_seed(5)
    C, V = 512, 9000  # three pieces of the row statistics (4096 values each), taken on different threads
    W = torch.randn(V, C, generator=g) * 0.05
    u, scale = K.quantize_weight_int8(W)
    w_norm = 1 + 0.1 * torch.randn(C, generator=g)
    for B in (1, 5, 16):
        x = torch.randn(B, C, generator=g) * 3
        y, idx, lse, top = K.head_rows(x, w_norm, 1e-5, u, scale, lse=True, n_threads=n_threads, path=path)
        ref = K.reference_int8_matmul(_c_rms_norm(x, w_norm, 1e-5), u, scale)
        assert torch.equal(y, ref), B
        ref_idx, ref_lse = K.argmax_logsumexp(ref, n_threads=1, path=path)
        assert torch.equal(idx, ref_idx) and torch.equal(lse, ref_lse)
        assert torch.equal(top, ref.gather(1, ref_idx.view(-1, 1)).view(-1))
        y2, idx2, none, top2 = K.head_rows(x, w_norm, 1e-5, u, scale, argmax=True, n_threads=n_threads, path=path)
        assert torch.equal(y2, y) and torch.equal(idx2, idx) and none is None and torch.equal(top2, top)
        y3, n1, n2, n3 = K.head_rows(x, w_norm, 1e-5, u, scale, n_threads=n_threads, path=path)
        assert torch.equal(y3, y) and n1 is None and n2 is None and n3 is None
        for want_lse in (True, False):
            y4, idx4, lse4, top4 = K.head_rows(x, w_norm, 1e-5, u, scale, argmax=True, lse=want_lse, logits=False,
                                               n_threads=n_threads, path=path)  # fmt: skip
            assert y4 is None and torch.equal(idx4, idx) and torch.equal(top4, top)
            assert torch.equal(lse4, lse) if want_lse else lse4 is None
    with pytest.raises(ValueError, match="norm_weight"):
        K.head_rows(x, w_norm[:-1], 1e-5, u, scale, path=path)
    with pytest.raises(ValueError, match="logits=False needs"):
        K.head_rows(x, w_norm, 1e-5, u, scale, logits=False, path=path)


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_logsumexp_close_to_torch(path):
    """Log-probabilities' normaliser: torch.logsumexp to float rounding on rows of ragged lengths and large spreads;
    NaN rows give NaN and rows of -inf give -inf, as torch's."""
    g = torch.Generator().manual_seed(1)
    for V in (1, 7, 16, 33, 50304):
        x = torch.randn(4, V, generator=g) * torch.tensor([[1.0], [10.0], [100.0], [0.01]])
        torch.testing.assert_close(K.logsumexp(x, path=path), torch.logsumexp(x, -1), rtol=2e-6, atol=2e-6)
    y = torch.randn(3, 40, generator=g)
    y[0, 5] = float("nan")
    y[1] = float("-inf")
    out, ref = K.logsumexp(y, path=path), torch.logsumexp(y, -1)
    assert torch.isnan(out[0]) and torch.isnan(ref[0]) and out[1] == ref[1] == float("-inf")
    torch.testing.assert_close(out[2], ref[2])


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernels' own thread pool is Linux's")
def test_pool_stats_build_counts_each_job(tmp_path, monkeypatch):
    """A build with -DPOOL_STATS (benchmarks/kernel_ab.py -D POOL_STATS=1) counts every pooled job and the time on
    each side of it, clears them when read, and computes the same bits as the normal build."""
    spec = importlib.util.spec_from_file_location("kernel_ab", Path(__file__).parents[1] / "benchmarks/kernel_ab.py")
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    stats_build = kernel_ab.load(kernel_ab.build(kernel_ab.ROOT, tmp_path, ["POOL_STATS=1"]))
    assert not hasattr(K.extension(), "pool_stats")
    qs, bounds, seg_d, _ = _layer(512, 1024)
    x = torch.randn(1, 1024)
    ref = K.ternary_matmul(x, qs, bounds, seg_d, path=COMPILED[0], n_threads=2)
    monkeypatch.setattr(K, "extension", lambda: stats_build)
    stats_build.pool_stats()
    ys = [K.ternary_matmul(x, qs, bounds, seg_d, path=COMPILED[0], n_threads=2) for _ in range(3)]
    stats = stats_build.pool_stats()
    assert all(torch.equal(y, ref) for y in ys)
    assert stats["jobs"] == 3, stats  # one 2-chunk GEMV job a call
    assert stats["caller_work"] > 0 and stats["between"] > 0, stats
    assert stats["worker_work"] == 0 or stats["wake"] > 0, stats  # a worker's chunk starts after publishing
    assert stats_build.pool_stats()["jobs"] == 0
    # rouse_pool wakes a sleeping worker (it has slept since its spin ran out) without a job: counted as roused,
    # and the next job computes the same bits
    time.sleep(0.05)
    stats_build.rouse_pool()
    deadline = time.time() + 5
    while stats_build.pool_stats()["roused"] == 0 and time.time() < deadline:  # read (and cleared) until counted
        time.sleep(0.01)
    assert time.time() < deadline, "no sleeping worker was woken"
    assert torch.equal(K.ternary_matmul(x, qs, bounds, seg_d, path=COMPILED[0], n_threads=2), ref)
