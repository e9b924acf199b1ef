"""GGUF export: re-read with gguf's own reader, dequantize, compare with our weights; metadata; llama.cpp's RoPE."""

import math

import numpy as np
import pytest
import torch

from spectra.config import ModelConfig
from spectra.interop.weights import ternary_weight
from spectra.model import apply_rope, build_model, rope_cache

gguf = pytest.importorskip("gguf")

from spectra.interop.gguf import export_gguf, rope_permute, rope_unpermute  # noqa: E402

BLOCK = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
BLOCK.update({"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"})


def cfg_256(**kw) -> ModelConfig:
    c = dict(dim=512, n_layers=2, n_heads=4, glu_dim=512, vocab_size=384, max_seq_len=256, family="trilm")
    c.update(kw)
    return ModelConfig(**c)


def bpe_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(text, trainer)
    return tok


def read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, fields


def deq(t) -> torch.Tensor:
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("shards", [1, 2])
def test_ternary_blocks_are_lossless(tmp_path, qtype, shards):
    model = build_model(cfg_256(num_scale_shards=shards), seed=1).eval()
    info = export_gguf(model, tmp_path / "m.gguf", qtype=qtype)
    assert info["tensor_types"][qtype.upper()] == 2 * 7
    tensors, _ = read(tmp_path / "m.gguf")
    for i, layer in enumerate(model.layers):
        for name, short in BLOCK.items():
            module = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            tw = ternary_weight(getattr(module, name))
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type.name == qtype.upper()
            got = deq(t).reshape(tw.shape)
            if short in ("attn_q", "attn_k"):
                got = rope_unpermute(got, model.config.n_heads)
            scale16 = tw.scale_per_column().half().float()  # the block scale is stored in fp16
            assert torch.equal(got, tw.codes.float() * scale16)  # exact: same codes, fp16 γ
            assert torch.equal(torch.sign(got), tw.codes.float())


def test_q8_0_and_f16_floatlm(tmp_path):
    model = build_model(cfg_256(family="floatlm"), seed=2).eval()
    for qtype in ("q8_0", "f16"):
        export_gguf(model, tmp_path / f"{qtype}.gguf", qtype=qtype)
        tensors, fields = read(tmp_path / f"{qtype}.gguf")
        side = "F16" if qtype == "f16" else "Q8_0"
        assert tensors["token_embd.weight"].tensor_type.name == side
        assert tensors["output.weight"].tensor_type.name == side
        pairs = {"token_embd.weight": model.embed_tokens.weight, "output.weight": model.lm_head.weight}
        for i, layer in enumerate(model.layers):
            pairs[f"blk.{i}.attn_q.weight"] = rope_permute(layer.self_attn.q_proj.weight, 4)
            pairs[f"blk.{i}.attn_k.weight"] = rope_permute(layer.self_attn.k_proj.weight, 4)
            pairs[f"blk.{i}.ffn_down.weight"] = layer.mlp.down_proj.weight
            pairs[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        for name, W in pairs.items():
            got = deq(tensors[name]).reshape(W.shape)
            W = W.detach().float()
            if qtype == "f16" or W.ndim == 1:
                assert torch.equal(got, W.half().float()), name
            else:  # Q8_0: per 32 weights d = absmax/127 (fp16), |error| <= d/2 plus fp16 rounding of d
                d = W.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
                err = (got - W).reshape(-1, 32).abs()
                assert bool((err <= d * 0.5 + d * 128 * 2**-11 + 1e-12).all()), name
        assert fields["general.file_type"] == {"q8_0": 7, "f16": 1}[qtype]


def test_metadata_and_tokenizer(tmp_path):
    tok = bpe_tokenizer()
    cfg = cfg_256(bos_token_id=0, eos_token_id=0, rope_theta=50000.0, norm_eps=1e-6, name="trilm-test")
    model = build_model(cfg, seed=3).eval()
    export_gguf(model, tmp_path / "m.gguf", qtype="tq2_0", tokenizer=tok)
    tensors, f = read(tmp_path / "m.gguf")
    assert f["general.architecture"] == "llama"
    assert f["general.name"] == "trilm-test"
    assert f["general.file_type"] == 37  # MOSTLY_TQ2_0
    assert f["llama.block_count"] == 2
    assert f["llama.embedding_length"] == 512
    assert f["llama.feed_forward_length"] == 512
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 4
    assert f["llama.rope.dimension_count"] == 128
    assert f["llama.context_length"] == 256
    assert math.isclose(f["llama.rope.freq_base"], 50000.0)
    assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], 1e-6, rel_tol=1e-6)
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]"
    types = f["tokenizer.ggml.token_type"]
    assert types[vocab["<|endoftext|>"]] == 3 and types[vocab["Ġto"]] == 1 and types[-1] == 5
    merges = f["tokenizer.ggml.merges"]
    assert len(merges) == len(vocab) - 1 - 256  # trained merges = vocab - special - byte alphabet
    assert all(len(m.split(" ")) == 2 for m in merges)
    assert f["tokenizer.ggml.bos_token_id"] == 0 and f["tokenizer.ggml.eos_token_id"] == 0
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    assert len(tensors) == 2 + 2 * 9 + 1


