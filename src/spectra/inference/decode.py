"""Batch-1 decoding of a packed TriLM: one C call for every layer per token.

A decode step runs one token through every block. Through the model's modules that is about 160 small torch
operations per layer (views, RoPE's cat/neg, cache slicing, seven linear calls that each quantize their input again)
plus torch's attention kernel, whose set-up for one query costs more than its arithmetic; at batch 1 that costs as
much as streaming the packed weights. `Decoder` hands every layer to `spectra.packed._kernels.decode_layers_batch`
(`Rows` of one row), which does the same math in C, layer after layer (x is the residual stream, updated in place):

    h = RMSNorm(x)                    float32, x / sqrt(mean(x²) + eps) · w
    q | k | v = h W_qkvᵀ              one `ternary_matmul_group`: h quantized to int8 once, three matrices streamed
                                      (TQ2_0 or TQ1_0 code bytes, each read by its own kernels)
    q, k = RoPE(q), RoPE(k)           halves convention (HF rotate_half), k and v written into the KVCache at `pos`
    a = softmax(q kᵀ/√D) v            `kernels.attention` over positions 0..pos, reading the cache in place
    x = x + a W_oᵀ
    h = RMSNorm(x);  g | u = h W_guᵀ  one group call again
    x = x + (SiLU(g) · u) W_downᵀ

The linear layers are the ternary kernels (bit-identical to the modules' forward); norms, RoPE, attention and SiLU are
float32 C whose sums run in another order than torch's, so the logits equal the model's `model(idx, cache)` up to float
rounding as it passes through the int8 activations: a rounding step of one float32 ulp can move an activation to the
next int8 level, so differences reach ~1e-2 of the logits where that happens (1e-7 on the embeddings moves them by
~1.5e-2, a review found), and greedy tokens can part at near ties. The decoder uses the model's own `KVCache`, so it can
take over from a prefill made by the model and the model can continue from the decoder's cache. Any other call (several
tokens, batch > 1, no cache, grad enabled) goes to the model unchanged. The embedding (float32, or a 16-bit
`CompactEmbedding` from a packed checkpoint) is the model's own; so are the final norm and lm_head, except that an int8
lm_head (`Int8Linear`, a packed checkpoint's or `with_int8_head`'s) runs with the final norm in one C call
(`Decoder.head`).

The decoder reads the layers' buffers when it is built: rebuild it after changing the model (`Decoder(model)` is
cheap). A packed layer whose buffers or kernel path changed after that (`refresh`, `load_state_dict`, `set_path`) is
detected and refused. A decoder holds scratch buffers: use one decoder per thread.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from spectra.layers import RMSNorm
from spectra.model import KVCache
from spectra.packed import kernels as K

KV_KINDS = K.KV_KINDS  # the KV cache dtypes the C calls take, and their kind codes
_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `Decoder` cannot run `model` (None when it can)."""
    from spectra.packed.linear import CompactEmbedding, PackedTernaryLinear

    cfg = getattr(model, "config", None)
    layers = getattr(model, "layers", None)
    if cfg is None or layers is None or not hasattr(model, "new_cache"):
        return "not a spectra Transformer"
    if cfg.head_dim % 2 or cfg.head_dim > 256:
        return f"head_dim={cfg.head_dim} (the decoder needs an even head_dim up to 256)"
    if cfg.norm != "rmsnorm" or cfg.mlp_act != "swiglu":
        return f"norm={cfg.norm!r}, mlp_act={cfg.mlp_act!r} (the decoder runs rmsnorm + swiglu)"
    if model.embed_tokens.weight.dtype != torch.float32 and not isinstance(model.embed_tokens, CompactEmbedding):
        return "the embedding is neither float32 nor a CompactEmbedding (16-bit, float32 lookups)"
    if model.norm.weight.dtype != torch.float32:
        return "the norms are not float32"
    paths = set()
    for i, layer in enumerate(layers):
        for name in _BLOCK_LINEARS:
            sub = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            m = getattr(sub, name, None)
            if not isinstance(m, PackedTernaryLinear) or m._path_id is None:
                return f"layers.{i}.{name} is not a PackedTernaryLinear with a compiled kernel path"
            paths.add(m._path_id)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.float32:
                return "the norms are not float32"
    if len(paths) > 1:
        return "the packed layers use different kernel paths"
    return None


