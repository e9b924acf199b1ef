"""Data: corpora (builtin Shakespeare + Milton, local files, streamed Hugging Face datasets), tokenizers, token shards.

    read_documents(source, split)        documents of a source as strings
    load_tokenizer(path) / train_bpe(...) / builtin_tokenizer()
    build_shards(...) / prepare_shards(...) / TokenStream / SequenceSampler
    token_sequences(source, tokenizer, n_seqs, seq_len, split=, seed=)   fixed sequences for calibration and eval
"""

from spectra._lazy import lazy_package

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


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "builtin_corpus_dir": "spectra.data.corpora",
    "cache_root": "spectra.data.corpora",
    "read_documents": "spectra.data.corpora",
    "SequenceSampler": "spectra.data.shards",
    "TokenStream": "spectra.data.shards",
    "build_shards": "spectra.data.shards",
    "prepare_shards": "spectra.data.shards",
    "read_manifest": "spectra.data.shards",
    "token_sequences": "spectra.data.shards",
    "builtin_tokenizer": "spectra.data.tokenizer",
    "check_vocab": "spectra.data.tokenizer",
    "eos_id": "spectra.data.tokenizer",
    "load_tokenizer": "spectra.data.tokenizer",
    "tokenizer_hash": "spectra.data.tokenizer",
    "train_bpe": "spectra.data.tokenizer",
    "vocab_size": "spectra.data.tokenizer",
}


lazy_package(__name__)
