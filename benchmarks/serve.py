"""`spectra serve` under load: 1, 4 and 16 concurrent streaming clients against sequential single-stream decoding.

    python benchmarks/serve.py [--model DIR | --size trilm-99m] [--threads 2] [--clients 1 4 16] [--prompt-len 32]
                               [--gen-len 64] [--repeats 3] [--llama-server PATH] [--soak SECONDS] [--in-process]
                               [--temperature T [--top-p P]] [--client raw|aiohttp|httpx] [--stream-interval N ...]
                               [--shared-prefix N] [--prefix-cache on off] [--pipeline on off]

The model is a packed checkpoint: `--model DIR`, or `--size` packed into a temporary folder with random weights
(`spectra pack SIZE`; speed does not depend on the values). The server runs in its own process on a free loopback
port (`spectra serve --threads T --max-batch 16`). Every request streams `--gen-len` tokens (`ignore_eos`) after a
prompt of `--prompt-len` random token ids; `logprobs: 0` makes every token its own event, so each token's arrival is
timed. Each client sends `--rounds` requests back to back, on one keep-alive connection.

The clients run on the same cores as the server they measure, so by default (`--client raw`) they are as lean as a
client can be: an asyncio protocol that writes the request and parses the status, headers, chunked body and SSE events
as the bytes arrive (7 % of a core for 16 streams of the 99m, against 11 % with aiohttp, which `--client aiohttp`
still runs; `--client httpx` is the slowest), on uvloop's event loop where it is installed (the `serve` extra has it;
on Zen 5 the raw client took 11 % of a core on asyncio's own loop and 7 % on uvloop). The sequential baseline has no
client at all.

Printed per concurrency: aggregate decode tok/s (tokens received / wall time of the phase), time to first token and
per-token latency (gaps between a stream's tokens), p50 and p99, and the ratio of the aggregate rate to
`sequential`: the same requests decoded one after another in this process with `generate` (the batch-1 C decoder,
what `spectra generate` does), measured in the same run.

`--llama-server PATH`: a llama.cpp `llama-server` binary (built from its public source in a temporary folder, never
committed) serves our GGUF export of the same model (TQ2_0 blocks, Q8_0 embedding and output, with the built-in
byte-level BPE as its vocabulary, since llama.cpp refuses a model without one) with the same threads, 16 parallel
slots and its defaults otherwise (f16 KV cache, continuous batching) except `--no-repack` (see start_llama), and
is driven the same way. Prompts are ids
below the built-in BPE's 4096 for every server.

`--in-process`: each repeat also runs the largest concurrency's requests (clients x rounds, all submitted at once)
through `spectra.inference.batch.Scheduler` in this process, without HTTP, with the engine's settings; its row
("in process") is the rate the server would reach if HTTP, the clients and the event hand-off cost nothing.

`--repeats N` runs the whole comparison (sequential, then each server) N times, the servers in reverse order in odd
repeats (a later server ran 2-11 % faster on the 2-core VM whatever it was), so use an even N to compare servers.
The table lists every repeat; the summary gives the median and range over repeats of each ratio taken within its
repeat, since a shared VM's speed can drift by half between runs a minute apart.

`--soak SECONDS`: after the table, 16 clients send requests without pause for that long; prints the number of
requests, 5xx answers and other errors, and the server's RSS at the start and end of the soak, its maximum, and the
largest sample up to each tenth of it (a level that settles, or one that keeps climbing).
`--stream-interval N ...`: one spectra server per value, each its own row ("spectra si=N" beyond 1), with
`spectra serve --stream-interval N` (a stream's tokens go out in writes of N: fewer writes, tokens in groups, so its
per-token gaps are mostly zero within a group and its p99 the wait between groups).
`--shared-prefix N`: every prompt opens with the same N token ids (a system prompt) before its random ones, in every
row and the baseline; with `--prefix-cache on off` a spectra server runs with its prefix reuse and one without
(`spectra serve --no-prefix-cache`, rows "spectra no-prefix"). llama-server reuses a slot's prompt prefix by default
too (`cache_prompt`, slots chosen by prompt similarity). The sequential baseline (`generate`) prefills every prompt
whole, so with a shared prefix the "vs one stream" ratio also counts the reuse.
`--pipeline on off`: a spectra server with pipelined steps (serve's default: the next step launched on the kernels'
deferred-call thread before the bookkeeping of the one before) and one without (`spectra serve --no-pipeline`, rows
"spectra serial"); the in-process row uses the first.
`--temperature T [--top-p P]`: every request samples (the clients', the sequential baseline's and the in-process
run's; top_k off on both servers, since llama-server's default is 40) instead of decoding greedily.

Targets (issue 19): with 16 clients on 2 cores, aggregate tok/s >= 4x one stream and ahead of llama-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from spectra.files import check_output_file, write_json

SERVE_EXTRA = ("--max-batch", "16", "--max-queue", "256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:  # its own error, not just the status (`--stream-interval 0` said "exited with 2")
            said = proc.stderr.read().strip().splitlines()[-3:] if proc.stderr is not None else []
            raise SystemExit(f"the server exited with {proc.returncode}" + (": " + " | ".join(said) if said else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def run_loop(coro):
    """Run the clients' coroutine on uvloop's event loop where it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def _timed_event(line: bytes | str, llama: bool) -> bool:
    """Whether one SSE line carries a generated token (so its arrival is timed)."""
    if not line.startswith(b"data: {" if isinstance(line, bytes) else "data: {"):
        return False
    ch = json.loads(line[6:]).get("choices") or [{}]
    return bool((llama and ch[0].get("finish_reason") is None) or ch[0].get("logprobs"))  # llama: 1 token per event


