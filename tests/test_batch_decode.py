"""`spectra.inference.batch`: batched decoding against decoding each sequence alone."""

import pytest
import torch

from spectra.config import ModelConfig
from spectra.inference.batch import BatchDecoder, Request, Scheduler, generate_batch
from spectra.inference.decode import Decoder
from spectra.inference.generate import generate
from spectra.model import build_model
from tests.conftest import byte_bpe

packed_linear = pytest.importorskip("spectra.packed.linear")
kernels = pytest.importorskip("spectra.packed.kernels")
needs_ext = pytest.mark.skipif(kernels.extension() is None, reason="spectra's C extension is not built")

VOCAB = 384


def model_of(kind: str, seed: int = 1, **kw):
    c = dict(dim=512, n_layers=2, n_heads=4, glu_dim=1024, vocab_size=VOCAB, max_seq_len=64, family="trilm")
    c.update(kw)
    if kind == "floatlm":
        c["family"] = "floatlm"
    model = build_model(ModelConfig(**c), seed=seed).eval()
    if kind.startswith("packed"):
        packed_linear.convert_to_packed(model, "tq1" if kind == "packed-tq1-compact" else "tq2")
    if kind in ("packed-int8-head", "packed-tq1-compact"):
        model.lm_head = packed_linear.Int8Linear.from_linear(model.lm_head)
    if kind == "packed-tq1-compact":  # what a compact packed checkpoint loads as: TQ1 bytes, fp16 embedding, int8 head
        w = model.embed_tokens.weight.detach().half()
        model.embed_tokens = packed_linear.CompactEmbedding(w.shape[0], w.shape[1], _weight=w, _freeze=True)
    return model


def prompts_and_lengths(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 3, 12, 5, 9, 2, 7][:n]
    prompts = [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]
    return prompts, [20, 4, 31, 11, 25, 1, 16][:n]


@needs_ext
@pytest.mark.parametrize("kind,kv", [("packed", None), ("packed-int8-head", None), ("packed-tq1-compact", None),
                                     ("packed-int8-head", torch.float16), ("packed-int8-head", torch.int8)])
def test_kernel_step_rows_are_bit_identical_to_the_single_token_decoder(kind, kv):
    """Four sequences at different positions, stepped together, give exactly the hidden states and cache rows of the
    batch-1 C decoder run on each alone from the same prefill. With the int8 head (`Int8Linear`) the logits are
    bit-identical too; a float head is one (B, C) x (C, V) matmul, whose rounding torch's GEMM may vary with B."""
    model = model_of(kind, num_scale_shards=2) if kind == "packed" else model_of(kind)
    bd = BatchDecoder(model, 4, 48, kv)
    assert bd.kernel is not None
    dec = Decoder(model)
    prompts, _ = prompts_and_lengths(4)
    slots = [bd.acquire() for _ in prompts]
    solo = [model.new_cache(1, 48, kv) for _ in prompts]
    assert bd.caches[slots[0]].k.dtype == solo[0].k.dtype == (kv or torch.float32)
    with torch.inference_mode():
        last = []
        for s, c, p in zip(slots, solo, prompts):
            ref = dec.prefill(torch.tensor([p]), c)[0, -1]  # the batch-1 decoder's prefill of the same prompt
            assert torch.equal(bd.prefill(s, p), ref)
            one = model.new_cache(1, 48, kv)  # ... equal to feeding the prompt one token at a time to the decoder
            for t in p:
                by_token = dec.step(torch.tensor([[t]]), one)[0, -1]
            assert torch.equal(by_token, ref) and torch.equal(one.k[:, :, :, : len(p)], c.k[:, :, :, : len(p)])
            last.append(int(ref.argmax()))
        for _ in range(10):
            logits = bd.step(slots, last)
            for i, c in enumerate(solo):
                ref = dec.step(torch.tensor([[last[i]]]), c)[0, -1]
                assert torch.equal(bd.kernel["rows"].x[i], dec._x)
                if kind != "packed":
                    assert torch.equal(logits[i], ref)
                else:
                    torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)
                    assert int(logits[i].argmax()) == int(ref.argmax())
            last = [int(r.argmax()) for r in logits]
    for s, c in zip(slots, solo):
        assert bd.pos(s) == c.pos
        assert torch.equal(bd.caches[s].k[:, :, :, : c.pos], c.k[:, :, :, : c.pos])


@pytest.mark.parametrize("kind", ["packed", "packed-int8-head", "trilm", "floatlm"])
def test_batched_greedy_tokens_equal_each_sequence_alone_with_joins(kind):
    """7 prompts of different lengths and limits through 3 slots: sequences leave at different steps and the waiting
    ones join mid-batch. Each gets exactly the tokens `generate` gives it alone, and the batch run with one slot."""
    if kind.startswith("packed") and kernels.extension() is None:
        pytest.skip("spectra's C extension is not built")
    model = model_of(kind)
    prompts, limits = prompts_and_lengths()
    alone = [generate(model, None, p, max_new_tokens=n, stop_at_eos=False)["tokens"] for p, n in zip(prompts, limits)]
    batched = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False, max_batch=3)
    one_slot = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False, max_batch=1)
    assert [len(t) for t in alone] == limits
    assert [r["tokens"] for r in batched] == alone
    assert [r["tokens"] for r in one_slot] == alone
    assert all(r["finish_reason"] == "length" for r in batched)


@needs_ext
def test_join_between_steps_of_a_running_batch():
    """A sequence submitted while others are mid-decode joins at the next step; everyone's tokens are unchanged."""
    model = model_of("packed", seed=4)
    prompts, _ = prompts_and_lengths(3, seed=2)
    sched = Scheduler(model, max_batch=3, prefill_chunk=4)  # chunked prefill: the 12-token prompt takes 3 steps
    a = sched.submit(Request(prompts[0], 24, stop_at_eos=False))
    for _ in range(6):
        sched.step()
    b = sched.submit(Request(prompts[2], 10, stop_at_eos=False))
    c = sched.submit(Request(prompts[1], 5, stop_at_eos=False))
    sched.step()
    # step 1 prefilled a (its first token comes from the prefill logits), then 1 token a step; one prefill chunk per
    # step, in the same pass as the decode rows
    assert len(a.tokens) == 7 and b.prefilled == 4 and len(c.tokens) == 0
    while not sched.idle:
        sched.step()
    assert sched.decoder.free_slots == 3
    for r in (a, b, c):  # alone, with the same chunked prefill
        solo = Scheduler(model, max_batch=1, prefill_chunk=4)
        s = solo.submit(Request(r.prompt_ids, r.max_new_tokens, stop_at_eos=False))
        while not solo.idle:
            solo.step()
        assert r.tokens == s.tokens and len(r.tokens) == r.max_new_tokens


