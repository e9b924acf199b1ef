"""Tokenizers: load any `tokenizer.json`, or train a byte-level BPE on a corpus with Hugging Face `tokenizers`.

The paper used the GPT-NeoX-20B tokenizer (bos = eos = id 0 `<|endoftext|>`); our BPEs follow the same convention:
id 0 is `<|endoftext|>` (EOS, also used as BOS) and id 1 `<|padding|>`. The model's embedding is padded to a multiple
of 128·MP (`spectra.config.pad_vocab`); a tokenizer with more ids than the model's vocabulary is an error.

The builtin tokenizer is a 4096-id BPE trained on the builtin corpus's train split. 4096 rather than 8192 suits the
tiny CPU models it is for: on 6 MB of text each id is seen about twice as often, the embedding and lm_head (which
dominate a dim-256 model's parameters and its softmax cost) are half as large, and compression on the held-out plays
drops only from 3.13 to 2.92 bytes per token (measured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from spectra.config import ModelConfig, pad_vocab
from spectra.data.corpora import cache_root, read_documents, source_fingerprint
from spectra.files import FormatError, atomic_file

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
BUILTIN_VOCAB = 4096


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # a core dependency, but say so clearly
        raise ImportError("spectra.data needs `tokenizers`: pip install tokenizers") from e
    return tokenizers


def tokenizer_file(path_or_dir: str | os.PathLike) -> Path:
    """The tokenizer.json a path names (the file itself, or `tokenizer.json` in a folder); 'builtin' for ours."""
    if str(path_or_dir) == "builtin":
        return builtin_tokenizer()
    p = Path(path_or_dir).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {p} does not exist "
                                "(expected a tokenizer.json file or a folder holding one)")
    return p


def load_tokenizer(path_or_dir):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a model folder holding one; 'builtin' for ours; a
    Tokenizer is returned as it is."""
    if isinstance(path_or_dir, _tokenizers().Tokenizer):
        return path_or_dir
    p = tokenizer_file(path_or_dir)
    try:
        return _tokenizers().Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed json
        raise FormatError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0] if str(e) else e!r}") from None


def tokenizer_hash(path_or_dir: str | os.PathLike) -> str:
    """sha256 of the tokenizer.json bytes: what shards and checkpoints record to detect a changed tokenizer."""
    return hashlib.sha256(tokenizer_file(path_or_dir).read_bytes()).hexdigest()


def eos_id(tokenizer, where: str | os.PathLike | None = None) -> int:
    """The end-of-text id: the first of EOS_CANDIDATES the vocabulary has (`where` names the tokenizer's file in the
    error)."""
    for tok in EOS_CANDIDATES:
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i
    raise ValueError(f"tokenizer {where or ''}{' ' if where else ''}has none of the end-of-text tokens "
                     f"{EOS_CANDIDATES}")


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit: its largest id + 1, added tokens included (the count of ids is less when
    they have gaps: 1002 ids up to 70000 counted 1002, picked uint16 shards and an embedding too small)."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(ids, default=-1) + 1


def check_vocab(tokenizer, cfg: ModelConfig, what: str = "tokenizer") -> None:
    """Raise if the tokenizer emits ids the model has no embedding for."""
    n = vocab_size(tokenizer)
    if n > cfg.vocab_size:
        raise ValueError(
            f"{what} has {n} ids but the model's vocab_size is {cfg.vocab_size}; set model.vocab_size >= {n} "
            f"(the paper pads to a multiple of 128·MP: {pad_vocab(n, cfg.num_scale_shards)})"
        )


def train_bpe(
    texts: Iterable[str] | str | os.PathLike,
    vocab: int,
    out_path: str | os.PathLike,
    *,
    min_frequency: int = 2,
    split: str = "train",
) -> Path:
    """Train a byte-level BPE with `vocab` ids (0 = <|endoftext|>, 1 = <|padding|>) and write its tokenizer.json.

    `texts` is an iterable of documents or a source for `read_documents`. Deterministic for the same input.
    """
    if vocab < 258 + 2:
        raise ValueError(f"vocab must be at least 260 (256 bytes + 2 special tokens + merges), got {vocab}")
    tk = _tokenizers()
    if isinstance(texts, (str, os.PathLike)):
        texts = read_documents(texts, split)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_docs = 0

    def counted():
        nonlocal n_docs
        for doc in texts:
            n_docs += 1
            yield doc

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_docs == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus (no documents)")
    with atomic_file(out_path) as f:
        f.write(tok.to_str())
    log.info("trained a %d-id byte-level BPE on %d documents -> %s", vocab_size(tok), n_docs, out_path)
    return Path(out_path)


def builtin_tokenizer(vocab: int = BUILTIN_VOCAB) -> Path:
    """Path of the cached byte-level BPE trained on the builtin corpus's train split (built on first use)."""
    path = cache_root() / "tokenizers" / f"builtin-bpe{vocab}.json"
    if not path.exists():
        train_bpe("builtin", vocab, path)
    return path


def resolve_tokenizer(spec: str | os.PathLike, source: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """A tokenizer spec -> tokenizer.json path: 'builtin', 'bpe:N' (train N ids on `source`, kept in `work_dir`),
    or a path to a tokenizer.json / model folder."""
    s = str(spec)
    if s == "builtin":
        return builtin_tokenizer()
    if s.startswith("bpe:"):
        try:  # an integer: bpe:inf was an OverflowError traceback, bpe:4096.7 was taken as 4096
            n = int(s[4:]) if not re.fullmatch(r"\d+(\.0*)?e\d+", s[4:]) else int(float(s[4:]))
        except ValueError:
            raise ValueError(f"tokenizer {s!r}: expected 'bpe:N' with N a whole vocabulary size, e.g. bpe:4096") \
                from None
        path = Path(work_dir) / f"bpe{n}.json"
        stamp = Path(work_dir) / f"bpe{n}.source.json"  # what it was trained on (`source_fingerprint`)
        want = json.dumps(source_fingerprint(source), sort_keys=True)
        if path.exists() and stamp.exists() and stamp.read_text() != want:
            log.info("%s was trained on other data than %s; training it again", path, source)
        elif path.exists():  # (a tokenizer from before the stamps: taken as it is)
            return path
        train_bpe(source, n, path)
        with atomic_file(stamp) as f:
            f.write(want)
        return path
    return tokenizer_file(s)
