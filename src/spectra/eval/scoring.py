"""Token log-probabilities from any spectra model, computed only where they are needed.

Every scorer here answers one question: given token sequences, what is log p(x_t | x_<t) at a chosen set of positions,
and was x_t the greedy (argmax) choice? Two costs dominate on a CPU: the output head (V = 50304 columns, as large as
the whole body of a 20M model) and re-running shared prefixes. So:

- the model returns its final-norm hidden states (`model(idx, return_hidden=True)`) and the head is applied to the
  positions that are scored, in row chunks, with a float32 log-softmax:  log p(y | h) = (W h)_y − logsumexp(W h).
- `score_sequences` batches independent sequences right-padded (causal attention makes the padding invisible to
  earlier positions), sorted by length so a batch wastes little padding.
- `score_groups` packs a context and its k continuations into one row with a tree attention mask (each continuation
  sees the context and itself, positions restart after the context) and batches many such rows: the context is
  computed once and a batch holds many questions, so cost is |ctx| + Σ(|cont| − 1) tokens in few large calls
  instead of Σ(|ctx| + |cont|).

Works for anything `spectra.load` returns (FloatLM, latent TriLM, packed TriLM, QuantLM): each is a `Transformer`,
whose forward takes per-row positions and an attention mask and can return hidden states, whatever its linear
layers are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

HEAD_CHUNK_ROWS = 2048  # rows of the (rows, V) logit matrix materialised at once: 2048 x 50304 x 4 B = 412 MB


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
    head = model.lm_head
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
        h = model(inp.to(device), return_hidden=True)  # (B, T, C)
        logp, greedy = head_logprobs(head, h[rows, cols], torch.tensor(tgts, device=device))
        start = 0
        for i in idx:
            k = n_scored[i]
            out[i] = (logp[start : start + k].cpu(), greedy[start : start + k].cpu())
            start += k
    return out  # type: ignore[return-value]


CTX, PAD = -1, -2  # segment ids of a packed row: the shared context, padding; continuation j has segment j


def pack_group(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> tuple[list, list, list, list]:
    """One row for a context and its continuations: tokens ctx + c_0[:-1] + c_1[:-1] + ..., their positions
    (each continuation restarts at len(ctx)), segment ids, and per continuation the row index of the hidden state
    that predicts each of its tokens (the context's last token for the first one)."""
    tokens, pos, seg = list(context), list(range(len(context))), [CTX] * len(context)
    predictors = []
    for j, c in enumerate(continuations):
        start = len(tokens)
        tokens += c[:-1]
        pos += range(len(context), len(context) + len(c) - 1)
        seg += [j] * (len(c) - 1)
        predictors.append([len(context) - 1, *range(start, start + len(c) - 1)])
    return tokens, pos, seg, predictors


@torch.no_grad()
def score_groups(
    model: nn.Module, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *, batch_size: int = 16
) -> list[list[tuple[Tensor, Tensor]]]:
    """Scores of every continuation of every (context, continuations) group, each context computed once.

    Each group is packed into one row (`pack_group`); token i of a row may attend to token k <= i when k is in the
    context or in i's own continuation:  mask[i, k] = (k <= i) and (seg_k = CTX or seg_k = seg_i). Rows are batched
    `batch_size` at a time, right-padded (a padding query sees only itself). Cost: |ctx| + Σ(|c_j| − 1) tokens per
    group instead of Σ(|ctx| + |c_j|). Returns, per group and continuation, (logprobs (m,), greedy (m,)).
    """
    device = _device(model)
    for g, (ctx, conts) in enumerate(groups):
        if not ctx or not conts or not all(conts):
            raise ValueError(f"group {g}: needs a non-empty context and non-empty continuations")
    packed = [pack_group(ctx, conts) for ctx, conts in groups]
    order = sorted(range(len(groups)), key=lambda g: -len(packed[g][0]))
    out: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(groups)
    head = model.lm_head
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        T = len(packed[rows[0]][0])
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        pos = torch.zeros(len(rows), T, dtype=torch.long)
        seg = torch.full((len(rows), T), PAD, dtype=torch.long)
        for r, g in enumerate(rows):
            tokens, p, s, _ = packed[g]
            idx[r, : len(tokens)] = torch.tensor(tokens)
            pos[r, : len(tokens)] = torch.tensor(p)
            seg[r, : len(tokens)] = torch.tensor(s)
        ar = torch.arange(T)
        causal = ar[None, :, None] >= ar[None, None, :]  # (1, T, T): key k <= query i
        same = (seg[:, None, :] == CTX) | (seg[:, None, :] == seg[:, :, None])
        mask = (causal & same & (seg[:, None, :] != PAD)) | (ar[:, None] == ar[None, :])  # pads see themselves
        h = model(idx.to(device), positions=pos.to(device), mask=mask.to(device), return_hidden=True)  # (B, T, C)
        rr, cc, tgts = [], [], []
        for r, g in enumerate(rows):
            for c, pred in zip(groups[g][1], packed[g][3]):
                rr += [r] * len(pred)
                cc += pred
                tgts += c
        logp, greedy = head_logprobs(head, h[rr, cc], torch.tensor(tgts, device=device, dtype=torch.long))
        start = 0
        for g in rows:
            scores = []
            for c in groups[g][1]:
                scores.append((logp[start : start + len(c)].cpu(), greedy[start : start + len(c)].cpu()))
                start += len(c)
            out[g] = scores
    return out  # type: ignore[return-value]
