"""`spectra.inference.decode.Decoder`: the lean single-token path of a packed TriLM against the model's own forward."""

import copy

import pytest
import torch

from spectra.config import ModelConfig
from spectra.inference.decode import Decoder, decoder_for, unsupported_reason
from spectra.inference.generate import generate
from spectra.model import build_model, kv_load

packed_linear = pytest.importorskip("spectra.packed.linear")
kernels = pytest.importorskip("spectra.packed.kernels")
needs_ext = pytest.mark.skipif(kernels.extension() is None, reason="spectra's C extension is not built")


def cfg(**kw) -> ModelConfig:
    c = dict(dim=512, n_layers=2, n_heads=4, glu_dim=1024, vocab_size=384, max_seq_len=64, family="trilm")
    c.update(kw)
    return ModelConfig(**c)


def packed_model(seed=0, **kw):
    model = build_model(cfg(**kw), seed=seed).eval()
    assert packed_linear.convert_to_packed(model, "tq2") == 2 * 7
    return model


@needs_ext
@pytest.mark.parametrize("shards,kv", [(1, torch.float32), (2, torch.float32), (2, torch.float16), (2, torch.int8)])
def test_decoder_logits_and_cache_match_the_model(shards, kv):
    """Prefill through the model, then 24 steps through the model and through the decoder from the same state: the
    linears are bit-identical (grouped kernels), attention and norms equal up to float rounding. With a float16 cache
    both store the same rows up to one float16 step (the float32 rows they round differ in the last bits)."""
    model = packed_model(num_scale_shards=shards)
    dec = Decoder(model)
    ids = torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        c_model, c_dec = model.new_cache(1, 40, kv), dec.new_cache(1, 40, kv)
        assert c_dec.k.dtype == kv
        torch.testing.assert_close(model(ids[:, :8], cache=c_model), dec(ids[:, :8], cache=c_dec))  # delegated
        # The C prefill (`Rows`) of the prompt: exactly feeding it token by token to `step`, and the model's last
        # logits up to float rounding, which the int8 quantization of a linear's input can turn into one quantization
        # step of an activation (here 8e-3 on the logits at the 8th position with one shard; 3e-7 elsewhere).
        pre = dec.prefill(ids[:, :8], dec.new_cache(1, 40, kv))
        one = dec.new_cache(1, 40, kv)
        for t in range(8):
            by_token = dec.step(ids[:, t : t + 1], one)
        assert torch.equal(pre, by_token)
        full = model(ids[:, :8], cache=model.new_cache(1, 40, kv))[:, -1:]
        assert float((pre - full).abs().max()) < 3e-2 and int(pre.argmax()) == int(full.argmax())
        for t in range(8, 32):
            ref = model(ids[:, t : t + 1], cache=c_model)
            out = dec(ids[:, t : t + 1], cache=c_dec)
            assert out.shape == ref.shape == (1, 1, 384)
            if kv == torch.int8:  # a float32 row that rounds to another code moves a value by a step of its row (1/127
                # of its largest), and the next linear's int8 input by a step too (8e-3 on the logits, as above)
                assert float((out - ref).abs().max()) < 3e-2
            else:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert int(out.argmax()) == int(ref.argmax())
        assert c_dec.pos == c_model.pos == 32
        if kv == torch.int8:  # q8: rows within a few of their steps (the C store is byte-exact: test_packed_kernels.py)
            for a, b in ((c_dec.k, c_model.k), (c_dec.v, c_model.v)):
                torch.testing.assert_close(kv_load(a, torch.float32), kv_load(b, torch.float32), rtol=0, atol=0.1)
            return
        tol = 1e-5 if kv == torch.float32 else 1e-3  # float16's step is 2^-10 relative
        torch.testing.assert_close(c_dec.k.float(), c_model.k.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(c_dec.v.float(), c_model.v.float(), rtol=tol, atol=tol)


@needs_ext
def test_generate_uses_the_decoder_and_gives_the_model_tokens():
    model = packed_model(seed=3)
    out = generate(model, None, [1, 2, 3], max_new_tokens=20, stop_at_eos=False)
    seq = [1, 2, 3]
    with torch.inference_mode():
        for _ in range(20):  # no cache: the model's plain forward over the whole sequence
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out["tokens"] == seq[3:]


@needs_ext
def test_decoder_refuses_changed_layers_and_falls_back():
    model = packed_model()
    dec = Decoder(model)
    with torch.inference_mode():
        cache = dec.new_cache(2, 8)  # batch 2: the model runs it
        assert dec(torch.zeros(2, 1, dtype=torch.long), cache=cache).shape == (2, 1, 384)
        model.layers[0].mlp.up_proj.set_path(model.layers[0].mlp.up_proj.path)
        cache = dec.new_cache(1, 8)
        with pytest.raises(RuntimeError, match="changed after this Decoder was built"):
            dec(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        Decoder(model)(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # a new decoder is fine


def test_unsupported_models_keep_the_model():
    latent = build_model(cfg(), seed=0).eval()
    assert "not a PackedTernaryLinear" in unsupported_reason(latent)
    assert decoder_for(latent) is latent
    floatlm = build_model(cfg(family="floatlm"), seed=0)
    assert decoder_for(floatlm) is floatlm
    gelu = copy.deepcopy(build_model(cfg(mlp_act="gelu"), seed=0))
    assert "swiglu" in unsupported_reason(gelu)
    torch_path = packed_model()
    packed_linear.convert_to_packed(torch_path, "tq2", path="torch")
    assert "compiled kernel path" in unsupported_reason(torch_path)
    with pytest.raises(ValueError, match="Decoder cannot run this model"):
        Decoder(latent)


@needs_ext
def test_decoder_threads_give_the_same_logits():
    """Rows (linears) and heads (attention) are split between threads, each computed whole by one: same bits."""
    model = packed_model(seed=5)
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(1))
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dec = Decoder(model)
            with torch.inference_mode():
                cache = dec.new_cache(1, 16)
                model(ids[:, :4], cache=cache)
                outs.append(torch.cat([dec(ids[:, t : t + 1], cache=cache) for t in range(4, 12)], 1))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


@needs_ext
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.int8])
def test_prompt_rows_on_the_pool_equal_one_thread_and_token_by_token(kv):
    """A prompt of 48 positions: the per-row work (norms, RoPE and cache writes, SiLU, residuals) and the activations'
    preparation are spread over the pool from 32 rows on (16 rows a chunk, 3 chunks): the same logits and cache bits as
    on one thread, and as feeding the prompt one token at a time."""
    model = packed_model(seed=7, max_seq_len=64)
    ids = torch.randint(0, 384, (1, 48), generator=torch.Generator().manual_seed(2))
    dec = Decoder(model)
    got = []
    with torch.inference_mode():
        for threads in (1, 2, 3):
            dec._threads = threads
            cache = dec.new_cache(1, 48, kv)
            got.append((dec.prefill(ids, cache), cache.k.clone(), cache.v.clone()))
        one = dec.new_cache(1, 48, kv)
        for t in range(48):
            last = dec.step(ids[:, t : t + 1], one)
    for logits, k, v in got[1:]:
        assert torch.equal(logits, got[0][0]) and torch.equal(k, got[0][1]) and torch.equal(v, got[0][2])
    assert torch.equal(got[0][0][:, -1:], last)
    assert torch.equal(got[0][1], one.k) and torch.equal(got[0][2], one.v)


