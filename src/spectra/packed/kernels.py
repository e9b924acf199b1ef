"""Ternary × int8 matrix products on packed weights: the compiled kernels, their CPU paths, and a pure-torch reference.

For weights in our block layout (`spectra.packed.formats`: TQ2_0 code bytes c = q+1 and scale segments) and a float
input x [T, K], every path computes y [T, N] = x Wᵀ in three steps:

1. Per-token int8 activations, absmax like llama.cpp's Q8_K but with one scale per token (over all K) and a
   symmetric range: amax = max_i |x_i|, a_i = clamp(round_half_even(x_i · (127/amax)), −127, 127), s = amax/127,
   all in float32. A token with amax = 0 gives a = 0 and s = 0; a token with a NaN or ±inf gives s = NaN (so its
   outputs are NaN, never a plausible number).
2. Integer dot products per scale segment σ (blocks over which each row's d is constant), using the codes directly:
   Σ_{i∈σ} q_i a_i = Σ_{i∈σ} (q_i+1)·a_i − Σ_{i∈σ} a_i. The first sum is what `vpdpbusd` (u8 × s8) computes; the
   second (`bsum`) is computed once per token.
3. Float epilogue in a fixed order, f = int32 → float32:
   y = s · (((0 + d_0·f(acc_0 − bsum_0)) + d_1·f(acc_1 − bsum_1)) + …).

Because the integer sums are exact and step 3 is the same sequence of float32 operations everywhere, every path
(`avx512vnni`, `avx2`, `scalar`, and `torch`, the reference below) gives bit-identical outputs. Against the float
TernaryLinear output the difference is the int8 activation rounding (≈0.5/127 of amax per element, random sign).

Two variants share step 1 and the epilogue:
- `ternary_matmul_group`: several matrices that multiply the same input (q|k|v, gate|up) in one C call. The input is
  quantized once, with one Σa per 256-block; each matrix's segment sums are integer sums of those, so every output is
  bit-identical to its own `ternary_matmul` call. The matrices are streamed one after the other.
- `int8_matmul`: int8 weights w ∈ [−127, 127] with one float32 scale r per row (the output layer, like llama.cpp's
  Q8_0 `output` tensor): y = s · (0 + r·f(Σ w_i a_i)). They are stored as u = w + 128 (uint8) in the activations'
  block order, and the AVX-512 path computes Σ u·a − 128·Σ a (`vpdpbusd` multiplies unsigned by signed bytes).
  `quantize_weight_int8` makes them: r = amax/127, w = clamp(round_half_even(W · (127/amax)), −127, 127) per row.
  `head_rows` is the end of a decode step around it: the final RMSNorm (the decoder's C norm), `int8_matmul`, and each
  row's argmax / log-sum-exp (`argmax_logsumexp`), in one C call.

`attention` (single-query attention per head over a KV cache slice, for decoding) is float32 and matches torch's
`scaled_dot_product_attention` to rounding, not bit for bit.

Weights in the TQ1_0 layout (`fmt="tq1_0"`: `formats` TQ1 code bytes, five base-3 codes per byte) go through their own
kernels (`csrc/tq1_kernels.h`), which decode the codes in registers and then make the same integer sums and the same
epilogue: their outputs equal the TQ2_0 kernels' on the same codes, bit for bit. The `avx512vnni` path decodes TQ1_0
with 64-entry byte-table lookups (`vpermb`: AVX-512 VBMI) and falls back to the AVX2 code on CPUs without VBMI.
The compiled kernels read TQ1_0 bytes in their own order (`tq1_to_kernel`: each row's qs bytes as one run, then its
qh bytes; on VBMI CPUs each byte re-encoded), which a TQ1_0 `PackedTernaryLinear` holds; `ternary_matmul` takes
llama.cpp's order and converts per call.

On CPUs with AMX-INT8 the `avx512vnni` path computes products of 5 or more tokens (prefill, batched decoding) on the
tile unit (`csrc/amx_kernels.h`): 32 weight rows are decoded to one code byte per weight, two blocks at a time, and
multiplied by 16-token tiles of the int8 activations with `tdpbusd`. The integer sums are the same, so are the outputs;
`use_amx(False)` switches it off. Where a TQ2_0 matrix or the int8 output layer comes with its `rowlane_codes` (below),
the tiles run token-major instead: 16 tokens of the activations, read in place, times the copy's 16-row dwords
(`tdpbsud`), so each result row is one token's 16 outputs, written without a transpose; such TQ2_0 matrices from 2
tokens (the output layer from 5), other TQ2_0 matrices from 64. `use_amx_tm(0)` switches that off.

Without AMX (or with it off) the `avx512vnni` path computes ternary products of 32 or more tokens (prefill) with the
token-lane GEMM (`csrc/lane_kernels.h`): the same decoded panels, multiplied with `vpdpbusd` by one row's four codes
broadcast against four activations of each of 16 tokens, so an accumulator holds finished sums of one row for 16
tokens and needs no horizontal reduction. The integer sums are the same, so are the outputs; `use_lane(0)` switches
it off. TQ2_0 products of 8 tokens up to 127 (K < 1024) or 255 (K >= 1024) tokens (batched decode steps, prompt
chunks), and int8 products from 8 tokens on, run the quad GEMM (`csrc/quad_kernels.h`) instead: vectors of 4 tokens
x 16 activation bytes against 16 weight bytes broadcast to all four 128-bit lanes, so 4 accumulators reduce to 16
finished outputs in 6 operations instead of the 4 x 4 tiles' 37-operation reduction per 16; `use_quad(0)` switches it
off (the lanes then start at 32 tokens). Fewer tokens use the 4 x 4 tiles (2 to 7) or the GEMV.

Where the weights also come interleaved by 16 rows (`rowlane_codes`: TQ2_0 code bytes, for a TQ1_0 matrix too, or
int8 output rows; the `Decoder` keeps such a copy for models with at most 64 MiB of codes, with AMX for TQ2_0 models
only), products of 8 or more tokens without AMX run the row-lane GEMM (`csrc/rowlane_kernels.h`) on every full
16-row group instead: the 16 lanes of an accumulator are 16 rows and one token, a token's 4 activation bytes are
broadcast, so a decoded code vector serves one `vpdpbusd` per token and no reduction is needed. Same integer sums,
same outputs; `use_rowlane(0)` switches it off.

Paths: `avx512vnni` (AVX-512 F/BW/VL + VNNI `vpdpbusd`), `avx2` (AVX2 `vpmaddubsw`), `scalar` (portable C, any
CPU), `torch` (this module's reference; used when the C extension is not built). `auto` picks the first supported.
The environment variable SPECTRA_KERNEL overrides `auto`. Threads (OpenMP, shared with torch's runtime) take
contiguous chunks of rows, so each reads one sequential weight stream at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from spectra.model import Q8_TINY
from spectra.packed import formats

PATHS = ("avx512vnni", "avx2", "scalar")  # best first
FORMAT_IDS = {"tq2_0": 0, "tq1_0": 1}  # weight layouts the kernels read (`formats`)
MAX_GROUP = 8  # matrices per `ternary_matmul_group` call
_PATH_IDS = {"scalar": 0, "avx2": 1, "avx512vnni": 2}
# The KV cache dtypes the C calls take, and their kind code there (`half`): float32, float16, q8 (int8 rows + scale).
KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}
_REQUIRES = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avx2": ("avx2", "fma"),
    "scalar": (),
}


_threads = threading.local()  # .n: the kernels' thread count while `serial_torch` holds torch to one thread


def default_threads() -> int:
    """Threads a kernel call uses when none is given: torch's count, or the one `serial_torch` kept for them."""
    return getattr(_threads, "n", None) or torch.get_num_threads()


