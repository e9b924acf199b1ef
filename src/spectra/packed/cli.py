"""`spectra pack MODEL OUT [--format tq2|tq1] [--lossy] [--embedding float16] [--head int8]`: write a packed TriLM
checkpoint (spectra.packed.io)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a TriLM's ternary layers into llama.cpp's TQ2_0 (2.06 bits) or TQ1_0 (1.69 bits) blocks",
        description="Write a packed checkpoint that `spectra.load` opens and spectra's CPU kernels run.",
    )
    p.add_argument("model", help="a TriLM: spectra model directory, Hugging Face directory, or size name (random init)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--format", default="tq2", choices=["tq2", "tq1"], help="tq2: TQ2_0 (default, fastest); tq1: TQ1_0")
    p.add_argument(
        "--lossy",
        action="store_true",
        help="allow blocks straddling two shards with different scales (rounded to the block absmax like llama.cpp)",
    )
    p.add_argument("--embedding", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="how the embedding table is stored (default float16)")
    p.add_argument("--head", default="int8", choices=["int8", "float16", "bfloat16", "float32"],
                   help="how lm_head is stored: int8 (default; per-row scale, what decoding multiplies by) or a float")
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from spectra.files import refuse_replacing_source
    from spectra.loading import find_tokenizer, load
    from spectra.packed.io import pack_model

    refuse_replacing_source(args.out, args.model)
    summary = pack_model(load(args.model), args.out, format=args.format, lossy=args.lossy,
                         tokenizer=find_tokenizer(args.model), embedding=args.embedding, head=args.head)
    print(json.dumps(summary, indent=2))
    return 0
