"""The memory plan: peak memory per rank of a training configuration, estimated before anything is allocated.

`plan(model_cfg, train_cfg, world=…, micro_batch=…, grad_accum=…, device=…)` counts, in bytes per rank:

    params       float32 latent weights (the master copy):        4·P       (FSDP: 4·P/W, the rank's shard)
    grads        float32 gradients:                               4·P       (FSDP: 4·P/W, reduce-scattered per
                                                                            micro-batch)
    optimizer    AdamW's two float32 moments:                     8·P       (FSDP: 8·P/W)
    comm         DDP's gradient buckets (a flat copy of every gradient): 4·P;
                 FSDP: the root's unsharded embeddings, lm_head and norm in the compute dtype for the whole step,
                 plus two unsharded blocks (the one running and the prefetched next), one block's unsharded gradient
                 and its float32 reduce-scatter copy under mixed precision
    activations  what autograd keeps per micro-batch of B sequences of T tokens, per block (below), times the number
                 of blocks, plus the logits (B·T·V) the trainer holds and the loss gradient the CPU kernel keeps

Per block, with `s` the residual stream's bytes per value (4, or 2 when FSDP computes in bf16 parameters), `c` the
compute dtype's (4 fp32, 2 bf16 autocast or bf16 FSDP), d = dim, a = n_heads·head_dim, f = glu_dim, H heads:

    2 norms      each keeps its float32 input copy and its normalised output:                    2·B·T·d·(4 + s)
                 and the linears' input, which bf16 autocast casts once per reader (q, k, v; gate, up):
                                                                                   B·T·d·c · (2, or 5 under autocast)
    attention    q, k after RoPE, v, and the o_proj input:                                       4·B·T·a·c
                 the probabilities, when the dense CPU attention runs (`spectra.kernels.attention`): B·H·T²·c
                 or SDPA's output and log-sum-exp (GPUs, long sequences):                       B·T·a·c + 4·B·H·T
    SwiGLU MLP   gate, silu(gate), up and their product:                                        4·B·T·f·c
    W̃ copies     TriLM: the quantized weight γ·Ŵ each of the 7 linears saves for backward:     P_block·c
                 (none with `train.recompute_ternary`: W̃ is rebuilt in backward, one layer at a time)
                 FloatLM under bf16 autocast: the bf16 weight copies:                           P_block·2

With activation checkpointing (`train.activation_checkpointing`) a block keeps only its input (B·T·d·s) and one block
at a time holds the whole set while it is recomputed. The peak is taken over the backward pass, block by block:
the activations not yet consumed plus the gradients already produced, plus one block's backward temporaries.
Everything is counted from the model's real parameter shapes (the model is built on the meta device), so it holds
for every size and ablation. With tensor parallelism (`tp`), a rank holds 1/tp of every block matrix, heads and
hidden units (attention and MLP activations shrink by tp; norms, residual stream and logits do not), and FSDP shards
over the world/tp data-parallel groups. `memory_limit_gb` refuses a run whose plan does not fit (`check`).

Measuring on CPU (`peak_rss`): torch's CPU allocator keeps no statistics and tracemalloc sees only Python's own
allocations, not tensors, so the measured peak is the process's resident-set high-water mark (Linux `VmHWM`), reset
when training starts (`reset_peak`, /proc/self/clear_refs) and taken relative to the resident set at that moment,
less the growth of its file-backed pages (`RssFile`: library code and mapped files touched for the first time during
training). Those pages are not memory the run allocates, and how many of them one first touch maps depends on the
page cache (fault-around maps the cached neighbours), so a fresh install measured up to ~20 MB more than a warm one
for the same run; the plan leaves them out. File-backed pages only grow in a run (nothing here unmaps a library), so
their growth at the end is their growth at the peak, up to pages the kernel reclaimed under pressure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from spectra.config import ModelConfig
from spectra.kernels.attention import DENSE_ATTENTION_MAX_LEN, DENSE_ATTENTION_MAX_PROBS

log = logging.getLogger(__name__)

GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes per rank, by part; `total` is the peak (not the sum of the parts' maxima)."""

    params: int
    grads: int
    optimizer: int
    comm: int
    activations: int  # at the peak: activations still held + the logits and loss gradient
    weight_copies: int  # the part of `activations` that is W̃ (or bf16 weight) copies
    total: int
    world: int
    parallel: str
    precision: str
    micro_batch: int
    activation_checkpointing: bool
    teacher: int = 0  # a distillation teacher's weights (float32)
    kd: int = 0  # at the peak: the KD loss's rows, or the teacher's forward, or its kept gradient
    grads_at_peak: int = 0  # the gradients held at the peak (all of `grads` when micro-batches accumulate)
    temporaries: int = 0  # at the peak: a block's backward temporaries

    def line(self) -> str:
        """The total and the parts it is the sum of (and the W̃ copies inside the activations)."""
        parts = [("params", self.params), ("optimizer", self.optimizer), ("comm", self.comm),
                 ("teacher", self.teacher), ("gradients", self.grads_at_peak), ("activations", self.activations),
                 ("kd", self.kd), ("temporaries", self.temporaries)]
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in parts if v or k in ("params", "activations"))
        return (f"{self.total / GB:.2f} GB per rank ({shown} GB, of which weight copies {self.weight_copies / GB:.2f}; "
                f"{self.parallel} x {self.world}, {self.precision}, micro_batch {self.micro_batch}, "
                f"activation_checkpointing {self.activation_checkpointing})")

    def to_dict(self) -> dict:
        return asdict(self)


