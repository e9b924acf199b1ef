"""Perplexity and bits per byte of a model on a corpus, with a sliding window.

The documents of `source` (split) are tokenized as in training (`spectra.data`: no special tokens, each document
followed by EOS) into one stream x_0 .. x_{N-1}, with an EOS in front so the first document's first token is
predicted too. Every token after x_0 is predicted exactly once, from windows of at most `seq_len` input tokens that
advance by `stride` (HF's "perplexity of fixed-length models" scheme):

    window w scores x_{e_{w-1}} .. x_{e_w - 1}, with e_0 = 1, e_1 = min(1 + seq_len, N),
    e_w = min(e_{w-1} + stride, N), from the input x_{max(0, e_w - 1 - seq_len)} .. x_{e_w - 2};
    so a scored token sees at least seq_len − stride earlier tokens (stride = seq_len: disjoint windows;
    stride = 1: token t sees exactly min(t, seq_len) tokens, the most context and the most compute).

    NLL = −Σ_t log p(x_t | context),  loss = NLL / T,  ppl = exp(loss),  bits per byte = NLL / (ln 2 · bytes)

T is the number of scored tokens (N − 1, EOS separators included) and `bytes` the UTF-8 size of the documents.
The NLL and scored-token count of every window are returned too (`window_nll`, `window_tokens`): two models with
the same tokenizer are scored on the same windows, so their losses can be compared window by window (paired).
Windows are batched. Under `torch.distributed`, window w runs on rank w mod world_size; the per-window NLLs are
combined with one all-reduce, so every rank returns the same numbers as a single process would.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from spectra.eval.scoring import score_sequences


def token_stream(
    tokenizer, source: str | os.PathLike, split: str, max_tokens: int | None
) -> tuple[list[int], int, int]:
    """([EOS] + doc_0 + [EOS] + doc_1 + [EOS] ..., number of documents, UTF-8 bytes of those documents).

    With `max_tokens`, the stream holds at most that many tokens: whole documents while they fit, then the first
    tokens of the document that does not (its bytes counted from those tokens, decoded), so the budget is filled
    whatever the documents' lengths. (It used to stop before that document: a short first document followed by a long
    one left a few hundred tokens of a 65536-token budget, and a paired test of two windows; a review, 2026-12-07.)
    """
    from spectra.data import eos_id, read_documents
    from spectra.data.shards import encode_documents

    eos = eos_id(tokenizer)
    ids, n_docs, n_bytes = [eos], 0, 0
    batch: list[str] = []

    def flush() -> bool:
        """Append the batch's documents; False once the stream is full (a document did not fit)."""
        nonlocal n_docs, n_bytes
        for doc, doc_ids in zip(batch, encode_documents(tokenizer, batch)):
            if max_tokens is not None and len(ids) + len(doc_ids) + 1 > max_tokens:
                doc_ids = list(doc_ids[: max(0, max_tokens - len(ids))])  # the first tokens that fit
                if doc_ids:
                    ids.extend(doc_ids)
                    n_docs += 1
                    n_bytes += len(tokenizer.decode(doc_ids).encode("utf-8"))
                batch.clear()
                return False
            ids.extend(doc_ids)
            ids.append(eos)
            n_docs += 1
            n_bytes += len(doc.encode("utf-8"))
        batch.clear()
        return True

    for doc in read_documents(source, split):
        batch.append(doc)
        if (len(batch) == 64 or max_tokens is not None) and not flush():
            break
    flush()
    return ids, n_docs, n_bytes


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) per window: tokens start .. end-1 are its sequence, the last n_scored are scored."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    out, prev_end = [], 1
    while prev_end < n_tokens:
        end = min(prev_end + (seq_len if prev_end == 1 else stride), n_tokens)
        start = max(0, end - 1 - seq_len)
        out.append((start, end, end - prev_end))
        prev_end = end
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: str | os.PathLike = "builtin",
    *,
    split: str = "validation",
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity and bits per byte of `model` on `source` (see module docstring).

    `tokenizer`: a `tokenizers.Tokenizer` or a tokenizer.json path. `seq_len` defaults to the model's max_seq_len,
    `stride` to `seq_len` (disjoint windows; a smaller stride gives every token more context at more cost).
    """
    from spectra.data import check_vocab, load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    check_vocab(tok, model.config, what="the evaluation tokenizer")
    seq_len = int(seq_len or model.config.max_seq_len)
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    stride = int(stride or seq_len)
    ids, n_docs, n_bytes = token_stream(tok, source, split, max_tokens)
    if len(ids) < 2:
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens} leaves nothing to score: at least 2 tokens are needed")
        raise ValueError(f"{source!r} ({split}) has no text to score")
    spans = windows(len(ids), seq_len, stride)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = list(range(len(spans)))[rank::world]
    window_nll = torch.zeros(len(spans), dtype=torch.float64)  # each rank fills its own windows, zeros elsewhere
    step = batch_size * 8
    for i in tqdm(range(0, len(mine), step), desc="perplexity", disable=not progress or len(mine) <= step):
        chunk = mine[i : i + step]
        seqs, n_scored_each = [ids[spans[w][0] : spans[w][1]] for w in chunk], [spans[w][2] for w in chunk]
        scores = score_sequences(model, seqs, n_scored_each, batch_size=batch_size)
        for w, (logp, _) in zip(chunk, scores, strict=True):
            window_nll[w] = -float(logp.double().sum())
    if world > 1:
        device = model.embed_tokens.weight.device
        window_nll = window_nll.to(device)
        torch.distributed.all_reduce(window_nll)  # every window was scored on exactly one rank
        window_nll = window_nll.cpu()
    n_scored = sum(k for _, _, k in spans)
    nll = float(window_nll.sum())
    loss = nll / n_scored
    return {
        "source": str(source),
        "split": split,
        "documents": n_docs,
        "bytes": n_bytes,
        "tokens": n_scored,
        "seq_len": seq_len,
        "stride": stride,
        "windows": len(spans),
        "nll": nll,
        "loss": loss,
        "ppl": _exp(loss),
        "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "window_nll": window_nll.tolist(),
        "window_tokens": [k for _, _, k in spans],
    }


def _exp(loss: float) -> float:
    """exp(loss), inf past float's range (a diverged model: math.exp raises OverflowError above ~709.78 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
