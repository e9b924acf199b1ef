"""`spectra serve`."""

from __future__ import annotations

import argparse
import math


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model", help="a model directory (packed models are fastest) or a size name")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: OMP_NUM_THREADS)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--ctx-len", type=int, default=None, help="positions per slot (default: the model's max)")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens prefilled per decode step")
    p.add_argument("--prefill-chunks-per-step", type=int, default=None,
                   help="prompts whose chunks one step may prefill (default: as many whole chunks, in arrival order, "
                        "as fit in --prefill-chunk tokens; 1: one prompt a step)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's; 'builtin' for ours)")
    p.add_argument("--float-head", action="store_true", help="keep a packed model's lm_head in float (default int8)")
    p.add_argument("--kv-cache", choices=["f16", "f32", "q8"], default="f16",
                   help="KV cache dtype (default f16, as llama.cpp's and `generate`'s for a float32 model: half the "
                        "memory and attention's reads; f32 gives the model's own float32 rounding; q8: int8 rows "
                        "with a scale each, 0.53x f16's memory and reads)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens a stream gathers before one write (its first token and its end go at once; every "
                        "token stays its own event): more means fewer writes under load, tokens in groups (default 1)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (default: a request reuses the keys and values of the longest "
                        "prefix of its prompt that a free slot holds, e.g. a conversation's earlier turns)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="run each step's bookkeeping between its kernels and the next step's (default: the next step "
                        "is launched on the kernels' own thread first, and the bookkeeping runs beside it)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from spectra.inference.generate import kv_dtype_from_name, threads_from_env
    from spectra.serve import serve

    for name in ("port", "max_batch", "max_queue", "ctx_len", "prefill_chunk", "prefill_chunks_per_step",
                 "stream_interval"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("port", "max_queue") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
          stream_interval=args.stream_interval,
          tokenizer=args.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, ctx_len=args.ctx_len,
          prefill_chunk=args.prefill_chunk, prefill_chunks_per_step=args.prefill_chunks_per_step,
          threads=threads_from_env(args.threads), int8_head=not args.float_head,
          kv_dtype=kv_dtype_from_name(args.kv_cache), prefix_cache=not args.no_prefix_cache,
          pipeline=not args.no_pipeline)
    return 0
