"""Training attention on CPU: spectra's C kernel vs the same algorithm in batched torch matmuls vs torch's flash SDPA.

    python benchmarks/attention.py [--shape 4,8,256,64] [--threads 1] [--rounds 20]

One causal attention layer in bf16, forward and backward, as a training step runs it (`spectra.model.
dense_causal_attention`; the default shape is one 99m layer of `benchmarks/train.py`: batch 4, 8 heads, 256
positions, head size 64). The three methods are timed interleaved, round after round, in process CPU time, and the
best round of each is reported (this 2-core machine is shared; the best round is the least disturbed one). The
ratios are against the batched torch matmuls (what the kernel replaced) and against flash. As in training
(`train.reuse_heap`), freed memory stays in the process, so the probabilities' 4 MiB are not faulted in anew per call.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from spectra.kernels.attention import attention_kernel, dense_causal_attention
from spectra.train.trainer import reuse_freed_memory


def fwd_bwd(fn, q, k, v, g) -> tuple[float, float]:
    """CPU seconds of one forward and of one backward."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.process_time()
    out = fn(q, k, v)
    t1 = time.process_time()
    out.backward(g)
    return t1 - t0, time.process_time() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4,8,256,64", help="B,H,T,D")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    B, H, T, D = (int(x) for x in args.shape.split(","))
    if attention_kernel() is None:
        raise SystemExit("this machine or build has no attention kernel (needs AVX-512 BF16 and spectra's extension)")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    g = torch.randn(B, H, T, D, generator=gen).to(torch.bfloat16)
    methods = {
        "kernel": lambda *a: dense_causal_attention(*a, use_kernel=True),
        "torch matmuls": lambda *a: dense_causal_attention(*a, use_kernel=False),
        "flash (SDPA)": lambda *a: F.scaled_dot_product_attention(*a, is_causal=True),
    }
    best = {name: [float("inf"), float("inf")] for name in methods}
    for _ in range(args.rounds + 2):  # two warm-up rounds count too: the best round is kept
        for name, fn in methods.items():
            f, b = fwd_bwd(fn, q, k, v, g)
            best[name] = [min(best[name][0], f), min(best[name][1], b)]
    print(f"torch {torch.__version__}, {args.threads} threads, bf16, B,H,T,D = {B},{H},{T},{D}, best of "
          f"{args.rounds + 2} rounds (CPU time)")
    print(f"{'method':<14} {'forward ms':>11} {'backward ms':>12} {'total ms':>9} {'kernel speedup':>15}")
    kernel_total = sum(best["kernel"])
    for name, (f, b) in best.items():
        print(f"{name:<14} {f * 1e3:>11.2f} {b * 1e3:>12.2f} {(f + b) * 1e3:>9.2f} {(f + b) / kernel_total:>14.2f}x")


if __name__ == "__main__":
    main()
