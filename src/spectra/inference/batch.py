"""Batched decoding: B sequences, each at its own position with its own KV cache, advanced together one token a step.

A decode step of a single sequence streams every weight matrix from memory to multiply one vector; B sequences
decoded together multiply a (B, C) matrix instead, so the weights are read once for all B tokens and the aggregate
token rate grows with B until the arithmetic, not the memory, is the bound. Everything else in a step is per sequence:
token i of the batch sits at position pos_i of its own cache slot, gets RoPE at pos_i, and attends over its own
pos_i + 1 keys. Sequences join (prefill into a free slot) and leave (free the slot) between steps.

`BatchDecoder` holds the slots, one preallocated `KVCache` of batch 1 each (so a slot is also what the model's own
forward and the batch-1 `Decoder` take), and runs a step two ways:

- a packed TriLM with compiled kernels: one C call for all layers (`_kernels.decode_layers_batch`), the GEMM kernels
  over all B rows and, for each row, the same norm / RoPE / attention / SiLU functions as the batch-1 `Decoder`'s
  call with one row.
  The packed kernels' output rows do not depend on the other rows (integer dot products, per-row scales, a fixed
  epilogue), so every row of a batched step is bit-identical to decoding that sequence alone with `Decoder`;
- any other model `spectra.load` opens: the model's own modules on (B, 1, C), per-row RoPE, and attention per sequence
  over its own cache slice (`scaled_dot_product_attention`, as `Attention.forward` does for one token). The row
  results equal a lone sequence's as far as the linear layers' matmuls give each row the same rounding at any B.

`Scheduler` is continuous batching on top: requests wait in a queue, are admitted into free slots between steps,
prefilled in fixed chunks (a long prompt costs the running streams at most one chunk per step, and the chunking of a
prompt does not depend on what else runs, so neither do its results; by default a step takes the waiting prompts'
next chunks in arrival order while their rows fit in one chunk's budget, so a burst of short prompts is prefilled in
a few steps rather than one prompt a step), sampled with their own parameters and generator,
and finish on their own stop condition or on cancellation. `generate_batch` runs it to completion for a list of
prompts; `spectra.serve` runs it behind an HTTP server.

Pipelined steps (`Scheduler(pipeline=True)`: the server's engine and `generate_batch`; the C path with an int8 output
layer): each step is recorded and run on the kernels' own thread (`csrc/defer.h`), the next one launched before the
bookkeeping of the one before (its tokens' text, stop strings, events), which then runs beside it; the next step's
token ids are read from this one's picks in C (`take_tokens`), so the kernels never wait for Python, and the Python
thread works on the step's jobs whenever it waits. A sequence that a stop string or end-of-sequence ends has a row in
the step already launched, dropped (`Scheduler._pipelined_step`). Tokens are the serial steps' (tested).

Prefix reuse (`prefix_cache`, on by default; the C path only): a freed slot keeps what its cache holds, and the
scheduler remembers which tokens those positions are. A new request takes the free slot whose tokens share the longest
prefix with its prompt (ties: the slot freed longest ago) and starts its prefill after that prefix, or before its
prompt's last token when the whole prompt is held (its logits give the first token). A conversation's next turn
resends the earlier turns, and a shared system prompt opens every request: both then cost only their new tokens, as
with llama.cpp's server (`cache_prompt`) and vLLM's prefix caching. Between sequences that hold slots at once, a
prompt that starts with what an earlier-admitted sequence's slot holds gets those positions copied instead of
computed, and one that starts with what an earlier one is still prefilling waits for it, so a burst of requests with
one system prompt computes it once (`Scheduler._share_prefixes`). On the C path a position's keys and values are the
same bits whatever else ran in its steps and however its prompt was cut into chunks, so reuse changes no token; on the
model-modules path they can differ in the last bits with the batch, so it stays off there.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectra.data.tokenizer import load_tokenizer
from spectra.inference.decode import KV_KINDS, Decoder, torch_threads_for, unsupported_reason
from spectra.inference.sampling import TextDecoder, cut_at_stop, draw_u, sample_next, settled, validate_sampling
from spectra.model import kv_load, kv_store
from spectra.packed.kernels import argmax_logsumexp, default_threads, logsumexp, sample_rows, serial_torch


def _head_rows(n_decode: int, prefills, finals: Sequence[bool] | None = None) -> list[int]:
    """The rows of a pass that go to the output layer: its n_decode decode rows, then the last position of each
    prefill chunk (of those whose `finals` flag is set, where given), counted in the pass's row order."""
    heads, at = [*range(n_decode)], n_decode
    for i, (_, ids) in enumerate(prefills):
        at += len(ids)
        if finals is None or finals[i]:
            heads.append(at - 1)
    return heads


