"""The token-lane GEMM (csrc/lane_kernels.h) and the quad GEMM (csrc/quad_kernels.h) against the 4 x 4 tile GEMM, in
one run.

    python benchmarks/lane_gemm.py [--size trilm-1.1b] [--threads 1 2] [--tokens 16 32 64 128] [--rounds 7]
                                   [--prompt-len 128]

Two measurements, each interleaved round by round (tiles: both off; lanes: from 32 tokens, quad off; quad: from 8
tokens, lanes off) so that a shared machine's drift hits all three:
- the block matrices of one layer of `--size` (q, gate, down shapes; random ternary codes, TQ2_0) multiplied by T
  token rows: GMAC/s of each kernel and the per-round ratios lanes / tiles and quad / lanes;
- `--prompt-len` tokens of prefill through the synthetic packed model of that size (`time_torch`, the path
  `spectra generate` takes): tok/s of each.
Prints medians and the range of the per-round ratios; the kernels give identical outputs either way (tests). The
default setting (quad below 128 / 256 tokens, lanes above) is `kernels.use_quad`'s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.config import SIZES
from spectra.inference.bench import packed_copy, synthetic_trilm, time_torch
from spectra.packed import formats as F
from spectra.packed import kernels as K


def _matrix(N: int, Kdim: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, Kdim), generator=g, dtype=torch.int8)
    qs, d = F.blocks_from_ternary(codes, torch.tensor([0.02]), 0)
    bounds, seg_d = F.scale_segments(d)
    return torch.from_numpy(qs), torch.from_numpy(bounds), torch.from_numpy(seg_d)


KERNELS = {"tiles": (0, 0), "lanes": (32, 0), "quad": (0, 8)}  # (use_lane, use_quad)


def _ab(measure, rounds: int) -> dict[str, list[float]]:
    """Seconds from measure() with each of KERNELS, `rounds` interleaved rounds."""
    lane, quad = K.use_lane(32), K.use_quad(8)
    out: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(rounds):
        for name, (ln, qd) in KERNELS.items():
            K.use_lane(ln)
            K.use_quad(qd)
            out[name].append(measure())
    K.use_lane(lane)
    K.use_quad(quad)
    return out


def _twice(fn) -> float:
    """Mean seconds of two calls of fn after a warm-up call."""
    fn()
    t0 = time.perf_counter()
    fn()
    fn()
    return (time.perf_counter() - t0) / 2


def _span(off: list[float], on: list[float]) -> str:
    r = sorted(a / b for a, b in zip(off, on))
    return f"{statistics.median(r):.2f}x [{r[0]:.2f}-{r[-1]:.2f}], faster in {sum(x > 1 for x in r)}/{len(r)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="trilm-1.1b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args()
    if K.extension() is None or "avx512vnni" not in K.supported_paths():
        raise SystemExit("the token-lane GEMM needs the C extension and an AVX-512 VNNI CPU")
    amx_before = K.use_amx(False)
    shape = SIZES[args.size.removeprefix("trilm-").removeprefix("floatlm-")]
    C, G = shape["dim"], shape["glu_dim"]
    mats = {f"{C}x{C}": _matrix(C, C, 0), f"{G}x{C}": _matrix(G, C, 1), f"{C}x{G}": _matrix(C, G, 2)}
    print(f"{args.size}: lanes / tiles and quad / lanes, median [range] of per-round ratios over {args.rounds} "
          "interleaved rounds")
    for t in args.threads:
        for name, (qs, bounds, seg_d) in mats.items():
            for T in args.tokens:
                x = torch.randn(T, qs.shape[1] // 64 * 256)
                s = _ab(lambda: _twice(lambda: K.ternary_matmul(x, qs, bounds, seg_d, n_threads=t)), args.rounds)
                macs = qs.shape[0] * x.shape[1] * T
                rate = {k: macs / statistics.median(v) / 1e9 for k, v in s.items()}
                print(f"  {t}T {name:>10} T={T:<4} GMAC/s tiles {rate['tiles']:6.1f}, lanes {rate['lanes']:6.1f}, "
                      f"quad {rate['quad']:6.1f}; lanes/tiles {_span(s['tiles'], s['lanes'])}; "
                      f"quad/lanes {_span(s['lanes'], s['quad'])}", flush=True)
    model = packed_copy(synthetic_trilm(args.size, vocab_size=32000), "tq2", inplace=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (1, args.prompt_len), generator=g)
    one = torch.randint(0, 32000, (1, 1), generator=g)
    for t in args.threads:
        torch.set_num_threads(t)
        s = _ab(lambda: time_torch(model, prompt, one, kv_dtype=torch.float16)[0], args.rounds)
        rate = {k: args.prompt_len / statistics.median(v) for k, v in s.items()}
        print(f"  {t}T prefill {args.prompt_len}: tok/s tiles {rate['tiles']:.1f}, lanes {rate['lanes']:.1f}, quad "
              f"{rate['quad']:.1f}; lanes/tiles {_span(s['tiles'], s['lanes'])}; quad/lanes "
              f"{_span(s['lanes'], s['quad'])}", flush=True)
    K.use_amx(amx_before)


if __name__ == "__main__":
    main()