@contextlib.contextmanager
def serial_torch() -> Iterator[int]:
    """Run torch's own ops on the calling thread alone, while the packed kernels keep the thread count torch had
    (`default_threads`; yielded). After a parallel op, torch's OpenMP threads spin for a while waiting for the next
    one, on the very cores that the kernels' pool (csrc/pool.h) needs: a decode step of 16 rows plus a 32-token
    prompt chunk took 16-20 ms with torch at 2 threads on a 2-core machine, 12 ms like this. Decoding loops run their
    steps inside it; the count is per calling thread, as torch's is."""
    n = default_threads()
    before, kept = torch.get_num_threads(), getattr(_threads, "n", None)
    _threads.n = n
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if before != 1:
            torch.set_num_threads(before)
        _threads.n = kept


@functools.cache
def extension():
    """The compiled `spectra.packed._kernels` module, or None when the package was installed without it."""
    try:
        from spectra.packed import _kernels
    except ImportError:
        return None
    return _kernels


@functools.cache
def _tq1_tables() -> tuple[np.ndarray, np.ndarray]:
    ext = extension()
    enc = np.frombuffer(ext.tq1_encoding(), dtype=np.uint8) if ext is not None and hasattr(ext, "tq1_encoding") \
        else np.arange(256, dtype=np.uint8)
    dec = np.empty(256, dtype=np.uint8)
    dec[enc] = np.arange(256, dtype=np.uint8)
    return enc, dec


def tq1_to_kernel(q1) -> np.ndarray:
    """TQ1_0 code bytes uint8 [N, K/256·52] (llama.cpp's order) -> the bytes a TQ1_0 `PackedTernaryLinear` holds and the
    compiled kernels read: dense rows (all qs bytes, then all qh bytes), each byte in this CPU's encoding
    (`csrc/tq1_kernels.h`: re-encoded where the AVX-512 VBMI kernels run, else unchanged). Same size."""
    return formats.tq1_kernel_order(q1, _tq1_tables()[0])


def tq1_from_kernel(qk) -> np.ndarray:
    """The inverse of `tq1_to_kernel`: TQ1_0 code bytes in llama.cpp's order."""
    return formats.tq1_llama_order(qk, _tq1_tables()[1])


def cpu_features() -> dict[str, bool]:
    """Instruction-set extensions the CPU and OS support (as seen by the compiled extension; {} without it)."""
    return dict(_ext_facts()[0])


@functools.cache
def _ext_facts() -> tuple[dict[str, bool], dict]:
    """The extension's CPU features and build info, asked once: every kernel call resolves its path through them
    (`supported_paths`); `resolve_path("auto")` took 4.2 us asking each time, 2.7 us now."""
    ext = extension()
    return (dict(ext.cpu_features()), dict(ext.build_info())) if ext is not None else ({}, {})


def use_amx(on: bool = True) -> bool:
    """Let the `avx512vnni` path hand products of 5 or more tokens to the AMX-INT8 tile unit where the CPU has one
    (Intel Sapphire Rapids and later; the default) or not (`on=False`: the AVX-512 GEMM, for A/B runs). Results are
    bit-identical either way. Returns whether AMX was in use before; False without AMX or without the extension."""
    ext = extension()
    return bool(ext.set_amx(on)) if ext is not None else False


def amx_in_use() -> bool:
    """Whether the `avx512vnni` path hands products of 5 or more tokens to the AMX tiles now: the CPU has them and
    `use_amx` has not switched them off. Call it while no kernel runs (it reads the switch by setting it back)."""
    ext = extension()
    if ext is None:
        return False
    was = bool(ext.set_amx(True))
    ext.set_amx(was)
    return was


def use_gfni(on: bool = True) -> bool:
    """Let the quad GEMM (batched TQ2_0 steps on the `avx512vnni` path without AMX) take each 2-bit code field out of
    its byte with one GFNI affine map where the CPU has GFNI (the default) or with a shift and an AND (`on=False`, as
    on CPUs without GFNI). Results are bit-identical either way. Returns whether GFNI was in use before; False without
    GFNI or without the extension."""
    ext = extension()
    return bool(ext.set_gfni(on)) if ext is not None and hasattr(ext, "set_gfni") else False


def use_batch_split(on: bool = True) -> bool:
    """Let a batched step of a small packed model on 2 threads run as two row ranges, each through every block on its
    own thread (the default), or spread each block's GEMMs, attention and per-row steps over the threads in turn
    (`on=False`, for A/B runs and tests). Where it applies is the extension's rule (`split_parts` in
    ternary_kernels.c: blocks of at most 1 MiB of codes, AMX on TQ2_0 codes from 5 rows a range or the AVX-512 GEMMs
    from 8, a prompt chunk's rows in one range). Results are bit-identical either way. Returns the previous setting;
    False without the extension."""
    ext = extension()
    return bool(ext.set_batch_split(on)) if ext is not None and hasattr(ext, "set_batch_split") else False


