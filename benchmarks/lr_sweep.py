"""Learning-rate sweep for a suite preset: every size x family (or variant) at a few peak learning rates.

Each run trains the preset's own model config with the preset's [train] settings on its data and study tokenizer,
at a shortened budget (--tokens) so the sweep stays small, and reports the final validation loss. The table and the
command that made it go to a Markdown file (docs/lr-sweep-PRESET.md) so the preset's [lr] tables can cite them.

    OMP_NUM_THREADS=1 python benchmarks/lr_sweep.py --preset tiny --tokens 3e5 \\
        --lrs floatlm=1e-3,2e-3,4e-3,8e-3 --lrs trilm=2e-3,4e-3,8e-3,1.6e-2 --out docs/lr-sweep-tiny.md

A shorter budget than the preset's favours larger rates a little (less time to pay for the noise); the table gives
the loss at every rate so the choice can be read, not just the winner. TriLM's rate after the drop is 2/3 of its
peak (spec.LR2_RATIO). --train KEY=VALUE sweeps with a [train] setting other than the preset's (for example
--train batch_tokens=2048 --train micro_batch=8); --model KEY=VALUE trains another model shape or scheme (for example
--model init_scheme=scaled, or --model dim=512 --model n_layers=1). With --work, runs finished by an earlier sweep
are read back (their result.json) and a run killed part-way resumes, so a sweep can be widened with more rates or
split over processes and joined by one last call.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm


def _overrides(p: argparse.ArgumentParser, flag: str, items: list[str], cls: type, example: str) -> dict:
    """KEY=VALUE items naming fields of the dataclass `cls`; values read as JSON (numbers, true/false), else text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in cls.__dataclass_fields__:
            p.error(f"{flag} {item}: expected KEY=VALUE with KEY a {cls.__name__} field (e.g. {example})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from spectra.config import ModelConfig
    from spectra.suite.preflight import study_tokenizer
    from spectra.suite.spec import LR2_RATIO, load_spec
    from spectra.train import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokens", type=float, default=3e5, help="training tokens per sweep run")
    p.add_argument("--lrs", action="append", default=[], metavar="FAMILY=LR,LR,...", required=True)
    p.add_argument("--sizes", default=None, help="comma-separated subset of the preset's sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="Markdown file for the table (default: print only)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="a [train] setting other than the preset's, e.g. batch_tokens=2048 (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="a ModelConfig field other than the preset's, e.g. init_scheme=scaled (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.preset)
    grid = {}
    for item in args.lrs:
        fam, _, values = item.partition("=")
        if fam not in spec.families:
            p.error(f"--lrs {item}: {fam!r} is not a family of preset {args.preset} ({spec.families})")
        grid[fam] = [float(v) for v in values.split(",")]
    train_set = _overrides(p, "--train", args.train, TrainConfig, "batch_tokens=2048")
    model_set = _overrides(p, "--model", args.model, ModelConfig, "init_scheme=scaled")
    sizes = args.sizes.split(",") if args.sizes else spec.sizes
    work = Path(args.work or tempfile.mkdtemp(prefix="lr-sweep-"))
    tokenizer = study_tokenizer(spec, work)
    runs = [(size, fam, lr) for size in sizes for fam, lrs in grid.items() for lr in lrs]
    results = []
    for size, fam, lr in tqdm(runs, desc="lr sweep", unit="run"):
        cfg = spec.model_config(size, fam).replace(**model_set)
        over = spec.train_overrides(fam, size)
        over.update(train_set)
        over.update(lr=lr, tokens=args.tokens, data=spec.data, tokenizer=tokenizer, seed=args.seed)
        if spec.family_of(fam) == "trilm":
            over["lr2"] = lr * LR2_RATIO
        run_dir = work / f"{fam}-{size}-lr{lr:g}"
        done = run_dir / "result.json"
        if done.exists():  # finished in an earlier sweep with the same --work: its result and its training time
            res = json.loads(done.read_text())
        else:  # new, or killed part-way: resume from its last checkpoint (none: from scratch)
            t0 = time.perf_counter()
            res = train(cfg, TrainConfig.from_dict(over), out_dir=run_dir, resume=run_dir.exists(), progress=False)
            res["wall_time"] = time.perf_counter() - t0
        results.append((size, fam, lr, res["val_loss"], res["steps"], res["wall_time"]))
        tqdm.write(f"{fam}-{size} lr {lr:g}: val_loss {res['val_loss']:.4f} ({res['steps']} steps)")
    best = {}
    for size, fam, lr, loss, _, _ in results:
        if (size, fam) not in best or loss < best[(size, fam)][1]:
            best[(size, fam)] = (lr, loss)
    preset_train = spec.train_overrides(next(iter(grid)), sizes[0])
    lines = [f"# Learning-rate sweep: preset `{args.preset}`", "",
             "Command (run from the repository root):", "",
             "    OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv), "",
             f"{args.tokens:.3g} training tokens per run (the preset trains {spec.tokens_for(sizes[0]):.3g}), seed "
             f"{args.seed}, the preset's configs, data ({spec.data}) and study tokenizer ({spec.tokenizer})"
             + "".join(f", {k} = {v} (the preset: {preset_train.get(k, 'default')})" for k, v in train_set.items())
             + "".join(f", model {k} = {v}" for k, v in model_set.items())
             + ". Final "
             "validation loss (nats/token); **bold**: the best rate of each size and family.", "",
             "| size | family | " + " | ".join(f"lr {lr:g}" for lr in sorted({r[2] for r in results})) + " | best |",
             "|---|---|" + "---|" * (len({r[2] for r in results}) + 1)]
    all_lrs = sorted({r[2] for r in results})
    for size in sizes:
        for fam in grid:
            cells = []
            for lr in all_lrs:
                hit = [r for r in results if r[:3] == (size, fam, lr)]
                if not hit:
                    cells.append("")
                    continue
                text = f"{hit[0][3]:.4f}"
                cells.append(f"**{text}**" if best[(size, fam)][0] == lr else text)
            lines.append(f"| {size} | {fam} | " + " | ".join(cells) + f" | {best[(size, fam)][0]:g} |")
    lines += ["", "Seconds per run: " + ", ".join(f"{f}-{s}@{lr:g} {t:.0f}" for s, f, lr, _, _, t in results), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
