"""Starting a run from a trained model (`train.init`, `spectra train --init PATH`).

The start is any latent model `spectra.load` opens: a spectra model directory (`kind: model`), a Hugging Face Llama
directory (a FloatLM, or an unpacked TriLM whose exact codes and per-shard scales are recovered), or a run directory
(its `final` model). Packed TriLMs and GPTQ QuantLMs hold no trainable weights and are refused.

    model config   the checkpoint's; `model.*` values are overrides. Overrides of fields that change the weights'
                   shapes or meaning (SHAPE_FIELDS) are an error naming the field; `family` may change:
                   floatlm -> trilm   the float weights become the latent weights (see `spectra.train.warmup`)
                   trilm -> floatlm   the float weights are the TriLM's W̃ = γ·Ŵ (same function)
                   Quantizer options may change; tensors the new quantizer adds (a learnable scale) take their
                   fresh initial values. To or from bitnet158 is refused: its blocks have no norms, its linear
                   layers normalise and 8-bit-quantize their own input.
    tokenizer      the checkpoint's tokenizer.json; a `train.tokenizer` that differs from it is an error
    run            fresh optimizer, LR schedule and data order (`--resume` continues a run instead)
    provenance     `init` = {path, sha256 of the model files, ...} in run.json and in every saved model's metadata

A TriLM started from an unpacked checkpoint keeps its exact codes and scales: its latent weight is set so that the
quantizer, as the training forward pass computes it, gives back exactly those codes and scales (`exact_latent`),
with a per-shard scale offset of a float step where no float32 absmean reaches a float16/bfloat16 scale.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.config import ModelConfig
from spectra.files import META_FILE, TOKENIZER_FILE, find_tokenizer, read_meta
from spectra.layers import TernaryLinear
from spectra.quantizers import adopt_scale_offsets
from spectra.ternary import EPS

# ModelConfig fields whose change would not fit the checkpoint's tensors (or would change what they mean)
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "glu_dim", "vocab_size", "head_dim", "norm", "mlp_act")
FINAL_DIR = "final"

log = logging.getLogger(__name__)


@dataclass
class InitStart:
    model: nn.Module  # in train mode, float32, on CPU
    config: ModelConfig
    tokenizer: Path
    record: dict[str, Any]


def resolve_model_dir(path: str | os.PathLike, *, what: str = "train.init") -> Path:
    """The model directory a path names: itself, or a run directory's final model. Refuses what cannot be trained."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist (expected a spectra or Hugging Face model directory, "
                                "or a run directory)")
    if not p.is_dir():
        raise ValueError(f"{what} {p} is a file; expected a model directory ({META_FILE} or config.json) or a run "
                         "directory")
    if (p / "run.json").exists() and not (p / META_FILE).exists():
        final = p / FINAL_DIR
        if not (final / META_FILE).exists():
            ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
            hint = f"; start from one of its checkpoints, e.g. {ckpts[-1]}" if ckpts else ""
            raise ValueError(f"{what} {p} is a run directory without a final model (the run has not finished){hint}")
        p = final
    if (p / META_FILE).exists():
        kind = read_meta(p).get("kind")
        if kind == "packed":
            raise ValueError(f"{what} {p} is a packed TriLM, which keeps no latent weights to train; start from the "
                             "latent TriLM it was packed from, or from an unpacked Hugging Face TriLM directory")
        if kind == "quantlm":
            raise ValueError(f"{what} {p} is a GPTQ QuantLM, whose rounded weights cannot be trained; start from the "
                             "FloatLM it was quantized from")
        if kind not in ("model", "checkpoint"):
            raise ValueError(f"{p / META_FILE}: unknown kind {kind!r}; {what} accepts a latent model (kind 'model') "
                             "or a run's distributed checkpoint (kind 'checkpoint')")
        return p
    if (p / "config.json").exists():
        from spectra.interop.hf import read_hf_config

        if read_hf_config(p).get("quantization_config"):
            raise ValueError(f"{what} {p} is a quantized (GPTQ) Hugging Face checkpoint, whose rounded weights "
                             "cannot be trained; start from the float model it was quantized from")
        return p
    raise ValueError(f"{what} {p} is neither a spectra model directory ({META_FILE}), a Hugging Face one "
                     "(config.json), nor a run directory (run.json)")


def model_files(model_dir: Path) -> list[Path]:
    """The files that define a model directory: weights, config and tokenizer."""
    names = {META_FILE, "config.json", TOKENIZER_FILE}
    return sorted(f for f in model_dir.iterdir() if f.is_file() and (f.name in names or f.suffix == ".safetensors"))


