"""Run directories and resumable checkpoints.

    RUN_DIR/run.json                    {"model": ModelConfig, "train": TrainConfig (resolved), "tokenizer_sha256"}
    RUN_DIR/metrics.jsonl               one JSON object per logged step, plus {"split": "val", ...} lines
    RUN_DIR/checkpoints/step_%08d/      a spectra model dir (model.safetensors, tokenizer.json, spectra.json with
                                        "step", "tokens", "data_position", "milestone", "train") + trainer_state.pt
                                        (optimizer, loss scaler, RNG states, skipped-step counters)
    RUN_DIR/final/                      the final model dir

Each checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk leaves the previous
checkpoints as they were. Retention keeps the newest `ckpt_keep` checkpoints plus every milestone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.checkpoint import save_model
from spectra.config import ModelConfig
from spectra.files import META_FILE, atomic_dir, load_safetensors, read_meta

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CKPT_DIR = "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    tokenizer: Path | None,
) -> Path:
    """Write checkpoint `step_<meta.step>` atomically. A failed write (e.g. ENOSPC) raises OSError naming the
    checkpoint and the previous one, which is left intact."""
    out = step_dir(run_dir, meta["step"])
    previous = list_checkpoints(run_dir)
    try:
        with atomic_dir(out) as tmp:
            save_model(model, tmp, tokenizer=tokenizer, meta=meta)
            torch.save(trainer_state, tmp / STATE_FILE)
    except OSError as e:
        keep = previous[-1].name if previous else "none"
        raise OSError(e.errno, f"writing checkpoint {out} failed: {e.strerror or e}; "
                               f"the previous checkpoint ({keep}) is intact") from e
    return out


def apply_retention(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` non-milestone checkpoints. Returns what was deleted."""
    rolling = [p for p in list_checkpoints(run_dir) if not read_meta(p).get("milestone")]
    doomed = rolling[:-keep] if keep > 0 else rolling
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_checkpoint(path: Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(model state, trainer state, meta) of a checkpoint; the model config must equal `model_cfg`."""
    meta = read_meta(path)
    saved = meta.get("config")
    now = model_cfg.to_dict()
    if saved != now:
        saved = saved or {}
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"cannot resume from {path}: its model config differs in {diff} "
                         f"(checkpoint {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]})")
    weights = load_safetensors(path / "model.safetensors")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return weights, state, meta


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    from spectra.files import atomic_file

    with atomic_file(path) as f:
        f.write("".join(x + "\n" for x in keep))


__all__ = ["META_FILE", "apply_retention", "list_checkpoints", "load_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state", "step_dir", "truncate_metrics"]
