"""Parameter counts and size in bits, counted the way the Spectra paper counts them (§2.1, §4.2, Table 4).

Embeddings, lm_head and norms count at 16 bits in every family. The block linear weights count at:

    FloatLM      16 bits
    QuantLM-b    b bits, + 0.25 for the fp16 scale of each group of 128 at 3 and 4 bits (GPTQ g128);
                 6 and 8 bits use per-channel scales, which the paper does not count. Other widths and groups
                 (`quantlm_bits`): b + 32/g for groups of g (0.25 · 128/g), b for one group per row
    TriLM        log2(3) ≈ 1.585 bits (the paper counts no per-shard scale: < 1e-5 bits per weight)

Real packed sizes are counted too: llama.cpp's TQ2_0 (2.0625 bits per weight) and TQ1_0 (1.6875).
"""

from __future__ import annotations

import math
from typing import Any

from spectra.config import ModelConfig

HALF = 16


def quantlm_bits(bits: int, group_size: int) -> float:
    """Bits per block weight of a `bits`-bit QuantLM with groups of `group_size` (-1 or 0: one per row), counted as
    the paper counts its g128 models (b + 0.25 at g = 128, per-row scales not counted)."""
    return bits + 0.25 * 128 / group_size if group_size > 0 else float(bits)


LINEAR_BITS = {
    "floatlm": 16.0,
    "quantlm_3": quantlm_bits(3, 128),
    "quantlm_4": quantlm_bits(4, 128),
    "quantlm_6": quantlm_bits(6, -1),
    "quantlm_8": quantlm_bits(8, -1),
    "trilm": math.log2(3),
    "trilm_tq2": 2.0625,
    "trilm_tq1": 1.6875,
}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of `spectra.model.Transformer(cfg)` without building it."""
    attn = 4 * cfg.dim * cfg.attn_dim
    mlp = (3 if cfg.mlp_act == "swiglu" else 2) * cfg.dim * cfg.glu_dim
    linear = cfg.n_layers * (attn + mlp)
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    if cfg.family == "trilm":
        from spectra.quantizers import QUANTIZER_CLASSES

        if QUANTIZER_CLASSES[cfg.quantizer].input_norm:  # BitNet b1.58: a norm inside each linear, none per block
            per_layer = 3 * cfg.dim + cfg.attn_dim + (2 if cfg.mlp_act == "swiglu" else 1) * cfg.dim + cfg.glu_dim
            norms = cfg.n_layers * per_layer + cfg.dim
    scales = 0
    if cfg.family == "trilm" and (cfg.quantizer_options or {}).get("learnable_scale"):
        # `learnable_scale`: one trained factor per scale shard of every block linear (4 attention, 3 or 2 MLP)
        scales = cfg.n_layers * (4 + (3 if cfg.mlp_act == "swiglu" else 2)) * cfg.num_scale_shards
    embedding = 2 * cfg.vocab_size * cfg.dim  # untied embedding + lm_head
    return {
        "params": linear + norms + scales + embedding,
        "non_embedding_params": linear + norms + scales,
        "linear_params": linear,
        "embedding_params": embedding,
        "norm_params": norms,
        "scale_params": scales,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward+backward FLOPs per token: 6·N (matmuls; N without the embedding lookup) + 12·L·H·D·T (attention)."""
    T = seq_len or cfg.max_seq_len
    n = param_counts(cfg)["params"] - cfg.vocab_size * cfg.dim
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T


def size_in_bits(cfg: ModelConfig, linear_bits: float) -> float:
    counts = param_counts(cfg)
    return counts["linear_params"] * linear_bits + (counts["embedding_params"] + counts["norm_params"]) * HALF


def size_report(cfg: ModelConfig) -> dict[str, Any]:
    """params, non_embedding_params and `bits` per family (floatlm, quantlm_3/4/6/8, trilm, trilm_tq2, trilm_tq1)."""
    counts = param_counts(cfg)
    bits = {family: size_in_bits(cfg, b) for family, b in LINEAR_BITS.items()}
    report: dict[str, Any] = {"name": cfg.name, "family": cfg.family, **counts, "bits": bits}
    if cfg.family == "trilm":
        from spectra.quantizers import bits_per_weight

        report["bits"]["this_model"] = size_in_bits(cfg, bits_per_weight(cfg.quantizer, cfg.quantizer_options))
    else:
        report["bits"]["this_model"] = bits["floatlm"]
    return report




def packed_size(cfg: ModelConfig, fmt: str, file_bytes: int) -> dict[str, Any]:
    """A packed checkpoint's file against the paper's count.

    `paper_bits`: the paper's count (16-bit embedding, lm_head and norms; log2(3) bits per ternary weight);
    `block_scale_bits`: the one fp16 scale per 256 ternary weights that TQ1_0/TQ2_0 add; `format_bits`: the paper's
    count with the format's real bits per ternary weight (TQ2_0 2.0625, TQ1_0 1.6875, scales included). The ratios
    are the file's bits over paper + scales and over the format count.
    """
    key = {"tq2_0": "trilm_tq2", "tq1_0": "trilm_tq1", "tq2": "trilm_tq2", "tq1": "trilm_tq1"}[fmt]
    counts = param_counts(cfg)
    paper = size_in_bits(cfg, LINEAR_BITS["trilm"])
    scales = counts["linear_params"] / 256 * HALF
    fmt_bits = size_in_bits(cfg, LINEAR_BITS[key])
    file_bits = 8 * file_bytes
    return {
        "file_bits": file_bits,
        "paper_bits": paper,
        "block_scale_bits": scales,
        "format_bits": fmt_bits,
        "file_over_paper_plus_scales": file_bits / (paper + scales),
        "file_over_format_bits": file_bits / fmt_bits,
    }


def stored_bits(path) -> dict[str, Any]:
    """What a checkpoint directory really stores: bits of every safetensors tensor, read from the file headers.

    `block_bits` covers the transformer blocks (packed codes, scales, zeros, norms), `other_bits` the embedding,
    lm_head and final norm.
    """
    from pathlib import Path

    from spectra.files import SAFETENSORS_DTYPE_BYTES, FormatError, read_json, safetensors_header

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file")
    block, other, n_tensors = 0, 0, 0
    for f in files:
        header = safetensors_header(f)
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t["dtype"] not in SAFETENSORS_DTYPE_BYTES:
                raise ValueError(f"{f}: tensor {name} has dtype {t['dtype']}, unknown to the size count")
            bits = math.prod(t["shape"]) * 8 * SAFETENSORS_DTYPE_BYTES[t["dtype"]]
            n_tensors += 1
            if ".layers." in f".{name}":
                block += bits
            else:
                other += bits
    out = {"total_bits": block + other, "block_bits": block, "other_bits": other, "tensors": n_tensors,
           "files": [f.name for f in files]}
    meta_file = Path(path) / "spectra.json"
    if meta_file.exists():  # a packed checkpoint: its file against the paper's count plus the block scales
        meta = read_json(meta_file, "spectra's model metadata")
        if isinstance(meta, dict) and meta.get("kind") == "packed" and isinstance(meta.get("packed"), dict):
            fmt = meta["packed"].get("format")
            if fmt not in ("tq1_0", "tq2_0"):
                raise FormatError(f"{meta_file}: packed.format is {fmt!r}; accepted: ['tq1_0', 'tq2_0']")
            out.update(packed_size(ModelConfig.from_meta(meta, meta_file), fmt, sum(f.stat().st_size for f in files)))
    return out
