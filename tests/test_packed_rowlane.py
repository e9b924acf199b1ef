"""The row-lane GEMM (csrc/rowlane_kernels.h) equals the pure-torch reference and the other AVX-512 kernels bit for
bit: TQ2_0 codes with their 16-row interleaved copy (`kernels.rowlane_codes`), token counts on and between its passes
of 8 (and below ROWLANE_MIN_T, where the other kernels run), row counts with and without a ragged tail after the last
16-row group, several scale segments, non-finite inputs, one to three threads (chunks cut on 32 rows), groups that
mix it with TQ1_0 and plain TQ2_0 matrices; the interleaved layout restated element by element; bad copies refused;
and the decoder that makes the copies for batched steps and prompts (the same bits with the kernel off)."""

import pytest
import torch

from spectra.packed import kernels as K
from tests.conftest import assert_rows_or_nan, non_finite_input, ternary_codes

pytestmark = pytest.mark.skipif(
    K.extension() is None or "avx512vnni" not in K.supported_paths() or not hasattr(K.extension(), "set_rowlane"),
    reason="needs AVX-512 VNNI and the C extension",
)


@pytest.fixture
def rowlane():
    """The row-lane GEMM on from 8 tokens, AMX off (so it runs on AMX machines too); restored after."""
    amx, before = K.use_amx(False), K.use_rowlane(8)
    yield K.use_rowlane
    K.use_rowlane(before)
    K.use_amx(amx)


def test_rowlane_codes_layout():
    """rl[((g nb + b) 16 + j) 64 + 4 r + i] = qs[16 g + r, 64 b + 4 j + i] for the full 16-row groups."""
    g = torch.Generator().manual_seed(0)
    qs = torch.randint(0, 256, (37, 3 * 64), generator=g, dtype=torch.uint8)
    rl = K.rowlane_codes(qs)
    nb = 3
    assert rl.dtype == torch.uint8 and rl.numel() == 32 * nb * 64
    for grp in range(2):
        for b in range(nb):
            for j in range(16):
                for r in range(16):
                    for i in range(4):
                        assert rl[((grp * nb + b) * 16 + j) * 64 + 4 * r + i] == qs[16 * grp + r, 64 * b + 4 * j + i]
    with pytest.raises(ValueError, match="uint8"):
        K.rowlane_codes(qs.to(torch.int16))


