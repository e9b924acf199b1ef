"""Per-layer statistics of a run's intermediate checkpoints, over tokens (Spectra §3.5, App. F "learning dynamics").

Input: a training run directory (`spectra.train`):

    RUN_DIR/metrics.jsonl             {"step", "tokens", "loss", "lr", "wd", ...} per logged step and
                                      {"split": "val", "step", "tokens", "val_loss"} per validation
    RUN_DIR/checkpoints/step_%08d/    spectra model dirs whose spectra.json carries "step" and "tokens"
    RUN_DIR/final/                    used too when its step is newer than the last checkpoint

For every block linear layer (q/k/v/o/gate/up/down of every layer) with latent weight W_t at checkpoint t, quantized
by the layer's own quantizer into codes Ŵ_t and per-shard scales:

    frac_neg, frac_zero, frac_pos   fraction of weights with Ŵ < 0, = 0, > 0 (the ternary states −1/0/+1; for
                                    uniform-k codes the sign of the code, for bilm frac_zero is 0)
    scale                           the layer's scale γ (mean over its model-parallel shards)
    latent_norm                     ‖W_t‖_F
    flip_rate                       fraction of weights whose code changed since the previous checkpoint, Ŵ_t ≠ Ŵ_{t−1}
    max_update                      the largest element-wise update max_ij |W_t − W_{t−1}| (the paper's checkpoint
                                    delta, which tracks the learning-rate schedule)
    update_norm                     ‖W_t − W_{t−1}‖_F

The first five have one value per checkpoint, the last three one per pair of consecutive checkpoints (aligned with the
later one: `checkpoints.delta_tokens`). `model` holds the same series over all block layers together (fractions and
flip rate weighted by size, γ averaged over layers, norms combined as √Σ‖·‖², max_update the maximum). FloatLM runs get
the latent series only. Checkpoints must share one model config.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.checkpoint import load_state_checked
from spectra.config import ModelConfig
from spectra.files import META_FILE, WEIGHTS_FILE, load_safetensors, read_meta, write_json
from spectra.layers import TernaryLinear
from spectra.ternary import SHARD_DIM
from spectra.train.state import is_distributed_checkpoint, load_sharded_model

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
STATE_SERIES = ("frac_neg", "frac_zero", "frac_pos", "scale")
LATENT_SERIES = ("latent_norm",)
DELTA_SERIES = ("max_update", "update_norm")
FLIP_SERIES = ("flip_rate",)
TRAIN_KEYS = ("step", "tokens", "loss", "lr", "wd", "grad_norm")
VAL_KEYS = ("step", "tokens", "val_loss")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(step, tokens, path) of every finished checkpoint of a run (and of `final/` if newer), oldest first."""
    run = Path(run_dir)
    found: dict[int, tuple[int, int, Path]] = {}
    root = run / CKPT_DIR
    candidates = sorted(p for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []
    if (run / FINAL_DIR / META_FILE).exists():
        candidates.append(run / FINAL_DIR)
    for path in candidates:  # interrupted writes live in hidden temporary folders and are skipped by the prefix
        if not (path / META_FILE).exists() or not ((path / WEIGHTS_FILE).exists() or is_distributed_checkpoint(path)):
            continue
        meta = read_meta(path)
        if meta.get("kind") not in ("model", "checkpoint") or not isinstance(meta.get("step"), int):
            if path.name != FINAL_DIR:
                raise ValueError(f"{path / META_FILE}: a run checkpoint needs kind 'model' (or 'checkpoint', sharded) "
                                 "and an integer 'step'")
            continue
        step = meta["step"]
        tokens = meta.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int | float) or not math.isfinite(tokens):
            raise ValueError(f"{path / META_FILE}: field 'tokens' must be a number, got {tokens!r}")
        found.setdefault(step, (step, int(tokens), path))
    return [found[s] for s in sorted(found)]


def read_metrics(run_dir: str | os.PathLike) -> dict[str, dict[str, list]]:
    """metrics.jsonl as columns: {"train": {step, tokens, loss, lr, wd, grad_norm}, "val": {step, tokens, val_loss}}.
    Missing values are None; a line cut short by a killed run is skipped."""
    path = Path(run_dir) / METRICS_FILE
    train: dict[str, list] = {k: [] for k in TRAIN_KEYS}
    val: dict[str, list] = {k: [] for k in VAL_KEYS}
    if not path.exists():
        log.warning("%s not found: no loss or learning-rate curves", path)
        return {"train": train, "val": val}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON; skipped", path, n)
            continue
        if not isinstance(row, dict):
            log.warning("%s:%d is not a metrics record (a JSON object); skipped", path, n)
            continue
        columns = val if row.get("split") == "val" else train if row.get("split", "train") == "train" else None
        if columns is not None:
            for k in columns:
                columns[k].append(row.get(k))
    return {"train": train, "val": val}


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The block linear layers (q/k/v/o/gate/up/down), by module name, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in SHARD_DIM and isinstance(m, nn.Linear)
    }


