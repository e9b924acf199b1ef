"""Token shards: a corpus tokenized once into memory-mapped arrays, and the streams and sequences cut from them.

Layout of a shard folder:

    manifest.json            {"format": "spectra-shards", "source": {...}, "tokenizer": {"sha256", "vocab_size",
                              "eos_id"}, "dtype": "uint16", "splits": {"train": {"shards": [{"file", "tokens",
                              "docs"}], "tokens", "docs", "complete"}, "validation": {...}}}
    train_00000.bin ...      raw little-endian uint16 (vocab <= 65536) or uint32 token ids

Each split is the concatenation doc₀ EOS doc₁ EOS … in `read_documents` order, so the shards are the same on every
run. Documents are tokenized in parallel batches (`Tokenizer.encode_batch`, one thread per core). Every shard and the
manifest are written atomically and the manifest is updated after each shard, so an interrupted build resumes where
it stopped and a finished one is skipped; `max_tokens` stops early (a later call with a larger limit continues).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from spectra.data.corpora import SPLITS, cache_root, read_documents, source_fingerprint
from spectra.data.tokenizer import eos_id, load_tokenizer, tokenizer_file, tokenizer_hash, vocab_size
from spectra.files import FormatError, atomic_file, file_lock, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "spectra-shards"
SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 per shard
ENCODE_BATCH = 512  # documents per encode_batch call
PIECE_CHARS = 1 << 14  # long documents are encoded in pieces of about this many characters


def _dtype_for(n_ids: int) -> np.dtype:
    return np.dtype(np.uint16) if n_ids <= 1 << 16 else np.dtype(np.uint32)


def _batches(docs: Iterator, n: int) -> Iterator[list]:
    batch: list = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _safe_cuts(text: str, piece: int) -> list[str]:
    """Cut `text` into pieces of about `piece` characters at "x\nY" (non-space, newline, non-space): a byte-level
    pre-tokenizer never joins across such a newline, so the pieces tokenize exactly like the whole."""
    if len(text) <= piece:
        return [text]
    out, start = [], 0
    while len(text) - start > piece:
        i = text.find("\n", start + piece)
        while i != -1 and not (0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
            i = text.find("\n", i + 1)
        if i == -1:
            break
        out.append(text[start : i + 1])
        start = i + 1
    out.append(text[start:])
    return out


def _doc_pieces(docs: Iterator[str], tok) -> Iterator[tuple[str, bool]]:
    """(piece, is the document's last piece): each document in `_safe_cuts` pieces (byte-level tokenizers only)."""
    # cut only where a piece encodes as it does inside the document: a ByteLevel pre-tokenizer that adds a prefix
    # space would give each piece's first word one ('Enter' became 'ĠEnter')
    pre = tok.pre_tokenizer
    byte_level = (type(pre).__name__ == "ByteLevel" and not getattr(pre, "add_prefix_space", True)
                  and getattr(pre, "use_regex", True))  # without its regex, merges may cross a newline
    for d in docs:
        cuts = _safe_cuts(d, PIECE_CHARS) if byte_level else [d]
        for k, piece in enumerate(cuts):
            yield piece, k == len(cuts) - 1


def _encode_pieces(tok, pieces: list[tuple[str, bool]]) -> Iterator[tuple[list[int], bool]]:
    """(ids, is the document's last piece) for each `_doc_pieces` item, in one `encode_batch` call."""
    encs = tok.encode_batch([p for p, _ in pieces], add_special_tokens=False)
    for (_, last), enc in zip(pieces, encs, strict=True):
        yield enc.ids, last


def encode_documents(tok, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens. Long documents are cut at safe newlines (byte-level
    tokenizers only) so `encode_batch` spreads them over all cores; the ids equal those of whole-document encoding."""
    out: list[list[int]] = []
    current: list[int] = []
    for ids, last in _encode_pieces(tok, list(_doc_pieces(docs, tok))):
        current.extend(ids)
        if last:
            out.append(current)
            current = []
    return out


def build_shards(
    source: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: tuple[str, ...] = SPLITS,
    max_tokens: dict[str, int] | int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = False,
) -> dict:
    """Tokenize `source`'s splits with the tokenizer.json `tokenizer` into `out_dir`. Returns the manifest.

    `max_tokens` (per split, or one number for all) stops a split at the end of the document that brings it to that
    many tokens.
    """
    tok_path = tokenizer_file(tokenizer)
    tok = load_tokenizer(tok_path)
    out = Path(out_dir)
    ident = {"source": source_fingerprint(source),
             "tokenizer": {"sha256": tokenizer_hash(tok_path), "vocab_size": vocab_size(tok),
                           "eos_id": eos_id(tok, tok_path)}}
    manifest = read_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        for key in ("source", "tokenizer"):
            if manifest[key] != ident[key]:
                raise ValueError(f"{out / MANIFEST} was built from {key} {manifest[key]}, not {ident[key]}; "
                                 "use another output folder")
    else:
        manifest = {"format": FORMAT, "version": 1, **ident,
                    "dtype": _dtype_for(ident["tokenizer"]["vocab_size"]).name, "splits": {}}
    dtype = np.dtype(manifest["dtype"])
    eos = ident["tokenizer"]["eos_id"]
    for split in splits:
        limit = max_tokens.get(split) if isinstance(max_tokens, dict) else max_tokens
        entry = manifest["splits"].setdefault(split, {"shards": [], "tokens": 0, "docs": 0, "complete": False})
        if entry["complete"] or (limit is not None and entry["tokens"] >= limit):
            continue
        docs = read_documents(source, split)
        for _ in range(entry["docs"]):  # skip what finished shards already hold
            next(docs, None)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"tokenizing {split}", unit="tok", unit_scale=True, initial=entry["tokens"])
        buf: list[np.ndarray] = []
        buf_tokens = buf_docs = 0
        exhausted = True
        for batch in _batches(docs, ENCODE_BATCH):
            before = buf_tokens
            for doc_ids in encode_documents(tok, batch):
                ids = np.empty(len(doc_ids) + 1, dtype=dtype)
                ids[:-1] = doc_ids
                ids[-1] = eos
                buf.append(ids)
                buf_tokens += len(ids)
                buf_docs += 1
                if limit is not None and entry["tokens"] + buf_tokens >= limit:  # at the document that reaches it
                    exhausted = False  # (a whole batch of documents went in: 200k asked for wrote 2.6M tokens)
                    break
            if bar is not None:
                bar.update(buf_tokens - before)
            if buf_tokens >= shard_tokens:
                _flush(out, manifest, split, buf, buf_docs)
                buf, buf_tokens, buf_docs = [], 0, 0
            if not exhausted:
                break
        if buf:
            _flush(out, manifest, split, buf, buf_docs)
        entry["complete"] = exhausted
        write_json(out / MANIFEST, manifest)
        if bar is not None:
            bar.close()
        if entry["tokens"] == 0:
            raise ValueError(f"data source {source!r} has no {split} documents with text")
        log.info("%s: %s split holds %d tokens in %d documents", out, split, entry["tokens"], entry["docs"])
    return manifest


def _flush(out: Path, manifest: dict, split: str, buf: list[np.ndarray], n_docs: int) -> None:
    entry = manifest["splits"][split]
    name = f"{split}_{len(entry['shards']):05d}.bin"
    arr = np.concatenate(buf)
    with atomic_file(out / name, "wb") as f:
        f.write(arr.tobytes())
    entry["shards"].append({"file": name, "tokens": int(arr.size), "docs": n_docs})
    entry["tokens"] += int(arr.size)
    entry["docs"] += n_docs
    write_json(out / MANIFEST, manifest)


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a token shard folder "
                                "(build one with `spectra data shards`)")
    manifest = read_json(path, "a token shard manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FormatError(f"{path} has format {found!r}, expected {FORMAT!r}")
    tok, splits = manifest.get("tokenizer"), manifest.get("splits")
    ok = ("source" in manifest and isinstance(manifest.get("dtype"), str) and isinstance(tok, dict)
          and isinstance(tok.get("sha256"), str) and all(isinstance(tok.get(k), int) for k in ("vocab_size", "eos_id"))
          and isinstance(splits, dict) and all(
              isinstance(e, dict) and isinstance(e.get("shards"), list) and all(
                  isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("tokens"), int)
                  for sh in e["shards"]) for e in splits.values()))
    if not ok:  # a KeyError traceback before
        raise FormatError(f"{path} is not a whole token shard manifest: it needs source, dtype, tokenizer "
                          "(sha256, vocab_size, eos_id) and splits of shards (file, tokens); rebuild it with `spectra "
                          "data shards`")
    return manifest


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def prepare_shards(
    source: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    max_tokens: dict[str, int] | int | None = None,
    progress: bool = False,
) -> Path:
    """Shards of `source` under the cache (`$SPECTRA_CACHE/shards/<hash of source and tokenizer>`), built if needed.

    A folder that already holds shards (a manifest.json) is returned as it is.
    """
    if is_shard_dir(source):
        return Path(source)
    key = json.dumps({"source": source_fingerprint(source), "tokenizer": tokenizer_hash(tokenizer)}, sort_keys=True)
    out = cache_root() / "shards" / hashlib.sha256(key.encode()).hexdigest()[:16]
    with file_lock(out.parent / f"{out.name}.lock"):  # runs side by side (`spectra suite --jobs`) share the cache
        build_shards(source, tokenizer, out, max_tokens=max_tokens, progress=progress)
    return out


class TokenStream:
    """One split of a shard folder as a single read-only token array (memory-mapped, spanning shards)."""

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train") -> None:
        self.dir = Path(shard_dir)
        self.manifest = read_manifest(self.dir)
        entry = self.manifest["splits"].get(split)
        if not entry or entry["tokens"] == 0:
            raise ValueError(f"{self.dir / MANIFEST} has no {split!r} tokens; splits present: "
                             f"{sorted(k for k, v in self.manifest['splits'].items() if v['tokens'])}")
        dtype = np.dtype(self.manifest["dtype"])
        for s in entry["shards"]:
            f = self.dir / s["file"]
            size = f.stat().st_size if f.exists() else None
            if size != s["tokens"] * dtype.itemsize:
                raise FormatError(f"{f} is {'missing' if size is None else f'{size} bytes'}; "
                                  f"{self.dir / MANIFEST} records {s['tokens']} {dtype} tokens "
                                  f"({s['tokens'] * dtype.itemsize} bytes): rebuild the shards (spectra data shards)")
        self.arrays = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r") for s in entry["shards"]]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)
        pos, i = start, int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            a = self.arrays[i]
            lo = pos - int(self.offsets[i])
            n = min(length - filled, len(a) - lo)
            out[filled : filled + n] = a[lo : lo + n]
            filled, pos, i = filled + n, pos + n, i + 1
        return out


class SequenceSampler:
    """Training sequences from a token stream: its first n windows of T + 1 tokens (inputs and shifted targets,
    neighbours share one token; n = (len − 1) // T, or fewer when given); epoch e visits them in `randperm(n, seed + e)`
    order. Sequence k of the run is window perm_{k // n}[k mod n], so a run's data position is one integer.

    A run fixes its own n (`spectra.train.trainer`: the sequences it will train on, or all the stream holds if fewer)
    rather than taking the stream's length: shards are cached per source and tokenizer and grow when a later run asks
    for more tokens, and a permutation of every window cached would change the order under a run that resumes, and
    with what other runs did before it."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0, n: int | None = None) -> None:
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        have = (len(stream) - 1) // seq_len
        if have < 1:
            raise ValueError(f"{stream.dir}: {len(stream)} tokens are fewer than seq_len + 1 = {seq_len + 1}")
        if n is not None and not 1 <= n <= have:
            raise ValueError(f"{stream.dir}: {n} windows of {seq_len + 1} tokens asked for, the stream holds {have}")
        self.n = have if n is None else n
        self._perm: tuple[int, torch.Tensor] | None = None

    def window(self, k: int) -> int:
        epoch, i = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            # mod 2^64: a seed past ~1.8e13 overflowed manual_seed at the first batch (the same order below it)
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return int(self._perm[1][i])

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Sequences first .. first + count − 1 of the run: LongTensor (count, T + 1)."""
        rows = [self.stream.get(self.window(k) * self.seq_len, self.seq_len + 1) for k in range(first, first + count)]
        return torch.from_numpy(np.stack(rows))


def token_sequences(
    source: str | os.PathLike,
    tokenizer,
    n_seqs: int,
    seq_len: int,
    *,
    split: str = "validation",
    seed: int = 0,
) -> torch.Tensor:
    """`n_seqs` sequences of `seq_len` tokens from `source` (documents joined by EOS, cut into consecutive windows,
    a seeded sample of windows in stream order). For GPTQ calibration and evaluation. LongTensor (n_seqs, seq_len).

    `tokenizer` is a `tokenizers.Tokenizer` or a tokenizer.json path. At most 16·n_seqs·seq_len tokens are read, so the
    result is the same however large the source.
    """
    if n_seqs <= 0 or seq_len <= 0:
        raise ValueError(f"n_seqs (--n-samples) and seq_len (--seq-len) must be positive, got {n_seqs}, {seq_len}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    eos = eos_id(tok, tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None)
    cap = 16 * n_seqs * seq_len
    ids: list[int] = []
    for batch in _batches(_doc_pieces(read_documents(source, split), tok), 64):  # a long document is read only
        for piece_ids, last in _encode_pieces(tok, batch):  # as far as `cap` needs
            ids.extend(piece_ids)
            if last:
                ids.append(eos)
        if len(ids) >= cap:
            break
    n_windows = min(len(ids), cap) // seq_len
    if n_windows < n_seqs:
        raise ValueError(f"data source {source!r} ({split}) has {len(ids)} tokens: only {n_windows} sequences of "
                         f"{seq_len}, {n_seqs} requested")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:n_seqs].sort().values
    flat = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    return flat[pick].clone()
