"""Training configuration: `TrainConfig`, the paper's per-size defaults, TOML run files and `--key=value` overrides.

Paper values (Spectra §3, Table 3): AdamW β = (0.9, 0.95); FloatLM 2M-token and TriLM 1M-token batches of 2048-token
sequences; FloatLM warmup + cosine decay; TriLM warmup + linear decay, peak LR dropped at ½ of training to the second
value of the table and weight decay removed at ⅔. The paper does not state warmup, minimum LR, weight decay,
gradient clipping or Adam ε [GAP]; we use Pythia-style 1% warmup, a floor of 10% of peak, weight decay 0.1,
clipping at 1.0 and ε = 1e-8.

Fields left `None` take the default for the model's size and family (`resolve`). A run file is TOML with a `[model]`
table (`size = "trilm-99m"` plus any ModelConfig field) and a `[train]` table; `--train.lr=1e-3` or
`--model.norm=layernorm` override single values (`--lr=1e-3` means `--train.lr`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from spectra.config import ModelConfig, check_field_types, check_seed, dataclass_from_dict, from_name

# size: FloatLM peak LR, TriLM peak LR first half, TriLM peak LR second half (P1 Table 3). Non-paper CPU sizes: our
# choice, following the table's trend (small models tolerate larger LRs; TriLM ≈ 6x FloatLM, second peak ≈ 0.63x).
LR_TABLE: dict[str, tuple[float, float, float]] = {
    "1m": (2.0e-3, 6.0e-3, 4.0e-3),
    "3m": (2.0e-3, 3.0e-3, 2.0e-3),
    "6m": (1.0e-3, 2.0e-3, 1.3e-3),  # measured (4e5 tokens, 2048-token steps): FloatLM-6m 5.145 at 2e-3, 4.921 at 1e-3
    "tiny": (2.0e-3, 6.0e-3, 4.0e-3),
    "4m": (2.0e-3, 3.0e-3, 2.0e-3),  # measured: TriLM-4m at 6e-3 reached val loss 5.49, at 3e-3 5.15 (4e5 tokens)
    "5m": (1.5e-3, 5.0e-3, 3.2e-3),
    "20m": (8.0e-4, 3.6e-3, 2.3e-3),
    "99m": (4.0e-4, 2.4e-3, 1.5e-3),
    "190m": (4.0e-4, 2.4e-3, 1.5e-3),
    "390m": (3.0e-4, 1.8e-3, 1.2e-3),
    "560m": (2.8e-4, 1.6e-3, 1.1e-3),
    "830m": (2.5e-4, 1.5e-3, 1.0e-3),
    "1.1b": (2.2e-4, 1.3e-3, 9.0e-4),
    "1.5b": (2.0e-4, 1.2e-3, 8.0e-4),
    "2.4b": (2.0e-4, 1.2e-3, 8.0e-4),
    "3.9b": (1.5e-4, 1.2e-3, 8.0e-4),
}
PAPER_BATCH_TOKENS = {"floatlm": 2 * 1024 * 1024, "trilm": 1024 * 1024}
PAPER_SEQ_LEN = 2048
CPU_SIZES = ("1m", "3m", "6m", "tiny", "4m", "5m", "20m")
CPU_BATCH_TOKENS = 16 * 1024
CPU_SEQ_LEN = 256

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear")
PARALLEL = ("ddp", "fsdp")
LOGGERS = ("wandb", "tensorboard")
WARMUP_SHAPES = ("linear", "sigmoid")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything about a training run except the model. `None` means the size/family default (see `resolve`)."""

    data: str = "builtin"  # 'builtin', a local file/folder, 'hf:NAME[:CONFIG]', or a shard folder
    tokenizer: str | None = None  # 'builtin', 'bpe:N' (train N ids on data), a tokenizer.json / model folder;
    # None: the init checkpoint's tokenizer, else 'builtin'
    fit_vocab: bool = False  # set model.vocab_size = pad_vocab(tokenizer size, MP) instead of the size's default
    tokens: float = 1e6  # total training tokens
    batch_tokens: int | None = None  # tokens per optimizer step, all ranks and micro-batches together
    seq_len: int | None = None
    micro_batch: int = 8  # sequences per forward/backward on one rank; accumulation makes up batch_tokens
    # optimizer
    lr: float | None = None  # peak LR (TriLM: of the first stage)
    lr2: float | None = None  # TriLM: peak LR after the drop (unset: the size's table value, or with `lr` given,
    #                           lr times the table's lr2 / lr at this size, so that the drop stays a drop)
    min_lr_ratio: float = 0.1  # LR at the end of decay, as a fraction of the current peak
    warmup: float = 0.01  # warmup length: a fraction of all steps if < 1, else a number of steps
    schedule: str | None = None  # 'cosine' (FloatLM) or 'linear' (TriLM)
    lr_drop: bool | None = None  # TriLM: drop the peak LR to lr2 at lr_drop_at
    lr_drop_at: float = 0.5
    wd_removal: bool | None = None  # TriLM: weight decay -> 0 at wd_removal_at
    wd_removal_at: float = 2 / 3
    weight_decay: float = 0.1  # on 2-D matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # numerics and speed
    # 'bf16' autocast (FSDP: bf16 parameters, fp32 reductions), 'fp16' autocast + dynamic loss scaling, or 'fp32';
    # None: bf16 for the paper's sizes on CUDA, else fp32 (`spectra.train.dist.device_defaults`)
    precision: str | None = None
    compile: bool = False
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda'
    reuse_heap: bool = True  # CPU, Linux/glibc: keep freed memory for the next step (`trainer.reuse_freed_memory`)
    # world size > 1: 'ddp' or 'fsdp' (FSDP2); None: fsdp for the paper's sizes on CUDA, else ddp
    parallel: str | None = None
    activation_checkpointing: bool = False  # keep only each block's input for backward, recompute the block
    # TriLM: ternary layers rebuild W̃ in backward instead of keeping it (`spectra.layers.TernaryLinear`); None: on
    # for FSDP or CUDA runs without activation checkpointing or compile, off otherwise (CPU stays as it was)
    recompute_ternary: bool | None = None
    tp: int = 1  # tensor parallelism: ranks per tensor-parallel group (Megatron layout, `spectra.train.tp`)
    # refuse a run whose memory plan exceeds this many GB per rank (None: the device's memory; 0: no check)
    memory_limit_gb: float | None = None
    seed: int = 0
    # evaluation, logging, checkpoints
    val_every: float = 0.1  # validation: a fraction of the run if < 1, else every N steps; 0 only at the end
    val_tokens: int = 65536
    log_every: int = 1
    loggers: list[str] = field(default_factory=list)  # 'wandb' and/or 'tensorboard'
    ckpt_every_tokens: float = 0.0  # resumable checkpoint every N tokens (0: only the final one)
    ckpt_keep: int = 2  # how many of the latest resumable checkpoints to keep
    ckpt_log_until: float = 0.0  # milestones at steps 1, 2, 4, 8, ... while tokens <= this (0: none)
    ckpt_milestone_tokens: float = 0.0  # milestones every N tokens (kept forever, 0: none)
    max_bad_steps: int = 10  # this many non-finite losses in a row abort the run
    # starting from a checkpoint (spectra.train.init), FloatLM -> TriLM warm-up, distillation (spectra.train.distill)
    init: str | None = None  # a model directory spectra opens, or a run directory (its final model)
    quant_warmup_tokens: float = 0.0  # TriLM: W_used = W + λ(Q(W) − W), λ 0 -> 1 over this many tokens (0: λ = 1)
    quant_warmup_shape: str = "linear"  # 'linear' or 'sigmoid'
    teacher: str | None = None  # a model directory spectra opens: adds kd_weight · KL(teacher ‖ student)
    kd_weight: float = 1.0
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        if not self.tokens or self.tokens <= 0:
            raise ValueError(f"train.tokens must be positive, got {self.tokens!r}")
        for f in ("batch_tokens", "seq_len", "eps"):  # None: the size's default
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ValueError(f"train.{f} must be > 0 (or unset for the size's default), got {getattr(self, f)!r}")
        for f in ("lr", "lr2", "warmup", "weight_decay", "grad_clip", "val_every", "ckpt_every_tokens",
                  "ckpt_log_until", "ckpt_milestone_tokens", "memory_limit_gb"):  # lr 0: a run that only evaluates
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise ValueError(f"train.{f} must be >= 0, got {getattr(self, f)!r}")
        if self.warmup >= 1 and self.warmup != int(self.warmup):  # it was truncated: 2.5 warmed up over 2 steps
            raise ValueError(f"train.warmup must be a fraction of the run below 1 or a whole number of steps, "
                             f"got {self.warmup!r}")
        check_seed(self.seed, "train.seed")
        for f in ("beta1", "beta2"):
            if not 0 <= getattr(self, f) < 1:
                raise ValueError(f"train.{f} must lie in [0, 1), got {getattr(self, f)!r}")
        for f in ("micro_batch", "val_tokens", "log_every", "ckpt_keep", "max_bad_steps", "tp"):  # ints: checked above
            if getattr(self, f) <= 0:
                raise ValueError(f"train.{f} must be a positive integer, got {getattr(self, f)!r}")
        for f, allowed in (("precision", PRECISIONS), ("parallel", PARALLEL)):
            if getattr(self, f) is not None and getattr(self, f) not in allowed:
                raise ValueError(f"train.{f} must be one of {allowed}, got {getattr(self, f)!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for f in ("lr_drop_at", "wd_removal_at", "min_lr_ratio"):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"train.{f} must lie in [0, 1], got {getattr(self, f)!r}")
        if self.quant_warmup_shape not in WARMUP_SHAPES:
            raise ValueError(f"train.quant_warmup_shape must be one of {WARMUP_SHAPES}, "
                             f"got {self.quant_warmup_shape!r}")
        if not self.quant_warmup_tokens >= 0:
            raise ValueError(f"train.quant_warmup_tokens must be >= 0, got {self.quant_warmup_tokens!r}")
        if self.quant_warmup_tokens > self.tokens:
            raise ValueError(f"train.quant_warmup_tokens ({self.quant_warmup_tokens:g}) exceeds train.tokens "
                             f"({self.tokens:g}): the run would end before the model is fully quantized")
        if self.kd_weight < 0:
            raise ValueError(f"train.kd_weight must be a number >= 0, got {self.kd_weight!r}")
        if self.kd_temperature <= 0:
            raise ValueError(f"train.kd_temperature must be a number > 0, got {self.kd_temperature!r}")
        bad = [x for x in self.loggers if x not in LOGGERS]
        if bad:
            raise ValueError(f"train.loggers: unknown {bad}; accepted: {LOGGERS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d)


def size_of(cfg: ModelConfig) -> str | None:
    """The size key ('99m', 'tiny') of a named config, or None for a custom one."""
    if cfg.name and "-" in cfg.name:
        size = cfg.name.split("-", 1)[1]
        return size if size in LR_TABLE else None
    return None


def table_size(model_cfg: ModelConfig) -> str:
    """The LR_TABLE row of a config: its size, or for a custom config the nearest row by width x depth."""
    size = size_of(model_cfg)
    if size is None:
        size = "tiny" if model_cfg.dim * model_cfg.n_layers <= 256 * 6 else "99m"
    return size


def resolve(model_cfg: ModelConfig, cfg: TrainConfig) -> TrainConfig:
    """Fill every `None` field with the default for the model's size and family (precision and parallel, which
    depend on the device, are filled by `spectra.train.dist.device_defaults`)."""
    trilm = model_cfg.family == "trilm"
    size = table_size(model_cfg)
    float_lr, tri_lr, tri_lr2 = LR_TABLE[size]
    small = size in CPU_SIZES
    seq_len = cfg.seq_len or (min(CPU_SEQ_LEN, model_cfg.max_seq_len) if small else PAPER_SEQ_LEN)
    batch = cfg.batch_tokens or (CPU_BATCH_TOKENS if small else PAPER_BATCH_TOKENS[model_cfg.family])
    out = dataclasses.replace(
        cfg,
        seq_len=seq_len,
        batch_tokens=batch,
        tokenizer=cfg.tokenizer if cfg.tokenizer is not None else "builtin",
        lr=cfg.lr if cfg.lr is not None else (tri_lr if trilm else float_lr),
        # a FloatLM asked for the drop without lr2 drops by the table's TriLM ratio (lr2 = lr made it do nothing)
        lr2=cfg.lr2 if cfg.lr2 is not None else (
            (tri_lr2 if cfg.lr is None else cfg.lr * tri_lr2 / tri_lr) if trilm
            else (cfg.lr if cfg.lr is not None else float_lr) * (tri_lr2 / tri_lr if cfg.lr_drop else 1.0)),
        schedule=cfg.schedule or ("linear" if trilm else "cosine"),
        lr_drop=cfg.lr_drop if cfg.lr_drop is not None else trilm,
        wd_removal=cfg.wd_removal if cfg.wd_removal is not None else trilm,
    )
    if out.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"train.seq_len {out.seq_len} exceeds model.max_seq_len {model_cfg.max_seq_len}")
    return out


# ---- run files and overrides -------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def parse_value(text: str, type_name: str, key: str) -> Any:
    """'1e-3' -> float, '2e9' -> int for int fields, 'true' -> bool, 'a,b' -> list; errors name the key."""
    t = type_name.replace(" ", "")
    if text.lower() in ("none", "null") and "None" in t:
        return None
    try:
        if t.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if t.startswith("int"):
            try:  # exactly, first: through float 123456789012345678 became ...680 and 2^63 - 1 became 2^63
                return int(text)
            except ValueError:
                pass
            v = float(text)  # 2e9, 1.6e4
            if not math.isfinite(v) or v != int(v):  # int(inf) is an OverflowError, not this one-line error
                raise ValueError(text)
            return int(v)
        if t.startswith("float"):
            return float(text)
        if t.startswith("list"):
            return [x for x in text.split(",") if x]
        if t.startswith("dict"):
            import json

            return json.loads(text)
    except ValueError as e:
        raise ValueError(f"--{key}={text}: expected {type_name}") from e
    return text


def apply_overrides(model: dict[str, Any], train: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--model.x=v` / `--train.x=v` / `--x=v` (train) strings to the two raw dicts in place."""
    types = {"model": _field_types(ModelConfig), "train": _field_types(TrainConfig)}
    types["model"]["size"] = "str"
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r}: expected --section.key=value, e.g. --train.lr=1e-3")
        key, _, value = item[2:].partition("=")
        section, _, name = key.rpartition(".")
        section = section or "train"
        if section not in types:
            raise ValueError(f"override {item!r}: section must be 'model' or 'train', got {section!r}")
        name = name.replace("-", "_")
        if name not in types[section]:
            raise ValueError(f"override {item!r}: {section} has no field {name!r}; accepted: {sorted(types[section])}")
        (model if section == "model" else train)[name] = parse_value(value, types[section][name], key)


def load_run_file(path: str | os.PathLike | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw `[model]` and `[train]` tables of a TOML run file ({} and {} for None)."""
    if path is None:
        return {}, {}
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"run file {path} does not exist") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"run file {path} is not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"model", "train"})
    if extra:
        raise ValueError(f"run file {path}: unknown table(s) {extra}; accepted: [model], [train]")
    for table in ("model", "train"):
        if not isinstance(doc.get(table, {}), dict):
            raise ValueError(f"run file {path}: '{table}' must be a table ([{table}] with its fields), got "
                             f"{doc[table]!r}")
    return dict(doc.get("model", {})), dict(doc.get("train", {}))


def _number(name: str, text: str) -> float:
    """A token count given as text ("2e9", "1_000_000"), or a ValueError naming the field."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"train.{name} must be a number of tokens (e.g. 2e9), got {text!r}") from None


def build_configs(model: dict[str, Any], train: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Raw dicts -> (ModelConfig, TrainConfig). `model.size` names a size; other model keys override it. With
    `train.init` the model comes from the checkpoint and the model dict (returned as it is) holds overrides."""
    model = dict(model)
    if train.get("init") is not None:
        train = dict(train)
        for k in ("tokens", "quant_warmup_tokens"):
            if isinstance(train.get(k), str):
                train[k] = _number(k, train[k])
        return model, TrainConfig.from_dict(train)
    size = model.pop("size", None)
    if size is not None:
        model_cfg = from_name(size, **model)
    else:
        if not model:
            raise ValueError("no model given: pass --size NAME (e.g. trilm-99m), or [model] in a run file")
        model_cfg = ModelConfig.from_dict(model)
    train = dict(train)
    for k in ("tokens", "quant_warmup_tokens"):
        if isinstance(train.get(k), str):
            train[k] = _number(k, train[k])
    for k in ("batch_tokens",):
        if isinstance(train.get(k), float) and math.isfinite(train[k]):
            train[k] = int(train[k])
    return model_cfg, TrainConfig.from_dict(train)
