"""Aggregate decode speed of batched decoding at batch 1, 4 and 16, against the batch-1 C decoder, in one run.

    python benchmarks/batch_decode.py [--size trilm-1.1b] [--threads 1 2] [--batch 1 4 16] [--context 64]
                                      [--gen-len 32] [--repeats 3]

The model is the synthetic packed TriLM of `benchmarks/decode.py` (random ternary blocks, int8 lm_head). Each batch
size B holds B sequences in `spectra.inference.batch.BatchDecoder` slots, each prefilled with `--context` tokens (so
attention reads that many positions, as in a short chat), then times `--gen-len` steps that each advance all B
sequences by one token: aggregate tok/s = B · gen_len / seconds. `decoder` is the batch-1 `Decoder`
(`spectra generate`'s path) on the same model; `--kv-cache f16` puts every path's cache in float16. Rounds are
interleaved and the median of `--repeats` is printed with the ratio to batch 1 of the same run. The machine may be
shared: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from spectra.inference.batch import BatchDecoder
from spectra.inference.bench import packed_copy, synthetic_trilm, with_int8_head
from spectra.inference.decode import Decoder


def time_batch(bd: BatchDecoder, batch: int, context: int, gen_len: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    vocab = bd.config.vocab_size
    slots = [bd.acquire() for _ in range(batch)]
    try:
        for s in slots:
            bd.prefill(s, torch.randint(0, vocab, (context,), generator=g).tolist())
        tokens = torch.randint(0, vocab, (gen_len, batch), generator=g).tolist()
        t0 = time.perf_counter()
        for step in tokens:
            bd.step(slots, step)
        return time.perf_counter() - t0
    finally:
        for s in slots:
            bd.release(s)


def time_decoder(model, context: int, gen_len: int, seed: int, kv_dtype) -> float:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    dec = Decoder(model)
    cache = model.new_cache(1, context + gen_len, kv_dtype)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, context), generator=g), cache=cache)
        ids = torch.randint(0, vocab, (gen_len, 1, 1), generator=g)
        t0 = time.perf_counter()
        for t in ids:
            dec(t, cache=cache)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="trilm-1.1b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=64, help="prompt tokens each sequence holds before timing")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary (32000: decode.py)")
    parser.add_argument("--kv-cache", choices=["f32", "f16", "q8"], default="f32",
                        help="KV cache dtype of every path (serve's default is f16)")
    args = parser.parse_args()
    for name in ("threads", "batch"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} values must be positive, got {getattr(args, name)}")
    for name in ("context", "gen_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    load_before = os.getloadavg()
    model = with_int8_head(packed_copy(synthetic_trilm(args.size, vocab_size=args.vocab), "tq2", inplace=True))
    kv = {"f32": torch.float32, "f16": torch.float16, "q8": torch.int8}[args.kv_cache]
    bd = BatchDecoder(model, max(args.batch), args.context + args.gen_len, kv)
    if bd.kernel is None:
        print("note: no compiled batched kernel here; timing the model's modules")
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(-1, args.repeats):  # round -1 warms every path up (first calls, pages) and is not timed
        for t in args.threads:
            torch.set_num_threads(t)
            sample = time_decoder(model, args.context, args.gen_len, r, kv)
            if r >= 0:
                times.setdefault((t, "decoder"), []).append(sample)
            for b in args.batch:
                sample = time_batch(bd, b, args.context, args.gen_len, r)
                if r >= 0:
                    times.setdefault((t, f"batch {b}"), []).append(sample)
    print(f"{args.size} packed tq2, int8 head, {args.kv_cache} KV cache; context {args.context}, {args.gen_len} steps, "
          f"median of "
          f"{args.repeats}; cpus={os.cpu_count()}, load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'threads':>7} {'path':<10} {'aggregate tok/s':>16} {'ms/step':>8} {'vs batch 1':>11} {'vs decoder':>11}")
    for t in args.threads:
        names = ["decoder"] + [f"batch {b}" for b in dict.fromkeys(args.batch)]
        sec = {name: statistics.median(times[(t, name)]) for name in names}
        rate = {name: (1 if name == "decoder" else int(name.split()[1])) * args.gen_len / sec[name] for name in names}
        for name in names:  # every rate first: "vs batch 1" fell back to the row itself when batch 1 came later
            vs1 = f"{rate[name] / rate['batch 1']:>10.2f}x" if "batch 1" in rate else f"{'-':>11}"
            print(f"{t:>7} {name:<10} {rate[name]:>16.1f} {1000 * sec[name] / args.gen_len:>8.2f} "
                  f"{vs1} {rate[name] / rate['decoder']:>10.2f}x")


if __name__ == "__main__":
    main()
