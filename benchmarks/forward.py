"""Forward and forward+backward tokens/s: spectra's model vs transformers' LlamaForCausalLM, same size and dtype.

    python benchmarks/forward.py [--size 20m] [--batch 4] [--seq 256] [--repeats 5] [--threads 2]

Both models get the same weights (ours exported through spectra.interop.hf). Each measurement alternates the two
models and keeps the best of `--repeats`, so background load hits both alike. Prints tokens/s and ours/theirs.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from spectra.config import from_name
from spectra.interop.hf import export_hf
from spectra.model import build_model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (the CPU sizes train with a small BPE)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    print(f"size={args.size} batch={args.batch} seq={args.seq} threads={args.threads} torch={torch.__version__}")
    print(f"{'family':<8} {'dtype':<9} {'pass':<13} {'spectra tok/s':>14} {'transformers':>13} {'ratio':>7}")
    idx = torch.randint(0, args.vocab, (args.batch, args.seq))
    tokens = idx.numel()
    for family in ("floatlm", "trilm"):  # transformers has no ternary layer: TriLM is compared to the float Llama
        cfg = from_name(f"{family}-{args.size}", vocab_size=args.vocab, max_seq_len=max(args.seq, 256))
        ours = build_model(cfg, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(ours, tmp, dtype=torch.float32)
            theirs = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32, attn_implementation="sdpa")
        for dtype in (torch.float32, torch.bfloat16):
            a, b = ours.to(dtype), theirs.to(dtype)

            def fwd(m, hf: bool) -> None:
                m.eval()
                with torch.no_grad():
                    m(idx).logits if hf else m(idx)

            def fwd_bwd(m, hf: bool) -> None:
                m.train()
                out = m(idx).logits if hf else m(idx)
                out.float().logsumexp(-1).mean().backward()
                m.zero_grad(set_to_none=True)

            for name, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
                t_ours, t_theirs = float("inf"), float("inf")
                for _ in range(args.repeats):  # interleave so background load hits both alike
                    t_ours = min(t_ours, timed(lambda: fn(a, False), 1))
                    t_theirs = min(t_theirs, timed(lambda: fn(b, True), 1))
                dt = str(dtype).removeprefix("torch.")
                print(f"{family:<8} {dt:<9} {name:<13} {tokens / t_ours:>14,.0f} {tokens / t_theirs:>13,.0f} "
                      f"{t_theirs / t_ours:>6.2f}x")


if __name__ == "__main__":
    main()
