"""`serve`: load a model, start the engine thread and run the HTTP API under uvicorn until SIGTERM / SIGINT.

Stack: Starlette (routing, streaming responses, lifespan) on uvicorn (the ASGI server, with its SIGTERM handling and
graceful shutdown), which runs on uvloop's event loop and httptools' HTTP parser when they are installed (the serve
extra installs both: one streaming client then gets 1.69 ms per token at 99m, the in-process rate, against 2.0 on
asyncio's loop and h11). Both are small, widely deployed and maintained by the encode team; FastAPI would add pydantic
models we do not need, since every field is checked by hand to give OpenAI's error shapes.

On SIGTERM uvicorn stops accepting connections and waits up to `shutdown_timeout` seconds for the requests in flight
to finish; what is still running then is cancelled by the engine (each finishes as "cancelled": a 503 in OpenAI's error
shape, or a stream's error event and `[DONE]`), which uvicorn gives SHUTDOWN_GRACE_S more seconds to be written before
it cancels the handlers itself, and the process exits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # after the shutdown timeout, for the cancelled requests' answers to go out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_engine(
    model_path: str,
    *,
    tokenizer: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    ctx_len: int | None = None,
    prefill_chunk: int = 128,
    prefill_chunks_per_step: int | None = None,
    threads: int | None = None,
    int8_head: bool = True,
    kv_dtype: torch.dtype | None = torch.float16,
    prefix_cache: bool = True,
    pipeline: bool = True,
):
    """(Engine, model name, chat template) for a model directory or size name (see `serve`)."""
    from spectra.config import pad_vocab
    from spectra.data.tokenizer import load_tokenizer
    from spectra.inference.bench import with_int8_head
    from spectra.inference.decode import unsupported_reason
    from spectra.loading import find_tokenizer, load
    from spectra.serve.app import load_chat_template
    from spectra.serve.engine import Engine

    if threads is not None:
        torch.set_num_threads(threads)
    is_dir = Path(model_path).is_dir()
    tok_path = tokenizer if tokenizer is not None else (find_tokenizer(model_path) if is_dir else None)
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    model = load(model_path)  # first: a missing model is the error, not a warning about its tokenizer
    if tok is None:  # a size name or a model saved without one: text prompts would all answer 400
        log.warning("%s has no tokenizer.json: only prompts given as token ids can be served; pass --tokenizer PATH "
                    "(or 'builtin') for text", model_path)
    if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} ids; the model's vocabulary is "
                         f"{model.config.vocab_size}")
    if tok is not None and model.config.vocab_size > pad_vocab(tok.get_vocab_size(), model.config.num_scale_shards):
        log.warning("the tokenizer has %d ids and the model %d: ids %d..%d decode to nothing (more than padding "
                    "explains; a model trained with this tokenizer never picks them, a randomly initialised one does)",
                    tok.get_vocab_size(), model.config.vocab_size, tok.get_vocab_size(), model.config.vocab_size - 1)
    if ctx_len is not None and not 1 <= ctx_len <= model.config.max_seq_len:
        raise ValueError(f"--ctx-len must be in 1..{model.config.max_seq_len} (the model's max_seq_len), got {ctx_len}")
    if int8_head and unsupported_reason(model) is None:
        # A packed TriLM on the compiled kernels: the int8 output layer (what `spectra bench` and llama.cpp's Q8_0
        # output use) reads 1/4 of the bytes, and its rows are exact whatever else is in the batch.
        model = with_int8_head(model)
    check_kv_memory(model.config, max_batch, ctx_len or model.config.max_seq_len, kv_dtype)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, ctx_len=ctx_len,
                    prefill_chunk=prefill_chunk, prefill_chunks_per_step=prefill_chunks_per_step, threads=threads,
                    kv_dtype=kv_dtype, prefix_cache=prefix_cache, pipeline=pipeline)
    name = Path(model_path).name if is_dir else str(model_path)
    return engine, name, load_chat_template(model_path if is_dir else None)


def check_kv_memory(cfg: Any, max_batch: int, ctx_len: int, kv_dtype: torch.dtype | None) -> None:
    """A ValueError when max_batch slots of ctx_len positions would need more KV cache than the machine's memory (the
    slots are reserved at start; their pages fill as positions do, so a cache that cannot fit would fail mid-serve)."""
    per_value = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.int8: (cfg.head_dim + 4) / cfg.head_dim}.get(
        kv_dtype, 4.0)
    from spectra.train.memory import host_memory

    need = max_batch * ctx_len * cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * per_value
    have = host_memory()
    if have is not None and need > have:
        raise ValueError(f"--max-batch {max_batch} x --ctx-len {ctx_len} needs {need / 2**30:.1f} GiB of KV cache; "
                         f"this machine has {have / 2**30:.1f} GiB of memory: lower --max-batch or --ctx-len (or use "
                         "--kv-cache q8)")


def _server_class(uvicorn: Any, engine: Any, shutdown_timeout: float) -> type:
    """uvicorn's Server, but at `shutdown_timeout` into a graceful shutdown the engine cancels what is still running,
    so each handler still answers (uvicorn's own deadline, SHUTDOWN_GRACE_S later, would cut them off mid-response)."""

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(shutdown_timeout, engine.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server


def serve(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    stream_interval: int = 1,
    **engine_options: Any,
) -> None:
    """Serve `model_path` (anything `spectra.load` opens) on http://host:port until SIGTERM / SIGINT.

    stream_interval: tokens a stream gathers before one write (`app.create_app`; default 1).
    engine_options: tokenizer, max_batch (KV-cache slots decoded together), max_queue (requests waiting beyond
    them before 429), ctx_len (positions per slot; default the model's max_seq_len), prefill_chunk,
    prefill_chunks_per_step (`Scheduler`'s), threads, int8_head (default True: a packed TriLM's lm_head in int8),
    kv_dtype (default torch.float16; None: the model's), prefix_cache (default True: a request reuses the keys and
    values of the longest prompt prefix a free slot holds; `Scheduler`), pipeline (default True: each step launched on
    the kernels' deferred-call thread before the previous one's bookkeeping, `Scheduler`)."""
    try:
        import uvicorn

        from spectra.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"spectra serve needs the serve extra: pip install 'spectra-lm[serve]' ({e})") from e
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"--host {host!r} is not an address or a name this machine resolves (e.g. 127.0.0.1, "
                         "0.0.0.0, localhost)") from None
    if not _is_loopback(host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this interface can use the model", host)
    engine, name, template = build_engine(model_path, **engine_options)
    sock = _bind(host, port)  # here, not in uvicorn: a port in use is one line, and port 0 logs its real number
    port = sock.getsockname()[1]
    app = create_app(engine, name, api_key=api_key, chat_template=template, stream_interval=stream_interval)
    caches = engine.scheduler.decoder.caches
    kv_gib = sum(c.k.nbytes + c.v.nbytes for c in caches) / 2**30  # reserved; pages are touched as positions fill
    log.info("serving %s on http://%s:%d (%d slots of %d positions, %s KV cache up to %.2f GiB, queue %d, kernel %s, "
             "prefix reuse %s, pipelined steps %s)", name, f"[{host}]" if ":" in host else host, port,
             engine.max_batch, engine.ctx_len,
             str(caches[0].k.dtype).removeprefix("torch."), kv_gib, engine.max_queue,
             "packed C" if engine.scheduler.decoder.kernel is not None else "model modules",
             "on" if engine.scheduler.prefix_cache else "off",
             "on" if engine.scheduler.pipeline and engine.scheduler.decoder.can_launch else "off")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE_S, lifespan="on")
    _server_class(uvicorn, engine, shutdown_timeout)(config).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn's options: SO_REUSEADDR, inheritable), or a ValueError naming --host
    and --port (uvicorn bound it after the "serving ..." line, and a port in use was its own message, exit code 3)."""
    # as uvicorn's Config.bind_socket: IPv6 for an address with ":", else IPv4 (a name resolves as IPv4, so
    # "localhost" is 127.0.0.1 where getaddrinfo might list ::1 first)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); another server may "
                         "hold the port: choose another, or --port 0 for any free one") from None
    sock.set_inheritable(True)
    return sock
