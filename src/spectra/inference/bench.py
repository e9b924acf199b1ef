"""Speed of a model on this machine: prompt processing and decoding tokens/s, ms per token, memory.

One run measures several *variants* of the same weights side by side, interleaved round by round so that load from
other processes hits them alike:

    packed      our packed TriLM (TQ2_0 / TQ1_0 blocks, our C kernels: spectra.packed), lm_head in int8 by default,
                decoded by `spectra.inference.decode.Decoder` (same logits as the model, fewer operations)
    bf16, fp32  the same model as plain torch `nn.Linear` layers holding W̃ = γ·Ŵ in that dtype
    model       the model exactly as loaded (a QuantLM, say), when it is none of the above
    llama.cpp   the same model exported to GGUF (`spectra.interop.gguf`, TQ2_0 blocks, Q8_0 embedding and output)
                and run by llama.cpp through llama-cpp-python, when that is installed

The model is a loaded model / directory, or a size name (`trilm-1.1b`) for a synthetic TriLM of that shape whose
block weights are random ternary (one scale per matrix; speed does not depend on the values).

Prompt speed is P / t(prefill of P tokens); decode speed is G / t(G single-token steps with a KV cache), each step
including the logits and the greedy pick, as `generate` runs them (a packed TriLM with an int8 head:
`Decoder.greedy`, one C call a step; else `sampling.sample_next`); the decode tokens are fixed random ids, as in
llama-bench's `tg` test. Memory is the weight bytes of each variant and the process's resident set size (RSS) after
building it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.inference.decode import Decoder, decoder_for, torch_threads_for
from spectra.inference.generate import KV_CACHE_CHOICES, kv_dtype_from_name, max_threads
from spectra.inference.sampling import sample_next
from spectra.interop.weights import check_plain_linear, dense_weight
from spectra.packed import kernels as K

log = logging.getLogger(__name__)

VARIANTS = ("packed", "bf16", "fp32", "model", "llama.cpp")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; falls back to the peak)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weight_mb(model: nn.Module) -> float:
    """Bytes of all parameters and buffers (packed bytes count as they are stored), in MiB."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # int8 dynamic-quantized linears keep their weight outside parameters and buffers
        if type(m).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(m, "weight", None)):
            w = m.weight()
            total += w.numel() * w.element_size() + 8 * w.shape[0]  # int8 codes + per-row scale and zero point
    return total / 2**20


def synthetic_trilm(size: str, *, seed: int = 0, vocab_size: int | None = None) -> nn.Module:
    """A TriLM with the shape of a named size (`trilm-1.1b` or `1.1b`) and random ternary block weights (a FloatLM
    with random weights for `floatlm-...` names).

    One scale per matrix (num_scale_shards = 1), so every 256-weight block has a single scale and packs losslessly.
    """
    from spectra.config import from_name
    from spectra.model import build_model

    name = size if size.startswith(("trilm-", "floatlm-")) else f"trilm-{size}"
    try:
        cfg = from_name(name, num_scale_shards=1, **({"vocab_size": vocab_size} if vocab_size else {}))
    except ValueError as e:  # named as the user typed it ('nosuch' was reported as 'trilm-nosuch')
        if name == size:
            raise
        raise ValueError(str(e).replace(repr(name), f"{size!r} (read as {name!r})", 1)) from None
    return build_model(cfg, seed=seed).eval()


def dense_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The same model as a FloatLM of plain `nn.Linear` layers in `dtype` holding each layer's effective weight."""
    from spectra.model import Transformer

    cfg = model.config.replace(family="floatlm")
    with torch.device("meta"):
        dense = Transformer(cfg).to(dtype)
    dense = dense.to_empty(device="cpu")  # allocated directly in `dtype`: no float32 copy on the way
    with torch.no_grad():
        for name, module in dense.named_modules():
            src = model.get_submodule(name)
            if name.rsplit(".", 1)[-1] in _LINEARS or name == "lm_head":
                check_plain_linear(src, name)
                module.weight.copy_(dense_weight(src))
            elif isinstance(module, nn.Embedding) or hasattr(module, "eps"):
                for pname, p in module.named_parameters(recurse=False):
                    p.copy_(getattr(src, pname).detach())
        dense.rope_cos.copy_(model.rope_cos)
        dense.rope_sin.copy_(model.rope_sin)
    return dense.eval()


def packed_copy(model: nn.Module, fmt: str, *, inplace: bool = False) -> nn.Module:
    """The model with every ternary block linear swapped for our packed kernels (`spectra.packed`)."""
    from spectra.packed.linear import convert_to_packed

    packed = model if inplace else copy.deepcopy(model)
    n = convert_to_packed(packed, fmt)
    if n == 0:
        raise ValueError("the model has no ternary linear layers to pack")
    return packed.eval()


