"""Learning-rate and weight-decay schedules (Spectra §3.3), as pure functions of the optimizer step.

With S total steps, W warmup steps, peak η(s) and floor ratio r (`min_lr_ratio`), for step s = 0 … S−1:

    warmup    s < W:   lr = η(s) · (s + 1) / W
    after     p = (s − W) / max(1, S − W)          ∈ [0, 1)
              cosine:  lr = η(s) · (r + (1 − r) · ½ (1 + cos π p))      FloatLM
              linear:  lr = η(s) · (1 − (1 − r) · p)                    TriLM

    peak      η(s) = lr2 if lr_drop and s ≥ ⌈lr_drop_at · S⌉ else lr
    decay     wd(s) = 0 if wd_removal and s ≥ ⌈wd_removal_at · S⌉ else weight_decay

W = ⌈warmup · S⌉ for a fraction (every step that starts before it: step s starts at s / S), else the number given,
also when it is longer than the run (which then ends below its peak, with a warning; it was cut to S, 10x the
documented rate at every step of a 10-step run with W = 100).

The TriLM peak drop keeps the linear decay line and rescales it: the LR falls from lr over the first half, jumps to
lr2 · (1 − (1 − r) · ½) at the middle and continues down to lr2 · r ([I] the paper does not give the exact shape;
this is the BitNet two-stage reading). `lr_drop` and `wd_removal` are independent, for the paper's 2×2 ablation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    lr: float
    lr2: float
    min_lr_ratio: float
    shape: str  # 'cosine' | 'linear'
    lr_drop: bool
    lr_drop_step: int
    weight_decay: float
    wd_removal: bool
    wd_removal_step: int

    def peak(self, step: int) -> float:
        return self.lr2 if self.lr_drop and step >= self.lr_drop_step else self.lr

    def lr_at(self, step: int) -> float:
        peak = self.peak(step)
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        p = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        r = self.min_lr_ratio
        if self.shape == "cosine":
            return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))
        return peak * (1 - (1 - r) * p)

    def wd_at(self, step: int) -> float:
        return 0.0 if self.wd_removal and step >= self.wd_removal_step else self.weight_decay


def make_schedule(cfg, total_steps: int) -> Schedule:
    """The schedule of a resolved TrainConfig over `total_steps` optimizer steps."""
    warmup = switch_step(cfg.warmup, total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    if warmup > total_steps:  # as given (the formula's W): the run ends in warmup, below its peak learning rate
        log.warning("warmup of %d steps is longer than the run's %d: the learning rate reaches %.0f %% of its peak",
                    warmup, total_steps, 100 * total_steps / warmup)
    return Schedule(
        total_steps=total_steps,
        warmup_steps=warmup,
        lr=cfg.lr,
        lr2=cfg.lr2,
        min_lr_ratio=cfg.min_lr_ratio,
        shape=cfg.schedule,
        lr_drop=cfg.lr_drop,
        lr_drop_step=switch_step(cfg.lr_drop_at, total_steps),
        weight_decay=cfg.weight_decay,
        wd_removal=cfg.wd_removal,
        wd_removal_step=switch_step(cfg.wd_removal_at, total_steps),
    )


def switch_step(fraction: float, total_steps: int) -> int:
    """The first step that starts at or past `fraction` of training (step s starts at s / total_steps, as a
    progressive quantizer's stages do). round() put the switch a step early where the fraction fell inside a step
    with a fractional part below one half (⅔ of 5 steps: step 3, which starts at 60 %) and rounded halves to even."""
    return math.ceil(fraction * total_steps - 1e-9)
