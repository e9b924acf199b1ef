"""`spectra eval MODEL`: perplexity and the paper's benchmarks (parses arguments, calls `spectra.eval.evaluate`)."""

from __future__ import annotations

import argparse
import math
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and the paper's benchmarks through lm-evaluation-harness",
        description="Evaluate any model spectra opens (spectra dir, packed, QuantLM, Hugging Face dir, size name) on "
        "lm-eval tasks and/or perplexity. Task presets: paper (the Spectra list), ppl (perplexity on --data), "
        "cloze (LAMBADA-style task built from --data); or lm-eval task names, comma-separated.",
    )
    p.add_argument("model", help="model directory or size name")
    p.add_argument("--tasks", default="paper", help="paper | ppl | cloze | name,name,... (default: paper)")
    p.add_argument("--data", default=None, help="corpus for ppl and cloze: builtin (default), a local file/folder, "
                   "or hf:NAME[:CONFIG]; the validation split is used")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own (zero-shot for paper)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one stored with the model)")
    p.add_argument("--offline-dir", nargs="?", const="", default=None,
                   help="use the local benchmark data built by `spectra data evals`; without a value (put it after "
                   "MODEL then) the default folder <cache>/evals")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: seq-len)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity on at most this many tokens of the split "
                   "(the last document cut to fit; at least 2), default: the whole split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    offline_dir = args.offline_dir
    if offline_dir is not None:
        from spectra.data import cache_root

        offline_dir = offline_dir or str(cache_root() / "evals")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is first imported, below
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from spectra.eval import evaluate
    from spectra.eval.results import format_table, write_results

    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise ValueError(f"--limit must be a positive number of documents (or a fraction below 1), got {args.limit}")
    for name in ("batch_size", "seq_len", "stride", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (one token to predict after one of context), got "
                         f"{args.max_tokens}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.output:  # found now, not after the evaluation (hours for --tasks paper)
        from spectra.files import check_output_file

        check_output_file(args.output, "--output")
    names = {t.strip() for t in str(args.tasks).split(",") if t.strip()}
    if names and names <= {"ppl"} and (args.limit is not None or args.num_fewshot is not None):
        # perplexity reads --max-tokens, not these: they were accepted and did nothing
        raise ValueError("--limit and --num-fewshot apply to benchmark tasks; --tasks ppl scores the held-out text "
                         "(bound it with --max-tokens)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(
        args.model,
        args.tasks,
        limit=limit,
        batch_size=args.batch_size,
        offline_dir=offline_dir,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        num_fewshot=args.num_fewshot,
        data=args.data,
        ppl_seq_len=args.seq_len,
        ppl_stride=args.stride,
        ppl_max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    print(format_table(results))
    if args.output:
        write_results(args.output, results)
        print(f"results written to {args.output}")
    return 0
