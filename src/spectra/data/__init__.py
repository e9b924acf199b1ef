"""Data: corpora (builtin Shakespeare + Milton, local files, streamed Hugging Face datasets), tokenizers, token shards.

    read_documents(source, split)        documents of a source as strings
    load_tokenizer(path) / train_bpe(...) / builtin_tokenizer()
    build_shards(...) / prepare_shards(...) / TokenStream / SequenceSampler
    token_sequences(source, tokenizer, n_seqs, seq_len, split=, seed=)   fixed sequences for calibration and eval
"""

from spectra.data.corpora import builtin_corpus_dir, cache_root, read_documents
from spectra.data.shards import (
    SequenceSampler,
    TokenStream,
    build_shards,
    prepare_shards,
    read_manifest,
    token_sequences,
)
from spectra.data.tokenizer import (
    builtin_tokenizer,
    check_vocab,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
    vocab_size,
)

__all__ = [
    "SequenceSampler",
    "TokenStream",
    "build_shards",
    "builtin_corpus_dir",
    "builtin_tokenizer",
    "cache_root",
    "check_vocab",
    "eos_id",
    "load_tokenizer",
    "prepare_shards",
    "read_documents",
    "read_manifest",
    "token_sequences",
    "tokenizer_hash",
    "train_bpe",
    "vocab_size",
]
