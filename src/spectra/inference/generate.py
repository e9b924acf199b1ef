"""Autoregressive text generation with a KV cache, for every model `spectra.load` returns.

The prompt is run once through the model, filling the cache (prefill); each new token is then a batch-1 forward of
one position (decode). The next token is drawn from the last position's logits z ∈ R^V:

    greedy (temperature 0)   x = argmax_i z_i
    sampling                 p = softmax(z / T), restricted to
        top-k                    the k largest logits
        top-p (nucleus)          the smallest set of most likely tokens whose probability sums to ≥ p
                                 (tokens of equal probability stay or go together)
                             then x ~ p: the first token, in index order, whose cumulative probability passes
                             u ~ U[0, 1), drawn from a torch.Generator seeded with `seed` (reproducible);
                             `spectra.packed.kernels.sample`, one C call.

top-k = 1 is therefore greedy at any temperature. Generation ends after `max_new_tokens`, at the model's EOS token
(`stop_at_eos`), or as soon as the decoded text contains one of the `stop` strings; the returned text is cut before
the stop string, while `tokens` keeps every generated id. Streaming hands out text as soon as it is final: a byte-level
BPE token can end inside a UTF-8 character, and a text tail that may still become a stop string is held back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from spectra.data.tokenizer import load_tokenizer
from spectra.inference.decode import Decoder, decoder_for, torch_threads_for
from spectra.inference.sampling import TextDecoder, cut_at_stop, draw_u, sample_next, settled, validate_sampling
from spectra.layers import freeze_for_inference


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    kv_dtype: torch.dtype | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Continue `prompt` (text, or token ids) with up to `max_new_tokens` tokens. A list of prompts (texts or
    token-id lists) is decoded as one batch (`spectra.inference.batch.generate_batch`) and returns a list of results.

    `tokenizer` is a `tokenizers.Tokenizer`, a tokenizer.json path, or None when the prompt is token ids (then no text
    is produced and stop strings are not available). `stream(text)` is called with each new piece of final text.
    `kv_dtype`: the KV cache's dtype (default the model's; torch.float16 halves it, `Transformer.new_cache`).

    Returns {"prompt_tokens", "tokens" (generated ids), "text" (generated text, cut at a stop string),
    "finish_reason" ("length" | "eos" | "stop"), "n_prompt", "n_generated", "prompt_s", "decode_s",
    "prompt_tokens_per_s", "tokens_per_s" (decode, excluding the first token), "ms_per_token"}.
    """
    first = prompt[0] if not isinstance(prompt, str) and len(prompt) else None
    if isinstance(first, str | list | tuple) or (isinstance(first, torch.Tensor) and first.dim() > 0):
        from spectra.inference.batch import generate_batch  # several prompts, decoded together

        if stream is not None:
            raise ValueError("stream is for one prompt; several prompts are decoded together and returned at the end")
        return generate_batch(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, stop=stop, seed=seed, stop_at_eos=stop_at_eos,
                              kv_dtype=kv_dtype)
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("a text prompt needs a tokenizer (pass tokenizer=... or a prompt of token ids)")
        prompt_ids = tok.encode(prompt).ids
    else:
        prompt_ids = [int(t) for t in prompt]
    if stops and tok is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed to condition on")
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if min(prompt_ids) < 0:
        raise ValueError(f"prompt token id {min(prompt_ids)} is negative; ids are 0 up to the vocabulary's size")
    if vocab is not None and max(prompt_ids) >= vocab:
        raise ValueError(f"prompt token id {max(prompt_ids)} is outside the model's vocabulary of {vocab}")
    max_len = len(prompt_ids) + max_new_tokens
    limit = getattr(cfg, "max_seq_len", None)
    if limit is not None and max_len > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds the model's "
            f"max_seq_len of {limit}"
        )
    eos = getattr(cfg, "eos_token_id", None) if stop_at_eos else None

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    use_cache = hasattr(model, "new_cache")
    was_training = model.training
    freeze_for_inference(model)  # undone by model.train() below when the model was training
    decode = decoder_for(model) if use_cache else model

    out_ids: list[int] = []
    detok = TextDecoder(tok) if tok is not None else None
    text, emitted, finish = "", 0, "length"
    prompt_s = decode_s = 0.0
    try:
        with torch.inference_mode():
            cache = model.new_cache(1, max_len, kv_dtype) if use_cache else None
            seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            # a packed TriLM: each step after the prompt is one C call (`Decoder.greedy`: the token sample_next would
            # pick from the same logits, greedy or sampled) and `seq` is no longer needed
            one_call = isinstance(decode, Decoder) and decode.greedy_ready(cache)
            with torch_threads_for(decode):  # the C decoder's pool does the work; torch's ops run on this thread
                t0 = time.perf_counter()
                for step in range(max_new_tokens):
                    if one_call and step > 0:  # sampled: `sample_next`'s draw (one u from gen), in the same C call
                        draw = None if temperature == 0 else (temperature, top_k, top_p, draw_u(gen))
                        nxt = decode.greedy(out_ids[-1], cache, sample=draw)
                    elif cache is not None:  # decode steps of a packed TriLM take the lean path (same logits)
                        if step > 0:
                            logits = decode(seq[:, -1:], cache=cache)
                        elif isinstance(decode, Decoder):  # the prompt through the C rows, as `serve` prefills it
                            logits = decode.prefill(seq, cache)
                        else:
                            logits = model(seq, cache=cache)
                    else:  # no KV cache: recompute the whole sequence every step
                        logits = model(seq)
                    if not one_call or step == 0:
                        nxt = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=gen)
                    now = time.perf_counter()
                    if step == 0:
                        prompt_s = now - t0
                    else:
                        decode_s += now - t0
                    t0 = now
                    out_ids.append(nxt)
                    if not one_call:
                        seq = torch.cat([seq, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
                    if tok is not None:
                        # tok.decode(out_ids), without decoding them all every token
                        text, stopped = cut_at_stop(detok.text(out_ids), stops)
                        if stopped:
                            finish = "stop"
                        if stream is not None:
                            final = settled(text, stops, stopped)
                            if final > emitted:
                                stream(text[emitted:final])
                                emitted = final
                    if finish == "stop":
                        break
                    if eos is not None and nxt == eos:
                        finish = "eos"
                        break
    finally:
        model.train(was_training)
    if stream is not None and len(text) > emitted:
        stream(text[emitted:])
    n_decode = max(len(out_ids) - 1, 0)
    return {
        "prompt_tokens": prompt_ids,
        "tokens": out_ids,
        "text": text if tok is not None else None,
        "finish_reason": finish,
        "n_prompt": len(prompt_ids),
        "n_generated": len(out_ids),
        "prompt_s": prompt_s,
        "decode_s": decode_s,
        "prompt_tokens_per_s": len(prompt_ids) / prompt_s if prompt_s > 0 else None,
        "tokens_per_s": n_decode / decode_s if decode_s > 0 else None,
        "ms_per_token": 1000 * decode_s / n_decode if n_decode else None,
    }


# --kv-cache of `generate`, `bench` and `serve`: q8 is int8 rows with a float32 scale each (`model.KVCache`)
KV_CACHE_TYPES = {"f32": torch.float32, "f16": torch.float16, "q8": torch.int8}
KV_CACHE_CHOICES = ("auto", *KV_CACHE_TYPES)


def kv_dtype_from_name(name: str | None, model: nn.Module | None = None) -> torch.dtype | None:
    """'f32' / 'f16' -> the KV cache dtype; None -> None (the model's own, `Transformer.new_cache`); 'auto' ->
    float16 when the model's own cache would be float32 (a packed TriLM, a float32 model), else None (a 16-bit
    model keeps its dtype). float16 is llama.cpp's default too: it halves the bytes attention reads per token, which
    at long contexts are as many as the weights' (TriLM-1.1B at position 1000 on 2 Zen 4 threads: 53.2 tok/s with
    f16, 41.7 with f32; benchmarks/kv_cache.py)."""
    if name is None:
        return None
    if name == "auto":
        norm = getattr(model, "norm", None)
        weight = getattr(norm, "weight", None)
        return torch.float16 if weight is not None and weight.dtype == torch.float32 else None
    if name not in KV_CACHE_TYPES:
        raise ValueError(f"--kv-cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {name!r}")
    return KV_CACHE_TYPES[name]


def max_threads() -> int:
    """The most threads a command takes: four per CPU, at least 256 (100000 segfaulted in libgomp's thread creation)."""
    return max(256, 4 * (os.cpu_count() or 1))


def threads_from_env(threads: int | None) -> int:
    """The thread count to use: the given one, else OMP_NUM_THREADS, else torch's default."""
    if threads is not None:
        if not 1 <= threads <= max_threads():
            raise ValueError(f"--threads must be in 1..{max_threads()} (four per CPU), got {threads}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env and env.isdigit() and int(env) > 0 else torch.get_num_threads()
