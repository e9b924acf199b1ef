"""The statistics behind the report's checks: intervals, and a verdict that says how sure a finding is.

Two kinds of comparison, two kinds of interval (95 % unless stated):

* **Paired over held-out sequences** (`paired_difference`). A QuantLM and its FloatLM (or a packed model and its
  latent one) are scored on the same held-out windows w = 1..n. With x_w the NLL difference of window w (summed over
  its T_w scored tokens), the loss difference is the ratio

      D = Σ x_w / Σ T_w,

  and its standard error, by the usual linearisation of a ratio (equal T_w: the plain standard error of the
  per-window mean differences d_w = x_w / T_w),

      se² = n / (n − 1) · Σ (x_w − D·T_w)² / (Σ T_w)²,

  so the interval is D ± t_{0.975, n−1} · se. `bootstrap_difference` resamples windows instead (percentile
  interval of the same ratio), as a check that needs no normality. The inference holds the models fixed: it says
  how sure we are of the difference between *these* models on text like the held-out text.

* **Over seeds** (`seed_mean`, `contrast`). Separately trained models differ by their seed as much as by anything
  else, so the unit is the seed. `seed_mean` is the mean of n values with the t-interval on n − 1 degrees of freedom.
  `contrast` compares group means (e.g. loss at one size minus the next) with a pooled seed variance

      s² = Σ_g Σ_i (y_gi − ȳ_g)² / Σ_g (n_g − 1),     se² = s² · Σ_g c_g² / n_g,

  on Σ_g (n_g − 1) degrees of freedom (one-way ANOVA's contrast). Pooling assumes the seed-to-seed spread is alike
  across the groups pooled (sizes and families of one study); with 2 seeds per group it is what makes an interval
  usable at all (t_{0.975,1} = 12.7, but t_{0.975,6} = 2.45).

* **Seeds as blocks** (`block_variance`, `blocked_contrast`). In a study a seed fixes the order of the training data
  for every model and the initial weights of models of one shape, so seed k's models share part of their luck. With
  every group trained on the same seeds b = 1..B, the additive model y_gb = μ_g + β_b + ε_gb (a randomised complete
  block design) takes the seed effect β out of every contrast (Σ_g c_g = 0), and its residual variance

      s² = Σ_g Σ_b (y_gb − ȳ_g − ȳ_b + ȳ)² / ((G − 1)(B − 1)),     se² = s² · Σ_g c_g² / B,

  over the G groups of the study (two-way ANOVA without interaction). It is never larger than the pooled s² by more
  than the ratio of degrees of freedom, and much smaller when the seeds' shared effects are large.

A finding "holds" only when its interval excludes zero in the stated direction, "does not hold" when it excludes
zero in the opposite direction, and is "not resolved" otherwise (`verdict`). A claim of no difference ("8-bit ≈
float") is an equivalence test (`equivalence`): it holds when the whole interval lies inside ±margin, where the
margin is itself a measured effect of the same run (the check says which), never a fixed tolerance.

Student's t quantile is computed here (no scipy at run time): the t CDF through the regularised incomplete beta
function, F(t) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0, evaluated by its continued fraction, and inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

HOLDS, NOT_RESOLVED, DOES_NOT_HOLD = "holds", "not resolved", "does not hold"
LEVEL = 0.95


# ---- Student's t ------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---- intervals --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; `test` names how it was made, `n` and `df` what it rests on."""

    estimate: float
    lo: float
    hi: float
    se: float
    n: int
    df: float
    test: str
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int | None = None) -> str:
        """'+0.0123 [+0.0100, +0.0146]': by default with enough decimals to show two digits of the half-width."""
        return interval_text(self.estimate, self.lo, self.hi, digits)


def interval_text(estimate: float, lo: float, hi: float, digits: int | None = None) -> str:
    """An estimate and its interval as text, e.g. '+0.00021 [+0.00012, +0.00030]'."""
    if digits is None:
        half = (hi - lo) / 2
        digits = 4 if not (math.isfinite(half) and half > 0) else min(8, max(4, 1 - math.floor(math.log10(half))))
    f = f"{{:+.{digits}f}}"
    return f"{f.format(estimate)} [{f.format(lo)}, {f.format(hi)}]"