def with_int8_head(model: nn.Module) -> nn.Module:
    """A view of `model` (sharing every other module) whose float lm_head is int8.

    The output matrix (vocab x dim) is read once per decoded token; in fp32 it is larger than all the packed blocks of
    a TriLM together. llama.cpp's file stores it in Q8_0 (our GGUF export), so int8 here compares like with like.
    With spectra's compiled kernels this is `spectra.packed.linear.Int8Linear` (int8 per output row, int8 activations
    per token, exact int32 sums); without them torch's dynamic-quantized Linear (fbgemm, activations per tensor).
    """
    head = model.lm_head
    if type(head) is not nn.Linear:
        return model
    from spectra.packed.linear import Int8Linear

    if (
        head.bias is None
        and K.resolve_path("auto") != "torch"
        and head.in_features % 256 == 0
        and head.in_features <= K.INT8_MAX_K
    ):
        int8_head = Int8Linear.from_linear(head)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
            from torch.ao.quantization import default_dynamic_qconfig

            float_head = nn.Linear(head.in_features, head.out_features, bias=False)
            float_head.weight = nn.Parameter(head.weight.detach().float(), requires_grad=False)
            float_head.qconfig = default_dynamic_qconfig
            int8_head = DynamicInt8Linear.from_float(float_head)
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.lm_head = int8_head
    return view


def _is_kind(model: nn.Module, kind: str) -> bool:
    names = {type(m).__name__ for m in model.modules()}
    return {"packed": "PackedTernaryLinear" in names, "trilm": "TernaryLinear" in names}[kind]


