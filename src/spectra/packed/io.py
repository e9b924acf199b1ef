"""Packed TriLM checkpoints: write (`pack_model`, CLI `spectra pack`) and read (`load_packed`, via `spectra.load`).

A packed checkpoint is a spectra model directory:

    spectra.json        {"format": "spectra", "kind": "packed", "config": {...},
                         "packed": {"version": 2, "format": "tq2_0" | "tq1_0", "block_size": 256,
                                    "block_bytes": 66 | 54, "layers": {"layers.0.self_attn.q_proj": [out, in], ...},
                                    "embedding": "float16" | "bfloat16" | "float32",
                                    "head": "int8" | "float16" | "bfloat16" | "float32"}}
    model.safetensors   for each packed layer `NAME.tq2_0` (or `NAME.tq1_0`): uint8 [out, in/256 · block_bytes], the
                        llama.cpp blocks byte for byte (codes then fp16 d), so GGUF export copies them unchanged;
                        `embed_tokens.weight` in the `embedding` dtype; the output layer as `lm_head.weight` in the
                        `head` dtype, or for head "int8" as `lm_head.qweight` int8 [vocab, dim] (natural column
                        order) and `lm_head.scale` float32 [vocab], W = scale·qweight per row, the form the decoder
                        multiplies by (`linear.Int8Linear`, like llama.cpp's Q8_0 output tensor); norms in float32.
                        The safetensors header metadata carries {"spectra.packed": format} as a second check.
    tokenizer.json      when the source model has one

The defaults (fp16 embedding, int8 head) keep the file within 5 % of the paper's count of bits (16-bit embedding and
head, log2(3) bits per ternary weight) plus the fp16 block scales, mostly below it, as the int8 head stores half the
paper's 16 bits: over the paper's nine sizes TQ1_0 files are 0.78-0.90 of that count and TQ2_0 files (2 bits per code)
0.80-1.03 (1.000 at 2.4B, 1.027 at 3.9B); `spectra.accounting.packed_size` compares them. Version 1 files (fp32
embedding and lm_head, no `embedding`/`head` fields) still load, unchanged.

Numerically, against the same model packed in version 1: the embedding rows are rounded to fp16 (relative 2^-11 at
most); the int8 head multiplies int8 activations (one scale per token) by int8 weights (one scale per row), exactly
`kernels.reference_int8_matmul`, which moves logits by about the int8 rounding (≈1 % relative). Loaded, the embedding
stays 16-bit in memory (`linear.CompactEmbedding`, float32 lookups) and the head stays int8.

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
from safetensors import SafetensorError, safe_open
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
    save_safetensors,
    write_json,
)
from spectra.layers import TernaryLinear, rope_cache
from spectra.model import Transformer
from spectra.packed import formats, kernels
from spectra.packed.linear import (
    CompactEmbedding,
    Int8Linear,
    PackedTernaryLinear,
    as_packed,
    code_arena,
    is_trilm,
)

log = logging.getLogger(__name__)

PACKED_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: fp32 embedding and lm_head
MAGIC_KEY = "spectra.packed"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HEAD_FORMATS = ("int8", *FLOAT_DTYPES)


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
    embedding: str = "float16",
    head: str = "int8",
) -> dict[str, Any]:
    """Write a packed checkpoint of a TriLM (anything `spectra.load` returns). Returns a summary dict.

    The model is not modified. `lossy=True` allows blocks that straddle two shards with different scales (rounded to
    the block absmax like llama.cpp); without it such a layer is a ValueError, as is any non-ternary block matrix.
    `embedding` ('float16', 'bfloat16', 'float32') and `head` ('int8', or one of those) set how the embedding and the
    output layer are stored (module docstring).
    """
    fmt = formats.canonical_format(format)
    if embedding not in FLOAT_DTYPES:
        raise ValueError(f"embedding={embedding!r}; accepted: {', '.join(FLOAT_DTYPES)}")
    if head not in HEAD_FORMATS:
        raise ValueError(f"head={head!r}; accepted: {', '.join(HEAD_FORMATS)}")
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
    other.update(_embedding_and_head(model, embedding, head, other))
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
            "embedding": embedding,
            "head": head,
        },
    }
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", MAGIC_KEY: fmt})
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
        "embedding": embedding,
        "head": head,
    }
    from spectra.accounting import packed_size

    summary.update(packed_size(cfg, fmt, summary["file_bytes"]))
    log.info(
        "packed %d layers (%s, %.4f bits/weight) into %s", len(raw), fmt, summary["bits_per_ternary_weight"], out_dir
    )
    return summary


def weights_match(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Whether the packed checkpoint at `path` holds `model`'s ternary block weights exactly, checked against the
    model's own forward weights rather than the packer: for every block layer, the packed d·q equals the latent
    W̃ = γ·Ŵ rounded to fp16, which for ternary Ŵ is Ŵ·fp16(γ), so codes and fp16 scales must both match.
    Returns {"layers", "weights", "mismatched_weights", "exact"}."""
    model = getattr(model, "_orig_mod", model)
    latent = dict(model.named_modules())
    packed = load_packed(path, kernel="torch")
    layers = weights = mismatched = 0
    for name, module in packed.named_modules():
        if not isinstance(module, PackedTernaryLinear):
            continue
        ref = latent.get(name)
        if ref is None:
            raise ValueError(f"{path}: packed layer {name} is not a layer of the model it is checked against")
        with torch.no_grad():
            if isinstance(ref, TernaryLinear):  # codes times the scales as the file stores them (fp16 of each γ),
                # not the model's W̃ rounded again: a model held in bf16 has W̃ = bf16(γ·code), whose fp16 differs
                codes, scales = ref.codes_and_scales()
                scales = scales.detach().float().cpu().to(torch.float16).float()
                want = ref.quantizer.dequantize(codes.detach().cpu(), scales).float()
            else:
                want = ref.weight.detach().float().cpu().to(torch.float16).float()
        got = module.dequantized_weight()
        if got.shape != want.shape:
            raise ValueError(f"{path}: packed layer {name} is {tuple(got.shape)}, the model's {tuple(want.shape)}")
        layers += 1
        weights += want.numel()
        mismatched += int((got != want).sum())
    return {"layers": layers, "weights": weights, "mismatched_weights": mismatched,
            "exact": layers > 0 and mismatched == 0}