@pytest.mark.parametrize("T", [1, 7, 8, 9, 15, 16, 17, 24, 33, 130])
def test_rowlane_equals_reference_and_other_kernels(rowlane, T):
    """Also a TQ1_0 matrix with the copy of its TQ2_0 code bytes (what the decoder makes for a TQ1_0 model)."""
    # rows: whole 16-row groups (odd and even counts of them) and ragged tails; K: 1 to 6 blocks; segments: 1 to 3
    shapes = ((64, 512, 1, 0), (48, 1536, 2, 1), (37, 768, 3, 1), (16, 256, 1, 0), (100, 1280, 1, 0), (15, 512, 1, 0))
    for shape in shapes:
        qs, q1, bounds, seg_d = ternary_codes(*shape, seed=T)
        rl = K.rowlane_codes(qs)
        Kdim = qs.shape[1] // 64 * 256
        x = torch.randn(T, Kdim) * torch.rand(T, 1) * 3
        x[0, 7] = 50.0  # an outlier
        x[T // 2] = 0.0  # a zero token: scale 0
        ref = K.reference_matmul(x, qs, bounds, seg_d)
        rowlane(0)
        other = K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0", rl)], path="avx512vnni")[0]
        rowlane(8)
        assert torch.equal(other, ref)
        for threads in (1, 2, 3):  # TQ2_0 and TQ1_0 with the copy (of the TQ2_0 code bytes), and both without
            ys = K.ternary_matmul_group(
                x, [(qs, bounds, seg_d, "tq2_0", rl), (q1, bounds, seg_d, "tq1_0", rl), (q1, bounds, seg_d, "tq1_0"),
                    (qs, bounds, seg_d, "tq2_0")],
                path="avx512vnni", n_threads=threads,
            )
            for y in ys:
                assert torch.equal(y, ref), f"T={T} N={qs.shape[0]} K={Kdim} threads={threads}"


@pytest.mark.parametrize("B", [1, 7, 8, 9, 16, 17, 33])
def test_rowlane_output_layer_equals_other_kernels(rowlane, B):
    """head_rows with the int8 output layer's interleaved copy: the same logits, argmax, log-sum-exp and top logit as
    without it, bit for bit (written out and kept in the per-thread pieces), with vocabularies off 16 and off the
    statistics' 4096-row pieces; and the logits near the reference product of the normed rows."""
    torch.manual_seed(B)
    for V, C in ((801, 512), (8229, 256), (64, 1792), (15, 512)):
        u, scale = K.quantize_weight_int8(torch.randn(V, C))
        rl = K.rowlane_codes(u)
        w = torch.rand(C) + 0.5
        x = torch.randn(B, C) * 3
        for threads in (1, 2, 3):
            for logits in (True, False):
                kw = dict(argmax=True, lse=True, logits=logits, n_threads=threads, path="avx512vnni")
                a, b = K.head_rows(x, w, 1e-5, u, scale, **kw), K.head_rows(x, w, 1e-5, u, scale, rl=rl, **kw)
                for p, q in zip(a, b):
                    assert (p is None and q is None) or torch.equal(p, q), f"V={V} B={B} threads={threads}"
        ref = K.reference_int8_matmul(torch.nn.functional.rms_norm(x, (C,), w, 1e-5), u, scale)
        y = K.head_rows(x, w, 1e-5, u, scale, rl=rl, path="avx512vnni")[0]
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    u, scale = K.quantize_weight_int8(torch.randn(64, 256))
    with pytest.raises(ValueError, match="rowlane_codes"):
        K.head_rows(torch.randn(B, 256), torch.ones(256), 1e-5, u, scale, rl=K.rowlane_codes(u)[:-1])


def test_rowlane_non_finite_input(rowlane):
    qs, _, bounds, seg_d = ternary_codes(64, 1280, 2, 0)
    x, ok = non_finite_input(16, 1280, 2, 13)
    ref = K.reference_matmul(x, qs, bounds, seg_d)
    y = K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0", K.rowlane_codes(qs))], path="avx512vnni")[0]
    assert_rows_or_nan(y, ref, ok)


def test_bad_rowlane_copy_is_refused():
    qs, q1, bounds, seg_d = ternary_codes(32, 512)
    x = torch.randn(8, 512)
    with pytest.raises(ValueError, match="rowlane_codes"):
        K.ternary_matmul_group(x, [(qs, bounds, seg_d, "tq2_0", K.rowlane_codes(qs)[:-1])])
    with pytest.raises(ValueError, match="rowlane_codes"):
        K.ternary_matmul_group(x, [(q1, bounds, seg_d, "tq1_0", K.rowlane_codes(qs).to(torch.int8))])


def test_use_rowlane_switch(rowlane):
    assert rowlane(0) == 8 and rowlane(8) == 0
    with pytest.raises(ValueError, match=">= 0"):
        rowlane(-1)


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_decoder_batch_and_prompt_rows_same_bits_with_and_without_rowlane(rowlane, fmt):
    """A small packed model's decoder (TQ2_0 or TQ1_0) keeps the interleaved copies and its batched step and prompt
    give the same logits, bit for bit, with the kernel on and off (the step of 16 rows splits into two parts of 8 on 2
    threads)."""
    from spectra.config import ModelConfig
    from spectra.inference.batch import BatchDecoder
    from spectra.inference.decode import Decoder
    from spectra.model import build_model
    from spectra.packed.linear import Int8Linear, convert_to_packed

    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, glu_dim=512, vocab_size=320, max_seq_len=64, family="trilm")
    model = build_model(cfg, seed=1).eval()
    convert_to_packed(model, fmt)
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    dec = Decoder(model)
    codes = dec.rowlane_codes()
    assert len(codes) == 14 and all(v.numel() == m.out_features * m.in_features // 4 for m, v in codes.items())
    dec.head(torch.randn(8, 256))
    assert dec._c_head[7] is not None and dec._c_head[7].numel() == 320 * 256  # the output layer's copy
    again = Decoder(model).rowlane_codes()  # `generate` builds a decoder per call: the copies are made once
    assert all(again[m] is codes[m] for m in codes)
    bd = BatchDecoder(model, 16, 48)
    slots = [bd.acquire() for _ in range(16)]
    prompts = [torch.randint(0, 320, (9 + i % 5,)).tolist() for i in range(16)]
    tokens = torch.randint(0, 320, (16,)).tolist()
    outs = []
    with torch.inference_mode():
        for mode in (8, 0):
            rowlane(mode)
            first = [bd.prefill(s, p) for s, p in zip(slots, prompts)]
            outs.append((torch.stack(first), bd.step(slots, tokens).clone()))
            for s in slots:
                bd.caches[s].pos = 0
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