def _t_interval(estimate: float, se: float, df: float, n: int, test: str, level: float) -> Interval:
    if not math.isfinite(se) or df <= 0:
        return Interval(estimate, -math.inf, math.inf, math.inf, n, df, test, level)
    half = t_quantile(0.5 + level / 2.0, df) * se
    return Interval(estimate, estimate - half, estimate + half, se, n, df, test, level)


def _seedless(s2: float, values: Any) -> bool:
    """The seed variance is nil (to rounding, relative to the values' size): the seeds gave the same values, so
    they did not reach what was measured, and an interval over them is no interval (it would have zero width, and
    rounding noise in the estimate would decide the verdict). Such intervals are made unbounded ('not resolved')."""
    scale = max(1.0, float(np.max(np.abs(np.asarray(values, dtype=np.float64)))))
    return math.isfinite(s2) and s2 <= (1e-9 * scale) ** 2


def _no_seed_interval(estimate: float, n: int, df: float, level: float) -> Interval:
    return Interval(estimate, -math.inf, math.inf, math.inf, n, df, "no seed variance: every seed gave the same value",
                    level)


def seed_mean(values: Sequence[float], *, level: float = LEVEL) -> Interval:
    """Mean of `values` (one per seed) with its t-interval on n − 1 degrees of freedom (infinite for n = 1)."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"seed_mean needs a non-empty list of numbers, got shape {y.shape}")
    n = len(y)
    if n > 1 and _seedless(float(y.var(ddof=1)), y):
        return _no_seed_interval(float(y.mean()), n, n - 1, level)
    se = float(y.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return _t_interval(float(y.mean()), se, n - 1, n, f"t over {n} seed(s)", level)


def paired_difference(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float], *,
                      level: float = LEVEL) -> Interval:
    """Loss of A minus loss of B over the same held-out windows, with its paired t-interval (module docstring).

    `nll_a[w]`, `nll_b[w]`: summed NLL (nats) of window w under each model; `tokens[w]`: tokens scored in it.
    """
    a, b, T = (np.asarray(v, dtype=np.float64) for v in (nll_a, nll_b, tokens))
    if not (a.shape == b.shape == T.shape) or a.ndim != 1:
        raise ValueError(f"paired_difference needs three equal-length lists, got {a.shape}, {b.shape}, {T.shape}; "
                         "the two models must be scored on the same held-out windows")
    n = len(a)
    if n < 2:
        raise ValueError(f"paired_difference needs at least 2 windows, got {n}")
    if np.any(T <= 0):
        raise ValueError("every window must score at least one token")
    x = a - b
    D = float(x.sum() / T.sum())
    r = x - D * T
    se = math.sqrt(n / (n - 1) * float(r @ r)) / float(T.sum())
    return _t_interval(D, se, n - 1, n, f"paired t over {n} held-out sequences", level)


def bootstrap_difference(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float], *,
                         n_boot: int = 10000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The same difference as `paired_difference`, with a percentile bootstrap over windows instead of t."""
    a, b, T = (np.asarray(v, dtype=np.float64) for v in (nll_a, nll_b, tokens))
    if not (a.shape == b.shape == T.shape) or a.ndim != 1 or len(a) < 2:
        raise ValueError("bootstrap_difference needs three equal-length lists of at least 2 windows")
    n = len(a)
    x = a - b
    D = float(x.sum() / T.sum())
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    stats = x[idx].sum(axis=1) / T[idx].sum(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(D, float(lo), float(hi), float(stats.std(ddof=1)), n, math.nan,
                    f"percentile bootstrap ({n_boot}) over {n} held-out sequences", level)


def pooled_variance(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(s², degrees of freedom): the within-group variance pooled over groups (groups of one value add nothing)."""
    ss, df = 0.0, 0
    for g in groups:
        y = np.asarray(g, dtype=np.float64)
        if len(y) > 1:
            ss += float(((y - y.mean()) ** 2).sum())
            df += len(y) - 1
    return (ss / df if df else math.nan), df


def contrast(groups: Sequence[Sequence[float]], weights: Sequence[float], *,
             pool: Sequence[Sequence[float]] | None = None, level: float = LEVEL) -> Interval:
    """Σ_g c_g · mean(groups[g]) with a t-interval from the seed variance pooled over `pool` (default: `groups`).

    E.g. groups = [losses at size 1, losses at size 2], weights = [1, -1]: how much size 2 improves on size 1.
    """
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"contrast needs one weight per group, got {len(groups)} groups and {len(weights)} weights")
    if any(len(g) == 0 for g in groups):
        raise ValueError("contrast: every group needs at least one value")
    est = sum(c * float(np.mean(g)) for g, c in zip(groups, weights, strict=True))
    s2, df = pooled_variance(groups if pool is None else pool)
    n = sum(len(g) for g in groups)
    if df and _seedless(s2, [v for g in (groups if pool is None else pool) for v in g]):
        return _no_seed_interval(est, n, df, level)
    se = math.sqrt(s2 * sum(c * c / len(g) for g, c in zip(groups, weights, strict=True))) if df else math.inf
    return _t_interval(est, se, df, n, f"t with seed variance pooled over {df} df", level)


def block_variance(table: Sequence[Mapping[Any, float]]) -> tuple[float, int]:
    """(s², degrees of freedom) of the residuals of y_gb = μ_g + β_b + ε over the groups of `table` (each a mapping
    block -> value) that hold every block of the table (groups missing one are left out); (nan, 0) with fewer than
    2 such groups or blocks."""
    blocks = sorted(set().union(*table), key=str)
    rows = [g for g in table if all(b in g for b in blocks)]
    if len(rows) < 2 or len(blocks) < 2:
        return math.nan, 0
    y = np.array([[float(g[b]) for b in blocks] for g in rows], dtype=np.float64)
    r = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (y.shape[0] - 1) * (y.shape[1] - 1)
    return float((r * r).sum() / df), df


def blocked_contrast(groups: Sequence[Mapping[Any, float]], weights: Sequence[float],
                     table: Sequence[Mapping[Any, float]], *, level: float = LEVEL) -> Interval:
    """Σ_g c_g · mean(groups[g]) with seeds as blocks (module docstring): `groups` map seed -> value, `table` is every
    group of the study. Falls back to `contrast` with the pooled variance of `table` unless the weights sum to zero
    and every group holds every seed of `table`."""
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"contrast needs one weight per group, got {len(groups)} groups and {len(weights)} weights")
    common = set().union(*table)
    s2, df = block_variance(table)
    if abs(sum(weights)) > 1e-12 or not df or any(set(g) != common for g in groups):
        return contrast([list(g.values()) for g in groups], weights, pool=[list(g.values()) for g in table],
                        level=level)
    B = len(common)
    est = sum(c * float(np.mean(list(g.values()))) for g, c in zip(groups, weights, strict=True))
    if _seedless(s2, [v for g in table for v in g.values()]):
        return _no_seed_interval(est, B * len(groups), df, level)
    se = math.sqrt(s2 * sum(c * c for c in weights) / B)
    return _t_interval(est, se, df, B * len(groups), f"t with seeds as blocks, residual variance over {df} df",
                       level)


def verdict(interval: Interval, direction: int = 1) -> str:
    """'holds' when the interval lies wholly on the stated side of zero (direction +1: above, −1: below),
    'does not hold' when it lies wholly on the other side, else 'not resolved'."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    lo, hi = (interval.lo, interval.hi) if direction == 1 else (-interval.hi, -interval.lo)
    if lo > 0.0:
        return HOLDS
    if hi < 0.0:
        return DOES_NOT_HOLD
    return NOT_RESOLVED


def equivalence(interval: Interval, margin: float) -> str:
    """For a claim "≈ 0" (two one-sided tests): 'holds' when the interval lies inside (−margin, +margin), 'does not
    hold' when it lies wholly outside it on one side, else 'not resolved' (also when there is no positive margin)."""
    if not margin > 0:
        return NOT_RESOLVED
    if -margin < interval.lo and interval.hi < margin:
        return HOLDS
    if interval.lo >= margin or interval.hi <= -margin:
        return DOES_NOT_HOLD
    return NOT_RESOLVED


def combine(verdicts: Sequence[str]) -> str:
    """A finding made of parts (e.g. 'at every size'): holds if every part holds, does not hold if any part does
    not, else not resolved."""
    if not verdicts:
        return NOT_RESOLVED
    if any(v == DOES_NOT_HOLD for v in verdicts):
        return DOES_NOT_HOLD
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return NOT_RESOLVED