async def one_request(client, url: str, prompt: list[int], gen_len: int, llama: bool, sampling: dict | None = None,
                      ) -> dict:
    body = {"prompt": prompt, "max_tokens": gen_len, "temperature": 0, "stream": True, "ignore_eos": True,
            **(sampling or {})}
    if sampling:
        body["top_k"] = 0  # no top-k on either server (llama-server's default is 40)
    if not llama:
        body["logprobs"] = 0  # one event per token (llama-server streams one token per event already)
    t0 = time.perf_counter()
    times: list[float] = []
    if isinstance(client, list):  # --client raw: this client's connection
        return await raw_request(client, url, body, llama, t0)
    if hasattr(client, "ws_connect"):  # aiohttp.ClientSession: its C HTTP parser, lines as bytes
        async with client.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return {"status": r.status, "times": [], "t0": t0}
            buf = b""
            async for data in r.content.iter_any():  # whatever arrived: a step's events for this stream, usually
                now = time.perf_counter()
                *events, buf = (buf + data).split(b"\n\n")
                times += [now for ev in events if _timed_event(ev, llama)]
        return {"status": 200, "times": times, "t0": t0}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:  # httpx.AsyncClient
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "times": [], "t0": t0}
        async for line in r.aiter_lines():
            if _timed_event(line, llama):
                times.append(time.perf_counter())
    return {"status": 200, "times": times, "t0": t0}


class RawStream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that POSTs a JSON body and reads the answer (`--client raw`): the status
    line and headers, then the body as chunked transfer encoding or by Content-Length, with the arrival time of every
    SSE event (the bytes up to each blank line). The clients share the 2 cores with the server they measure, so they
    do as little as a client can: no header objects, no line iterator, one parse of the bytes as they arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.buf = b""  # bytes not yet parsed
        self.status = 0
        self.chunked = False
        self.remaining = -1  # body bytes left (Content-Length) or of the current chunk (chunked); -1: unknown
        self.body = b""  # body bytes not yet split into events
        self.events: list[tuple[float, bytes]] = []
        self.keep_alive = True
        self.done: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    def request(self, host: str, path: str, payload: bytes) -> asyncio.Future:
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                             b"\r\n\r\n%s" % (path.encode(), host.encode(), len(payload), payload))
        return self.done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data
        if not self.status:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                self.buf = buf
                return
            lines = buf[:head_end].split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value:
                    self.chunked = True
                elif name == b"content-length":
                    self.remaining = int(value)
                elif name == b"connection" and value == b"close":
                    self.keep_alive = False
            buf = buf[head_end + 4 :]
            if self.chunked:
                self.remaining = -1
        end = False
        if self.chunked:  # remaining: bytes left of a chunk; -1: at a size line; -2 / -3: a chunk's / the body's CRLF
            body = []
            while buf:
                if self.remaining == -1:
                    eol = buf.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(buf[:eol].split(b";", 1)[0], 16)
                    buf = buf[eol + 2 :]
                    self.remaining = size if size else -3  # 0: the last chunk, then a CRLF (no server sends trailers)
                elif self.remaining in (-2, -3):
                    if len(buf) < 2:
                        break
                    buf, end = buf[2:], self.remaining == -3
                    self.remaining = -1
                    if end:
                        break
                else:
                    take = buf[: self.remaining]
                    body.append(take)
                    buf, self.remaining = buf[len(take) :], self.remaining - len(take)
                    if not self.remaining:
                        self.remaining = -2
            data = b"".join(body)
        else:
            data, buf = buf, b""
            if self.remaining >= 0:
                self.remaining -= len(data)
                end = self.remaining <= 0
        self.buf = buf
        *events, self.body = (self.body + data).split(b"\n\n")
        self.events += [(now, ev) for ev in events]
        if end and self.done is not None and not self.done.done():
            self.done.set_result(None)


