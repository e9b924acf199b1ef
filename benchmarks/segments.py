"""What several scale shards per matrix cost: the same packed weights run with 1 and with 2 scale segments, A/B.

    python benchmarks/segments.py [--threads 1] [--tokens 1 64] [--rounds 30]

A TriLM trained with 2-way model parallelism keeps 2 scales per matrix. Column-parallel layers (q, k, v, gate, up)
split them by output rows, which is still one segment per row. Row-parallel layers (o_proj, down_proj) split them along
the input, so every row has 2 scale segments. At the 1.1B's dim of 1792 = 7 blocks, `spectra pack --lossy` gives
o_proj the segments [0, 4, 7] and down_proj [0, 10, 20]. The kernels then keep one integer sum per segment and run a
float epilogue per segment.

This script times each shape with 1 segment and with 2, on the same code bytes with random per-row scales. Each call
passes over 24 distinct matrices, one per layer: down_proj then streams from DRAM as in decoding, while o_proj
(19 MiB in all) stays in L3. The A and B calls alternate for `--rounds` short rounds, and the median ratio of
neighbouring rounds is reported, which stays meaningful when the machine is shared. Every output is checked bit for
bit against the pure-torch reference first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.packed import formats
from spectra.packed import kernels as K
from spectra.packed.linear import PackedTernaryLinear

SHAPES = {"o_proj": (1792, 1792, [0, 4, 7]), "down_proj": (1792, 5120, [0, 10, 20])}  # N, K, 2-segment bounds
LAYERS = 24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64], help="1 = decoding (GEMV), 64 = a prompt")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = K.resolve_path("auto")
    ext, pid = K.extension(), K._PATH_IDS.get(path)
    if pid is None:
        raise SystemExit("needs spectra's compiled kernels (path 'torch' has nothing to compare)")
    g = torch.Generator().manual_seed(0)
    print(f"path {path}, {args.threads} thread(s), {LAYERS} matrices per call, median of {args.rounds} rounds")
    print("| matrix | tokens | 1 segment, ms | 2 segments, ms | 2 / 1 |")
    print("|---|---|---|---|---|")
    for name, (N, Kd, two) in SHAPES.items():
        mats = []
        for _ in range(LAYERS):
            codes = torch.randint(-1, 2, (N, Kd), generator=g, dtype=torch.int8)
            qs, d = formats.blocks_from_ternary(codes, torch.tensor([0.02]), 0)
            mats.append(PackedTernaryLinear(Kd, N, torch.from_numpy(qs), torch.from_numpy(d)).qs)  # on 2 MiB pages
        segs = [
            (torch.tensor([0, Kd // 256], dtype=torch.int32), (0.01 + 0.02 * torch.rand(N, 1, generator=g)).half()),
            (torch.tensor(two, dtype=torch.int32), (0.01 + 0.02 * torch.rand(N, 2, generator=g)).half()),
        ]
        segs = [(b, d.float()) for b, d in segs]
        for T in args.tokens:
            x, y = torch.randn(T, Kd), torch.empty(T, N)
            for b, d in segs:
                assert torch.equal(K.ternary_matmul(x, mats[0], b, d), K.reference_matmul(x, mats[0], b, d))

            def run(i: int) -> float:
                b, d = segs[i]
                t0 = time.perf_counter()
                for qs in mats:
                    ext.matmul(pid, x.data_ptr(), T, Kd, qs.data_ptr(), N, b.data_ptr(), b.numel() - 1, d.data_ptr(),
                               y.data_ptr(), args.threads)
                return (time.perf_counter() - t0) / LAYERS

            run(0), run(1)  # warm up
            t: list[list[float]] = [[], []]
            for r in range(args.rounds):
                for i in (0, 1) if r % 2 == 0 else (1, 0):
                    t[i].append(run(i))
            ratio = statistics.median(b / a for a, b in zip(*t))
            print(f"| {name} {N}×{Kd} | {T} | {statistics.median(t[0]) * 1e3:.4f} | "
                  f"{statistics.median(t[1]) * 1e3:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
