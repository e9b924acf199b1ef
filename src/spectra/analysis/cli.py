"""`spectra analyze RUN_DIR`: training dynamics of a run's checkpoints as JSON and PNG plots."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-layer ternary states, flips, scales, latent norms and updates over a run's checkpoints",
    )
    p.add_argument("run_dir", help="a training run directory (with checkpoints/step_*/ and metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from spectra.analysis import analyze

    result = analyze(args.run_dir, args.out, plots=not args.no_plots)
    ckpt, model = result["checkpoints"], result["model"]
    print(
        f"{len(ckpt['step'])} checkpoints, steps {ckpt['step'][0]}..{ckpt['step'][-1]}, {len(result['layers'])} layers"
    )
    if "frac_zero" in model:
        print(f"zero fraction {model['frac_zero'][0]:.3f} -> {model['frac_zero'][-1]:.3f}")
    for path in result["files"]:
        print(f"wrote {path}")
    return 0
