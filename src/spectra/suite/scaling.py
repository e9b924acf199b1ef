"""Scaling-law fits and the Pareto frontier (Spectra §5, Fig. 2 and 11).

The paper fits the final validation loss against the parameter count N with a power law plus an offset,

    L(N) = A · N^(−α) + ε,

by Levenberg–Marquardt (TriLM: A = 185, α = 0.26, ε = 1.76; FloatLM: A = 159, α = 0.26, ε = 1.67), and also a pure
power law L = A · N^(−α). For a fixed α the offset law is linear in (A, ε), so we solve that least-squares problem in
closed form and search α in one dimension (a log-spaced grid, then golden-section refinement): the global optimum
without a starting guess. Standard errors come from the Jacobian at the optimum, s² (JᵀJ)⁻¹ with s² = SSE / (n − p),
and are undefined (None) when there are no more points than parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PAPER_FITS = {"trilm": {"A": 185.0, "alpha": 0.26, "eps": 1.76}, "floatlm": {"A": 159.0, "alpha": 0.26, "eps": 1.67}}


def offset_law(N: np.ndarray, A: float, alpha: float, eps: float) -> np.ndarray:
    return A * np.power(N, -alpha) + eps


def _solve_linear(N: np.ndarray, L: np.ndarray, alpha: float, offset: bool) -> tuple[float, float, float]:
    x = np.power(N, -alpha)
    X = np.stack([x, np.ones_like(x)], axis=1) if offset else x[:, None]
    coef, *_ = np.linalg.lstsq(X, L, rcond=None)
    A, eps = float(coef[0]), float(coef[1]) if offset else 0.0
    sse = float(np.sum((X @ coef - L) ** 2))
    return A, eps, sse


def _stderr(N: np.ndarray, L: np.ndarray, A: float, alpha: float, eps: float, offset: bool) -> dict[str, float] | None:
    n, p = len(N), 3 if offset else 2
    if n <= p:
        return None
    x = np.power(N, -alpha)
    cols = [x, -A * x * np.log(N)] + ([np.ones_like(x)] if offset else [])
    J = np.stack(cols, axis=1)
    resid = offset_law(N, A, alpha, eps) - L
    s2 = float(resid @ resid) / (n - p)
    try:
        cov = s2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        return None
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    out = {"A": float(se[0]), "alpha": float(se[1])}
    if offset:
        out["eps"] = float(se[2])
    return out


def fit_power_law(N, L, *, offset: bool = True) -> dict[str, Any]:
    """Least-squares fit of L = A·N^(−α) (+ ε). Returns A, alpha, eps, their standard errors, rmse and n."""
    N = np.asarray(N, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    if N.shape != L.shape or N.ndim != 1:
        raise ValueError(f"N and L must be 1-D of the same length, got {N.shape} and {L.shape}")
    need = 3 if offset else 2
    if len(N) < need:
        raise ValueError(f"a fit with {need} parameters needs at least {need} points, got {len(N)}")
    if np.any(N <= 0):
        raise ValueError("parameter counts must be positive")
    if not np.isfinite(L).all():
        raise ValueError(f"non-finite loss at N = {', '.join(f'{x:.3g}' for x in N[~np.isfinite(L)])}: a diverged run "
                         "cannot be fitted")
    # normalise N so that N^-alpha stays well conditioned; A is rescaled back at the end
    scale = float(np.exp(np.mean(np.log(N))))
    n = N / scale

    def sse(alpha: float) -> float:
        A, _, s = _solve_linear(n, L, alpha, offset)
        return s if A > 0 else math.inf

    grid = np.geomspace(1e-3, 3.0, 600)
    values = np.array([sse(a) for a in grid])
    if not np.isfinite(values).any():
        raise ValueError("no decreasing power law fits these points (loss does not fall with N)")
    i = int(np.argmin(values))
    if i in (0, len(grid) - 1):
        raise ValueError(f"the best exponent lies at the search bound (α = {grid[i]:.3g}): the points do not follow a "
                         "power law in N")
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(100):
        if sse(c) < sse(d):
            hi = d
        else:
            lo = c
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    alpha = (lo + hi) / 2
    A_n, eps, s = _solve_linear(n, L, alpha, offset)
    A = A_n * scale**alpha
    rmse = math.sqrt(s / len(N))
    return {"A": A, "alpha": alpha, "eps": eps if offset else None, "offset": offset, "n": int(len(N)), "rmse": rmse,
            "stderr": _stderr(N, L, A, alpha, eps, offset)}


def pareto_front(points: list[tuple[float, float, Any]]) -> list[Any]:
    """Items (x, y, item) not dominated by another with x' <= x and y' <= y (one strictly). Sorted by x."""
    front, best = [], math.inf
    for x, y, item in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append(item)
            best = y
    return front
