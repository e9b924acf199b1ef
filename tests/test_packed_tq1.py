"""TQ1_0 held and computed in base 3: the TQ1 kernels equal the pure-torch reference and the TQ2_0 kernels on the same
codes bit for bit (every path, ragged shapes, batches 1..67, threads), the layer keeps 52 code bytes per block, and the
batch-1 decoder runs TQ1 layers with the same logits as TQ2 layers."""

import copy
import pickle

import numpy as np
import pytest
import torch

from spectra.model import build_model
from spectra.packed import formats as F
from spectra.packed import kernels as K
from spectra.packed.linear import PackedTernaryLinear, convert_to_packed
from tests.conftest import ternary_codes, tiny_config

COMPILED = [p for p in K.PATHS if p in K.supported_paths()]
needs_ext = pytest.mark.skipif(K.extension() is None, reason="spectra's C extension is not built")


def test_code_bytes_round_trip_and_validation():
    qs, q1, _, _ = ternary_codes(7, 1280, seed=1)
    assert q1.shape == (7, 5 * F.TQ1_CODE_BYTES)
    assert np.array_equal(F.tq2_code_bytes(q1.numpy()), qs.numpy())
    # the llama.cpp blocks are these 52 bytes followed by d
    d = np.full((7, 5), 0.5, dtype=np.float16)
    raw = F.to_tq1(qs.numpy(), d)
    assert np.array_equal(raw.reshape(7, 5, 54)[:, :, :52].reshape(7, -1), q1.numpy())
    assert np.array_equal(F.tq1_blocks(q1.numpy(), d), raw)
    got, got_d = F.from_tq1_codes(raw, (7, 1280))
    assert np.array_equal(got, q1.numpy()) and np.array_equal(got_d, d)
    bad = q1.numpy().copy()
    bad[3, 52 + 49] = 255  # a qh byte whose fifth code is not 0
    with pytest.raises(ValueError, match="row 3, block 1, qh byte 1 = 255"):
        F.tq2_code_bytes(bad)
    # canonical form: zero-scale blocks hold code 0 everywhere, in both layouts alike
    d[2, 3] = 0
    canon = F.canonicalize_tq1(q1.numpy(), d)
    assert np.array_equal(F.tq2_code_bytes(canon), F.canonicalize(qs.numpy(), d))


@needs_ext
def test_kernel_byte_order_and_encoding():
    """The kernels' TQ1_0 bytes (csrc/tq1_kernels.h): a permutation of the 256 byte values; where the VBMI kernels run,
    every valid byte's encoding e gives its code 0 as c0[e & 63] and codes 1..4 as the 2-bit fields of
    ta[e & 63] + tb[e >> 2] (mod 256); round trip exact."""
    ext = K.extension()
    enc = np.frombuffer(ext.tq1_encoding(), np.uint8)
    assert sorted(enc.tolist()) == list(range(256)) and enc[0] == 0
    valid = [(v * 256 + 242) // 243 for v in range(243)]
    code = [[(((b * 3**n) & 255) * 3) >> 8 for n in range(5)] for b in range(256)]
    if K.cpu_features().get("avx512vbmi"):
        tables = np.frombuffer(ext.tq1_decoding(), np.uint8).astype(int)
        c0, ta, tb = tables[:64], tables[64:128], tables[128:]
        assert len({tuple(code[b]) for b in valid}) == 243
        for b in valid:
            e = int(enc[b])
            f = (ta[e & 63] + tb[e >> 2]) & 255
            assert [c0[e & 63], f & 3, f >> 2 & 3, f >> 4 & 3, f >> 6 & 3] == code[b], (b, e)
    else:
        assert np.array_equal(enc, np.arange(256))
    _, q1, _, _ = ternary_codes(9, 1792, seed=4)
    qk = K.tq1_to_kernel(q1)
    assert qk.shape == q1.shape and np.array_equal(K.tq1_from_kernel(qk), q1.numpy())
    assert np.array_equal(F.tq1_llama_order(F.tq1_kernel_order(q1)), q1.numpy())


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 13, 17, 67])
def test_tq1_kernels_equal_reference_and_tq2(path, T):
    """Rows that are not a multiple of the GEMV's 16 or the GEMM's 4, K from one block to 33 (qh runs of one to three
    chunks; in the GEMV's dense layout a row's qs and qh bytes may share a chunk, and a segment that is not the whole
    row reads two ranges of the row), 1..6 scale segments."""
    for N, Kdim, shards, dim in ((37, 1024, 1, 0), (20, 1536, 3, 1), (9, 256, 1, 0), (64, 512, 2, 0), (17, 1792, 1, 0),
                                 (18, 4608, 2, 1), (32, 8448, 1, 0), (16, 4096, 1, 0),
                                 (32, 1024, 2, 1), (16, 5120, 2, 1)):
        qs, q1, bounds, seg_d = ternary_codes(N, Kdim, shards, dim, seed=T)
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 7] = 50.0  # an outlier
        if T > 2:
            x[1] = 0.0  # a zero token
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        assert torch.equal(K.reference_matmul(x, q1, bounds, seg_d, "tq1_0"), ref)
        for threads in (1, 2):
            y1 = K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1", path=path, n_threads=threads)
            y2 = K.ternary_matmul(x, qs, bounds, seg_d, path=path, n_threads=threads)
            assert torch.equal(y1, ref), f"{path} T={T} N={N} K={Kdim} threads={threads}"
            assert torch.equal(y1, y2)


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_tq1_per_block_scales_non_finite_input_and_mixed_groups(path):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((11, 1280)).astype(np.float32)
    qs, d = F.blocks_from_weight(W, lossy=True)  # a different d in every block: one segment per block
    bounds, seg_d = (torch.from_numpy(a) for a in F.scale_segments(d))
    q1 = torch.from_numpy(F.tq1_code_bytes(qs))
    qs = torch.from_numpy(qs)
    x = torch.randn(4, 1280)
    x[2, 3] = float("nan")
    x[3, 9] = float("inf")
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    y = K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1_0", path=path)
    assert torch.equal(y[:2], ref[:2]) and y[2:].isnan().all()
    # one group may mix the two layouts; each output equals its own call
    other = ternary_codes(40, 1280, 5, 1, seed=5)  # 5 input shards: 5 segments
    ops = [(q1, bounds, seg_d, "tq1_0"), (qs, bounds, seg_d), (other[1], other[2], other[3], "tq1")]
    for T in (1, 3, 17):  # 17: a last token group of one (the layout is chosen by the product's T, not the group's)
        xt = torch.randn(T, 1280)
        ys = K.ternary_matmul_group(xt, ops, path=path, n_threads=2)
        assert torch.equal(ys[0], ys[1])
        assert torch.equal(ys[0], K.reference_matmul(xt, qs, bounds, seg_d))
        assert torch.equal(ys[2], K.reference_matmul(xt, other[0], other[2], other[3]))
    with pytest.raises(ValueError, match=r"qs must be contiguous uint8 \[N, K/256\*52\]"):
        K.ternary_matmul(x, qs, bounds, seg_d, fmt="tq1")