@needs_ext
def test_sampling_stop_strings_and_text_match_generate():
    text = "the quick brown fox jumps over the lazy dog. " * 4
    tok = byte_bpe(text, 300)
    model = model_of("packed", seed=5, vocab_size=tok.get_vocab_size() + 84)
    prompts = ["the quick", "lazy dog", "over"]
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=3, stop_at_eos=False)
    alone = [generate(model, tok, p, **kw) for p in prompts]
    stop = alone[0]["text"][5:8]  # a stop string the first continuation contains
    alone = [generate(model, tok, p, stop=stop, **kw) for p in prompts]
    batched = generate(model, tok, prompts, stop=stop, **kw)  # the list form goes to generate_batch
    assert alone[0]["finish_reason"] == "stop"
    for a, b in zip(alone, batched):
        assert (b["tokens"], b["text"], b["finish_reason"]) == (a["tokens"], a["text"], a["finish_reason"])


@needs_ext
@pytest.mark.parametrize("pipeline", [False, True])
def test_mixed_greedy_and_sampled_rows_match_one_request_at_a_time(monkeypatch, pipeline):
    """A step whose rows mix greedy and sampled requests, with and without log-probabilities: the sampled rows are
    drawn in one call for the step (serial steps: `Scheduler._sample_rows`; pipelined ones pick them in C, in the
    launched step), each request's tokens and log-probabilities are those of the same request run alone with
    serial steps, and a sampled token's log-probability is its own (not the argmax's)."""
    model = model_of("packed-int8-head", seed=6)
    prompts, _ = prompts_and_lengths(6, seed=5)
    specs = [dict(temperature=0.0, logprobs=0), dict(temperature=1.0, seed=1, logprobs=0),
             dict(temperature=0.7, top_k=5, seed=2), dict(temperature=1.2, top_p=0.8, seed=3, logprobs=1),
             dict(temperature=0.0), dict(temperature=0.9, top_k=3, top_p=0.9, seed=4, logprobs=0)]

    import spectra.inference.batch as batch_mod

    calls = []

    def spy(x, *args, rows=None, **kw):
        calls.append(list(rows))
        return kernels.sample_rows(x, *args, rows=rows, **kw)

    monkeypatch.setattr(batch_mod, "sample_rows", spy)

    def run(max_batch, jobs, pipeline):
        sched = Scheduler(model, max_batch=max_batch, pipeline=pipeline)
        reqs = [sched.submit(Request(p, 12, stop_at_eos=False, **kw)) for p, kw in jobs]
        while not sched.idle:
            sched.step()
        return reqs

    together = run(6, list(zip(prompts, specs)), pipeline)
    assert ([1, 2, 3, 5] in calls) != pipeline  # serial: one call for the step's four sampled rows
    for (p, kw), r in zip(zip(prompts, specs), together):
        alone = run(1, [(p, kw)], False)[0]
        assert r.tokens == alone.tokens, kw
        assert [e["logprob"] for e in r.token_logprobs] == [e["logprob"] for e in alone.token_logprobs], kw
    r = together[1]  # sampled with logprobs=0: each entry is the drawn token's own log-probability
    assert [e["logprob"] for e in r.token_logprobs] == pytest.approx(_model_logprobs(model, r), abs=2e-2)
    assert len({t for q in together[1:4] for t in q.tokens}) > 3  # the sampled rows did sample


def test_cancel_frees_the_slot_and_bad_requests_are_refused():
    model = model_of("floatlm")
    sched = Scheduler(model, max_batch=2, max_len=32)
    events = []
    a = sched.submit(Request([1, 2, 3], 20, stop_at_eos=False, on_event=events.append))
    b = sched.submit(Request([4, 5], 20, stop_at_eos=False))
    sched.step()
    sched.step()
    assert sched.decoder.free_slots == 0
    a.cancel()
    sched.step()
    assert a.finish_reason == "cancelled" and events[-1] == {"type": "done", "finish_reason": "cancelled"}
    # b: prefilled with a at step 1 (both prompts fit in one chunk's rows; its first token), decoded at steps 2, 3
    assert sched.decoder.free_slots == 1 and len(b.tokens) == 3
    for bad, msg in [
        (Request([1] * 30, 3), "context of 32"),
        (Request([], 3), "empty"),
        (Request([1], 0 - 1), "max_new_tokens"),
        (Request([VOCAB], 1), "prompt token ids"),
        (Request([1], 2, temperature=-1), "temperature"),
    ]:
        with pytest.raises(ValueError, match=msg):
            sched.submit(bad)
    with pytest.raises(ValueError, match="slot"):
        BatchDecoder(model, 2).step([0], [1])  # a free slot
    # a request cancelled anywhere in the queue leaves it at the next step (only the head's left: a gone client's
    # place counted against the server's --max-queue while every slot stayed busy)
    c = sched.submit(Request([6, 7], 20, stop_at_eos=False))
    queued = [sched.submit(Request([8], 5, stop_at_eos=False)) for _ in range(2)]
    sched.step()
    assert sched.decoder.free_slots == 0 and list(sched.waiting) == queued
    queued[1].cancel()
    sched.step()
    assert list(sched.waiting) == queued[:1] and queued[1].finish_reason == "cancelled"
    assert c.finish_reason is None


@pytest.mark.parametrize("per_step", [None, 1])
def test_prompt_chunks_share_a_step_within_one_chunks_rows(per_step):
    """By default a step takes the waiting prompts' next whole chunks, in arrival order, while their rows fit in
    `prefill_chunk`; `prefill_chunks_per_step=1` takes one a step. Chunk boundaries and tokens are the same either
    way."""
    model = model_of("packed-int8-head")
    sched = Scheduler(model, max_batch=4, max_len=32, prefill_chunk=4, prefill_chunks_per_step=per_step)
    reqs = [sched.submit(Request(p, 5, stop_at_eos=False)) for p in ([1, 2], [3, 4], [5, 6, 7], [8] * 10)]
    seen = []
    while not sched.idle:
        sched.step()
        seen.append([r.prefilled for r in reqs])
    if per_step is None:  # 2 + 2 rows, then 3 (3 + 4 > 4), then 4, 4 and 2 of the long prompt
        assert seen[:5] == [[2, 2, 0, 0], [2, 2, 3, 0], [2, 2, 3, 4], [2, 2, 3, 8], [2, 2, 3, 10]]
    else:
        assert seen[:6] == [[2, 0, 0, 0], [2, 2, 0, 0], [2, 2, 3, 0], [2, 2, 3, 4], [2, 2, 3, 8], [2, 2, 3, 10]]
    alone = Scheduler(model, max_batch=1, max_len=32, prefill_chunk=4)
    for r in reqs:
        again = alone.submit(Request(r.prompt_ids, 5, stop_at_eos=False))
        while not alone.idle:
            alone.step()
        assert again.tokens == r.tokens


