"""Generation: KV-cache greedy equals full recomputation, sampling rules, stop strings, streaming, the CLI."""

import pytest
import torch

from spectra.config import ModelConfig
from spectra.inference.generate import generate, sample_next
from spectra.model import build_model
from tests.conftest import byte_bpe


def cfg(**kw) -> ModelConfig:
    c = dict(dim=64, n_layers=2, n_heads=4, glu_dim=128, vocab_size=320, max_seq_len=128)
    c.update(kw)
    return ModelConfig(**c)


@pytest.fixture(scope="module")
def tok():
    return byte_bpe("Now is the winter of our discontent made glorious summer by this sun of York", 300)


def greedy_reference(model, ids, n):
    """Argmax continuation recomputing the full sequence every step, no cache."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_greedy_with_cache_equals_recomputation(family):
    model = build_model(cfg(family=family), seed=1).eval()
    prompt = [5, 17, 99, 3, 250]
    out = generate(model, None, prompt, max_new_tokens=20, stop_at_eos=False)
    assert out["tokens"] == greedy_reference(model, prompt, 20)
    assert out["n_generated"] == 20 and out["finish_reason"] == "length" and out["text"] is None
    assert out["tokens_per_s"] > 0 and out["prompt_tokens_per_s"] > 0


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    assert sample_next(logits) == 1
    assert all(sample_next(logits, temperature=5.0, top_k=1, generator=g) == 1 for _ in range(20))
    # top-k = 2 keeps {1, 3}; top-p keeps tokens until the mass of the more likely ones reaches p
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {1, 3}
    p = torch.softmax(logits, 0)
    assert p.argsort(descending=True)[:2].tolist() == [1, 3]
    draws = {sample_next(logits, temperature=1.0, top_p=p[1].item() - 1e-3, generator=g) for _ in range(100)}
    assert draws == {1}
    draws = {sample_next(logits, temperature=1.0, top_p=p[1].item() + 1e-3, generator=g) for _ in range(300)}
    assert draws == {1, 3}
    # empirical frequencies follow softmax(z / T)
    draws = [sample_next(logits, temperature=2.0, generator=g) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=5)
    torch.testing.assert_close(counts.float() / 4000, torch.softmax(logits / 2, 0), atol=0.03, rtol=0)


def test_top_k_1_is_greedy_and_seed_reproducible(tok):
    model = build_model(cfg(), seed=2).eval()
    kw = dict(max_new_tokens=16, stop_at_eos=False)
    greedy = generate(model, tok, "Now is the", **kw)
    assert generate(model, tok, "Now is the", temperature=1.3, top_k=1, seed=7, **kw)["tokens"] == greedy["tokens"]
    a = generate(model, tok, "Now is the", temperature=1.0, seed=3, **kw)
    b = generate(model, tok, "Now is the", temperature=1.0, seed=3, **kw)
    c = generate(model, tok, "Now is the", temperature=1.0, seed=4, **kw)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert a["tokens"] != c["tokens"]
    assert a["text"] == tok.decode(a["tokens"])


def test_stop_strings_cut_and_stream(tok):
    model = build_model(cfg(), seed=2).eval()
    full = generate(model, tok, "Now is the", max_new_tokens=24, stop_at_eos=False)
    text = full["text"]
    assert len(text) > 6
    stop = text[3:6]  # a stop string that appears in the generated text
    pieces = []
    out = generate(
        model, tok, "Now is the", max_new_tokens=24, stop=[stop, "zzzz"], stream=pieces.append, stop_at_eos=False
    )
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[: text.find(stop)]
    assert "".join(pieces) == out["text"]
    assert out["tokens"] == full["tokens"][: len(out["tokens"])] and len(out["tokens"]) < 24
    pieces = []
    out = generate(model, tok, "Now is the", max_new_tokens=24, stream=pieces.append, stop_at_eos=False)
    assert "".join(pieces) == text


def test_eos_stops():
    model = build_model(cfg(), seed=1).eval()
    first = generate(model, None, [1, 2, 3], max_new_tokens=5, stop_at_eos=False)["tokens"]
    model.config.eos_token_id = first[2]
    out = generate(model, None, [1, 2, 3], max_new_tokens=5)
    assert out["finish_reason"] == "eos" and out["tokens"] == first[: first.index(first[2]) + 1]


def test_bad_input(tok):
    model = build_model(cfg(max_seq_len=32), seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, None, [1] * 30, max_new_tokens=5)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, None, "text")
    with pytest.raises(ValueError, match="top_p"):
        generate(model, None, [1], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, None, [1], temperature=-1)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, None, [400])
    with pytest.raises(ValueError, match="prompt token id -1 is negative"):  # an IndexError in the latent model
        generate(model, None, [-1, 5])
    with pytest.raises(FileNotFoundError):
        generate(model, "/nonexistent/tokenizer.json", "x")


def test_cli_generate(tmp_path, tok, capsys):
    from spectra.__main__ import main
    from spectra.checkpoint import save_model

    tok.save(str(tmp_path / "tok.json"))
    model = build_model(cfg(), seed=2)
    save_model(model, tmp_path / "m", tokenizer=tmp_path / "tok.json")
    args = ["generate", str(tmp_path / "m"), "--prompt", "Now is the", "--max-new-tokens", "8", "--no-eos-stop"]
    # the default KV cache of a float32 model is float16 (--kv-cache auto), as llama.cpp's; f32 keeps the model's
    for flags, kv in (([], torch.float16), (["--kv-cache", "f32"], None)):
        expected = generate(model.eval(), tok, "Now is the", max_new_tokens=8, stop_at_eos=False, kv_dtype=kv)["text"]
        assert main(args + flags) == 0
        out = capsys.readouterr()
        assert out.out == expected + "\n"
        assert "tok/s" in out.err
    # a mistyped path is reported as missing (it was "has no tokenizer.json; pass --tokenizer", then "does not exist")
    assert main(["generate", str(tmp_path / "typo"), "--prompt", "hi"]) == 2
    assert "typo does not exist" in capsys.readouterr().err


def test_kv_cache_names():
    from spectra.inference.generate import kv_dtype_from_name

    model = build_model(cfg(), seed=0)
    assert kv_dtype_from_name("auto", model) == torch.float16  # a float32 model's cache halves
    assert kv_dtype_from_name("auto", model.to(torch.bfloat16)) is None  # a 16-bit model keeps its own
    assert kv_dtype_from_name("f32") == torch.float32 and kv_dtype_from_name(None) is None
    assert kv_dtype_from_name("q8") == torch.int8  # int8 rows with a scale each (model.KVCache)
    with pytest.raises(ValueError, match="auto, f32, f16, q8"):
        kv_dtype_from_name("q4")


def test_generate_quantlm_and_its_gguf(tmp_path):
    """A QuantLM (GPTQ-format QuantLinear layers) generates with the cache like without it, and exports to GGUF."""
    qlinear = pytest.importorskip("spectra.ptq.qlinear")
    from spectra.ptq.quantizer import Quantizer
    from spectra.ternary import SHARD_DIM

    model = build_model(cfg(dim=128, glu_dim=256), seed=3).eval()
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in SHARD_DIM:
                    qw = Quantizer(4, group_size=64).rtn(child.weight.detach())
                    setattr(parent, name, qlinear.QuantLinear.from_quantized(qw))
    out = generate(model, None, [7, 8, 9], max_new_tokens=12, stop_at_eos=False)
    assert out["tokens"] == greedy_reference(model, [7, 8, 9], 12)

    gguf = pytest.importorskip("gguf")
    from spectra.interop.gguf import export_gguf

    export_gguf(model, tmp_path / "q.gguf", qtype="f16")
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}["blk.1.ffn_down.weight"]
    W = model.layers[1].mlp.down_proj.dequantize_weight()
    assert torch.equal(torch.from_numpy(t.data.astype("float32")).reshape(W.shape), W.half().float())


@pytest.mark.parametrize("which", ["builtin", "small"])
def test_text_decoder_equals_decoding_every_prefix(which, tok):
    """`TextDecoder.text` (the streamed text of `generate` and the batched scheduler) equals `tokenizer.decode` of the
    ids so far after every token and after jumps of several tokens: real text with 2-, 3- and 4-byte characters
    split across tokens, and random ids, whose bytes are often not UTF-8 at all."""
    import random

    from spectra.data.tokenizer import builtin_tokenizer, load_tokenizer
    from spectra.inference.sampling import TextDecoder

    t = load_tokenizer(builtin_tokenizer()) if which == "builtin" else tok
    text = "Now is the winter — of our discontent, été 日本語の冬 🙂 made glorious\nsummer ✓ by this sun of York"
    rng = random.Random(0)
    seqs = [t.encode(text).ids, [rng.randrange(t.get_vocab_size()) for _ in range(300)]]
    seqs.append(t.encode("🙂🙂 ü" * 20).ids)
    for ids in seqs:
        for step in (1, 3):
            dec = TextDecoder(t)
            for n in range(0, len(ids) + 1, step):
                assert dec.text(ids[:n]) == t.decode(ids[:n])


def test_settled_text_holds_a_stop_prefix_before_an_incomplete_character():
    """'=' then the first byte of 'ү' decodes to '=\ufffd': the stop "=ү" may still complete, so nothing is settled
    (the '=' was streamed, and the stop string's start reached the client). Brute force over every cut: what is
    settled is never a prefix-of-a-stop that later completes."""
    from spectra.inference.sampling import cut_at_stop, settled

    assert settled("=\ufffd", ["=ү"], False) == 0
    assert settled("ab=\ufffd", ["=ү"], False) == 2 and settled("ab\ufffd", [], False) == 2
    assert settled("ab=", ["=ү"], False) == 2 and settled("ab=\ufffd", ["=ү"], True) == 4
    final = "xy=үz"
    for stops in (["=ү"], ["yz", "=ү"], ["ү"]):
        kept, _ = cut_at_stop(final, stops)
        for cut in range(len(final) + 1):
            partial = final[:cut]
            for text in (partial, partial + "\ufffd"):  # the next character's first byte may be decoded already
                text, stopped = cut_at_stop(text, stops)  # as the scheduler does before it streams
                n = settled(text, stops, stopped)
                assert text[:n] == kept[:n] and n <= len(kept), (stops, text, n)


def test_text_decoder_after_a_token_that_decodes_to_nothing():
    """A special token that `decode` skips (</s> past the end with --no-eos-stop, <unk>) left the next token as the
    window's first: a sentencepiece decoder stripped its space ('Helloworld!' for 'Hello world!')."""
    from tokenizers import Tokenizer, decoders, models

    from spectra.inference.sampling import TextDecoder

    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁a": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["</s>", "<unk>"])
    tok.decoder = decoders.Metaspace()
    for ids in ([2, 1, 3, 4], [2, 0, 3, 4], [2, 1, 1, 3, 0, 5, 4], [1, 2, 3]):
        dec = TextDecoder(tok)
        for n in range(1, len(ids) + 1):
            assert dec.text(ids[:n]) == tok.decode(ids[:n]), (ids, n)
    assert TextDecoder(tok).text([2, 1, 3, 4]) == "Hello world!"