def _embedding_and_head(model: nn.Module, embedding: str, head: str, other: dict) -> dict[str, torch.Tensor]:
    """The embedding and output-layer tensors to store (removing the ones they replace from `other`)."""
    out = {"embed_tokens.weight": model.embed_tokens.weight.detach().cpu().to(FLOAT_DTYPES[embedding]).contiguous()}
    if embedding == "float16" and not torch.isfinite(out["embed_tokens.weight"]).all():
        raise ValueError("the embedding has values beyond the fp16 range (65504); pack with embedding='bfloat16'")
    lm = model.lm_head
    for k in [k for k in other if k.startswith("lm_head.")]:
        del other[k]
    if head == "int8":
        int8 = lm if isinstance(lm, Int8Linear) else Int8Linear(*kernels.quantize_weight_int8(lm.weight), path="torch")
        out["lm_head.qweight"] = int8.int8_weight().contiguous()
        out["lm_head.scale"] = int8.scale.detach().float().contiguous()
    else:
        w = lm.dequantized_weight() if isinstance(lm, Int8Linear) else lm.weight.detach().cpu()
        out["lm_head.weight"] = w.to(FLOAT_DTYPES[head]).contiguous()
        if not torch.isfinite(out["lm_head.weight"]).all():
            raise ValueError(f"lm_head has values beyond the {head} range; pack with head='int8' or 'bfloat16'")
    return out


def _packed_meta(path: Path) -> tuple[ModelConfig, str, dict[str, tuple[int, int]], str, str]:
    meta = read_meta(path)
    where = path / META_FILE
    if meta.get("kind") != "packed":
        raise FormatError(f"{where}: kind is {meta.get('kind')!r}, expected 'packed'")
    packed = meta.get("packed")
    if not isinstance(packed, dict):
        raise FormatError(f"{where}: field 'packed' is missing or not an object")
    version = packed.get("version")
    if version not in READ_VERSIONS:
        raise FormatError(f"{where}: packed.version is {version!r}; this spectra reads {list(READ_VERSIONS)}")
    embedding = packed.get("embedding", "float32") if version >= 2 else "float32"
    head = packed.get("head", "float32") if version >= 2 else "float32"
    if not (isinstance(embedding, str) and isinstance(head, str)) or embedding not in FLOAT_DTYPES \
            or head not in HEAD_FORMATS:
        raise FormatError(
            f"{where}: packed.embedding/head are {embedding!r}/{head!r}; accepted: {list(FLOAT_DTYPES)} / "
            f"{list(HEAD_FORMATS)}"
        )
    fmt = packed.get("format")
    if not isinstance(fmt, str) or fmt not in formats.BLOCK_BYTES:
        raise FormatError(f"{where}: packed.format is {fmt!r}; accepted: {sorted(formats.BLOCK_BYTES)}")
    if packed.get("block_size") != formats.QK or packed.get("block_bytes") != formats.BLOCK_BYTES[fmt]:
        raise FormatError(
            f"{where}: packed.block_size/block_bytes are {packed.get('block_size')}/{packed.get('block_bytes')}, "
            f"{fmt} has {formats.QK}/{formats.BLOCK_BYTES[fmt]}"
        )
    layers = packed.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FormatError(f"{where}: packed.layers must map layer names to [out, in]")
    cfg = ModelConfig.from_meta(meta, where)
    shapes = {}
    for name, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise FormatError(f"{where}: packed.layers[{name!r}] = {shape!r} is not [out, in]")
        shapes[name] = (shape[0], shape[1])
    return cfg, fmt, shapes, embedding, head