def _shapes(model_cfg: ModelConfig) -> tuple[int, int, int]:
    """(parameters of one block, of its 7 linear weights, outside the blocks), counted on a meta-device model."""
    from spectra.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    block = model.layers[0]
    per_block = sum(p.numel() for p in block.parameters())
    linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return per_block, linears, total - per_block * model_cfg.n_layers


def _attention_mlp(B: int, T: int, a: int, f: int, H: int, mlp_act: str, c: int, device: str) -> tuple[bool, int, int]:
    """(whether attention keeps its probabilities, one block's attention bytes, its MLP bytes) for B sequences of T
    tokens, attention width a over H heads, MLP width f, in a compute dtype of c bytes."""
    BT = B * T
    dense = device == "cpu" and T <= DENSE_ATTENTION_MAX_LEN and B * H * T * T <= DENSE_ATTENTION_MAX_PROBS
    attn = 4 * BT * a * c + (B * H * T * T * c if dense else BT * a * c + 4 * B * H * T)
    mlp = (4 if mlp_act == "swiglu" else 2) * BT * f * c
    return dense, attn, mlp


def plan(model_cfg: ModelConfig, *, seq_len: int, micro_batch: int, grad_accum: int, world: int, parallel: str,
         precision: str, activation_checkpointing: bool = False, device: str = "cpu", recompute_ternary: bool = False,
         tp: int = 1, teacher_params: int = 0, teacher: ModelConfig | None = None) -> MemoryPlan:
    """The memory plan of one rank (see the module docstring for every term). `teacher_params`: a distillation
    teacher's parameter count (0: none), whose float32 weights stay for the run and whose logits, the KD loss's float32
    temporaries (seven rows of B·T·V) and its kept gradient join the loss's peak (without them a distilled run of 1.3 GB
    planned peaked at 7.3)."""
    L, B, T = model_cfg.n_layers, micro_batch, seq_len
    d, a, f, H, V = model_cfg.dim, model_cfg.attn_dim, model_cfg.glu_dim, model_cfg.n_heads, model_cfg.vocab_size
    p_block, p_lin, p_rest = _shapes(model_cfg)
    if tp > 1:  # a rank's slice of every block matrix, heads and hidden units; norms and the rest replicated
        p_block, p_lin = p_block - p_lin + p_lin // tp, p_lin // tp
        a, f, H = a // tp, f // tp, H // tp
    P = p_block * L + p_rest
    fsdp = parallel == "fsdp" and world // tp > 1
    mixed = precision in ("bf16", "fp16")
    c = 2 if mixed else 4  # compute dtype
    s = 2 if (fsdp and mixed) else 4  # residual stream: bf16 parameters make bf16 activations
    shard = world // tp if fsdp else 1

    params, grads, optimizer = 4 * P // shard, 4 * P // shard, 8 * P // shard
    comm = 0
    if parallel == "ddp" and world // tp > 1:
        comm = 4 * P
    if fsdp:
        comm = p_rest * c + 2 * p_block * c + p_block * c + (4 * p_block if mixed else 0)

    # activations of one block (bytes), and what it keeps under checkpointing
    BT = B * T
    dense, attn, mlp = _attention_mlp(B, T, a, f, H, model_cfg.mlp_act, c, device)
    if model_cfg.family == "trilm":
        copies = 0 if recompute_ternary else p_lin * c
    else:
        copies = p_lin * 2 if (mixed and not fsdp) else 0
    # autocast casts a linear's input for every layer that reads it (q, k, v; gate, up): one copy each
    casts = mixed and not fsdp
    readers = (3 if casts else 1) + ((2 if model_cfg.mlp_act == "swiglu" else 1) if casts else 1)
    act_block = 2 * BT * d * (4 + s) + readers * BT * d * c + attn + mlp + copies
    kept_block = BT * d * s if activation_checkpointing else act_block
    # a block's backward temporaries: the gradients of its widest activations and of its weights (compute dtype)
    temp_block = 2 * BT * f * c + (B * H * T * T * c if dense else 0) + p_lin * c
    head = BT * d * (4 + s + c)  # final norm and lm_head input
    logits = BT * V * c
    loss_grad = BT * V * c if device == "cpu" else BT * V * 8  # CPU kernel's kept gradient / float32 log-softmax
    head_grads = (4 * p_rest) // shard  # lm_head, embeddings, final norm (float32)
    grad_block = 4 * p_block // shard

    kd_loss, kd_kept = 0, 0
    if teacher_params:  # the teacher's logits and the KD loss's float32 s, t, log-softmaxes, p_t and gradient
        kd_kept = BT * V * (4 if precision == "fp16" else c)  # its kept gradient: compute dtype, float32 for fp16
        # at the loss: the teacher's logits, the gradient's cast, and seven float32 rows (s, t, two log-softmaxes, p_t,
        # log p_t − log p_s and its product with p_t)
        kd_loss = 2 * BT * V * c + 7 * BT * V * 4
        if teacher is not None:  # or, before them, the teacher's own forward: one block's activations at a time
            _, attn_t, mlp_t = _attention_mlp(B, T, teacher.attn_dim, teacher.glu_dim, teacher.n_heads,
                                              teacher.mlp_act, c, device)
            forward_t = 2 * BT * teacher.dim * (4 + s) + 5 * BT * teacher.dim * c + attn_t + mlp_t + BT * V * c
            kd_loss = max(kd_loss, forward_t)

    persistent_grads = grad_accum > 1  # earlier micro-batches' gradients are held through this one's backward
    kept_grads = grads if persistent_grads else 0
    teacher_bytes = 4 * teacher_params  # float32
    static = params + optimizer + comm + kept_grads + teacher_bytes
    grads_now = 0 if persistent_grads else 1
    # forward end / head backward: every block's activations, the logits, the loss gradient, the head's gradients
    # each candidate: (its bytes, activations, W̃ copies among them, gradients held, KD, backward temporaries)
    peaks = [(L * kept_block + head + logits + loss_grad + kd_loss + head_grads * grads_now,
              L * kept_block + head + logits + loss_grad, L * copies if not activation_checkpointing else 0,
              head_grads * grads_now, kd_loss, 0)]
    for i in range(L - 1, -1, -1):  # backward of block i: blocks < i kept, block i whole, blocks > i gradients
        held = i * kept_block + act_block + temp_block + logits + kd_kept
        peaks.append((held + (head_grads + (L - i) * grad_block) * grads_now, i * kept_block + act_block + logits,
                      (i + 1) * copies if not activation_checkpointing else copies,
                      (head_grads + (L - i) * grad_block) * grads_now, kd_kept, temp_block))
    end = grads * grads_now  # after backward: every gradient (the optimizer step adds nothing of this size)
    peaks.append((end, 0, 0, end, 0, 0))
    dyn, act, cop, held_grads, kd, temp = max(peaks)
    total = static + dyn
    return MemoryPlan(params=params, grads=grads, optimizer=optimizer, comm=comm, activations=act,
                      weight_copies=cop, total=total, world=world, parallel=parallel if world > 1 else "single",
                      precision=precision, micro_batch=B, activation_checkpointing=activation_checkpointing,
                      teacher=teacher_bytes, kd=kd, temporaries=temp, grads_at_peak=held_grads + kept_grads)


