"""QuantLM checkpoints: the unpacked Hugging Face export and the standard GPTQ checkpoint, and loading them back.

Unpacked (like Spectra's released `QuantLM_*_Unpacked`): a plain LlamaForCausalLM directory whose block matrices
hold the dequantized weights Q in fp16 (`spectra.interop.hf.export_hf`).

GPTQ: a Llama directory that GPTQModel / transformers recognise, plus our `spectra.json` (kind "quantlm"):

    config.json              Llama config + "quantization_config" (also written alone as quantize_config.json)
    model.safetensors        model.layers.{i}.{self_attn,mlp}.{q,k,v,o,gate,up,down}_proj.{qweight,qzeros,scales,g_idx}
                             (spectra.ptq.qlinear), embeddings, norms and lm_head in fp16
    spectra.json             {"format": "spectra", "kind": "quantlm", "config": {...}, "quantization": {...}}
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json

`checkpoint_format` is "gptq" (v1: stores zero − 1) for symmetric 2/3/4/8 bits, "gptq_v2" for asymmetric ones and
"gptq_p" (GPTQModel's planar layout, true zeros) for 5/6/7 bits; `desc_act` is true when g_idx is act-order permuted.

`load_quantlm` opens both ours and GPTQ directories written by other tools (Llama architecture, int32 packing, no
quantized lm_head), and returns our Transformer with `QuantLinear` blocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.checkpoint import load_state_checked
from spectra.config import ModelConfig
from spectra.files import (
    META_FILE,
    SAFETENSORS_DTYPE_BYTES,
    FormatError,
    atomic_dir,
    read_json,
    read_meta,
    safetensors_header,
    save_safetensors,
    write_json,
)
from spectra.ptq.qlinear import FORMATS, QuantLinear, checkpoint_format_for
from spectra.ptq.sequential import PTQState

QUANT_CONFIG_FILE = "quantize_config.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _ptq_state(model: nn.Module) -> PTQState:
    state = getattr(model, "ptq", None)
    if not isinstance(state, PTQState) or not state.weights:
        raise ValueError("the model carries no quantization result: run spectra.ptq.quantize_model on it first")
    return state


def quantization_config(settings: dict[str, Any], checkpoint_format: str) -> dict[str, Any]:
    """The `quantization_config` of config.json, with the fields GPTQModel and transformers read."""
    from spectra._version import __version__

    desc_act = bool(settings["act_order"] and not settings["static_groups"] and settings["group_size"] != -1)
    return {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": settings["bits"],
        "group_size": settings["group_size"],
        "desc_act": desc_act,
        "sym": settings["sym"],
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": settings["percdamp"],
        "static_groups": settings["static_groups"],
        "meta": {
            "quantizer": [f"spectra:{__version__}"],
            "algorithm": settings["method"],
            "damp_percent": settings["percdamp"],
            "act_order": settings["act_order"],
            "static_groups": settings["static_groups"],
            "block_size": settings["block_size"],
            "true_sequential": True,
            "act_group_aware": False,
        },
    }


def to_quantlm(model: nn.Module, checkpoint_format: str | None = None) -> int:
    """Swap every quantized nn.Linear for a QuantLinear built from its codes. Returns how many were swapped."""
    state = _ptq_state(model)
    n = 0
    for name, qw in state.weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_quantized(qw, checkpoint_format))
        n += 1
    return n


def save_unpacked(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> Path:
    """A LlamaForCausalLM directory with the dequantized weights in fp16."""
    from spectra.interop.hf import export_hf

    _ptq_state(model)
    return export_hf(model, out_dir, dtype=torch.float16, tokenizer=tokenizer)


def save_gptq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the standard GPTQ checkpoint of a model quantized by `quantize_model` (the model is left unchanged)."""

    from spectra.interop.hf import hf_config, hf_state_dict, write_tokenizer_files

    state = _ptq_state(model)
    cfg: ModelConfig = model.config
    settings = state.settings
    fmt = checkpoint_format_for(settings["bits"], settings["sym"])
    qcfg = quantization_config(settings, fmt)
    config = hf_config(cfg, torch.float16)
    config["quantization_config"] = qcfg
    tensors = hf_state_dict(model, torch.float16)
    for name, qw in state.weights.items():
        del tensors[f"model.{name}.weight"]
        layer = QuantLinear.from_quantized(qw, fmt)
        for suffix in QUANT_SUFFIXES:
            t = getattr(layer, suffix)
            tensors[f"model.{name}.{suffix}"] = (t.half() if suffix == "scales" else t).cpu().contiguous()
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / QUANT_CONFIG_FILE, qcfg)
        write_json(tmp / "generation_config.json",
                   {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False})
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, cfg)
        write_json(tmp / META_FILE, {"format": "spectra", "kind": "quantlm", "config": cfg.to_dict(),
                                     "quantization": qcfg, **(meta or {})})
    return Path(out_dir)