@needs_ext
@pytest.mark.parametrize("kv", [None, torch.float16, torch.int8])
def test_step_with_prefill_equals_separate_calls(kv):
    """Decode rows and prefill chunks of other slots in one pass give exactly the logits and cache rows of the
    separate `step` and `prefill` calls (rows do not depend on one another)."""
    model = model_of("packed-int8-head")
    prompts, _ = prompts_and_lengths(4, seed=3)  # lengths 1, 3, 12, 5
    fused, apart = BatchDecoder(model, 4, 48, kv), BatchDecoder(model, 4, 48, kv)
    for bd in (fused, apart):
        for p in prompts[:2]:
            bd.prefill(bd.acquire(), p)
        bd.acquire(), bd.acquire()
    dec_logits, pre = fused.step_with_prefill([0, 1], [7, 9], [(2, prompts[2]), (3, prompts[3][:2])])
    pre_apart = [apart.prefill(2, prompts[2]), apart.prefill(3, prompts[3][:2])]
    assert torch.equal(dec_logits, apart.step([0, 1], [7, 9]))
    assert all(torch.equal(a, b) for a, b in zip(pre, pre_apart))
    for s in range(4):
        assert fused.pos(s) == apart.pos(s)
        assert torch.equal(fused.caches[s].k, apart.caches[s].k) and torch.equal(fused.caches[s].v, apart.caches[s].v)
    with pytest.raises(ValueError, match="once"):
        fused.step_with_prefill([0], [1], [(0, [2])])


@needs_ext
def test_greedy_logprobs_taken_for_the_whole_step_equal_the_per_row_ones(monkeypatch):
    """logprobs=0 on greedy rows comes from the output layer's C call (argmax, its logit and the log-sum-exp, without
    writing the logits: `Scheduler.step`); it equals, bit for bit, what the per-row path gives (logprobs=1, which also
    takes the top alternative from the logits), and the model's own log-softmax."""
    real = kernels.extension()
    no_logits = []

    class Spy:  # the extension, counting the head calls that leave the logits out (y_ptr 0)
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name != "head_rows":
                return fn

            def head_rows(*args):
                no_logits.append(args[10] == 0)
                return fn(*args)

            return head_rows

    monkeypatch.setattr(kernels, "extension", Spy)
    model = model_of("packed-int8-head", seed=5)
    prompts, limits = prompts_and_lengths(4, seed=3)
    runs = {}
    for k in (0, 1):
        no_logits.clear()
        sched = Scheduler(model, max_batch=4)
        reqs = [sched.submit(Request(p, n, stop_at_eos=False, logprobs=k)) for p, n in zip(prompts, limits)]
        while not sched.idle:
            sched.step()
        runs[k] = reqs
        # the four prompts are prefilled together in the first step (their last logits are read); then logprobs=0
        # leaves the logits out of every decode step, and logprobs=1 reads them
        assert no_logits == [False] + [k == 0] * sched.stats["steps"]
    for fast, slow in zip(runs[0], runs[1]):
        assert fast.tokens == slow.tokens
        assert [e["logprob"] for e in fast.token_logprobs] == [e["logprob"] for e in slow.token_logprobs]
        assert all(e["top"] == [] for e in fast.token_logprobs)
        assert [e["top"][0][1] for e in slow.token_logprobs] == [e["logprob"] for e in slow.token_logprobs]  # greedy
    r = runs[0][2]  # the longest prompt's sequence, scored by the same model in one forward pass (its attention sums in
    # another order than the decoder's cached steps: up to 0.009 apart here)
    assert [e["logprob"] for e in r.token_logprobs] == pytest.approx(_model_logprobs(model, r), abs=2e-2)


@needs_ext
def test_frequency_and_presence_penalties_restated_from_each_sequence_alone():
    """OpenAI's penalties (logit_j - c_j * frequency - (c_j > 0) * presence over the tokens generated so far), in a
    batch beside unpenalized rows: each sequence's tokens and log-probabilities are what its own steps' logits give
    with the penalty applied by hand, greedy and sampled; zero penalties leave the fast path's tokens as they were."""
    from collections import Counter

    from spectra.inference.sampling import sample_next

    model = model_of("packed-int8-head", seed=7)
    prompts, _ = prompts_and_lengths(4, seed=5)
    cases = [dict(frequency_penalty=2.0), dict(presence_penalty=1.5, logprobs=1), dict(),
             dict(frequency_penalty=-0.5, presence_penalty=0.7, temperature=0.9, seed=11)]
    sched = Scheduler(model, max_batch=4)
    reqs = [sched.submit(Request(p, 20, stop_at_eos=False, **kw)) for p, kw in zip(prompts, cases)]
    while not sched.idle:
        sched.step()
    bd = BatchDecoder(model, 1, 64)
    for p, kw, r in zip(prompts, cases, reqs):
        s = bd.acquire()
        logits, toks, lps = bd.prefill(s, p).clone(), [], []
        g = torch.Generator().manual_seed(kw.get("seed", 0))
        for _ in range(20):
            x = logits.float().clone()
            for j, c in Counter(toks).items():
                x[j] -= c * kw.get("frequency_penalty", 0.0) + kw.get("presence_penalty", 0.0)
            nxt = sample_next(x, temperature=kw.get("temperature", 0.0), generator=g)
            lps.append(float(torch.log_softmax(x, -1)[nxt]))
            toks.append(nxt)
            logits = bd.step([s], [nxt])[0].clone()
        bd.release(s)
        assert r.tokens == toks, kw
        if kw.get("logprobs") is not None:
            assert [e["logprob"] for e in r.token_logprobs] == pytest.approx(lps, abs=1e-5)
    plain = Scheduler(model, max_batch=1)
    base = plain.submit(Request(prompts[0], 20, stop_at_eos=False))
    zero = plain.submit(Request(prompts[0], 20, stop_at_eos=False, frequency_penalty=0.0, presence_penalty=0.0))
    while not plain.idle:
        plain.step()
    assert zero.tokens == base.tokens != reqs[0].tokens  # the penalty changed the greedy sequence
    assert len(set(reqs[0].tokens)) > len(set(base.tokens))
    with pytest.raises(ValueError, match="frequency_penalty"):
        plain.submit(Request(prompts[0], 4, frequency_penalty=2.5))


def _model_logprobs(model, r):
    """The model's own log-probability of each generated token of request r, from one forward pass."""
    ids = torch.tensor([r.prompt_ids + r.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), -1)[0]
    n = len(r.prompt_ids)
    return [float(logp[n - 1 + i, t]) for i, t in enumerate(r.tokens)]


@needs_ext
def test_all_layers_in_one_call_equal_one_call_per_layer():
    """`Rows.run` takes every block in one C call (`decode_layers_batch`) on the blocks parsed once
    (`layers_plan`); an extension without layers_plan passes the tuple of blocks each call, one without
    decode_layers_batch runs one call per block (`decode_layer_batch`). All give the same hidden states and caches,
    bit for bit."""
    model = model_of("packed", num_scale_shards=2)
    prompts, _ = prompts_and_lengths(5, seed=6)
    outs = []
    for missing in (None, "layers_plan", "decode_layers_batch"):
        bd = BatchDecoder(model, 5, 48, torch.float16)
        if missing:
            real = bd.kernel["decoder"]._ext

            class OldExtension:  # the extension minus one entry point
                def __getattr__(self, name):
                    if name == missing:
                        raise AttributeError(name)
                    return getattr(real, name)

            bd.kernel["decoder"]._ext = OldExtension()
        slots = [bd.acquire() for _ in prompts]
        with torch.inference_mode():
            for s, p in zip(slots, prompts):
                bd.prefill(s, p)
            logits = bd.step(slots, [1, 2, 3, 4, 5])
        outs.append((logits, bd.kernel["rows"].x[:5].clone(), [bd.caches[s].k.clone() for s in slots],
                     bd.kernel["rows"]._plan))
    rows = bd.kernel["rows"]
    assert type(rows._plan).__name__ == "tuple" and type(outs[0][3]).__name__ == "PyCapsule"
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][1], other[1])
        assert all(torch.equal(a, b) for a, b in zip(outs[0][2], other[2]))


