"""Choosing the next token from logits, and the stop-string bookkeeping of streamed text (rules in
`spectra.inference.generate`'s docstring). Shared by `generate` and the batched `spectra.inference.batch`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token id from a (V,) logit vector (see the module docstring for the rules)."""
    from spectra.packed.kernels import argmax, sample

    logits = logits.float().contiguous()
    if temperature == 0:
        return int(argmax(logits))  # torch.argmax's answer, an order of magnitude sooner
    return sample(logits, temperature, top_k, top_p, u=draw_u(generator))


def draw_u(generator: torch.Generator | None = None) -> float:
    """The uniform number in [0, 1) a sampled token is drawn with (float64, one per token from the request's
    generator): every path that samples (`sample_next`, `generate`'s one-call steps, the batched `Scheduler`) takes it
    here, so one seed gives the same tokens on each."""
    return float(torch.rand((), dtype=torch.float64, generator=generator))


def validate_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (may still become one)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest occurrence of any stop string, and whether there was one."""
    if not stops:
        return text, False
    hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:hit], True) if hit >= 0 else (text, False)


def settled(text: str, stops: Sequence[str], stopped: bool) -> int:
    """How much of `text` can be streamed now: all of it after a stop; else all but a trailing incomplete UTF-8
    character (U+FFFD) and, before it, a tail that may still become a stop string (`held_back`)."""
    if stopped:
        return len(text)
    base = text.rstrip("\ufffd")  # an incomplete character; what a stop string may still complete ends before it
    return len(base) - held_back(base, stops)


class TextDecoder:
    """`tokenizer.decode(ids)` of a growing token list, at a cost that does not grow with the list.

    Decoding the whole list after every token costs O(n) per token: 7 us at 64 tokens and 190 us at 2000 with the
    built-in BPE, per sequence, every step of a server with 16 long streams. Here the text of the tokens up to `_read`
    is kept (`_done`), and a new token decodes only the window from `_prefix` (one token before `_read`, so that a
    decoder that treats a text's first token specially, or joins neighbouring tokens, sees the same context as in the
    full text): the new text is the window's decoding after its first part's. The window is committed when its new
    text is complete (no U+FFFD: it ends at a character boundary), as text-generation servers do; a context token that
    decodes to nothing (a special token `decode` skips) takes the one before it too. `text(ids)` returns what
    `tokenizer.decode(ids)` returns for a byte-level BPE and a sentencepiece-style decoder (tested against it at every
    token)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._done, self._prefix, self._read = "", 0, 0

    def text(self, ids: Sequence[int]) -> str:
        """The decoding of `ids`, which extends the list of the previous call by any number of tokens."""
        tok, p, r = self.tok, self._prefix, self._read
        head = tok.decode(list(ids[p:r])) if r > p else ""
        while head == "" and p > 0:  # a context token that decodes to nothing (a skipped special token): the next
            p -= 1  # one would decode as a text's first (a sentencepiece decoder strips its space)
            head = tok.decode(list(ids[p:r]))
        window = tok.decode(list(ids[p:]))
        if not window.startswith(head):  # a decoder that rewrote the context: decode it all (exact, O(n))
            self._done, self._prefix, self._read = "", 0, 0
            return tok.decode(list(ids))
        new = window[len(head) :]
        if "\ufffd" not in new:
            self._done += new
            self._prefix, self._read = max(len(ids) - 1, 0), len(ids)
            return self._done
        return self._done + new
