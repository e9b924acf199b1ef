"""Latent model directories: `save_model` writes one, `load_model_dir` reads one (kind "model": a FloatLM or TriLM
with its latent weights).

A spectra model directory holds `model.safetensors` (weights, Hugging Face module names without the `model.` prefix),
`spectra.json` (`{"format": "spectra", "kind": ..., "config": {...}, ...}`) and, when the model has one,
`tokenizer.json`. The other kinds have their own readers (`spectra.packed.io`, `spectra.ptq.formats`,
`spectra.interop.hf`); `spectra.load` (`spectra.loading`) picks the reader. Writes are atomic (`spectra.files`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.config import ModelConfig
from spectra.files import (
    META_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    FormatError,
    atomic_dir,
    load_safetensors,
    read_meta,
    save_safetensors,
    write_json,
)
from spectra.model import empty_model
from spectra.quantizers import adopt_scale_offsets


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared tensors of the unwrapped model (DDP/compile wrappers removed)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a spectra model directory atomically. Returns its path."""
    config: ModelConfig = getattr(model, "_orig_mod", model).config
    with atomic_dir(out_dir) as tmp:
        save_safetensors(model_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        write_json(tmp / META_FILE, {"format": "spectra", "kind": "model", "config": config.to_dict(), **(meta or {})})
    return Path(out_dir)


def load_model_dir(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    path = Path(path)
    meta = read_meta(path)
    cfg = ModelConfig.from_meta(meta, path / META_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise FormatError(f"{weights} is missing: a spectra model directory needs {WEIGHTS_FILE}")
    state = load_safetensors(weights, device=str(device))
    model = empty_model(cfg, device)
    load_state_checked(model, state, str(weights))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with errors that name the tensor and both shapes."""
    adopt_scale_offsets(model, state)  # optional TriLM scale offsets (spectra.quantizers.TriLMQuantizer)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise FormatError(f"{source}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise FormatError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    model.load_state_dict(state)
