"""The paper's findings, tested on a suite's results with the intervals of `spectra.suite.stats`.

Each check is a finding stated with a direction, the interval that tests it, and a verdict: "holds" only when the
95 % interval excludes zero in the stated direction, "does not hold" when it excludes zero the other way, "not
resolved" otherwise. Every check names its test and its numbers.

Between separately trained models (sizes, families, variants) the unit is the seed: group means compared with seeds
as blocks (a seed fixes the data order of every model and the initial weights of one shape; `stats.blocked_contrast`,
residual variance over every latent model of the run), or, where a group lacks some of the study's seeds, with the
seed variance pooled over every latent model (`stats.contrast`). Between a model and one made from it
(QuantLM vs its FloatLM, packed vs latent) the unit is the held-out window: a paired interval over the windows both
were scored on (`stats.paired_difference`), with each window's NLL averaged over the seeds first, so the interval is
for the seed-averaged models on this held-out text.

    improves with size        L(size k) − L(size k+1) > 0 for every adjacent pair            seed contrast
    TriLM − FloatLM gap        L_TriLM − L_FloatLM at each size (> 0: TriLM worse)              seed contrast
    gap shrinks with size      gap(smallest) − gap(largest) > 0, given TriLM is behind at the
                               smallest size (else that premise's verdict)                     seed contrast
    3-bit worse than float     L_3bit − L_float > 0 at each size                               paired
    3-bit worse than 4-bit     L_3bit − L_4bit > 0 at each size                                paired
    8-bit ≈ float              the interval of L_8bit − L_float lies inside ±c, c = the lower
                               end of the 3-bit cost's interval at that size (the smallest
                               cost the run shows quantization has): an equivalence test       paired
    packed ≈ latent            L_packed − L_latent inside ±c, the same c                        paired
    packed weights = latent    every ternary weight read back from the packed file equals the
                               latent model's W̃ = γ·Ŵ with γ in fp16 (no statistics: exact)    equality
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import spectra.suite.stats as stats
from spectra.suite.stats import Interval

LATENT_KINDS = ("floatlm", "trilm")


def seed_values(rows: list[dict[str, Any]], metric: str = "val_loss", **match: Any) -> dict[str, dict[int, float]]:
    """Values of `metric` by size (in order of parameter count) and seed, for rows matching every field."""
    by_size: dict[str, tuple[int, dict[int, float]]] = {}
    for r in rows:
        if r.get(metric) is not None and all(r.get(k) == v for k, v in match.items()):
            by_size.setdefault(r["size"], (r["params"], {}))[1][r.get("seed", 0)] = float(r[metric])
    return {s: dict(sorted(v.items())) for s, (_, v) in sorted(by_size.items(), key=lambda kv: kv[1][0])}


def seed_groups(rows: list[dict[str, Any]], metric: str = "val_loss", **match: Any) -> dict[str, list[float]]:
    """Values of `metric` (one per seed, in seed order) by size, in order of parameter count."""
    return {s: list(v.values()) for s, v in seed_values(rows, metric, **match).items()}


def block_table(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[int, float]]:
    """Every latent model's values by seed (one group per series and size): the study's table for the seed
    variance, pooled (`pool_of`) or with seeds as blocks (`between`)."""
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["kind"] in LATENT_KINDS and r.get(metric) is not None:
            groups.setdefault((r["series"], r["size"]), {})[r.get("seed", 0)] = float(r[metric])
    return list(groups.values())


def pool_of(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[list[float]]:
    """Every latent model's seed values (one group per series and size): the pool for the seed variance."""
    return [list(g.values()) for g in block_table(rows, metric)]


def between(table: list[dict[int, float]], groups: list[dict[int, float]], weights: list[float]) -> Interval:
    """A contrast between separately trained models: seeds as blocks when every group has the study's seeds
    (`stats.blocked_contrast`), else the pooled seed variance."""
    return stats.blocked_contrast(groups, weights, table)


