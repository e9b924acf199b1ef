"""GPTQ int32 packing: round trips, and the word layouts decoded independently from their written specification."""

import pytest
import torch

from spectra.ptq.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from spectra.ptq.qlinear import QuantLinear, checkpoint_format_for
from spectra.ptq.quantizer import Quantizer


def random_codes(n, cols, bits, seed=0):
    codes = torch.randint(0, 2**bits, (n, cols), generator=torch.Generator().manual_seed(seed))
    codes[0], codes[-1] = 0, 2**bits - 1  # the end points
    return codes


@pytest.mark.parametrize("bits,layout", [(2, "continuous"), (3, "continuous"), (4, "continuous"), (8, "continuous"),
                                         (2, "planar"), (3, "planar"), (4, "planar"), (5, "planar"), (6, "planar"),
                                         (7, "planar"), (8, "planar")])
def test_round_trip(bits, layout):
    codes = random_codes(96, 40, bits)
    words = pack_rows(codes, bits, layout)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(words, bits, layout), codes.to(torch.int32))
    zeros = random_codes(5, 64, bits, seed=1)
    zwords = pack_cols(zeros, bits, layout)
    assert zwords.shape == (5, 64 * bits // 32)
    assert torch.equal(unpack_cols(zwords, bits, layout), zeros.to(torch.int32))


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_continuous_is_a_little_endian_bit_stream(bits):
    """Every 32 codes = one (32·bits)-bit integer, code j at bit bits·j (3-bit: the 96-bit AutoGPTQ layout)."""
    codes = random_codes(64, 3, bits, seed=bits)
    words = pack_rows(codes, bits)
    for block in range(2):
        for c in range(3):
            stream = sum(_u32(int(words[block * bits + k, c])) << (32 * k) for k in range(bits))
            decoded = [(stream >> (bits * j)) & (2**bits - 1) for j in range(32)]
            assert decoded == codes[block * 32 : (block + 1) * 32, c].tolist()


def test_3bit_worked_example():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10, 0] = 0b101  # straddles words 0 and 1: low 2 bits at bits 30-31 of word 0, high bit at bit 0 of word 1
    codes[21, 0] = 0b110  # straddles words 1 and 2: low bit at bit 31 of word 1, high 2 bits at bits 0-1 of word 2
    w = [_u32(int(x)) for x in pack_rows(codes, 3)[:, 0]]
    assert w == [0b01 << 30, (0b1) | (0b0 << 31), 0b11]


def test_6bit_planar_layout():
    """GPTQModel gptq_p: per 32 codes, 4 words of low nibbles (8 per word) then 2 words of high 2-bit fields."""
    codes = random_codes(32, 2, 6, seed=6)
    words = pack_rows(codes, 6, "planar")
    for c in range(2):
        w = [_u32(int(x)) for x in words[:, c]]
        for j in range(32):
            low = (w[j // 8] >> (4 * (j % 8))) & 0xF
            high = (w[4 + j // 16] >> (2 * (j % 16))) & 0x3
            assert low | high << 4 == codes[j, c]


def test_planar_single_plane_widths_equal_continuous():
    for bits in (2, 4, 8):
        codes = random_codes(64, 4, bits)
        assert torch.equal(pack_rows(codes, bits, "planar"), pack_rows(codes, bits, "continuous"))


def test_bad_packing_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="planar"):
        pack_rows(torch.zeros(32, 2, dtype=torch.long), 6, "continuous")
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((32, 2), 16), 4)


@pytest.mark.parametrize("bits,sym,group", [(2, True, 32), (3, True, 64), (4, False, 64), (6, True, -1), (8, False, -1),
                                            (5, False, 32), (7, True, 64)])
def test_quant_linear_round_trip(bits, sym, group):
    W = torch.randn(64, 128)
    qw = Quantizer(bits, group_size=group, sym=sym).rtn(W)
    layer = QuantLinear.from_quantized(qw)
    fmt = checkpoint_format_for(bits, sym)
    assert layer.checkpoint_format == fmt == ("gptq_p" if bits in (5, 6, 7) else "gptq" if sym else "gptq_v2")
    assert torch.equal(layer.codes().T, qw.codes.to(torch.int32))
    assert torch.equal(layer.zeros(), qw.zeros)
    if fmt == "gptq":  # v1 stores zero - 1: symmetric 4-bit writes 7, 3-bit 3
        assert torch.equal(unpack_cols(layer.qzeros, bits), qw.zeros - 1)
    qw.scales = qw.scales.half().float()  # the checkpoint keeps scales in fp16
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T)


def test_quant_linear_keeps_the_weight_only_when_opted_in_and_frozen(monkeypatch):
    from spectra.layers import freeze_for_inference, inference_cache_bytes
    from spectra.ptq.qlinear import cache_dequantized

    layer = QuantLinear.from_quantized(Quantizer(4, group_size=32, sym=True).rtn(torch.randn(64, 128)))
    calls = {"n": 0}
    real = QuantLinear.dequantize_weight

    def counted(self, dtype=torch.float32):
        calls["n"] += 1
        return real(self, dtype)

    monkeypatch.setattr(QuantLinear, "dequantize_weight", counted)
    x = torch.randn(3, 128)
    with torch.no_grad():
        freeze_for_inference(layer)  # not opted in: the QuantLM keeps its small size
        first = layer(x)
        layer(x)
        assert calls["n"] == 2 and inference_cache_bytes(layer) == 0
        assert cache_dequantized(layer) == 1
        assert torch.equal(layer(x), first) and torch.equal(layer(x), first) and calls["n"] == 3  # kept
        assert inference_cache_bytes(layer) == 64 * 128 * 4  # a float32 copy of the layer
        layer(x.double())
        assert calls["n"] == 4  # another dtype
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["scales"] = state["scales"] * 2
        layer.load_state_dict(state)  # loading new buffers drops the kept weight
        torch.testing.assert_close(layer(x), 2 * first)
        assert calls["n"] == 5
    layer(x)  # with autograd on, nothing is kept
    layer(x)
    assert calls["n"] == 7


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zeros_read_as_gptqmodel_writes_them(bits):
    """GPTQModel turns true zero-points into v1's zero − 1 by subtracting a one in every field from each whole word
    (a zero-point of 0 borrows from the field above), and reads them back by adding the word constant. A field-by-field
    + 1 read a zero of 0 as 2^bits and its neighbour one too low (a review, 2026-12-07)."""
    from spectra.ptq.packing import pack_cols
    from spectra.ptq.qlinear import QuantLinear

    torch.manual_seed(bits)
    G, out = 3, 64
    zeros = torch.randint(0, 2**bits, (G, out), dtype=torch.int32)
    zeros[:, ::5] = 0
    v2 = pack_cols(zeros, bits).to(torch.int64) & 0xFFFFFFFF
    ones = pack_cols(torch.ones(1, 32, dtype=torch.int32), bits).to(torch.int64) & 0xFFFFFFFF
    v1 = (v2 - ones.repeat(1, v2.shape[1] // bits)) % 2**32  # GPTQModel's convert_gptq_v2_to_v1_format, restated
    layer = QuantLinear(32 * G, out, bits=bits, group_size=32, checkpoint_format="gptq")
    layer.qzeros.copy_(torch.where(v1 >= 2**31, v1 - 2**32, v1).to(torch.int32))
    assert torch.equal(layer.zeros(), zeros)