def load_packed(
    path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, kernel: str = "auto"
) -> nn.Module:
    """Open a packed checkpoint as a Transformer whose block linears are PackedTernaryLinear (CPU, inference only).

    `dtype` applies to the float parts (embeddings, norms, a float lm_head); packed layers compute in int8/float32 and
    return the input's dtype. Without `dtype`, a 16-bit embedding stays 16-bit (`CompactEmbedding`, float32 lookups),
    a 16-bit lm_head is widened to float32 and an int8 head is an `Int8Linear`. `kernel` picks the kernel path
    ('auto', 'avx512vnni', 'avx2', 'scalar', 'torch').
    """
    path = Path(path)
    if torch.device(device).type != "cpu":
        raise ValueError(f"packed models run on CPU only (spectra's kernels are CPU kernels); got device={device!r}")
    cfg, fmt, shapes, embedding, head = _packed_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise FormatError(f"{weights} is missing: a packed checkpoint needs {WEIGHTS_FILE}")
    safetensors_header(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            magic = (f.metadata() or {}).get(MAGIC_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{weights} cannot be read as safetensors: {e}") from None
    if magic != fmt:
        raise FormatError(f"{weights}: header metadata {MAGIC_KEY}={magic!r} does not match {META_FILE} format {fmt!r}")
    with torch.device("meta"):
        model = Transformer(cfg)
    modules = dict(model.named_modules())
    for name, (out_f, in_f) in shapes.items():  # before the arena is sized from these shapes
        target = modules.get(name)
        if not isinstance(target, TernaryLinear) or (target.out_features, target.in_features) != (out_f, in_f):
            raise FormatError(
                f"{path / META_FILE}: packed layer {name!r} {[out_f, in_f]} is not a ternary layer of the config"
            )
    order = [n for n in modules if n in shapes]  # a decode step's order
    # Each layer's codes move into the arena as soon as it is built (not `gather_codes` afterwards), so no more than
    # one layer's codes exist twice at a time.
    block = formats.CODE_BYTES[fmt]
    homes = iter(code_arena([shapes[n][0] * shapes[n][1] // formats.QK * block for n in order]))
    for name in order:
        out_f, in_f = shapes[name]
        target = modules[name]
        key = f"{name}.{fmt}"
        if key not in state:
            raise FormatError(f"{weights}: tensor {key!r} is missing")
        try:
            layer = PackedTernaryLinear.from_bytes(state.pop(key), (out_f, in_f), fmt, path=kernel)
        except ValueError as e:
            raise FormatError(f"{weights}: {key}: {e}") from None
        layer.move_codes(next(homes))  # one buffer on 2 MiB pages for every layer (code_arena)
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, layer)
    own = model.state_dict()
    if head == "int8":
        V, C = own.pop("lm_head.weight").shape
        own["lm_head.qweight"] = torch.empty(V, C, dtype=torch.int8, device="meta")
        own["lm_head.scale"] = torch.empty(V, device="meta")
    expected = {k for k in own if not any(k.startswith(f"{n}.") for n in shapes)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FormatError(f"{weights}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise FormatError(
                f"{weights}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    stored = {"embed_tokens.weight": embedding, "lm_head.weight": head, "lm_head.qweight": "int8"}
    for k, want in stored.items():
        if k in state and state[k].dtype != FLOAT_DTYPES.get(want, torch.int8):
            raise FormatError(f"{weights}: tensor {k} is {state[k].dtype}, {META_FILE} says {want}")
    for k, v in state.items():  # norms, the head's row scales, the embedding: finite floats, as the block scales are
        if k == "lm_head.qweight":  # the int8 head's weights (checked by Int8Linear.from_int8)
            continue
        if not v.is_floating_point():
            raise FormatError(f"{weights}: tensor {k} is {v.dtype}; accepted: a floating-point dtype")
        if not bool(torch.isfinite(v).all()):
            raise FormatError(f"{weights}: tensor {k} holds NaN or infinite values (a corrupt file?)")
    if head == "int8":
        try:
            model.lm_head = Int8Linear.from_int8(state.pop("lm_head.qweight"), state.pop("lm_head.scale"), path=kernel)
        except ValueError as e:
            raise FormatError(f"{weights}: lm_head: {e}") from None
    if dtype is None and embedding != "float32":
        emb = state.pop("embed_tokens.weight")
        model.embed_tokens = CompactEmbedding(emb.shape[0], emb.shape[1], _weight=emb, _freeze=True)
    if dtype is None:
        dtype_of = {k: torch.float32 for k in state if k == "lm_head.weight"}
    else:
        dtype_of = {k: dtype for k, v in state.items() if v.is_floating_point()}
    state = {k: v.to(dtype_of[k]) if k in dtype_of else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    model.requires_grad_(False)
    return model.eval()