def is_gptq_dir(path: Path, hf_config: Any) -> bool:
    """Whether a Hugging Face model directory is a GPTQ checkpoint: a `quantization_config` in its config.json
    (`hf_config`, as read) or, AutoGPTQ's older layout, a quantize_config.json beside it."""
    return bool(isinstance(hf_config, dict) and hf_config.get("quantization_config")) or (
        Path(path) / QUANT_CONFIG_FILE).exists()


def read_quant_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    qcfg = None
    if config_path.exists():
        qcfg = read_json(config_path, "a Hugging Face model config").get("quantization_config")
    if qcfg is None and (path / QUANT_CONFIG_FILE).exists():
        qcfg = read_json(path / QUANT_CONFIG_FILE, "a GPTQ quantize_config")
    if qcfg is None:
        raise ValueError(f"{path}: no quantization_config in config.json and no {QUANT_CONFIG_FILE}")
    where = f"{config_path}: quantization_config"
    if not isinstance(qcfg, dict):
        raise ValueError(f"{where} must be an object (GPTQ's settings: bits, group_size, ...), got {qcfg!r}")
    if qcfg.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{where}.quant_method={qcfg.get('quant_method')!r}; accepted: 'gptq'")
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if fmt not in FORMATS:
        raise ValueError(f"{where}.checkpoint_format={fmt!r}; accepted: {FORMATS}")
    if qcfg.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"{where}.pack_dtype={qcfg['pack_dtype']!r}; accepted: 'int32'")
    if qcfg.get("lm_head"):
        raise ValueError(f"{where}.lm_head=true: a quantized lm_head is not supported")
    bits, group_size = qcfg.get("bits"), qcfg.get("group_size", -1)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{where}.bits={bits!r}; accepted: 2 to 8")
    return dict(qcfg, checkpoint_format=fmt, group_size=group_size)


def load_quantlm(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A GPTQ directory (ours or GPTQModel's) -> Transformer whose quantized linears are QuantLinear modules."""
    from spectra.interop.hf import config_from_hf, read_hf_config, read_hf_weights
    from spectra.model import empty_model

    path = Path(path)
    if (path / META_FILE).exists():
        cfg = ModelConfig.from_dict(read_meta(path)["config"])
    else:
        cfg = config_from_hf(read_hf_config(path), str(path / "config.json"))
    qcfg = read_quant_config(path)
    tensors = read_hf_weights(path)
    model = empty_model(cfg, device)
    state = {}
    for key, value in tensors.items():
        name = key.removeprefix("model.")
        module_name, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            parent_name, _, child = module_name.rpartition(".")
            old = model.get_submodule(module_name)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"{path}: {key} quantizes {module_name}, which is not a linear layer of the model")
            layer = QuantLinear(old.in_features, old.out_features, bits=qcfg["bits"], group_size=qcfg["group_size"],
                                checkpoint_format=qcfg["checkpoint_format"])
            setattr(model.get_submodule(parent_name), child, layer.to(device))
        state[name] = value if suffix in QUANT_SUFFIXES and suffix != "scales" else value.float()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state[f"{name}.scales"] = state[f"{name}.scales"].half()
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"{path}: no quantized tensors (*.qweight) found")
    load_state_checked(model, state, str(path))
    if dtype is not None:
        model.to(dtype)
        for name, module in model.named_modules():  # the scales stay the checkpoint's float16 (a bfloat16 model
            if isinstance(module, QuantLinear):  # rounded them a second time: 0.39 % off, weights a bf16 step off)
                module.scales = state[f"{name}.scales"].to(module.scales.device)
    model.ptq_checkpoint = qcfg
    return model.eval()


