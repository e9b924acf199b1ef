"""Training throughput: spectra's training step vs transformers' LlamaForCausalLM, same optimizer, batch and dtype.

    python benchmarks/train.py [--sizes tiny,99m] [--families floatlm,trilm] [--precision fp32] [--rounds 8]

One training step = forward, token-mean cross-entropy, backward, global-norm clipping at 1.0 and a fused AdamW step
(β = (0.9, 0.95), weight decay 0.1 on matrices), exactly what `spectra.train` runs per micro-batch. Ours is the
model of `spectra.model` (torch.compile'd unless --no-compile); theirs is LlamaForCausalLM of the same shape with
its own `labels=` loss and SDPA attention. TriLM is compared with the float Llama (transformers has no ternary
training layer), so its ratio includes the cost of ternarizing every weight each step.

Ours runs as `spectra.train` runs on CPU: with `reuse_freed_memory()` (train.reuse_heap), which keeps freed memory
in the process instead of letting every step fault in fresh pages. Transformers is measured twice: as it comes, and
with the same allocator setting ("same heap"), so the table shows how much of the ratio that setting makes.

Each side runs in its own fresh Python process, `--procs` processes per side alternating ours / theirs; each process
takes two warm-up steps and keeps its fastest timed step, and the fastest over a side's processes counts. Separate
processes matter: run in one process, the two models share a heap, and transformers' steps measured up to 20 %
slower next to ours than alone (199–235 vs 249–256 tok/s at 99m). By default steps are
timed in process CPU time on one thread: on cores shared with other jobs, elapsed time mostly measures the queue
(`--clock wall --threads 2` for elapsed time on both cores). Issue 3's target, 1.5x transformers on this 2-core CPU,
is read on both cores (`--threads 2 --clock wall --procs 3` on an idle machine); the one-core view is stricter.
MFU = model FLOPs/token (6·N + attention) × tokens/s divided
by the best 1024³ matmul FLOP/s measured during the run at the same dtype (a shared 2-core CPU has no reliable
datasheet peak, so MFU is relative to what this machine sustained at its least loaded moment).
With --end-to-end, `spectra.train.train` also runs a few steps (data loading and logging included) per model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spectra.accounting import flops_per_token
from spectra.config import from_name
from spectra.model import build_model
from spectra.train.config import TrainConfig
from spectra.train.trainer import compile_blocks, loss_function, make_optimizer, reuse_freed_memory

SHAPES = {  # size: (micro batch, seq_len, vocab) for CPU measurement
    "tiny": (16, 256, 4096),
    "5m": (16, 256, 4096),
    "20m": (8, 256, 8192),
    "99m": (4, 256, 50304),
}


def matmul_peak(dtype: torch.dtype, clock=time.perf_counter, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


def amp(precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def ours_step_fn(cfg, precision: str, compile_model: bool):
    reuse_freed_memory()  # what train() does on CPU (train.reuse_heap)
    model = build_model(cfg, seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    if compile_model:  # what train(compile=True) does
        compile_blocks(model)
    loss_fn = loss_function(torch.device("cpu"), compile_model)

    def step(batch: torch.Tensor) -> float:
        with amp(precision):
            loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def theirs_step_fn(cfg, precision: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from spectra.interop.hf import hf_config

    hf = hf_config(cfg.replace(family="floatlm"), torch.float32)
    hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
    model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa"))
    model.train()
    decay = [p for p in model.parameters() if p.ndim == 2]
    other = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def step(batch: torch.Tensor) -> float:
        with amp(precision):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
SIDES = ("ours", "theirs", "theirs-heap")


def time_steps(step, batches, clock=time.perf_counter) -> float:
    t = clock()
    for b in batches:
        step(b)
    return clock() - t


def end_to_end(cfg, size: str, precision: str, compile_model: bool, steps: int) -> float:
    """tokens/s that spectra.train.train itself reports over `steps` steps (median step after the first two)."""
    from spectra.data.tokenizer import train_bpe
    from spectra.train import train

    B, T, V = SHAPES[size]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPECTRA_CACHE"] = tmp
        rng = random.Random(0)
        words = [f"w{i}" for i in range(3000)]
        corpus = Path(tmp) / "c.jsonl"
        corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=400))}) + "\n" for _ in range(800)))
        tok = train_bpe(corpus, 1024, Path(tmp) / "tok.json")
        tc = TrainConfig(data=str(corpus), tokenizer=str(tok), tokens=B * T * steps, seq_len=T, batch_tokens=B * T,
                         micro_batch=B, precision=precision, compile=compile_model, val_every=0, val_tokens=T)
        train(cfg, tc, out_dir=Path(tmp) / "run", progress=False)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2)
        return rates[len(rates) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,99m")
    p.add_argument("--families", default="floatlm,trilm")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--rounds", type=int, default=8, help="timed steps per side and process")
    p.add_argument("--big-rounds", type=int, default=4, help="timed steps per side and process for 99m and up")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="cpu: process CPU time (robust when other jobs share the cores); wall: elapsed time")
    p.add_argument("--end-to-end", action="store_true", help="also run spectra.train.train for a few steps")
    p.add_argument("--procs", type=int, default=2, help="fresh processes per side, alternating")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's worker
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        side_main(args)
        return
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    peak = matmul_peak(dtype, CLOCKS[args.clock])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, {args.precision}, "
          f"compile={not args.no_compile}, "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<14} {'B x T':>9} {'spectra tok/s':>14} {'transformers':>13} {'ratio':>7} {'MFU ours':>9} "
          f"{'MFU theirs':>11} {'transformers, same heap':>24} {'ratio':>7}")
    for size in args.sizes.split(","):
        B, T, V = SHAPES[size]
        rounds = args.rounds if size in ("tiny", "5m", "20m") else args.big_rounds
        for family in args.families.split(","):
            cfg = from_name(f"{family}-{size}", vocab_size=V, max_seq_len=T)
            best = dict.fromkeys(SIDES, float("inf"))
            for _ in range(args.procs):  # alternate fresh processes, so no side shares a heap with another
                for side in SIDES:
                    best[side] = min(best[side], run_side(side, size, family, rounds, args))
            tokens = B * T
            flops = flops_per_token(cfg, T)
            peak = max(peak, matmul_peak(dtype, CLOCKS[args.clock]))  # re-measured per row, the best counts
            rate = {side: tokens / t for side, t in best.items()}
            print(f"{family + '-' + size:<14} {f'{B}x{T}':>9} {rate['ours']:>14,.0f} {rate['theirs']:>13,.0f} "
                  f"{rate['ours'] / rate['theirs']:>6.2f}x {flops * rate['ours'] / peak:>8.1%} "
                  f"{flops * rate['theirs'] / peak:>10.1%} {rate['theirs-heap']:>24,.0f} "
                  f"{rate['ours'] / rate['theirs-heap']:>6.2f}x", flush=True)
            if args.end_to_end:
                rate = end_to_end(cfg, size, args.precision, not args.no_compile, 6)
                print(f"{'':<14} spectra.train.train end to end: {rate:,.0f} tok/s", flush=True)


def run_side(side: str, size: str, family: str, rounds: int, args: argparse.Namespace) -> float:
    """The fastest of `rounds` timed steps (after two warm-up steps) of one side, in a fresh Python process."""
    cmd = [sys.executable, __file__, "--side", side, "--sizes", size, "--families", family, "--rounds", str(rounds),
           "--precision", args.precision, "--threads", str(args.threads), "--clock", args.clock]
    if args.no_compile:
        cmd.append("--no-compile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} {family}-{size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["best_seconds"]


def side_main(args: argparse.Namespace) -> None:
    size, family = args.sizes, args.families
    B, T, V = SHAPES[size]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (B, T + 1), generator=gen) for _ in range(4)]
    cfg = from_name(f"{family}-{size}", vocab_size=V, max_seq_len=T)
    if args.side == "ours":
        step = ours_step_fn(cfg, args.precision, not args.no_compile)
    else:
        if args.side == "theirs-heap":
            reuse_freed_memory()
        step = theirs_step_fn(cfg, args.precision)
    for _ in range(2):  # warm-up (compilation, allocator)
        step(batches[0])
    best = min(time_steps(step, [batches[i % len(batches)]], CLOCKS[args.clock]) for i in range(args.rounds))
    print(json.dumps({"best_seconds": best}))


if __name__ == "__main__":
    main()