async def raw_request(conns: list, url: str, body: dict, llama: bool, t0: float) -> dict:
    """`one_request` over a `RawStream` kept in conns[0] (opened again when the server closed it)."""
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    reused = bool(conns) and not conns[0].closed.done()
    if not reused:
        _, proto = await asyncio.get_running_loop().create_connection(RawStream, host, int(port))
        conns[:] = [proto]
    proto = conns[0]
    try:
        await proto.request(host_port, "/v1/completions", json.dumps(body).encode())
    except ConnectionError:
        # llama-server closes a connection after each streamed answer although it says keep-alive: a request sent
        # on it before the close arrived failed, and a third of its requests were dropped from its rows. A reused
        # connection closed before any response byte is opened again and the request sent once more.
        if not reused or proto.status:
            raise
        _, proto = await asyncio.get_running_loop().create_connection(RawStream, host, int(port))
        conns[:] = [proto]
        await proto.request(host_port, "/v1/completions", json.dumps(body).encode())
    if not proto.keep_alive:
        proto.transport.close()
    if proto.status != 200:
        return {"status": proto.status, "times": [], "t0": t0}
    return {"status": 200, "times": [t for t, ev in proto.events if _timed_event(ev, llama)], "t0": t0}


def prompt_ids(rng, prefix: list[int], prompt_len: int, vocab: int) -> list[int]:
    """One request's prompt: the shared prefix (`--shared-prefix`), then `prompt_len` random ids below `vocab`."""
    return [*prefix, *(rng.randrange(1, vocab) for _ in range(prompt_len))]


async def drive(url: str, clients: int, rounds: int, prompt_len: int, gen_len: int, vocab: int, llama: bool,
                seed: int, until: float | None = None, client_lib: str = "aiohttp", sampling: dict | None = None,
                prefix: list[int] = ()) -> dict:
    rng = __import__("random").Random(seed)
    results: list[dict] = []
    errors = 0
    if client_lib == "raw":
        transport_errors = (OSError, ValueError, IndexError)  # refused / reset connections, unparsable answers
        conns: list[list] = [[] for _ in range(clients)]
        session = contextlib.nullcontext()
    elif client_lib == "aiohttp":
        import aiohttp

        transport_errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                        connector=aiohttp.TCPConnector(limit=clients + 4))
    else:
        import httpx

        transport_errors = (httpx.HTTPError,)
        session = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4))

    async def client_loop(i: int, client) -> None:
        nonlocal errors
        n = 0
        while (until is None and n < rounds) or (until is not None and time.perf_counter() < until):
            prompt = prompt_ids(rng, prefix, prompt_len, vocab)
            try:
                results.append(await one_request(conns[i] if client is None else client, url, prompt, gen_len, llama,
                                                 sampling))
            except transport_errors:
                errors += 1
            n += 1

    async with session as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    if client_lib == "raw":
        for c in conns:
            if c:
                c[0].transport.close()
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(len(r["times"]) for r in ok)
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else float("nan"),
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(gaps, 50), "tpot_p99": pct(gaps, 99),
        "status_5xx": sum(500 <= r["status"] < 600 for r in results), "status_other": sum(
            r["status"] not in (200,) and not 500 <= r["status"] < 600 for r in results),
        "transport_errors": errors,
    }  # fmt: skip