def content_hash(model_dir: Path) -> str:
    """sha256 over (name, bytes) of `model_files`, in name order."""
    h = hashlib.sha256()
    for f in model_files(model_dir):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def target_config(base: ModelConfig, overrides: dict[str, Any] | ModelConfig | None, source: str) -> ModelConfig:
    """The checkpoint's config with `overrides` applied; an override of a SHAPE_FIELDS field is an error."""
    if overrides is None:
        return base
    if isinstance(overrides, ModelConfig):
        overrides = overrides.to_dict()
    overrides = dict(overrides)
    size = overrides.pop("size", None)
    if size is not None:
        from spectra.config import from_name

        overrides = {**from_name(size).to_dict(), **overrides}
    have = base.to_dict()
    for field in SHAPE_FIELDS:
        if field in overrides and overrides[field] != have[field] and not (field == "head_dim"
                                                                           and overrides[field] is None):
            raise ValueError(f"model.{field}={overrides[field]!r} differs from the init checkpoint {source} "
                             f"({field}={have[field]!r}); a model started from a checkpoint keeps its shapes, so "
                             f"drop the model.{field} override")
    changes = {k: v for k, v in overrides.items() if k not in SHAPE_FIELDS}
    if "family" in changes and changes["family"] != base.family and "name" not in changes and base.name:
        family, _, size_name = base.name.partition("-")
        if family == base.family and size_name:
            changes["name"] = f"{changes['family']}-{size_name}"
    if changes.get("family", base.family) == "floatlm" and base.family == "trilm":
        changes.setdefault("num_scale_shards", 1)
    if changes.get("family", base.family) == "trilm" and base.family == "floatlm" and "num_scale_shards" not in changes:
        from spectra.config import SIZES  # a TriLM of a named size: one scale per model-parallel shard, as trained

        size_name = str(changes.get("name") or base.name or "").partition("-")[2]
        if size_name in SIZES:
            changes["num_scale_shards"] = SIZES[size_name]["mp"]
    target = base.replace(**changes)
    if _own_input_norms(target) != _own_input_norms(base):
        raise ValueError(
            f"init checkpoint {source}: converting {'from' if _own_input_norms(base) else 'to'} bitnet158 is refused: "
            "BitNet b1.58 blocks have no norms of their own and normalise and 8-bit-quantize each linear layer's "
            "input, which the other model cannot carry; train a bitnet158 model from scratch")
    return target


def _own_input_norms(cfg: ModelConfig) -> bool:
    """Whether the config's linear layers normalise their own input (BitNet b1.58) in place of the blocks' norms."""
    from spectra.quantizers import QUANTIZER_CLASSES

    return cfg.family == "trilm" and QUANTIZER_CLASSES[cfg.quantizer].input_norm


def load_source(model_dir: Path) -> tuple[nn.Module, str]:
    """(model, 'spectra' | 'hf') for a directory `resolve_model_dir` accepted."""
    if (model_dir / META_FILE).exists():
        from spectra.checkpoint import load_model_dir
        from spectra.train.state import load_checkpoint_model

        if read_meta(model_dir).get("kind") == "checkpoint":  # FSDP / tensor-parallel shards, gathered here
            return load_checkpoint_model(model_dir), "spectra"
        return load_model_dir(model_dir), "spectra"
    from spectra.interop.hf import load_hf

    return load_hf(model_dir), "hf"


def convert(source: nn.Module, cfg: ModelConfig, *, seed: int, exact: bool) -> nn.Module:
    """A model of config `cfg` holding `source`'s weights (module docstring). `exact`: keep the source TriLM's exact
    codes and scales (`exact_latent`)."""
    from spectra.model import build_model

    target = build_model(cfg, seed=seed)
    src_state = source.state_dict()
    if source.config.family == "trilm" and cfg.family == "floatlm":
        for name, module in source.named_modules():
            if isinstance(module, TernaryLinear):
                src_state[f"{name}.weight"] = module.quantized_weight().float()
    adopt_scale_offsets(target, src_state)  # a TriLM source's exact-scale offsets travel with its latent weights
    state = target.state_dict()
    for k, v in src_state.items():
        if k not in state:
            if ".quantizer." in k or ".input_norm." in k:  # the source quantizer's own tensors
                continue
            raise ValueError(f"init checkpoint tensor {k} has no place in a {cfg.family} model")
        if tuple(v.shape) != tuple(state[k].shape):
            if ".quantizer." in k:  # a learnable scale per shard, and the shard count changed: keep fresh
                continue
            raise ValueError(f"init checkpoint tensor {k} has shape {tuple(v.shape)}, the model needs "
                             f"{tuple(state[k].shape)}")
        state[k] = v.to(state[k].dtype)
    target.load_state_dict(state)
    if exact:
        offsets = 0
        for name, module in target.named_modules():
            if isinstance(module, TernaryLinear):
                codes, scales = source.get_submodule(name).codes_and_scales()
                offsets += exact_latent(module, codes, scales) > 0
        if offsets:
            log.info("init: %d ternary layer(s) keep a scale offset of about one float32 step, so that their scales "
                     "equal the checkpoint's exactly (spectra.quantizers.TriLMQuantizer)", offsets)
    return target.train()


