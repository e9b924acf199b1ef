"""Self-describing model directories, atomic writes, and `spectra.load` for every kind of model we handle.

A spectra model directory holds `model.safetensors` (weights, Hugging Face module names without the `model.` prefix),
`spectra.json` (`{"format": "spectra", "kind": ..., "config": {...}, ...}`) and, when the model has one,
`tokenizer.json`. `kind` says which loader reads it:

    model    latent FloatLM / TriLM (this module)
    packed   TQ2_0 / TQ1_0 packed TriLM (spectra.packed.io)
    quantlm  GPTQ-quantized FloatLM (spectra.ptq.formats)

`load` also reads Hugging Face Llama directories (spectra.interop.hf), including GPTQ checkpoints, and named sizes
(`trilm-tiny`) as freshly initialised models. Every write goes to a temporary name in the same folder and is renamed
into place, so an interrupted write never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spectra.config import ModelConfig, from_name

META_FILE = "spectra.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

KIND_LOADERS = {
    "model": "spectra.checkpoint:load_model_dir",
    "packed": "spectra.packed.io:load_packed",
    "quantlm": "spectra.ptq.formats:load_quantlm",
}


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path` for writing; it is flushed, fsynced and renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != "spectra":
        raise ValueError(f"{meta_path} has format={meta.get('format')!r}, expected 'spectra'")
    return meta


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
        save_file(model_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        write_json(tmp / META_FILE, {"format": "spectra", "kind": "model", "config": config.to_dict(), **(meta or {})})
    return Path(out_dir)


def load_model_dir(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    from spectra.model import empty_model

    path = Path(path)
    meta = read_meta(path)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / META_FILE}: field 'config' is not a valid model config: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing: a spectra model directory needs {WEIGHTS_FILE}")
    state = load_file(str(weights), device=str(device))
    model = empty_model(cfg, device)
    load_state_checked(model, state, str(weights))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with errors that name the tensor and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(state)


def _resolve(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def load(
    path_or_name: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> nn.Module:
    """Open any model spectra knows: a spectra directory (latent, packed or QuantLM), a Hugging Face Llama directory
    (FloatLM, unpacked TriLM, GPTQ QuantLM), or a named size (random init with `seed`). Returns the model in eval mode.
    """
    path = Path(path_or_name)
    if not path.exists():
        name = str(path_or_name)
        if os.sep not in name and "-" in name:
            from spectra.model import build_model

            return build_model(from_name(name), seed=seed, device=device, dtype=dtype).eval()
        raise FileNotFoundError(f"{path} does not exist (expected a model directory or a size name like trilm-99m)")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a model is a directory with {META_FILE} or a Hugging Face config.json")
    if (path / META_FILE).exists():
        kind = read_meta(path).get("kind")
        if kind not in KIND_LOADERS:
            raise ValueError(f"{path / META_FILE}: unknown kind {kind!r}; accepted: {sorted(KIND_LOADERS)}")
        return _resolve(KIND_LOADERS[kind])(path, device=device, dtype=dtype)
    if (path / "config.json").exists():
        from spectra.interop.hf import load_hf

        return load_hf(path, device=device, dtype=dtype)
    raise ValueError(f"{path} is neither a spectra model directory ({META_FILE}) nor a Hugging Face one (config.json)")


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer.json stored with a model directory, if any."""
    p = Path(path) / TOKENIZER_FILE
    return p if p.exists() else None
