"""The study's report, rebuilt from `results.jsonl` alone: Markdown, a self-contained HTML page and PNG figures.

Figures follow the paper's paired panels: each metric "across parameters" (FloatLM, TriLM, QuantLM at each bit width)
and "across size in bits" (the same models placed at their size as the paper counts it, plus packed TriLMs at their
real TQ2_0/TQ1_0 sizes). Validation loss gets the fitted scaling laws L(N) = A·N^(−α) + ε per family, and the
paper's published fits when the preset is `paper`. Tables: every model, the fits, the Pareto frontier in bits, memory
(paper count and bytes on disk) and decode speed.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

import spectra.suite.conversion as conversion
from spectra.files import FormatError, atomic_file, finite_json, read_json, write_json
from spectra.suite.checks import (
    between,
    block_table,
    contrast_rows,
    findings,
    pool_of,
    quant_costs,
    seed_groups,
    seed_values,
    study_checks,
)
from spectra.suite.records import read_records
from spectra.suite.scaling import PAPER_FITS, fit_power_law, pareto_front
from spectra.suite.stats import contrast, interval_text

MARKERS = {"floatlm": "o", "trilm": "s", "quantlm": "^", "packed": "D"}
QUANT_COLORS = {3: "#d62728", 4: "#ff7f0e", 6: "#bcbd22", 8: "#8c564b", 2: "#7f7f7f", 5: "#17becf", 7: "#e377c2"}


def series_label(model: dict[str, Any]) -> str:
    """The curve a model belongs to: its family or variant, QuantLM-b, or packed format."""
    if model["kind"] == "quantlm":
        return (
            f"QuantLM {model['bits']}-bit" if model["family"] == "floatlm" else f"{model['family']} {model['bits']}-bit"
        )
    if model["kind"] == "packed":
        return f"{'TriLM' if model['family'] == 'trilm' else model['family']} {model['format'].upper()}"
    return {"floatlm": "FloatLM", "trilm": "TriLM"}.get(model["family"], model["family"])


def _finite(v: Any) -> Any:
    """A number as it is, NaN or ±inf (a diverged run) as missing: one such value would make every interval that
    pools the seed variance unbounded (`nonfinite_metrics` lists them in the report)."""
    return v if not isinstance(v, float) or math.isfinite(v) else None


def model_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model: identity, size and every finite metric."""
    rows = []
    for rec in records.values():
        if rec["step"] != "eval" or rec["status"] != "done":
            continue
        m, met = rec["model"], rec["metrics"]
        row = {
            **m,
            "series": series_label(m),
            "val_loss": _finite(met.get("val_loss")),
            "perplexity": _finite(met.get("perplexity")),
            "bits_per_byte": _finite(met.get("bits_per_byte")),
            "weights_match": met.get("weights_match"),
        }
        for task, values in met.get("tasks", {}).items():
            for metric, v in values.items():
                if isinstance(v, (int, float)) and not metric.endswith("_stderr") and _finite(v) is not None:
                    row[f"{task}/{metric}"] = v
        for group, v in met.get("groups", {}).items():
            if _finite(v) is not None:
                row[f"group/{group}"] = v
        rows.append(row)
    rows.sort(key=lambda r: (r["series"], r["params"], r["seed"]))
    return rows


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    cols = ["val_loss"] if any(r.get("val_loss") is not None for r in rows) else []
    extra = sorted({k for r in rows for k in r if "/" in k})
    return cols + extra


def fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Validation loss (mean over seeds) vs parameters per latent family (and variant), where at least 3 sizes were
    evaluated."""
    out = {}
    for label in sorted({r["series"] for r in rows if r["kind"] in ("floatlm", "trilm")}):
        pts = list(_mean_loss(rows, series=label).items())
        if len(pts) < 3:
            continue
        N, L = zip(*pts, strict=True)
        out[label] = {}
        for key, offset in (("offset", True), ("pure", False)):
            try:
                out[label][key] = fit_power_law(N, L, offset=offset)
            except ValueError as e:
                out[label][key] = {"error": str(e)}
    return out


def _mean_loss(rows: list[dict[str, Any]], **match: Any) -> dict[int, float]:
    """Validation loss averaged over seeds, by parameter count, for the rows matching every `match` field."""
    by_params: dict[int, list[float]] = {}
    for r in rows:
        if r.get("val_loss") is not None and all(r.get(k) == v for k, v in match.items()):
            by_params.setdefault(r["params"], []).append(r["val_loss"])
    return {n: sum(v) / len(v) for n, v in sorted(by_params.items())}


def sequence_losses(records: dict[str, dict[str, Any]]) -> dict[str, tuple[list[float], list[int]]]:
    """Model name -> (NLL of each held-out window, tokens scored in each), from the eval records that carry them
    (all finite: a model with a non-finite window is left out of the paired comparisons)."""
    out = {}
    for rec in records.values():
        met = rec.get("metrics") or {}
        if rec["step"] == "eval" and rec["status"] == "done" and met.get("seq_nll") and met.get("seq_tokens"):
            if all(math.isfinite(v) for v in met["seq_nll"]):
                out[rec["model"]["name"]] = (met["seq_nll"], met["seq_tokens"])
    return out


def nonfinite_metrics(records: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """[step, status, reason] for each finished eval whose loss, perplexity or window losses are NaN or infinite (a
    diverged run): the report leaves those values out of its statistics and says so."""
    out = []
    for key, rec in records.items():
        met = rec.get("metrics") or {}
        if rec["step"] != "eval" or rec["status"] != "done":
            continue
        bad = [f"{k} {met[k]}" for k in ("val_loss", "perplexity", "bits_per_byte")
               if isinstance(met.get(k), float) and not math.isfinite(met[k])]
        if met.get("seq_nll") and not all(math.isfinite(v) for v in met["seq_nll"]):
            bad.append("window losses not finite")
        if bad:
            out.append([key, "done", f"{', '.join(bad)}: left out of every statistic and figure (a diverged run?)"])
    return out


def seed_summary(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[str, Any]]:
    """One row per model across seeds: the mean of `metric`, its spread (sd) and a 95 % interval whose half-width
    uses the seed variance pooled over all latent models (stats.contrast with one group)."""
    pool = pool_of(rows, metric)
    out = []
    for label in dict.fromkeys(r["series"] for r in rows):
        for size, values in seed_groups(rows, metric, series=label).items():
            first = next(r for r in rows if r["series"] == label and r["size"] == size)
            iv = contrast([values], [1], pool=pool)
            out.append({"series": label, "size": size, "kind": first["kind"], "params": first["params"],
                        "size_bits": first["size_bits"], "seeds": len(values), "mean": iv.estimate,
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "half_width": iv.hi - iv.estimate, "test": iv.test,
                        "name": first["name"].rsplit("-s", 1)[0]})
    return out


def _ci(check: dict[str, Any]) -> str:
    if check.get("estimate") is None:
        return "–"
    return interval_text(check["estimate"], check["lo"], check["hi"])


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    """A table as Markdown and as HTML."""
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return "\n".join(md), f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _save(fig, path: Path) -> Path:
    """Write a figure to `path` through a temporary name, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _plot_panels(rows: list[dict[str, Any]], metric: str, path: Path, fit: dict[str, Any], paper: bool) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    have = [r for r in rows if r.get(metric) is not None]
    if not have:
        return None
    fig, (ax_p, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    summary = seed_summary(rows, metric)
    unbounded = False
    for label in sorted({g["series"] for g in summary}):
        pts = sorted((g["params"], g["size_bits"], g["mean"], g) for g in summary if g["series"] == label)
        kind = pts[0][3]["kind"]
        bits = next(r.get("bits") for r in have if r["series"] == label)
        color = QUANT_COLORS.get(bits) if kind == "quantlm" else None
        # a point without an interval (one seed and no seed variance to pool) gets no bar and an open marker: a bar of
        # zero length would read as an exact value
        err = [p[3]["half_width"] if math.isfinite(p[3]["half_width"]) else math.nan for p in pts]
        open_pts = [p for p, e in zip(pts, err, strict=True) if math.isnan(e)]
        unbounded |= bool(open_pts)
        style = dict(
            marker=MARKERS.get(kind, "o"), label=label, color=color, linestyle="-" if kind != "packed" else ":",
            capsize=3,
        )
        for ax, x in ((ax_p, 0), (ax_b, 1)):
            if ax is ax_p and kind == "packed":  # the same models as the latent ones: only their size in bits differs
                continue
            bars = ax.errorbar([p[x] for p in pts], [p[2] for p in pts], yerr=err, **style)
            if open_pts:
                ax.plot([p[x] for p in open_pts], [p[2] for p in open_pts], linestyle="none", marker=style["marker"],
                        color=bars.lines[0].get_color(), markerfacecolor="white", zorder=3)
    if metric == "val_loss":
        for label, both in fit.items():
            f = both["offset"]
            if "A" not in f:
                continue
            xs = np.geomspace(min(r["params"] for r in have) / 1.5, max(r["params"] for r in have) * 1.5, 100)
            ax_p.plot(
                xs,
                f["A"] * xs ** (-f["alpha"]) + f["eps"],
                "--",
                linewidth=1,
                alpha=0.7,
                label=f"{label} fit {f['A']:.3g}·N^-{f['alpha']:.2f}+{f['eps']:.2f}",
            )
        if paper:
            xs = np.geomspace(5e7, 5e9, 100)
            for fam, f in PAPER_FITS.items():
                ax_p.plot(
                    xs,
                    f["A"] * xs ** (-f["alpha"]) + f["eps"],
                    ":",
                    color="gray",
                    label=f"paper {fam}: {f['A']:.0f}·N^-{f['alpha']}+{f['eps']}",
                )
    for ax, xlabel in ((ax_p, "parameters"), (ax_b, "size in bits (paper's count; packed: real)")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
    seeds = sorted({g["seeds"] for g in summary})
    note = f"mean of {'/'.join(map(str, seeds))} seed(s); bars: 95 % interval, seed variance pooled"
    if unbounded:
        note += "\nopen markers: no interval (one seed, no seed variance to pool)"
    ax_p.set_title(f"{metric} across parameters\n{note}", fontsize=9)
    ax_b.set_title(f"{metric} across size in bits\n{note}", fontsize=9)
    ax_p.legend(fontsize=7)
    ax_b.legend(fontsize=7)
    return _save(fig, path)


def _plot_contrasts(contrasts: list[dict[str, Any]], path: Path) -> Path:
    """Each contrast's estimate with its deciding 95 % interval (and the seed-blocked one, lighter), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(contrasts)
    fig, ax = plt.subplots(figsize=(9, 0.45 * n + 1.2))
    for i, c in enumerate(contrasts):
        y = n - 1 - i
        iv, bl = c["interval"], c["blocked"]
        ax.plot([bl.lo, bl.hi], [y - 0.18] * 2, color="#bbbbbb", lw=2)
        color = "#1f77b4" if c["sign"] == "not resolved" else "#d62728"
        ax.errorbar(iv.estimate, y, xerr=[[iv.estimate - iv.lo], [iv.hi - iv.estimate]], fmt="o", color=color,
                    capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{c['contrast']} ({c['size']})" for c in reversed(contrasts)], fontsize=8)
    ax.set_xlabel("Δ validation loss, nats/token (> 0: the first-named is worse)")
    ax.set_title("contrasts: 95 % t over seeds (red: excludes 0); grey: seed-blocked over all models", fontsize=9)
    return _save(fig, path)


def build_report(results: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.md, report.html, figures/*.png and summary.json. Returns their paths and the summary table."""
    results = Path(results)
    root = results if results.is_dir() else results.parent
    out = Path(out_dir) if out_dir is not None else root / "report"
    records = read_records(results)
    spec = {}
    if (root / "spec.json").exists():
        spec = read_json(root / "spec.json", "the study's spec")
        if not isinstance(spec, dict):
            raise FormatError(f"{root / 'spec.json'} is not the study's spec (a JSON object)")
    paper = spec.get("preset") == "paper"
    rows = model_rows(records)
    fit = fits(rows)
    cols = metric_columns(rows)

    sections_md: list[str] = [f"# Spectra suite report: {spec.get('name', root.name)}", ""]
    sections_html: list[str] = [f"<h1>Spectra suite report: {html.escape(str(spec.get('name', root.name)))}</h1>"]
    status = {}
    for rec in records.values():
        status[rec["status"]] = status.get(rec["status"], 0) + 1
    line = ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
    planned = spec.get("planned_steps")
    if isinstance(planned, list) and planned:  # a study written before 2026-12-07 did not record its plan
        missing = [k for k in planned if records.get(k, {}).get("status") != "done"]
        line += f", of {len(planned)} planned"
        if missing:
            line += (f". **Unfinished**: {len(missing)} planned step(s) are not done (e.g. {missing[0]}); every "
                     "finding below rests only on the models evaluated so far")
    sections_md += [f"Steps: {line}.", ""]
    sections_html.append(f"<p>Steps: {html.escape(line.replace('**', ''))}.</p>")

    def add(title: str, md_html: tuple[str, str], note: str = "") -> None:
        sections_md.extend([f"## {title}", "", *([note, ""] if note else []), md_html[0], ""])
        sections_html.append(
            f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(note)}</p>" if note else "") + md_html[1]
        )

    seqs = sequence_losses(records)
    by_model = seed_summary(rows)
    summary = _table(
        ["model", "kind", "params", "size (Mbit)", "seeds", "val_loss (mean)", "± 95 %", "sd over seeds"],
        [[g["name"], g["kind"], g["params"], g["size_bits"] / 1e6, g["seeds"], g["mean"], g["half_width"], g["sd"]]
         for g in by_model],
    )
    checks = study_checks(rows, seqs)
    found = findings(checks)
    if found:
        add(
            "Findings",
            _table(["finding", "verdict", "checks: holds / not resolved / does not hold"],
                   [[f["finding"], f["verdict"], f"{f['holds']} / {f['not_resolved']} / {f['does_not_hold']}"]
                    for f in found]),
            "Each finding combines the checks below: it holds when every one of them holds.",
        )
    if checks:
        add(
            "The paper's findings, checked",
            _table(
                ["check", "verdict", "claim", "estimate [95 % interval]", "test", "detail"],
                [[c["check"], c["verdict"], c["claim"], _ci(c), c["test"], c["detail"]] for c in checks],
            ),
            "A finding holds only when its 95 % interval excludes zero in the claimed direction; it does not hold "
            "when the interval excludes zero the other way; otherwise it is not resolved. Between separately "
            "trained models the unit is the seed (t with seeds as blocks, or the seed variance pooled over all "
            "latent models where a model lacks some seeds: see each check's test); a "
            "QuantLM or packed model is compared with its own base on the same held-out windows (paired t).",
        )
    conv_arms = conversion.arms(records, rows)
    conv = conversion.comparisons(conv_arms, rows, seqs)
    if conv_arms:
        add(
            "Runs started from other runs: loss and compute",
            _table(["arm", "size", "family", "starts from", "teacher", "own tokens", "seeds", "val_loss (mean)",
                    "± 95 %", "sd over seeds", "total tokens", "total FLOPs", "train tok/s"],
                   [[a["arm"], a["size"], a["base_family"], a["init"] or "random", a["teacher"] or "–",
                     f"{a['tokens']:.3g}", a["seeds"], a["mean"], a["half_width"], a["sd"],
                     f"{a['total_tokens']:.3g}", f"{a['total_flops']:.3g}", f"{a['tokens_per_s']:.0f}"]
                    for a in conv_arms]),
            "Validation loss (nats/token, held-out split) over seeds, ± the 95 % interval with the seed variance "
            "pooled over all latent models. Total tokens and FLOPs count every run that made the model once: a "
            "converted arm includes its FloatLM's pretraining, a distilled one the teacher's forward passes (a third "
            "of its training FLOPs per token); FLOPs are 6·N + attention per token. tok/s depends on machine load.",
        )
    if conv:
        add(
            "Conversion compared with training from scratch",
            _table(["comparison", "size", "at", "Δ loss over seeds [95 %]", "verdict (Δ < 0)",
                    "Δ loss paired over held-out windows [95 %]", "compute ratio"],
                   [[c["comparison"], c["size"], c["basis"], c["seed_text"], c["verdict"], c["paired_text"],
                     f"{c['flops_ratio']:.2f}x" if c["flops_ratio"] else None] for c in conv]),
            "Δ = the arm's loss minus the from-scratch arm's. The verdict uses the seed interval (separately trained "
            "models: the unit is the seed): holds when it lies below 0, does not hold when above, else not resolved. "
            "The paired interval (window NLLs averaged over seeds) measures only the held-out text's variability.",
        )
    add("Models, over seeds", summary,
        "Validation loss (nats/token on the held-out split) averaged over seeds. ± is the 95 % interval half-width "
        "with the seed variance pooled over all latent models; sd is this model's own spread over its seeds.")
    costs = quant_costs(rows, seqs)
    if costs:
        all_bits = sorted({b for v in costs.values() for b in v})
        add(
            "Quantization cost, paired",
            _table(["size"] + [f"{b}-bit − float" for b in all_bits],
                   [[size] + [v[b].text() if b in v else None for b in all_bits] for size, v in costs.items()]),
            "Loss of each GPTQ QuantLM minus its own FloatLM on the same held-out windows (nats/token), with the "
            "95 % paired t-interval over windows (window NLLs averaged over seeds).",
        )
    variants = sorted({g["series"] for g in by_model if g["kind"] in ("floatlm", "trilm")} - {"FloatLM"})
    if any(v != "TriLM" for v in variants):
        table = block_table(rows)
        comp_rows = []
        for base in ("FloatLM", "TriLM"):
            ref = seed_values(rows, series=base)
            for label in variants:
                if label == base:
                    continue
                for size, values in seed_values(rows, series=label).items():
                    if size in ref:
                        iv = between(table, [values, ref[size]], [1, -1])
                        comp_rows.append([f"{label} − {base}", size, len(values), len(ref[size]), iv.text(),
                                          "lower" if iv.hi < 0 else "higher" if iv.lo > 0 else "not resolved"])
        add(
            "Variants compared",
            _table(["comparison", "size", "seeds", "base seeds", "Δ loss [95 %]", "variant's loss"], comp_rows),
            "Difference of mean validation loss over seeds, t-interval with seeds as blocks (a seed fixes the data "
            "order of every model; residual variance over all latent models), or the seed variance pooled over them "
            "where a model lacks some seeds.",
        )
    contrasts = contrast_rows(rows, spec.get("contrasts") or {})
    if contrasts:
        add(
            "Contrasts",
            _table(["contrast", "weights", "size", "estimate [95 %]", "test", "sign",
                    "seed-blocked over all models [95 %]"],
                   [[c["contrast"], ", ".join(f"{w:+g}·{f}" for f, w in c["weights"].items()), c["size"],
                     c["interval"].text(), c["interval"].test, c["sign"], c["blocked"].text()] for c in contrasts]),
            "The spec's [contrasts]: Σ weight · mean validation loss over seeds. Its 95 % interval is the t over "
            "seeds of the per-seed contrast (only the contrast's own models; for two models, the paired t-test over "
            "seeds); a sign is given only when it excludes zero. The last column is the seed-blocked interval with "
            "the residual variance of every latent model of the run, which is narrower when the run has many "
            "models and wider when some of them are far noisier across seeds than the contrast's own.",
        )
    add(
        "Models, one row per seed",
        _table(
            ["model", "series", "params", "size (Mbit)"] + cols,
            [[r["name"], r["series"], r["params"], r["size_bits"] / 1e6] + [r.get(c) for c in cols] for r in rows],
        ),
        "Size in bits as the paper counts it: embeddings and head at 16 bits; block weights at 16 (FloatLM), "
        "b + 0.25 for 3/4-bit g128 QuantLMs, b for 6/8-bit, log2 3 for TriLM, 2.0625 / 1.6875 for TQ2_0 / TQ1_0.",
    )

    fit_rows = []
    for label, both in fit.items():
        f, pure = both["offset"], both["pure"]
        pure_text = f"{pure['A']:.4g}·N^-{pure['alpha']:.4f}" if "A" in pure else pure["error"]
        if "A" in f:
            se = f.get("stderr") or {}
            fit_rows.append(
                [
                    label,
                    f"{f['A']:.4g} ± {_fmt(se.get('A'))}",
                    f"{f['alpha']:.4f} ± {_fmt(se.get('alpha'))}",
                    f"{f['eps']:.4f} ± {_fmt(se.get('eps'))}",
                    f["rmse"],
                    f["n"],
                    pure_text,
                ]
            )
        else:
            fit_rows.append([label, f["error"], None, None, None, None, pure_text])
    if paper:
        for fam, f in PAPER_FITS.items():
            fit_rows.append([f"paper {fam}", f["A"], f["alpha"], f["eps"], None, 9, None])
    if fit_rows:
        add(
            "Scaling-law fits: L(N) = A·N^(−α) + ε",
            _table(["series", "A", "α", "ε", "rmse", "points", "pure power law"], fit_rows),
            "Least squares over total parameters N (the paper's x axis). ± is one standard error; '–' where the fit "
            "has as many parameters as points.",
        )

    pts = [(g["size_bits"], g["mean"], g) for g in by_model]
    front = pareto_front(pts)
    add(
        "Pareto frontier: validation loss vs size in bits",
        _table(
            ["model", "series", "size (Mbit)", "val_loss (mean over seeds)", "± 95 %"],
            [[g["name"], g["series"], g["size_bits"] / 1e6, g["mean"], g["half_width"]] for g in front],
        ),
        "Models for which no other model is both smaller in bits and lower in mean validation loss.",
    )

    mem = {}
    for rec in records.values():
        if rec["status"] == "done" and rec["step"] in ("train", "quantize", "pack"):
            m = rec["model"]
            mem.setdefault(m["size"], {})[series_label(m)] = (m["size_bits"], rec["metrics"].get("stored_bits"))
    labels = sorted({k for v in mem.values() for k in v})
    mem_rows = [
        [size]
        + [
            _fmt(v[lab][0] / 8 / 2**20, 3) + (f" ({v[lab][1] / 8 / 2**20:.3g})" if v[lab][1] else "")
            if lab in v
            else None
            for lab in labels
        ]
        for size, v in mem.items()
    ]
    if mem_rows:
        add(
            "Memory (MiB)",
            _table(["size"] + labels, mem_rows),
            "Paper's count (FloatLM at fp16), and in parentheses the bytes the checkpoint really stores.",
        )

    speed_rows = []
    for rec in records.values():
        if rec["step"] == "bench" and rec["status"] == "done":
            for r in rec["metrics"].get("results", []):
                speed_rows.append(
                    [
                        rec["model"]["name"],
                        r.get("variant"),
                        r.get("threads"),
                        r.get("prompt_tokens_per_s"),
                        r.get("decode_tokens_per_s"),
                        r.get("ms_per_token"),
                        r.get("weights_mb"),
                    ]
                )
    if speed_rows:
        add(
            "Speed (spectra bench)",
            _table(
                ["model", "variant", "threads", "prompt tok/s", "decode tok/s", "ms/token", "weights MB"], speed_rows
            ),
        )

    failed = [[k, r["status"], r.get("error")] for k, r in records.items() if r["status"] != "done"]
    failed += nonfinite_metrics(records)
    if failed:
        add("Steps that did not finish or gave no finite number", _table(["step", "status", "reason"], failed))

    figures = []
    for metric in cols:
        name = metric.replace("/", "_")
        try:
            p = _plot_panels(rows, metric, out / "figures" / f"{name}.png", fit, paper)
        except ImportError as e:
            raise ImportError("the report's figures need matplotlib: pip install 'spectra-lm[plot]'") from e
        if p is not None:
            figures.append(p)
    if contrasts:
        figures.append(_plot_contrasts(contrasts, out / "figures" / "contrasts.png"))
    for p in figures:
        rel = p.relative_to(out)
        sections_md += [f"![{p.stem}]({rel})", ""]
        data = base64.b64encode(p.read_bytes()).decode()
        sections_html.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"/></figure>')

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "report.md") as f:
        f.write("\n".join(sections_md))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}"
    )
    with atomic_file(out / "report.html") as f:
        f.write(
            f"<!doctype html><html><head><meta charset='utf-8'><title>Spectra suite report</title>"
            f"<style>{style}</style></head><body>{''.join(sections_html)}</body></html>"
        )
    write_json(  # strict JSON: an unbounded interval's inf half-width (one seed) is written as null
        out / "summary.json",
        finite_json({"models": rows, "over_seeds": by_model, "fits": fit, "pareto": [r["name"] for r in front],
                      "checks": checks, "findings": found, "conversion": {"arms": conv_arms, "comparisons": conv},
         "quant_costs": {s: {b: iv.to_dict() for b, iv in v.items()} for s, v in costs.items()},
         "contrasts": [{**c, "interval": c["interval"].to_dict(), "blocked": c["blocked"].to_dict()}
                       for c in contrasts]}),
    )
    return {
        "markdown": str(out / "report.md"),
        "html": str(out / "report.html"),
        "figures": [str(p) for p in figures],
        "summary_table": summary[0]
        + "".join(f"\n{c['verdict']}: {c['check']}: {_ci(c)} ({c['test']}; {c['detail']})" for c in checks)
        + "".join(f"\nFINDING {f['verdict']}: {f['finding']} ({f['holds']}/{f['checks']} checks hold)" for f in found)
        + "".join(f"\n{c['verdict']}: {c['comparison']} < 0 at {c['size']}, {c['basis']}: {c['seed_text']} over "
                  f"seeds; paired {c['paired_text']}" for c in conv),
        "checks": checks,
        "findings": found,
        "conversion": conv,
    }
