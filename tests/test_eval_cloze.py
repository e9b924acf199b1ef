"""The LAMBADA-style cloze builder against its stated recipe, and the task running through lm-eval's YAML."""

import json
import os
import re

import pytest

from spectra.eval.cloze import STOPWORDS, build_cloze, target_word

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sentence(i: int, last: str, n: int = 12) -> str:
    return " ".join(f"w{i}x{j}" for j in range(n - 1)) + f" {last}."


def test_hand_built_passage():
    # 5 sentences of 12 words: the passage reaches 50 words at sentence 5, which ends on "harbour" (seen earlier).
    doc = " ".join([sentence(0, "harbour"), sentence(1, "the"), sentence(2, "boats"), sentence(3, "and"),
                    sentence(4, "harbour")])
    items = build_cloze([doc])
    assert items == [{"text": doc[:-1]}]  # the whole document without its final full stop
    # Same document but the last word never occurs before: no item.
    assert build_cloze([doc.replace("w0x10 harbour.", "w0x10 quay.")]) == []
    # A stopword or a short word at the end is not a target.
    assert build_cloze([doc[: -len("harbour.")] + "the."]) == []
    assert target_word('to the harbour!"') == "harbour"  # closing punctuation and quotes are stripped
    assert target_word('He said "Harbour!"') is None  # an opening quote would become part of the target
    assert target_word("it was 1984.") is None and target_word("of Thy.") is None


def test_sentences_keep_their_closing_quotes_and_brackets():
    """The passage is the source text: a sentence's closing quotes and brackets stay with it (the split dropped
    them), and an item's text is a substring of the document."""
    from spectra.eval.cloze import split_sentences

    text = 'He said "the harbour sleeps." Nobody answered him (the crew was asleep.) Then it rained! Why? ok'
    assert split_sentences(text) == ['He said "the harbour sleeps."', "Nobody answered him (the crew was asleep.)",
                                     "Then it rained!", "Why?", "ok"]
    doc = " ".join([sentence(0, "harbour"), '"' + sentence(1, "the") + '"', "(" + sentence(2, "boats") + ")",
                    sentence(3, "and"), sentence(4, "harbour")])
    items = build_cloze([doc])
    assert items == [{"text": doc[:-1]}]


def test_recipe_holds_on_every_item():
    words = "king crown sea ship storm night castle sword river forest letter daughter".split()
    docs = []
    for d in range(6):
        sents = []
        for i in range(40):
            body = " ".join(words[(d + i + j) % len(words)] for j in range(3 + (i * 7 + d) % 9))
            end = words[(i * 5 + d) % len(words)] if i % 3 else "the"
            sents.append(f"{body.capitalize()} {end}{'.!?'[i % 3]}")
        docs.append("  ".join(sents).replace(" ship", "\nship"))
    items = build_cloze(docs, min_words=50, max_words=120)
    assert len(items) > 5
    for item in items:
        text = item["text"]
        assert text == " ".join(text.split())  # single spaces, no newlines
        n_words = len(text.split(" "))
        assert 50 <= n_words <= 120
        target = text.split(" ")[-1]
        assert target.isalpha() and len(target) >= 3 and target.lower() not in STOPWORDS
        context = text[: -len(target) - 1]
        assert target.lower() in {w.lower() for w in re.findall(r"[A-Za-z]+", context)}
        # passages end on a sentence boundary: the text (plus its stripped punctuation) is a run of whole sentences
        assert any(text + p in " ".join(" ".join(d.split()) for d in docs) for p in ".!?")


def test_cloze_task_runs_through_lambada_yaml(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import torch

    from spectra.checkpoint import save_model
    from spectra.data import train_bpe
    from spectra.eval.run import evaluate
    from spectra.model import build_model
    from tests.conftest import tiny_config

    words = "the old king walked to the harbour and looked at the sea while his daughter read a letter".split()
    doc = " ".join(
        " ".join(words[(i + j) % len(words)] for j in range(10)) + f" {words[(i * 3) % len(words)]}." for i in range(60)
    )
    (tmp_path / "corpus" / "validation").mkdir(parents=True)
    (tmp_path / "corpus" / "validation" / "book.txt").write_text(doc)
    tok = train_bpe([doc], 300, tmp_path / "tokenizer.json", min_frequency=1)
    torch.manual_seed(0)
    model_dir = save_model(build_model(tiny_config(vocab_size=320, max_seq_len=256), seed=0), tmp_path / "m",
                           tokenizer=tok)
    items = build_cloze([doc])
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    # progress=False (`spectra suite --no-progress`, `spectra eval --no-progress`), first, while `datasets` still
    # prepares the task's split (its "Generating test split" bar came before the bars were switched off)
    quiet = evaluate(model_dir, "cloze,ppl", data=str(tmp_path / "corpus"), include_defaults=False, batch_size=4,
                     ppl_seq_len=64, progress=False)
    assert "%|" not in capsys.readouterr().err
    res = evaluate(model_dir, "cloze,ppl", data=str(tmp_path / "corpus"), include_defaults=False, batch_size=4,
                   ppl_seq_len=64)
    cloze = res["tasks"]["spectra_cloze"]
    assert res["harness"]["n_samples"]["spectra_cloze"]["effective"] == len(items) > 0
    assert 0.0 <= cloze["acc"] <= 1.0 and cloze["perplexity"] > 1.0
    assert res["perplexity"]["tokens"] > 0 and res["model"]["params"] > 0
    written = next((tmp_path / "cache").glob("cloze/*/spectra_cloze.jsonl")).read_text().splitlines()
    assert [json.loads(line) for line in written] == items
    assert "%|" in capsys.readouterr().err  # lm-eval's bar while it builds the task's requests
    assert quiet["tasks"]["spectra_cloze"]["acc"] == cloze["acc"]
    assert quiet["perplexity"]["ppl"] == res["perplexity"]["ppl"]
