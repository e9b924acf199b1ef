"""The serving engine: one thread that runs `spectra.inference.batch.Scheduler` steps while requests arrive.

HTTP handlers (on the asyncio loop) call `Engine.submit`, which checks the request, refuses it when `max_batch +
max_queue` requests are already in flight (`QueueFull`, answered 429), and hands it to the engine thread. The engine
thread moves new requests into the scheduler between steps, so a request joins the running batch at the next step;
each token and the final "done" are handed back to the request's asyncio queue with `call_soon_threadsafe`. A request
cancelled from the loop (its client went away) is dropped by the scheduler at its next step, freeing its slot.

An exception inside a step fails the requests in flight with finish reason "error" and the engine keeps serving; it
is logged and counted. `Metrics` keeps what /metrics reports, in the Prometheus text format.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spectra.inference.batch import Request, Scheduler

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class QueueFull(Exception):
    """Every slot is busy and the queue holds `max_queue` requests."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        out += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram("spectra_time_to_first_token_seconds", "Time from request to its first token.",
                              TTFT_BUCKETS)
        self.tpot = Histogram("spectra_time_per_output_token_seconds", "Time between a request's tokens.", TPOT_BUCKETS)
        self.requests: dict[str, int] = {}  # by finish reason / HTTP outcome
        self.generated = 0
        self.prompt = 0
        self.cached = 0
        self.errors = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last WINDOW seconds

    WINDOW = 10.0

    def count_request(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def add_tokens(self, n: int, now: float) -> None:
        self.generated += n
        self._recent.append((now, n))

    def tokens_per_s(self, now: float) -> float:
        while self._recent and self._recent[0][0] < now - self.WINDOW:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.WINDOW

    def render(self, queue_depth: int, active: int, slots: int) -> str:
        now = time.perf_counter()
        lines = [
            "# HELP spectra_queue_depth Requests waiting for a slot.", "# TYPE spectra_queue_depth gauge",
            f"spectra_queue_depth {queue_depth}",
            "# HELP spectra_active_sequences Sequences holding a KV-cache slot.",
            "# TYPE spectra_active_sequences gauge", f"spectra_active_sequences {active}",
            "# HELP spectra_slots KV-cache slots (--max-batch).", "# TYPE spectra_slots gauge",
            f"spectra_slots {slots}",
            "# HELP spectra_tokens_per_second Generated tokens per second over the last 10 s.",
            "# TYPE spectra_tokens_per_second gauge", f"spectra_tokens_per_second {self.tokens_per_s(now):.3f}",
            "# HELP spectra_generated_tokens_total Tokens generated.", "# TYPE spectra_generated_tokens_total counter",
            f"spectra_generated_tokens_total {self.generated}",
            "# HELP spectra_prompt_tokens_total Prompt tokens processed.",
            "# TYPE spectra_prompt_tokens_total counter", f"spectra_prompt_tokens_total {self.prompt}",
            "# HELP spectra_prompt_tokens_cached_total Prompt tokens whose keys and values a slot already held.",
            "# TYPE spectra_prompt_tokens_cached_total counter", f"spectra_prompt_tokens_cached_total {self.cached}",
            "# HELP spectra_engine_errors_total Exceptions inside a decode step.",
            "# TYPE spectra_engine_errors_total counter", f"spectra_engine_errors_total {self.errors}",
            "# HELP spectra_requests_total Requests by outcome.", "# TYPE spectra_requests_total counter",
        ]  # fmt: skip
        lines += [f'spectra_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        lines += self.ttft.render() + self.tpot.render()
        return "\n".join(lines) + "\n"


class Engine:
    """Owns the model and the scheduler thread (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        ctx_len: int | None = None,
        prefill_chunk: int = 128,
        prefill_chunks_per_step: int | None = None,
        threads: int | None = None,
        kv_dtype: torch.dtype | None = None,
        prefix_cache: bool = True,
        pipeline: bool = True,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        # The engine thread's torch count (OpenMP's is per calling thread, so it is set there, from this thread's
        # default). A packed TriLM's kernels split their work over their own pool of that many threads, which never
        # waits for a thread the OS has not scheduled, and a step's few torch ops (embedding, sampling) run on the
        # engine thread alone (`Scheduler.step`, `kernels.serial_torch`): an OpenMP team of torch's would wait at
        # every barrier for a core that the HTTP loop or the clients hold, and spin on it afterwards.
        self.torch_threads = threads or torch.get_num_threads()
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_len=ctx_len, prefill_chunk=prefill_chunk,
                                   prefill_chunks_per_step=prefill_chunks_per_step, kv_dtype=kv_dtype,
                                   prefix_cache=prefix_cache, pipeline=pipeline)
        self.tokenizer = self.scheduler.tokenizer
        self.ctx_len = self.scheduler.decoder.max_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = Metrics()
        self._incoming: list[Request] = []
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spectra-engine", daemon=True)
        # Called on the engine thread after every step (and after failing requests): the HTTP app's `Mailbox.deliver`,
        # which hands the step's events to the loop in one wake-up.
        self.on_step_end: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still in flight and end the thread."""
        self.cancel_all()
        self._thread.join(timeout)

    def cancel_all(self) -> None:
        """Refuse new requests (ShuttingDown) and have the thread finish every request in flight as "cancelled" after
        its current step, then end; returns at once (`stop` waits for the thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.scheduler.waiting)

    def check(self, req: Request) -> None:
        self.scheduler.check(req)

    def submit(self, req: Request) -> None:
        """Queue `req` (already `check`ed) for the engine thread; QueueFull / ShuttingDown when it cannot be taken."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._in_flight} requests in flight ({self.max_batch} slots + {self.max_queue} "
                                "queued)")
            self._in_flight += 1
            req.t_submit = time.perf_counter()
            forward = req.on_event

            def on_event(ev: dict, req: Request = req) -> None:
                if ev["type"] == "done":
                    self._finished(req)
                if forward is not None:
                    forward(ev)

            req.on_event = on_event
            self._incoming.append(req)
            self._cond.notify()

    def wake(self) -> None:
        """Have the thread look at its requests now (after a cancellation while it waits for work)."""
        with self._cond:
            self._cond.notify()

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)
        sched = self.scheduler
        while True:
            with self._cond:
                while not self._incoming and sched.idle and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                new, self._incoming = self._incoming, []
            for req in new:
                sched.waiting.append(req)
            try:
                before = sched.stats["generated"], sched.stats["prefilled"], sched.stats["cached"]
                sched.step()
                self.metrics.add_tokens(sched.stats["generated"] - before[0], time.perf_counter())
                self.metrics.prompt += sched.stats["prefilled"] - before[1]
                self.metrics.cached += sched.stats["cached"] - before[2]
            except Exception:  # a bug or a resource error: fail the requests in flight, keep serving
                log.exception("decode step failed; failing the requests in flight")
                self.metrics.errors += 1
                self._reset_after_error()
            self._step_end()
        with self._cond:
            leftover, self._incoming = self._incoming, []
        for req in leftover:
            sched.waiting.append(req)
        sched.fail_all("cancelled")
        self._step_end()

    def _step_end(self) -> None:
        if self.on_step_end is not None:
            try:
                self.on_step_end()
            except Exception:  # never let the hand-off stop the engine thread
                log.exception("handing a step's events over failed")

    def _reset_after_error(self) -> None:
        sched = self.scheduler
        sched.fail_all("error")

    def _finished(self, req: Request) -> None:
        """A request is over (engine thread): the in-flight count and the latency metrics."""
        with self._cond:
            self._in_flight -= 1
        m = self.metrics
        m.count_request(req.finish_reason or "unknown")
        if req.t_first is not None:
            m.ttft.observe(req.t_first - req.t_submit)
            if req.t_done is not None and len(req.tokens) > 1:
                m.tpot.observe((req.t_done - req.t_first) / (len(req.tokens) - 1))