def time_torch(
    model: nn.Module,
    prompt: torch.Tensor,
    decode_ids: torch.Tensor,
    *,
    decode_from_empty: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Seconds for the prefill of `prompt` (1, P) and for decoding the G tokens of `decode_ids` (1, G) one by one,
    the way `generate` runs them (a packed TriLM: the C rows for the prompt, the C decoder for each token).

    The tokens are decoded after the prompt (positions P .. P+G-1), or with `decode_from_empty` from an empty cache
    (positions 0 .. G-1, what llama-bench's `tg` test measures). `kv_dtype`: the cache's dtype (default the model's;
    llama.cpp's default is float16)."""
    P, G = prompt.shape[1], decode_ids.shape[1]
    step = decoder_for(model)  # the lean single-token path for a packed TriLM (spectra.inference.decode)
    prefill = step.prefill if isinstance(step, Decoder) else (lambda ids, cache: model(ids, cache=cache))
    with torch.inference_mode():
        cache = model.new_cache(1, P + G, kv_dtype)
    with torch.inference_mode(), torch_threads_for(step):  # as `generate` runs
        t0 = time.perf_counter()
        sample_next(prefill(prompt, cache)[0, -1])
        t1 = time.perf_counter()
        if decode_from_empty:
            cache.pos = 0  # the prompt's keys and values are overwritten position by position
        if isinstance(step, Decoder) and step.greedy_ready(cache):  # generate's greedy steps: one C call each
            for t in decode_ids[0].tolist():
                step.greedy(t, cache)
        else:
            for i in range(G):
                sample_next(step(decode_ids[:, i : i + 1], cache=cache)[0, -1])  # greedy, as `generate` picks it
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


class _LlamaCpp:
    """One llama.cpp context per thread count on our exported GGUF file."""

    def __init__(self, gguf_path: str, threads: int, n_ctx: int, n_batch: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=gguf_path,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            verbose=False,
        )

    def time(self, prompt: list[int], decode_ids: list[int]) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        for tok in decode_ids:
            self.llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def bench(
    model_or_size: nn.Module | str | os.PathLike,
    *,
    prompt_len: int = 128,
    gen_len: int = 64,
    threads: Sequence[int] = (1,),
    dtypes: Sequence[str] = ("packed", "bf16", "fp32"),
    llama_cpp: bool | None = None,
    packed_format: str | None = None,
    packed_head: str | None = None,
    repeats: int = 3,
    seed: int = 0,
    vocab_size: int | None = None,
    workdir: str | os.PathLike | None = None,
    kv_cache: str = "auto",
) -> dict[str, Any]:
    """Measure prompt and decode speed of a model's variants (see the module docstring), interleaved.

    `dtypes` chooses among "packed", "bf16", "fp32", "model"; variants that do not apply to the model (packed for a
    FloatLM) are listed in `skipped`. `llama_cpp` None runs llama.cpp when llama-cpp-python is importable and the
    model is a TriLM (True requires it). `packed_format` ("tq2", "tq1"; None: tq2) is the format a latent TriLM is
    packed to; a packed checkpoint runs as stored, and asking it for another format is refused (it was measured as
    stored under the asked format's label). `packed_head` "int8" (None's default) runs the packed variant's lm_head in
    int8 (`with_int8_head`, like the Q8_0 output tensor llama.cpp gets), "float" as stored. `vocab_size` overrides the
    vocabulary of a synthetic model. `kv_cache` is each variant's KV cache dtype as `spectra generate --kv-cache`
    takes it ("auto": float16 for a float32 variant, like llama.cpp's default; "f32"; "f16").

    Returns {"model", "config", "prompt_len", "gen_len", "repeats", "kv_cache", "loadavg_before", "loadavg_after",
    "results": [{"variant", "threads", "prompt_tokens_per_s", "decode_tokens_per_s", "ms_per_token", "prompt_runs",
    "decode_runs", "weights_mb"}], "ratios", "skipped", "rss_mb", "peak_rss_mb"}. Speeds are medians over `repeats`.
    RSS is the whole process's (all variants at once); bench one variant alone for its own peak.
    """
    for name in dtypes:
        if name not in VARIANTS[:4]:
            raise ValueError(f"unknown variant {name!r}; accepted: packed, bf16, fp32, model")
    if prompt_len < 1 or gen_len < 1 or repeats < 1:
        raise ValueError(f"prompt_len, gen_len and repeats must be >= 1, got {prompt_len}, {gen_len}, {repeats}")
    threads = list(dict.fromkeys(int(t) for t in threads))  # a count given twice was measured twice per round
    if not threads or min(threads) < 1 or max(threads) > max_threads():
        raise ValueError(f"threads must be integers in 1..{max_threads()} (four per CPU), got {threads}")
    if packed_format not in (None, "tq2", "tq1"):
        raise ValueError(f"packed_format must be 'tq2' or 'tq1', got {packed_format!r}")
    if packed_head not in (None, "int8", "float"):
        raise ValueError(f"packed_head must be 'int8' or 'float', got {packed_head!r}")
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {kv_cache!r}")

    skipped: dict[str, str] = {}
    variants: dict[str, nn.Module] = {}
    mem: dict[str, dict[str, float]] = {}

    # ---- the source model -------------------------------------------------------------------------------------
    if isinstance(model_or_size, nn.Module):
        source, label = model_or_size.eval(), getattr(model_or_size.config, "name", None) or "model"
    elif Path(model_or_size).exists():
        from spectra.loading import load

        source, label = load(model_or_size), str(model_or_size)
    else:
        from spectra.loading import looks_like_path, missing_model

        if looks_like_path(str(model_or_size)):
            raise missing_model(model_or_size)
        source = synthetic_trilm(str(model_or_size), seed=seed, vocab_size=vocab_size)
        label = f"synthetic {model_or_size}"
    cfg = source.config
    if prompt_len + gen_len > cfg.max_seq_len:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds max_seq_len {cfg.max_seq_len}")
    is_packed, is_trilm = _is_kind(source, "packed"), _is_kind(source, "trilm")
    ternary = is_packed or (is_trilm and cfg.quantizer == "trilm")
    if is_packed:  # a packed checkpoint runs as stored
        stored = next(m.format for m in source.modules() if hasattr(m, "format") and hasattr(m, "_qs_kernel"))
        stored = {"tq2_0": "tq2", "tq1_0": "tq1"}[stored]
        stored_head = "float" if type(source.lm_head) is nn.Linear else "int8"
        if packed_format not in (None, stored):
            raise ValueError(f"the model is packed as {stored}; measuring it as {packed_format} needs it packed so: "
                             f"`spectra pack SRC OUT --format {packed_format}` from its latent TriLM (or leave out "
                             "--format)")
        if packed_head == "float" and stored_head == "int8":
            raise ValueError("the model's lm_head is stored in int8; a float head needs it packed with one (`spectra "
                             "pack --head float32`), or leave out --packed-head")
        packed_format = stored
    packed_format, packed_head = packed_format or "tq2", packed_head or "int8"
    owned = not isinstance(model_or_size, nn.Module)

    def record(name: str, model: nn.Module) -> None:
        variants[name] = model
        mem[name] = {"weights_mb": weight_mb(model)}

    # pack first: a model we loaded ourselves is packed in place, which frees its latent weights before the dense
    # copies are made from the packed codes
    if "packed" in dtypes:
        if is_packed or ternary:
            packed = source if is_packed else packed_copy(source, packed_format, inplace=owned)
            if owned:
                source = packed
            gc.collect()
            record("packed", with_int8_head(packed) if packed_head == "int8" else packed)
        else:
            skipped["packed"] = "not a ternary model"
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        if name in dtypes:
            record(name, dense_copy(source, dt))
    if "model" in dtypes:
        if is_packed or ternary:
            skipped["model"] = "a TriLM: measured as 'packed'"
        else:
            record("model", source)
    gc.collect()

    # ---- llama.cpp on our GGUF ----------------------------------------------------------------------------------
    runners: dict[int, _LlamaCpp] = {}
    tmpdir = None
    want_llama = llama_cpp if llama_cpp is not None else (ternary and llama_cpp_available())
    if not variants and not want_llama:
        raise ValueError(f"nothing to measure: {', '.join(f'{k} ({v})' for k, v in skipped.items())}; choose "
                         "variants that apply to this model (bf16, fp32, and packed for a TriLM)")
    if llama_cpp is None and not want_llama:
        skipped["llama.cpp"] = "llama-cpp-python is not installed" if ternary else "not a ternary model"
    if want_llama:
        if not llama_cpp_available():
            raise ImportError("llama.cpp comparison needs llama-cpp-python: pip install 'spectra-lm[llamacpp]'")
        from spectra.interop.gguf import export_gguf

        tmpdir = tempfile.TemporaryDirectory(dir=workdir, prefix="spectra-bench-")
        gguf_path = Path(tmpdir.name) / "model.gguf"
        qtype = {"tq2": "tq2_0", "tq1": "tq1_0"}[packed_format] if ternary else "q8_0"
        export_gguf(source, gguf_path, qtype=qtype)
        for t in threads:
            runners[t] = _LlamaCpp(str(gguf_path), t, prompt_len + gen_len + 8, prompt_len)
        mem["llama.cpp"] = {"weights_mb": gguf_path.stat().st_size / 2**20}
    rss_built = rss_mb()

    # ---- measure, interleaved ------------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    decode_ids = torch.randint(0, cfg.vocab_size, (1, gen_len), generator=g)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    loadavg_before = os.getloadavg()
    old_threads = torch.get_num_threads()
    try:
        for rep in range(repeats + 1):  # round 0 warms up (page faults, kernel dispatch, allocator)
            for t in threads:
                torch.set_num_threads(t)
                for name, model in variants.items():
                    p, d = (prompt[:, :8], decode_ids[:, :4]) if rep == 0 else (prompt, decode_ids)
                    s = time_torch(model, p, d, kv_dtype=kv_dtype_from_name(kv_cache, model))
                    if rep:
                        runs.setdefault((name, t), []).append(s)
                if t in runners:
                    p, d = (prompt_len, gen_len) if rep else (8, 4)
                    s = runners[t].time(prompt[0, :p].tolist(), decode_ids[0, :d].tolist())
                    if rep:
                        runs.setdefault(("llama.cpp", t), []).append(s)
    finally:
        torch.set_num_threads(old_threads)
        for r in runners.values():
            r.close()
        if tmpdir is not None:
            tmpdir.cleanup()
    loadavg_after = os.getloadavg()

    results = []
    for (name, t), samples in runs.items():
        pp = [prompt_len / p for p, _ in samples]
        tg = [gen_len / d for _, d in samples]
        results.append(
            {
                "variant": name,
                "threads": t,
                "prompt_tokens_per_s": statistics.median(pp),
                "decode_tokens_per_s": statistics.median(tg),
                "ms_per_token": 1000 / statistics.median(tg),
                "prompt_runs": pp,
                "decode_runs": tg,
                **mem.get(name, {}),
            }
        )
    return {
        "model": label,
        "config": cfg.to_dict(),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "kv_cache": kv_cache,
        "packed_format": packed_format,
        "packed_head": packed_head,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "results": results,
        "ratios": ratios(results),
        "paired_ratios": ratios(results, paired=True),
        "skipped": skipped,
        "rss_mb": rss_built,
        "peak_rss_mb": peak_rss_mb(),
    }


def ratios(results: list[dict[str, Any]], paired: bool = False) -> dict[str, dict[str, Any]]:
    """Speed of 'packed' (or 'model') over every other variant, per thread count, for decode and prompt: the ratio of
    the medians, or with `paired` [median, min, max] of the ratios within each round (every round times every
    variant, so a machine whose speed drifts between rounds moves both sides of a round's ratio alike)."""
    out: dict[str, dict[str, Any]] = {}
    by = {(r["variant"], r["threads"]): r for r in results}
    for (name, t), r in by.items():
        if name not in ("packed", "model"):
            continue
        for (other, t2), o in by.items():
            if t2 != t or other == name:
                continue
            for what in ("decode", "prompt"):
                if paired:
                    per = [a / b for a, b in zip(r[f"{what}_runs"], o[f"{what}_runs"], strict=True)]
                    value: Any = [statistics.median(per), min(per), max(per)]
                else:
                    value = r[f"{what}_tokens_per_s"] / o[f"{what}_tokens_per_s"]
                out.setdefault(f"threads={t}", {})[f"{what} {name}/{other}"] = value
    return out