def contrast_rows(rows: list[dict[str, Any]], contrasts: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each named contrast Σ w·L over families or variants (the spec's [contrasts]) at every size where all of them
    were evaluated, with two 95 % intervals: `interval`, the t over seeds of the per-seed contrast Σ w·L_seed (only
    the contrast's own models; n − 1 df; for two models, the paired t-test over seeds), used when every model has the
    same two or more seeds; and `blocked`, the seed-blocked t with the residual variance over every latent model of
    the run (`between`), which assumes every model is as seed-noisy as the others. The sign is "< 0" or "> 0" only
    when `interval` excludes zero."""
    table = block_table(rows)
    latent = [r for r in rows if r["kind"] in LATENT_KINDS]
    out = []
    for name, weights in contrasts.items():
        values = {f: seed_values(latent, family=f) for f in weights}
        first = next(iter(values.values()))
        for size in [s for s in first if all(s in v for v in values.values())]:
            groups = [values[f][size] for f in weights]
            blocked = between(table, groups, list(weights.values()))
            seeds = sorted(groups[0])
            if len(seeds) >= 2 and all(sorted(g) == seeds for g in groups):
                per_seed = [sum(w * g[s] for w, g in zip(weights.values(), groups, strict=True)) for s in seeds]
                iv = stats.seed_mean(per_seed)
            else:
                iv = blocked
            out.append({"contrast": name, "size": size, "weights": dict(weights), "interval": iv, "blocked": blocked,
                        "sign": "< 0" if iv.hi < 0 else "> 0" if iv.lo > 0 else "not resolved"})
    return out


def _check(name: str, verdict: str, interval: Interval | None, detail: str, direction: str) -> dict[str, Any]:
    return {
        "check": name,
        "verdict": verdict,
        "claim": direction,
        "estimate": None if interval is None else interval.estimate,
        "lo": None if interval is None else interval.lo,
        "hi": None if interval is None else interval.hi,
        "test": "" if interval is None else interval.test,
        "interval": None if interval is None else interval.to_dict(),
        "detail": detail,
    }


def _mean_seqs(seqs: dict[str, tuple[list[float], list[int]]], names: list[str]) -> tuple[np.ndarray, list[int]]:
    """Per-window NLL averaged over the models `names` (the seeds of one model), and the windows' token counts."""
    got = [seqs[n] for n in names if n in seqs and seqs[n][0] is not None]
    if not got or len(got) != len(names):
        raise KeyError("missing per-window losses")
    tokens = got[0][1]
    if any(t != tokens for _, t in got):
        raise ValueError("the seeds were scored on different held-out windows")
    return np.mean([np.asarray(nll, dtype=np.float64) for nll, _ in got], axis=0), list(tokens)


def paired(seqs: dict[str, tuple[list[float], list[int]]], a: list[str], b: list[str]) -> Interval | None:
    """L(a) − L(b) over held-out windows, each side averaged over its seeds; None when the windows are missing."""
    try:
        nll_a, t_a = _mean_seqs(seqs, a)
        nll_b, t_b = _mean_seqs(seqs, b)
    except (KeyError, ValueError):
        return None
    if t_a != t_b or len(t_a) < 2:
        return None
    iv = stats.paired_difference(nll_a, nll_b, t_a)
    k = len(a)
    if k > 1:
        iv = Interval(iv.estimate, iv.lo, iv.hi, iv.se, iv.n, iv.df, f"{iv.test} (NLL averaged over {k} seeds)")
    return iv


def _names(rows: list[dict[str, Any]], **match: Any) -> list[str]:
    return sorted(r["name"] for r in rows if all(r.get(k) == v for k, v in match.items()))


def seed_pairs(rows: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The names of the rows matching `a` and `b` for the seeds both sides have, in seed order, so that each side's
    window NLLs average over the same trainings (a partial study paired one seed's QuantLM with another seed's
    FloatLM: a 'holds' made of two trainings). A key (kind "latent": any latent kind) may match only one row per
    seed; ([], []) otherwise."""
    def by_seed(match: dict[str, Any]) -> dict[int, str] | None:
        out: dict[int, str] = {}
        for r in rows:
            if all((r.get(k) in LATENT_KINDS) if (k, v) == ("kind", "latent") else r.get(k) == v
                   for k, v in match.items()):
                if r.get("seed", 0) in out:
                    return None
                out[r.get("seed", 0)] = r["name"]
        return out

    sa, sb = by_seed(a), by_seed(b)
    if sa is None or sb is None:
        return [], []
    common = sorted(set(sa) & set(sb))
    return [sa[k] for k in common], [sb[k] for k in common]


def size_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each latent series improves with size; the TriLM − FloatLM gap per size, and whether it shrinks."""
    out = []
    table = block_table(rows)
    for label in sorted({r["series"] for r in rows if r["kind"] in LATENT_KINDS},
                        key=lambda s: (s not in ("FloatLM", "TriLM"), s)):
        groups = seed_values(rows, series=label)
        if len(groups) < 2:
            continue
        sizes = list(groups)
        parts, verdicts = [], []
        for s0, s1 in zip(sizes, sizes[1:]):
            iv = between(table, [groups[s0], groups[s1]], [1, -1])
            verdicts.append(stats.verdict(iv, +1))
            parts.append((s0, s1, iv))
        verdict = stats.combine(verdicts)
        # the interval shown is one that gives the verdict: for "does not hold" the step lying furthest below zero,
        # else the step whose lower end is lowest (the one that holds least)
        deciding = [iv for (_, _, iv), v in zip(parts, verdicts, strict=True) if v == verdict]
        shown = (min(deciding, key=lambda iv: iv.hi) if verdict == stats.DOES_NOT_HOLD
                 else min(deciding, key=lambda iv: iv.lo))
        detail = "; ".join(f"{s0}→{s1} {iv.text()}" for s0, s1, iv in parts)
        losses = ", ".join(f"{s} {np.mean(list(v.values())):.4f} (n={len(v)})" for s, v in groups.items())
        out.append(_check(f"{label} improves with size", verdict, shown,
                          f"loss drop per step {detail}; mean losses {losses}", "L(smaller) − L(larger) > 0"))
    fl, tl = seed_values(rows, series="FloatLM"), seed_values(rows, series="TriLM")
    common = [s for s in tl if s in fl]

    def mean(g: dict[int, float]) -> float:
        return float(np.mean(list(g.values())))

    for s in common:
        iv = between(table, [tl[s], fl[s]], [1, -1])
        out.append(_check(f"TriLM − FloatLM gap at {s}", stats.verdict(iv, +1), iv,
                          f"TriLM {mean(tl[s]):.4f} (n={len(tl[s])}), FloatLM {mean(fl[s]):.4f} "
                          f"(n={len(fl[s])})", "L_TriLM − L_FloatLM > 0"))
    if len(common) >= 2:
        a, b = common[0], common[-1]
        iv = between(table, [tl[a], fl[a], tl[b], fl[b]], [1, -1, -1, 1])
        gaps = ", ".join(f"{s} {mean(tl[s]) - mean(fl[s]):+.4f}" for s in common)
        # the paper's trend is a TriLM deficit that closes: it needs TriLM behind FloatLM at the smallest size first
        premise = stats.verdict(between(table, [tl[a], fl[a]], [1, -1]), +1)
        v = stats.verdict(iv, +1) if premise == stats.HOLDS else premise
        note = "" if premise == stats.HOLDS else f"; premise 'TriLM worse than FloatLM at {a}': {premise}"
        out.append(_check("TriLM − FloatLM gap shrinks with size", v, iv,
                          f"gap({a}) − gap({b}); gaps {gaps}{note}", "gap(smallest) − gap(largest) > 0"))
    return out


def quant_costs(rows: list[dict[str, Any]], seqs: dict[str, tuple[list[float], list[int]]]
                ) -> dict[str, dict[int, Interval]]:
    """size -> bits -> paired interval of L(QuantLM b-bit) − L(its FloatLM), for FloatLM-made QuantLMs."""
    out: dict[str, dict[int, Interval]] = {}
    for size in seed_groups(rows, kind="floatlm", family="floatlm"):
        for bits in sorted({r["bits"] for r in rows if r["kind"] == "quantlm" and r["family"] == "floatlm"}):
            q, base = seed_pairs(rows, dict(kind="quantlm", family="floatlm", size=size, bits=bits),
                                 dict(kind="floatlm", family="floatlm", size=size))
            if q:
                iv = paired(seqs, q, base)
                if iv is not None:
                    out.setdefault(size, {})[bits] = iv
    return out


def quant_checks(rows: list[dict[str, Any]], seqs: dict[str, tuple[list[float], list[int]]]) -> list[dict[str, Any]]:
    """3-bit worse than float and than 4-bit, and 8-bit indistinguishable from float, at every size."""
    out = []
    costs = quant_costs(rows, seqs)
    for size, by_bits in costs.items():
        if 3 in by_bits:
            iv = by_bits[3]
            out.append(_check(f"QuantLM 3-bit worse than FloatLM at {size}", stats.verdict(iv, +1), iv,
                              "L_3bit − L_float (nats/token)", "> 0"))
            if 4 in by_bits:
                q3, q4 = seed_pairs(rows, dict(kind="quantlm", family="floatlm", size=size, bits=3),
                                    dict(kind="quantlm", family="floatlm", size=size, bits=4))
                iv34 = paired(seqs, q3, q4) if q3 else None
                if iv34 is not None:
                    out.append(_check(f"QuantLM 3-bit worse than 4-bit at {size}", stats.verdict(iv34, +1), iv34,
                                      "L_3bit − L_4bit (nats/token)", "> 0"))
        if 8 in by_bits:
            iv = by_bits[8]
            c = _margin(by_bits)
            out.append(_check(f"QuantLM 8-bit ≈ FloatLM at {size}", stats.equivalence(iv, c), iv,
                              f"L_8bit − L_float inside ±{_margin_text(c)}; distinguishable from 0: "
                              f"{'yes' if iv.excludes_zero() else 'no'}", "≈ 0"))
    return out


def _margin(by_bits: dict[int, Interval]) -> float:
    """The equivalence margin at one size: the lower end of the 3-bit QuantLM's cost interval, the smallest loss
    that quantization is shown to cost there (nan when that cost is not resolved)."""
    c = by_bits[3].lo if 3 in by_bits else math.nan
    return c if c > 0 else math.nan


def _margin_text(c: float) -> str:
    return f"{c:.5f} (the lower end of the 3-bit cost)" if c > 0 else "? (no resolved 3-bit cost at this size)"


def packed_checks(rows: list[dict[str, Any]], seqs: dict[str, tuple[list[float], list[int]]]) -> list[dict[str, Any]]:
    """Packing changes nothing measurable: per format and size, L_packed − L_latent (paired, NLL averaged over seeds)
    lies inside ± the 3-bit QuantLM's resolved cost at that size. The packed kernels compute from int8 activations and
    an fp16 scale (spectra.packed.linear), so the losses are close, not bit-identical; the largest per-window
    difference is shown too."""
    costs = quant_costs(rows, seqs)
    out = []
    for fmt in sorted({r["format"] for r in rows if r["kind"] == "packed"}):
        for fam, size in dict.fromkeys((r["family"], r["size"]) for r in rows if r["kind"] == "packed"
                                       and r["format"] == fmt):
            reads = [r.get("weights_match") for r in rows if r["kind"] == "packed" and r["format"] == fmt
                     and r["family"] == fam and r["size"] == size]
            if reads and all(reads):  # exact: the packed file read back against the latent model's own W̃
                bad = sum(m["mismatched_weights"] for m in reads)
                n = sum(m["weights"] for m in reads)
                verdict = stats.HOLDS if bad == 0 and all(m["exact"] for m in reads) else stats.DOES_NOT_HOLD
                out.append(_check(f"packed {fmt.upper()} weights = latent {fam} at {size}", verdict, None,
                                  f"{bad} of {n} ternary weights differ from W̃ = γ·Ŵ (γ in fp16) over "
                                  f"{len(reads)} seed(s), read back from the packed files", "exactly equal"))
            packed, latent = seed_pairs(rows, dict(kind="packed", family=fam, size=size, format=fmt),
                                        dict(kind="latent", family=fam, size=size))
            if not packed:
                continue
            iv = paired(seqs, packed, latent)
            if iv is None:
                continue
            worst = max(float(np.max(np.abs(np.asarray(seqs[p][0]) - np.asarray(seqs[q][0]))
                                     / np.asarray(seqs[p][1], dtype=np.float64)))
                        for p, q in zip(packed, latent, strict=True))
            c = _margin(costs.get(size, {}))
            out.append(_check(f"packed {fmt.upper()} ≈ latent {fam} at {size}", stats.equivalence(iv, c), iv,
                              f"L_packed − L_latent inside ±{_margin_text(c)}; largest |Δ| of one window "
                              f"{worst:.1e} nats/token", "≈ 0"))
    return out


def study_checks(rows: list[dict[str, Any]], seqs: dict[str, tuple[list[float], list[int]]] | None = None
                 ) -> list[dict[str, Any]]:
    """Every check of the module docstring that this run's models allow. `seqs`: model name -> (window NLLs,
    window token counts), from the eval records; without it the paired checks are skipped."""
    seqs = seqs or {}
    return size_checks(rows) + quant_checks(rows, seqs) + packed_checks(rows, seqs)


FINDINGS = (  # (finding, check-name prefixes whose verdicts it combines)
    ("each family improves with size", ("FloatLM improves with size", "TriLM improves with size")),
    ("QuantLM 3-bit is worse than its FloatLM at every size", ("QuantLM 3-bit worse than FloatLM at ",)),
    ("QuantLM 3-bit is worse than 4-bit at every size", ("QuantLM 3-bit worse than 4-bit at ",)),
    ("QuantLM 8-bit ≈ its FloatLM at every size", ("QuantLM 8-bit ≈ FloatLM at ",)),
    ("packed weights = latent TriLM's exactly, every format and size", ("packed TQ1 weights", "packed TQ2 weights")),
    ("packed ≈ latent TriLM in loss, every format and size", ("packed TQ1 ≈", "packed TQ2 ≈")),
    ("the TriLM − FloatLM gap shrinks with size", ("TriLM − FloatLM gap shrinks with size",)),
)


def findings(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's small-scale findings (issue 14, item 3), each the combination of its checks: holds when every
    one holds, does not hold when any does not, else not resolved. Findings with no check in this run are left out."""
    out = []
    for name, prefixes in FINDINGS:
        parts = [c for c in checks if any(c["check"].startswith(p) for p in prefixes)]
        if parts:
            verdicts = [c["verdict"] for c in parts]
            out.append({"finding": name, "verdict": stats.combine(verdicts), "checks": len(parts),
                        "holds": verdicts.count(stats.HOLDS), "not_resolved": verdicts.count(stats.NOT_RESOLVED),
                        "does_not_hold": verdicts.count(stats.DOES_NOT_HOLD)})
    return out
