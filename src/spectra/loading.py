"""`spectra.load`: the one dispatcher that opens every model spectra knows, at the top of the import graph.

    spectra directory, kind "model"     latent FloatLM / TriLM              spectra.checkpoint.load_model_dir
    spectra directory, kind "packed"    TQ2_0 / TQ1_0 packed TriLM          spectra.packed.io.load_packed
    spectra directory, kind "quantlm"   GPTQ QuantLM                        spectra.ptq.formats.load_quantlm
    spectra directory, kind "checkpoint" a run's FSDP / tensor-parallel     spectra.train.state.load_checkpoint_model
                                        checkpoint (shards in dcp/)
    Hugging Face Llama directory        FloatLM or unpacked TriLM           spectra.interop.hf.load_hf
      ... with a quantization_config    GPTQ QuantLM                        spectra.ptq.formats.load_quantlm
    a training run directory            its final model (`final/`)          any of the above
    a size name (trilm-99m)             a freshly initialised model         spectra.model.build_model

Each reader is imported here explicitly; none of them imports this module. A directory whose weights exist only as
pickles is refused (spectra never unpickles). Every format failure is a `spectra.files.FormatError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from spectra.checkpoint import load_model_dir
from spectra.config import from_name
from spectra.files import META_FILE, FormatError, read_json, read_meta, refuse_pickle
from spectra.interop.hf import load_hf
from spectra.model import build_model, freeze_for_inference
from spectra.packed.io import load_packed
from spectra.ptq.formats import is_gptq_dir, load_quantlm


def load_checkpoint_dir(path: str | os.PathLike, **kwargs) -> nn.Module:
    """A training run's distributed checkpoint (kind "checkpoint", `spectra.train.state.load_checkpoint_model`)."""
    from spectra.train.state import load_checkpoint_model

    return load_checkpoint_model(path, **kwargs)


KIND_LOADERS = {"model": load_model_dir, "packed": load_packed, "quantlm": load_quantlm,
                "checkpoint": load_checkpoint_dir}
RUN_MODEL_DIR = "final"  # where `spectra train` writes a run's final model


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory behind `path`: itself, or for a training run directory its final model."""
    path = Path(path)
    if not (path / META_FILE).exists() and not (path / "config.json").exists() and (path / "run.json").exists():
        final = path / RUN_MODEL_DIR
        if not (final / META_FILE).exists():
            raise FormatError(f"{path} is a training run without a final model ({final} is missing); finish or "
                              "resume the run, or load one of its checkpoints directly")
        return final
    return path


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer.json stored with a model or run directory, if any."""
    from spectra.files import find_tokenizer as in_dir

    return in_dir(model_dir(path)) if Path(path).is_dir() else None


def model_tokenizer(model_path: str | os.PathLike | None, tokenizer: str | os.PathLike | None):
    """The tokenizer given explicitly, else the tokenizer.json stored with the model (or run) directory."""
    from spectra.data import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    found = find_tokenizer(model_path) if model_path is not None else None
    if found is not None:
        return load_tokenizer(found)
    raise FileNotFoundError(
        f"no tokenizer.json in {model_path}; pass one with --tokenizer PATH (e.g. the training run's tokenizer.json)"
    )


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError that says what is accepted (torch's own error names no option)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; accepted: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":  # torch's own error comes deep inside a load, as a traceback
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__}); "
                             "accepted: cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available on this machine; accepted: cpu")
    return dev


def looks_like_path(name: str) -> bool:
    """Whether a model argument that does not exist was meant as a path (it has a separator or starts with "."),
    not a size name."""
    return os.sep in name or name.startswith(".")


def missing_model(name: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"{name} does not exist (expected a model directory or a size name like trilm-99m)")


def not_a_model_dir(path: str | os.PathLike) -> FormatError:
    return FormatError(f"{path} is a file; a model is a directory with {META_FILE} or a Hugging Face config.json")


def load(
    path_or_name: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> nn.Module:
    """Open any model spectra knows (see the module docstring). Returns it frozen for inference
    (`spectra.model.freeze_for_inference`): eval mode, its quantized weights computed once; `model.train()` undoes it.
    """
    check_device(device)
    path = Path(path_or_name)
    if not path.exists():
        name = str(path_or_name)
        if os.sep not in name and "-" in name:
            return freeze_for_inference(build_model(from_name(name), seed=seed, device=device, dtype=dtype))
        raise missing_model(path)
    if not path.is_dir():
        raise not_a_model_dir(path)
    path = model_dir(path)
    if (path / META_FILE).exists():
        kind = read_meta(path).get("kind")
        if not isinstance(kind, str) or kind not in KIND_LOADERS:
            raise FormatError(f"{path / META_FILE}: unknown kind {kind!r}; accepted: {sorted(KIND_LOADERS)}")
        model = KIND_LOADERS[kind](path, device=device, dtype=dtype)
    elif (path / "config.json").exists():
        refuse_pickle(path)
        hf = read_json(path / "config.json", "a Hugging Face config")
        if is_gptq_dir(path, hf):
            model = load_quantlm(path, device=device, dtype=dtype)
        else:
            model = load_hf(path, device=device, dtype=dtype)
    else:
        refuse_pickle(path)
        raise FormatError(f"{path} is neither a spectra model directory ({META_FILE}) nor a Hugging Face one "
                          "(config.json)")
    return freeze_for_inference(model)
