"""`spectra generate` and `spectra bench`."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (streams text, prints tokens/s)")
    p.add_argument("model", help="a model directory (latent, packed, QuantLM, Hugging Face) or a size name")
    p.add_argument("--prompt", required=True, action="append", help="repeat to decode several prompts as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's; 'builtin' for ours)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep going after the EOS token")
    p.add_argument("--cache-dequantized", action="store_true",
                   help="QuantLMs: keep each layer's dequantized weight (much faster decoding, a FloatLM's memory)")
    p.add_argument("--kv-cache", choices=["auto", "f32", "f16", "q8"], default="auto",
                   help="KV cache dtype (default auto: f16 for a float32 model such as a packed TriLM, as llama.cpp "
                        "and `serve` do, halving the bytes attention reads; a 16-bit model keeps its own dtype; q8: "
                        "int8 rows with a scale each, 0.53x f16)")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("bench", help="prompt and decode tokens/s of a model or a synthetic size, side by side")
    p.add_argument("model", help="a model directory or a size name (trilm-1.1b: random ternary weights)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["packed", "bf16", "fp32"], help="packed bf16 fp32 model")
    p.add_argument("--format", default=None, choices=["tq2", "tq1"],
                   help="packed format of a latent TriLM (default tq2; a packed checkpoint runs as stored)")
    p.add_argument("--packed-head", default=None, choices=["int8", "float"],
                   help="lm_head of the packed variant (default int8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-cache", choices=["auto", "f32", "f16", "q8"], default="auto",
                   help="KV cache dtype of every variant (default auto, as `generate`: f16 for a float32 variant)")
    llama = p.add_mutually_exclusive_group()
    llama.add_argument("--llama-cpp", dest="llama_cpp", action="store_true", default=None, help="require llama.cpp")
    llama.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_bench)


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from spectra.config import check_seed
    from spectra.inference.generate import generate, kv_dtype_from_name, threads_from_env
    from spectra.loading import find_tokenizer, load, looks_like_path, missing_model, not_a_model_dir

    torch.set_num_threads(threads_from_env(args.threads))
    check_seed(args.seed, "--seed")
    tokenizer = args.tokenizer
    if not Path(args.model).exists() and looks_like_path(args.model):  # before the tokenizer's error, which misled
        raise missing_model(args.model)
    if tokenizer is None:
        tokenizer = find_tokenizer(args.model) if Path(args.model).is_dir() else None
        if tokenizer is None and Path(args.model).is_file():  # before the tokenizer's error, which would mislead
            raise not_a_model_dir(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json; pass --tokenizer PATH (or 'builtin')")
    model = load(args.model)
    kv_dtype = kv_dtype_from_name(args.kv_cache, model)
    if args.cache_dequantized:
        from spectra.ptq.qlinear import cache_dequantized

        if cache_dequantized(model) == 0:  # accepted and ignored before
            raise ValueError(f"--cache-dequantized keeps a GPTQ QuantLM's dequantized weights; {args.model} has no "
                             "quantized layers")
    if len(args.prompt) > 1:  # several prompts: decoded together, printed when all are done
        outs = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=args.stop,
                        seed=args.seed, stop_at_eos=not args.no_eos_stop, kv_dtype=kv_dtype)
        for i, out in enumerate(outs):
            print(f"[{i}] {args.prompt[i]}{out['text']}")
        total = sum(o["n_generated"] for o in outs)
        print(f"[{len(outs)} prompts, {total} tokens generated at {outs[0]['tokens_per_s'] or 0:.1f} tok/s "
              "aggregate]", file=sys.stderr)
        return 0

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = generate(
        model,
        tokenizer,
        args.prompt[0],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop,
        seed=args.seed,
        stream=stream,
        stop_at_eos=not args.no_eos_stop,
        kv_dtype=kv_dtype,
    )
    sys.stdout.write("\n")
    pp, tg = out["prompt_tokens_per_s"], out["tokens_per_s"]
    print(
        f"[{out['n_prompt']} prompt tokens at {pp or 0:.1f} tok/s, {out['n_generated']} generated at "
        f"{tg or 0:.1f} tok/s; stopped by {out['finish_reason']}]",
        file=sys.stderr,
    )
    return 0


def format_bench(result: dict) -> str:
    """A side-by-side table of a `bench` result."""
    lines = [
        f"{result['model']}: prompt {result['prompt_len']} tokens, decode {result['gen_len']} tokens, "
        f"median of {result['repeats']}, KV cache {result.get('kv_cache', 'auto')}; "
        f"load average {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}",
        f"{'variant':<11} {'threads':>7} {'prompt tok/s':>13} {'decode tok/s':>13} {'ms/token':>9} {'weights MiB':>12}",
    ]
    nan = float("nan")
    for r in sorted(result["results"], key=lambda r: (r["threads"], r["variant"])):
        lines.append(
            f"{r['variant']:<11} {r['threads']:>7} {r['prompt_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>13.1f} "
            f"{r['ms_per_token']:>9.2f} {r.get('weights_mb', nan):>12.1f}"
        )
    paired = result.get("paired_ratios", {})
    for t, rs in result["ratios"].items():
        per = paired.get(t, {})
        lines.append(f"{t}: " + ", ".join(
            f"{k} {v:.2f}x" + (f" (per round {per[k][0]:.2f}x [{per[k][1]:.2f}-{per[k][2]:.2f}])" if k in per else "")
            for k, v in rs.items()))
    for k, why in result["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    lines.append(f"RSS with every variant loaded {result['rss_mb']:.0f} MiB, peak {result['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    from spectra.inference.bench import bench

    result = bench(
        args.model,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        threads=args.threads,
        dtypes=args.variants,
        llama_cpp=args.llama_cpp,
        packed_format=args.format,
        packed_head=args.packed_head,
        repeats=args.repeats,
        kv_cache=args.kv_cache,
    )
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0
