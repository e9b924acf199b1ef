"""`spectra train`: a TOML run file and/or options -> `spectra.train.train`.

Every ModelConfig field is an option `--model.FIELD`, every TrainConfig field `--train.FIELD` (the most used ones
also without the prefix: `--data`, `--tokens`, ...). Precedence: run file, then options.

    spectra train --size trilm-99m --data builtin --tokens 2e9
    spectra train --config run.toml --train.lr=1e-3 --model.norm=layernorm --out runs/x --resume
    spectra train --out runs/x --resume                  # the run's own config (run.json)
    spectra train --init runs/floatlm/final --model.family=trilm --quant_warmup_tokens=2e5 --teacher runs/floatlm
    torchrun --nproc_per_node 2 -m spectra train --config run.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

SHORT = ("data", "tokenizer", "tokens", "batch_tokens", "seq_len", "micro_batch", "lr", "precision", "compile",
         "seed", "device", "init", "teacher", "quant_warmup_tokens", "kd_weight", "kd_temperature")


def register(sub: argparse._SubParsersAction) -> None:
    from spectra.config import ModelConfig
    from spectra.train.config import TrainConfig

    p = sub.add_parser("train", help="pretrain a FloatLM or TriLM (paper recipes, resumable, torchrun-ready)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="TOML", help="run file with [model] and [train] tables")
    p.add_argument("--size", "--model.size", dest="size",
                   help="named model size, e.g. trilm-99m, floatlm-tiny (same as --model.size)")
    p.add_argument("--out", help="run directory (default runs/<size>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        names = " ".join(f.name for f in dataclasses.fields(cls))
        g = p.add_argument_group(f"{section} fields ({cls.__name__})", f"--{section}.FIELD=VALUE for FIELD in: {names}")
        for f in dataclasses.fields(cls):
            flags = [f"--{section}.{f.name}"]
            if section == "train" and f.name in SHORT:
                flags.append(f"--{f.name}")
            g.add_argument(*flags, dest=f"{section}__{f.name}", metavar=str(f.type).replace(" ", ""),
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS if f.name not in SHORT else None)
    p.set_defaults(func=run)


def configs_from_args(args: argparse.Namespace):
    """(ModelConfig, TrainConfig) from the run file and the options."""
    from spectra.train.config import apply_overrides, build_configs, load_run_file

    model, train_raw = load_run_file(args.config)
    if getattr(args, "train__init", None) is not None and args.resume:
        raise ValueError("--init starts a new run from a checkpoint and --resume continues an existing run; they "
                         "cannot be combined (to continue a run that started from --init, pass --out RUN --resume)")
    if args.resume and not args.config and not args.size and args.out and not model:
        run_file = Path(args.out) / "run.json"
        if not run_file.exists():
            raise FileNotFoundError(f"{args.out} holds no run.json to resume (a run directory that `spectra train "
                                    "--out` wrote); to start a new run there, pass --size or --config")
        from spectra.files import read_json

        run = read_json(run_file, "a training run's configuration")
        if not isinstance(run, dict) or not isinstance(run.get("model"), dict) or not isinstance(run.get("train"),
                                                                                                 dict):
            raise ValueError(f"{run_file}: not a run configuration (needs 'model' and 'train' objects)")
        model, train_raw = dict(run["model"]), dict(run["train"])
    overrides = []
    if args.size:
        overrides.append(f"--model.size={args.size}")
    for key, value in vars(args).items():
        if "__" in key:
            section, name = key.split("__", 1)
            overrides.append(f"--{section}.{name}={value}")
    apply_overrides(model, train_raw, overrides)
    return build_configs(model, train_raw)


def run(args: argparse.Namespace) -> int:
    import logging

    from spectra.train.trainer import TrainingDiverged, train

    handler = logging.StreamHandler(sys.stderr)  # the memory plan and resume notes, before training starts
    handler.setFormatter(logging.Formatter("spectra train: %(message)s"))
    logger = logging.getLogger("spectra.train")
    # its own prefix, once: the root handler `spectra` sets up printed every line a second time
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        model_cfg, train_cfg = configs_from_args(args)
        name = model_cfg.name if hasattr(model_cfg, "name") else (train_cfg.init and Path(train_cfg.init).name)
        out = args.out or f"runs/{name or 'custom'}"
        try:
            result = train(model_cfg, train_cfg, out_dir=out, resume=args.resume, progress=not args.no_progress)
        except TrainingDiverged as e:
            print(f"spectra train: error: {e}", file=sys.stderr)
            return 1
    finally:  # (in-process callers, tests among them, would stack a handler per call)
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    print(json.dumps(result, indent=2))
    return 0
