"""Hugging Face transformers interop: our models <-> `LlamaForCausalLM` directories.

Export writes config.json, generation_config.json, model.safetensors and (when the model has one) the tokenizer, so
that `transformers.AutoModelForCausalLM.from_pretrained` loads a `LlamaForCausalLM`. A TriLM is exported "unpacked"
like the released `SpectraSuite/TriLM_*_Unpacked` checkpoints: each block matrix holds W̃ = γ·Ŵ, and config.json
records `pretraining_model_parallel` (the number of scale shards).

Import reads any Llama directory (safetensors, sharded safetensors or pytorch_model.bin). A block matrix of an unpacked
TriLM has at most 1 + MP distinct |w| values, one per model-parallel shard (plus 0). When every block matrix has that
shape we recover the int8 codes and the per-shard scales exactly and build a TriLM, which can be trained further or
packed. Directories with a `quantization_config` (GPTQ) are handed to `spectra.ptq.formats.load_quantlm`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spectra.checkpoint import load_state_checked
from spectra.config import ModelConfig
from spectra.files import (
    CHAT_TEMPLATE_FILE,
    FormatError,
    atomic_dir,
    load_safetensors,
    read_json,
    refuse_pickle,
    save_safetensors,
    write_json,
)
from spectra.layers import TernaryLinear
from spectra.model import empty_model
from spectra.ternary import SHARD_DIM

BLOCK_LINEARS = tuple(SHARD_DIM)
CANDIDATE_SHARDS = (1, 2, 3, 4, 6, 8)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- export -----------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the equivalent LlamaForCausalLM. Refuses what Llama cannot represent."""
    if cfg.norm != "rmsnorm":
        raise ValueError(
            f"norm={cfg.norm!r} cannot be exported as a Llama model (Llama uses RMSNorm); accepted: rmsnorm"
        )
    if cfg.mlp_act != "swiglu":
        raise ValueError(f"mlp_act={cfg.mlp_act!r} cannot be exported as a Llama model (SwiGLU); accepted: swiglu")
    if cfg.family == "trilm" and cfg.quantizer == "bitnet158":
        raise ValueError(
            "quantizer='bitnet158' quantizes activations and adds norms; a Llama model cannot represent it"
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.glu_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.family == "trilm":
        config["pretraining_model_parallel"] = cfg.num_scale_shards
        config["spectra_family"] = "trilm"
    return config


def hf_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """HF tensor names; TriLM block matrices as W̃ = γ·Ŵ, and every other layer that holds its weight in another form
    (a QuantLM's GPTQ buffers, a packed TriLM's codes and its int8 head) as the float matrix it multiplies by
    (`spectra.interop.weights.dense_weight`): their buffers used to be written as they were, cast to float, under
    names no Llama model has, so transformers initialised those matrices at random."""
    from spectra.interop.weights import dense_weight

    model = getattr(model, "_orig_mod", model)
    state = {}

    def put(name: str, tensor: Tensor) -> None:
        key = name if name.startswith("lm_head.") else f"model.{name}"
        state[key] = tensor.detach().to("cpu", dtype).contiguous()

    done: set[str] = set()
    for name, tensor in model.state_dict().items():
        if ".quantizer." in name:  # learnable scales and progressive stages are folded into W̃
            continue
        module_name, _, suffix = name.rpartition(".")
        if module_name in done:
            continue
        module = model.get_submodule(module_name)
        if isinstance(module, TernaryLinear):
            if suffix == "weight":
                put(name, module.quantized_weight().float())
            continue  # a per-shard scale offset is part of W̃
        if (suffix == "weight" and isinstance(module, (nn.Linear, nn.Embedding))) or type(module).__name__ in (
                "RMSNorm", "LayerNorm"):
            put(name, tensor)
            continue
        try:  # a layer with its weight in another form: the matrix it multiplies by
            put(f"{module_name}.weight", dense_weight(module))
        except ValueError:
            raise ValueError(f"tensor {name} of module {type(module).__name__} has no Llama equivalent") from None
        done.add(module_name)
    return state


def write_tokenizer_files(tokenizer: str | os.PathLike, out: Path, cfg: ModelConfig) -> None:
    """tokenizer.json plus the small files `AutoTokenizer` needs to build a PreTrainedTokenizerFast, and the chat
    template stored beside `tokenizer` (tokenizer_config.json's `chat_template`, or chat_template.jinja), which
    `spectra serve` and `apply_chat_template` use."""
    from tokenizers import Tokenizer

    shutil.copyfile(tokenizer, out / "tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.id_to_token(cfg.eos_token_id)
    bos = tok.id_to_token(cfg.bos_token_id)
    if eos is None or bos is None:
        raise ValueError(f"{tokenizer} has no token with id {cfg.eos_token_id} (the model's eos/bos id)")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"{tokenizer} has {tok.get_vocab_size()} tokens, more than the model's vocab_size {cfg.vocab_size}"
        )
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    source = Path(tokenizer).parent
    if (source / "tokenizer_config.json").is_file():
        template = read_json(source / "tokenizer_config.json", "a tokenizer config")
        if isinstance(template, dict) and template.get("chat_template") is not None:
            tok_config["chat_template"] = template["chat_template"]
    if (source / CHAT_TEMPLATE_FILE).is_file():
        shutil.copyfile(source / CHAT_TEMPLATE_FILE, out / CHAT_TEMPLATE_FILE)
    write_json(out / "tokenizer_config.json", tok_config)
    write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float16,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads as LlamaForCausalLM. `model` is
    anything `spectra.load` returns; `tokenizer` a tokenizer.json to write with it (`spectra export hf` passes the one
    stored with the source)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    cfg: ModelConfig = getattr(model, "_orig_mod", model).config
    config = hf_config(cfg, dtype)
    state = hf_state_dict(model, dtype)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, cfg)
    return Path(out_dir)


