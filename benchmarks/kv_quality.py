"""What a KV cache's precision costs in held-out loss: the same windows decoded token by token into each cache type.

    python benchmarks/kv_quality.py MODEL [--data builtin] [--split validation] [--windows 24] [--window 256]
                                    [--caches f32 f16 q8] [--tokenizer PATH]

MODEL is anything `spectra.load` opens (a packed TriLM decodes through the C decoder, as `spectra generate` does;
other models through their own forward with a cache). The held-out split is tokenized as `spectra eval`'s perplexity
does (documents joined by EOS) and cut into `--windows` disjoint windows of `--window` tokens. Each window is fed one
token at a time into a fresh cache of each type (teacher forcing: the cache holds exactly what decoding would put in
it), and every token after the window's first is scored. Printed per cache: loss (nats per token) and perplexity;
then each cache against the first (`--caches`' first, f32 by default): the loss difference with its paired
t-interval over windows (`spectra.suite.stats.paired_difference`) and how often the two pick the same top token.
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from spectra.data.tokenizer import load_tokenizer
from spectra.eval.perplexity import token_stream
from spectra.inference.decode import decoder_for
from spectra.inference.generate import KV_CACHE_TYPES
from spectra.loading import load
from spectra.suite.stats import paired_difference


def score(step, model, ids: list[int], dtype: torch.dtype) -> tuple[float, list[int]]:
    """Summed NLL of ids[1:] decoding ids one at a time into a fresh cache of `dtype`, and each position's argmax."""
    cache = model.new_cache(1, len(ids), dtype)
    nll, top = 0.0, []
    for t in range(len(ids) - 1):
        logits = step(torch.tensor([[ids[t]]]), cache=cache)[0, -1].float()
        nll -= float(torch.log_softmax(logits, -1)[ids[t + 1]])
        top.append(int(logits.argmax()))
    return nll, top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", default="builtin")
    p.add_argument("--split", default="validation")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--caches", nargs="+", default=["f32", "f16", "q8"], choices=sorted(KV_CACHE_TYPES))
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    args = p.parse_args()
    if args.windows < 2 or args.window < 2:
        p.error("--windows and --window must be at least 2")

    model = load(args.model)
    tok = load_tokenizer(args.tokenizer or args.model)
    need = args.windows * args.window
    ids, _, _ = token_stream(tok, args.data, args.split, need)
    if len(ids) < need:
        raise SystemExit(f"{args.data} ({args.split}) holds {len(ids)} tokens; {need} needed for --windows x --window")
    if args.window > model.config.max_seq_len:
        p.error(f"--window {args.window} exceeds the model's max_seq_len {model.config.max_seq_len}")
    step = decoder_for(model)
    wins = [ids[w * args.window : (w + 1) * args.window] for w in range(args.windows)]
    nll = {c: [] for c in args.caches}
    top = {c: [] for c in args.caches}
    with torch.inference_mode():
        for win in tqdm(wins, desc="windows", unit="window"):
            for c in args.caches:
                n, t = score(step, model, win, KV_CACHE_TYPES[c])
                nll[c].append(n)
                top[c].extend(t)
    tokens = [args.window - 1] * args.windows
    T = sum(tokens)
    print(f"{args.model}: {args.windows} windows of {args.window} tokens from {args.data} ({args.split}), "
          f"{T} scored tokens, decoded by {type(step).__name__}")
    for c in args.caches:
        loss = sum(nll[c]) / T
        print(f"  {c:>4}: loss {loss:.5f} nats/token, perplexity {math.exp(loss):.4f}")
    base = args.caches[0]
    for c in args.caches[1:]:
        d = paired_difference(nll[c], nll[base], tokens)
        same = sum(a == b for a, b in zip(top[c], top[base])) / len(top[c])
        print(f"  {c} - {base}: loss {d.text()} nats/token (95 % paired t over windows); same top token "
              f"{100 * same:.2f} % of positions")


if __name__ == "__main__":
    main()