class BatchDecoder:
    """`max_batch` KV-cache slots of `max_len` positions for `model`, and a step that advances any subset of them."""

    def __init__(
        self, model: nn.Module, max_batch: int, max_len: int | None = None, kv_dtype: torch.dtype | None = None
    ) -> None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "new_cache") or not hasattr(model, "layers"):
            raise ValueError(f"batched decoding needs a spectra Transformer, got a {type(model).__name__}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in 1..max_seq_len={cfg.max_seq_len}, got {max_len}")
        self.model, self.config, self.max_batch, self.max_len = model, cfg, max_batch, max_len
        model.eval()
        # Zero-filled by calloc for large sizes: a slot's pages are touched only as its positions are written.
        # kv_dtype: the slots' cache dtype (default the model's, `Transformer.new_cache`); torch.float16 halves it.
        self.caches = [model.new_cache(1, max_len, kv_dtype) for _ in range(max_batch)]
        self._free = list(range(max_batch - 1, -1, -1))
        self.kernel = self._build_kernel()

    @property
    def n_threads(self) -> int:
        """Threads the packed kernels use for a step (their `n_threads`, else torch's count)."""
        dec = self.kernel["decoder"] if self.kernel is not None else None
        return (dec._threads if dec is not None else None) or default_threads()

    # ---- slots ---------------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_slot_ids(self) -> list[int]:
        return list(self._free)

    def acquire(self, slot: int | None = None, keep: int = 0) -> int:
        """A free slot (`slot`, or the last one released), its cache starting after its first `keep` positions,
        which it keeps (the caller knows what they hold: `Scheduler`'s prefix reuse)."""
        if not self._free:
            raise RuntimeError("every KV-cache slot is in use")
        if slot is not None and slot not in self._free:
            raise ValueError(f"slot {slot} is not free")
        if not 0 <= keep <= self.max_len:
            raise ValueError(f"keep must be in 0..{self.max_len}, got {keep}")
        slot = self._free.pop() if slot is None else self._free.pop(self._free.index(slot))
        self.caches[slot].pos = keep
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)

    def pos(self, slot: int) -> int:
        return self.caches[slot].pos

    # ---- prefill -------------------------------------------------------------------------------------------------
    def prefill(self, slot: int, ids: Sequence[int]) -> Tensor:
        """Run `ids` through the model into the slot's cache after what it holds; the last position's logits (V,)."""
        cache = self.caches[slot]
        if cache.pos + len(ids) > self.max_len:
            raise ValueError(f"{cache.pos + len(ids)} positions exceed the slot's {self.max_len}")
        device = self.model.embed_tokens.weight.device
        idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
        with torch.inference_mode():
            if self.kernel is not None:  # the C rows: what `generate` does for a packed TriLM (bit for bit)
                with serial_torch():
                    return self.kernel["decoder"].prefill(idx, cache)[0, -1]
            return self.model(idx, cache=cache)[0, -1]

    def copy_rows(self, src: int, dst: int, a: int, b: int) -> None:
        """Positions [a, b) of slot src's keys and values into slot dst, whose cache holds a positions; it then holds
        b (`Scheduler`'s prefix sharing: the same bytes, so the same results as prefilling them)."""
        d = self.caches[dst]
        if d.pos != a or not 0 <= a <= b <= min(self.caches[src].pos, self.max_len):
            raise ValueError(f"cannot copy positions {a}..{b} of slot {src} into slot {dst} at position {d.pos}")
        for name in ("k", "v"):
            getattr(d, name)[:, :, :, a:b].copy_(getattr(self.caches[src], name)[:, :, :, a:b])
        d.pos = b

    def prefill_logits(self, slot: int, ids: Sequence[int]) -> Tensor:
        """`prefill`, with the logits of every position of `ids` (len(ids), V) float32: for scoring a prompt."""
        cache = self.caches[slot]
        if cache.pos + len(ids) > self.max_len:
            raise ValueError(f"{cache.pos + len(ids)} positions exceed the slot's {self.max_len}")
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.model.embed_tokens.weight.device)
        with torch.inference_mode():
            if self.kernel is not None:
                with serial_torch():
                    return self.kernel["decoder"].prefill_logits(idx, cache)
            return self.model(idx, cache=cache)[0].float()

    # ---- a decode step with prefill chunks in it -----------------------------------------------------------------
    def step_with_prefill(
        self, slots: Sequence[int], tokens: Sequence[int], prefills: Sequence[tuple[int, Sequence[int]]]
    ) -> tuple[Tensor | None, list[Tensor]]:
        """`step(slots, tokens)` and `prefill(slot, ids)` for each (slot, ids) of `prefills`, in one pass over the
        weights when the C path has room for all the rows (decode rows, then each chunk's positions): the GEMMs see
        one larger batch instead of several small ones. Rows do not depend on one another (`Rows`), so the results
        equal the separate calls bit for bit. Returns (the step's logits (B, V) or None without slots, the last-
        position logits (V,) of each prefill)."""
        return self.step_rows(slots, tokens, prefills)[:2]

    def step_rows(
        self, slots: Sequence[int], tokens: Sequence[int], prefills: Sequence[tuple[int, Sequence[int]]] = (), *,
        argmax: bool = False, lse: bool = False, logits: bool = True, copy: bool = True,
    ) -> tuple[Tensor | None, list[Tensor | None], Tensor | None, Tensor | None, Tensor | None]:
        """`step_with_prefill`, plus the argmax (`argmax` or `lse`), log-sum-exp (`lse`) and the logit at the argmax
        (either) of each decode row's logits (None without slots or when not asked): (logits (B, V) float32 or None,
        prefill logits, argmax (B,), lse (B,), top (B,)). On the C path the statistics come from the same C call as the
        logits (`Decoder.head`), and `logits=False` (with `argmax` or `lse`) skips writing the logits: the decode
        rows' and the prefill chunks' logits are then None (elsewhere they are returned anyway). `copy=False` (the
        scheduler's steps): the results may be views of buffers the next step overwrites."""
        n_rows = len(slots) + sum(len(ids) for _, ids in prefills)
        kern = self.kernel
        if kern is None or n_rows > kern["rows"].n or (not slots and not prefills):
            pre = [self.prefill(slot, ids) for slot, ids in prefills]
            out = self.step(slots, tokens).float().contiguous() if slots else None
            idx = out_lse = top = None
            if out is not None and (argmax or lse):
                idx, out_lse = argmax_logsumexp(out, with_lse=lse, n_threads=self.n_threads)
                top = out.gather(1, idx.view(-1, 1)).view(-1)
            return out, pre, idx, out_lse, top
        self._check_rows(slots, tokens, prefills)
        with torch.inference_mode(), serial_torch():
            res = self._run_rows(slots, tokens, prefills, argmax=argmax, lse=lse, logits=logits)
            if copy:
                res = tuple(None if t is None else t.clone() for t in res)
        y, idx, out_lse, top = res
        B = len(slots)
        pre = list(y[B:]) if y is not None else [None] * len(prefills)
        if not slots:
            return None, pre, None, None, None
        return (None if y is None else y[:B]), pre, *(None if t is None else t[:B] for t in (idx, out_lse, top))

    def _check_rows(self, slots: Sequence[int], tokens: Sequence[int], prefills) -> None:
        """What `step` and `step_with_prefill` refuse: a token count that is not one per decode slot, a slot used
        twice (as a decode row or a prefill chunk), a slot not in use, or one without room for its new positions."""
        if len(slots) != len(tokens):
            raise ValueError(f"need one token per slot, got {len(slots)} slots and {len(tokens)} tokens")
        if len(set(slots) | {s for s, _ in prefills}) != len(slots) + len(prefills):
            raise ValueError("each slot may appear once in a step, as a decode row or as one prefill chunk")
        for s, n in [*((s, 1) for s in slots), *((s, len(ids)) for s, ids in prefills)]:
            if s in self._free:
                raise ValueError(f"slot {s} is not in use")
            if self.caches[s].pos + n > self.max_len:
                raise ValueError(f"slot {s} is full: {self.caches[s].pos} + {n} positions exceed its {self.max_len}")

    def _run_rows(
        self, slots: Sequence[int], tokens: Sequence[int], prefills, *, argmax: bool = False, lse: bool = False,
        logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The C path for decode rows (slots[i] at its next position) then each prefill chunk's positions, in one
        `Rows` pass; (logits (B + len(prefills), V): one per decode row, then each chunk's last position; their argmax,
        logsumexp and argmax's logit when asked, `Decoder.head`, which may leave the logits out: `logits`). The rows'
        token ids, positions and cache addresses go into one kept int64 array (numpy) and the blocks take them by
        address (`Rows.run_ptrs`); with an int8 head the output layer writes into kept buffers, so the logits returned
        are views valid until the next step. A 99m step of 16 rows
        spent 0.2 ms (7 %) in about twenty torch ops (index tensors, index_select, allocations, slices), each run cold
        after the weight stream."""
        kern = self.kernel
        dec, rows = kern["decoder"], kern["rows"]
        io, R, cache = kern["io"], *self._fill_rows(kern["io_np"], slots, tokens, prefills)
        if rows._embed_c and hasattr(dec._ext, "embed_rows"):
            base, n = io.data_ptr(), io.shape[1]
            rows.run_ptrs(R, base, base + 8 * n, base + 16 * n, base + 24 * n, cache)
        else:
            rows.run(io[0, :R], io[1, :R], io[2, :R], io[3, :R], cache)
        self._advance(slots, prefills)
        heads = _head_rows(len(slots), prefills)
        m, x, out = len(heads), rows.x, (kern["y"], kern["idx"], kern["lse"], kern["top"])
        if heads[-1] == m - 1:  # the output layer's rows lead the pass
            return dec.head(x[:m], argmax=argmax, lse=lse, logits=logits, out=out)
        kern["heads_np"][:m] = heads  # each chunk's last position (`Decoder.head` picks them out)
        return dec.head(x, argmax=argmax, lse=lse, logits=logits, out=out, rows=kern["heads"][:m])

    def _fill_rows(self, io, slots: Sequence[int], tokens: Sequence[int], prefills) -> tuple[int, Any]:
        """The rows of a pass into `io` (numpy int64 [4, n]): token ids, positions, key and value cache addresses of
        the decode rows (slots[i] at its next position), then each prefill chunk's positions. (row count, a cache of
        the rows' layout)."""
        kern, caches = self.kernel, self.caches
        row_slots = list(slots) + [s for s, ids in prefills for _ in ids]
        pos = [caches[s].pos for s in slots]
        for s, ids in prefills:
            pos += range(caches[s].pos, caches[s].pos + len(ids))
        R = len(row_slots)
        io[0, :R] = list(tokens) + [t for _, ids in prefills for t in ids]
        io[1, :R] = pos
        io[2, :R] = [kern["k_addr"][s] for s in row_slots]
        io[3, :R] = [kern["v_addr"][s] for s in row_slots]
        return R, caches[row_slots[0]]

    def _advance(self, slots: Sequence[int], prefills) -> None:
        """The caches' positions after a pass of `_fill_rows`' rows."""
        for s in slots:
            self.caches[s].pos += 1
        for s, ids in prefills:
            self.caches[s].pos += len(ids)

    # ---- steps run on the kernels' deferred-call thread (`Scheduler`'s pipelined steps) ---------------------------
    @property
    def can_launch(self) -> bool:
        """Whether `launch` runs here: the C path with its embedding rows and output layer in C (an int8 lm_head) and
        an extension that records calls (`csrc/defer.h`)."""
        kern = self.kernel
        if kern is None or not hasattr(kern["decoder"]._ext, "defer_begin") or not kern["rows"]._embed_c:
            return False
        dec = kern["decoder"]
        if dec.model.lm_head is not dec._head_mod:
            dec._head_setup()
        return dec._c_head is not None

    def _launch_sets(self) -> list[dict]:
        """Two sets of a launched step's buffers (`launch`), used in turn: a step's results stay readable while the
        next one runs. The first reuses `_run_rows`' buffers."""
        kern = self.kernel
        if kern["sets"] is None:
            n, V = kern["rows"].n, self.model.lm_head.out_features
            sets = []
            for i in range(2):
                t = {"io": kern["io"] if i == 0 else torch.zeros(4, n, dtype=torch.int64),
                     "y": kern["y"] if i == 0 else torch.empty(n, V),
                     "idx": kern["idx"] if i == 0 else torch.empty(n, dtype=torch.int64),
                     "lse": kern["lse"] if i == 0 else torch.empty(n), "top": kern["top"] if i == 0 else torch.empty(n),
                     "heads": torch.zeros(n, dtype=torch.int64), "take": torch.full((n,), -1, dtype=torch.int64),
                     "chosen": torch.zeros(n, dtype=torch.int64),
                     "T": torch.zeros(n, dtype=torch.float64), "k": torch.zeros(n, dtype=torch.int64),
                     "p": torch.ones(n, dtype=torch.float64), "u": torch.zeros(n, dtype=torch.float64)}  # fmt: skip
                t.update({f"{k}_np": t[k].numpy() for k in ("io", "heads", "take", "T", "k", "p", "u", "chosen", "idx",
                                                            "lse", "top")})  # (numpy slices cost a tenth of torch's)
                sets.append(t)
            kern["sets"] = sets
        return kern["sets"]

    def launch(
        self, slots: Sequence[int], tokens: Sequence[int | None], prefills: Sequence[tuple[int, Sequence[int]]],
        finals: Sequence[bool], picks: Sequence[tuple[float, int | None, float | None, float]], *,
        take: Sequence[int] = (), after: Launched | None = None, lse: bool = False, logits: bool = False,
    ) -> Launched:
        """`step_rows` recorded and handed to the kernels' deferred-call thread (`csrc/defer.h`), which runs it after
        the steps launched before; returns at once with the step's `Launched` (`wait` for it). Decode row i feeds
        tokens[i] to slots[i], or, where tokens[i] is None, the token that the step `after` picked for its head row
        take[i] (read when this step runs: the two are launched before the first has run). A prefill chunk's last
        position goes to the output layer where finals says so (its prompt ends), after the decode rows. Every head
        row (decode rows, then the finals) picks its next token in the same list: picks[j] = (temperature, top_k,
        top_p, u), temperature 0 its argmax, else `kernels.sample`'s draw with u (the same token as `sample_next`
        with a generator that gives u). The cache positions advance now. The results are `Launched.set`'s buffers,
        valid until the launch after next. Wait for every launch before dropping this decoder: the step writes into
        its buffers and caches."""
        kern = self.kernel
        dec, rows = kern["decoder"], kern["rows"]
        ext = dec._ext
        self._check_rows(slots, [0] * len(slots), prefills)
        B = len(slots)
        R = B + sum(len(ids) for _, ids in prefills)
        if not 0 < R <= rows.n:
            raise ValueError(f"{R} rows for a launch of at most {rows.n}")
        taking = any(t is None for t in tokens)
        if taking and (after is None or len(take) != B or any(not 0 <= j < after.m for t, j in zip(tokens, take)
                                                              if t is None)):
            raise ValueError("a row without its token needs `after` and its head row there in `take`")
        if len(picks) != B + sum(map(bool, finals)) or len(finals) != len(prefills):
            raise ValueError(f"need one final flag per prefill ({len(prefills)}) and one pick per head row")
        S = self._launch_sets()[kern["turn"]]  # (not the set of the step launched before, which may still run)
        _, cache = self._fill_rows(S["io_np"], slots, [0 if t is None else t for t in tokens], prefills)
        heads = _head_rows(B, prefills, finals)
        m = len(heads)
        if taking:
            S["take_np"][:B] = [-1 if t is not None else j for t, j in zip(tokens, take)]
        S["heads_np"][:m] = heads
        V = self.model.lm_head.out_features
        S["T_np"][:m] = [p[0] for p in picks]
        S["k_np"][:m] = [0 if p[1] is None or p[1] >= V else p[1] for p in picks]
        S["p_np"][:m] = [1.0 if p[2] is None else p[2] for p in picks]
        S["u_np"][:m] = [p[3] for p in picks]
        logits = logits or any(p[0] != 0 for p in picks)
        nt = self.n_threads
        ext.defer_begin()
        try:
            if taking:
                ext.take_tokens(S["io"].data_ptr(), after.set["chosen"].data_ptr(), S["take"].data_ptr(), B)
            base, n = S["io"].data_ptr(), S["io"].shape[1]
            rows.run_ptrs(R, base, base + 8 * n, base + 16 * n, base + 24 * n, cache)
            if m:
                dec.head(rows.x, argmax=True, lse=lse, logits=logits,
                         out=(S["y"], S["idx"], S["lse"], S["top"]), rows=S["heads"][:m])
                ext.pick_tokens(dec._path_id, nt, S["y"].data_ptr() if logits else 0, V, S["idx"].data_ptr(), 0, m,
                                S["T"].data_ptr(), S["k"].data_ptr(), S["p"].data_ptr(), S["u"].data_ptr(),
                                S["chosen"].data_ptr())
        except BaseException:
            ext.defer_abort()
            raise
        ticket = ext.defer_end()
        kern["turn"] ^= 1
        self._advance(slots, prefills)
        return Launched(ticket, S, m, lse)

    def wait(self, step: Launched) -> None:
        """Block until the launched `step` has run (MemoryError / ValueError as its calls would have raised),
        working on its kernels' jobs meanwhile where they run on more than one thread."""
        self.kernel["decoder"]._ext.defer_wait(step.ticket, self.n_threads > 1)

    # ---- one decode step -----------------------------------------------------------------------------------------
    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """Feed token tokens[i] to the sequence in slots[i] at its next position; logits (B, V), row i for slots[i]."""
        if not slots:
            raise ValueError("need at least one slot to step")
        self._check_rows(slots, tokens, ())
        with torch.inference_mode():
            if self.kernel is not None:
                with serial_torch():
                    return self._run_rows(slots, tokens, ())[0].clone()
            return self._step_modules(slots, tokens)

    def _build_kernel(self):
        """The C path (`Decoder.rows`: scratch for max(max_batch, PREFILL_ROWS) rows) and the slots' cache pointers,
        or None when the model is not a packed TriLM that `Decoder` runs, the extension predates it, or the caches are
        of a dtype the C calls do not take (bfloat16: the model's own modules run them, as `generate` does)."""
        model = self.model
        if unsupported_reason(model) is not None or self.caches[0].k.dtype not in KV_KINDS:
            return None
        dec = Decoder(model)
        if not hasattr(dec._ext, "decode_layer_batch"):
            return None
        rows = dec.rows(self.max_batch + Decoder.PREFILL_ROWS)  # a step and a prefill chunk
        io = torch.zeros(4, rows.n, dtype=torch.int64)  # `_run_rows`: token ids, positions, k / v addresses
        heads = torch.zeros(rows.n, dtype=torch.int64)  # `_run_rows`: the rows the output layer takes
        V = model.lm_head.out_features
        return {
            "decoder": dec, "rows": rows,
            "k_addr": [c.k.data_ptr() for c in self.caches], "v_addr": [c.v.data_ptr() for c in self.caches],
            "io": io, "io_np": io.numpy(), "y": torch.empty(rows.n, V), "idx": torch.empty(rows.n, dtype=torch.int64),
            "lse": torch.empty(rows.n), "top": torch.empty(rows.n), "heads": heads, "heads_np": heads.numpy(),
            "sets": None, "turn": 0,  # `launch`'s two sets of buffers, made on first use
        }  # fmt: skip

    def _step_modules(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        from spectra.model import apply_rope

        model, cfg = self.model, self.config
        B, H, D = len(slots), cfg.n_heads, cfg.head_dim
        device = model.embed_tokens.weight.device
        x = model.embed_tokens(torch.tensor(list(tokens), dtype=torch.long, device=device).view(B, 1))  # (B, 1, C)
        pos = torch.tensor([self.caches[s].pos for s in slots], dtype=torch.long, device=device)
        cos = model.rope_cos[pos].to(x.dtype).view(B, 1, 1, D)  # row b rotated at its own position
        sin = model.rope_sin[pos].to(x.dtype).view(B, 1, 1, D)
        caches = [self.caches[s] for s in slots]
        for li, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
            k = attn.k_proj(h).view(B, 1, H, D).transpose(1, 2)
            v = attn.v_proj(h).view(B, 1, H, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            ys = []
            for b, c in enumerate(caches):  # each row attends over its own positions 0..pos
                p = c.pos
                kv_store(c.k[li, :, :, p : p + 1], k[b : b + 1])
                kv_store(c.v[li, :, :, p : p + 1], v[b : b + 1])
                # a float16 cache: stored rounded, widened exactly; q8: s * a (Attention.forward)
                ck, cv = kv_load(c.k[li, :, :, : p + 1], q.dtype), kv_load(c.v[li, :, :, : p + 1], q.dtype)
                ys.append(F.scaled_dot_product_attention(q[b : b + 1], ck, cv))
            y = torch.cat(ys).transpose(1, 2).reshape(B, 1, H * D)  # (B, 1, H*D)
            x = x + attn.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for c in caches:
            c.pos += 1
        return model.lm_head(model.norm(x))[:, 0]  # (B, V)


@dataclass
class _Flight:
    """A `Scheduler`'s launched step: its decode rows' requests (row i), its chunks (request, start, end, head row
    or None), the head row of each request it gives a token (by id), and the positions it writes per slot."""

    step: Launched
    decode: list
    chunks: list
    owed: dict
    rows: dict


@dataclass
class Launched:
    """A step handed to the deferred-call thread (`BatchDecoder.launch`): its ticket and buffers (`set`: "chosen",
    "idx", "lse", "top", "y", first m rows), its m head rows, and whether it computes their log-sum-exps."""

    ticket: int
    set: dict
    m: int
    lse: bool


# ---- sequences and the scheduler ---------------------------------------------------------------------------------


@dataclass
class Request:
    """One sequence to generate: token ids and how to sample and stop (see `spectra.inference.generate`)."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    stop_at_eos: bool = True
    logprobs: int | None = None  # also report the chosen token's log-probability and this many top alternatives
    frequency_penalty: float = 0.0  # OpenAI's: logit_j - c_j * frequency_penalty - (c_j > 0) * presence_penalty,
    presence_penalty: float = 0.0  # c_j the count of token j among the tokens generated so far (`penalize`)
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to these token ids' logits before every pick
    echo: bool = False  # also score the prompt: prompt_logprobs (its chunks then run on their own, never reused)
    on_event: Callable[[dict[str, Any]], None] | None = None  # called from the scheduler's thread
    # filled in by the scheduler
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)  # echo: one per prompt token, the first None
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    slot: int | None = None
    generator: torch.Generator | None = None
    detok: TextDecoder | None = None
    prefilled: int = 0
    cached: int = 0  # prompt tokens whose keys and values it did not compute: held by its slot or copied (reuse)
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def penalized(self) -> bool:
        """Whether its next token's logits take a frequency or presence penalty (it has generated a token)."""
        return bool(self.tokens) and (self.frequency_penalty != 0 or self.presence_penalty != 0)

    @property
    def own_logits(self) -> bool:
        """Whether its next pick needs its own logits (a penalty or a logit bias), not the step's shared picks."""
        return self.penalized or bool(self.logit_bias)

    def rng(self) -> torch.Generator:
        """The request's generator, seeded with `seed` at its first sampled token."""
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return self.generator


SHARE_MIN_ROWS = 16  # positions a prompt must stand to gain before it waits for another's prefill (`_share_prefixes`)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items `a` and `b` share: a binary search over slice comparisons, which run in C (a slot of
    2048 positions checked against a prompt in a dozen comparisons rather than 2048 steps of Python)."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the answer is at most hi
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def logprob_entry(x: Tensor, token: int, k: int, lse: float) -> dict[str, Any]:
    """{"token", "logprob", "top"} of `token` under the logits row x (V,) whose log-sum-exp is lse, with the k most
    likely tokens as (id, log-probability) pairs: a generated token's (`Request.token_logprobs`) or a prompt token's."""
    top = torch.topk(x, min(k, x.numel())) if k > 0 else None
    return {"token": token, "logprob": float(x[token]) - lse,
            "top": [] if top is None else [(int(i), float(v) - lse) for v, i in zip(top.values, top.indices)]}


def adjusted_logits(req: Request, logits: Tensor) -> Tensor:
    """A request's logits row (V,) with its penalties (`penalize`), then its logit bias added, as a new float32 row."""
    out = penalize(logits, req.tokens, req.frequency_penalty, req.presence_penalty) if req.penalized else (
        logits.float().clone())
    if req.logit_bias:
        ids = torch.tensor(list(req.logit_bias), dtype=torch.long)
        out[ids] += torch.tensor(list(req.logit_bias.values()), dtype=torch.float32)
    return out


def penalize(logits: Tensor, tokens: Sequence[int], frequency: float, presence: float) -> Tensor:
    """OpenAI's frequency and presence penalties on one row of logits (V,), as a new float32 row: logit_j -
    c_j * frequency - (c_j > 0) * presence, c_j the count of token j in `tokens` (the ones generated so far)."""
    out = logits.float().clone()
    ids, counts = torch.tensor(list(tokens), dtype=torch.long).unique(return_counts=True)
    out[ids] -= counts.float() * frequency + presence
    return out


class Scheduler:
    """Continuous batching over a `BatchDecoder`: `submit` requests, call `step` until `idle` (module docstring).

    Events handed to a request's `on_event`: {"type": "token", "token", "text" (new final text, may be ""),
    "logprob"?}, then one {"type": "done", "finish_reason"} ("length" | "eos" | "stop" | "cancelled" | "error").
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        prefill_chunk: int | None = 256,
        prefill_chunks_per_step: int | None = None,
        kv_dtype: torch.dtype | None = None,
        prefix_cache: bool = True,
        pipeline: bool = False,
    ) -> None:
        self.decoder = BatchDecoder(model, max_batch, max_len, kv_dtype)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        self.prefill_chunk = prefill_chunk
        self.prefill_chunks_per_step = prefill_chunks_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # holding a slot: prefilling (prefilled < len(prompt)) or decoding
        self.eos = getattr(self.decoder.config, "eos_token_id", None)
        self.stats = {"steps": 0, "generated": 0, "prefilled": 0, "finished": 0, "cached": 0}
        # Prefix reuse (module docstring), on the C path only: there a row's keys and values are the same bits
        # however its prompt was cut into chunks and whatever else ran beside it, so reusing them cannot change a
        # token. held[slot]: the tokens at the free slot's first positions; released[slot]: when it was freed.
        self.prefix_cache = prefix_cache and self.decoder.kernel is not None
        self.held: dict[int, list[int]] = {}
        self._released: dict[int, int] = {}
        # Pipelined steps (`_pipelined_step`): the step launched and not yet accepted, the positions per slot that
        # launched steps still have to write, and the finished sequences whose slots wait for those writes.
        self.pipeline = pipeline
        self._flight: _Flight | None = None
        self._busy: dict[int, int] = {}
        self._zombies: list[tuple[int, Request, str]] = []

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self._flight is None

    def __del__(self) -> None:
        # A launched step writes into this scheduler's buffers and caches: they must outlive it.
        flight = getattr(self, "_flight", None)
        if flight is not None:
            try:
                self.decoder.wait(flight.step)
            except Exception:
                pass

    def check(self, req: Request) -> None:
        """A ValueError naming the field when the request cannot run on this model and slot size."""
        validate_sampling(req.max_new_tokens, req.temperature, req.top_k, req.top_p)
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(req, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(req, name)}")
        if not req.prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed to condition on")
        vocab = self.decoder.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        for i, b in (req.logit_bias or {}).items():
            if not (isinstance(i, int) and 0 <= i < vocab):
                raise ValueError(f"logit_bias keys must be token ids in 0..{vocab - 1}, got {i!r}")
            if not -100 <= b <= 100:  # also refuses NaN
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {i}")
        need = len(req.prompt_ids) + req.max_new_tokens
        if need > self.decoder.max_len:
            raise ValueError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the "
                f"context of {self.decoder.max_len} tokens"
            )
        if any(not s for s in req.stop):
            raise ValueError("stop strings must be non-empty")
        if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not -(2**63) <= req.seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] (a torch.Generator's), got {req.seed!r}")
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")

    def submit(self, req: Request) -> Request:
        self.check(req)
        req.t_submit = time.perf_counter()
        self.waiting.append(req)
        return req

    # ---- one iteration -------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled sequences, admit waiting ones into free slots, then one decode step for every sequence past
        its prompt together with the prefill chunks allowed (`prefill_chunks_per_step`, in one pass on the C path).
        On the C path torch's ops of the step (sampling, log-probabilities) run on this thread (`serial_torch`).
        With `pipeline` (where the C path can launch steps) the step is launched and the one launched by the call
        before is accepted: a sequence's tokens and events come one call later (`_pipelined_step`)."""
        kern = self.decoder.kernel
        pipelined = self.pipeline and self.decoder.can_launch
        if kern is not None and hasattr(kern["decoder"]._ext, "rouse_pool") and not pipelined:
            # (Pipelined steps run back to back on the deferred-call thread: its pool never waits for Python.)
            # The step's own Python (admission, the rows' arrays) and, in a server, the bookkeeping of the step
            # before outlast the pool's spin, so its workers sleep; woken now, they are polling when the step's
            # first job comes (16 rows of TriLM-99M: 50 us a step from publishing to a worker's first chunk).
            kern["decoder"]._ext.rouse_pool()
        with torch_threads_for(kern["decoder"] if kern is not None else None):
            if pipelined and self._pipelined_step():
                return
            self._drain()
            self._step()

    # ---- pipelined steps -----------------------------------------------------------------------------------------
    def _pipelined_step(self) -> bool:
        """Launch the next step on the kernels' deferred-call thread (`BatchDecoder.launch`), then accept the step
        launched by the call before while it runs: the kernels never wait for this thread's bookkeeping (the tokens'
        text, stop strings, events, the next step's rows), which runs beside them instead of between them.

        The next step is planned before the previous one's tokens are known: a sequence that the previous step
        advances gets a row fed with the token that step picks (read by the C code when the step runs:
        `take_tokens`), unless that step certainly finishes it (its length); one that the previous step finishes
        otherwise (end of sequence, a stop string, a cancellation) wastes its row, whose result is dropped and whose
        slot is freed once the step has run. Every row still gives each sequence what the serial `_step` gives it:
        the same rows, positions and kernels, the next token picked by the same rule (greedy: the first maximum;
        sampled: `sample` with the request's next u). A prompt's first token comes from the step that ran its last
        chunk, and the sequence decodes from the step after next.

        Returns False, having launched nothing, when this step must run serially (`_step`, after `_drain`): a prompt
        to score (echo), a penalty or logit bias (the pick needs the adjusted logits), or more rows than one pass
        takes. (`step` calls it only where `BatchDecoder.can_launch`.)"""
        dec = self.decoder
        self._admit_waiting()
        if any(r.echo and r.prefilled < len(r.prompt_ids) or r.logit_bias or r.frequency_penalty or r.presence_penalty
               for r in self.running):
            return False
        prev = self._flight
        owed = prev.owed if prev is not None else {}
        decoding: list[Request] = []
        tokens: list[int | None] = []
        take: list[int] = []
        for r in self.running:
            if r.prefilled < len(r.prompt_ids) or r.finish_reason is not None:
                continue
            j = owed.get(id(r))
            have = len(r.tokens) + (j is not None)
            if have == 0 or have >= r.max_new_tokens:
                continue  # (the previous step gives its last token)
            decoding.append(r)
            tokens.append(None if j is not None else r.tokens[-1])
            take.append(-1 if j is None else j)
        chunks = self._chunks(self._share_prefixes() if self.prefix_cache else set())
        if len(decoding) + sum(end - r.prefilled for r, end in chunks) > dec.kernel["rows"].n:
            return False
        if not decoding and not chunks:
            self._drain()
            return True
        finals = [end == len(r.prompt_ids) and r.max_new_tokens > 0 for r, end in chunks]
        heads = decoding + [r for (r, _), f in zip(chunks, finals) if f]
        lse = any(r.logprobs is not None for r in heads)
        logits = any(r.logprobs not in (None, 0) for r in decoding) or any(
            r.logprobs is not None for r in heads[len(decoding) :])
        picks = [(r.temperature, r.top_k, r.top_p, draw_u(r.rng()) if r.temperature != 0 else 0.0) for r in heads]
        step = dec.launch([r.slot for r in decoding], tokens, [(r.slot, r.prompt_ids[r.prefilled : end])
                                                               for r, end in chunks],
                          finals, picks, take=take, after=None if prev is None else prev.step, lse=lse, logits=logits)
        head_of = {id(r): j for j, r in enumerate(heads)}
        flight = _Flight(step, decoding, [(r, r.prefilled, end, head_of.get(id(r))) for r, end in chunks], head_of, {})
        for r in decoding:
            flight.rows[r.slot] = 1
        for r, end in chunks:
            flight.rows[r.slot] = end - r.prefilled
            r.prefilled = end  # (what the step will have written)
        for slot, n in flight.rows.items():
            self._busy[slot] = self._busy.get(slot, 0) + n
        self._flight = flight
        if prev is not None:
            self._complete(prev)
        return True

    def _drain(self) -> None:
        """Wait for the launched step, if any, and accept its results."""
        prev, self._flight = self._flight, None
        if prev is not None:
            self._complete(prev)

    def _complete(self, f: _Flight) -> None:
        """Wait for the launched step `f`, free the slots that waited for it, and accept its tokens (`_accept`, as
        `_step` does, with the step's picks) for the sequences it advanced that are still running."""
        try:
            self.decoder.wait(f.step)
        finally:
            for slot, n in f.rows.items():
                left = self._busy[slot] - n
                if left:
                    self._busy[slot] = left
                else:
                    del self._busy[slot]
            self._release_waiting_slots()
        st, S = f.step, f.step.set
        m = st.m
        chosen, idx, top = S["chosen_np"][:m].tolist(), S["idx_np"][:m].tolist(), S["top_np"][:m].tolist()
        lses = S["lse_np"][:m].tolist() if st.lse else None
        y = S["y"]
        if f.decode:
            self.stats["steps"] += 1
        for i, r in enumerate(f.decode):
            if r.finish_reason is None:
                self._accept(r, y, idx[i], None if lses is None else lses[i], top[i], row=i, drawn=chosen[i])
        for r, start, end, h in f.chunks:
            self.stats["prefilled"] += end - start
            if end == len(r.prompt_ids) and r.finish_reason is None:
                if r.max_new_tokens == 0:
                    self._finish(r, "length")
                else:
                    self._accept(r, y[h], drawn=chosen[h])

    def _release_waiting_slots(self) -> None:
        keep = []
        for slot, req, reason in self._zombies:
            if slot in self._busy:
                keep.append((slot, req, reason))
            else:
                self._release(slot, req, reason)
        self._zombies = keep

    def _settled(self, slot: int) -> int:
        """The positions of a slot that hold their keys and values now (launched steps still write the rest)."""
        return self.decoder.pos(slot) - self._busy.get(slot, 0)

    def _admit_waiting(self) -> None:
        """Drop the cancelled sequences and admit waiting ones into free slots."""
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
        if any(r.cancelled for r in self.waiting):  # anywhere in the queue: a place held by a gone client counts
            for req in [r for r in self.waiting if r.cancelled]:  # against --max-queue until it reached the head
                self.waiting.remove(req)
                self._finish(req, "cancelled")
        while self.waiting and self.decoder.free_slots:
            req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            req.slot, req.cached = self._admit(req)
            req.prefilled = req.cached
            self.stats["cached"] += req.cached
            self.running.append(req)

    def _chunks(self, waiting: set[int]) -> list[tuple[Request, int]]:
        """Prompt chunks for this step: at most `prefill_chunks_per_step` of them, or (None) as many whole chunks, in
        arrival order, as fit together in `prefill_chunk` rows (always one); without chunking one prompt a step.
        (request, end of this chunk) for the prompts still to prefill, but those in `waiting` (`_share_prefixes`)."""
        chunks: list[tuple[Request, int]] = []
        most = self.prefill_chunks_per_step or (1 if self.prefill_chunk is None else len(self.running))
        rows = 0
        for req in self.running:
            if len(chunks) == most:
                break
            n = len(req.prompt_ids)
            if req.prefilled < n and not req.echo and id(req) not in waiting:
                size = self.prefill_chunk or n
                end = min(n, (req.prefilled // size + 1) * size)  # fixed boundaries, every run
                if self.prefill_chunks_per_step is None and chunks and rows + end - req.prefilled > size:
                    break
                chunks.append((req, end))
                rows += end - req.prefilled
        return chunks

    def _step(self) -> None:
        self._admit_waiting()
        decoding = [r for r in self.running if r.prefilled == len(r.prompt_ids) and r.finish_reason is None]
        decoding = [r for r in decoding if r.tokens]  # the first token comes from the prefill logits
        waiting = self._share_prefixes() if self.prefix_cache else set()
        for req in [r for r in self.running if r.echo and r.prefilled < len(r.prompt_ids)]:
            self._score_chunk(req)  # on its own: every position's logits
        chunks = self._chunks(waiting)
        if not decoding and not chunks:
            return
        # One pass for the decode rows and the prefill chunks together (`step_rows`), with the greedy rows' picks
        # (sample_next's own rule: the first maximum), their logits and, for log-probabilities, every row's
        # log-sum-exp taken in the same C call as the logits: a greedy row without top alternatives then needs no
        # tensor op of its own (each op lets the HTTP loop take the GIL, and the engine waits to get it back). When
        # no row reads its logits (every decode row greedy with at most the chosen token's log-probability, no prompt
        # finishing), the C call does not write them out at all.
        greedy_any = any(r.temperature == 0 for r in decoding)
        want_lse = any(r.logprobs is not None for r in decoding)
        logits = any(r.temperature != 0 or r.logprobs not in (None, 0) or r.own_logits for r in decoding) or (
            not decoding or any(end == len(r.prompt_ids) for r, end in chunks))
        rows, pre, picks_t, lse_t, top_t = self.decoder.step_rows(
            [r.slot for r in decoding], [r.tokens[-1] for r in decoding],
            [(r.slot, r.prompt_ids[r.prefilled : end]) for r, end in chunks], argmax=greedy_any, lse=want_lse,
            logits=logits, copy=False)  # read before the next step
        if decoding:
            self.stats["steps"] += 1
            picks = None if picks_t is None or not greedy_any else picks_t.tolist()
            lses = None if lse_t is None else lse_t.tolist()
            chosen = None if picks is None or lses is None else top_t.tolist()
            drawn = self._sample_rows(decoding, rows)
            for i, r in enumerate(decoding):  # rows[i] only where it is read: a tensor view costs microseconds
                self._accept(r, rows, None if picks is None else picks[i], None if lses is None else lses[i],
                             None if chosen is None else chosen[i], row=i, drawn=drawn.get(i))
        for (req, end), row in zip(chunks, pre):
            self.stats["prefilled"] += end - req.prefilled
            req.prefilled = end
            if end == len(req.prompt_ids):
                if req.max_new_tokens == 0:
                    self._finish(req, "length")
                else:
                    self._accept(req, row)

    def _share_prefixes(self) -> set[int]:
        """Prefix sharing between the sequences holding slots: a prompt still to prefill that starts with what an
        earlier-admitted sequence's slot holds gets those positions copied (`BatchDecoder.copy_rows`) instead of
        computed; one that starts with what an earlier one is still prefilling waits for it (at least SHARE_MIN_ROWS
        positions to gain), so that a burst of requests with one system prompt computes it once. Only earlier
        sequences are waited for, so nothing waits in a circle. Returns the ids of the requests that wait this step."""
        waiting: set[int] = set()
        for i, req in enumerate(self.running):
            need = len(req.prompt_ids) - 1  # the last prompt token runs, for its logits
            if req.echo or req.prefilled >= need:
                continue
            best, donor, first = req.prefilled, None, req.prompt_ids[0]
            for d in self.running[:i]:
                if d.slot is None or d.prompt_ids[0] != first or d.echo and d.prefilled < len(d.prompt_ids):
                    continue  # (the first token's test spares the search for prompts that share nothing)
                m = common_prefix(d.prompt_ids, req.prompt_ids)
                if m == len(d.prompt_ids) and d.tokens:
                    m += common_prefix(d.tokens, req.prompt_ids[m:])
                m = min(m, need)
                if m > best:
                    best, donor = m, d
            if donor is None:
                continue
            have = min(best, self._settled(donor.slot))
            if have > req.prefilled:
                self.decoder.copy_rows(donor.slot, req.slot, req.prefilled, have)
                req.cached += have - req.prefilled
                self.stats["cached"] += have - req.prefilled
                req.prefilled = have
            if best - req.prefilled >= SHARE_MIN_ROWS and (donor.prefilled < len(donor.prompt_ids) or self._settled(
                    donor.slot) < min(best, self.decoder.pos(donor.slot))):  # (or a launched step still writes them)
                waiting.add(id(req))  # the donor is still computing what this one would compute again
        return waiting

    def _score_chunk(self, req: Request) -> None:
        """An echo request's next prompt chunk with every position's logits: the log-probability (and top
        alternatives) of each prompt token given the ones before it, then, at the prompt's end, its first token."""
        n, a = len(req.prompt_ids), req.prefilled
        end = min(n, a + (self.prefill_chunk or n))
        logits = self.decoder.prefill_logits(req.slot, req.prompt_ids[a:end])
        if a == 0:
            req.prompt_logprobs.append({"token": req.prompt_ids[0], "logprob": None, "top": None})
        scored = min(end, n - 1) - a  # row j predicts prompt token a + j + 1
        lses = logsumexp(logits[:scored].contiguous()).tolist()
        for j, lse in enumerate(lses):
            req.prompt_logprobs.append(logprob_entry(logits[j], req.prompt_ids[a + j + 1], req.logprobs or 0, lse))
        self.stats["prefilled"] += end - a
        req.prefilled = end
        if end == n:
            if req.max_new_tokens == 0:
                self._finish(req, "length")
            else:
                self._accept(req, logits[-1])

    def _admit(self, req: Request) -> tuple[int, int]:
        """(slot, prompt tokens it already holds) for a request taking a slot: with prefix reuse, the free slot whose
        held tokens share the longest prefix with the prompt (ties: the one freed longest ago, so that recent
        conversations stay), keeping that prefix but for the prompt's last token, which must run for its logits."""
        if not self.prefix_cache:
            return self.decoder.acquire(), 0
        first = req.prompt_ids[0]
        shared = {s: common_prefix(h, req.prompt_ids) if (h := self.held.get(s)) and h[0] == first else 0
                  for s in self.decoder.free_slot_ids}
        slot = max(shared, key=lambda s: (shared[s], -self._released.get(s, -1)))
        keep = 0 if req.echo else min(shared[slot], len(req.prompt_ids) - 1)
        self.held.pop(slot, None)
        return self.decoder.acquire(slot, keep), keep

    def _sample_rows(self, decoding: list[Request], rows: Tensor | None) -> dict[int, int]:
        """The draws of the step's sampled rows (temperature > 0), one u each from its request's generator, in one C
        call over the kernels' threads (`kernels.sample_rows`: the same draws as `sample_next` row by row):
        {row: token id}."""
        idx = [i for i, r in enumerate(decoding) if r.temperature != 0 and not r.own_logits]
        if not idx or rows is None:
            return {}
        reqs = [decoding[i] for i in idx]
        u = [draw_u(r.rng()) for r in reqs]
        got = sample_rows(rows, [r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs], u,
                          rows=idx, n_threads=self.decoder.n_threads)  # fmt: skip
        return dict(zip(idx, got))

    def _accept(self, req: Request, logits: Tensor, greedy: int | None = None, lse: float | None = None,
                greedy_logit: float | None = None, row: int | None = None, drawn: int | None = None) -> None:
        """Sample the next token of `req` from its logits (V,), or row `row` of logits (B, V) (`greedy`: its argmax,
        `lse`: its log-sum-exp and `greedy_logit`: logits[greedy], when already taken for the whole step; `drawn`:
        its sampled token, when drawn for the whole step), emit its text, and finish it if it is done."""
        sampled = req.temperature != 0
        if req.own_logits:  # the step's picks and statistics were taken without its penalty and bias
            logits = adjusted_logits(req, logits[row] if row is not None else logits)
            row = greedy = lse = greedy_logit = drawn = None
        if row is not None and (drawn is None and (greedy is None or sampled) or req.logprobs is not None and (
                req.logprobs != 0 or sampled or lse is None or greedy_logit is None)):  # the row's logits are read
            logits, row = logits[row], None
        if drawn is not None:
            nxt = drawn
        elif greedy is not None and req.temperature == 0:
            nxt = greedy
        else:
            nxt = sample_next(logits, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              generator=req.rng())
        if req.t_first is None:
            req.t_first = time.perf_counter()
        req.tokens.append(nxt)
        self.stats["generated"] += 1
        event: dict[str, Any] = {"type": "token", "token": nxt, "text": ""}
        if req.logprobs == 0 and nxt == greedy and lse is not None and greedy_logit is not None:
            entry = {"token": nxt, "logprob": greedy_logit - lse, "top": []}  # log p_i = x_i - logsumexp(x)
            req.token_logprobs.append(entry)
            event["logprob"] = entry
        elif req.logprobs is not None:
            x = logits.float().contiguous()
            entry = logprob_entry(x, nxt, req.logprobs, float(logsumexp(x)) if lse is None else lse)
            req.token_logprobs.append(entry)
            event["logprob"] = entry
        finish = None
        tok = self.tokenizer
        if tok is not None:
            if req.detok is None:
                req.detok = TextDecoder(tok)
            # tok.decode(req.tokens), without decoding them all every token
            text, stopped = cut_at_stop(req.detok.text(req.tokens), req.stop)
            if stopped:
                finish = "stop"
            req.text = text
            final = settled(text, req.stop, stopped)
            if final > req.emitted:
                event["text"] = text[req.emitted : final]
                req.emitted = final
        if finish is None and req.stop_at_eos and self.eos is not None and nxt == self.eos:
            finish = "eos"
        if finish is None and len(req.tokens) >= req.max_new_tokens:
            finish = "length"
        if finish is not None and finish != "stop" and len(req.text) > req.emitted:
            event["text"] += req.text[req.emitted :]  # the held-back tail is final now
            req.emitted = len(req.text)
        if req.on_event is not None:
            req.on_event(event)
        if finish is not None:
            self._finish(req, finish)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if req.slot is not None:
            if req.slot in self._busy:  # a launched step still writes into it: freed once that step has run
                self._zombies.append((req.slot, req, reason))
            else:
                self._release(req.slot, req, reason)
            req.slot = None
        if req in self.running:
            self.running.remove(req)
        self.stats["finished"] += 1
        if req.on_event is not None:
            req.on_event({"type": "done", "finish_reason": reason})

    def _release(self, slot: int, req: Request, reason: str) -> None:
        if self.prefix_cache and reason != "error":  # after an error a cache may hold a step's partial writes
            self.held[slot] = (req.prompt_ids + req.tokens)[: self.decoder.pos(slot)]
            self._released[slot] = self.stats["finished"]
        self.decoder.release(slot)

    def fail_all(self, reason: str = "error") -> None:
        """Finish every waiting and running request with `reason` (after an exception, or at shutdown), once the
        launched step, if any, has run (its results dropped)."""
        prev, self._flight = self._flight, None
        failed = False
        if prev is not None:
            try:
                self.decoder.wait(prev.step)
            except Exception:  # the step's own error was or will be reported by whoever failed us
                failed = True
        self._busy.clear()
        self._release_waiting_slots()
        pending = list(self.running) + list(self.waiting)
        self.waiting.clear()
        for req in pending:
            self._finish(req, reason)
        if failed:  # the slots may hold that step's partial writes
            self.held.clear()


def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    max_batch: int | None = None,
    prefill_chunk: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """`generate` for several prompts at once: up to `max_batch` (default: all) decode together; when one finishes
    the next prompt joins. Each prompt gets its own generator seeded with `seed`, so each result is what `generate`
    returns for that prompt alone (bit-identical on a packed TriLM; module docstring). `max_new_tokens` may be one
    per prompt. Returns one dict per prompt: {"prompt_tokens", "tokens", "text", "finish_reason", "n_prompt",
    "n_generated"}; the first carries the run's "wall_s" and aggregate "tokens_per_s" too."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of texts or token-id lists")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    sched = Scheduler(model, tok, max_batch=max_batch or len(prompts), prefill_chunk=prefill_chunk, kv_dtype=kv_dtype,
                      pipeline=True)
    reqs = []
    for i, (p, n) in enumerate(zip(prompts, limits)):
        if isinstance(p, str):
            if tok is None:
                raise ValueError(f"prompt {i} is text and needs a tokenizer (pass tokenizer=... or token ids)")
            ids = tok.encode(p).ids
        else:
            ids = [int(t) for t in p]
        req = Request(ids, n, temperature, top_k, top_p, stops, seed, stop_at_eos)
        try:
            sched.check(req)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        reqs.append(req)
    t0 = time.perf_counter()
    was_training = model.training
    try:
        for r in reqs:
            sched.submit(r)
        while not sched.idle:
            sched.step()
    finally:
        model.train(was_training)
    wall = time.perf_counter() - t0
    out = [
        {"prompt_tokens": r.prompt_ids, "tokens": r.tokens, "text": r.text if tok is not None else None,
         "finish_reason": r.finish_reason, "n_prompt": len(r.prompt_ids), "n_generated": len(r.tokens)}
        for r in reqs
    ]  # fmt: skip
    total = sum(len(r.tokens) for r in reqs)
    out[0].update(wall_s=wall, tokens_per_s=total / wall if wall > 0 else None)
    return out
