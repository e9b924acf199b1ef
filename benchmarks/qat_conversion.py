"""FloatLM -> TriLM conversion vs TriLM from scratch, on the built-in corpus, several seeds (issue 17's question).

    python benchmarks/qat_conversion.py [--size 1m] [--seeds 0,1,2,3] [--float-tokens 4e5] [--tri-tokens 2e5]
                                        [--warmup-tokens 5e4] [--out runs/qat-tiny]

Per seed, with the TriLM recipe of the size (LR, linear decay, peak drop, weight-decay removal) for every TriLM arm:

    floatlm          FloatLM pretrained on float-tokens (the start of the conversions and the teacher)
    scratch          TriLM from random weights, tri-tokens
    converted        TriLM from the FloatLM (`--init`, `--model.family=trilm`), tri-tokens, quantization warm-up
                     W + λ(Q(W) − W) with λ 0 -> 1 linearly over warmup-tokens
    converted+kd     the same, plus distillation from the FloatLM (kd_weight 1, temperature 1)
    scratch-long     TriLM from random weights, float-tokens + tri-tokens (the conversion's training tokens in all)

Every final model is scored on the same held-out sequences (the validation split, --val-seqs sequences of seq_len
tokens), giving one mean loss per sequence. The table reports, per arm: the validation loss as mean ± 95 % t-interval
over seeds, and the compute of the arm: training FLOPs (6·N + attention per token, `spectra.accounting`) of every
run that produced the model, the FloatLM's pretraining included for the converted arms, plus the teacher's forward
passes (a third of its training FLOPs per token) for converted+kd. The comparison converted − scratch is reported as
a paired difference on the same held-out sequences (per sequence, averaged over seeds; mean ± 95 % t-interval over
sequences) and as a difference over seeds (mean ± 95 % t-interval over seeds). The verdict "conversion reaches a lower
TriLM loss than scratch at the same TriLM token budget" holds when both intervals lie below 0, does not hold when
both lie above 0, and is not resolved otherwise. Losses do not depend on machine load; tokens/s do.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from spectra.accounting import flops_per_token
from spectra.config import from_name
from spectra.data.shards import TokenStream
from spectra.loading import load
from spectra.train import TrainConfig, train
from spectra.train.loss import reference_lm_loss

# two-sided 95 % Student t quantiles, df 1 .. 30; beyond, the normal's
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval) of a sample."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float(x.mean()), float("nan")
    t = T95[n - 2] if n - 1 <= len(T95) else 1.960
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(n))


def per_sequence_losses(model_dir: Path, shard_dir: Path, seq_len: int, n_seqs: int) -> np.ndarray:
    """Mean next-token loss of each of the first n_seqs validation sequences (float32, eval mode)."""
    model = load(model_dir).eval()
    stream = TokenStream(shard_dir, "validation")
    n = min(n_seqs, (len(stream) - 1) // seq_len)
    out = []
    with torch.no_grad():
        for i in range(0, n, 8):
            rows = np.stack([stream.get(j * seq_len, seq_len + 1) for j in range(i, min(n, i + 8))])
            b = torch.from_numpy(rows).long()
            logits = model(b[:, :-1])
            for r in range(b.shape[0]):
                out.append(reference_lm_loss(logits[r : r + 1], b[r : r + 1, 1:]).item())
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1m")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--float-tokens", type=float, default=4e5)
    ap.add_argument("--tri-tokens", type=float, default=2e5)
    ap.add_argument("--warmup-tokens", type=float, default=5e4)
    ap.add_argument("--val-seqs", type=int, default=128)
    ap.add_argument("--no-long", action="store_true", help="skip the scratch-long arm")
    ap.add_argument("--out", default="runs/qat-tiny")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    common = dict(data="builtin", batch_tokens=2048, seq_len=256, micro_batch=8, precision="bf16", val_every=0,
                  val_tokens=16384)
    model_over = dict(max_seq_len=256)
    float_cfg = from_name(f"floatlm-{args.size}", **model_over)
    tri_cfg = from_name(f"trilm-{args.size}", **model_over)
    arms = ["scratch", "converted", "converted+kd"] + ([] if args.no_long else ["scratch-long"])
    rows: dict[str, list[dict]] = {a: [] for a in ["floatlm", *arms]}
    t0 = time.time()
    for seed in seeds:
        d = out / f"seed{seed}"
        fl = d / "floatlm"

        def run(name, model, tokens, **kw):
            path = d / name
            if (path / "result.json").exists():  # rerun: keep finished runs
                return json.loads((path / "result.json").read_text()), path
            cfg = TrainConfig(tokens=tokens, seed=seed, **common, **kw)
            return train(model, cfg, out_dir=path, progress=True), path

        r, _ = run("floatlm", float_cfg, args.float_tokens, tokenizer="builtin", fit_vocab=True)
        rows["floatlm"].append({"seed": seed, "dir": fl, "result": r})
        spec = {
            "scratch": (tri_cfg, args.tri_tokens, dict(tokenizer="builtin", fit_vocab=True)),
            "converted": ({"family": "trilm"}, args.tri_tokens,
                          dict(init=str(fl), quant_warmup_tokens=args.warmup_tokens)),
            "converted+kd": ({"family": "trilm"}, args.tri_tokens,
                             dict(init=str(fl), quant_warmup_tokens=args.warmup_tokens, teacher=str(fl))),
            "scratch-long": (tri_cfg, args.float_tokens + args.tri_tokens, dict(tokenizer="builtin", fit_vocab=True)),
        }
        for arm in arms:
            model, tokens, kw = spec[arm]
            r, path = run(arm.replace("+", "_"), model, tokens, **kw)
            rows[arm].append({"seed": seed, "dir": path, "result": r})

    # ---- held-out scoring and compute ----------------------------------------------------------------------
    shard_dir = Path(json.loads((rows["floatlm"][0]["dir"] / "run.json").read_text())["data"])
    per_seq = {a: [per_sequence_losses(x["dir"] / "final", shard_dir, 256, args.val_seqs) for x in rows[a]]
               for a in rows}
    fl_cfg = load(rows["floatlm"][0]["dir"] / "final").config
    tr_cfg = fl_cfg.replace(family="trilm", name=None)
    f_float, f_tri = flops_per_token(fl_cfg, 256), flops_per_token(tr_cfg, 256)
    flops = {
        "floatlm": f_float * args.float_tokens,
        "scratch": f_tri * args.tri_tokens,
        "converted": f_float * args.float_tokens + f_tri * args.tri_tokens,
        "converted+kd": f_float * args.float_tokens + f_tri * args.tri_tokens + f_float / 3 * args.tri_tokens,
        "scratch-long": f_tri * (args.float_tokens + args.tri_tokens),
    }
    tokens = {"floatlm": args.float_tokens, "scratch": args.tri_tokens, "converted": args.tri_tokens,
              "converted+kd": args.tri_tokens, "scratch-long": args.float_tokens + args.tri_tokens}
    table = []
    print(f"\n{args.size}, seeds {seeds}, {len(per_seq['floatlm'][0])} held-out sequences of 256 tokens, "
          f"{time.time() - t0:.0f} s\n")
    print("| arm | TriLM tokens | held-out loss (mean ± 95% t over seeds) | compute (FLOPs) | tokens/s |")
    print("|---|---|---|---|---|")
    for arm in rows:
        m, h = t_interval([x.mean() for x in per_seq[arm]])
        tps = np.mean([x["result"]["tokens_per_s"] for x in rows[arm]])
        tri_tokens = "—" if arm == "floatlm" else f"{tokens[arm]:.0e}"
        print(f"| {arm} | {tri_tokens} | {m:.4f} ± {h:.4f} | {flops[arm]:.2e} | {tps:.0f} |")
        table.append({"arm": arm, "loss": m, "t95": h, "flops": flops[arm], "tokens_per_s": tps,
                      "seed_losses": [float(x.mean()) for x in per_seq[arm]]})
    verdicts = {}
    print()
    for arm in [a for a in ("converted", "converted+kd") if a in rows]:
        for base in [b for b in ("scratch", "scratch-long") if b in rows]:
            diff_seq = np.mean([c - s for c, s in zip(per_seq[arm], per_seq[base], strict=True)], axis=0)
            pm, ph = t_interval(diff_seq)
            sm, sh = t_interval([(c - s).mean() for c, s in zip(per_seq[arm], per_seq[base], strict=True)])
            below = pm + ph < 0 and sm + sh < 0
            above = pm - ph > 0 and sm - sh > 0
            verdict = "holds" if below else "does not hold" if above else "not resolved"
            print(f"{arm} − {base}: paired per sequence {pm:+.4f} ± {ph:.4f}, over seeds {sm:+.4f} ± {sh:.4f} "
                  f"-> lower loss than {base}: {verdict}")
            verdicts[f"{arm} - {base}"] = {"paired": [pm, ph], "seeds": [sm, sh], "verdict": verdict}
    kd, conv = rows.get("converted+kd"), rows.get("converted")
    if kd and conv:
        slow = np.mean([c["result"]["tokens_per_s"] / k["result"]["tokens_per_s"] for c, k in zip(conv, kd,
                                                                                                 strict=True)])
        mb, v = common["micro_batch"], fl_cfg.vocab_size
        extra = sum(p.numel() for p in load(rows["floatlm"][0]["dir"] / "final").parameters()) * 4
        kept = mb * 256 * v * 2  # the KD gradient kept for the backward pass (bf16)
        transient = mb * 256 * v * 4 * 5  # teacher logits, both log-softmaxes, p_t, gradient: float32, in the loss
        print(f"\ndistillation: {slow:.2f}x the step time of plain conversion (tokens/s ratio, this run); extra "
              f"memory: teacher weights {extra / 2**20:.1f} MiB (fp32), {kept / 2**20:.1f} MiB kept per micro-batch "
              f"for the backward, up to {transient / 2**20:.0f} MiB of float32 temporaries inside the KD loss")
    (out / "result.json").write_text(json.dumps({"table": table, "verdicts": verdicts, "seeds": seeds,
                                                 "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