def exact_latent(layer: TernaryLinear, codes: torch.Tensor, scales: torch.Tensor, max_walk: int = 64) -> float:
    """Set the latent weight so that the layer's quantizer, as training computes it, returns exactly `codes` and
    `scales` (float32).

    Per shard the nonzero codes get magnitude m, from m = (γ − ε)/mean|Ŵ|, walked one float32 at a time until the
    computed γ is the target or lies just above it. Then one weight whose code is 0 gets a magnitude δ < γ/2 (its
    code stays 0), found by bisection: float addition is monotone, so the computed mean|W| grows with δ in steps of
    at most one float, and a few starting points m give a δ that lands exactly on γ. A shard without zero codes
    bisects instead over how many of its weights take the next float above m. Shards whose codes are all 0 stay 0
    (W̃ = 0 either way).

    The codes always come back exactly, and so do the scales. The latent weight alone reaches a scale whenever some
    float32 latent weight gives it: always for a scale the absmean formula computed in float32 (a checkpoint saved
    in float32), and for most scales rounded to float16/bfloat16. When the number of weights in a shard is not a
    power of two, the computed mean = sum/n moves in steps of up to two floats, so a rounded scale can fall between
    two reachable ones; the nearest one below it is kept and the quantizer's `scale_offset` δ makes up the rest
    exactly (`spectra.quantizers.TriLMQuantizer`: δ = γ_target − γ(W), a float step or two). Returns the largest
    relative difference the latent weight alone left (0.0: no offset was needed)."""
    n, dim = layer.num_shards, layer.shard_dim
    shard_codes = [c.contiguous() for c in codes.float().chunk(n, dim=dim)]
    target = scales.float().reshape(-1)
    m = [0.0] * n
    extra: list[tuple[str, float, int] | None] = [None] * n  # ("delta", δ, index) or ("bump", next float, count)

    def step(x: float, up: bool) -> float:  # the neighbouring float32
        t = torch.tensor(x, dtype=torch.float32)
        return torch.nextafter(t, torch.tensor(math.inf if up else 0.0)).item()

    def shard_latent(i: int) -> torch.Tensor:
        c = shard_codes[i].flatten()
        flat = c * m[i]
        if extra[i] is not None:
            how, value, count = extra[i]
            if how == "delta":
                flat[count] = value
            else:
                nz = c.nonzero().flatten()[:count]
                flat[nz] = c[nz] * value
        return flat.view_as(shard_codes[i])

    def evaluate() -> torch.Tensor:
        with torch.no_grad():
            layer.weight.copy_(torch.cat([shard_latent(i) for i in range(n)], dim=dim))
        got_codes, got = layer.quantizer.codes_and_scales(layer.weight)
        if not torch.equal(got_codes.to(torch.int8), codes.to(torch.int8)):
            raise ValueError(f"the quantizer ({layer.quantizer.name}) does not map the latent weight back to the "
                             "checkpoint's codes; exact codes are kept for the absmean (trilm) quantizer only")
        return got.float().reshape(-1)

    def bisect(i: int, make, lo: float, hi: float, integer: bool) -> bool:
        """Find x in [lo, hi] with γ_i(make(x)) = target, γ_i increasing in x and γ_i(lo) < target < γ_i(hi)."""
        for _ in range(100):
            if (hi - lo <= 1) if integer else (hi <= step(lo, True)):
                return False
            mid = (lo + hi) // 2 if integer else float(torch.tensor((lo + hi) / 2, dtype=torch.float32))
            extra[i] = make(mid)
            g = evaluate()[i]
            if g == target[i]:
                return True
            lo, hi = (mid, hi) if g < target[i] else (lo, mid)
        return False

    for i, c in enumerate(shard_codes):
        nnz = int((c != 0).sum())
        m[i] = float((target[i] - EPS).clamp(min=0) / (nnz / c.numel())) if nnz else 0.0
    for i in range(n):  # shards are independent: each one's γ depends on its own weights only
        c = shard_codes[i]
        nnz = int((c != 0).sum())
        if nnz == 0:
            continue
        got = evaluate()[i]
        for _ in range(max_walk):  # walk m to the largest float whose γ is below the target
            if got == target[i]:
                break
            up = bool(got < target[i])
            nxt = step(m[i], up)
            m_prev, m[i] = m[i], nxt
            got_next = evaluate()[i]
            if up and got_next > target[i]:
                m[i] = m_prev
                got = evaluate()[i]
                break
            got = got_next
        if got == target[i]:
            continue
        if got > target[i]:
            raise ValueError(f"could not bracket the scale {target[i].item()!r} of shard {i}")
        zeros = (c.flatten() == 0).nonzero().flatten()
        m_walked = m[i]
        found = False
        for _ in range(16):  # a few starting points m (each shifts the set of reachable means)
            if zeros.numel():
                z = int(zeros[0])
                half = 0.49 * float(target[i])
                extra[i] = ("delta", half, z)
                if evaluate()[i] < target[i]:  # δ cannot reach it from this m: step m up
                    extra[i] = None
                    m[i] = step(m[i], True)
                    if evaluate()[i] == target[i]:
                        found = True
                        break
                    continue
                found = bisect(i, lambda d, z=z: ("delta", d, z), 0.0, half, integer=False)
            else:
                hi = step(m[i], True)
                found = bisect(i, lambda k, hi=hi: ("bump", hi, int(k)), 0, nnz, integer=True)
            if found:
                break
            extra[i] = None
            m[i] = step(m[i], False)
        if not found:  # no float32 mean lands on γ (module docstring): the nearest one below it
            extra[i], m[i] = None, m_walked
    got = evaluate()
    live = torch.tensor([bool((c != 0).any()) for c in shard_codes])
    rel = ((got - target).abs() / target.clamp(min=1e-30))[live]
    worst = float(rel.max()) if rel.numel() else 0.0
    if worst > 0:
        layer.quantizer.scale_offset = torch.where(live, target - got, torch.zeros_like(got))
        got = evaluate()
        if not torch.equal(got[live], target[live]):
            raise ValueError(f"could not reproduce the scales {target.tolist()} exactly (got {got.tolist()})")
    return worst