def use_far_pairs(mode: int = -1, pf_step: int | None = None) -> tuple[int, int]:
    """How the one-token TQ2_0 GEMV pairs its rows: `mode` -1 (the default) reads far pairs (row r of a 16-row group
    with row r of the group half its range away: two DRAM streams side by side, one prefetch per line `pf_step`
    bytes ahead, 0 for none) in a decode step on the CPUs they were measured on (AMD Zen 5) when the model's blocks do
    not fit in the last-level cache; 1 always (every one-token TQ2_0 product); 0 never (adjacent pairs, one stream).
    Results are bit-identical either way. Returns the previous (mode, pf_step); (0, 0) without the extension. For
    A/B runs and tests (`ternary_kernels.c`: gemv1_far_avx512)."""
    ext = extension()
    if ext is None or not hasattr(ext, "set_far_pairs"):
        return (0, 0)
    return tuple(ext.set_far_pairs(int(mode), -1 if pf_step is None else int(pf_step)))


def use_lane(min_tokens: int = 32) -> int:
    """Let the `avx512vnni` path compute ternary products of `min_tokens` or more tokens with the token-lane GEMM (the
    default is 32; 0 switches it off, for A/B runs and tests). While the quad GEMM is on (`use_quad`), TQ2_0 products
    reach the lanes only from 128 tokens (K < 1024) or 256 (K >= 1024). Results are bit-identical either way. Returns
    the previous setting; 0 without the extension."""
    ext = extension()
    return int(ext.set_lane(int(min_tokens))) if ext is not None else 0


def use_quad(min_tokens: int = 8) -> int:
    """Let the `avx512vnni` path compute products of `min_tokens` or more tokens with the quad GEMM
    (`csrc/quad_kernels.h`): TQ2_0 up to 127 tokens (K < 1024) or 255 (K >= 1024), TQ1_0 up to 31 (on VBMI CPUs),
    int8 at any count (the default is 8; 0 switches it off, for A/B runs and tests: the 4 x 4 tiles and, from 32
    tokens, the lanes run instead).
    Results are bit-identical either way. Returns the previous setting; 0 without the extension."""
    ext = extension()
    return int(ext.set_quad(int(min_tokens))) if ext is not None else 0


def use_amx_tm(min_tokens: int = 64) -> int:
    """Where AMX runs a TQ2_0 product, run it token-major (`csrc/amx_kernels.h`: C tiles of tokens x weight rows, the
    outputs written without a transpose): from 2 tokens when the matrix comes with its `rowlane_codes` (the tiles'
    rows; an int8 output layer with its copy from 5), else from `min_tokens` tokens (the default 64; 0 switches the
    token-major GEMM off, for A/B runs and tests). Results are bit-identical either way. Returns the previous
    setting; 0 without the extension."""
    ext = extension()
    return int(ext.set_amx_tm(int(min_tokens))) if ext is not None and hasattr(ext, "set_amx_tm") else 0


def use_rowlane(min_tokens: int = 8) -> int:
    """Let the `avx512vnni` path compute products of `min_tokens` or more tokens with the row-lane GEMM
    (`csrc/rowlane_kernels.h`) where the weights come with their interleaved copy (`rowlane_codes`; the default is 8; 0
    switches it off, for A/B runs and tests). Results are bit-identical either way. Returns the previous setting; 0
    without the extension or in a build without the kernel."""
    ext = extension()
    return int(ext.set_rowlane(int(min_tokens))) if ext is not None and hasattr(ext, "set_rowlane") else 0


ROWLANE_ROWS = 16  # rows per interleaved group (csrc/rowlane_kernels.h)


def rowlane_size(N: int, W: int) -> int:
    """Bytes of `rowlane_codes` of weight bytes [N, W]: the full 16-row groups only."""
    return N // ROWLANE_ROWS * ROWLANE_ROWS * W


def check_rowlane(rl: Tensor | None, N: int, W: int, of: str) -> None:
    """A ValueError unless rl is None or `rowlane_codes` of weight bytes [N, W] (`of` names them): contiguous uint8 of
    `rowlane_size(N, W)` bytes."""
    want = rowlane_size(N, W)
    if rl is not None and (rl.dtype != torch.uint8 or not rl.is_contiguous() or rl.numel() != want):
        raise ValueError(f"rl must be rowlane_codes of {of} (contiguous uint8, {want} bytes), got {rl.dtype} "
                         f"{tuple(rl.shape)}")