def _shapes_of_dir(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bits per element) read from safetensors headers (checked whole), without loading tensors."""
    files = [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if not files[0].exists() and index.exists():
        files = [path / f for f in sorted(set(read_json(index, "a safetensors index")["weight_map"].values()))]
    if not files[0].exists():
        raise FormatError(f"{files[0]} is missing: not a QuantLM directory")
    out = {}
    for f in files:
        for key, t in safetensors_header(f).items():
            if key != "__metadata__":
                out[key] = (tuple(t["shape"]), 8 * SAFETENSORS_DTYPE_BYTES[t["dtype"]])
    return out


def _shapes_of_model(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """The tensors the GPTQ checkpoint of `model` holds: its QuantLinear buffers, or those its codes would pack to."""
    out = {}
    ptq = getattr(model, "ptq", None)
    quantized = ptq.weights if isinstance(ptq, PTQState) else {}
    fmt = checkpoint_format_for(ptq.settings["bits"], ptq.settings["sym"]) if quantized else None
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or name in quantized:
            if name in quantized:
                qw = quantized[name]
                module = QuantLinear(qw.codes.shape[1], qw.codes.shape[0], bits=qw.bits, group_size=qw.group_size,
                                     checkpoint_format=fmt)
            for suffix in QUANT_SUFFIXES:
                t = getattr(module, suffix)
                out[f"{name}.{suffix}"] = (tuple(t.shape), 16 if suffix == "scales" else t.element_size() * 8)
    covered = {k.rpartition(".")[0] for k in out}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in covered:
            out[key] = (tuple(t.shape), 16)
    return out


def quantlm_size_bits(model_or_dir: nn.Module | str | os.PathLike) -> dict[str, Any]:
    """Real size of a QuantLM's GPTQ checkpoint in bits: packed weights, scales, zeros, g_idx, and the fp16 rest
    (embeddings, lm_head, norms). `bits_per_linear_weight` = (qweight + qzeros + scales + g_idx) / quantized weights.
    """
    if isinstance(model_or_dir, nn.Module):
        shapes = _shapes_of_model(model_or_dir)
    else:
        shapes = _shapes_of_dir(Path(model_or_dir))
    parts = {"packed_weights": 0, "zeros": 0, "scales": 0, "g_idx": 0, "float": 0}
    part_of = {"qweight": "packed_weights", "qzeros": "zeros", "scales": "scales", "g_idx": "g_idx"}
    quantized_params = 0
    quantized_modules = {k.rpartition(".")[0] for k in shapes if k.endswith(".qweight")}
    for key, (shape, width) in shapes.items():
        module, _, suffix = key.rpartition(".")
        n = 1
        for s in shape:
            n *= s
        if module in quantized_modules and suffix in part_of:
            parts[part_of[suffix]] += n * width
            if suffix == "g_idx":
                quantized_params += n * shapes[f"{module}.scales"][0][1]  # in_features x out_features
        else:
            parts["float"] += n * width
    linear_bits = parts["packed_weights"] + parts["zeros"] + parts["scales"] + parts["g_idx"]
    return dict(
        parts,
        total=sum(parts.values()),
        quantized_params=quantized_params,
        bits_per_linear_weight=linear_bits / quantized_params if quantized_params else 0.0,
    )