@needs_ext
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.int8])
def test_a_prompt_in_two_calls_equals_token_by_token(kv):
    """A 13-token prompt, then 30 more tokens in a second call (rows that start mid-cache and attend over the first
    call's keys too): the logits and cache bits of feeding the 43 tokens one at a time, on 1 and 2 threads."""
    model = packed_model(seed=8, max_seq_len=64)
    ids = torch.randint(0, 384, (1, 43), generator=torch.Generator().manual_seed(4))
    dec = Decoder(model)
    with torch.inference_mode():
        one = dec.new_cache(1, 43, kv)
        steps = [dec.step(ids[:, t : t + 1], one) for t in range(43)]
        for threads in (1, 2):
            dec._threads = threads
            cache = dec.new_cache(1, 43, kv)
            first = dec.prefill(ids[:, :13], cache)
            second = dec.prefill(ids[:, 13:], cache)
            assert torch.equal(first, steps[12]) and torch.equal(second, steps[42]), threads
            assert torch.equal(cache.k, one.k) and torch.equal(cache.v, one.v), threads


@needs_ext
def test_prefill_falls_back_to_the_model_for_other_caches():
    """A bfloat16 or batch-2 cache is not the C rows' business: `prefill` gives the model's own last logits."""
    model = packed_model()
    dec = Decoder(model)
    ids = torch.randint(0, 384, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for cache_args in ((1, 16, torch.bfloat16), (2, 16, None)):
            c1, c2 = dec.new_cache(*cache_args), model.new_cache(*cache_args)
            x = ids.expand(cache_args[0], -1)
            assert torch.equal(dec.prefill(x, c1), model(x, cache=c2)[:, -1:])
            assert c1.pos == 6


def int8_head_model(emb_dtype=torch.float32, seed=0):
    """A packed TriLM with an int8 lm_head, its embedding held in `emb_dtype` (a compact packed checkpoint's)."""
    model = packed_model(seed=seed, num_scale_shards=2)
    model.lm_head = packed_linear.Int8Linear.from_linear(model.lm_head)
    if emb_dtype is not torch.float32:
        w = model.embed_tokens.weight.detach().to(emb_dtype)
        model.embed_tokens = packed_linear.CompactEmbedding(w.shape[0], w.shape[1], _weight=w, _freeze=True)
    return model


@needs_ext
@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_greedy_is_step_and_sample_next_in_one_call(emb_dtype, kv):
    """`Decoder.greedy` (one `decode_token` C call: embedding row, blocks, int8 head, argmax) picks the token that
    `sample_next(step(...))` picks, with the same logits and caches, bit for bit, on every embedding dtype."""
    from spectra.inference.sampling import sample_next

    model = int8_head_model(emb_dtype)
    dec = Decoder(model)
    prompt = torch.randint(0, 384, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        c_ref, c_fast = dec.new_cache(1, 40, kv), dec.new_cache(1, 40, kv)
        assert dec.greedy_ready(c_fast) and not dec.greedy_ready(dec.new_cache(2, 40, kv))
        t_ref = t_fast = sample_next(dec.prefill(prompt, c_ref)[0, -1])
        dec.prefill(prompt, c_fast)
        for _ in range(20):
            logits = dec.step(torch.tensor([[t_ref]]), c_ref)[0, -1]
            t_ref = sample_next(logits)
            t_fast = dec.greedy(t_fast, c_fast)
            assert t_fast == t_ref and torch.equal(dec.last_logits, logits)
        assert c_fast.pos == c_ref.pos == 25
        assert torch.equal(c_fast.k, c_ref.k) and torch.equal(c_fast.v, c_ref.v)


@needs_ext
def test_far_pairs_leave_decoding_unchanged():
    """Greedy decoding with the one-token GEMV's far pairs forced on (`kernels.use_far_pairs(1)`; a Zen 5 CPU takes
    them by itself for a model whose blocks exceed its last-level cache) gives the adjacent loop's tokens, logits and
    caches, on 1 and 2 threads."""
    model = int8_head_model(torch.float32, seed=3)
    before, old = kernels.use_far_pairs(0), torch.get_num_threads()
    runs = []
    try:
        for mode in (0, 1):
            kernels.use_far_pairs(mode)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                dec = Decoder(model)
                with torch.inference_mode():
                    cache = dec.new_cache(1, 40, torch.float16)
                    toks, logits = [7], []
                    for _ in range(12):
                        toks.append(dec.greedy(toks[-1], cache))
                        logits.append(dec.last_logits.clone())
                runs.append((toks, torch.stack(logits), cache.k.clone(), cache.v.clone()))
    finally:
        kernels.use_far_pairs(*before)
        torch.set_num_threads(old)
    for toks, logits, k, v in runs[1:]:
        assert toks == runs[0][0]
        assert torch.equal(logits, runs[0][1]) and torch.equal(k, runs[0][2]) and torch.equal(v, runs[0][3])


@needs_ext
def test_greedy_falls_back_and_generate_gives_the_same_tokens():
    """Without an int8 head `greedy` is `step` and `sample_next`; `generate` gives the same tokens through `greedy` as
    through the per-step path (greedy_ready off), greedy and sampled (the draw inside `decode_token`)."""
    from spectra.inference.sampling import sample_next

    plain = packed_model()
    dec = Decoder(plain)
    with torch.inference_mode():
        cache, ref = dec.new_cache(1, 8), dec.new_cache(1, 8)
        assert not dec.greedy_ready(cache)
        assert dec.greedy(7, cache) == sample_next(dec.step(torch.tensor([[7]]), ref)[0, -1])
    model = int8_head_model(torch.float16)
    prompt = torch.randint(0, 384, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    calls, greedy = [], Decoder.greedy
    try:
        Decoder.greedy = lambda self, token, cache, **kw: calls.append(token) or greedy(self, token, cache, **kw)
        fast = generate(model, None, prompt, max_new_tokens=24, temperature=0.0, stop_at_eos=False)
        drawn = [generate(model, None, prompt, max_new_tokens=24, stop_at_eos=False, seed=5, **kw)["tokens"]
                 for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9))]
    finally:
        Decoder.greedy = greedy
    assert len(calls) == 3 * 23  # every step after the prompt's
    ready = Decoder.greedy_ready
    try:
        Decoder.greedy_ready = lambda self, cache: False
        slow = generate(model, None, prompt, max_new_tokens=24, temperature=0.0, stop_at_eos=False)
        assert drawn == [generate(model, None, prompt, max_new_tokens=24, stop_at_eos=False, seed=5, **kw)["tokens"]
                         for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9))]
    finally:
        Decoder.greedy_ready = ready
    assert fast["tokens"] == slow["tokens"] and len(fast["tokens"]) == 24