def rowlane_codes(qs: Tensor) -> Tensor:
    """Weight bytes qs [N, W] (TQ2_0 code bytes, W = nb * 64, or an int8 output layer's u = w + 128, W = K)
    interleaved for the row-lane GEMM (`csrc/rowlane_kernels.h`): for each full group of 16 rows, dword p of every row
    of the group in turn, p = 0 .. W / 4 - 1 (uint8 [N // 16 * 16 * W], the same bytes in another order). Rows after
    the last full group are read from qs itself."""
    if qs.dtype != torch.uint8 or qs.dim() != 2 or qs.shape[1] % 64:
        raise ValueError(f"rowlane_codes takes uint8 weight bytes [N, W], W a multiple of 64, got {qs.dtype} "
                         f"{tuple(qs.shape)}")
    N, W = qs.shape
    G = N // ROWLANE_ROWS
    return qs[: G * ROWLANE_ROWS].reshape(G, ROWLANE_ROWS, W // 4, 4).transpose(1, 2).contiguous().view(-1)


def supported_paths() -> list[str]:
    """Kernel paths usable here, best first; `torch` (the reference) is always last."""
    ext = extension()
    if ext is None:
        return ["torch"]
    feats = cpu_features()
    simd = _ext_facts()[1]["x86_simd"]
    out = [p for p in PATHS if all(feats.get(f, False) for f in _REQUIRES[p]) and (p == "scalar" or simd)]
    return out + ["torch"]


def resolve_path(path: str = "auto") -> str:
    """'auto' -> the best supported path; a forced path the CPU (or build) lacks is a ValueError."""
    path = str(path).lower()
    if path == "auto":
        path = os.environ.get("SPECTRA_KERNEL", "auto").lower() or "auto"
        if path == "auto":
            return supported_paths()[0]
    accepted = ("auto", *PATHS, "torch")
    if path not in accepted:
        raise ValueError(f"unknown kernel path {path!r}; accepted: {', '.join(accepted)}")
    available = supported_paths()
    if path not in available:
        if extension() is None:
            raise ValueError(
                f"kernel path {path!r} needs spectra's compiled extension, which is not built; reinstall with a C "
                "compiler available (pip install .), or use path='torch'"
            )
        missing = [f for f in _REQUIRES[path] if not cpu_features().get(f, False)]
        raise ValueError(
            f"kernel path {path!r} needs CPU features {list(_REQUIRES[path])}; this CPU lacks {missing}. "
            f"Available here: {', '.join(available)}"
        )
    return path


# ---- pure-torch reference -----------------------------------------------------------------------------------------


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference step 1: x float [T, K] -> (a int8 [T, K], s float32 [T]) with the rule in the module docstring."""
    x = x.float()
    finite = torch.isfinite(x).all(dim=1)
    amax = torch.where(finite, x.abs().amax(dim=1), torch.zeros_like(x[:, 0]))
    amax = torch.where(amax < Q8_TINY, torch.zeros_like(amax), amax)  # 127 / amax would overflow: a zero row
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.full_like(safe, 127.0) / safe
    a = torch.round(x * inv[:, None]).clamp_(-127, 127)
    a = torch.where((amax > 0)[:, None], a, torch.zeros_like(a)).to(torch.int8)
    s = torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    return a, s


def reference_matmul(x: Tensor, qs: Tensor, bounds: Tensor, seg_d: Tensor, fmt: str = "tq2_0") -> Tensor:
    """Pure-torch y [T, N] = x [T, K] Wᵀ, bit-identical to the compiled kernels (module docstring, steps 1–3).
    `qs` holds TQ2_0 code bytes, or TQ1_0 code bytes with fmt="tq1_0" (decoded here to the same codes)."""
    if formats.canonical_format(fmt) == "tq1_0":
        qs = torch.from_numpy(formats.tq2_code_bytes(qs.numpy()))
    a, s = quantize_activations(x)
    codes = torch.from_numpy(formats.unpack_codes(qs.numpy())).double()
    a64 = a.double()
    y = torch.zeros(x.shape[0], qs.shape[0], dtype=torch.float32)
    for j in range(bounds.numel() - 1):
        lo, hi = int(bounds[j]) * 256, int(bounds[j + 1]) * 256
        # Float64 sums of integers below 2^53 are exact, so these are the integer dot products.
        acc = (a64[:, lo:hi] @ codes[:, lo:hi].T).to(torch.int64)  # Σ q·a = Σ (q+1)·a − Σ a
        y = y + seg_d[:, j].float()[None, :] * acc.to(torch.float32)
    return y * s[:, None]


# ---- dispatch -----------------------------------------------------------------------------------------------------


def check_operands(x: Tensor, qs: Tensor, bounds: Tensor, seg_d: Tensor, fmt: str = "tq2_0") -> None:
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 matrix [T, K], got {x.dtype} {tuple(x.shape)}")
    tq1 = formats.canonical_format(fmt) == "tq1_0"
    width, what = (x.shape[1] // 256 * formats.TQ1_CODE_BYTES, "K/256*52") if tq1 else (x.shape[1] // 4, "K/4")
    if qs.dim() != 2 or qs.dtype != torch.uint8 or not qs.is_contiguous() or qs.shape[1] != width:
        raise ValueError(
            f"qs must be contiguous uint8 [N, {what}] with K={x.shape[1]} ({fmt}), got {qs.dtype} {tuple(qs.shape)}"
        )
    if x.shape[1] % 256 or x.shape[1] > 1 << 22:
        raise ValueError(f"row length {x.shape[1]} must be a multiple of 256 and at most 2^22")
    S = bounds.numel() - 1
    if bounds.dtype != torch.int32 or not bounds.is_contiguous() or S < 1:
        raise ValueError("bounds must be a contiguous int32 vector of S+1 block indices")
    if seg_d.dtype != torch.float32 or not seg_d.is_contiguous() or tuple(seg_d.shape) != (qs.shape[0], S):
        raise ValueError(
            f"seg_d must be contiguous float32 [{qs.shape[0]}, {S}], got {seg_d.dtype} {tuple(seg_d.shape)}"
        )
    for t in (x, qs, bounds, seg_d):
        if t.device.type != "cpu":
            raise ValueError(f"spectra's ternary kernels run on CPU; got a tensor on {t.device}")


def ternary_matmul(
    x: Tensor,
    qs: Tensor,
    bounds: Tensor,
    seg_d: Tensor,
    *,
    fmt: str = "tq2_0",
    path: str = "auto",
    n_threads: int | None = None,
) -> Tensor:
    """y [T, N] float32 = x [T, K] Wᵀ for packed ternary W (see module docstring), `qs` in the layout of `fmt`
    ('tq2_0' code bytes [N, K/4] or 'tq1_0' code bytes [N, K/256·52], llama.cpp's order: copied into the kernels' order
    per call, which a `PackedTernaryLinear` holds instead). Validates its operands."""
    fmt = formats.canonical_format(fmt)
    check_operands(x, qs, bounds, seg_d, fmt)
    path = resolve_path(path)
    if path == "torch":
        return reference_matmul(x, qs, bounds, seg_d, fmt)
    if fmt == "tq1_0":
        qs = torch.from_numpy(tq1_to_kernel(qs.numpy()))
    y = torch.empty(x.shape[0], qs.shape[0], dtype=torch.float32)
    extension().matmul(
        _PATH_IDS[path],
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        qs.data_ptr(),
        qs.shape[0],
        bounds.data_ptr(),
        bounds.numel() - 1,
        seg_d.data_ptr(),
        y.data_ptr(),
        n_threads or default_threads(),
        FORMAT_IDS[fmt],
    )
    return y


def group_spec(qs: Tensor, bounds: Tensor, seg_d: Tensor, y: Tensor, fmt_id: int, rl: Tensor | None = None) -> tuple:
    """One matrix as the C group calls take it (`matmul_group`, `decode_layer_batch`, `decode_layers_batch`):
    (qs, N, bounds, S, seg_d, y, fmt[, rl]) with addresses for the tensors; y receives x Wᵀ; rl, the `rowlane_codes`
    of the matrix's TQ2_0 code bytes (a TQ1_0 matrix's too) for the row-lane GEMM. The caller keeps the tensors alive
    for as long as the spec is used."""
    spec = (qs.data_ptr(), qs.shape[0], bounds.data_ptr(), bounds.numel() - 1, seg_d.data_ptr(), y.data_ptr(), fmt_id)
    return spec if rl is None else (*spec, rl.data_ptr())


def ternary_matmul_group(
    x: Tensor,
    operands: Sequence[tuple],
    *,
    path: str = "auto",
    n_threads: int | None = None,
) -> list[Tensor]:
    """[x Wⱼᵀ for each (qs, bounds, seg_d[, fmt[, rl]]) in `operands`] (1 to 8 matrices, TQ2_0 and TQ1_0 layouts may
    mix), bit-identical to separate `ternary_matmul` calls; the compiled paths quantize x once and run every matrix
    in one call. rl: `rowlane_codes` of the matrix's TQ2_0 code bytes (of a TQ1_0 matrix too:
    `formats.tq2_code_bytes`), which the row-lane GEMM reads (or None)."""
    if not 1 <= len(operands) <= MAX_GROUP:
        raise ValueError(f"a group holds 1 to {MAX_GROUP} matrices, got {len(operands)}")
    ops = [(*op[:3], formats.canonical_format(op[3] if len(op) > 3 else "tq2_0")) for op in operands]
    rls = [op[4] if len(op) > 4 else None for op in operands]
    for op, rl in zip(ops, rls):
        check_operands(x, *op)
        check_rowlane(rl, op[0].shape[0], x.shape[1] // 4, "the matrix's TQ2_0 code bytes")
    path = resolve_path(path)
    if path == "torch":
        return [reference_matmul(x, *op) for op in ops]
    ops = [(torch.from_numpy(tq1_to_kernel(op[0].numpy())), *op[1:]) if op[3] == "tq1_0" else op for op in ops]
    ys = [torch.empty(x.shape[0], op[0].shape[0], dtype=torch.float32) for op in ops]
    specs = tuple(group_spec(qs, bounds, seg_d, y, FORMAT_IDS[fmt], rl)
                  for (qs, bounds, seg_d, fmt), y, rl in zip(ops, ys, rls))
    extension().matmul_group(
        _PATH_IDS[path], x.data_ptr(), x.shape[0], x.shape[1], n_threads or default_threads(), specs
    )
    return ys


def set_prefetch(
    gemv_step: int,
    i8_bytes: int,
    i8_every_line: bool,
    gemv_copies: int | None = None,
    tq1_step: int | None = None,
    gemv_fixed: bool | None = None,
) -> tuple[int, int, bool, int, int, bool]:
    """Set the GEMV prefetch settings the extension chose for this CPU at import, returning the previous six (on
    Intel: 3072, 2048, True, 3, 3072, True; on AMD Zen 5, family 1Ah: 8192, 8192, False, 3, 6144, False; else 6144,
    8192, False, 3, 6144, False): `gemv_step` and `gemv_copies`, the one-token TQ2_0 GEMV prefetches every line
    `gemv_copies` (1-3) times, at 1 .. gemv_copies x gemv_step bytes ahead; `i8_bytes` and `i8_every_line`, the int8
    output layer's distance and whether every line is prefetched (else one per 4); `tq1_step`, the TQ1_0 GEMV's three
    prefetches at 1, 2, 3 x tq1_step; `gemv_fixed`, with three copies, run the GEMV's loop with the three fixed at
    compile time instead of the one that tests the count per block (faster on the Intel Xeon measured; AMD keeps the
    counted loop, whose layout was the faster one on Zen 5). None keeps the current value. For tuning on other CPUs
    and A/B runs; call it while no kernel runs. Outputs do not depend on it."""
    ext = extension()
    if ext is None or not hasattr(ext, "set_prefetch"):
        raise RuntimeError("set_prefetch needs the compiled extension")
    kwargs = {k: int(v) for k, v in {"gemv_copies": gemv_copies, "tq1_step": tq1_step}.items() if v is not None}
    if gemv_fixed is not None:
        kwargs["gemv_fixed"] = bool(gemv_fixed)
    return ext.set_prefetch(int(gemv_step), int(i8_bytes), bool(i8_every_line), **kwargs)


def stream_read(buf: Tensor, n_threads: int, *, streams: int = 2, prefetch: int = 1024, path: str = "auto") -> int:
    """Read the contiguous CPU tensor `buf` once with n_threads threads of the kernels' pool, each reading its part as
    `streams` sequential streams side by side with software prefetch `prefetch` bytes ahead (0: none); returns how
    many bytes were read (the largest multiple of 256 * streams * n_threads that fits). The read-rate probe of
    `benchmarks/peers.py`: time it to bound what a GEMV that streams its weights can reach."""
    ext = extension()
    if ext is None:
        raise RuntimeError("stream_read needs the compiled extension")
    if buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError(f"stream_read takes a contiguous CPU tensor, got one on {buf.device}")
    nbytes = buf.numel() * buf.element_size()
    return ext.stream_read(_PATH_IDS[resolve_path(path)], n_threads, buf.data_ptr(), nbytes, streams, prefetch)[0]


def core_round_trip_ns(iters: int = 200_000) -> float | None:
    """Nanoseconds per round trip of one cache line between two threads that spin on it (the mean over `iters`), or
    None where it cannot be measured (no extension, not Linux, or the second thread did not run within a second). On a
    2-core VM it says whether the two cores share a last-level cache: `benchmarks/peers.py` records it around every
    round, since the DRAM read rate of two threads moves with it."""
    ext = extension()
    if ext is None or not hasattr(ext, "core_round_trip"):
        return None
    ns = ext.core_round_trip(int(iters))
    return ns if ns > 0 else None


def use_huge_pages(*tensors: Tensor) -> int:
    """Back the memory of CPU tensors with 2 MiB pages in place (Linux transparent huge pages; same addresses and
    values). Returns the bytes now in 2 MiB pages (0 without the extension, off Linux, or before Linux 6.1).

    The GEMV reads its weights once per call from DRAM, and on 4 KiB pages every 4 KiB costs a TLB miss and a restart
    of the hardware prefetcher: a 4096×4096 TQ2_0 GEMV (4 MiB) takes about 0.21–0.24 ms on 4 KiB pages and 0.17–0.19
    ms on 2 MiB pages on one core here (`benchmarks/gemv.py`). Call it once on long-lived weight buffers; the whole
    2 MiB pages around a tensor are included, which changes only their physical backing.
    """
    ext = extension()
    if ext is None:
        return 0
    done = 0
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"use_huge_pages takes CPU tensors, got a tensor on {t.device}")
        nbytes = t.untyped_storage().nbytes()
        if nbytes:
            done += ext.huge_pages(t.untyped_storage().data_ptr(), nbytes)
    return done


# ---- int8 weights -------------------------------------------------------------------------------------------------

INT8_MAX_K = 1 << 16  # Σ u·a with u <= 255, |a| <= 127 stays below 2^31 up to this row length


def quantize_weight_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """W float [N, K] (K a multiple of 256) -> (u uint8 [N, K] = w + 128 in the kernels' block order, r float32 [N]).

    Per row: amax = max |W|, r = amax/127, w = clamp(round_half_even(W · (127/amax)), −127, 127); a zero row gives
    r = 0 and w = 0. Non-finite weights are a ValueError.
    """
    if w.dim() != 2 or w.shape[1] % 256 or not 0 < w.shape[1] <= INT8_MAX_K:
        raise ValueError(
            f"int8 weights need a matrix [N, K] with K a multiple of 256 up to {INT8_MAX_K}, got {tuple(w.shape)}"
        )
    w = w.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise ValueError("the weight matrix has NaN or infinite entries")
    amax = w.abs().amax(dim=1)
    amax = torch.where(amax < Q8_TINY, torch.zeros_like(amax), amax)  # 127 / amax would overflow: a zero row
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.round(w * (torch.full_like(safe, 127.0) / safe)[:, None]).clamp_(-127, 127)
    q = torch.where((amax > 0)[:, None], q, torch.zeros_like(q))
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return permute_activations(u).contiguous(), torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))


def reference_int8_matmul(x: Tensor, u: Tensor, scale: Tensor) -> Tensor:
    """Pure-torch y [T, N] = x [T, K] Wᵀ for `quantize_weight_int8` weights, bit-identical to the compiled kernels."""
    a, s = quantize_activations(x)
    w = unpermute_activations(u).double() - 128.0
    acc = a.double() @ w.T  # exact: integer sums below 2^53
    y = torch.zeros(x.shape[0], u.shape[0], dtype=torch.float32) + scale.float()[None, :] * acc.to(torch.float32)
    return y * s[:, None]


def check_int8_operands(x: Tensor, u: Tensor, scale: Tensor) -> None:
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 matrix [T, K], got {x.dtype} {tuple(x.shape)}")
    if u.dim() != 2 or u.dtype != torch.uint8 or not u.is_contiguous() or u.shape[1] != x.shape[1]:
        raise ValueError(f"u must be contiguous uint8 [N, {x.shape[1]}], got {u.dtype} {tuple(u.shape)}")
    if x.shape[1] % 256 or x.shape[1] > INT8_MAX_K:
        raise ValueError(f"row length {x.shape[1]} must be a multiple of 256 and at most {INT8_MAX_K}")
    if scale.dtype != torch.float32 or not scale.is_contiguous() or tuple(scale.shape) != (u.shape[0],):
        raise ValueError(f"scale must be contiguous float32 [{u.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
    for t in (x, u, scale):
        if t.device.type != "cpu":
            raise ValueError(f"spectra's int8 kernels run on CPU; got a tensor on {t.device}")


def int8_matmul(x: Tensor, u: Tensor, scale: Tensor, *, path: str = "auto", n_threads: int | None = None) -> Tensor:
    """y [T, N] float32 = x [T, K] Wᵀ for int8 W (`quantize_weight_int8`). Validates its operands."""
    check_int8_operands(x, u, scale)
    path = resolve_path(path)
    if path == "torch":
        return reference_int8_matmul(x, u, scale)
    y = torch.empty(x.shape[0], u.shape[0], dtype=torch.float32)
    extension().matmul_i8(
        _PATH_IDS[path],
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        u.data_ptr(),
        u.shape[0],
        scale.data_ptr(),
        y.data_ptr(),
        n_threads or default_threads(),
    )
    return y


# ---- single-query attention (decoding) -----------------------------------------------------------------------------


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √D) v per head: q [H, D], k and v [H, S, D] -> [H, D] (torch's scaled_dot_product_attention)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q[:, None].float(), k.float(), v.float())[:, 0]


def attention(q: Tensor, k: Tensor, v: Tensor, *, path: str = "auto", n_threads: int | None = None) -> Tensor:
    """`reference_attention` for one query per head, in one C call (float32 arithmetic; equal to the reference up to
    float rounding, ~1e-7 relative: the sums run in another order). k and v may be slices of a KV cache: rows
    contiguous, any head stride, the same for both; float32, both float16 (widened exactly), or both q8 (int8 [H, S,
    D + 4]: D values and a float32 scale per row, `model.KVCache`; the reference attends over scale * values)."""
    q8 = k.dtype == torch.int8 and v.dtype == torch.int8
    row = q.shape[-1] + 4 if q8 else q.shape[-1]
    if q.dim() != 2 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != row:
        raise ValueError(f"need q [H, D], k and v [H, S, D] (q8: D + 4); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    half = k.dtype == torch.float16 and v.dtype == torch.float16
    for t in (q, k, v):
        if (t.dtype != torch.float32 and not ((half or q8) and t is not q)) or t.device.type != "cpu":
            raise ValueError(f"attention runs on a float32 q and float32, float16 or q8 k, v on the CPU, got {t.dtype} "
                             f"on {t.device}")
    H, S, D = k.shape[0], k.shape[1], q.shape[1]
    if k.stride() != v.stride() or k.stride()[1:] != (row, 1) or not q.is_contiguous() or D > 256:
        raise ValueError("k and v need rows of D <= 256 contiguous values and equal strides; q must be contiguous")
    path = resolve_path(path)
    if path == "torch":
        if q8:
            k, v = (t[..., :D].float() * t[..., D:].contiguous().view(torch.float32) for t in (k, v))
        return reference_attention(q, k.float(), v.float())
    out = torch.empty(H, D, dtype=torch.float32)
    extension().attend(
        _PATH_IDS[path],
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        H,
        S,
        D,
        k.stride(0),
        D**-0.5,
        n_threads or default_threads(),
        KV_KINDS[k.dtype],
    )
    return out


# ---- test helpers -------------------------------------------------------------------------------------------------


def kernel_quantize(x: Tensor, bounds: Tensor, *, path: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The compiled step 1, for tests: (a int8 [T, K] in the kernels' permuted block order, bsum int32 [T, S], s)."""
    path = resolve_path(path)
    if path == "torch":
        raise ValueError("kernel_quantize needs a compiled path")
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] % 256:
        raise ValueError(f"x must be a contiguous float32 [T, K] with K a multiple of 256, got {tuple(x.shape)}")
    if bounds.dtype != torch.int32 or int(bounds[0]) != 0 or int(bounds[-1]) != x.shape[1] // 256:
        raise ValueError("bounds must be int32 block indices from 0 to K/256")
    T, K = x.shape
    S = bounds.numel() - 1
    a = torch.empty(T, K, dtype=torch.int8)
    bsum = torch.empty(T, S, dtype=torch.int32)
    s = torch.empty(T, dtype=torch.float32)
    extension().quantize(
        _PATH_IDS[path], x.data_ptr(), T, K, bounds.data_ptr(), S, a.data_ptr(), bsum.data_ptr(), s.data_ptr()
    )
    return a, bsum, s