def test_no_tokenizer_declares_none_vocab(tmp_path):
    export_gguf(build_model(cfg_256(), seed=0), tmp_path / "m.gguf", qtype="tq2_0")
    _, f = read(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "none" and f["llama.vocab_size"] == 384


def test_export_from_directory_uses_its_tokenizer(tmp_path):
    from spectra.checkpoint import save_model

    tok = bpe_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    save_model(build_model(cfg_256(), seed=0), tmp_path / "m", tokenizer=tmp_path / "tok.json")
    from spectra.loading import find_tokenizer, load

    src = tmp_path / "m"
    info = export_gguf(load(src), tmp_path / "out" / "m.gguf", qtype="tq1_0", tokenizer=find_tokenizer(src))
    assert info["tokenizer"] == "gpt2" and (tmp_path / "out" / "m.gguf").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp file left


def test_llama_cpp_rope_on_permuted_weights_matches_ours():
    """llama.cpp's llama RoPE rotates pairs (2j, 2j+1) by pos·θ^(-2j/D); on permuted W_q, W_k it gives our scores."""
    torch.manual_seed(0)
    H, D, C, T = 2, 8, 16, 5
    Wq, Wk, x = torch.randn(H * D, C), torch.randn(H * D, C), torch.randn(T, C)
    cos, sin = rope_cache(D, T, 10000.0)
    q = (x @ Wq.T).view(T, H, D).transpose(0, 1)  # (H, T, D)
    k = (x @ Wk.T).view(T, H, D).transpose(0, 1)
    ours = apply_rope(q[None], cos, sin)[0] @ apply_rope(k[None], cos, sin)[0].transpose(-1, -2)

    def rope_pairs(v):  # (H, T, D), llama.cpp LLAMA_ROPE_TYPE_NORM
        j = torch.arange(D // 2)
        ang = torch.arange(T)[:, None] * 10000.0 ** (-2 * j / D)  # (T, D/2)
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = a * ang.cos() - b * ang.sin()
        out[..., 1::2] = a * ang.sin() + b * ang.cos()
        return out

    q2 = (x @ rope_permute(Wq, H).T).view(T, H, D).transpose(0, 1)
    k2 = (x @ rope_permute(Wk, H).T).view(T, H, D).transpose(0, 1)
    theirs = rope_pairs(q2) @ rope_pairs(k2).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(rope_unpermute(rope_permute(Wq, H), H), Wq)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="TriLMs only"):
        export_gguf(build_model(cfg_256(family="floatlm")), tmp_path / "a.gguf", qtype="tq2_0")
    straddling = build_model(cfg_256(dim=256, glu_dim=512, num_scale_shards=2))
    with pytest.raises(ValueError, match="mixes two scales"):  # o_proj shards of 128 columns share 256-blocks
        export_gguf(straddling, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="multiple of 256"):
        export_gguf(build_model(cfg_256(dim=128, glu_dim=256, n_heads=2)), tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="rmsnorm"):
        export_gguf(build_model(cfg_256(norm="layernorm")), tmp_path / "d.gguf")
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(build_model(cfg_256()), tmp_path / "e.gguf", qtype="q4_0")
    assert not list(tmp_path.iterdir())  # nothing half-written
    assert export_gguf(straddling, tmp_path / "b.gguf", lossy=True)["tensor_types"]["TQ2_0"] == 14


def test_ablation_quantizers(tmp_path):
    # twn / bilm codes are ternary (bilm: binary) with one scale per shard: TQ2_0 stores them exactly
    for q in ("twn", "bilm"):
        model = build_model(cfg_256(quantizer=q), seed=0).eval()
        export_gguf(model, tmp_path / f"{q}.gguf", qtype="tq2_0")
        tensors, _ = read(tmp_path / f"{q}.gguf")
        tw = ternary_weight(model.layers[0].mlp.up_proj)
        got = deq(tensors["blk.0.ffn_up.weight"]).reshape(tw.shape)
        assert torch.equal(got, tw.codes.float() * tw.scale_per_column().half().float())
    uniform = build_model(cfg_256(quantizer="uniform", quantizer_options={"bits": 4}), seed=0).eval()
    with pytest.raises(ValueError, match="not ternary"):
        export_gguf(uniform, tmp_path / "u.gguf", qtype="tq2_0")
    assert export_gguf(uniform, tmp_path / "u.gguf", qtype="q8_0")["tensor_types"]["Q8_0"] == 2 * 7 + 2
    with pytest.raises(ValueError, match="cannot represent"):  # BitNet b1.58: a norm and int8 inputs in every layer
        export_gguf(build_model(cfg_256(quantizer="bitnet158")), tmp_path / "b.gguf", qtype="q8_0")