# ---- import -----------------------------------------------------------------------------------------------------
def read_hf_config(path: Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    hf = read_json(cfg_path, "a Hugging Face model config (not a Hugging Face model directory?)")
    if not isinstance(hf, dict):
        raise FormatError(f"{cfg_path} holds a JSON {type(hf).__name__}, expected an object")
    return hf


def config_from_hf(
    hf: dict[str, Any], source: str, *, family: str = "floatlm", num_scale_shards: int = 1
) -> ModelConfig:
    """ModelConfig of a Llama config.json; names the field that spectra cannot represent. A field left out takes
    transformers' LlamaConfig default (rms_norm_eps 1e-6, bos 1, eos 2, ...), so both build the same model."""
    archs = hf.get("architectures")
    archs = archs if isinstance(archs, list) else []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"{source}: model_type={hf.get('model_type')!r}, architectures={hf.get('architectures')}; "
            "accepted: a Llama checkpoint (model_type 'llama' / LlamaForCausalLM)"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")

    def integer(key: str, default: int | None = None) -> int:
        v = hf.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{source}: field '{key}' must be a positive integer, got {v!r}")
        return v

    def number(key: str, default: float) -> float:
        v = hf.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{source}: field '{key}' must be a finite number, got {v!r}")
        return float(v)

    def token_id(key: str, default: int) -> int:
        v = hf.get(key, default)
        if isinstance(v, list) and v:  # several end tokens: the first is the model's own
            v = v[0]
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:  # an empty list too
            raise ValueError(f"{source}: field '{key}' must be a token id (an integer >= 0, a non-empty list of them, "
                             f"or null), got {hf.get(key)!r}")
        return v

    heads = integer("num_attention_heads")
    if hf.get("num_key_value_heads") is not None and hf["num_key_value_heads"] != heads:  # null: as many as heads
        raise ValueError(
            f"{source}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={heads}; "
            "grouped-query attention is not part of the Spectra architecture"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; accepted: silu (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true; Spectra models have no biases")
    if hf.get("rope_scaling"):
        raise ValueError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported; accepted: null")
    rope = hf.get("rope_parameters")  # transformers 5 writes rope_theta (and any scaling) here, not at the top
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"{source}: field 'rope_parameters' must be an object (rope_theta, rope_type), got {rope!r}")
    if rope and rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r} (a scaled RoPE) is not "
                         "supported; accepted: 'default'")
    if hf.get("rope_theta") is None and rope and rope.get("rope_theta") is not None:
        hf = {**hf, "rope_theta": rope["rope_theta"]}
    dim = integer("hidden_size")
    fields = dict(
        dim=dim,
        glu_dim=integer("intermediate_size"),
        n_layers=integer("num_hidden_layers"),
        n_heads=heads,
        head_dim=integer("head_dim") if hf.get("head_dim") else None,
        vocab_size=integer("vocab_size"),
        max_seq_len=integer("max_position_embeddings", 2048),
        rope_theta=number("rope_theta", 10000.0),
        norm_eps=number("rms_norm_eps", 1e-6),
        init_std=number("initializer_range", 0.02),
        bos_token_id=token_id("bos_token_id", 1),
        eos_token_id=token_id("eos_token_id", 2),
    )
    try:
        return ModelConfig(**fields, family=family, num_scale_shards=num_scale_shards)
    except ValueError as e:  # a value spectra cannot take: name the config.json field it came from
        hf_names = {"dim": "hidden_size", "glu_dim": "intermediate_size", "n_layers": "num_hidden_layers",
                    "n_heads": "num_attention_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
                    "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
                    "init_std": "initializer_range", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
        named = next((hf_names[f] for f in hf_names if f"ModelConfig.{f} " in str(e)), None)
        raise ValueError(f"{source}: {e}" + (f" (config.json field '{named}')" if named else "")) from None


def read_hf_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a HF directory, whatever the file layout, less the RoPE caches older Llama checkpoints store
    (`rotary_emb.inv_freq`: computed from the config, as transformers does)."""
    state = {k: v for f in hf_weight_files(path) for k, v in load_safetensors(f).items()}
    return {k: v for k, v in state.items() if not k.endswith(".rotary_emb.inv_freq")}


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a HF directory: model.safetensors, or every file its index's weight_map names
    (checked to exist and to be file names in the directory)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        doc = read_json(index, "a safetensors index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index} has no 'weight_map' object (tensor name -> file name)")
        names = set(weight_map.values())
        bad = sorted(repr(n) for n in names if not isinstance(n, str) or Path(n).name != n or not n)
        if bad:
            raise FormatError(f"{index}: weight_map values must be file names in {path}, got {', '.join(bad[:3])}")
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            raise FormatError(f"{index} names {len(missing)} missing file(s): {path / missing[0]} is missing")
        return [path / n for n in sorted(names)]
    refuse_pickle(path)
    raise FormatError(f"{path}: no model.safetensors or model.safetensors.index.json")


def model_parallel_hint(hf: dict[str, Any], source: str) -> int | None:
    """config.json's `pretraining_model_parallel` (the scale shards a TriLM was trained with): a positive integer or
    null."""
    v = hf.get("pretraining_model_parallel")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ValueError(f"{source}: field 'pretraining_model_parallel' must be a positive integer (the TriLM's "
                         f"model-parallel scale shards) or null, got {v!r}")
    return v


def ternary_from_unpacked(W: Tensor, num_shards: int, dim: int, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Exact codes and per-shard scales of an unpacked ternary matrix (each shard: one nonzero |w| value).

    Raises ValueError naming the tensor when a shard has more than one nonzero magnitude.
    """
    if W.shape[dim] % num_shards:
        raise ValueError(f"{name}: shape {tuple(W.shape)} does not split into {num_shards} shards along dim {dim}")
    codes, scales = [], []
    for shard in W.chunk(num_shards, dim=dim):
        mag = shard.abs()
        nonzero = mag[mag != 0]
        if nonzero.numel() == 0:
            scales.append(torch.tensor(0.0))
        else:
            lo, hi = nonzero.min(), nonzero.max()
            if lo != hi:
                raise ValueError(
                    f"{name} is not ternary: a shard (of {num_shards} along dim {dim}) holds distinct "
                    f"magnitudes {lo.item():.6g} and {hi.item():.6g}"
                )
            scales.append(hi.float())
        codes.append(torch.sign(shard).to(torch.int8))
    return torch.cat(codes, dim=dim), torch.stack(scales)


def _is_ternary(W: Tensor, num_shards: int, dim: int) -> bool:
    if W.shape[dim] % num_shards:
        return False
    for shard in W.chunk(num_shards, dim=dim):
        nonzero = shard.abs()[shard != 0]
        if nonzero.numel() and nonzero.min() != nonzero.max():
            return False
    return True


def detect_scale_shards(state: dict[str, Tensor], n_layers: int, hint: int | None = None) -> int | None:
    """The smallest shard count under which every block matrix is ternary, or None (a FloatLM)."""
    mats = [
        (state[f"model.layers.{i}.{part}.{n}.weight"], SHARD_DIM[n])
        for i in range(n_layers)
        for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for n in names
    ]
    candidates = (hint,) if hint else CANDIDATE_SHARDS
    for s in candidates:
        if all(_is_ternary(W, s, d) for W, d in mats):
            return s
    return None


def hf_model_config(path: Path, hf: dict[str, Any], base: ModelConfig, state: dict[str, Tensor],
                    family: str | None = None) -> ModelConfig:
    """The config of a HF directory's model: `base` (`config_from_hf`), a TriLM with its scale shards when every
    block matrix of `state` is ternary (family=None detects, "trilm" requires it, "floatlm" takes the weights as
    they are)."""
    for i in range(base.n_layers):
        for n in SHARD_DIM:
            key = f"model.layers.{i}.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight"
            if key not in state:
                raise ValueError(f"{path}: tensor {key} is missing")
    hint = model_parallel_hint(hf, str(path / "config.json"))
    shards = None
    if family in (None, "trilm"):
        shards = detect_scale_shards(state, base.n_layers, hint)
        if shards is None and hint is not None and family is None:
            shards = detect_scale_shards(state, base.n_layers)  # the recorded MP may be a training-time detail
        if shards is None and family == "trilm":
            ternary_from_unpacked(
                state["model.layers.0.self_attn.q_proj.weight"], hint or 1, 0, "model.layers.0.self_attn.q_proj.weight"
            )
            raise ValueError(f"{path}: the block matrices are not ternary with {hint or 'any'} scale shards")
    return base.replace(family="trilm", num_scale_shards=shards) if shards else base


def load_hf(
    path: str | os.PathLike,
    *,
    device="cpu",
    dtype: torch.dtype | None = None,
    family: str | None = None,
) -> nn.Module:
    """A Llama directory -> our Transformer. family=None detects an unpacked TriLM; "trilm" requires one. GPTQ
    directories (a `quantization_config`) are `spectra.ptq.formats.load_quantlm`'s (`spectra.load` picks)."""
    path = Path(path)
    hf = read_hf_config(path)
    if hf.get("quantization_config"):
        raise FormatError(f"{path / 'config.json'} has a quantization_config: it is a GPTQ QuantLM, which "
                          "spectra.load (spectra.ptq.formats.load_quantlm) reads")
    source = str(path / "config.json")
    base = config_from_hf(hf, source)  # validates before reading weights
    state = read_hf_weights(path)
    if "lm_head.weight" not in state:
        if not hf.get("tie_word_embeddings", False):
            raise ValueError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    cfg = hf_model_config(path, hf, base, state, family)
    shards = cfg.num_scale_shards if cfg.family == "trilm" else None
    model = empty_model(cfg, device)
    plain = {k.removeprefix("model."): v.float() for k, v in state.items()}
    ternary = {}
    if shards:
        for name, module in model.named_modules():
            if isinstance(module, TernaryLinear):
                key = f"{name}.weight"
                ternary[name] = ternary_from_unpacked(plain[key], shards, module.shard_dim, f"model.{key}")
    load_state_checked(model, plain, str(path))
    if dtype is not None:
        model.to(dtype)
    for name, (codes, scales) in ternary.items():  # after the dtype change: the exact cache is kept per dtype
        model.get_submodule(name).set_exact(codes.to(device), scales.to(device))
    return model.eval()