def open_init(path: str | os.PathLike, overrides: dict[str, Any] | ModelConfig | None, tokenizer: str | None, *,
              fit_vocab: bool = False, seed: int = 0, load_weights: bool = True) -> InitStart:
    """Open `path` as the start of a run: check it, build the model to train (module docstring), pick the tokenizer.
    Every error is raised here, before any training step."""
    from spectra.data.tokenizer import load_tokenizer, resolve_tokenizer, tokenizer_hash, vocab_size

    model_dir = resolve_model_dir(path)
    source, kind = load_source(model_dir)
    base: ModelConfig = source.config
    cfg = target_config(base, overrides, str(model_dir))

    ckpt_tok = find_tokenizer(model_dir)
    if tokenizer is None:
        if ckpt_tok is None:
            raise ValueError(f"train.init {model_dir} has no tokenizer.json; pass train.tokenizer=PATH, the tokenizer "
                             "the checkpoint was trained with")
        tok_path = ckpt_tok
    else:
        if str(tokenizer).startswith("bpe:"):
            raise ValueError(f"train.tokenizer={tokenizer!r} would train a new tokenizer, but a model started from "
                             f"{model_dir} must keep its tokenizer; drop train.tokenizer")
        tok_path = resolve_tokenizer(tokenizer, "builtin", model_dir)
        if ckpt_tok is not None and tokenizer_hash(tok_path) != tokenizer_hash(ckpt_tok):
            raise ValueError(f"train.tokenizer {tok_path} differs from the tokenizer of the init checkpoint "
                             f"{ckpt_tok} (sha256 {tokenizer_hash(tok_path)[:12]} vs {tokenizer_hash(ckpt_tok)[:12]}); "
                             "a model keeps the tokenizer it was trained with: drop train.tokenizer")
    if fit_vocab:
        from spectra.config import pad_vocab

        fitted = pad_vocab(vocab_size(load_tokenizer(tok_path)), cfg.num_scale_shards)
        if fitted != cfg.vocab_size:
            raise ValueError(f"train.fit_vocab would set vocab_size {fitted}, but the init checkpoint {model_dir} "
                             f"has {cfg.vocab_size}; drop train.fit_vocab (the checkpoint fixes the vocabulary)")

    conversion = None if cfg.family == base.family else f"{base.family}->{cfg.family}"
    exact = (kind == "hf" and base.family == "trilm" and cfg.family == "trilm" and cfg.quantizer == "trilm"
             and not cfg.quantizer_options and cfg.num_scale_shards == base.num_scale_shards)
    model = convert(source, cfg, seed=seed, exact=exact) if load_weights else source
    record = {"path": str(model_dir.resolve()), "given": str(path), "format": kind, "sha256": content_hash(model_dir),
              "files": [f.name for f in model_files(model_dir)], "family": base.family, "conversion": conversion}
    return InitStart(model=model, config=cfg, tokenizer=Path(tok_path), record=record)
