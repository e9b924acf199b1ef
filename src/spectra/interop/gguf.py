"""GGUF export for llama.cpp: Llama architecture, tokenizer embedded, TriLM block weights in TQ2_0 / TQ1_0.

Layout (tensor names are llama.cpp's for `general.architecture = "llama"`):

    token_embd.weight              Q8_0 (F16 when qtype is f16)
    blk.{i}.attn_norm.weight       F32      input_layernorm
    blk.{i}.attn_{q,k,v}.weight    qtype    q/k rows permuted, see below
    blk.{i}.attn_output.weight     qtype
    blk.{i}.ffn_norm.weight        F32      post_attention_layernorm
    blk.{i}.ffn_{gate,up,down}.weight  qtype
    output_norm.weight             F32
    output.weight                  Q8_0 (F16 when qtype is f16)

The embedding and output matrices are kept at 8 bits: in F16 they would dominate the file of a TriLM (§8.2 of the
paper notes: 2 × 50k × d weights at 16 bits against 2 bits for the blocks).

**TQ2_0 / TQ1_0 are lossless for TriLMs.** Both store one fp16 scale d = absmax per 256-weight block and the codes
round(w / d) ∈ {-1, 0, 1}. A TriLM weight is γ·Ŵ with one γ per model-parallel shard, so absmax of a block is γ and
the codes come back exactly, provided no 256-weight block spans two shards with different scales. The only loss is
fp16 rounding of γ (relative error ≤ 2⁻¹¹). A block that does mix two scales is refused with an error.

**RoPE layout.** Our attention (like Hugging Face's Llama) rotates the two halves of each head, (x_j, x_{j+D/2}),
while llama.cpp's `llama` architecture rotates adjacent pairs (x_{2j}, x_{2j+1}). As in llama.cpp's
`convert_hf_to_gguf.py` (LlamaModel), the rows of W_q and W_k are permuted within every head so that llama.cpp's
pair (2j, 2j+1) holds our (j, j + D/2): row index (h, half, j) → (h, j, half).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.interop.weights import check_plain_linear, dense_weight, ternary_weight
from spectra.quantizers import QUANTIZER_CLASSES

log = logging.getLogger(__name__)

QTYPES = ("tq2_0", "tq1_0", "f16", "q8_0")

_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'spectra-lm[gguf]'") from e
    return gguf


def rope_permute(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split RoPE order to llama.cpp's interleaved-pair order (see module doc)."""
    out, rest = W.shape[0], W.shape[1:]
    return W.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(W.shape)


