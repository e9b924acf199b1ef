"""End-to-end decode and prompt speed of a TriLM-1.1B-shaped model: our packed kernels vs torch bf16 / fp32 vs
llama.cpp TQ2_0, all measured in one run, interleaved round by round.

    python benchmarks/decode.py [--size trilm-1.1b] [--threads 1 2] [--prompt-len 128] [--gen-len 64] [--repeats 3]

The model has random ternary block weights (one scale per matrix). Our packed variant decodes through
`spectra.inference.decode.Decoder` (one C call per layer per token) with an int8 lm_head (`Int8Linear`). llama.cpp
runs our own GGUF export of the same model (TQ2_0 blocks, Q8_0 token embedding and output) through llama-cpp-python
when it is installed.
Targets (issue 5): decode >= 1.3x llama.cpp TQ2_0, prompt processing faster than llama.cpp TQ2_0. For reference,
llama-bench measured 42.6 / 58.6 tok/s decode (1 / 2 threads) and 55 tok/s pp128 (1 thread) for TQ2_0 on this
machine with Q4_K embedding / Q6_K output and a 32000-token vocabulary (kernels-and-formats.md §1.3).
The machine is shared: the load average before and after is printed; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os

from spectra.files import check_output_file, write_json
from spectra.inference.bench import bench, llama_cpp_available
from spectra.inference.cli import format_bench

TARGET_DECODE = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="trilm-1.1b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["packed", "bf16", "fp32"])
    parser.add_argument("--format", default="tq2", choices=["tq2", "tq1"])
    parser.add_argument("--packed-head", default="int8", choices=["int8", "float"], help="lm_head of our model")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary (32000 = the reference run)")
    parser.add_argument("--json", default=None, help="also write the full result to this file")
    args = parser.parse_args()
    if args.json:  # a bad path is found now, not after the measuring
        try:
            check_output_file(args.json, "--json")
        except ValueError as e:
            parser.error(str(e))

    result = bench(
        args.size,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        threads=args.threads,
        dtypes=args.variants,
        llama_cpp=True if llama_cpp_available() else False,
        packed_format=args.format,
        packed_head=args.packed_head,
        repeats=args.repeats,
        vocab_size=args.vocab,
    )
    print(f"cpus={os.cpu_count()}")
    print(format_bench(result))
    for t in args.threads:
        r = result["ratios"].get(f"threads={t}", {})
        if "decode packed/llama.cpp" in r:
            d, p = r["decode packed/llama.cpp"], r["prompt packed/llama.cpp"]
            print(
                f"threads={t}: decode packed/llama.cpp {d:.2f}x (target >= {TARGET_DECODE}: "
                f"{'met' if d >= TARGET_DECODE else 'NOT met'}); prompt packed/llama.cpp {p:.2f}x "
                f"(target > 1: {'met' if p > 1 else 'NOT met'})"
            )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
