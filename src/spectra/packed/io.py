"""Packed TriLM checkpoints: write (`pack_model`, CLI `spectra pack`) and read (`load_packed`, via `spectra.load`).

A packed checkpoint is a spectra model directory:

    spectra.json        {"format": "spectra", "kind": "packed", "config": {...},
                         "packed": {"version": 1, "format": "tq2_0" | "tq1_0", "block_size": 256,
                                    "block_bytes": 66 | 54, "layers": {"layers.0.self_attn.q_proj": [out, in], ...}}}
    model.safetensors   for each packed layer `NAME.tq2_0` (or `NAME.tq1_0`): uint8 [out, in/256 · block_bytes], the
                        llama.cpp blocks byte for byte (codes then fp16 d), so GGUF export copies them unchanged;
                        every other tensor (embed_tokens, norms, lm_head) as in a latent checkpoint. The safetensors
                        header metadata carries {"spectra.packed": format} as a second check.
    tokenizer.json      when the source model has one

Loading validates the meta, the byte count of every layer, each TQ2_0 code (no 3s), each TQ1_0 byte (a valid base-3
encoding) and each scale (finite), so a corrupt file is an error, never a silently wrong model.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spectra.config import ModelConfig
from spectra.files import (
    META_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    FormatError,
    atomic_dir,
    read_meta,
    safetensors_header,
    write_json,
)
from spectra.layers import TernaryLinear, rope_cache
from spectra.model import Transformer
from spectra.packed import formats
from spectra.packed.linear import PackedTernaryLinear, as_packed, is_trilm

log = logging.getLogger(__name__)

PACKED_VERSION = 1
MAGIC_KEY = "spectra.packed"


def _packed_layers(model: nn.Module, fmt: str, lossy: bool) -> tuple[dict[str, np.ndarray], dict[str, list[int]], set]:
    """(llama.cpp bytes per layer, [out, in] per layer, state-dict keys they replace), without changing `model`."""
    trilm = is_trilm(model)
    raw, shapes, replaced = {}, {}, set()
    for name, module in model.named_modules():
        packed = as_packed(module, name, trilm=trilm, format=fmt, path="torch", lossy=lossy)
        if packed is None:
            continue
        raw[name] = packed.to_bytes(fmt)
        shapes[name] = [packed.out_features, packed.in_features]
        replaced |= {f"{name}.{k}" for k in module.state_dict()}
    return raw, shapes, replaced


def pack_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    format: str = "tq2",
    lossy: bool = False,
    tokenizer: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write a packed checkpoint of a TriLM (anything `spectra.load` returns). Returns a summary dict.

    The model is not modified. `lossy=True` allows blocks that straddle two shards with different scales (rounded to
    the block absmax like llama.cpp); without it such a layer is a ValueError, as is any non-ternary block matrix.
    """
    fmt = formats.canonical_format(format)
    model = getattr(model, "_orig_mod", model)
    cfg: ModelConfig | None = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("pack_model needs a spectra Transformer (with .config); got " + type(model).__name__)
    raw, shapes, replaced = _packed_layers(model, fmt, lossy)
    if not raw:
        raise ValueError(
            f"model {cfg.name or ''} (family {cfg.family!r}) has no ternary layers to pack; only TriLMs pack"
        )
    other = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in replaced}
    tensors = {**other, **{f"{name}.{fmt}": torch.from_numpy(np.ascontiguousarray(b)) for name, b in raw.items()}}
    meta = {
        "format": "spectra",
        "kind": "packed",
        "config": cfg.to_dict(),
        "packed": {
            "version": PACKED_VERSION,
            "format": fmt,
            "block_size": formats.QK,
            "block_bytes": formats.BLOCK_BYTES[fmt],
            "layers": shapes,
        },
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", MAGIC_KEY: fmt})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        write_json(tmp / META_FILE, meta)
    packed_bytes = sum(int(a.nbytes) for a in raw.values())
    ternary_params = sum(n * k for n, k in shapes.values())
    summary = {
        "path": str(out_dir),
        "format": fmt,
        "layers": len(raw),
        "ternary_params": ternary_params,
        "packed_bytes": packed_bytes,
        "bits_per_ternary_weight": 8 * packed_bytes / ternary_params,
        "other_params": sum(v.numel() for v in other.values()),
        "other_bytes": sum(v.numel() * v.element_size() for v in other.values()),
        "file_bytes": (Path(out_dir) / WEIGHTS_FILE).stat().st_size,
    }
    log.info(
        "packed %d layers (%s, %.4f bits/weight) into %s", len(raw), fmt, summary["bits_per_ternary_weight"], out_dir
    )
    return summary


def _packed_meta(path: Path) -> tuple[ModelConfig, str, dict[str, tuple[int, int]]]:
    meta = read_meta(path)
    where = path / META_FILE
    if meta.get("kind") != "packed":
        raise FormatError(f"{where}: kind is {meta.get('kind')!r}, expected 'packed'")
    packed = meta.get("packed")
    if not isinstance(packed, dict):
        raise FormatError(f"{where}: field 'packed' is missing or not an object")
    if packed.get("version") != PACKED_VERSION:
        raise FormatError(f"{where}: packed.version is {packed.get('version')!r}; this spectra reads {PACKED_VERSION}")
    fmt = packed.get("format")
    if fmt not in formats.BLOCK_BYTES:
        raise FormatError(f"{where}: packed.format is {fmt!r}; accepted: {sorted(formats.BLOCK_BYTES)}")
    if packed.get("block_size") != formats.QK or packed.get("block_bytes") != formats.BLOCK_BYTES[fmt]:
        raise FormatError(
            f"{where}: packed.block_size/block_bytes are {packed.get('block_size')}/{packed.get('block_bytes')}, "
            f"{fmt} has {formats.QK}/{formats.BLOCK_BYTES[fmt]}"
        )
    layers = packed.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FormatError(f"{where}: packed.layers must map layer names to [out, in]")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: field 'config' is not a valid model config: {e}") from e
    shapes = {}
    for name, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise FormatError(f"{where}: packed.layers[{name!r}] = {shape!r} is not [out, in]")
        shapes[name] = (shape[0], shape[1])
    return cfg, fmt, shapes


def load_packed(
    path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, kernel: str = "auto"
) -> nn.Module:
    """Open a packed checkpoint as a Transformer whose block linears are PackedTernaryLinear (CPU, inference only).

    `dtype` applies to the float parts (embeddings, norms, lm_head); packed layers compute in int8/float32 and return
    the input's dtype. `kernel` picks the kernel path ('auto', 'avx512vnni', 'avx2', 'scalar', 'torch').
    """
    path = Path(path)
    if torch.device(device).type != "cpu":
        raise ValueError(f"packed models run on CPU only (spectra's kernels are CPU kernels); got device={device!r}")
    cfg, fmt, shapes = _packed_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise FormatError(f"{weights} is missing: a packed checkpoint needs {WEIGHTS_FILE}")
    safetensors_header(weights)
    with safe_open(str(weights), framework="pt") as f:
        magic = (f.metadata() or {}).get(MAGIC_KEY)
        if magic != fmt:
            raise FormatError(
                f"{weights}: header metadata {MAGIC_KEY}={magic!r} does not match {META_FILE} format {fmt!r}"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    with torch.device("meta"):
        model = Transformer(cfg)
    modules = dict(model.named_modules())
    for name, (out_f, in_f) in shapes.items():
        target = modules.get(name)
        if not isinstance(target, TernaryLinear) or (target.out_features, target.in_features) != (out_f, in_f):
            raise FormatError(
                f"{path / META_FILE}: packed layer {name!r} {[out_f, in_f]} is not a ternary layer of the config"
            )
        key = f"{name}.{fmt}"
        if key not in state:
            raise FormatError(f"{weights}: tensor {key!r} is missing")
        try:
            layer = PackedTernaryLinear.from_bytes(state.pop(key), (out_f, in_f), fmt, path=kernel)
        except ValueError as e:
            raise FormatError(f"{weights}: {key}: {e}") from None
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, layer)
    own = model.state_dict()
    expected = {k for k in own if not any(k.startswith(f"{n}.") for n in shapes)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FormatError(f"{weights}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise FormatError(
                f"{weights}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    model.requires_grad_(False)
    return model.eval()
