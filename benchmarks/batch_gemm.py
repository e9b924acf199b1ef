"""Aggregate throughput of the packed GEMMs in batched decoding: one layer's matrices of a TriLM shape (q|k|v, o,
gate|up, down; random ternary codes) multiplied by B token rows, against B = 1, measured interleaved in one run.

    python benchmarks/batch_gemm.py [--size 1.1b] [--format tq2_0] [--threads 1] [--batch 4 16 64] [--rounds 9]

The aggregate speedup is B · t(1) / t(B): how many more tokens per second the weight products give when B sequences
share each read of the weights (issue 19 asks for >= 4x at B = 16 on 2 cores, for the whole decoder). On CPUs with
AMX-INT8 it is printed with the tile unit on and off (the AVX-512 GEMM). Medians of interleaved rounds, so the ratios
stay meaningful on a shared machine; absolute times are not the point.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.config import SIZES
from spectra.packed import formats as F
from spectra.packed import kernels as K


def _matrix(N: int, Kdim: int, seed: int, fmt: str) -> tuple:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, Kdim), generator=g, dtype=torch.int8)
    qs, d = F.blocks_from_ternary(codes, torch.tensor([0.02]), 0)
    bounds, seg_d = F.scale_segments(d)
    if fmt == "tq1_0":
        qs = F.tq1_code_bytes(qs)
    return (torch.from_numpy(qs), torch.from_numpy(bounds), torch.from_numpy(seg_d), fmt)


def bench(size: str, fmt: str, threads: int, batches: list[int], rounds: int, n_layers: int = 4) -> dict:
    shape = SIZES[size]
    C, G = shape["dim"], shape["glu_dim"]
    layers = [  # several layers so that the weights do not all sit in cache between calls
        (
            [_matrix(C, C, 10 * i + j, fmt) for j in range(3)],
            [_matrix(C, C, 10 * i + 3, fmt)],
            [_matrix(G, C, 10 * i + j, fmt) for j in (4, 5)],
            [_matrix(C, G, 10 * i + 6, fmt)],
        )
        for i in range(n_layers)
    ]

    def step(B: int):
        x, h = torch.randn(B, C), torch.randn(B, G)

        def run():
            for qkv, o, gu, down in layers:
                for inp, mats in ((x, qkv), (x, o), (x, gu), (h, down)):
                    K.ternary_matmul_group(inp, mats, n_threads=threads)

        return run

    amx_modes = (True, False) if K.cpu_features().get("amx_int8") else (False,)
    fns = {(B, amx): step(B) for B in [1, *batches] for amx in amx_modes}
    times: dict = {key: [] for key in fns}
    try:
        for r in range(rounds):
            for key in list(fns) if r % 2 == 0 else reversed(list(fns)):
                K.use_amx(key[1])
                fns[key]()
                t0 = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - t0)
    finally:
        K.use_amx(True)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {"amx_modes": amx_modes, "median_s": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b", choices=sorted(SIZES))
    ap.add_argument("--format", default="tq2_0", choices=["tq2_0", "tq1_0"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    r = bench(args.size, args.format, args.threads, args.batch, args.rounds)
    med = r["median_s"]
    print(f"{args.size} GEMMs, {args.format}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    for amx in r["amx_modes"]:
        t1 = med[(1, amx)]
        label = "AMX" if amx else "AVX-512"
        for B in args.batch:
            print(
                f"{label:8s} B={B:3d}: {med[(B, amx)] * 1e3:8.2f} ms for 4 layers (B=1: {t1 * 1e3:.2f} ms); "
                f"aggregate x{B * t1 / med[(B, amx)]:.2f} vs one sequence"
            )


if __name__ == "__main__":
    main()
