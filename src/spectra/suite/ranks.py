"""The suite under torchrun: one process group for the whole study, each step done once, each record written once.

`torchrun --nproc_per_node N -m spectra suite ...` starts N copies of the suite. Training steps run on every rank
(data- or tensor-parallel, `spectra.train`), and so do evaluations (perplexity shares its windows over the ranks,
rank 0 writes the results); every other step (preflight, quantize, pack, bench, report) runs on rank 0 alone while
the other ranks wait for its outcome. Rank 0 decides what each step does (skip, blocked, run) from
its records and artifacts, and after the step broadcasts the record it wrote, so every rank holds the same records and
takes the same next step. Only rank 0 writes `results.jsonl`.

A failure on any rank fails the step everywhere with its reason: a rank-0 step's exception travels in the broadcast
record, and after a training or eval step the ranks gather each other's outcome, so an exception on any rank becomes one
failed record. Waiting ranks wait at most `SPECTRA_SUITE_TIMEOUT` seconds (default 6 h: a rank-0 step such as GPTQ
or evaluation of a large model can take hours) on a gloo group of their own, then fail with an error instead of
hanging; a rank that dies makes torchrun end the others.

World size 1 is the same code path with every collective a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as torch_dist

from spectra.train import dist

STEP_TIMEOUT_S = float(os.environ.get("SPECTRA_SUITE_TIMEOUT", 6 * 3600))

T = TypeVar("T")


class RankFailed(RuntimeError):
    """A step that failed on another rank (its message is that rank's reason)."""


class SuiteRanks:
    """The suite's view of the ranks: joins torchrun's process group once (training steps then reuse it instead of
    creating and destroying their own) and carries rank 0's decisions and results to the others."""

    def __init__(self, device: str = "auto", timeout_s: float = STEP_TIMEOUT_S) -> None:
        self.info = dist.init(device)
        self.group = None
        if self.info.world > 1:  # waits for rank 0's steps: a CPU group with a long, explicit timeout
            self.group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def world(self) -> int:
        return self.info.world

    def close(self) -> None:
        if self.group is not None:
            torch_dist.destroy_process_group(self.group)
            self.group = None
        dist.cleanup(self.info)

    def __enter__(self) -> SuiteRanks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result or raises its exception (on the other ranks as a
        `RankFailed` naming the exception)."""
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        value, reason = self.broadcast((value, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if reason is not None:
            raise RankFailed(f"rank 0 failed: {reason}")
        return value

    def on_all(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; rank 0's result on every rank, or, when any rank raised, a `RankFailed` on every
        rank naming the first failing rank and its exception (rank 0's own exception is re-raised there)."""
        value, error = None, None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - gathered, then raised on every rank
            error = e
        outcomes = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, reason) for r, reason in enumerate(outcomes) if reason is not None]
        if not failed:
            return self.broadcast(value)
        rank, reason = failed[0]
        if self.world == 1 and error is not None:
            raise error
        raise RankFailed(f"rank {rank} of {self.world} failed: {reason}")
