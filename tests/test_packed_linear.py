"""PackedTernaryLinear, convert_to_packed, packed checkpoints (pack_model / load_packed / spectra.load / CLI)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import spectra
from spectra.__main__ import main
from spectra.layers import TernaryLinear
from spectra.model import build_model
from spectra.packed import formats as F
from spectra.packed import kernels as K
from spectra.packed.io import load_packed, pack_model
from spectra.packed.linear import CompactEmbedding, Int8Linear, PackedTernaryLinear, convert_to_packed
from tests.conftest import tiny_config


def _cfg(**kw):
    # dims that are multiples of 256 so every TriLM layer packs into 256-weight blocks
    return tiny_config(family="trilm", dim=512, glu_dim=1024, n_heads=4, vocab_size=320, **kw)


def _ternary_layer(in_f, out_f, shards=1, shard_dim=0, seed=0):
    torch.manual_seed(seed)
    layer = TernaryLinear(in_f, out_f, num_shards=shards, shard_dim=shard_dim)
    nn.init.normal_(layer.weight, std=0.02)
    return layer.eval()


@pytest.mark.parametrize("shards,shard_dim", [(1, 0), (2, 0), (3, 1), (2, 1)])
def test_layer_equals_reference_and_close_to_float(shards, shard_dim):
    layer = _ternary_layer(1536, 96, shards, shard_dim)
    packed = PackedTernaryLinear.from_ternary(layer)
    x = torch.randn(2, 5, 1536)
    with torch.no_grad():
        y_float = layer(x)
        y = packed(x)
    assert y.shape == (2, 5, 96) and y.dtype == torch.float32
    ref = K.reference_matmul(x.reshape(-1, 1536), packed.qs, packed.seg_bounds, packed.seg_d).view(2, 5, 96)
    assert torch.equal(y, ref)
    # int8 per-token activations: relative error ~0.3-0.5 % of the output norm for Gaussian inputs
    rel = ((y - y_float).norm() / y_float.norm()).item()
    assert rel < 0.015, rel
    codes, _ = layer.codes_and_scales()
    assert np.array_equal(F.unpack_codes(packed.qs.numpy()), codes.numpy())
    # bf16 input: computed in float32, returned in bf16; buffers keep their dtypes through .to()
    packed.to(torch.bfloat16)
    assert packed.d.dtype == torch.float16 and packed.seg_d.dtype == torch.float32
    assert packed(x.bfloat16()).dtype == torch.bfloat16


def test_claimed_ternary_linear_and_errors():
    layer = _ternary_layer(512, 8)
    W = layer.quantized_weight().detach().clone()
    packed = PackedTernaryLinear.from_weight(W)
    assert torch.equal(packed.dequantized_weight(), W.half().float())  # γ·q with γ rounded to fp16
    with pytest.raises(ValueError, match="not ternary"):
        PackedTernaryLinear.from_weight(torch.randn(8, 512))
    with pytest.raises(ValueError, match="multiple of 256"):
        PackedTernaryLinear.from_weight(torch.zeros(8, 200))
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(torch.randn(1, 512, requires_grad=True))


def test_convert_model_logits_close_to_latent():
    model = build_model(_cfg(num_scale_shards=2), seed=0).eval()
    idx = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        latent = model(idx)
        n = convert_to_packed(model, "tq2")
        packed = model(idx)
    assert n == 2 * 7
    assert sum(isinstance(m, PackedTernaryLinear) for m in model.modules()) == 14
    assert not any(isinstance(m, TernaryLinear) for m in model.modules())
    rel = ((packed - latent).norm() / latent.norm()).item()
    assert rel < 0.03, rel
    assert convert_to_packed(model, "tq1") == 0  # already packed: nothing new to swap


def test_convert_claimed_ternary_model():
    cfg = _cfg()
    model = build_model(cfg, seed=1).eval()
    # a TriLM whose block linears are plain nn.Linear holding γ·Ŵ (like an unpacked Hugging Face export)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TernaryLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data.copy_(child.quantized_weight())
                setattr(parent, name, lin)
    assert convert_to_packed(model) == 14
    bad = build_model(cfg, seed=1).eval()
    bad.layers[1].mlp.up_proj = nn.Linear(512, 1024, bias=False)  # Gaussian: claimed ternary, but is not
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj: weight is not ternary"):
        convert_to_packed(bad)


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_weights_match_reads_the_packed_file_back_against_the_latent_forward_weights(tmp_path, fmt):
    """Every ternary weight of the file equals the latent layer's own W̃ rounded to fp16; one flipped code is one
    mismatched weight, and a model with other weights mismatches by the thousand."""
    from spectra.packed.io import weights_match

    model = build_model(_cfg(num_scale_shards=2), seed=3).eval()
    pack_model(model, tmp_path / "p", format=fmt)
    got = weights_match(model, tmp_path / "p")
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    assert got == {"layers": 14, "weights": n, "mismatched_weights": 0, "exact": True}
    q = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        W = q.quantized_weight()
        i = int(torch.nonzero(W.reshape(-1)).reshape(-1)[0])
        q.weight.view(-1)[i] = -q.weight.view(-1)[i]  # that one code flips sign; the scale (mean |W|) is unchanged
    assert weights_match(model, tmp_path / "p")["mismatched_weights"] == 1
    other = build_model(_cfg(num_scale_shards=2), seed=4).eval()
    assert weights_match(other, tmp_path / "p")["mismatched_weights"] > 1000


def test_weights_match_a_bfloat16_model_against_its_own_pack(tmp_path):
    """A model held in bfloat16 packs its codes and fp16(γ); the check compares those, not W̃ = bf16(γ·code) rounded
    to fp16 again (406,947 of 655,360 weights "mismatched" a correct pack)."""
    from spectra.packed.io import weights_match

    model = build_model(_cfg(), seed=3, dtype=torch.bfloat16).eval()
    pack_model(model, tmp_path / "p")
    assert weights_match(model, tmp_path / "p")["exact"]


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_loaded_codes_share_one_buffer_in_decode_order(tmp_path, fmt):
    """load_packed puts every layer's code bytes in one code_arena buffer: slices in module order (the order a decode
    step reads them), each at a 64-byte boundary, the first on a 2 MiB boundary, with the bytes the layers had; the
    model's outputs do not change. move_codes refuses a destination of the wrong size."""
    model = build_model(_cfg(num_scale_shards=2), seed=5).eval()
    pack_model(model, tmp_path / "p", format=fmt)
    loaded = load_packed(tmp_path / "p")
    layers = [m for m in loaded.modules() if isinstance(m, PackedTernaryLinear)]
    assert len(layers) == 14
    base = layers[0].qs.untyped_storage().data_ptr()
    assert all(m.qs.untyped_storage().data_ptr() == base for m in layers)
    ptrs = [m.qs.data_ptr() for m in layers]
    assert ptrs[0] % (2 << 20) == 0 and all(p % 64 == 0 for p in ptrs)
    assert all(b - a == (m.qs.numel() + 63) // 64 * 64 for a, b, m in zip(ptrs, ptrs[1:], layers))
    convert_to_packed(model, fmt)  # an in-memory conversion gathers its layers' code bytes the same way
    converted = [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]
    assert len({m.qs.untyped_storage().data_ptr() for m in converted}) == 1
    assert converted[0].qs.data_ptr() % (2 << 20) == 0
    for a, b in zip(layers, converted):
        assert torch.equal(a.qs, b.qs)
    idx = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        before = loaded(idx)
        layers[0].move_codes(torch.empty(layers[0].qs.numel(), dtype=torch.uint8))  # moved again: same outputs
        assert torch.equal(loaded(idx), before)
    with pytest.raises(ValueError, match="move_codes needs"):
        layers[0].move_codes(torch.empty(7, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_save_load_round_trip(tmp_path, fmt):
    model = build_model(_cfg(num_scale_shards=2), seed=3).eval()
    (tmp_path / "tok.json").write_text("{}")
    info = pack_model(model, tmp_path / "p", format=fmt, tokenizer=tmp_path / "tok.json")
    assert info["layers"] == 14 and info["format"] == F.canonical_format(fmt)
    assert info["bits_per_ternary_weight"] == {"tq2": 2.0625, "tq1": 1.6875}[fmt]
    assert (tmp_path / "p" / "tokenizer.json").exists()
    meta = json.loads((tmp_path / "p" / "spectra.json").read_text())
    assert meta["kind"] == "packed" and meta["packed"]["format"] == F.canonical_format(fmt)
    loaded = spectra.load(tmp_path / "p")
    assert isinstance(loaded.layers[0].self_attn.q_proj, PackedTernaryLinear)
    # the defaults store the embedding in fp16 and the head in int8: the loaded model is the in-memory packed model
    # with exactly those two changes (embedding rows rounded to fp16, the head an Int8Linear of the fp32 head)
    assert meta["packed"]["embedding"] == "float16" and meta["packed"]["head"] == "int8"
    assert isinstance(loaded.embed_tokens, CompactEmbedding) and loaded.embed_tokens.weight.dtype == torch.float16
    assert isinstance(loaded.lm_head, Int8Linear)
    pack_model(model, tmp_path / "wide", format=fmt, embedding="float32", head="float32")  # the version-1 tensors
    wide = spectra.load(tmp_path / "wide")
    idx = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        expected = model(idx)
        convert_to_packed(model, fmt)
        in_memory = model(idx)
        assert torch.equal(wide(idx), in_memory)
        model.embed_tokens.weight.copy_(model.embed_tokens.weight.half().float())
        model.lm_head = Int8Linear.from_linear(model.lm_head)
        out = loaded(idx)
        assert torch.equal(out, model(idx))
    # against the latent model: int8 activations in the blocks and in the head, fp16 embedding (<1 % more)
    assert ((out - expected).norm() / expected.norm()).item() < 0.03
    assert ((in_memory - expected).norm() / expected.norm()).item() < 0.03
    # packing a packed model gives the same bytes
    pack_model(loaded, tmp_path / "q", format=fmt)
    a, b = load_file(str(tmp_path / "p" / "model.safetensors")), load_file(str(tmp_path / "q" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bf = load_packed(tmp_path / "p", dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16 and bf.layers[0].mlp.down_proj.d.dtype == torch.float16
    with torch.no_grad():
        assert bf(idx).dtype == torch.bfloat16


def test_corrupt_checkpoints(tmp_path):
    model = build_model(_cfg(), seed=0).eval()
    pack_model(model, tmp_path / "p", format="tq1")
    good = load_file(str(tmp_path / "p" / "model.safetensors"))
    meta = json.loads((tmp_path / "p" / "spectra.json").read_text())
    key = "layers.0.mlp.gate_proj.tq1_0"

    def write(tensors, metadata=None, new_meta=None):
        save_file(tensors, str(tmp_path / "p" / "model.safetensors"), metadata=metadata or {"spectra.packed": "tq1_0"})
        (tmp_path / "p" / "spectra.json").write_text(json.dumps(new_meta or meta))

    write({**good, key: good[key][:, :-1].contiguous()})
    with pytest.raises(ValueError, match=r"gate_proj\.tq1_0: corrupt TQ1_0 data: .* bytes"):
        spectra.load(tmp_path / "p")
    bad = good[key].clone()
    bad[3, 7] = next(v for v in range(256) if not F._TQ1_VALID[v])
    write({**good, key: bad})
    with pytest.raises(ValueError, match="not a valid base-3 encoding"):
        spectra.load(tmp_path / "p")
    write(good, metadata={"spectra.packed": "tq2_0"})
    with pytest.raises(ValueError, match="does not match"):
        spectra.load(tmp_path / "p")
    write(good, new_meta={**meta, "packed": {**meta["packed"], "format": "q4_0"}})
    with pytest.raises(ValueError, match="packed.format"):
        spectra.load(tmp_path / "p")
    write(good, new_meta={**meta, "packed": {**meta["packed"], "version": 9}})
    with pytest.raises(ValueError, match="packed.version"):
        spectra.load(tmp_path / "p")
    write({k: v for k, v in good.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match=r"missing tensors \['norm.weight'\]"):
        spectra.load(tmp_path / "p")
    # non-finite or negative head scales, NaN norms or embedding rows, an integer norm loaded as a model that writes
    # one token forever or as a torch traceback (a review, 2026-12-07)
    for k, change, said in [("lm_head.scale", lambda t: t.index_fill(0, torch.tensor([5]), float("nan")),
                             "tensor lm_head.scale holds NaN or infinite values"),
                            ("lm_head.scale", lambda t: -t, "lm_head: the row scales must be finite and >= 0"),
                            ("norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf")),
                             "tensor norm.weight holds NaN or infinite values"),
                            ("embed_tokens.weight", lambda t: t.index_fill(0, torch.tensor([7]), float("nan")),
                             "tensor embed_tokens.weight holds NaN or infinite values"),
                            ("norm.weight", lambda t: t.to(torch.int32), "tensor norm.weight is torch.int32")]:
        write({**good, k: change(good[k])})
        with pytest.raises(ValueError, match=said):
            spectra.load(tmp_path / "p")
    write(good)
    assert isinstance(spectra.load(tmp_path / "p"), nn.Module)
    with pytest.raises(ValueError, match="CPU only"):
        load_packed(tmp_path / "p", device="meta")


def test_pack_refuses_floatlm_and_straddling_shards(tmp_path):
    with pytest.raises(ValueError, match="no ternary layers"):
        pack_model(build_model(tiny_config(dim=256, glu_dim=512), seed=0), tmp_path / "f")
    # BitNet b1.58 normalises and quantizes each layer's input: packed, its norms were dropped without a word (a
    # review, 2026-12-07: greedy tokens agreed with the latent model's 0 % of the time)
    with pytest.raises(ValueError, match="q_proj: quantizer 'bitnet158' normalises and quantizes the layer's input"):
        pack_model(build_model(tiny_config(family="trilm", dim=256, glu_dim=512, quantizer="bitnet158"), seed=0),
                   tmp_path / "b")
    # 1.1B-like: o_proj input shards of 128 columns straddle 256-blocks with different γ
    model = build_model(tiny_config(family="trilm", dim=256, glu_dim=512, num_scale_shards=2), seed=0)
    with pytest.raises(ValueError, match=r"o_proj: shards of 128 input columns .* lossy=True"):
        pack_model(model, tmp_path / "s")
    info = pack_model(model, tmp_path / "s", lossy=True)
    assert info["layers"] == 14 and not (tmp_path / "f").exists()


def test_cli_pack(tmp_path, capsys):
    model = build_model(_cfg(), seed=0)
    spectra.save_model(model, tmp_path / "m")
    assert main(["pack", str(tmp_path / "m"), str(tmp_path / "p"), "--format", "tq1"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "tq1_0"
    assert isinstance(spectra.load(tmp_path / "p").layers[1].mlp.down_proj, PackedTernaryLinear)
    assert main(["pack", str(tmp_path / "m"), str(tmp_path / "w"), "--embedding", "bfloat16", "--head", "float16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["embedding"], out["head"]) == ("bfloat16", "float16")
    w = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert w["embed_tokens.weight"].dtype == torch.bfloat16 and w["lm_head.weight"].dtype == torch.float16
    assert main(["info", str(tmp_path / "w")]) == 0
    assert "file_over_paper_plus_scales" in capsys.readouterr().out
    assert main(["pack", "floatlm-tiny", str(tmp_path / "x")]) == 2
    assert "no ternary layers" in capsys.readouterr().err


def test_module_transforms_keep_the_packed_data():
    packed = PackedTernaryLinear.from_ternary(_ternary_layer(512, 16))
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    x = torch.randn(3, 512)
    y = packed(x)
    packed.to(torch.bfloat16).to_empty(device="cpu").float()
    assert all(torch.equal(packed.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(packed(x), y)
    with pytest.raises(ValueError, match="CPU only"):
        packed.to("meta")


def test_load_state_dict_rebuilds_the_scale_segments():
    a = PackedTernaryLinear.from_ternary(_ternary_layer(1024, 8, 4, 1, seed=0))  # 4 input shards: 4 segments
    b = PackedTernaryLinear.from_ternary(_ternary_layer(1024, 8, 1, 0, seed=1))  # 1 segment
    x = torch.randn(2, 1024)
    b.load_state_dict(a.state_dict())
    assert b.seg_d.shape == (8, 4) and torch.equal(b(x), a(x))
    bad = dict(a.state_dict(), qs=torch.full_like(a.qs, 0xFF))  # every 2-bit field is 3: not ternary
    with pytest.raises(ValueError, match="code 3"):
        b.load_state_dict(bad)
    assert torch.equal(b(x), a(x))  # the failed load left the layer as it was


def test_int8_linear_equals_reference_and_keeps_its_data():
    from spectra.packed import kernels
    from spectra.packed.linear import Int8Linear

    torch.manual_seed(0)
    head = nn.Linear(512, 300, bias=False)
    layer = Int8Linear.from_linear(head)
    x = torch.randn(2, 5, 512)
    u, r = kernels.quantize_weight_int8(head.weight)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, kernels.reference_int8_matmul(x.view(10, 512), u, r).view(2, 5, 300))
        rel = ((y - head(x)).norm() / head(x).norm()).item()
        assert rel < 0.02
    torch.testing.assert_close(layer.dequantized_weight(), head.weight.detach(), rtol=0, atol=r.max().item() / 2)
    layer.to(torch.bfloat16)  # exact int8 data: not cast
    assert layer.qw.dtype == torch.uint8 and layer.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="has no bias"):
        Int8Linear.from_linear(nn.Linear(256, 4))
    with pytest.raises(ValueError, match="multiple of 256"):
        Int8Linear.from_linear(nn.Linear(100, 4, bias=False))


def _write_version1(model, out, fmt="tq2"):
    """A packed checkpoint as spectra wrote them before compact files: fp32 embedding and lm_head, packed.version 1."""
    from spectra.packed.io import _packed_layers

    out.mkdir()
    raw, shapes, replaced = _packed_layers(model, F.canonical_format(fmt), False)
    fmt = F.canonical_format(fmt)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in replaced}
    tensors.update({f"{n}.{fmt}": torch.from_numpy(np.ascontiguousarray(b)) for n, b in raw.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "spectra.packed": fmt})
    meta = {"format": "spectra", "kind": "packed", "config": model.config.to_dict(),
            "packed": {"version": 1, "format": fmt, "block_size": 256, "block_bytes": F.BLOCK_BYTES[fmt],
                       "layers": shapes}}
    (out / "spectra.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_version1_checkpoints_still_load(tmp_path, fmt):
    model = build_model(_cfg(num_scale_shards=2), seed=4).eval()
    _write_version1(model, tmp_path / "v1", fmt)
    assert load_file(str(tmp_path / "v1" / "model.safetensors"))["lm_head.weight"].dtype == torch.float32
    old = spectra.load(tmp_path / "v1")
    assert old.embed_tokens.weight.dtype == torch.float32 and type(old.lm_head) is nn.Linear
    assert old.layers[1].mlp.down_proj.format == F.canonical_format(fmt)
    idx = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        convert_to_packed(model, fmt)
        assert torch.equal(old(idx), model(idx))
    # repacking it writes the compact layout: embedding 4 -> 2 bytes, head 4 -> 1 byte per weight (+ a row scale)
    info = pack_model(spectra.load(tmp_path / "v1"), tmp_path / "v2", format=fmt)
    v1_bytes = (tmp_path / "v1" / "model.safetensors").stat().st_size
    saved = 320 * 512 * (2 + 3) - 320 * 4
    assert abs(v1_bytes - info["file_bytes"] - saved) < 1024  # up to the safetensors headers
    assert json.loads((tmp_path / "v2" / "spectra.json").read_text())["packed"]["version"] == 2


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_compact_file_size_against_the_papers_count(tmp_path, fmt):
    """The file holds exactly the codes, scales, fp16 embedding and int8 head (up to its header), within 5 % of the
    paper's count plus the fp16 block scales when the embedding and head are as large a share as in the suite's
    models (vocabulary 50k: TQ2_0 up to 2.4B parameters, TQ1_0 at every size); `spectra info` shows both."""
    from spectra.accounting import param_counts, size_in_bits
    from spectra.cli import model_info

    # 1.3M ternary weights, 2 x 2.1M embedding/head weights: the proportions of trilm-99m/190m (2-4x the blocks)
    model = build_model(tiny_config(family="trilm", dim=256, glu_dim=512, n_heads=4, vocab_size=8192), seed=0).eval()
    info = pack_model(model, tmp_path / "p", format=fmt)
    counts = param_counts(model.config)
    paper = counts["linear_params"] * np.log2(3) + 16 * (counts["embedding_params"] + counts["norm_params"])
    assert info["paper_bits"] == pytest.approx(paper)
    assert info["block_scale_bits"] == counts["linear_params"] / 16
    assert info["format_bits"] == size_in_bits(model.config, {"tq2": 2.0625, "tq1": 1.6875}[fmt])
    file_bits = 8 * (tmp_path / "p" / "model.safetensors").stat().st_size
    assert info["file_bits"] == file_bits
    L, V, C = counts["linear_params"], 8192, 256
    exact = L * {"tq2": 2.0625, "tq1": 1.6875}[fmt] + 16 * V * C + 8 * V * C + 32 * V + 32 * counts["norm_params"]
    assert 0 < file_bits - exact < 8 * 8192  # the safetensors header (JSON, padding)
    assert file_bits <= 1.05 * (paper + info["block_scale_bits"])
    report = model_info(str(tmp_path / "p"))["actual"]
    assert report["file_bits"] == file_bits and report["file_over_paper_plus_scales"] <= 1.05
    # the old layout (fp32 embedding and head) is twice the count
    wide = pack_model(model, tmp_path / "w", format=fmt, embedding="float32", head="float32")
    assert wide["file_over_paper_plus_scales"] > 1.8
    with pytest.raises(ValueError, match="head='int4'; accepted: int8, float16"):
        pack_model(model, tmp_path / "x", head="int4")
