"""Pretraining FloatLMs and TriLMs (Spectra §3): `train(model_cfg, train_cfg, out_dir=...) -> metrics`.

One optimizer step consumes `batch_tokens` tokens = G sequences of T tokens, G = world · accum · micro_batch. The
sequences of step s are numbers s·G … (s+1)·G − 1 of the run's `SequenceSampler`; rank r, micro-step j takes
micro_batch of them starting at s·G + (r·accum + j)·micro_batch, so the same global batch gives the same update on
1 or N processes. The loss is the token-mean cross-entropy; each micro-batch's loss is divided by accum and DDP
averages over ranks, so the gradient is that of the mean over all G·T tokens.

AdamW with β = (0.9, 0.95) decays 2-D matrices only (embeddings, lm_head and every linear weight; norms are not
decayed). Gradients are clipped to `grad_clip` in global L2 norm. LR and weight decay follow `schedule.py` and are set
before every step; `spectra.quantizers.set_progress(model, tokens_seen / total_tokens)` is called every step for
progressive quantizers. A non-finite loss (or gradient norm) skips the update and is counted; `max_bad_steps` in a
row raise `TrainingDiverged`, leaving the last good checkpoint as it was. With fp16 the GradScaler skips overflowing
steps itself; those are counted from the loss-scale drops.

A run can start from a trained model instead of random weights (`train.init`, `spectra.train.init`), turn a FloatLM
into a TriLM with a quantization warm-up (`spectra.train.warmup`) and distil from a frozen teacher
(`spectra.train.distill`); the logged `loss` stays the cross-entropy, the distillation term is logged as `kd_loss`.

Resuming restores weights, optimizer, loss scaler, RNG states and the data position, so a resumed run reproduces the
uninterrupted run's losses exactly (same device, thread count and world size).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.checkpoint import save_model
from spectra.config import ModelConfig, pad_vocab
from spectra.data.shards import SequenceSampler, TokenStream, is_shard_dir, prepare_shards, read_manifest
from spectra.data.tokenizer import check_vocab, eos_id, load_tokenizer, resolve_tokenizer, tokenizer_hash, vocab_size
from spectra.files import finite_json, read_json, write_json
from spectra.layers import set_recompute_weight
from spectra.model import build_model
from spectra.quantizers import Quantizer, set_progress
from spectra.train import dist, memory, tp
from spectra.train.config import TrainConfig, resolve
from spectra.train.distill import load_teacher
from spectra.train.init import open_init
from spectra.train.loss import kernel_paths, lm_loss
from spectra.train.schedule import make_schedule
from spectra.train.state import (
    apply_retention,
    is_distributed_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_distributed_checkpoint,
    read_checkpoint_state,
    rng_state,
    save_distributed_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from spectra.train.warmup import set_quant_mix, warmup_lambda

log = logging.getLogger(__name__)

# TrainConfig fields a resumed run must keep: its checkpoints count steps and data positions in them
RESUME_FIXED = ("batch_tokens", "seq_len", "seed", "tokens")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def reuse_freed_memory() -> bool:
    """Make the C allocator keep freed memory in the process for the next allocation: glibc's `mallopt` with
    M_MMAP_MAX = 0 (no block gets its own mapping) and M_TRIM_THRESHOLD = 2 GiB (the heap is not shrunk).

    A training step allocates and frees the same large tensors every time (logits and their gradient, bf16 copies of
    the weights, parameter gradients). By default glibc gives blocks of 32 MiB and more their own fresh mapping and
    returns trimmed memory to the kernel, so every step touches new pages, and each first touch is a page fault that
    the kernel serves by zeroing a page: 180,000 faults and 0.45 s of system time per 99m step on one core (of 3.6 s),
    none once this is set. The price: the process keeps its peak heap until it exits. Returns whether it was applied
    (False off glibc, e.g. macOS or musl). Affects the whole process, so `train` only calls it for CPU runs with
    `train.reuse_heap` (the default)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile every transformer block and the final norm in place. The blocks share one compiled graph
    (weights are graph inputs), so compile time does not grow with depth, and state-dict names stay those of the
    plain model. Pair with `loss_function`."""
    for layer in model.layers:
        layer.compile()
    model.norm.compile()
    return model


def loss_function(device: torch.device, compile_loss: bool):
    """The loss the trainer calls: `lm_loss` (on CPU, the fused kernel of `spectra.train.loss`), compiled by
    torch.compile where that is the torch formula (GPUs, or no compiled extension) and `compile_loss` is set."""
    if compile_loss and not (device.type == "cpu" and kernel_paths()):
        return torch.compile(lm_loss)
    return lm_loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim != 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": other, "weight_decay": 0.0, "decay": False},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kw: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    # fused AdamW runs one kernel over all tensors on CPU and CUDA (fewer passes over memory than foreach); tensor
    # parallelism without FSDP mixes DTensor and plain parameters, which only the per-tensor loop accepts
    if cfg.tp > 1:
        kw["foreach"] = False
    else:
        kw["fused"] = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kw)


def checkpoint_plan(cfg: TrainConfig, total_steps: int, tokens_per_step: int) -> tuple[set[int], set[int]]:
    """(resumable steps, milestone steps), counted in completed steps 1 … total_steps. The last step is always
    saved. Milestones: steps 1, 2, 4, … while tokens ≤ ckpt_log_until, then every ckpt_milestone_tokens."""

    def crossings(every: float) -> set[int]:
        if every <= 0:
            return set()
        return {s for s in range(1, total_steps + 1)
                if math.floor(s * tokens_per_step / every) > math.floor((s - 1) * tokens_per_step / every)}

    milestones = crossings(cfg.ckpt_milestone_tokens)
    s = 1
    while s <= total_steps and s * tokens_per_step <= cfg.ckpt_log_until:
        milestones.add(s)
        s *= 2
    return crossings(cfg.ckpt_every_tokens) | {total_steps}, milestones


def _every(value: float, total_steps: int) -> int:
    if value <= 0:
        return total_steps
    return max(1, round(value * total_steps)) if value < 1 else int(value)


class _MetricLoggers:
    """metrics.jsonl plus wandb / tensorboard when asked for (rank 0 only)."""

    def __init__(self, run_dir: Path, names: list[str], config: dict) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb = self.tb = None
        if "wandb" in names:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.loggers has 'wandb' but wandb is not installed: pip install wandb") from e
            try:
                self.wandb = wandb.init(project="spectra", name=run_dir.name, config=config, dir=str(run_dir))
            except wandb.errors.Error as e:  # no API key (and no WANDB_MODE): wandb's UsageError, a traceback
                self.file.close()
                raise ValueError(f"train.loggers has 'wandb', which could not start: {str(e).splitlines()[0]} (run "
                                 "`wandb login`, or set WANDB_MODE=offline to log locally)") from None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.loggers has 'tensorboard' but it is not installed: "
                                  "pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        prefix = "val/" if row.get("split") == "val" else "train/"
        scalars = {prefix + k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def train(
    model_cfg: ModelConfig | dict[str, Any] | None,
    train_cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain a model; returns the final metrics (val_loss, train_loss, tokens, steps, wall_time, tokens_per_s,
    skipped_steps, run_dir). Works the same under torchrun with any world size; only rank 0 writes. With
    `train_cfg.init`, `model_cfg` holds overrides of the checkpoint's config (a ModelConfig, a dict of fields, or None).
    """
    info = dist.init(train_cfg.device)
    run_dir = Path(out_dir)
    fresh = not run_dir.exists()
    try:
        return _train(model_cfg, train_cfg, run_dir, resume, progress, info)
    except BaseException:
        # it failed before the run began: no empty folder left behind (a BPE trained for it goes too)
        if fresh and info.is_main and not (run_dir / "run.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        dist.cleanup(info)


def _check_init_resume(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """`init` starts a new run, `resume` continues one: together only to continue a run that started from `init`."""
    if not resume:
        return
    run_file = run_dir / "run.json"
    recorded = json.loads(run_file.read_text()).get("init", {}) if run_file.exists() else {}
    same = recorded.get("given") == cfg.init
    if not same and recorded.get("sha256"):
        # the same model under another spelling or after a move (a suite's folder moved, --out relative then absolute)
        from spectra.train.init import content_hash, resolve_model_dir

        try:
            same = content_hash(resolve_model_dir(cfg.init)) == recorded["sha256"]
        except (OSError, ValueError):
            same = False
    if not same:
        raise ValueError(f"train.init ({cfg.init}) starts a new run from a checkpoint and resume continues the run in "
                         f"{run_dir}, which did not start from it; use one or the other (to continue an --init run, "
                         "resume it without --init)")


def _prepare_data(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, info: dist.DistInfo, progress: bool):
    """Tokenizer path, the (possibly vocab-fitted) model config, and the shard folder. Rank 0 builds, others wait."""

    def build():
        tok_path = resolve_tokenizer(cfg.tokenizer, cfg.data, run_dir / "data")
        if is_shard_dir(cfg.data):
            m = read_manifest(cfg.data)
            if m["tokenizer"]["sha256"] != tokenizer_hash(tok_path):
                raise ValueError(f"shards {cfg.data} were tokenized with a different tokenizer than {tok_path} "
                                 f"(sha256 {m['tokenizer']['sha256'][:12]} vs {tokenizer_hash(tok_path)[:12]})")
            return str(tok_path), str(cfg.data)
        g = cfg.batch_tokens
        shards = prepare_shards(cfg.data, tok_path, progress=progress_bar,
                                max_tokens={"train": int(cfg.tokens) + 2 * g,
                                            "validation": cfg.val_tokens + 2 * cfg.seq_len})
        return str(tok_path), str(shards)

    progress_bar = progress and info.is_main
    result, error = None, None
    if info.is_main:
        try:
            result = build()
        except Exception as e:  # any failure reaches every rank, with its message
            error = e
    result, err_msg = dist.broadcast_object((result, repr(error) if error else None), info,
                                            timeout_s=dist.DATA_TIMEOUT_S)
    if error is not None:
        raise error
    if err_msg is not None:
        raise ValueError(f"rank 0 failed to prepare data: {err_msg}")
    tok_path, shard_dir = Path(result[0]), Path(result[1])
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok, tok_path)
    if cfg.fit_vocab:
        model_cfg = model_cfg.replace(vocab_size=pad_vocab(vocab_size(tok), model_cfg.num_scale_shards))
    check_vocab(tok, model_cfg, f"tokenizer {tok_path}")
    if (model_cfg.eos_token_id, model_cfg.bos_token_id) != (eos, eos):
        model_cfg = model_cfg.replace(eos_token_id=eos, bos_token_id=eos)
    return tok_path, model_cfg, shard_dir


def check_last_stage_reached(model: nn.Module, total_steps: int) -> None:
    """A ValueError when a progressive schedule's last stage (the quantizer itself) starts after the run's last step:
    step s trains at fraction s / total_steps (`set_progress`), so the last stage is trained only if the last step's
    fraction selects it; otherwise the final model would be saved at an intermediate k-bit stage."""
    for module in model.modules():
        if isinstance(module, Quantizer) and module.stages:
            start = module.stages[-1][0]
            if module.stage_at((total_steps - 1) / total_steps) != len(module.stages) - 1:
                need = math.ceil(1 / (1 - start) - 1e-9)
                raise ValueError(f"model.quantizer_options['progressive']: the last stage starts at {start} of "
                                 f"training, which none of this run's {total_steps} step(s) reaches (the last "
                                 f"trains at {(total_steps - 1) / total_steps:.3g}); train at least {need} steps "
                                 "(raise train.tokens) or start the last stage earlier")
            return


def _train(model_cfg: ModelConfig | dict[str, Any] | None, cfg: TrainConfig, run_dir: Path, resume: bool,
           progress: bool, info: dist.DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    start = None
    if cfg.init is not None:
        _check_init_resume(cfg, run_dir, resume)
        start = open_init(cfg.init, model_cfg, cfg.tokenizer, fit_vocab=cfg.fit_vocab, seed=cfg.seed)
        model_cfg = start.config
        cfg = dataclasses.replace(cfg, tokenizer=str(start.tokenizer), fit_vocab=False)
    elif not isinstance(model_cfg, ModelConfig):
        raise ValueError("no model given: pass a ModelConfig (--size NAME), or train.init (--init PATH) to start "
                         "from a checkpoint")
    cfg = dist.device_defaults(resolve(model_cfg, cfg), model_cfg, info.device)
    tp.check(model_cfg, cfg.tp, info.world)
    dp_world, dp_rank = info.world // cfg.tp, info.rank // cfg.tp  # data-parallel groups (mesh (dp, tp))
    if cfg.tp > 1 and dp_world > 1 and cfg.parallel != "fsdp":
        raise ValueError(f"train.tp = {cfg.tp} with {dp_world} data-parallel groups needs train.parallel = 'fsdp' "
                         f"(2-D tp x dp), got {cfg.parallel!r}")
    if (run_dir / "run.json").exists() and not resume:  # every rank: a rank left waiting at the barrier printed
        # gloo's traceback around rank 0's one line
        raise ValueError(f"{run_dir} already holds a run (run.json); pass resume=True (--resume) to continue it, "
                         "or choose another out_dir")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(info)
    tok_path, model_cfg, shard_dir = _prepare_data(model_cfg, cfg, run_dir, info, progress)
    device = info.device
    if cfg.reuse_heap and device.type == "cpu" and not reuse_freed_memory():
        log.info("train.reuse_heap: this C library has no glibc mallopt; CPU memory is allocated as usual")

    # ---- batch geometry -------------------------------------------------------------------------------------
    T = cfg.seq_len
    G = cfg.batch_tokens // T
    if cfg.batch_tokens % T:
        raise ValueError(f"train.batch_tokens {cfg.batch_tokens} is not a multiple of train.seq_len {T}")
    if G < dp_world or G % dp_world:
        raise ValueError(f"train.batch_tokens {cfg.batch_tokens} = {G} sequences of {T}, which does not split "
                         f"evenly over {dp_world} data-parallel processes")
    per_rank = G // dp_world
    micro = max(d for d in range(1, min(cfg.micro_batch, per_rank) + 1) if per_rank % d == 0)
    accum = per_rank // micro
    tokens_per_step = G * T
    total_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    total_tokens = total_steps * tokens_per_step
    sched = make_schedule(cfg, total_steps)
    rolling, milestones = checkpoint_plan(cfg, total_steps, tokens_per_step)
    val_every = _every(cfg.val_every, total_steps)

    train_stream = TokenStream(shard_dir, "train")
    # the run's own windows (SequenceSampler): as many as it trains on, or all the data holds; a resumed run keeps
    # the number it started with, however the shared shard cache has grown since
    windows = min((len(train_stream) - 1) // T, total_steps * G)
    if resume and (run_dir / "run.json").exists():
        windows = json.loads((run_dir / "run.json").read_text()).get("train_windows", windows)
    sampler = SequenceSampler(train_stream, T, cfg.seed, n=windows)
    val_stream = TokenStream(shard_dir, "validation")
    n_val = min(max(1, cfg.val_tokens // T), (len(val_stream) - 1) // T)
    if n_val < 1:
        raise ValueError(f"validation split of {shard_dir} has {len(val_stream)} tokens, fewer than seq_len + 1")
    val_rows = [val_stream.get(i * T, T + 1) for i in range(dp_rank, n_val, dp_world)]
    val_batches = [(torch.from_numpy(np.stack(val_rows[i : i + micro])), True)
                   for i in range(0, len(val_rows), micro)]
    # every rank runs as many forwards (FSDP gathers parameters in each, collectively): a rank with fewer windows
    # (n_val not a multiple of the ranks) pads with forwards it does not count; a rank one batch short used to wait in
    # the all-gather while the others waited in the loss's all-reduce, until the collective timeout
    most = math.ceil(math.ceil(n_val / dp_world) / micro)  # the most batches a rank has
    val_batches += [(torch.from_numpy(val_stream.get(0, T + 1)[None]), False)] * (most - len(val_batches))
    rss_base = memory.reset_peak() if device.type == "cpu" else None  # the run's peak counts the teacher too
    teacher = None
    if cfg.teacher is not None:  # before the plan, which counts it
        teacher = load_teacher(cfg.teacher, model_cfg, tok_path, weight=cfg.kd_weight,
                               temperature=cfg.kd_temperature, device=device)
    plan = memory.plan(model_cfg, seq_len=T, micro_batch=micro, grad_accum=accum, world=info.world,
                       parallel=cfg.parallel, precision=cfg.precision,
                       activation_checkpointing=cfg.activation_checkpointing, device=device.type,
                       recompute_ternary=cfg.recompute_ternary, tp=cfg.tp,
                       teacher_params=0 if teacher is None else teacher.record["params"],
                       teacher=None if teacher is None else teacher.model.config)
    if info.is_main:
        log.info("memory plan: %s", plan.line())
    memory.check(plan, cfg.memory_limit_gb, device)

    # ---- model, optimizer, resume ---------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    raw = start.model.to(device) if start is not None else build_model(model_cfg, seed=cfg.seed, device=device)
    check_last_stage_reached(raw, total_steps)
    provenance = {"init": start.record} if start is not None else {}
    if teacher is not None:
        provenance["teacher"] = teacher.record
    start_step, data_pos, tokens_seen, skipped = 0, 0, 0, 0
    # the run's last finite loss, its training seconds and tokens, and its wall time before this process: kept in
    # every checkpoint, so a run resumed after its last one reports what an uninterrupted run does (it reported a NaN
    # train loss, 0 tok/s and the resume's own seconds)
    last_loss, train_time, trained_tokens, wall_before = float("nan"), 0.0, 0, 0.0
    resume_from = list_checkpoints(run_dir)[-1] if resume and list_checkpoints(run_dir) else None
    if resume and resume_from is None:
        log.info("%s has no checkpoint yet: starting from scratch", run_dir)
    sharded = resume_from is not None and is_distributed_checkpoint(resume_from)
    if sharded:  # model and optimizer are read after wrapping, each rank its own shards
        loaded = (None, *read_checkpoint_state(resume_from, model_cfg))
    else:
        loaded = load_checkpoint(resume_from, model_cfg) if resume_from is not None else None
    if loaded is not None:
        run = json.loads((run_dir / "run.json").read_text())
        if run.get("tokenizer_sha256") != tokenizer_hash(tok_path):
            raise ValueError(f"cannot resume {run_dir}: it was trained with another tokenizer than {tok_path}")
        for f in RESUME_FIXED:  # a checkpoint's step and data position count in them
            before = run.get("train", {}).get(f, getattr(cfg, f))
            if before != getattr(cfg, f):  # (numbers: 1000000 == 1e6)
                more = (" (the schedule and the training windows are the run's: to train further, start a new run "
                        f"from it with --init {run_dir})") if f == "tokens" else ""
                raise ValueError(f"cannot resume {run_dir}: train.{f} {getattr(cfg, f)!r} differs from the run's "
                                 f"{before!r}; a resumed run keeps its global batch, sequence length, seed and token "
                                 f"budget (its checkpoints' steps, data order and schedule){more}, so drop the "
                                 "override or choose another out_dir")
        if not sharded and (cfg.parallel != "fsdp" or info.world == 1):
            raw.load_state_dict(loaded[0])
    fsdp = cfg.parallel == "fsdp" and dp_world > 1
    set_recompute_weight(raw, cfg.recompute_ternary)
    sharded_params = fsdp or cfg.tp > 1  # no rank holds the model whole
    if cfg.compile:
        compile_blocks(raw)
    loss_fn = loss_function(device, cfg.compile)
    model = dist.wrap(raw, info, cfg.parallel, precision=cfg.precision,
                      activation_checkpointing=cfg.activation_checkpointing, tp=cfg.tp)
    opt = make_optimizer(model, cfg, device)
    how = {k: opt.defaults[k] for k in ("fused", "foreach")}
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if loaded is not None:
        weights, st, meta = loaded
        if sharded:
            load_distributed_checkpoint(resume_from, model, opt)
        elif st.get("optimizer_format", "torch") != ("fsdp" if fsdp else "torch"):
            raise ValueError(f"cannot resume from {resume_from}: its optimizer state is in "
                             f"{st.get('optimizer_format')!r} form; resume with the same train.parallel "
                             "(FSDP and DDP/single-process checkpoints store the optimizer differently)")
        elif fsdp:  # a checkpoint from before distributed checkpoints: the whole state on every rank
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=st["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(st["optimizer"])
        # how AdamW runs is this run's choice (make_optimizer), not the saving run's: a fused flag from a run
        # without tp crashed a resume with tp on its first step
        for g in opt.param_groups:
            g.update(how)
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        start_step, data_pos, tokens_seen, skipped = st["step"], st["data_position"], st["tokens"], st["skipped"]
        last_loss, train_time = float(st.get("last_loss", last_loss)), float(st.get("train_time", 0.0))
        trained_tokens, wall_before = int(st.get("trained_tokens", 0)), float(st.get("wall_time", 0.0))
        log.info("resuming %s from %s (step %d, %d tokens)", run_dir, resume_from.name, start_step, tokens_seen)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def amp():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    def no_sync(sync: bool):
        if sync or dp_world == 1:
            return contextlib.nullcontext()
        if fsdp:  # reduce-scatter every micro-batch into the sharded gradient (spectra.train.dist)
            return contextlib.nullcontext()
        return model.no_sync()

    def evaluate() -> float:
        """The validation loss of the model as it will be saved: in eval mode, where stochastic rounding rounds to
        the nearest level and draws nothing (in train mode it scored a random model and took draws from training)."""
        total = 0.0
        count = 0
        model.eval()
        try:
            with torch.no_grad():
                for b, counted in val_batches:
                    b = b.to(device)
                    with amp():
                        logits = model(b[:, :-1])
                    if counted:
                        total += loss_fn(logits, b[:, 1:]).item() * b.shape[0] * T
                        count += b.shape[0] * T
        finally:
            model.train()
        s, n = dist.all_reduce_sum([total, count], info)
        return s / n

    # ---- run directory --------------------------------------------------------------------------------------
    loggers = None
    tok_sha = tokenizer_hash(tok_path)
    if info.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        # the loggers first: one that cannot start (wandb without a key) fails before the run is recorded
        loggers = _MetricLoggers(run_dir, cfg.loggers, {"model": model_cfg.to_dict(), "train": cfg.to_dict()})
        write_json(run_dir / "run.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict(),
                                          "tokenizer": str(tok_path), "tokenizer_sha256": tok_sha,
                                          "data": str(shard_dir), "world_size": info.world,
                                          "micro_batch": micro, "grad_accum": accum, "total_steps": total_steps,
                                          "train_windows": sampler.n,
                                          "memory_plan": plan.to_dict(), **provenance})

    def save(step: int) -> None:  # every rank writes its shards (spectra.train.state)
        meta = {"step": step, "tokens": tokens_seen, "data_position": data_pos, "milestone": step in milestones,
                "tokenizer_sha256": tok_sha, "train": cfg.to_dict(), "world_size": info.world, **provenance}
        state = {"optimizer_format": "dcp", "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(),
                 "step": step, "data_position": data_pos, "tokens": tokens_seen, "skipped": skipped,
                 "last_loss": last_loss, "train_time": train_time, "trained_tokens": trained_tokens,
                 "wall_time": wall_before + time.perf_counter() - t_start}
        save_distributed_checkpoint(run_dir, model, opt, state, meta, tokenizer=tok_path, is_main=info.is_main,
                                    barrier=lambda: dist.barrier(info), whole_model=None if sharded_params else raw)
        if info.is_main:
            apply_retention(run_dir, cfg.ckpt_keep)

    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, desc=model_cfg.name or "train")

    # ---- the loop -------------------------------------------------------------------------------------------
    bad_in_row = 0
    val_loss = float("nan")
    model.train()
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            lr, wd = sched.lr_at(step), sched.wd_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
                if g["decay"]:
                    g["weight_decay"] = wd
            set_progress(raw, tokens_seen / total_tokens)
            set_quant_mix(raw, warmup_lambda(tokens_seen, cfg.quant_warmup_tokens, cfg.quant_warmup_shape))
            loss_sum = torch.zeros((), dtype=torch.float64)
            kd_sum = torch.zeros((), dtype=torch.float64)
            for j in range(accum):
                first = data_pos + (dp_rank * accum + j) * micro
                batch = sampler.batch(first, micro).to(device, non_blocking=True)
                sync = j == accum - 1
                with no_sync(sync), amp():
                    logits = model(batch[:, :-1])
                    loss = loss_fn(logits, batch[:, 1:])
                    kd = teacher.term(batch[:, :-1], logits) if teacher is not None else None
                scaled = (loss if kd is None else loss + teacher.weight * kd) / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach().double().cpu()
                if kd is not None:
                    kd_sum += kd.detach().double().cpu()
            (loss_mean,) = dist.all_reduce_sum([loss_sum.item() / accum], info)
            loss_mean /= info.world
            grad_norm = float("nan")
            stepped = math.isfinite(loss_mean)
            if stepped:
                if scaler is not None:
                    scaler.unscale_(opt)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                clip_fn = tp.clip_grad_norm_ if cfg.tp > 1 else torch.nn.utils.clip_grad_norm_
                grad_norm = float(clip_fn(list(model.parameters()), clip))
                if scaler is not None:
                    before = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    stepped = scaler.get_scale() >= before
                elif math.isfinite(grad_norm):
                    opt.step()
                else:
                    stepped = False
            opt.zero_grad(set_to_none=True)
            # fp16 overflow skips are routine (the scaler backs off); a non-finite loss is not
            bad = not math.isfinite(loss_mean) or (scaler is None and not stepped)
            bad_in_row = bad_in_row + 1 if bad else 0
            if not stepped:
                skipped += 1
                log.warning("step %d: non-finite %s, update skipped (%d skipped so far)", step + 1,
                            "loss" if not math.isfinite(loss_mean) else "gradients", skipped)
            data_pos += G
            tokens_seen += tokens_per_step
            done = step + 1
            dt = time.perf_counter() - t0
            train_time += dt
            trained_tokens += tokens_per_step
            if math.isfinite(loss_mean):
                last_loss = loss_mean
            if bad_in_row >= cfg.max_bad_steps:
                kept = list_checkpoints(run_dir)
                raise TrainingDiverged(
                    f"{bad_in_row} non-finite losses in a row at step {done}: training diverged. The last good "
                    f"checkpoint is {kept[-1] if kept else 'none (no checkpoint was written yet)'}; "
                    "resume from it with "
                    "a lower train.lr, or raise train.max_bad_steps")
            row = {"step": done, "tokens": tokens_seen, "loss": loss_mean, "lr": lr, "wd": wd, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step / dt, "skipped_steps": skipped}
            if scaler is not None:
                row["loss_scale"] = scaler.get_scale()
            if teacher is not None:
                row["kd_loss"] = dist.all_reduce_sum([kd_sum.item() / accum], info)[0] / info.world
            if loggers is not None and (done % cfg.log_every == 0 or done == total_steps):
                loggers.log(row)
            if bar is not None:
                bar.update(tokens_per_step)
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", refresh=False)
            if done % val_every == 0 or done == total_steps:
                # the warm-up's mix as of the tokens seen so far: the model the next step starts from, and after the
                # last step the one saved (validated with the last step's starting mix, 0.98, it was not)
                set_quant_mix(raw, warmup_lambda(tokens_seen, cfg.quant_warmup_tokens, cfg.quant_warmup_shape))
                val_loss = evaluate()
                if loggers is not None:
                    loggers.log({"split": "val", "step": done, "tokens": tokens_seen, "val_loss": val_loss})
            if done in rolling or done in milestones:
                save(done)
    finally:
        if bar is not None:
            bar.close()
        if loggers is not None:
            loggers.close()

    peak = memory.peak_rss(rss_base) if rss_base is not None else None  # training's peak, before the final export
    finished = start_step >= total_steps
    if finished and (run_dir / "result.json").exists() and (run_dir / "final" / "spectra.json").exists():
        kept = read_json(run_dir / "result.json", "the run's result")  # resuming a finished run rewrote it: a NaN
        if isinstance(kept, dict):  # train loss, 0 tok/s and the resume's own wall time in place of the run's
            log.info("%s finished already (step %d of %d); its result is kept", run_dir, start_step, total_steps)
            dist.barrier(info)
            return kept
    if finished:  # resumed a finished run whose final model was not written: nothing to train, report the checkpoint
        val_loss = evaluate()
    wall = wall_before + time.perf_counter() - t_start
    result = {"val_loss": val_loss, "train_loss": last_loss, "tokens": tokens_seen, "steps": total_steps,
              "wall_time": wall, "tokens_per_s": trained_tokens / train_time if train_time else 0.0,
              "skipped_steps": skipped, "run_dir": str(run_dir), "memory_plan_bytes": plan.total}
    if peak is not None:  # measured: resident-set peak of every rank
        mine = [0.0] * info.world
        mine[info.rank] = float(peak)
        result["peak_memory_bytes"] = [int(x) for x in dist.all_reduce_sum(mine, info)]
    whole = raw
    if sharded_params:  # the export: the latent weights gathered once, to rank 0 (optimizer state stays sharded)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        whole = None
        if info.is_main:
            whole = build_model(model_cfg, seed=None, device="cpu")
            whole.load_state_dict(msd)
        del msd
    if info.is_main:
        final_meta = {"step": total_steps, "tokens": tokens_seen, "tokenizer_sha256": tok_sha, "train": cfg.to_dict(),
                      "val_loss": val_loss, **provenance}
        save_model(whole, run_dir / "final", tokenizer=tok_path, meta=final_meta)
        write_json(run_dir / "result.json", finite_json(result))  # strict JSON: a NaN loss as null
    dist.barrier(info)
    return result
