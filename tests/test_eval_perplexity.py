"""Perplexity against a direct token-by-token computation, and the distributed reduction against one process."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from spectra.data import eos_id, load_tokenizer, train_bpe
from spectra.eval.perplexity import perplexity, windows
from spectra.model import build_model
from tests.conftest import tiny_config

DOCS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "The sun shone, having no alternative, on the nothing new. Ünïcödé bytes count too: naïve café.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    (root / "corpus" / "validation").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (root / "corpus" / "validation" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (root / "corpus" / "train.txt").write_text("unused training text", encoding="utf-8")
    tok_path = train_bpe(DOCS * 3, 300, root / "tokenizer.json", min_frequency=1)
    return root / "corpus", tok_path


def model():
    return build_model(tiny_config(vocab_size=320, max_seq_len=192, init_std=0.2), seed=0).eval()


def stream(tok_path):
    tok = load_tokenizer(tok_path)
    ids = [eos_id(tok)]
    for doc in DOCS:
        ids += tok.encode(doc, add_special_tokens=False).ids + [eos_id(tok)]
    return ids


@torch.no_grad()
def direct_nll(m, ids, context):
    """Σ_t −log p(x_t | the `context` tokens before it), one forward pass per token."""
    total = 0.0
    for t in range(1, len(ids)):
        inp = torch.tensor([ids[max(0, t - context) : t]])
        total -= float(m(inp)[0, -1].log_softmax(-1)[ids[t]])
    return total


def test_max_tokens_fills_the_stream_cutting_the_document_that_does_not_fit(setup):
    """At most max_tokens: whole documents while they fit (with their EOS), then the first tokens of the next, its
    bytes counted from the kept tokens decoded; a cap past the end takes everything. (The document that did not fit
    used to be left out, so a short document before a long one left most of the budget unscored.)"""
    from spectra.eval.perplexity import token_stream

    corpus, tok_path = setup
    tok = load_tokenizer(tok_path)
    full = stream(tok_path)
    first = len(tok.encode(DOCS[0], add_special_tokens=False).ids)
    ids, n_docs, n_bytes = token_stream(tok, corpus, "validation", None)
    assert ids == full and n_docs == 3 and n_bytes == sum(len(d.encode("utf-8")) for d in DOCS)
    ids, n_docs, n_bytes = token_stream(tok, corpus, "validation", first + 2)  # document 0 with its EOS: full
    assert ids == full[: first + 2] and n_docs == 1 and n_bytes == len(DOCS[0].encode("utf-8"))
    ids, n_docs, n_bytes = token_stream(tok, corpus, "validation", first + 7)  # and 5 tokens of document 1
    assert ids == full[: first + 7] and n_docs == 2
    assert n_bytes == len(DOCS[0].encode("utf-8")) + len(tok.decode(full[first + 2 : first + 7]).encode("utf-8"))
    ids, n_docs, n_bytes = token_stream(tok, corpus, "validation", 6)  # document 0 alone is longer: cut
    assert ids == full[:6] and n_docs == 1 and n_bytes == len(tok.decode(full[1:6]).encode("utf-8"))
    assert 0 < n_bytes < len(DOCS[0].encode("utf-8"))
    assert token_stream(tok, corpus, "validation", len(full) + 10)[0] == full
    r = perplexity(model(), tok, corpus, seq_len=16, max_tokens=first + 7)
    assert r["tokens"] == first + 6 and r["documents"] == 2


def test_windows_score_each_token_once():
    for n, L, s in [(10, 4, 4), (10, 4, 1), (100, 16, 5), (3, 8, 8)]:
        spans = windows(n, L, s)
        assert sum(k for _, _, k in spans) == n - 1
        ends = [e for _, e, _ in spans]
        assert ends == sorted(ends) and ends[-1] == n
        for start, end, k in spans:
            assert end - start - 1 <= L and k <= end - start - 1
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_full_context_equals_one_forward_pass(setup):
    corpus, tok_path = setup
    m, ids = model(), stream(tok_path)
    assert len(ids) <= 192
    res = perplexity(m, tok_path, corpus, split="validation")
    with torch.no_grad():
        logp = m(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
    nll = -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double().sum())
    assert res["tokens"] == len(ids) - 1 and res["documents"] == 3 and res["windows"] == 1
    assert res["nll"] == pytest.approx(nll, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-6)
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert res["bytes"] == n_bytes
    assert res["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-6)


@pytest.mark.parametrize("seq_len", [8, 13])
def test_stride_one_equals_direct_fixed_context(setup, seq_len):
    corpus, tok_path = setup
    m, ids = model(), stream(tok_path)
    res = perplexity(m, tok_path, corpus, split="validation", seq_len=seq_len, stride=1, batch_size=5)
    assert res["nll"] == pytest.approx(direct_nll(m, ids, seq_len), rel=1e-5)


def test_window_losses_are_each_windows_own_nll(setup):
    """The per-window NLLs (for paired comparisons) restated: each window scored alone, summed to the total."""
    corpus, tok_path = setup
    m, ids = model(), stream(tok_path)
    res = perplexity(m, tok_path, corpus, split="validation", seq_len=16, stride=16, batch_size=3)
    spans = windows(len(ids), 16, 16)
    assert res["window_tokens"] == [k for _, _, k in spans] and len(res["window_nll"]) == len(spans) > 2
    with torch.no_grad():
        for (start, end, k), got in zip(spans, res["window_nll"], strict=True):
            x = torch.tensor([ids[start:end]])
            logp = m(x[:, :-1]).log_softmax(-1)[0, -k:]
            want = -float(logp[torch.arange(k), x[0, -k:]].double().sum())
            assert got == pytest.approx(want, rel=1e-5)
    assert sum(res["window_nll"]) == pytest.approx(res["nll"], rel=1e-12)


def _rank_main(rank, world, corpus, tok_path, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = perplexity(model(), tok_path, corpus, split="validation", seq_len=8, stride=3, batch_size=2)
        out[rank] = (res["nll"], res["tokens"], res["ppl"], res["window_nll"])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_sums_equal_single_process(setup):
    corpus, tok_path = setup
    single = perplexity(model(), tok_path, corpus, split="validation", seq_len=8, stride=3, batch_size=2)
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, str(corpus), str(tok_path), port, out), nprocs=2, join=True)
        results = dict(out)
    for nll, tokens, ppl, window_nll in results.values():
        assert tokens == single["tokens"]
        assert window_nll == pytest.approx(single["window_nll"], rel=1e-6)
        assert nll == pytest.approx(single["nll"], rel=1e-6)
        assert ppl == pytest.approx(single["ppl"], rel=1e-6)


def test_bad_input(setup, tmp_path):
    corpus, tok_path = setup
    big = train_bpe(DOCS * 3 + [d.upper() for d in DOCS], 400, tmp_path / "big.json", min_frequency=1)
    with pytest.raises(ValueError, match="vocab_size is 320"):
        perplexity(model(), big, corpus, split="validation")
    with pytest.raises(ValueError, match="max_seq_len=192"):
        perplexity(model(), tok_path, corpus, split="validation", seq_len=193)
    with pytest.raises(FileNotFoundError):
        perplexity(model(), tok_path, tmp_path / "missing", split="validation")


def test_cli_eval_ppl_writes_results(setup, tmp_path, capsys):
    from spectra.__main__ import main
    from spectra.checkpoint import save_model

    corpus, tok_path = setup
    model_dir = save_model(model(), tmp_path / "m", tokenizer=tok_path)
    out = tmp_path / "results.json"
    code = main(["eval", str(model_dir), "--tasks", "ppl", "--data", str(corpus), "--seq-len", "32", "--stride", "16",
                 "--output", str(out)])
    assert code == 0
    res = __import__("json").loads(out.read_text())
    direct = perplexity(model(), tok_path, corpus, split="validation", seq_len=32, stride=16)
    assert res["perplexity"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-9)
    assert res["model"]["params"] == model().num_params() and res["model"]["kind"] == "model"
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", str(model_dir), "--tasks", "ppl", "--data", str(tmp_path / "nope")]) == 2


def test_perplexity_alone_needs_no_lm_eval(setup, tmp_path, monkeypatch):
    """`spectra eval --tasks ppl` failed with "spectra.eval.harness needs lm-eval" on the core install; lm-eval (and
    our adapter) are imported only for benchmark and cloze tasks now."""
    import builtins
    import sys

    from spectra.checkpoint import save_model
    from spectra.eval import evaluate

    corpus, tok_path = setup
    model_dir = save_model(model(), tmp_path / "m", tokenizer=tok_path)
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.") or m == "spectra.eval.harness"]:
        monkeypatch.delitem(sys.modules, name)
    real = builtins.__import__

    def without_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    res = evaluate(model_dir, "ppl", data=str(corpus), ppl_seq_len=32)
    direct = perplexity(model(), tok_path, corpus, split="validation", seq_len=32)
    assert res["perplexity"]["ppl"] == direct["ppl"] and res["harness"]["version"] is None
    with pytest.raises(ImportError, match=r"needs lm-eval .*pip install 'spectra-lm\[eval\]'"):
        evaluate(model_dir, "arc_easy", data=str(corpus))


def test_a_diverged_model_has_infinite_perplexity_and_strict_json(setup, tmp_path):
    """A model whose loss passes ~709.78 nats (math.exp's range) reports ppl inf with its loss (math.exp raised
    OverflowError after the scoring); the results file writes it as null, strict JSON (it wrote Infinity / NaN)."""
    import json
    import math

    from spectra.eval.results import write_results

    corpus, tok_path = setup
    m = model()
    with torch.no_grad():
        m.norm.weight.mul_(5000.0)  # huge but finite logits
    res = perplexity(m, tok_path, corpus, split="validation")
    assert math.isfinite(res["loss"]) and res["loss"] > 710 and res["ppl"] == math.inf
    path = write_results(tmp_path / "r.json", {"perplexity": res, "x": [float("nan"), 1.5]})
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["perplexity"]["ppl"] is None and doc["perplexity"]["loss"] == res["loss"] and doc["x"] == [None, 1.5]