def permute_activations(a: Tensor) -> Tensor:
    """Natural element order -> the kernels' per-block order (position 64l + 32h + m holds element 128h + 32l + m)."""
    T, K = a.shape
    return a.view(T, K // 256, 2, 4, 32).transpose(2, 3).reshape(T, K)


def unpermute_activations(a: Tensor) -> Tensor:
    """The inverse of `permute_activations`: the kernels' per-block order -> natural element order."""
    T, K = a.shape
    return a.view(T, K // 256, 4, 2, 32).transpose(2, 3).reshape(T, K)


def argmax(x: Tensor, *, path: str = "auto") -> Tensor:
    """torch.argmax(x, -1) for float32 rows in one C call (the first index of the maximum, or of the first NaN, as
    torch answers); any other input goes to torch. Greedy decoding picks from a vocabulary of 50k logits per row,
    which torch's argmax scans in ~70 us and this in a few."""
    return _per_row("argmax", x, torch.int64, torch.argmax, path)


def logsumexp(x: Tensor, *, path: str = "auto") -> Tensor:
    """torch.logsumexp(x, -1) for float32 rows in one C call (max + log Σ exp(x − max), float32 terms and a double sum;
    ~1e-6 relative to torch's); any other input goes to torch. log_softmax(x)_i = x_i − logsumexp(x)."""
    return _per_row("logsumexp", x, torch.float32, torch.logsumexp, path)


def argmax_logsumexp(
    x: Tensor, *, with_lse: bool = True, n_threads: int = 1, path: str = "auto"
) -> tuple[Tensor, Tensor | None]:
    """(argmax(x), logsumexp(x) or None) over the last dimension, exactly what `argmax` and `logsumexp` give, in one C
    call that splits the rows over `n_threads` of the kernels' pool and releases the GIL (a batched decode step's greedy
    picks and log-probabilities); torch for what the C functions do not take."""
    path = _row_path(x, path)
    if path is None:
        return torch.argmax(x, -1), (torch.logsumexp(x, -1) if with_lse else None)
    rows = x.reshape(-1, x.shape[-1])
    idx = torch.empty(rows.shape[0], dtype=torch.int64)
    lse = torch.empty(rows.shape[0], dtype=torch.float32) if with_lse else None
    extension().argmax_logsumexp(_PATH_IDS[path], max(1, int(n_threads)), rows.data_ptr(), rows.shape[0],
                                 rows.shape[1], idx.data_ptr(), 0 if lse is None else lse.data_ptr())  # fmt: skip
    return idx.reshape(x.shape[:-1]), (None if lse is None else lse.reshape(x.shape[:-1]))


def sample(
    x: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None, *, u: float,
    path: str = "auto",
) -> int:
    """One draw from a (V,) logit row: s = x / temperature (float32), kept to the top_k largest s (ties with the k-th
    stay) and then to the nucleus (top_p < 1: a token stays while the tokens strictly more likely than it weigh less
    than top_p of the kept total), weights e^(s - max s) (0 below e^-87, where float32 turns subnormal); the token is
    the first, in index order, whose running sum of weights passes u times their total (u uniform in [0, 1)). One C
    call (`sample`: 0.04-0.2 ms for 50k logits, where torch's softmax and multinomial take about 1 ms and its sort
    for top_p 3-4); `reference_sample` where the C function does not take x. Where the largest s is NaN or ±inf (x / T
    overflowed: T below ~1e-37, or 0 as a float) the draw is greedy, x's argmax, the limit of T -> 0 (the first +inf s
    was taken, not the largest x); -inf is never drawn."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    k = 0 if top_k is None or top_k >= x.shape[-1] else int(top_k)
    p = 1.0 if top_p is None else float(top_p)
    if not (0.0 <= u < 1.0) or k < 0 or not 0.0 < p <= 1.0 or x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"bad sampling arguments: u={u}, top_k={top_k}, top_p={top_p}, logits {tuple(x.shape)}")
    path = _row_path(x, path)
    if path is None:
        return reference_sample(x, temperature, k or None, p, u=u)
    return extension().sample(_PATH_IDS[path], x.data_ptr(), x.numel(), float(temperature), k, p, float(u))


def sample_rows(
    x: Tensor, temperature: Sequence[float], top_k: Sequence[int | None], top_p: Sequence[float | None],
    u: Sequence[float], *, rows: Sequence[int] | None = None, n_threads: int = 1, path: str = "auto",
) -> list[int]:
    """`sample` for rows `rows` of x [N, V] (default: every row), each with its own temperature, top_k, top_p and u,
    in one C call over `n_threads` of the kernels' pool (a sampled batched step); row by row through `sample` where
    the C function does not take x. The same draws as `sample` row by row."""
    V = x.shape[1]
    rows = list(range(x.shape[0])) if rows is None else [int(r) for r in rows]
    B = len(rows)
    if not len(temperature) == len(top_k) == len(top_p) == len(u) == B:
        raise ValueError(f"need one temperature, top_k, top_p and u per sampled row ({B})")
    if any(not 0 <= r < x.shape[0] for r in rows):
        raise ValueError(f"rows must be in 0..{x.shape[0] - 1}, got {rows}")
    path = _row_path(x, path)
    if path is None or B == 0:
        return [sample(x[r], temperature[b], top_k[b], top_p[b], u=u[b], path="torch" if path is None else path)
                for b, r in enumerate(rows)]  # fmt: skip
    for b in range(B):
        if not temperature[b] > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature[b]} for row {rows[b]}")
    idx = torch.tensor(rows, dtype=torch.int64)
    T = torch.tensor([float(t) for t in temperature], dtype=torch.float64)
    k = torch.tensor([0 if t is None or t >= V else int(t) for t in top_k], dtype=torch.int64)
    p = torch.tensor([1.0 if t is None else float(t) for t in top_p], dtype=torch.float64)
    uu = torch.tensor([float(t) for t in u], dtype=torch.float64)
    out = torch.empty(B, dtype=torch.int64)
    extension().sample_rows(_PATH_IDS[path], max(1, int(n_threads)), x.data_ptr(), V, idx.data_ptr(), B, T.data_ptr(),
                            k.data_ptr(), p.data_ptr(), uu.data_ptr(), out.data_ptr())  # fmt: skip
    return out.tolist()


def reference_sample(x: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None, *,
                     u: float) -> int:
    """`sample` restated in torch (float64 weights and sums, so a draw may differ from the C one's where u falls
    within rounding of the boundary between two tokens)."""
    s = x.float() / temperature
    top = int(torch.argmax(s))
    m = float(s[top])
    if m != m or m in (float("inf"), float("-inf")):  # x / T overflowed: T -> 0 is greedy
        return int(torch.argmax(x.float()))
    keep = torch.isfinite(s) & (s - m >= -87.0)  # the C draw's floor: e^-87, about the smallest normal float
    if top_k is not None and top_k < s.numel():
        keep &= s >= torch.topk(s, top_k).values[-1]
    w = torch.where(keep, torch.exp(s.double() - m), torch.zeros((), dtype=torch.float64))
    if top_p is not None and top_p < 1.0:  # the weight strictly above each value (a tie's members see the same)
        vals, order = torch.sort(s)
        suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(w[order], [0]), 0), [0]), torch.zeros(1).double()])
        above = suffix[torch.searchsorted(vals, s, right=True)]
        w = torch.where(keep & (above < top_p * float(w.sum())), w, torch.zeros((), dtype=torch.float64))
    cum = torch.cumsum(w, 0)
    hit = torch.nonzero(cum > u * float(cum[-1]))
    return int(hit[0]) if hit.numel() else int(torch.nonzero(w)[-1])


def head_rows(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    head: Tensor,
    scale: Tensor,
    *,
    argmax: bool = False,
    lse: bool = False,
    logits: bool = True,
    n_threads: int | None = None,
    path: str = "auto",
    rl: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The end of a decode step for the rows x [B, C] of the residual stream: (logits [B, V], argmax [B] or None,
    logsumexp [B] or None, top [B] or None), where the logits are the int8 output layer (`int8_matmul`, head u [V, C]
    and its row scales) of the final RMSNorm of x (weight `norm_weight`, the decoder's per-row norm: equal to the
    model's RMSNorm up to rounding), argmax / logsumexp those of `argmax_logsumexp`, and top the logit at the argmax
    (logits[b, argmax[b]]); one C call (`lse` computes the argmax too, and either gives top). `logits=False` (needs
    `argmax` or `lse`): the statistics alone, logits None; the C call then keeps each piece of the logits in a
    per-thread buffer instead of writing them out (a greedy step that wants at most the chosen token's
    log-probability)."""
    check_int8_operands(x, head, scale)
    check_rowlane(rl, *head.shape, "head")
    if norm_weight.dtype != torch.float32 or not norm_weight.is_contiguous() or norm_weight.shape != (x.shape[1],):
        raise ValueError(f"norm_weight must be contiguous float32 [{x.shape[1]}], got {norm_weight.dtype} "
                         f"{tuple(norm_weight.shape)}")
    path = resolve_path(path)
    if path == "torch":
        raise ValueError("head_rows runs the compiled kernels only; no kernel path is available here")
    if not (logits or argmax or lse):
        raise ValueError("head_rows with logits=False needs argmax=True or lse=True (it would compute nothing)")
    return head_rows_unchecked(_PATH_IDS[path], max(1, int(n_threads or default_threads())), x, norm_weight.data_ptr(),
                               float(eps), head.data_ptr(), scale.data_ptr(), head.shape[0], argmax=argmax, lse=lse,
                               logits=logits, rl_ptr=0 if rl is None else rl.data_ptr())  # fmt: skip


def head_rows_unchecked(
    path_id: int, n_threads: int, x: Tensor, norm_ptr: int, eps: float, head_ptr: int, scale_ptr: int, V: int, *,
    argmax: bool = False, lse: bool = False, logits: bool = True,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, rl_ptr: int = 0, rows: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """`head_rows` on operands its caller has already checked (`Decoder.head` checks them once per lm_head): x a
    contiguous float32 [N, C], the norm weight, head and scales given by address (rl_ptr: the head's `rowlane_codes`,
    or 0). The B rows are x's, or with `rows` (contiguous int64 [B], each in 0..N-1) rows[b] of x. Allocates the
    outputs, or writes into `out` (contiguous float32 [n, V], int64 [n], float32 [n], float32 [n], n >= B; views of
    their first B rows are returned), and calls the extension (which records the call instead while deferring:
    `csrc/defer.h`)."""
    B, stats = (x.shape[0] if rows is None else rows.shape[0]), argmax or lse
    if B == 0:  # empty outputs, as the matmuls give (the C call reads a null logits pointer as "none asked for")
        return (torch.empty(0, V) if logits else None, torch.empty(0, dtype=torch.int64) if stats else None,
                torch.empty(0) if lse else None, torch.empty(0) if stats else None)
    if out is None:
        y = torch.empty(B, V, dtype=torch.float32) if logits else None
        idx = torch.empty(B, dtype=torch.int64) if stats else None
        out_lse = torch.empty(B, dtype=torch.float32) if lse else None
        top = torch.empty(B, dtype=torch.float32) if stats else None
    else:
        y, idx, out_lse, top = (out[0][:B] if logits else None), (out[1][:B] if stats else None), \
            (out[2][:B] if lse else None), (out[3][:B] if stats else None)  # fmt: skip
    tail = (rl_ptr, rows.data_ptr()) if rows is not None else (rl_ptr,) if rl_ptr else ()
    extension().head_rows(path_id, n_threads, x.data_ptr(), B, x.shape[1], norm_ptr, eps, head_ptr, scale_ptr, V,
                          *(0 if t is None else t.data_ptr() for t in (y, idx, out_lse, top)), *tail)  # fmt: skip
    return y, idx, out_lse, top


def _row_path(x: Tensor, path: str) -> str | None:
    """The compiled path that runs a per-row C function (argmax, logsumexp) on x, or None where torch must: no
    extension, or x not float32 / CPU / contiguous, or empty."""
    path = resolve_path(path) if extension() is not None else "torch"
    if path == "torch" or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0:
        return None
    return path


def _per_row(name: str, x: Tensor, dtype: torch.dtype, fallback, path: str) -> Tensor:
    """One value per row of x's last dimension from the C function `name(path, x_ptr, rows, V, out_ptr)`, or
    fallback(x, -1) for what it does not take (no extension, not float32 / CPU / contiguous, empty)."""
    path = _row_path(x, path)
    if path is None:
        return fallback(x, -1)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], dtype=dtype)
    getattr(extension(), name)(_PATH_IDS[path], rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr())
    return out.reshape(x.shape[:-1])