@needs_ext
def test_decode_token_rejects_bad_input():
    model = int8_head_model()
    dec = Decoder(model)
    with torch.inference_mode():
        cache = dec.new_cache(1, 8)
        with pytest.raises(ValueError, match="token id 384 is outside the embedding's 384 rows"):
            dec.greedy(384, cache)
        assert cache.pos == 0
        short, other = dec.new_cache(1, 2), dec.new_cache(1, 8)
        a, b = dec.greedy(5, short), dec.greedy(5, other)  # the prepared call follows the cache
        assert a == b and dec.greedy(a, short) == dec.greedy(b, other) and short.pos == other.pos == 2
        with pytest.raises(ValueError, match=r"positions 2\.\.2 go past"):
            dec.greedy(1, short)
        assert short.pos == 2
        pid, _, w_ptr, eps, qw_ptr, scale_ptr, V = dec._c_head[:7]
        with pytest.raises(TypeError, match="takes a layers_plan capsule, not tuple"):
            dec._ext.decode_token(pid, 1, 0, 0, 0, 384, 0, 512, 4, 128, 0, 0, 0, 0, 0, 0, 1024, 0.1, dec._one._all,
                                  False, w_ptr, eps, qw_ptr, scale_ptr, V, 0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embed_rows_widens_exactly(dtype):
    """`embed_rows` (the C path of `Rows.run`'s embedding lookup) gives torch's rows widened to float32, bit for bit,
    subnormals, infinities and signed zeros included; an id outside the table is a one-line error."""
    ext = kernels.extension()
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(50, 256, generator=g) * 10).to(dtype)
    emb[3, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, torch.finfo(dtype).tiny / 4], dtype=dtype)
    ids = torch.tensor([3, 0, 49, 3, 17], dtype=torch.int64)
    x = torch.full((5, 256), float("nan"))
    kind = Decoder._EMB_KINDS[dtype]
    ext.embed_rows(emb.data_ptr(), kind, 50, 256, ids.data_ptr(), 5, x.data_ptr())
    ref = emb[ids].float()
    assert torch.equal(x.view(torch.int32), ref.view(torch.int32))
    bad = torch.tensor([1, 50])
    with pytest.raises(ValueError, match="token id 50 is outside the embedding's 50 rows"):
        ext.embed_rows(emb.data_ptr(), kind, 50, 256, bad.data_ptr(), 2, x.data_ptr())