def rope_unpermute(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `rope_permute`."""
    out, rest = W.shape[0], W.shape[1:]
    return W.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(W.shape)


def _check_single_scale_blocks(W: torch.Tensor, name: str, block: int = 256) -> None:
    """Every 256-weight block of a ternary matrix must hold one magnitude, else TQ's absmax scale is lossy."""
    a = W.abs().reshape(-1, block)
    hi = a.amax(dim=1)
    lo = torch.where(a > 0, a, torch.full_like(a, float("inf"))).amin(dim=1)
    bad = torch.nonzero((lo < float("inf")) & (lo != hi))
    if len(bad):
        b = int(bad[0])
        row, col = divmod(b * block, W.shape[1])
        raise ValueError(
            f"{name}: the 256-weight block at row {row}, columns {col}..{col + block - 1} mixes two scales "
            f"({float(lo[b]):.6g} and {float(hi[b]):.6g}), so TQ2_0/TQ1_0 (one scale per block) would lose weights. "
            "This happens when a row-parallel shard boundary (in_features / num_scale_shards) is not a multiple of "
            "256; export with qtype 'q8_0' or 'f16', or pass lossy=True to round such blocks like llama.cpp does"
        )


def _resolve_tokenizer(tokenizer: Any):
    """The tokenizer to embed: a `tokenizers.Tokenizer`, a tokenizer.json path, or None."""
    from spectra.data.tokenizer import load_tokenizer

    if tokenizer is None:
        return None
    return load_tokenizer(tokenizer)


def _has_gpt2_regex(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("use_regex", True))
    if pre.get("type") == "Sequence":
        return any(_has_gpt2_regex(p) for p in pre.get("pretokenizers", []))
    return False


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's `gpt2` (byte-level BPE) tokenizer keys for a `tokenizers.Tokenizer`, padded to `vocab_size`.

    Returns tokens (byte-level strings in id order), token_type (NORMAL 1, CONTROL 3 for special added tokens,
    USER_DEFINED 4 for other added tokens, UNUSED 5 for padding ids), merges ("a b"), and the pre-tokenizer name.
    """
    import json

    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) and max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, 1
    for added in spec.get("added_tokens") or []:
        i = added["id"]
        if i < vocab_size:
            tokens[i], types[i] = added["content"], 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if _has_gpt2_regex(spec.get("pre_tokenizer")):
        pre = "gpt-2"
    else:
        log.warning("tokenizer pre-tokenizer is not GPT-2's byte-level regex; llama.cpp will use its default split")
        pre = "default"
    return {"tokens": tokens, "token_type": types, "merges": merges, "pre": pre}


def export_gguf(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    qtype: str = "tq2_0",
    tokenizer: Any = None,
    lossy: bool = False,
) -> dict[str, Any]:
    """Write a model as a llama.cpp GGUF file (atomically). Returns a summary dict.

    `model` is anything `spectra.load` returns (a latent or packed TriLM, a FloatLM, a QuantLM). `qtype` is the
    format of the block linear layers: tq2_0 / tq1_0 (TriLMs only, lossless) or f16 / q8_0 (any model). `tokenizer`
    is a `tokenizers.Tokenizer` or a tokenizer.json path (`spectra export gguf` passes the one stored with the
    source). Without one the file declares llama.cpp's `none` vocabulary (token ids only). A TQ block that would mix
    two shard scales is an error unless `lossy=True`, which rounds it to its absmax as llama.cpp does.
    """
    gguf = _gguf()
    if qtype not in QTYPES:
        raise ValueError(f"unknown GGUF qtype {qtype!r}; accepted: {', '.join(QTYPES)}")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "n_layers"):
        raise ValueError(f"{type(model).__name__} has no spectra ModelConfig; export needs a spectra model")
    if cfg.norm != "rmsnorm" or cfg.mlp_act != "swiglu":
        raise ValueError(
            f"llama.cpp's llama architecture needs norm='rmsnorm' and mlp_act='swiglu'; this model has "
            f"norm={cfg.norm!r}, mlp_act={cfg.mlp_act!r}"
        )
    if cfg.family == "trilm" and QUANTIZER_CLASSES[cfg.quantizer].input_norm:
        raise ValueError(f"quantizer={cfg.quantizer!r} normalises and quantizes each linear layer's input in place of "
                         "the block's norms; a plain Llama model (llama.cpp's llama) cannot represent that")
    tok = _resolve_tokenizer(tokenizer)

    T = gguf.GGMLQuantizationType
    block_type = {"tq2_0": T.TQ2_0, "tq1_0": T.TQ1_0, "f16": T.F16, "q8_0": T.Q8_0}[qtype]
    side_type = T.F16 if qtype == "f16" else T.Q8_0
    file_type = {
        "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
        "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]

    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"GGUF output {out} is a folder; give a file name (e.g. {out / 'model.gguf'})")
    from spectra.files import temporary_name

    tmp = temporary_name(out, "gguf")  # swept by a later writer of `out` once this process is gone
    counts: dict[str, int] = {}

    def encode(name: str, W: torch.Tensor, ggml_type) -> tuple[np.ndarray, Any]:
        block = gguf.GGML_QUANT_SIZES[ggml_type][0]
        if W.ndim == 2 and W.shape[1] % block:
            raise ValueError(
                f"{name}: row length {W.shape[1]} is not a multiple of {block}, which {ggml_type.name} needs; "
                "choose qtype 'f16' for this model"
            )
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
        arr = W.detach().float().cpu().numpy()
        if ggml_type == T.F32:
            return arr, None
        if ggml_type == T.F16:
            return arr.astype(np.float16), None
        return gguf.quants.quantize(arr, ggml_type), ggml_type

    gguf_log = logging.getLogger("gguf")
    gguf_level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)  # the writer announces every file at INFO; we return a summary instead
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(cfg.name or "spectra")
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.glu_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tok is None:
            writer.add_tokenizer_model("none")
            tokenizer_kind = "none"
        else:
            meta = tokenizer_metadata(tok, cfg.vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(meta["pre"])
            writer.add_token_list(meta["tokens"])
            writer.add_token_types(meta["token_type"])
            writer.add_token_merges(meta["merges"])
            writer.add_bos_token_id(int(cfg.bos_token_id))
            writer.add_eos_token_id(int(cfg.eos_token_id))
            writer.add_add_bos_token(False)
            tokenizer_kind = "gpt2"

        def add(name: str, W: torch.Tensor, ggml_type) -> None:
            data, raw = encode(name, W, ggml_type)
            writer.add_tensor(name, data, raw_dtype=raw)

        with torch.no_grad():
            add("token_embd.weight", model.embed_tokens.weight, side_type)
            for i, layer in enumerate(model.layers):
                add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, T.F32)
                add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, T.F32)
                for path, short in _BLOCK_NAMES.items():
                    module = layer.get_submodule(path)
                    name = f"blk.{i}.{short}.weight"
                    check_plain_linear(module, f"layers.{i}.{path}")
                    if qtype in ("tq2_0", "tq1_0"):
                        tw = ternary_weight(module)
                        if tw is None:
                            raise ValueError(
                                f"{name} ({type(module).__name__}) is not ternary: qtype {qtype} is for TriLMs only; "
                                "use 'q8_0' or 'f16' for FloatLMs and QuantLMs"
                            )
                        W = tw.dense()
                        if W.shape[1] % 256 == 0 and not lossy:
                            _check_single_scale_blocks(W, name)
                    else:
                        W = dense_weight(module)
                    if short in ("attn_q", "attn_k"):
                        W = rope_permute(W, cfg.n_heads)
                    add(name, W, block_type)
            add("output_norm.weight", model.norm.weight, T.F32)
            add("output.weight", model.lm_head.weight, side_type)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:  # the temporary name is not one the user gave
        writer.close()
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        gguf_log.setLevel(gguf_level)
    return {
        "path": str(out),
        "qtype": qtype,
        "bytes": out.stat().st_size,
        "n_tensors": sum(counts.values()),
        "tensor_types": counts,
        "tokenizer": tokenizer_kind,
        "architecture": "llama",
    }
