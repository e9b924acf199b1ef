"""Decode speed with a float32, a float16 and a q8 KV cache, after prompts of several lengths, interleaved.

    python benchmarks/kv_cache.py [--size trilm-1.1b] [--prompt-len 128 1000] [--gen-len 32] [--threads 1 2]
                                  [--rounds 4]

Attention reads every cached key and value once per generated token, so past a few hundred positions the cache, not
the weights, is most of what a decode step reads. The model is a packed TQ2_0 TriLM of the named shape with random
weights and the int8 output layer (what `spectra pack` + `spectra.load` give); decoding is the batch-1 C decoder
(`spectra.inference.decode.Decoder`), as `spectra generate` runs it. Each round, per thread count and prompt length,
decodes `--gen-len` tokens after the prompt into each cache type in turn (the prompt is prefilled once per cache type).
Printed: median tok/s per cache type, and the medians of the per-round ratios f16 / f32 and q8 / f16 with their
ranges (q8: int8 rows with a scale each, `spectra.model.KVCache`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm

from spectra.inference.bench import packed_copy, synthetic_trilm, with_int8_head
from spectra.inference.decode import Decoder

CACHES = {"f32": torch.float32, "f16": torch.float16, "q8": torch.int8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="trilm-1.1b")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 1000])
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    if min(args.prompt_len) < 1 or args.gen_len < 1 or args.rounds < 1 or min(args.threads) < 1:
        p.error("--prompt-len, --gen-len, --rounds and --threads must be positive")

    model = with_int8_head(packed_copy(synthetic_trilm(args.size), "tq2", inplace=True))
    longest = max(args.prompt_len) + args.gen_len
    if longest > model.config.max_seq_len:
        p.error(f"prompt + gen = {longest} exceeds the model's max_seq_len {model.config.max_seq_len}")
    dec = Decoder(model)
    ids = torch.randint(0, model.config.vocab_size, (1, longest), generator=torch.Generator().manual_seed(0))
    caches = {name: model.new_cache(1, longest, dtype) for name, dtype in CACHES.items()}
    rates: dict[tuple[int, int, str], list[float]] = {}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for c in caches.values():
            dec.prefill(ids[:, : max(args.prompt_len)], c)  # every prompt length reuses this prefix
        steps = args.rounds * len(args.threads) * len(args.prompt_len) * len(caches)
        with tqdm(total=steps, desc="interleaved rounds", unit="run") as bar:
            for _ in range(args.rounds):
                for t in args.threads:
                    torch.set_num_threads(t)
                    for P in args.prompt_len:
                        for name, c in caches.items():
                            c.pos = P  # positions P .. P+G-1, after a prompt of P tokens
                            t0 = time.perf_counter()
                            for i in range(args.gen_len):
                                dec(ids[:, P + i : P + i + 1], c)
                            rates.setdefault((t, P, name), []).append(args.gen_len / (time.perf_counter() - t0))
                            bar.update()
    print(f"{args.size}, packed TQ2_0, int8 head, decode {args.gen_len} tokens after the prompt; {args.rounds} rounds; "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'threads':>7} {'prompt':>6} {'f32 tok/s':>10} {'f16 tok/s':>10} {'q8 tok/s':>10} "
          f"{'f16/f32 (per-round median, range)':>34} {'q8/f16':>22}")
    for t in args.threads:
        for P in args.prompt_len:
            a, b, c = (rates[(t, P, n)] for n in CACHES)
            cells = []
            for x, y in ((a, b), (b, c)):
                ratios = [v / u for u, v in zip(x, y)]
                cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
            print(f"{t:>7} {P:>6} {statistics.median(a):>10.1f} {statistics.median(b):>10.1f} "
                  f"{statistics.median(c):>10.1f} {cells[0]:>34} {cells[1]:>22}")


if __name__ == "__main__":
    main()