@needs_ext
def test_a_layers_plan_is_checked_against_the_call():
    """`layers_plan` parses and checks the blocks once; decode_layers_batch refuses a plan made for other sizes, and
    anything that is neither a tuple nor a plan, with a one-line error."""
    model = model_of("packed")
    dec = Decoder(model)
    rows, ext, cfg = dec._one, dec._ext, model.config
    A = cfg.n_heads * cfg.head_dim
    with pytest.raises(ValueError, match="segment bounds must .* end at K/256"):
        ext.layers_plan(rows._all, 256, A)  # the matrices' rows are 512 long
    with pytest.raises(ValueError, match="C=500"):
        ext.layers_plan(rows._all, 500, A)  # C not a multiple of 256
    plan = rows._plan_for(ext)
    x = torch.zeros(1, cfg.dim)
    where = torch.zeros(3, dtype=torch.int64)
    cache = model.new_cache(1, 8)
    args = (x.data_ptr(), 1, 1024, cfg.n_heads, cfg.head_dim, where[0:1].data_ptr(), dec._cos.data_ptr(),
            dec._sin.data_ptr(), where[1:2].data_ptr(), where[2:3].data_ptr(), cache.k.stride(0) * 4,
            cache.k.stride(2), 0.125)
    with pytest.raises(ValueError, match="plan for C=512"):
        ext.decode_layers_batch(dec._path_id, 1, *args, plan, False)
    with pytest.raises(TypeError, match="a tuple or a layers_plan capsule, not list"):
        ext.decode_layers_batch(dec._path_id, 1, *args, list(rows._all), False)


HAS_AMX = kernels.extension() is not None and kernels.cpu_features().get("amx_int8", False)


HAS_VNNI = kernels.extension() is not None and kernels.cpu_features().get("avx512vnni", False)


@pytest.mark.parametrize("kind,kv,amx", [("packed-int8-head", torch.float16, True), ("packed", None, True),
                                         ("packed-int8-head", torch.float16, False),
                                         ("packed-int8-head", torch.int8, False)])
def test_a_step_split_over_the_threads_equals_the_joint_step_and_each_row_alone(kind, kv, amx):
    """Eleven sequences (AMX: parts of 5 and 6 rows) or sixteen (the AVX-512 GEMMs, AMX off: 8 and 8) on two threads:
    the step runs as two row ranges, each through every block on its own thread (`use_batch_split`). Hidden states,
    caches and logits equal those of the step spread over the threads block by block, bit for bit, and each row
    equals the batch-1 decoder on that sequence alone."""
    if not (HAS_AMX if amx else HAS_VNNI):
        pytest.skip("the rows of a step are split only where AMX or the AVX-512 GEMMs run the parts")
    model = model_of(kind, num_scale_shards=2, n_layers=3)
    g = torch.Generator().manual_seed(3)
    sizes = (1, 4, 9, 2, 6, 3, 11, 5, 7, 8, 2) + (() if amx else (3, 10, 1, 6, 4))
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in sizes]
    dec = Decoder(model)
    runs = []
    was_amx = kernels.use_amx(amx)
    try:
        for split in (True, False):
            kernels.use_batch_split(split)
            bd = BatchDecoder(model, len(prompts), 48, kv)
            bd.kernel["decoder"]._threads = 2
            slots = [bd.acquire() for _ in prompts]
            solo = [model.new_cache(1, 48, kv) for _ in prompts]
            rows = []
            with torch.inference_mode():
                last = [int(bd.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
                for c, p in zip(solo, prompts):
                    dec.prefill(torch.tensor([p]), c)
                for _ in range(3):
                    logits = bd.step(slots, last)
                    rows.append((logits.clone(), bd.kernel["rows"].x[: len(prompts)].clone()))
                    for i, c in enumerate(solo):
                        dec.step(torch.tensor([[last[i]]]), c)
                        assert torch.equal(bd.kernel["rows"].x[i], dec._x)
                    last = [int(r.argmax()) for r in logits]
            runs.append((rows, [bd.caches[s].k.clone() for s in slots], [bd.caches[s].v.clone() for s in slots]))
    finally:
        kernels.use_batch_split(True)
        kernels.use_amx(was_amx)
    (split_rows, split_k, split_v), (joint_rows, joint_k, joint_v) = runs
    for (la, xa), (lb, xb) in zip(split_rows, joint_rows):
        assert torch.equal(la, lb) and torch.equal(xa, xb)
    assert all(torch.equal(a, b) for a, b in zip(split_k + split_v, joint_k + joint_v))


@needs_ext
def test_where_a_steps_rows_split_over_the_threads():
    """The split rule (split_cuts) on rows given by their cache addresses: even shares of distinct caches, a prompt
    chunk's rows (one cache) never cut, at least 5 rows a part, parts within 3.5x of each other, one cache in two
    runs never split."""
    cuts = kernels.extension().batch_split_cuts
    distinct = tuple(range(100, 116))
    assert cuts(2, distinct) == [0, 8, 16] and cuts(4, distinct[:15]) == [0, 5, 10, 15]
    assert cuts(1, distinct) == [0, 16] and cuts(2, distinct[:9]) == [0, 9] and cuts(2, distinct[:10]) == [0, 5, 10]
    assert cuts(2, distinct[:7] + (7,) * 9) == [0, 7, 16]  # the chunk's 9 rows stay together
    assert cuts(2, distinct[:15] + (7,) * 48) == [0, 15, 63]  # 48 / 15 = 3.2
    assert cuts(2, distinct[:8] + (7,) * 32) == [0, 40]  # 32 / 8 = 4: not split
    assert cuts(2, (7,) * 32) == [0, 32]  # one cache
    assert cuts(2, (1, 2, 1) + distinct[3:]) == [0, 16]  # cache 1 in two runs
    # a lead (the deferred-call thread's first part while the engine is away): one row more where it fits
    # (where the lead leaves a part under 5 rows, 6 / 4, split_cuts refuses and split_parts takes the even split)
    assert cuts(2, distinct, 1) == [0, 9, 16] and cuts(2, distinct[:12], 1) == [0, 7, 12]
    assert cuts(2, distinct[:10], 1) == [0, 10]
    # where every GEMM of a block runs token-major from the row-lane copy on AMX, parts of 2 rows
    assert cuts(2, distinct[:4], 0, 2) == [0, 2, 4] and cuts(2, distinct[:3], 0, 2) == [0, 3]


@pytest.mark.skipif(not HAS_VNNI, reason="the rows of a step are split only where AMX or the AVX-512 GEMMs run them")
@pytest.mark.parametrize("kv", [torch.float16, torch.int8])
def test_a_scheduler_of_twelve_slots_on_two_threads_gives_each_sequence_its_own_tokens(kv):
    """Sixteen prompts through twelve slots on two threads, prompts prefilled 4 positions a step beside the decode
    rows: steps split over the threads whenever the rule allows (decode rows alone, or beside a prompt chunk), and
    sequences join and leave between them. Each gets exactly the tokens `generate` gives it alone."""
    model = model_of("packed-int8-head", n_layers=2)
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 14, (16,), generator=g)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in sizes]
    limits = [int(n) for n in torch.randint(3, 24, (16,), generator=g)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = [generate(model, None, p, max_new_tokens=n, stop_at_eos=False, kv_dtype=kv)["tokens"]
                 for p, n in zip(prompts, limits)]
        batched = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False, max_batch=12,
                                 prefill_chunk=4, kv_dtype=kv)
    finally:
        torch.set_num_threads(threads)
    assert [r["tokens"] for r in batched] == alone