class Decoder:
    """Callable like the model, `decoder(idx, cache) -> logits`, fast for one token at a time (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        from spectra.packed import linear as L

        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"Decoder cannot run this model: {reason}")
        self.model = model
        self.config = model.config
        self._ext = K.extension()
        self._cos = model.rope_cos.float().contiguous()
        self._sin = model.rope_sin.float().contiguous()
        self._path_id = model.layers[0].self_attn.q_proj._path_id  # one path for all (unsupported_reason checks)
        # One row's scratch and per-layer specs (`Rows`): x is the residual stream, updated in place layer by layer;
        # every other buffer is consumed before the next layer writes it.
        self._one = Rows(self, 1)
        self._x = self._one.x[0]
        where = torch.zeros(3, dtype=torch.int64)  # step's row: position, layer-0 keys, layer-0 values (addresses)
        self._where, self._where_t = where.numpy(), (where[0:1], where[1:2], where[2:3])
        self._where_ptrs = tuple(t.data_ptr() for t in self._where_t)
        self._logits: Tensor | None = None  # `greedy`'s logits buffer
        self._prep: tuple | None = None  # `greedy`'s prepared call (`_greedy_prepare`)
        self._last: Tensor | None = None
        packed = [m for m in model.modules() if isinstance(m, L.PackedTernaryLinear)]
        self._packed, self._packed_cls = packed, L.PackedTernaryLinear
        self._version = sum(m.version for m in packed)  # versions only grow: any change raises the sum
        self._changes = L.PackedTernaryLinear.changes  # any layer's change anywhere: then the sum is compared
        threads = {m.n_threads for m in packed}
        self._threads = threads.pop() if len(threads) == 1 else None
        self._rows: Rows | None = None
        self._rowlane: dict | None = None  # `rowlane_codes`: module -> its interleaved codes, or {} for none
        self._head_mod = None
        self._c_head: tuple | None = None

    def check_unchanged(self) -> None:
        """RuntimeError when a packed layer's buffers or kernel path changed since this decoder was built (one integer
        compared in the common case: `PackedTernaryLinear.changes`)."""
        changes = self._packed_cls.changes
        if changes != self._changes:
            if sum(m.version for m in self._packed) != self._version:
                raise RuntimeError("a packed layer changed after this Decoder was built; build a new Decoder")
            self._changes = changes  # another model's layer changed

    def _head_setup(self) -> None:
        """What `head`'s C call takes, when lm_head is an `Int8Linear` on the kernels' path (else None), for the
        lm_head module now in the model."""
        from spectra.packed import linear as L

        model = self.model
        head, norm = model.lm_head, model.norm
        self._head_mod, self._c_head = head, None
        if isinstance(head, L.Int8Linear) and head.path != "torch" and type(norm) is RMSNorm:
            ext = K.extension()
            if ext is not None and hasattr(ext, "head_rows") and head.in_features == self.config.dim:
                w = norm.weight.detach()
                # the row-lane copy of the output layer where the blocks have theirs (`rowlane_codes`; rows of 8+)
                rl = rowlane_of([(head, head.qw)])[0] if self.rowlane_codes() and head.path == "avx512vnni" else None
                self._c_head = (K._PATH_IDS[head.path], w, w.data_ptr(), float(norm.eps), head.qw.data_ptr(),
                                head.scale.data_ptr(), head.out_features, rl, head)  # fmt: skip

    def head(
        self, x: Tensor, *, argmax: bool = False, lse: bool = False, logits: bool = True,
        out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, rows: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(logits (B, V), argmax (B,) or None, logsumexp (B,) or None, the logit at the argmax (B,) or None) of the
        rows x (B, C) of the residual stream after the last block. An int8 lm_head: the final norm (the blocks' C
        norm), the output layer and the row statistics in one C call (`kernels.head_rows`; `logits=False` with
        `argmax` or `lse`: the statistics alone, the logits None); else the model's norm and lm_head, and
        `kernels.argmax_logsumexp` (the logits are returned whatever `logits` says). The same rows give the same
        results whatever else is in x. `out`: kept buffers (logits [n, V], argmax [n], logsumexp [n], top [n],
        n >= B) the C call writes into, returning views of their first B rows (the torch head ignores them). `rows`
        (int64 (B,)): the rows x[rows] instead of x (the C head picks them out as it normalizes them)."""
        model = self.model
        if model.lm_head is not self._head_mod:
            self._head_setup()
        if self._c_head is not None:  # `kernels.head_rows` without its checks: the operands were checked once
            pid, _, w_ptr, eps, qw_ptr, scale_ptr, V, rl, head = self._c_head
            if x.dtype is not torch.float32 or not x.is_contiguous():
                x = x.float().contiguous()
            nt = head.n_threads or self._threads or K.default_threads()
            if rows is not None and not (rows.dtype is torch.int64 and rows.is_contiguous()
                                         and hasattr(self._ext, "defer_begin")):  # an extension without the gather
                x, rows = x.index_select(0, rows), None
            return K.head_rows_unchecked(pid, nt, x, w_ptr, eps, qw_ptr, scale_ptr, V, argmax=argmax, lse=lse,
                                         logits=logits or not (argmax or lse), out=out,
                                         rl_ptr=0 if rl is None else rl.data_ptr(), rows=rows)  # fmt: skip
        if rows is not None:
            x = x.index_select(0, rows)
        y = model.lm_head(model.norm(x.view(x.shape[0], 1, self.config.dim)))[:, 0]
        if not (argmax or lse):
            return y, None, None, None
        y = y.float().contiguous()
        idx, out_lse = K.argmax_logsumexp(y, with_lse=lse, n_threads=self._threads or K.default_threads())
        return y, idx, out_lse, y.gather(1, idx.view(-1, 1)).view(-1)

    # ---- several rows per call ---------------------------------------------------------------------------------
    PREFILL_ROWS = 128  # prompt positions per C call in `prefill`
    ROWLANE_MAX_BYTES = 64 << 20  # models with at most this many code bytes keep the row-lane copy (`rowlane_codes`)

    def rowlane_codes(self) -> dict:
        """The packed layers' code bytes interleaved by 16 rows (`kernels.rowlane_codes`) for the row-lane GEMM that
        products of 8 or more rows run (`csrc/rowlane_kernels.h`: batched steps and prompts), or, with AMX in use,
        for the token-major AMX GEMM (`csrc/amx_kernels.h`, TQ2_0 layers: the copy's 16-row dwords are its tiles'
        rows), by module; {} where neither runs: a path other than `avx512vnni`, a build without the kernels, a
        TQ1_0 model with AMX in use, or a model with more than ROWLANE_MAX_BYTES of codes as TQ2_0 (the copy is
        TQ2_0 code bytes also for a TQ1_0 model: 12 MB more for TriLM-99M, and 26 MB for its output layer's,
        `_head_setup`). Made on first use and kept on the modules (`rowlane_of`), so the decoders that
        `generate` builds per call share them."""
        if self._rowlane is None:
            mods = self._packed
            total = sum(m.out_features * m.in_features // 4 for m in mods)  # as TQ2_0 code bytes
            amx = K.amx_in_use()  # the token-major AMX GEMM reads the copies of TQ2_0 layers
            ok = (self._path_id == K._PATH_IDS["avx512vnni"] and self._ext is not None
                  and hasattr(self._ext, "set_rowlane") and total <= self.ROWLANE_MAX_BYTES
                  and (not amx or (hasattr(self._ext, "set_amx_tm")
                                   and all(getattr(m, "format", None) == "tq2_0" for m in mods))))
            self._rowlane = dict(zip(mods, rowlane_of([(m, m.qs) for m in mods]))) if ok else {}
        return self._rowlane

    def rows(self, n: int) -> Rows:
        """A `Rows` runner for at least n rows: the one already built when it is large enough, else a new one of
        max(n, PREFILL_ROWS) rows that replaces it (one set of scratch buffers per decoder)."""
        if self._rows is None or self._rows.n < n:
            self._rows = Rows(self, max(n, self.PREFILL_ROWS))
        return self._rows

    def prefill(self, idx: Tensor, cache) -> Tensor:
        """Run the tokens idx (1, T) into `cache` (batch 1) after what it holds, PREFILL_ROWS positions per C call
        (`Rows`); the logits (1, 1, V) of the last position. Each position's result equals feeding the tokens one at
        a time to `step` (bit for bit), so how a prompt is cut into calls does not change anything. A cache of
        another batch size or dtype, or grad mode, goes to the model's forward, as `__call__` does."""
        if not self._takes(cache):
            return self.model(idx, cache=cache)[:, -1:]  # what the C rows do not take: the model's own forward
        for x, n in self._prefill_rows(idx, cache):
            pass
        return self.head(x[n - 1 : n])[0].unsqueeze(1)

    def prefill_logits(self, idx: Tensor, cache) -> Tensor:
        """`prefill`, with the logits of every position (T, V): what scoring a prompt needs (the server's `echo`).
        Each row is the one `prefill` or feeding the tokens one at a time would give (the output layer is per row)."""
        if not self._takes(cache):
            return self.model(idx, cache=cache)[0]
        return torch.cat([self.head(x[:n])[0].float().clone() for x, n in self._prefill_rows(idx, cache)])

    def _prefill_rows(self, idx: Tensor, cache):
        """The C rows of idx (1, T) into `cache`, PREFILL_ROWS positions a call: yields (x, n) per call, x's first n
        rows the residual stream after the last block (valid until the next call)."""
        ids = idx.reshape(-1).to(torch.long)
        self._check_cache(cache, len(ids))
        rows = self.rows(self.PREFILL_ROWS)
        k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
        for a in range(0, len(ids), rows.n):
            chunk = ids[a : a + rows.n]
            pos = torch.arange(cache.pos, cache.pos + len(chunk), dtype=torch.int64)
            k_ptrs = torch.full((len(chunk),), k_ptr, dtype=torch.int64)
            v_ptrs = torch.full((len(chunk),), v_ptr, dtype=torch.int64)
            x = rows.run(chunk, pos, k_ptrs, v_ptrs, cache)
            cache.pos += len(chunk)
            yield x, len(chunk)

    def _check_cache(self, cache, n: int) -> None:
        cfg = self.config
        ck, cv = cache.k, cache.v
        expected = (cfg.n_layers, 1, cfg.n_heads, cache.max_len, KVCache.row_len(cfg.head_dim, ck.dtype))
        if (
            tuple(ck.shape) != expected
            or tuple(cv.shape) != expected
            or not (ck.is_contiguous() and cv.is_contiguous())
            or ck.dtype not in KV_KINDS
            or cv.dtype != ck.dtype
        ):
            raise ValueError(f"the KV cache must be contiguous float32, float16 or q8 (int8) {expected}")
        if cache.pos + n > cfg.max_seq_len or cache.pos + n > cache.max_len:
            raise ValueError(f"positions {cache.pos}..{cache.pos + n - 1} go past max_seq_len={cfg.max_seq_len} or "
                             f"the cache ({cache.max_len})")

    # ---- the model's interface ---------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None):
        return self.model.new_cache(batch_size, max_len, dtype)

    @staticmethod
    def _takes(cache) -> bool:
        """Whether the C calls run on `cache` (batch 1, float32, float16 or q8, no autograd); else the model does."""
        return (
            cache is not None
            and cache.k.shape[1] == 1
            and cache.k.dtype in KV_KINDS
            and not torch.is_grad_enabled()
        )

    def __call__(self, idx: Tensor, cache=None) -> Tensor:
        if idx.shape != (1, 1) or not self._takes(cache):
            return self.model(idx, cache=cache)
        return self.step(idx, cache)

    # ---- one token ---------------------------------------------------------------------------------------------
    _EMB_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # decode_token's emb_kind

    def greedy_ready(self, cache) -> bool:
        """Whether `greedy` runs its one-C-call step on `cache`: an int8 lm_head after an RMSNorm (`head`), an
        extension with `decode_token`, a batch-1 float32 / float16 cache outside autograd, an embedding of float32,
        float16 or bfloat16 rows, and the head on the blocks' thread count."""
        if self.model.lm_head is not self._head_mod:
            self._head_setup()
        if self._c_head is None or not hasattr(self._ext, "decode_token") or not self._takes(cache):
            return False
        emb, head = self._one._emb, self._c_head[-1]
        return emb.dtype in self._EMB_KINDS and emb.is_contiguous() and head.n_threads in (None, self._threads)

    def greedy(self, token: int, cache, sample: tuple[float, int | None, float | None, float] | None = None) -> int:
        """The token greedy decoding picks after `token` at position cache.pos (what
        `sample_next(self.step(...)[0, -1])` picks at temperature 0: the first index of the largest logit), advancing
        the cache by one; with `sample` = (temperature > 0, top_k, top_p, u), the token `kernels.sample` draws from the
        same logits instead. Where `greedy_ready(cache)`, the whole step is one C call (`decode_token`: embedding row,
        every block, final norm, int8 output layer, argmax or the draw) and no torch op runs: on the 2-core Xeon the
        torch ops of a step cost 0.4-0.5 ms of each TriLM-1.1B token on 2 threads (their code and data evicted by the
        weights the step before streamed); a sampled 99m step, 1.2 -> 1.1 ms with the draw in the call (its logits
        still in cache). `last_logits` (V,) then holds the step's logits until the next call; otherwise this is
        `step` and `sample_next` (or `kernels.sample`)."""
        prep = self._prep
        if (prep is None or prep[0] is not cache or prep[1] is not cache.k or prep[2] is not cache.v
                or prep[3] is not self._ext or self.model.lm_head is not self._head_mod or torch.is_grad_enabled()):
            prep = self._greedy_prepare(cache)
            if prep is None:
                from spectra.inference.sampling import sample_next

                logits = self.step(torch.tensor([[token]], dtype=torch.long), cache)
                self._last = logits[0, -1]
                if sample is not None:
                    return K.sample(self._last.float().contiguous(), sample[0], sample[1], sample[2], u=sample[3])
                return sample_next(self._last)
        if self._packed_cls.changes != self._changes:
            self.check_unchanged()
        pos = cache.pos
        if pos >= prep[4]:
            self._check_cache(cache, 1)  # raises, naming the positions
        self._where[:] = (pos, prep[5], prep[6])
        if sample is None:
            nxt = self._ext.decode_token(self._path_id, self._threads or K.default_threads(), int(token), *prep[7])
        else:
            T, k, p, u = sample
            nxt = self._ext.decode_token(self._path_id, self._threads or K.default_threads(), int(token), *prep[7],
                                         float(T), 0 if k is None else int(k), 1.0 if p is None else float(p),
                                         float(u))  # fmt: skip
        cache.pos = pos + 1
        self._last = self._logits
        return nxt

    def _greedy_prepare(self, cache) -> tuple | None:
        """`greedy`'s checks and decode_token's arguments for `cache`, made once per cache, extension and head (None
        where `greedy_ready` is false): each step then only writes its position and calls."""
        self._prep = None
        if not self.greedy_ready(cache):
            return None
        self._check_cache(cache, 1)
        rows, ck, cfg = self._one, cache.k, self.config
        pid, _, w_ptr, eps, qw_ptr, scale_ptr, V, _, _ = self._c_head
        if self._logits is None or self._logits.numel() != V:
            self._logits = torch.empty(V, dtype=torch.float32)
        emb = rows._emb
        C, H, D = rows._fixed
        plan = rows._plan_for(self._ext)
        args = (emb.data_ptr(), self._EMB_KINDS[emb.dtype], emb.shape[0], rows.x.data_ptr(), C, H, D,
                self._where_ptrs[0], *rows._rope, self._where_ptrs[1], self._where_ptrs[2],
                ck.stride(0) * ck.element_size(), ck.stride(2), D**-0.5, plan, KV_KINDS[ck.dtype],
                w_ptr, eps, qw_ptr, scale_ptr, V, self._logits.data_ptr())  # fmt: skip
        end = min(cfg.max_seq_len, cache.max_len)  # the first position a step may not write
        self._prep = (cache, ck, cache.v, self._ext, end, ck.data_ptr(), cache.v.data_ptr(), args)
        return self._prep

    @property
    def last_logits(self) -> Tensor | None:
        """The logits (V,) of the last `greedy` step (overwritten by the next one)."""
        return self._last

    def step(self, idx: Tensor, cache) -> Tensor:
        """Logits (1, 1, V) for the single token idx (1, 1) at position cache.pos; advances the cache by one. Every
        block runs in one C call (`Rows` of one row, `decode_layers_batch`): one call per block from Python measured
        0.975x as fast on one thread of the Xeon (1.1B, 7 of 8 alternating rounds), 0.994x on two."""
        pos = cache.pos
        self._check_cache(cache, 1)
        self._where[:] = (pos, cache.k.data_ptr(), cache.v.data_ptr())  # the row's position and cache (Rows.run)
        x = self._one.run(idx[0], *self._where_t, cache)
        cache.pos = pos + 1
        return self.head(x)[0].unsqueeze(1)  # (1, 1, V)


class Rows:
    """`n` token rows through every block in one `decode_layers_batch` C call: row i is token tokens[i] at
    position pos[i] of the cache whose layer-0 keys / values start at k_ptrs[i] / v_ptrs[i]. Every row's keys and
    values are written before any row attends, and row i attends over positions 0..pos[i] of its own cache, so rows
    may be B sequences' next tokens (a batched decode step) or consecutive positions of one sequence (a prefill
    chunk). The GEMM rows do not depend on one another and the per-row norm / RoPE / attention / SiLU are the batch-1
    decoder's functions, so each row's result is the same whatever else is in the call (bit for bit).

    Built by `Decoder.rows(n)`; holds float32 scratch for n rows (x, the residual stream, is `self.x`)."""

    def __init__(self, dec: Decoder, n: int) -> None:
        cfg = dec.config
        A, G, C = cfg.n_heads * cfg.head_dim, cfg.glu_dim, cfg.dim
        self.dec, self.n = dec, n
        self.x, h, att = torch.empty(n, C), torch.empty(n, C), torch.empty(n, A)
        qkv, gu, o, down = torch.empty(3, n, A), torch.empty(2, n, G), torch.empty(n, C), torch.empty(n, C)
        self._keep = [self.x, h, att, qkv, gu, o, down]
        self.layers = []
        for layer in dec.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w_in, w_post = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
            self._keep += [w_in, w_post]
            self.layers.append((
                w_in.data_ptr(), float(layer.input_layernorm.eps),
                w_post.data_ptr(), float(layer.post_attention_layernorm.eps),
                self._specs((attn.q_proj, attn.k_proj, attn.v_proj), qkv),
                self._specs((attn.o_proj,), [o])[0],
                self._specs((mlp.gate_proj, mlp.up_proj), gu),
                self._specs((mlp.down_proj,), [down])[0],
                h.data_ptr(), att.data_ptr(),
            ))  # fmt: skip
        self._all = tuple(self.layers)
        self._plan, self._plan_ext = self._all, None  # what decode_layers_batch takes: `_plan_for`
        emb = dec.model.embed_tokens.weight
        self._emb, self._emb_f32 = emb, emb.dtype is torch.float32
        self._embed_c = emb.dtype in Decoder._EMB_KINDS and emb.is_contiguous()  # `run_ptrs` can take its rows
        self._fixed = (C, cfg.n_heads, cfg.head_dim)
        self._rope = (dec._cos.data_ptr(), dec._sin.data_ptr())

    def _specs(self, mods, outs) -> tuple:
        rowlane = self.dec.rowlane_codes() if self.n >= 8 else {}  # one row: the GEMV, which reads qs
        out = []
        for m, y in zip(mods, outs):
            rl = rowlane.get(m)
            self._keep.extend([m.qs, m.seg_bounds, m.seg_d] + ([] if rl is None else [rl]))
            out.append(K.group_spec(m.qs, m.seg_bounds, m.seg_d, y, m._fmt_id, rl))  # TQ2_0 or TQ1_0 code bytes
        return tuple(out)

    def _plan_for(self, ext):
        """The blocks as `ext` takes them: its `layers_plan` of `self._all` (the tuples parsed once, instead of on
        every call: 50 us of each TriLM-1.1B step on the 2-core Xeon), or the tuple itself for an extension built
        before layers_plan. Kept per extension module (benchmarks swap `Decoder._ext` for another build); the
        addresses stay valid while this object keeps the tensors (`_keep`), and the Decoder is rebuilt when a packed
        layer changes (`check_unchanged`)."""
        if self._plan_ext is not ext:
            C, H, D = self._fixed
            self._plan = ext.layers_plan(self._all, C, H * D) if hasattr(ext, "layers_plan") else self._all
            self._plan_ext = ext
        return self._plan

    def run(self, tokens: Tensor, pos: Tensor, k_ptrs: Tensor, v_ptrs: Tensor, cache_like) -> Tensor:
        """The last hidden states (before the final norm) of len(tokens) <= n rows, `self.x[:B]`. tokens: int64 (B,);
        pos, k_ptrs, v_ptrs: contiguous int64 (B,); `cache_like`: a KVCache of the caches' layout and dtype."""
        dec = self.dec
        B = len(tokens)
        if not 0 < B <= self.n:
            raise ValueError(f"{B} rows for scratch of {self.n}")
        if self._embed_c and tokens.dtype is torch.int64 and tokens.is_contiguous() and hasattr(dec._ext, "embed_rows"):
            self.run_ptrs(B, tokens.data_ptr(), pos.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(), cache_like)
            return self.x[:B]
        dec.check_unchanged()
        x = self.x[:B]
        if self._emb_f32:
            torch.index_select(self._emb, 0, tokens, out=x)
        else:  # a packed checkpoint's 16-bit CompactEmbedding: rows widened to float32 (exact)
            x.copy_(torch.index_select(self._emb, 0, tokens))
        self._blocks(B, pos.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(), cache_like)
        return x

    def run_ptrs(self, B: int, ids: int, pos: int, k_ptrs: int, v_ptrs: int, cache_like) -> None:
        """`run` on rows given by address (int64 arrays of B token ids, positions and cache addresses), for callers
        that keep those arrays (`BatchDecoder`): the embedding rows (`embed_rows`) and every block in two C calls and
        no torch op. Needs an extension with `embed_rows` and an embedding of float32, float16 or bfloat16 rows
        (`_embed_c`); the hidden states are `self.x[:B]`."""
        dec = self.dec
        dec.check_unchanged()
        if not 0 < B <= self.n:
            raise ValueError(f"{B} rows for scratch of {self.n}")
        emb = self._emb
        dec._ext.embed_rows(emb.data_ptr(), Decoder._EMB_KINDS[emb.dtype], emb.shape[0], emb.shape[1], ids, B,
                            self.x.data_ptr())
        self._blocks(B, pos, k_ptrs, v_ptrs, cache_like)

    def _blocks(self, B: int, pos: int, k_ptrs: int, v_ptrs: int, cache_like) -> None:
        """Every block on the B rows of `self.x` (arrays by address, as `run_ptrs`)."""
        dec = self.dec
        ck = cache_like.k
        layer_bytes, head_stride, half = ck.stride(0) * ck.element_size(), ck.stride(2), KV_KINDS[ck.dtype]
        nt = dec._threads or K.default_threads()
        C, H, D = self._fixed
        args = (self.x.data_ptr(), B, C, H, D, pos, *self._rope, k_ptrs, v_ptrs)
        if hasattr(dec._ext, "decode_layers_batch"):  # every block in one call: the GIL is released once per pass
            plan = self._plan_for(dec._ext)
            dec._ext.decode_layers_batch(dec._path_id, nt, *args, layer_bytes, head_stride, D**-0.5, plan, half)
            return
        for i, spec in enumerate(self.layers):  # an extension built before decode_layers_batch
            dec._ext.decode_layer_batch(dec._path_id, nt, *args, i * layer_bytes, head_stride, D**-0.5, spec, half)


def torch_threads_for(step) -> contextlib.AbstractContextManager:
    """What a decoding loop runs its steps in: for a `Decoder` (whose kernels' pool does the work),
    `kernels.serial_torch()`, so that torch's few ops run on the calling thread and its OpenMP team does not spin on
    the pool's cores; for anything else (the model's own forward), nothing."""
    return K.serial_torch() if isinstance(step, Decoder) else contextlib.nullcontext()


def rowlane_of(pairs: list[tuple[nn.Module, Tensor]]) -> list[Tensor]:
    """`kernels.rowlane_codes(weight)` for each (packed module, its weight bytes: TQ2_0 codes, int8 rows, or TQ1_0
    codes, whose copy is made of the layer's TQ2_0 code bytes), kept on the modules. When any is
    missing, or its weight is another tensor or was written in place since (its version counter), all are made again
    into one buffer on 2 MiB pages in the order given (`packed.linear.code_arena`, the home of a loaded checkpoint's
    codes: each GEMM streams its copy once per step, and 4 KiB pages cost a TLB miss and a prefetcher restart every
    4 KiB)."""
    from spectra.packed.linear import code_arena

    held = [getattr(m, "_spectra_rowlane", None) for m, _ in pairs]
    if all(h is not None and h[0] is w and h[1] == w._version for h, (_, w) in zip(held, pairs)):
        return [h[2] for h in held]
    # a TQ1_0 layer's codes as TQ2_0 code bytes; TQ2_0 code bytes and int8 rows as they are
    raw = [torch.from_numpy(m.tq2_code_bytes()) if getattr(m, "format", None) == "tq1_0" else w for m, w in pairs]
    out = code_arena([K.rowlane_size(*b.shape) for b in raw])
    for (m, w), b, rl in zip(pairs, raw, out):
        rl.copy_(K.rowlane_codes(b))
        m._spectra_rowlane = (w, w._version, rl)
    return out


def decoder_for(model: nn.Module):
    """A `Decoder` for `model` when it can run it (a packed TriLM with compiled kernels), else the model itself."""
    if unsupported_reason(model) is not None:
        return model
    return Decoder(model)