def host_memory() -> int | None:
    """The machine's physical memory in bytes, or None where the platform does not report it (no sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the machine's memory shared by the node's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = host_memory()
    if total is None:
        raise ValueError("this platform does not report its memory; set train.memory_limit_gb (0: no check)")
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check(p: MemoryPlan, limit_gb: float | None, device: torch.device) -> None:
    """Raise a one-line ValueError when the plan exceeds `limit_gb` (None: the device's memory; 0: no limit)."""
    if limit_gb is not None and limit_gb <= 0:
        return
    limit = device_memory(device) if limit_gb is None else limit_gb * GB
    what = "train.memory_limit_gb" if limit_gb is not None else f"the {device.type} memory per rank"
    if p.total > limit:
        raise ValueError(f"memory plan: {p.line()} exceeds {what} ({limit / GB:.2f} GB); lower train.micro_batch, "
                         "set train.activation_checkpointing=true, train.parallel=fsdp or more ranks, or raise "
                         "train.memory_limit_gb")


# ---- measuring on CPU (Linux) ---------------------------------------------------------------------------------------
def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class RssMark:
    """The resident set when the peak was reset: all of it and its file-backed part (bytes)."""

    rss: int
    file: int


def reset_peak() -> RssMark | None:
    """Reset the resident-set high-water mark; returns the resident set now, None where Linux's /proc is missing."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    rss, file = _status("VmRSS"), _status("RssFile")
    return None if rss is None or file is None else RssMark(rss, file)


def peak_rss(mark: RssMark) -> int | None:
    """The bytes the process held at its resident-set high-water mark since `reset_peak` returned `mark`, above the
    resident set then, less the growth of its file-backed pages (see the module docstring); None without /proc."""
    hwm, file = _status("VmHWM"), _status("RssFile")
    if hwm is None or file is None:
        return None
    return hwm - mark.rss - max(0, file - mark.file)


__all__ = ["MemoryPlan", "RssMark", "check", "device_memory", "peak_rss", "plan", "reset_peak"]