def _empty_series(quantized: bool) -> dict[str, list]:
    names = LATENT_SERIES + DELTA_SERIES + ((STATE_SERIES + FLIP_SERIES) if quantized else ())
    return {k: [] for k in names}


def collect(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Every series of the run (see the module docstring) as plain lists, ready for JSON."""
    from tqdm.auto import tqdm

    from spectra.model import Transformer

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a run directory")
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(f"{run / CKPT_DIR} holds no checkpoints (step_%08d folders with {META_FILE})")
    first = read_meta(checkpoints[0][2])
    cfg = ModelConfig.from_meta(first, checkpoints[0][2] / META_FILE)
    config_dict = first["config"]
    with torch.device("cpu"):
        model = Transformer(cfg).eval()
    layers = block_linears(model)
    quantized = cfg.family != "floatlm"
    per_layer = {name: _empty_series(quantized) for name in layers}
    total = _empty_series(quantized)
    previous: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for step, _, path in tqdm(checkpoints, desc="analyze", unit="ckpt", leave=False):
        meta = read_meta(path)
        if meta.get("config") != config_dict:
            raise ValueError(
                f"{path / META_FILE}: model config differs from {checkpoints[0][2]}; one run has one config"
            )
        if (path / WEIGHTS_FILE).exists():
            load_state_checked(model, load_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
        else:  # a sharded (FSDP / tensor-parallel) checkpoint: its model state, gathered into this one process
            load_sharded_model(path, model)
        sums: dict[str, float] = dict(n=0, neg=0, zero=0, pos=0, flips=0, sq=0, dsq=0, dmax=0.0, scale=0)
        current = {}
        with torch.no_grad():
            for name, layer in layers.items():
                W = layer.weight.detach().float()
                series = per_layer[name]
                sq = float(W.pow(2).sum())
                series["latent_norm"].append(math.sqrt(sq))
                sums["sq"] += sq
                sums["n"] += W.numel()
                codes = None
                if isinstance(layer, TernaryLinear):
                    codes, scales = layer.codes_and_scales()
                    counts = [int((codes < 0).sum()), int((codes == 0).sum()), int((codes > 0).sum())]
                    for key, c in zip(("neg", "zero", "pos"), counts, strict=True):
                        series[f"frac_{key}"].append(c / W.numel())
                        sums[key] += c
                    gamma = float(scales.float().mean())
                    series["scale"].append(gamma)
                    sums["scale"] += gamma
                if name in previous:
                    W_prev, codes_prev = previous[name]
                    delta = W - W_prev
                    dsq, dmax = float(delta.pow(2).sum()), float(delta.abs().max())
                    series["update_norm"].append(math.sqrt(dsq))
                    series["max_update"].append(dmax)
                    sums["dsq"] += dsq
                    sums["dmax"] = max(sums["dmax"], dmax)
                    if codes is not None:
                        flips = int((codes != codes_prev).sum())
                        series["flip_rate"].append(flips / W.numel())
                        sums["flips"] += flips
                current[name] = (W.clone(), None if codes is None else codes.clone())
        n = sums["n"]
        total["latent_norm"].append(math.sqrt(sums["sq"]))
        if quantized:
            for key in ("neg", "zero", "pos"):
                total[f"frac_{key}"].append(sums[key] / n)
            total["scale"].append(sums["scale"] / len(layers))
        if previous:
            total["update_norm"].append(math.sqrt(sums["dsq"]))
            total["max_update"].append(sums["dmax"])
            if quantized:
                total["flip_rate"].append(sums["flips"] / n)
        previous = current
        log.debug("analyzed checkpoint step %d (%s)", step, path)
    steps = [s for s, _, _ in checkpoints]
    tokens = [t for _, t, _ in checkpoints]
    quantizer = None
    if quantized:
        q = next(m for m in layers.values() if isinstance(m, TernaryLinear)).quantizer
        quantizer = {"name": cfg.quantizer, "options": cfg.quantizer_options, "bits": q.bits}
    return {
        "run_dir": str(run),
        "family": cfg.family,
        "quantizer": quantizer,
        "checkpoints": {
            "step": steps,
            "tokens": tokens,
            "path": [str(p) for _, _, p in checkpoints],
            "delta_step": steps[1:],
            "delta_tokens": tokens[1:],
        },
        "model": total,
        "layers": per_layer,
        "metrics": read_metrics(run),
    }


def analyze(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, plots: bool = True) -> dict:
    """`collect` the series, write them to OUT/analysis.json and plot them to OUT/*.png (OUT defaults to
    RUN_DIR/analysis). Returns the series with `files`, the paths written."""
    series = collect(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if plots:
        from spectra.analysis.plots import plot_all

        files = [str(p) for p in plot_all(series, out)]
    result = {**series, "files": [str(out / "analysis.json"), *files]}
    write_json(out / "analysis.json", result)
    return result
