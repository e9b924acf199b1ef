"""`spectra quantize MODEL --bits {3,4,6,8} OUT`: GPTQ post-training quantization of a FloatLM into a QuantLM."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="GPTQ a FloatLM into a QuantLM (3/4/6/8 bits as in the paper; 2-8 accepted)")
    p.add_argument("model", help="a FloatLM directory (spectra or Hugging Face Llama)")
    p.add_argument("out_dir")
    p.add_argument("--bits", type=int, required=True, help="weight bits, 2-8 (the paper: 3, 4, 6, 8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale; -1 = one per row (default: 128 at <=4 bits, -1 above)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero-points (default: symmetric)")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="group parameters from the original weights")
    p.add_argument("--damp", type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block (columns)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--calib", default="builtin", help="calibration text: builtin, a file/folder, or hf:NAME[:CONFIG]")
    p.add_argument("--split", default="train")
    p.add_argument("--n-samples", type=int, default=128, help="calibration sequences (the paper used 512)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per forward chunk (default: about 32k tokens; smaller bounds memory)")
    p.add_argument("--device", default=None,
                   help="quantize one block at a time on this device, e.g. cuda (auto: the GPU if any; default: cpu)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder holding one, or builtin (default: the one in the model directory)")
    p.add_argument("--format", default="gptq", choices=["gptq", "unpacked", "both"],
                   help="gptq: packed checkpoint; unpacked: fp16 Llama weights; both: OUT/gptq and OUT/unpacked")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from spectra.ptq.pipeline import quantize

    result = quantize(
        args.model, args.out_dir, bits=args.bits, calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len,
        group_size=args.group_size, sym=not args.asym, act_order=args.act_order, static_groups=args.static_groups,
        percdamp=args.damp, block_size=args.block_size, method=args.method, format=args.format,
        tokenizer=args.tokenizer, split=args.split, seed=args.seed, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    stats, size = result["stats"], result["size_bits"]
    for fmt, path in result["outputs"].items():
        print(f"wrote {fmt}: {path}")
    print(f"{stats['method']} {stats['bits']}-bit, group {stats['group_size']}, {stats['n_linear']} linear layers, "
          f"{stats['seconds']:.1f} s; {size['bits_per_linear_weight']:.3f} bits per linear weight, "
          f"{size['total'] / 8e6:.2f} MB")
    return 0
