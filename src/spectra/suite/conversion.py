"""Runs that start from other runs of the study (issue 17): each arm's loss and compute, and whether conversion pays.

A variant with `init = "floatlm"` (spec.py) is trained from the final model of the FloatLM run of the same size and
seed, e.g. a FloatLM -> TriLM conversion; with `teacher = ...` it also distils from one. For every such arm C and
every arm S of the same base family that starts from random weights, the report compares them when

    S trained as many tokens as C itself        "same <family> token budget"  (converted vs from scratch)
    S trained as many tokens as C in all        "same total tokens"           (C's tokens plus its init's)

(as many: to within 1 %, since each run rounds its budget up to whole optimizer steps),

with the claim L_C − L_S < 0 (C reaches the lower validation loss). The two are separately trained models, so, as in
`spectra.suite.checks`, the unit is the seed: the difference of seed means with seeds as blocks (`checks.between`;
an arm and its init share the seed), and its verdict is the suite's: holds when the 95 % interval lies below
0, does not hold when it lies above, not resolved otherwise. The paired interval over the held-out windows both were
scored on (NLL averaged over seeds, `checks.paired`) is shown beside it: it measures the held-out text's variability
for these trained models, not training's, so it does not decide the verdict.

Compute (`runner.SuiteRunner._compute`, recorded with each training run): training FLOPs 6·N + attention per token
of every run that made the model, each counted once (a converted arm includes its FloatLM's pretraining), plus the
teacher's forward passes, a third of its training FLOPs per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import spectra.suite.stats as stats
from spectra.suite.checks import between, block_table, paired, pool_of, seed_pairs, seed_values

SAME_BUDGET, SAME_TOTAL = "same {family} token budget", "same total tokens"


def arms(records: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained series and size (over seeds): its start, teacher, tokens, compute and validation loss.
    Empty when no run of the study started from another."""
    train = [r for r in records.values() if r["step"] == "train" and r["status"] == "done"
             and (r.get("metrics") or {}).get("compute")]
    if not any(r["metrics"]["compute"].get("init") for r in train):
        return []
    pool = pool_of(rows)
    out = []
    for label in dict.fromkeys(r["model"]["family"] for r in train):
        recs = [r for r in train if r["model"]["family"] == label]
        for size in dict.fromkeys(r["model"]["size"] for r in recs):
            mine = [r for r in recs if r["model"]["size"] == size]
            comp = [r["metrics"]["compute"] for r in mine]
            by_seed = seed_values(rows, series=_series(rows, label), size=size).get(size, {})
            losses = list(by_seed.values())
            iv = stats.contrast([losses], [1], pool=pool) if losses else None
            out.append({
                "arm": label, "size": size, "base_family": mine[0]["model"]["base_family"],
                "init": comp[0].get("init"), "teacher": comp[0].get("teacher"),
                "tokens": float(np.mean([c["runs"][r["key"]]["tokens"] for c, r in zip(comp, mine, strict=True)])),
                "total_tokens": float(np.mean([c["total_tokens"] for c in comp])),
                "total_flops": float(np.mean([c["total_flops"] for c in comp])),
                "tokens_per_s": float(np.mean([r["metrics"].get("tokens_per_s", np.nan) for r in mine])),
                "seeds": len(losses), "losses": losses, "by_seed": by_seed,
                "mean": iv.estimate if iv else None, "half_width": (iv.hi - iv.estimate) if iv else None,
                "sd": float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
            })
    return out


def _series(rows: list[dict[str, Any]], family: str) -> str:
    """The report's series label of a family/variant (its eval rows carry it)."""
    return next((r["series"] for r in rows if r["family"] == family and r["kind"] in ("floatlm", "trilm")), family)


def _same(a: float, b: float) -> bool:
    """Two token budgets are the same to within 1 % (runs round their budgets up to whole optimizer steps)."""
    return abs(a - b) <= 0.01 * max(abs(a), abs(b))


def comparisons(table: list[dict[str, Any]], rows: list[dict[str, Any]],
                seqs: dict[str, tuple[list[float], list[int]]]) -> list[dict[str, Any]]:
    """Every arm started from another run against every from-scratch arm of its family at the same own or total
    token budget (module docstring), with the seed interval, its verdict and the paired interval."""
    seeds = block_table(rows)
    out = []
    for c in table:
        if not c["init"] or not c["losses"]:
            continue
        for s in table:
            if s["init"] or s["teacher"] or s["size"] != c["size"] or s["base_family"] != c["base_family"]:
                continue
            if not s["losses"]:
                continue
            if _same(s["tokens"], c["tokens"]):
                basis = SAME_BUDGET.format(family=c["base_family"])
            elif _same(s["tokens"], c["total_tokens"]):
                basis = SAME_TOTAL
            else:
                continue
            iv = between(seeds, [c["by_seed"], s["by_seed"]], [1, -1])
            kind = c["base_family"]
            mine, theirs = seed_pairs(rows, dict(family=c["arm"], size=c["size"], kind=kind),
                                      dict(family=s["arm"], size=s["size"], kind=kind))
            pair = paired(seqs, mine, theirs) if mine else None
            out.append({
                "comparison": f"{c['arm']} − {s['arm']}", "size": c["size"], "basis": basis,
                "claim": "L − L_scratch < 0", "verdict": stats.verdict(iv, -1),
                "seed": iv.to_dict(), "seed_text": iv.text(),
                "paired": pair.to_dict() if pair else None, "paired_text": pair.text() if pair else None,
                "flops_ratio": c["total_flops"] / s["total_flops"] if s["total_flops"] else None,
            })
    return out