def sequential_rate(model_dir: Path, threads: int, n: int, prompt_len: int, gen_len: int, vocab: int,
                    kv_cache: str, sampling: dict | None = None, prefix: list[int] = ()) -> float:
    """Tokens/s of `n` requests decoded one after another with `generate` in this process (int8 head, as served;
    `sampling`: temperature / top_p, else greedy)."""
    import random

    import torch

    from spectra.inference.bench import with_int8_head
    from spectra.inference.generate import generate, kv_dtype_from_name
    from spectra.loading import load

    torch.set_num_threads(threads)
    model = with_int8_head(load(model_dir))
    rng = random.Random(1)
    generate(model, None, [1, 2, 3], max_new_tokens=4, stop_at_eos=False)  # warm-up (first-call costs)
    t0 = time.perf_counter()
    total = 0
    for _ in range(n):
        out = generate(model, None, prompt_ids(rng, prefix, prompt_len, vocab), max_new_tokens=gen_len,
                       stop_at_eos=False, kv_dtype=kv_dtype_from_name(kv_cache), **(sampling or {}))
        total += out["n_generated"]
    return total / (time.perf_counter() - t0)


def scheduler_rate(model_dir: Path, threads: int, n: int, prompt_len: int, gen_len: int, vocab: int, kv_cache: str,
                   max_batch: int = 16, sampling: dict | None = None, prefix: list[int] = (),
                   pipeline: bool = True) -> float:
    """Tokens/s of `n` requests through `spectra.inference.batch.Scheduler` in this process, without HTTP: the server's
    engine settings (`max_batch` slots, 128-token prefill chunks, int8 head, the built-in tokenizer's text) and the
    clients' requests (greedy, `logprobs: 0`, past the end-of-text token), all submitted at once; the collector's
    generations frozen first, as the server freezes them."""
    import random

    import torch

    from spectra.data.tokenizer import builtin_tokenizer
    from spectra.inference.batch import Request, Scheduler
    from spectra.inference.bench import with_int8_head
    from spectra.inference.generate import kv_dtype_from_name
    from spectra.loading import load

    torch.set_num_threads(threads)
    sched = Scheduler(with_int8_head(load(model_dir)), builtin_tokenizer(), max_batch=max_batch,
                      max_len=len(prefix) + prompt_len + gen_len + 8, prefill_chunk=128,
                      kv_dtype=kv_dtype_from_name(kv_cache), pipeline=pipeline)
    rng = random.Random(2)

    def run(count: int, new_tokens: int) -> float:
        reqs = [Request(prompt_ids(rng, prefix, prompt_len, vocab), new_tokens, stop_at_eos=False,
                        logprobs=0, **(sampling or {})) for _ in range(count)]  # fmt: skip
        t0 = time.perf_counter()
        for r in reqs:
            sched.submit(r)
        while not sched.idle:
            sched.step()
        return sum(len(r.tokens) for r in reqs) / (time.perf_counter() - t0)

    run(2, 4)  # warm-up
    import gc

    gc.collect()
    gc.freeze()  # as the server does before its engine starts (`spectra.serve.app`): 4 % of this run's samples else
    try:
        return run(n, gen_len)
    finally:
        gc.unfreeze()


