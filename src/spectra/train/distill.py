"""Distillation from a frozen teacher (`train.teacher`, `train.kd_weight`, `train.kd_temperature`).

With student logits s and teacher logits t over N positions, temperature τ and p = softmax(·/τ):

    kd   = τ² · (1/N) Σ_i KL(p_t,i ‖ p_s,i) = τ² · (1/N) Σ_i Σ_j p_t,ij (log p_t,ij − log p_s,ij)
    loss = cross-entropy + kd_weight · kd
    ∂kd/∂s_ij = (τ/N) · (p_s,ij − p_t,ij)

(Hinton et al. 2015: the τ² keeps the gradient's size independent of τ.) The term is computed in float32 and its
gradient with respect to the student's logits is formed in the forward pass and kept instead of the two
distributions, as the fused cross-entropy does (`spectra.train.loss`).

The teacher is any latent model `spectra.load` opens (a spectra checkpoint, a Hugging Face Llama directory, or a run
directory's final model; packed TriLMs and QuantLMs are refused as for `train.init`), in eval mode with gradients
off, and runs inside the student's autocast, i.e. in the student's precision. It must have the student's vocabulary
size and its tokenizer (same tokenizer.json bytes). Cost per step: one teacher forward pass (about a third of the
student's forward+backward FLOPs for an equal-size teacher) and the teacher's weights and (micro-batch, T, V) logits
in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spectra.config import ModelConfig


class _KDLoss(torch.autograd.Function):
    """τ²·mean_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)); the backward returns the gradient made in the forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, tau: float) -> Tensor:
        s = student.reshape(-1, student.shape[-1]).float() / tau
        t = teacher.reshape(-1, teacher.shape[-1]).float() / tau
        n = s.shape[0]
        log_ps = torch.log_softmax(s, dim=-1)
        log_pt = torch.log_softmax(t, dim=-1)
        pt = log_pt.exp()
        kd = (pt * (log_pt - log_ps)).sum() * (tau * tau / max(1, n))
        grad = log_ps.exp_().sub_(pt).mul_(tau / max(1, n))  # (τ/N)(p_s − p_t)
        # kept in the student's dtype, except float16: its values (~1e-7 at N = 2048, V = 4096) are below float16's
        # normal range until the loss scale multiplies them, and that scale (65536) is past float16's largest value,
        # so they are kept in float32 and scaled there (in float16 60 % of them flushed to 0 and step 1 was skipped)
        ctx.save_for_backward(grad if student.dtype == torch.float16 else grad.to(student.dtype))
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return kd

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).to(ctx.dtype).view(ctx.shape), None, None


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """τ²·(1/N)·Σ_i KL(p_teacher ‖ p_student) over the positions of (..., V) logits; gradient to the student only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return _KDLoss.apply(student_logits, teacher_logits.detach(), float(temperature))


@dataclass
class Teacher:
    model: nn.Module
    weight: float
    temperature: float
    record: dict[str, Any]

    def term(self, inputs: Tensor, student_logits: Tensor) -> Tensor:
        """kd for one micro-batch (unweighted); call inside the student's autocast."""
        with torch.no_grad():
            teacher_logits = self.model(inputs)
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward-only FLOPs per token of the teacher (a third of `accounting.flops_per_token`)."""
        from spectra.accounting import flops_per_token

        return flops_per_token(self.model.config, seq_len) // 3


def load_teacher(path: str | os.PathLike, student: ModelConfig, tokenizer: Path, *, weight: float,
                 temperature: float, device: torch.device) -> Teacher:
    """Open, freeze and check the teacher: same vocabulary size and tokenizer as the student."""
    from spectra.data.tokenizer import tokenizer_hash
    from spectra.files import find_tokenizer
    from spectra.train.init import content_hash, load_source, resolve_model_dir

    where = f"train.teacher {path}"
    model_dir = resolve_model_dir(path, what="train.teacher")
    tok = find_tokenizer(model_dir)
    if tok is None:
        raise ValueError(f"{where}: {model_dir} has no tokenizer.json, so it cannot be checked to share the "
                         f"student's tokenizer ({tokenizer}); copy the tokenizer it was trained with into it")
    if tokenizer_hash(tok) != tokenizer_hash(tokenizer):
        raise ValueError(f"{where}: its tokenizer {tok} differs from the student's {tokenizer} (sha256 "
                         f"{tokenizer_hash(tok)[:12]} vs {tokenizer_hash(tokenizer)[:12]}); the teacher must share "
                         "the student's tokenizer")
    model = load_source(model_dir)[0].to(device)
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.vocab_size != student.vocab_size:
        got = cfg.vocab_size if cfg is not None else "unknown"
        raise ValueError(f"{where}: vocabulary size {got} differs from the student's {student.vocab_size}; the "
                         "teacher's logits must cover the same ids")
    model.eval().requires_grad_(False)
    record = {"path": str(model_dir.resolve()), "sha256": content_hash(model_dir), "family": cfg.family,
              "params": sum(p.numel() for p in model.parameters())}
    return Teacher(model=model, weight=float(weight), temperature=float(temperature), record=record)
