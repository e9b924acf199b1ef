"""Token log-probabilities from any spectra model, computed only where they are needed.

Every scorer here answers one question: given token sequences, what is log p(x_t | x_<t) at a chosen set of positions,
and was x_t the greedy (argmax) choice? Two costs dominate on a CPU: the output head (V = 50304 columns, as large as
the whole body of a 20M model) and re-running shared prefixes. So:

- `hidden_states` runs the model body only (the head is swapped out for the call) and the head is applied to the
  positions that are scored, in row chunks, with a float32 log-softmax:  log p(y | h) = (W h)_y − logsumexp(W h).
- `score_sequences` batches independent sequences right-padded (causal attention makes the padding invisible to
  earlier positions), sorted by length so a batch wastes little padding.
- `score_continuations` runs a shared context once into the KV cache, copies the cache to k rows and scores the k
  continuations in one batched call: cost |ctx| + Σ|cont| tokens instead of Σ(|ctx| + |cont|).

Works for anything `spectra.load` returns (FloatLM, latent TriLM, packed TriLM, QuantLM): they share the
`Transformer` body (`model(idx, cache=...)`, `model.new_cache(B, max_len)`, `model.lm_head`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

HEAD_CHUNK_ROWS = 2048  # rows of the (rows, V) logit matrix materialised at once: 2048 x 50304 x 4 B = 412 MB


@contextlib.contextmanager
def hidden_states(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model(idx, cache=...)` returns final-norm hidden states (B, T, C); yields the head."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def head_logprobs(head: nn.Module, h: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """h: (N, C) hidden states, targets: (N,) -> (log p(target), target == argmax), each (N,), float32 / bool."""
    logps, greedy = [], []
    for i in range(0, h.shape[0], HEAD_CHUNK_ROWS):
        logits = head(h[i : i + HEAD_CHUNK_ROWS]).float()  # (n, V)
        t = targets[i : i + HEAD_CHUNK_ROWS]
        lse = torch.logsumexp(logits, dim=-1)
        logps.append(logits.gather(1, t[:, None]).squeeze(1) - lse)
        greedy.append(logits.argmax(dim=-1) == t)
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logps), torch.cat(greedy)


def _device(model: nn.Module) -> torch.device:
    return model.embed_tokens.weight.device


@torch.no_grad()
def score_sequences(
    model: nn.Module, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], *, batch_size: int = 16
) -> list[tuple[Tensor, Tensor]]:
    """Per-token scores of the last `n_scored[i]` tokens of each sequence, each conditioned on everything before it.

    Sequence i (tokens x_0 .. x_{n-1}) is run as input x_0 .. x_{n-2}; the scored tokens are x_{n-k} .. x_{n-1},
    k = n_scored[i] (1 <= k <= n-1). Returns, per sequence, (logprobs (k,), greedy (k,)).
    """
    if len(seqs) != len(n_scored):
        raise ValueError(f"{len(seqs)} sequences but {len(n_scored)} n_scored values")
    for i, (s, k) in enumerate(zip(seqs, n_scored)):
        if not 1 <= k <= len(s) - 1:
            raise ValueError(f"sequence {i}: n_scored={k} must be in [1, len-1={len(s) - 1}]")
    device = _device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(seqs)
    with hidden_states(model) as head:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            T = len(seqs[idx[0]]) - 1
            inp = torch.zeros(len(idx), T, dtype=torch.long)
            rows, cols, tgts = [], [], []
            for r, i in enumerate(idx):
                s, k = seqs[i], n_scored[i]
                n = len(s) - 1
                inp[r, :n] = torch.tensor(s[:-1], dtype=torch.long)
                rows += [r] * k
                cols += range(n - k, n)
                tgts += s[len(s) - k :]
            h = model(inp.to(device))  # (B, T, C)
            logp, greedy = head_logprobs(head, h[rows, cols], torch.tensor(tgts, device=device))
            start = 0
            for i in idx:
                k = n_scored[i]
                out[i] = (logp[start : start + k].cpu(), greedy[start : start + k].cpu())
                start += k
    return out  # type: ignore[return-value]


@torch.no_grad()
def score_continuations(
    model: nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[tuple[Tensor, Tensor]]:
    """Scores of each continuation given one shared context (non-empty), the context run once.

    Continuation j = c_0 .. c_{m-1}: log p(c_0 | ctx) from the context's last hidden state, then c_1 .. c_{m-1} from
    a batched call over all continuations (right-padded) on k copies of the context's KV cache.
    Returns, per continuation, (logprobs (m,), greedy (m,)).
    """
    if not context:
        raise ValueError("score_continuations needs a non-empty context")
    device = _device(model)
    k = len(continuations)
    longest = max(len(c) for c in continuations)
    with hidden_states(model) as head:
        cache = model.new_cache(1, len(context) + longest - 1)
        h_last = model(torch.tensor([context], dtype=torch.long, device=device), cache=cache)[:, -1]  # (1, C)
        first = torch.tensor([c[0] for c in continuations], device=device)
        logp0, greedy0 = head_logprobs(head, h_last.expand(k, -1), first)
        rest_logp: list[Tensor] = [torch.zeros(0)] * k
        rest_greedy: list[Tensor] = [torch.zeros(0, dtype=torch.bool)] * k
        if longest > 1:
            cache = replace(cache, k=cache.k.repeat(1, k, 1, 1, 1), v=cache.v.repeat(1, k, 1, 1, 1))
            inp = torch.zeros(k, longest - 1, dtype=torch.long)
            rows, cols, tgts = [], [], []
            for j, c in enumerate(continuations):
                inp[j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                rows += [j] * (len(c) - 1)
                cols += range(len(c) - 1)
                tgts += c[1:]
            h = model(inp.to(device), cache=cache)  # (k, m-1, C)
            logp, greedy = head_logprobs(head, h[rows, cols], torch.tensor(tgts, device=device, dtype=torch.long))
            start = 0
            for j, c in enumerate(continuations):
                n = len(c) - 1
                rest_logp[j], rest_greedy[j] = logp[start : start + n].cpu(), greedy[start : start + n].cpu()
                start += n
    return [
        (torch.cat([logp0[j : j + 1].cpu(), rest_logp[j]]), torch.cat([greedy0[j : j + 1].cpu(), rest_greedy[j]]))
        for j in range(k)
    ]