def start_spectra(model_dir: Path, threads: int, ctx: int, kv_cache: str, stream_interval: int = 1,
                  prefix_cache: bool = True, pipeline: bool = True) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "spectra", "serve", str(model_dir), "--port", str(port), "--threads", str(threads),
           "--ctx-len", str(ctx), "--kv-cache", kv_cache, "--stream-interval", str(stream_interval), *SERVE_EXTRA,
           *([] if prefix_cache else ["--no-prefix-cache"]), *([] if pipeline else ["--no-pipeline"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def start_llama(binary: str, model_dir: Path, tmp: Path, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    from spectra.data.tokenizer import builtin_tokenizer
    from spectra.interop.gguf import export_gguf
    from spectra.loading import load

    gguf = tmp / "model-tq2_0.gguf"
    if not gguf.exists():  # llama.cpp needs a vocabulary: the built-in BPE, padded to the model's vocab_size
        export_gguf(load(model_dir), gguf, qtype="tq2_0", tokenizer=builtin_tokenizer())
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb",
           str(threads), "-np", "16", "-c", str(ctx * 16), "-cb", "--no-repack"]
    # --no-repack: with weight repacking on (its default), this llama.cpp's AMX path (ggml_backend_amx_mul_mat, on the
    # Q8_0 output) segfaults as soon as two sequences are decoded together on an AMX CPU (gdb backtrace, 2026-12-03).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained: a full pipe would stall the server
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_soak(proc: subprocess.Popen, url: str, args: argparse.Namespace, vocab: int) -> dict:
    """16 clients without pause for args.soak seconds, with the server's RSS sampled every second; `rss_tenths_mb`:
    the RSS at each tenth of the soak, to tell a level that settles from one that keeps climbing."""
    rss0 = rss_mb(proc.pid)
    samples = [(0.0, rss0)]
    t0 = time.perf_counter()
    until = t0 + args.soak

    async def sample() -> None:
        while time.perf_counter() < until:
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            await asyncio.sleep(1)

    async def soak_run() -> dict:
        d = drive(url, 16, 0, args.prompt_len, args.gen_len, vocab, False, 99, until=until, client_lib=args.client,
                  prefix=args.prefix_ids)
        return (await asyncio.gather(d, sample()))[0]

    soak = run_loop(soak_run())
    samples.append((args.soak, rss_mb(proc.pid)))
    tenths = [max(r for t, r in samples if t <= args.soak * k / 10 + 0.5) for k in range(11)]
    soak.update(rss_start_mb=rss0, rss_end_mb=samples[-1][1], rss_max_mb=max(r for _, r in samples),
                rss_tenths_mb=tenths, seconds=args.soak)
    return soak


def summarize(rows: list[dict]) -> dict:
    """Per server and concurrency: the median over repeats of tok/s and of the ratios taken within each repeat (to
    that repeat's sequential rate, and spectra to llama-server), with their range: the pairing that survives a
    machine whose speed drifts between repeats."""
    import statistics

    def span(vals: list[float]) -> str:
        return f"{statistics.median(vals):.2f}x [{min(vals):.2f}-{max(vals):.2f}]" if len(vals) > 1 else \
            f"{vals[0]:.2f}x"

    lines, ratios = ["summary (median [range] over repeats; ratios paired within a repeat):"], []
    def whole(r: dict) -> bool:  # every request answered: a row that lost some ran another workload
        return not (r.get("transport_errors", 0) or r.get("status_other", 0) or r.get("status_5xx", 0))

    peer = {(r["repeat"], r["clients"]): r["tok_s"] for r in rows if r["server"] == "llama-server" and whole(r)}
    names = list(dict.fromkeys(r["server"] for r in rows if r["server"] not in ("in process", "llama-server")))
    first = {(r["repeat"], r["clients"]): r["tok_s"] for r in rows if names and r["server"] == names[0]}
    for name in dict.fromkeys(r["server"] for r in rows):
        for c in dict.fromkeys(r["clients"] for r in rows if r["server"] == name):
            mine = [r for r in rows if r["server"] == name and r["clients"] == c]
            vs_seq = [r["tok_s"] / r["sequential_tok_s"] for r in mine]
            vs_peer = [r["tok_s"] / peer[(r["repeat"], c)] for r in mine
                       if name not in ("llama-server", "in process") and peer.get((r["repeat"], c)) and whole(r)]
            rate = statistics.median(r["tok_s"] for r in mine)
            line = f"{name:<17} {c:>3} clients: {rate:8.1f} tok/s, vs one stream {span(vs_seq)}"
            if vs_peer:
                line += f", vs llama-server {span(vs_peer)}"
            vs_first = [r["tok_s"] / first[(r["repeat"], c)] for r in mine
                        if name in names[1:] and first.get((r["repeat"], c))]
            if vs_first:
                line += f", vs {names[0]} {span(vs_first)}"
            lost = sum(not whole(r) for r in mine)
            if lost:
                line += f" ({lost} of {len(mine)} repeats lost requests: left out of the paired ratios)"
            lines.append(line)
            ratios.append({"server": name, "clients": c, "tok_s_median": rate, "vs_sequential": vs_seq,
                           "vs_llama_server": vs_peer})
    return {"lines": lines, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a packed model directory (default: --size packed here)")
    parser.add_argument("--size", default="trilm-99m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per phase")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times the whole comparison (sequential, then each server) runs; ratios are paired "
                             "within a repeat and their median and range printed")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--llama-server", default=None, help="path to a llama.cpp llama-server binary")
    parser.add_argument("--soak", type=float, default=0, help="seconds of 16 clients after the table (0: none)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--client", choices=["raw", "aiohttp", "httpx"], default="raw",
                        help="the clients' HTTP code. They share the cores with the server they measure: raw (an "
                             "asyncio protocol that parses the bytes as they arrive) costs them the least CPU, "
                             "aiohttp's C parser more, httpx's pure-Python one the most")
    parser.add_argument("--stream-interval", type=int, nargs="+", default=[1],
                        help="a spectra server for each value (`spectra serve --stream-interval N`: a stream's tokens "
                             "in writes of N; rows 'spectra si=N'); default 1, every step's tokens at once")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="every prompt opens with the same N token ids (a system prompt) before its --prompt-len "
                             "random ones, everywhere (the clients, the sequential baseline, the in-process run)")
    parser.add_argument("--pipeline", choices=["on", "off"], nargs="+", default=["on"],
                        help="a spectra server for each (off: `spectra serve --no-pipeline`, rows 'spectra serial'); "
                             "default on, serve's default; the in-process row follows the first")
    parser.add_argument("--prefix-cache", choices=["on", "off"], nargs="+", default=["on"],
                        help="a spectra server for each (off: `spectra serve --no-prefix-cache`, rows 'spectra "
                             "no-prefix'); default on, serve's default")
    parser.add_argument("--in-process", action="store_true",
                        help="also run the 16-client workload through the scheduler in this process (no HTTP) and "
                             "print its ratio to the same repeat's single stream: the ceiling the server can reach")
    parser.add_argument("--kv-cache", choices=["f16", "f32", "q8"], default="f16",
                        help="KV cache dtype of the server, the sequential baseline and the in-process run (serve's "
                             "default: f16; q8: int8 rows with a scale each)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature everywhere (the clients' requests, the sequential baseline "
                             "and the in-process run; top_k off on both servers); 0: greedy")
    parser.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus sampling")
    args = parser.parse_args()
    if args.json:  # a bad path is found now, not after the measuring
        try:
            check_output_file(args.json, "--json")
        except ValueError as e:
            parser.error(str(e))
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    sampling = {} if args.temperature == 0 else {"temperature": args.temperature,
                                                 **({"top_p": args.top_p} if args.top_p is not None else {})}
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    for name in ("threads", "rounds", "prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("clients", "stream_interval"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} values must be positive, got {getattr(args, name)}")
    if args.soak < 0 or args.shared_prefix < 0:
        parser.error("--soak and --shared-prefix must be >= 0")
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a model folder")
    if args.llama_server is not None and not (Path(args.llama_server).is_file()
                                              and os.access(args.llama_server, os.X_OK)):
        parser.error(f"--llama-server {args.llama_server}: not an executable file")
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    with tempfile.TemporaryDirectory(prefix="spectra-serve-bench-") as tmpd:
        tmp = Path(tmpd)
        if args.model is None:
            from spectra.__main__ import main as spectra_main

            model_dir = tmp / "packed"
            if spectra_main(["pack", args.size, str(model_dir), "--lossy"]) != 0:
                raise SystemExit("packing the model failed")
            label = f"{args.size} (random weights, packed tq2)"
        else:
            model_dir, label = Path(args.model), args.model
        # Prompts are random ids of the built-in BPE's range (a vocabulary llama-server can detokenize); generated ids
        # range over the whole model vocabulary (the GGUF's padding ids detokenize to nothing, one event each).
        from spectra.data.tokenizer import BUILTIN_VOCAB

        vocab = min(BUILTIN_VOCAB, json.loads((model_dir / "spectra.json").read_text())["config"]["vocab_size"])
        ctx = args.shared_prefix + args.prompt_len + args.gen_len + 8
        prefix_rng = __import__("random").Random(7)
        args.prefix_ids = [prefix_rng.randrange(1, vocab) for _ in range(args.shared_prefix)]
        load_before = os.getloadavg()[0]
        servers = [("spectra" + ("" if si == 1 else f" si={si}") + ("" if pc == "on" else " no-prefix")
                    + ("" if pl == "on" else " serial"),
                    lambda si=si, pc=pc, pl=pl: start_spectra(model_dir, args.threads, ctx, args.kv_cache, si,
                                                              pc == "on", pl == "on"),
                    False)
                   for pl in args.pipeline for pc in args.prefix_cache for si in args.stream_interval]
        if args.llama_server:
            servers.append(("llama-server", lambda: start_llama(args.llama_server, model_dir, tmp, args.threads, ctx),
                            True))
        seqs: list[float] = []
        rows = []
        soak = None
        for rep in range(args.repeats):
            seq = sequential_rate(model_dir, args.threads, max(2, args.rounds), args.prompt_len, args.gen_len, vocab,
                                  args.kv_cache, sampling, args.prefix_ids)
            seqs.append(seq)
            if args.in_process:
                c = max(args.clients)
                rate = scheduler_rate(model_dir, args.threads, c * args.rounds, args.prompt_len, args.gen_len, vocab,
                                      args.kv_cache, sampling=sampling, prefix=args.prefix_ids,
                                      pipeline=args.pipeline[0] == "on")
                nan = float("nan")
                rows.append({"server": "in process", "repeat": rep, "sequential_tok_s": seq, "clients": c,
                             "requests": c * args.rounds, "tokens": c * args.rounds * args.gen_len, "wall_s": nan,
                             "tok_s": rate, "ttft_p50": nan, "ttft_p99": nan, "tpot_p50": nan, "tpot_p99": nan,
                             "status_5xx": 0, "status_other": 0, "transport_errors": 0})  # fmt: skip
            # Odd repeats run the servers in reverse order: on the 2-core VM the later server of a repeat ran 2-11 %
            # faster whatever it was (the same build with and without prefix reuse, both orders, 2026-12-06).
            for name, start, llama in servers if rep % 2 == 0 else servers[::-1]:
                proc, url = start()
                try:
                    run_loop(drive(url, 2, 1, args.prompt_len, 4, vocab, llama, 0, client_lib=args.client))
                    for c in args.clients:
                        r = run_loop(drive(url, c, args.rounds, args.prompt_len, args.gen_len, vocab, llama,
                                              c + 1000 * rep, client_lib=args.client, sampling=sampling,
                                              prefix=args.prefix_ids))
                        rows.append({"server": name, "repeat": rep, "sequential_tok_s": seq, **r})
                    if args.soak and name == servers[0][0] and rep == args.repeats - 1:
                        soak = run_soak(proc, url, args, vocab)
                finally:
                    stop(proc)
        how = "greedy" if not sampling else ", ".join(f"{k} {v}" for k, v in sampling.items())
        shared = f"a shared {args.shared_prefix}-token prefix + " if args.shared_prefix else ""
        print(f"{label}; {args.kv_cache} KV cache, {args.threads} threads, prompt {shared}{args.prompt_len}, "
              f"{args.gen_len} "
              f"tokens per request ({how}), "
              f"{args.rounds} requests per client, {args.repeats} repeats; cpus={os.cpu_count()}, load average "
              f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}")
        print("sequential single stream (generate, in process): " + ", ".join(f"{v:.1f}" for v in seqs) + " tok/s")
        print(f"{'server':<17} {'rep':>3} {'clients':>7} {'tok/s':>8} {'vs seq':>7} {'TTFT p50':>9} {'p99':>8} "
              f"{'ms/tok p50':>10} {'p99':>7} {'5xx':>4} {'lost':>4}")
        def ms(v: float, width: int, unit: str = "") -> str:  # "-" where a row has no latencies (in process)
            return f"{'-':>{width + len(unit)}}" if v != v else f"{1000 * v:>{width}.{2 if not unit else 1}f}{unit}"

        for r in rows:
            print(f"{r['server']:<17} {r['repeat']:>3} {r['clients']:>7} {r['tok_s']:>8.1f} "
                  f"{r['tok_s'] / r['sequential_tok_s']:>6.2f}x "
                  f"{ms(r['ttft_p50'], 7, 'ms')} {ms(r['ttft_p99'], 6, 'ms')} {ms(r['tpot_p50'], 10)} "
                  f"{ms(r['tpot_p99'], 7)} {r['status_5xx']:>4} "
                  f"{r.get('transport_errors', 0) + r.get('status_other', 0):>4}")
        summary = summarize(rows)
        for line in summary["lines"]:
            print(line)
        if soak is not None:
            print(f"soak: {soak['seconds']:.0f} s of 16 clients, {soak['requests']} requests, {soak['tokens']} tokens "
                  f"({soak['tok_s']:.1f} tok/s); 5xx {soak['status_5xx']}, other non-200 {soak['status_other']}, "
                  f"transport errors {soak['transport_errors']}; server RSS {soak['rss_start_mb']:.0f} MiB at start, "
                  f"{soak['rss_end_mb']:.0f} MiB at end, max {soak['rss_max_mb']:.0f} MiB; at each tenth: "
                  f"{' '.join(f'{r:.0f}' for r in soak['rss_tenths_mb'])} MiB")
        if args.json:
            write_json(args.json, {"sequential_tok_s": seqs, "rows": rows, "summary": summary["ratios"],
                                   "soak": soak})


if __name__ == "__main__":
    main()