@needs_ext
@pytest.mark.skipif("avx512vnni" not in K.supported_paths(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("kernels", ["tiles", "quad"])
def test_multi_token_kernels_on_tq2_chunks(kernels):
    """TQ1_0 blocks decoded into TQ2_0's chunks: the 4 x 4 tiles alone (the lanes and the quad GEMM off), over several
    64-token chunks, and the quad GEMM on rows packed as TQ2_0 bytes (every count from 8 up, lanes off), both against
    the reference at ragged rows, 1..3 segments and one segment per block."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((13, 1280)).astype(np.float32)
    qb, db = F.blocks_from_weight(W, lossy=True)
    bb, sb = F.scale_segments(db)
    per_block = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (qb, F.tq1_code_bytes(qb), bb, sb))
    cases = [ternary_codes(*shape, seed=11) for shape in ((37, 1792, 1, 0), (22, 1536, 3, 1), (9, 512, 2, 1))]
    lane, quad = K.use_lane(0), K.use_quad(0 if kernels == "tiles" else 8)
    try:
        for qs, q1, bounds, seg_d in cases + [per_block]:
            Kdim = qs.shape[1] // 64 * 256
            for T in (2, 8, 13, 31, 70) if kernels == "tiles" else (8, 13, 31, 70):
                x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
                x[1] = 0.0  # a zero token
                ref = K.reference_matmul(x, qs, bounds, seg_d)
                for threads in (1, 2):
                    y = K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1", path="avx512vnni", n_threads=threads)
                    assert torch.equal(y, ref), f"{kernels} T={T} N={qs.shape[0]} K={Kdim} threads={threads}"
    finally:
        K.use_lane(lane)
        K.use_quad(quad)


@needs_ext
def test_forced_paths_agree_on_a_large_matrix():
    """4096x4096 (the benchmark's shape), one token and 64: every path gives the same bits in both layouts."""
    qs, q1, bounds, seg_d = ternary_codes(4096, 4096, 1, 0, seed=9)
    for T in (1, 64):
        x = torch.randn(T, 4096)
        want = K.ternary_matmul(x, qs, bounds, seg_d, path=COMPILED[0])
        for path in COMPILED:
            assert torch.equal(K.ternary_matmul(x, q1, bounds, seg_d, fmt="tq1", path=path), want), path


def test_layer_holds_tq1_bytes_and_converts():
    qs, q1, _, _ = ternary_codes(24, 768, seed=3)
    d = torch.full((24, 3), 0.03, dtype=torch.float16)
    d[12, :2] = 0  # the all-zero row prefix
    tq2 = PackedTernaryLinear(768, 24, qs, d)
    tq1 = PackedTernaryLinear(768, 24, qs, d, format="tq1")  # given TQ2 bytes: converted
    assert tq1.qs.shape == (24, 3 * 52) and tq1.qs.nbytes * 64 == tq2.qs.nbytes * 52
    assert np.array_equal(tq1.tq1_code_bytes(), q1.numpy()) and np.array_equal(tq2.tq1_code_bytes(), q1.numpy())
    # held in the kernels' order: row 0's 3 x 48 qs bytes, then its 3 x 4 qh bytes, each through this CPU's encoding
    enc = np.frombuffer(K.extension().tq1_encoding(), np.uint8) if K.extension() else np.arange(256, dtype=np.uint8)
    row = q1.numpy()[0].reshape(3, 52)
    assert np.array_equal(tq1.qs.numpy()[0], enc[np.concatenate([row[:, :48].ravel(), row[:, 48:].ravel()])])
    assert torch.equal(tq1.state_dict()["qs"], q1)  # saved in llama.cpp's order
    same = PackedTernaryLinear(768, 24, qs, torch.full((24, 3), 0.05, dtype=torch.float16), format="tq1")
    same.load_state_dict(tq1.state_dict())  # and loaded back into the kernels' order
    assert torch.equal(same.qs, tq1.qs) and torch.equal(same.d, tq1.d)
    x0 = torch.randn(3, 768)
    for layer in (tq1, tq2):  # deep copies and pickles run, and pickle TQ1_0 bytes in llama.cpp's order
        twin, blob = copy.deepcopy(layer), pickle.dumps(layer)
        assert torch.equal(twin(x0), layer(x0)) and torch.equal(twin.qs, layer.qs)
        assert torch.equal(pickle.loads(blob)(x0), layer(x0))
    assert q1.numpy().tobytes() in pickle.dumps(tq1)
    want = tq1(x0)
    for path in [*COMPILED, "torch"]:  # the layer's own (kernel-order, maybe encoded) bytes on every path
        tq1.set_path(path)
        assert torch.equal(tq1(x0), want), path
    tq1.set_path("auto")
    x = torch.randn(5, 768)
    assert torch.equal(tq1(x), tq2(x))
    assert np.array_equal(tq1.codes(), tq2.codes())
    assert torch.equal(tq1.dequantized_weight(), tq2.dequantized_weight())
    assert np.array_equal(tq1.to_bytes(), tq2.to_bytes("tq1"))
    assert np.array_equal(tq1.to_bytes("tq2"), tq2.to_bytes())
    back = PackedTernaryLinear.from_bytes(tq1.to_bytes(), (24, 768), "tq1_0")
    assert back.format == "tq1_0" and torch.equal(back.qs, tq1.qs)
    # the state dict of one layout loads into a layer of the other
    other = PackedTernaryLinear(768, 24, qs, d, format="tq1")
    other.load_state_dict(tq2.state_dict())
    assert other.qs.shape == (24, 156) and torch.equal(other(x), tq2(x))
    tq2.set_format("tq1")
    assert torch.equal(tq2.qs, tq1.qs) and torch.equal(tq2(x), tq1(x))
    ref = PackedTernaryLinear(768, 24, q1, d, format="tq1", path="torch")
    assert torch.equal(ref(x), tq1(x))


@needs_ext
def test_decoder_runs_tq1_layers_with_the_tq2_logits():
    """The decoder's C layer reads TQ1 matrices through the TQ1 kernels: same linear outputs, so the same logits."""
    from spectra.inference.decode import Decoder

    cfg = tiny_config(family="trilm", dim=512, glu_dim=1024, n_heads=4, vocab_size=320, n_layers=2)
    model = build_model(cfg, seed=0).eval()
    tq2 = build_model(cfg, seed=0).eval()
    assert convert_to_packed(model, "tq1") == 14 and convert_to_packed(tq2, "tq2") == 14
    assert model.layers[0].mlp.up_proj.qs.shape == (1024, 2 * 52)
    d1, d2 = Decoder(model), Decoder(tq2)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        c1, c2 = d1.new_cache(1, 16), d2.new_cache(1, 16)
        assert torch.equal(d1(ids[:, :4], cache=c1), d2(ids[:, :4], cache=c2))  # prefill: the model's forward
        for t in range(4, 12):
            out1, out2 = d1(ids[:, t : t + 1], cache=c1), d2(ids[:, t : t + 1], cache=c2)
            assert torch.equal(out1, out2)
        assert torch.equal(c1.k, c2.k) and torch.equal(c1.v, c2.v)