@pytest.mark.skipif(not HAS_AMX, reason="the rows of a step are split over the threads only where AMX runs the parts")
def test_a_step_with_a_prompt_chunk_splits_between_the_decode_rows_and_the_chunk():
    """Seven decode rows and a 9-token prompt chunk on two threads: the chunk's rows read each other's keys, so they
    form one part and the decode rows the other. Logits, the chunk's last-position logits and every cache equal the
    step spread over the threads block by block (`use_batch_split(False)`), bit for bit."""
    model = model_of("packed-int8-head", n_layers=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 1, 8, 5, 2, 6, 4)]
    chunk = torch.randint(0, VOCAB, (9,), generator=g).tolist()
    outs = []
    try:
        for split in (True, False):
            kernels.use_batch_split(split)
            bd = BatchDecoder(model, len(prompts) + 1, 48, torch.float16)
            bd.kernel["decoder"]._threads = 2
            slots = [bd.acquire() for _ in prompts]
            with torch.inference_mode():
                last = [int(bd.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
                new = bd.acquire()
                logits, pre = bd.step_with_prefill(slots, last, [(new, chunk)])
                after = bd.step(slots + [new], [1] * len(slots) + [int(pre[0].argmax())])
            outs.append((logits, pre[0], after, [bd.caches[s].k.clone() for s in slots + [new]]))
    finally:
        kernels.use_batch_split(True)
    (la, pa, aa, ka), (lb, pb, ab, kb) = outs
    assert torch.equal(la, lb) and torch.equal(pa, pb) and torch.equal(aa, ab)
    assert all(torch.equal(a, b) for a, b in zip(ka, kb))


def test_serial_torch_keeps_the_kernels_thread_count_and_restores_torchs():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.serial_torch() as n:
            assert n == 2 and torch.get_num_threads() == 1 and kernels.default_threads() == 2
            with kernels.serial_torch() as inner:  # nested (a Scheduler step around a BatchDecoder step)
                assert inner == 2 and torch.get_num_threads() == 1
            assert kernels.default_threads() == 2
        assert torch.get_num_threads() == 2 and kernels.default_threads() == 2
        torch.set_num_threads(1)
        assert kernels.default_threads() == 1  # outside the context: torch's count again
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_packed_steps_run_torch_on_one_thread_and_the_kernels_on_torchs_count(monkeypatch):
    """On the C path a step's torch ops run single-threaded (`serial_torch`: torch's OpenMP threads would spin on the
    cores the kernels' pool uses) while the kernels get the thread count torch had outside the step."""
    seen = []
    real = kernels.extension()

    class Spy:  # the extension, recording the thread counts of the step's last C call (final norm, head, picks)
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name != "head_rows":
                return fn

            def head_rows(path_id, n_threads, *rest):
                seen.append((torch.get_num_threads(), n_threads))
                return fn(path_id, n_threads, *rest)

            return head_rows

    monkeypatch.setattr(kernels, "extension", Spy)
    model = model_of("packed-int8-head", seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompts, limits = prompts_and_lengths(3)
        out = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False)
        assert torch.get_num_threads() == 2  # restored after every step
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {(1, 2)}
    for p, n, o in zip(prompts, limits, out):  # and the tokens are what one sequence alone gives
        assert o["tokens"] == generate(model, None, p, max_new_tokens=n, stop_at_eos=False)["tokens"]


def run_alone(model, prompt, n, **kw):
    """`prompt`'s greedy tokens from a scheduler of its own: no slot holds anything yet."""
    solo = Scheduler(model, max_batch=1, prefill_chunk=4, **kw)
    s = solo.submit(Request(prompt, n, stop_at_eos=False))
    while not solo.idle:
        solo.step()
    assert s.cached == 0
    return s.tokens


@needs_ext
@pytest.mark.parametrize("kv,pipeline", [(None, False), (torch.int8, False), (torch.int8, True)])
def test_prefix_reuse_skips_the_held_prefix_and_changes_no_token(kv, pipeline):
    """A request whose prompt starts with what a free slot holds (a conversation's next turn, a shared system prompt,
    the same prompt again) prefills only the rest, into that slot, and gets exactly the tokens of running alone."""
    model = model_of("packed-int8-head", seed=5)
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, VOCAB, (13,), generator=g).tolist()
    sched = Scheduler(model, max_batch=2, max_len=64, prefill_chunk=4, kv_dtype=kv, pipeline=pipeline)

    def run(prompt, n):
        r = sched.submit(Request(prompt, n, stop_at_eos=False))
        while not sched.idle:
            sched.step()
        return r

    a = run(system + [5, 6, 7], 6)
    assert a.cached == 0 and sched.stats["prefilled"] == 16
    (held,) = sched.held.values()
    assert held == (a.prompt_ids + a.tokens)[:16 + 5]  # every fed token; the last one drawn was never fed
    turn = a.prompt_ids + a.tokens + [9, 10]  # the next turn: everything so far, then new tokens
    b = run(turn, 5)
    assert b.cached == 16 + 5 and sched.stats["prefilled"] == 16 + (len(turn) - 21)
    assert b.tokens == run_alone(model, turn, 5, kv_dtype=kv)
    c = run(system + [8], 4)  # a shared prefix with both slots: 13 tokens
    assert c.cached == 13 and c.tokens == run_alone(model, system + [8], 4, kv_dtype=kv)
    again = run(list(c.prompt_ids), 4)  # the same prompt: all but its last token
    assert again.cached == len(c.prompt_ids) - 1 and again.tokens == c.tokens
    other = run([1, 2, 3], 3)  # nothing shared: the slot unused so far, not the one holding the latest turn
    assert other.cached == 0 and other.tokens == run_alone(model, [1, 2, 3], 3, kv_dtype=kv)
    assert sorted(h[: len(c.prompt_ids)] == c.prompt_ids for h in sched.held.values()) == [False, True]
    assert sched.stats["cached"] == b.cached + c.cached + again.cached


@needs_ext
def test_scheduler_rouses_the_pool_before_each_step(monkeypatch):
    """Every scheduler step on the C path first wakes the kernels' sleeping pool workers (`rouse_pool`), so that the
    step's first job finds them polling."""
    model = model_of("packed-int8-head", seed=2)
    sched = Scheduler(model, max_batch=2, max_len=64, prefill_chunk=4)
    ext = sched.decoder.kernel["decoder"]._ext
    calls = []
    monkeypatch.setattr(ext, "rouse_pool", lambda: calls.append(1))
    sched.submit(Request([1, 2, 3, 4, 5], 6, stop_at_eos=False))
    steps = 0
    while not sched.idle:
        sched.step()
        steps += 1
    assert steps == 7 and len(calls) == steps  # two prompt chunks (the first token comes from the second), 5 steps


@needs_ext
def test_prefix_reuse_after_a_cancel_mid_prompt_and_beside_running_rows():
    """A slot freed by a cancel halfway through its prompt holds only the chunks that ran; a request reusing them
    while another sequence decodes in the same steps still gets its own tokens, and with prefix_cache=False nothing is
    reused. The model-modules path never reuses (its rows can differ in the last bits with the batch)."""
    model = model_of("packed", seed=6)
    g = torch.Generator().manual_seed(4)
    long = torch.randint(0, VOCAB, (20,), generator=g).tolist()
    sched = Scheduler(model, max_batch=2, max_len=64, prefill_chunk=4)
    a = sched.submit(Request(long, 5, stop_at_eos=False))
    sched.step()
    sched.step()
    assert a.prefilled == 8
    a.cancel()
    sched.step()
    assert list(sched.held.values()) == [long[:8]]
    busy = sched.submit(Request([7, 7, 7], 12, stop_at_eos=False))
    sched.step()
    b = sched.submit(Request(long[:10] + [4], 6, stop_at_eos=False))
    while not sched.idle:
        sched.step()
    assert b.cached == 8 and b.tokens == run_alone(model, long[:10] + [4], 6)
    assert busy.tokens == run_alone(model, [7, 7, 7], 12)
    off = Scheduler(model, max_batch=1, max_len=64, prefill_chunk=4, prefix_cache=False)
    for _ in range(2):
        r = off.submit(Request(long, 2, stop_at_eos=False))
        while not off.idle:
            off.step()
        assert r.cached == 0 and not off.held
    floats = Scheduler(model_of("floatlm"), max_batch=1, max_len=32)
    assert not floats.prefix_cache


def test_common_prefix_restated_item_by_item():
    import random

    from spectra.inference.batch import common_prefix

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(6))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix(a, b) == common_prefix(b, a) == n, (a, b)


@needs_ext
def test_logit_bias_restated_from_the_rows_logits():
    """A request's logit bias is added to its logits before each pick: restated with a lone slot's logits (the same C
    rows), the bias added and argmax taken, for a ban of greedy's first token; +100 on a token makes it every pick,
    sampled too, with log-probability ~0; the requests beside them keep their own tokens."""
    model = model_of("packed-int8-head", seed=7)
    prompt = [5, 9, 33, 2]
    sched = Scheduler(model, max_batch=3, max_len=32)
    plain = sched.submit(Request(prompt, 6, stop_at_eos=False))
    sched.step()
    ban = {plain.tokens[0]: -100.0, 3: 2.5}
    banned = sched.submit(Request(prompt, 6, stop_at_eos=False, logit_bias=ban, logprobs=0))
    forced = sched.submit(Request(prompt, 6, stop_at_eos=False, logit_bias={17: 100.0}, logprobs=2, temperature=0.8))
    while not sched.idle:
        sched.step()
    assert forced.tokens == [17] * 6 and all(e["logprob"] > -1e-3 for e in forced.token_logprobs)
    assert plain.tokens == run_alone(model, prompt, 6)
    bd = BatchDecoder(model, 1, 32)
    slot = bd.acquire()
    logits, want = bd.prefill(slot, prompt), []
    bias = torch.zeros(VOCAB)
    bias[list(ban)] = torch.tensor(list(ban.values()))
    for _ in range(6):
        want.append(int(torch.argmax(logits.float() + bias)))
        logits = bd.step([slot], [want[-1]])[0]
    assert banned.tokens == want and plain.tokens[0] not in want
    with pytest.raises(ValueError, match="logit_bias"):
        sched.submit(Request(prompt, 2, logit_bias={VOCAB: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        sched.submit(Request(prompt, 2, logit_bias={1: float("nan")}))
    for seed in (2**64, -(2**63) - 1, 1.5, True):  # what a torch.Generator cannot take is refused at submit
        with pytest.raises(ValueError, match="seed"):
            sched.submit(Request(prompt, 2, temperature=0.8, seed=seed))
    assert sched.idle


@needs_ext
@pytest.mark.parametrize("kind", ["packed-int8-head", "floatlm"])
def test_echo_scores_every_prompt_token_restated_token_by_token(kind):
    """An echo request's prompt_logprobs: None for the first token, then log p(token i | tokens before it) and the top
    alternatives, as feeding the prompt one token at a time gives them; chunked like any prompt; it is never served
    from a held prefix; its generated tokens are those of running alone."""
    model = model_of(kind, seed=8)
    prompt = [7, 3, 99, 12, 5, 41, 8, 250, 3]
    sched = Scheduler(model, max_batch=2, max_len=32, prefill_chunk=4)
    first = sched.submit(Request(prompt, 3, stop_at_eos=False))
    while not sched.idle:
        sched.step()
    r = sched.submit(Request(prompt, 3, stop_at_eos=False, echo=True, logprobs=2))
    s0 = sched.submit(Request(prompt, 0, stop_at_eos=False, echo=True, logprobs=0))
    while not sched.idle:
        sched.step()
    assert r.cached == 0 and r.tokens == first.tokens and s0.tokens == [] and s0.finish_reason == "length"
    bd = BatchDecoder(model, 1, 32)
    slot = bd.acquire()
    logits = [bd.prefill(slot, prompt[:1]).float()]
    for t in prompt[1:-1]:
        logits.append(bd.step([slot], [t])[0].float())
    assert r.prompt_logprobs[0] == {"token": prompt[0], "logprob": None, "top": None}
    assert len(r.prompt_logprobs) == len(s0.prompt_logprobs) == len(prompt)
    for i, (e, e0) in enumerate(zip(r.prompt_logprobs[1:], s0.prompt_logprobs[1:])):
        lp = torch.log_softmax(logits[i].double(), -1)
        assert e["token"] == prompt[i + 1] and e0["top"] == []
        assert e["logprob"] == pytest.approx(float(lp[prompt[i + 1]]), abs=1e-4) == e0["logprob"]
        assert [j for j, _ in e["top"]] == lp.topk(2).indices.tolist()


@needs_ext
@pytest.mark.parametrize("kv,chunk,pipeline", [(None, 4, False), (torch.int8, 4, False), (None, 128, False),
                                               (torch.int8, 4, True), (None, 128, True)])
def test_a_burst_with_one_system_prompt_computes_it_once(kv, chunk, pipeline):
    """Requests admitted together whose prompts share a prefix: the first prefills it, the others wait for it and get
    its positions copied (`_share_prefixes`), so it is computed once; a later request copies from a sequence that is
    decoding. Every request's tokens are running alone's. Pipelined: positions a launched step still writes are
    waited for, not copied."""
    model = model_of("packed-int8-head", seed=9)
    g = torch.Generator().manual_seed(5)
    system = torch.randint(0, VOCAB, (22,), generator=g).tolist()
    tails = [torch.randint(0, VOCAB, (3 + i,), generator=g).tolist() for i in range(3)]
    sched = Scheduler(model, max_batch=4, max_len=64, prefill_chunk=chunk, kv_dtype=kv,  # 128: all fit in one step
                      pipeline=pipeline)
    reqs = [sched.submit(Request(system + t, 5, stop_at_eos=False)) for t in tails]
    while not sched.idle:
        sched.step()
    assert [r.cached for r in reqs] == [0, 22, 22]
    assert sched.stats["prefilled"] == 22 + sum(len(t) for t in tails) and sched.stats["cached"] == 44
    for r in reqs:
        assert r.tokens == run_alone(model, r.prompt_ids, 5, kv_dtype=kv)
    long = sched.submit(Request(system + [1] * 10, 20, stop_at_eos=False))  # a free slot holds its prefix: reused
    for _ in range(12):
        sched.step()
    late = sched.submit(Request(system + [1] * 10 + long.tokens[:3] + [2], 4, stop_at_eos=False))
    while not sched.idle:
        sched.step()
    assert long.cached == 22 and late.cached == len(late.prompt_ids) - 1  # the rest copied from `long`, decoding
    assert late.tokens == run_alone(model, late.prompt_ids, 4, kv_dtype=kv)


# ---- pipelined steps: launched on the kernels' deferred-call thread ------------------------------------------------


@needs_ext
@pytest.mark.parametrize("kv", [None, torch.int8])
def test_a_launched_step_equals_step_rows_and_the_next_takes_its_picks(kv):
    """`BatchDecoder.launch` against `step_rows` on a twin decoder: three decode rows, a prompt chunk that ends its
    prompt and one that does not, then a second step launched before the first has run, whose decode rows feed the
    first's picks (`take_tokens`). The logits, their statistics and every cache are the same bits; each pick is the
    row's argmax, or for a sampled row `kernels.sample`'s draw with its u."""
    model = model_of("packed-int8-head", seed=11)
    a, b = BatchDecoder(model, 5, 48, kv), BatchDecoder(model, 5, 48, kv)
    assert a.can_launch
    prompts, _ = prompts_and_lengths(5, seed=4)
    slots = [a.acquire() for _ in prompts]
    assert slots == [b.acquire() for _ in prompts]
    first = []
    for s, p in zip(slots[:3], prompts[:3]):
        first.append(int(a.prefill(s, p).argmax()))
        b.prefill(s, p)
    chunks = [(slots[3], prompts[3]), (slots[4], prompts[4][:1])]  # the first ends its prompt, the second does not
    picks = [(0.0, None, None, 0.0), (0.9, 5, None, 0.3), (0.0, None, None, 0.0), (1.1, None, 0.8, 0.6)]
    with pytest.raises(ValueError, match="needs `after`"):
        a.launch(slots[:1], [None], [], [], [(0.0, None, None, 0.0)])
    one = a.launch(slots[:3], first, chunks, [True, False], picks, lse=True, logits=True)
    two = a.launch(slots[:3] + [slots[3]], [None] * 4, [], [], [(0.0, None, None, 0.0)] * 4, take=[0, 1, 2, 3],
                   after=one, lse=True, logits=True)
    a.wait(two)
    a.wait(one)  # (both ran, in order: `two` read `one`'s picks)
    y, pre, idx, lse, top = b.step_rows(slots[:3], first, chunks, argmax=True, lse=True)
    got = one.set
    assert torch.equal(got["y"][:3], y) and torch.equal(got["y"][3], pre[0])
    assert torch.equal(got["idx"][:3], idx) and torch.equal(got["lse"][:3], lse) and torch.equal(got["top"][:3], top)
    rows = torch.cat([y, pre[0][None]])
    want = [int(rows[0].argmax()), kernels.sample(rows[1], 0.9, 5, None, u=0.3), int(rows[2].argmax()),
            kernels.sample(rows[3], 1.1, None, 0.8, u=0.6)]
    assert got["chosen"][:4].tolist() == want
    y2, _, idx2, _, _ = b.step_rows(slots[:4], want, [], argmax=True, lse=True)
    assert torch.equal(two.set["y"][:4], y2) and two.set["chosen"][:4].tolist() == idx2.tolist()
    for s in slots:
        assert a.pos(s) == b.pos(s)
        assert torch.equal(a.caches[s].k[:, :, :, : a.pos(s)], b.caches[s].k[:, :, :, : b.pos(s)])
        assert torch.equal(a.caches[s].v[:, :, :, : a.pos(s)], b.caches[s].v[:, :, :, : b.pos(s)])


@needs_ext
def test_deferred_calls_report_their_errors_and_can_be_dropped():
    """A recorded embedding of a token id outside the table fails when it runs (ValueError at `defer_wait`, the calls
    after it skipped); a recording can be dropped; begin twice, end without begin and an unknown ticket are refused."""
    ext = kernels.extension()
    emb = torch.randn(10, 16)
    ids = torch.tensor([3, 12], dtype=torch.int64)
    x = torch.zeros(2, 16)
    dst, src, index = torch.full((2,), 7, dtype=torch.int64), torch.tensor([4, 5], dtype=torch.int64), torch.tensor(
        [1, -1], dtype=torch.int64)
    ext.defer_begin()
    with pytest.raises(RuntimeError, match="already recording"):
        ext.defer_begin()
    ext.embed_rows(emb.data_ptr(), 0, 10, 16, ids.data_ptr(), 2, x.data_ptr())
    ext.take_tokens(dst.data_ptr(), src.data_ptr(), index.data_ptr(), 2)
    ticket = ext.defer_end()
    with pytest.raises(ValueError, match="outside the embedding"):
        ext.defer_wait(ticket)
    assert torch.equal(x, torch.zeros(2, 16)) and dst.tolist() == [7, 7]  # nothing of it ran
    ext.defer_begin()
    ext.take_tokens(dst.data_ptr(), src.data_ptr(), index.data_ptr(), 2)
    ext.defer_abort()
    with pytest.raises(RuntimeError, match="without defer_begin"):
        ext.defer_end()
    assert dst.tolist() == [7, 7]
    ids[1] = 9
    ext.defer_begin()
    ext.take_tokens(dst.data_ptr(), src.data_ptr(), index.data_ptr(), 2)
    ext.embed_rows(emb.data_ptr(), 0, 10, 16, ids.data_ptr(), 2, x.data_ptr())
    ticket = ext.defer_end()
    ext.defer_wait(ticket)
    assert dst.tolist() == [5, 7] and torch.equal(x, emb[[3, 9]])
    with pytest.raises(ValueError, match="no deferred list"):
        ext.defer_wait(ticket + 5)


@needs_ext
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_pipelined_steps_give_the_serial_steps_tokens_with_stops_cancels_and_reuse(temperature):
    """Requests with stop strings, end-of-sequence and length limits, one cancelled mid-decode and late joiners that
    reuse freed slots, through pipelined steps: a sequence that a stop string or end-of-sequence ends has a row in
    the step launched meanwhile, whose result is dropped and whose slot is freed once it has run. Every request gets
    the serial scheduler's tokens, text and finish reason; the freed slots hold what their positions hold (a request
    reusing one gets its own tokens), and every slot is free at the end."""
    text = "the quick brown fox jumps over the lazy dog. " * 4
    tok = byte_bpe(text, 300)
    model = model_of("packed-int8-head", seed=5, vocab_size=tok.get_vocab_size() + 84, eos_token_id=7)
    prompts = [tok.encode(p).ids for p in ["the quick", "lazy dog", "over", "fox jumps over the", "dog. the"]]
    probe = Scheduler(model, tok, max_batch=5, max_len=64)
    r0 = probe.submit(Request(prompts[0], 20, temperature, seed=3, stop_at_eos=False))
    while not probe.idle:
        probe.step()
    stop = tok.decode(r0.tokens[4:6])  # a stop string the first continuation contains

    def run(pipeline):
        sched = Scheduler(model, tok, max_batch=3, max_len=64, prefill_chunk=4, pipeline=pipeline)
        reqs = [sched.submit(Request(p, 20, temperature, stop=[stop] if i == 0 else [], seed=3 + i, logprobs=0,
                                     stop_at_eos=i == 1)) for i, p in enumerate(prompts[:3])]  # fmt: skip
        for _ in range(6):
            sched.step()
        reqs[2].cancel()
        late = [sched.submit(Request(p, 9, temperature, seed=9, stop_at_eos=False)) for p in prompts[3:]]
        while not sched.idle:
            sched.step()
        late.append(sched.submit(Request(prompts[1] + reqs[1].tokens[:3], 6, temperature, seed=10,
                                         stop_at_eos=False)))
        while not sched.idle:  # (the slot that the longest sequence left holds that prefix)
            sched.step()
        assert sched.decoder.free_slots == 3 and not sched._busy and not sched._zombies
        return reqs + late, sched

    serial, _ = run(False)
    piped, sched = run(True)
    assert sched.stats["steps"] > 10
    assert serial[0].finish_reason == "stop" and serial[2].finish_reason == "cancelled"
    for i, (s, p) in enumerate(zip(serial, piped)):
        if i == 2:  # cancelled after 6 calls: a pipelined call accepts the step launched by the call before
            assert p.finish_reason == "cancelled" and 0 < len(p.tokens) and p.tokens == s.tokens[: len(p.tokens)]
            continue
        assert (p.tokens, p.text, p.finish_reason) == (s.tokens, s.text, s.finish_reason)
        assert [e["logprob"] for e in p.token_logprobs] == [e["logprob"] for e in s.token_logprobs]
    assert piped[-1].cached == serial[-1].cached == len(prompts[1]) + 2  # the last one reused a freed slot's prefix
    for slot, held in sched.held.items():  # what a freed slot holds is what its positions hold
        solo = BatchDecoder(model, 1, 64)
        s = solo.acquire()
        solo.prefill(s, held)
        n = len(held)
        assert torch.equal(solo.caches[s].k[:, :, :, :n], sched.decoder.caches[slot].k[:, :, :, :n])


@needs_ext
def test_a_scheduler_dropped_with_a_launched_step_waits_for_it():
    """The step a pipelined scheduler launched writes into its buffers and caches; dropping the scheduler waits for
    it first (a write into freed memory would bring the process down), and the next scheduler's tokens are right."""
    import gc

    model = model_of("packed-int8-head", seed=3)
    for _ in range(3):
        sched = Scheduler(model, max_batch=4, max_len=48, pipeline=True)
        for _ in range(4):
            sched.submit(Request([1, 2, 3], 10, stop_at_eos=False))
        sched.step()
        sched.step()
        assert sched._flight is not None
        del sched
        gc.collect()
    assert run_alone(model, [1, 2, 3], 5) == generate(model, None, [1, 2, 3], max_new_tokens=5,
                                                      stop_at_eos=False)["tokens"]


@needs_ext
def test_fail_all_waits_for_the_launched_step_and_frees_every_slot():
    model = model_of("packed-int8-head", seed=3)
    sched = Scheduler(model, max_batch=2, max_len=48, pipeline=True)
    reqs = [sched.submit(Request([1, 2, 3], 10, stop_at_eos=False)) for _ in range(3)]
    for _ in range(3):
        sched.step()
    assert sched._flight is not None and sched._busy
    sched.fail_all("cancelled")
    assert sched.idle and sched.decoder.free_slots == 2 and not sched._busy
    assert [r.finish_reason for r in reqs] == ["cancelled"] * 3
    again = sched.submit(Request([1, 2, 3], 4, stop_at_eos=False))
    while not sched.idle:
        sched.step()
    assert again.tokens == run_alone(model, [1, 2, 3], 4)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_pipelined_generate_batch_on_one_and_two_threads_equals_each_prompt_alone(threads):
    """`generate_batch` (pipelined) on one kernel thread, where the waiting thread sleeps instead of helping, and on
    two: each prompt's tokens are `generate`'s alone."""
    model = model_of("packed-int8-head", seed=8)
    prompts, limits = prompts_and_lengths(6, seed=7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False, max_batch=4)
        alone = [generate(model, None, p, max_new_tokens=n, stop_at_eos=False)["tokens"]
                 for p, n in zip(prompts, limits)]
    finally:
        torch.set_num_threads(before)
    assert [r["tokens"] for r in batched] == alone


@needs_ext
def test_a_bfloat16_cache_runs_batched_as_generate_runs_it():
    """The C calls take float32, float16 and q8 caches; with a bfloat16 one `generate` runs the model's own modules,
    and batched decoding crashed with a KeyError (a review, 2026-12-07). It now runs the modules too."""
    model = model_of("packed-int8-head")
    prompts, limits = prompts_and_lengths(3)
    alone = [generate(model, None, p, max_new_tokens=n, stop_at_eos=False, kv_dtype=torch.bfloat16)["tokens"]
             for p, n in zip(prompts, limits)]
    batched = generate_batch(model, None, prompts, max_new_tokens=limits, stop_at_eos=False, max_batch=2,
                             kv_dtype=torch.bfloat16)
    assert [r["tokens"] for r in batched] == alone
