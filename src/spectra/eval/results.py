"""Evaluation results: one JSON document per run, and a table for the screen.

    {"format": "spectra-eval", "version": 1, "date": ...,
     "model": {"path", "name", "family", "kind", "params", "non_embedding_params", "size_bits", "size", "config"},
     "harness": {"name": "lm-evaluation-harness", "version": "0.4.13", "paper_version": "0.4.2"},
     "settings": {"tasks", "limit", "num_fewshot", "offline_dir", "skipped"},
     "tasks": {task: {metric: value}},          lm-eval metric names without the filter suffix ("acc", "acc_norm"),
                                                and "<metric>_stderr" for means of per-document scores (`add_stderr`)
     "groups": {name: {"members": {"task/metric": value | null}, "average": value | null, "complete": bool}},
     "perplexity": {...}}                       when perplexity was measured (spectra.eval.perplexity)

`size_bits` counts weights the way the paper does (`spectra.accounting.size_report`): 16 bits for FloatLM, log2(3)
for TriLM, b + 0.25 · 128/g for a b-bit QuantLM in groups of g (3.25 / 4.25 at the paper's 3 and 4 bits, g128), b
for one group per row (`spectra.accounting.quantlm_bits`).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from spectra.eval.tasks import GROUPS

PAPER_HARNESS_VERSION = "0.4.2"


def model_identity(model: nn.Module, model_path: str | os.PathLike | None) -> dict[str, Any]:
    """Who was evaluated: path, config, parameter counts and size in bits as the paper counts them."""
    from spectra.accounting import quantlm_bits, size_in_bits, size_report

    cfg = model.config
    kind = "model"
    if model_path is not None and (Path(model_path) / "spectra.json").exists():
        from spectra.files import read_meta

        kind = read_meta(model_path).get("kind", kind)
    elif model_path is not None and (Path(model_path) / "config.json").exists():
        kind = "hf"
    size = size_report(cfg)
    size_bits = size["bits"]["this_model"]
    ptq = getattr(model, "ptq_checkpoint", None)  # set by spectra.ptq.formats.load_quantlm
    if ptq is not None:  # a QuantLM: a FloatLM config with b-bit block weights
        kind = "quantlm"
        size_bits = size_in_bits(cfg, quantlm_bits(int(ptq["bits"]), int(ptq.get("group_size", -1))))
        size["bits"]["this_model"] = size_bits  # (it kept the FloatLM's 16-bit count beside size_bits)
    return {
        "path": None if model_path is None else str(model_path),
        "name": cfg.name,
        "family": cfg.family,
        "kind": kind,
        "params": size["params"],  # from the config: packed and QuantLM layers hold buffers, not parameters
        "non_embedding_params": size["non_embedding_params"],
        "size_bits": size_bits,
        "size": size,
        "config": cfg.to_dict(),
    }


def task_metrics(raw_results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} -> {"acc": 0.5, "acc_stderr": ...}."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in raw_results.items():
        clean = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            clean.setdefault(key.split(",")[0], float(value))
        out[task] = clean
    return out


BINARY_METRICS = ("acc", "acc_norm", "exact_match", "pct_stereotype")
"""Metrics that are a mean of one score per document (0/1 for most tasks, a probability for some, as
truthfulqa_mc2's acc), shown in %, with a standard error."""


def add_stderr(metrics: dict[str, dict[str, float]], samples: dict[str, list[dict[str, Any]]],
               group_subtasks: dict[str, list[str]] | None = None) -> None:
    """`<metric>_stderr` for each mean of per-document scores without one: the sample standard deviation of the
    task's per-document values (lm-eval's logged samples) over sqrt(n), the standard error lm-eval's `mean_stderr`
    gives (sqrt(p(1 − p)/(n − 1)) for 0/1 scores), which lm-eval skips when its bootstrap is off (`bootstrap_iters=0`,
    here: its bootstrap spawns a process per core). Only where the task's value is the mean of those per-document
    values (a task that aggregates otherwise gets none). Then a group's (`group_subtasks`: lm-eval's group -> member
    tasks or groups): its members' standard errors combined as its mean combines them, sqrt(Σ n_i² se_i²) / Σ n_i
    for a mean weighted by size and sqrt(Σ se_i²) / k for a plain one (members independent), whichever the group's
    value is."""
    sizes: dict[str, int] = {}
    for task, values in metrics.items():
        by_filter: dict[Any, list[dict[str, Any]]] = {}  # a task with several filters logs each document per filter
        for d in samples.get(task) or []:
            by_filter.setdefault(d.get("filter"), []).append(d)
        sizes[task] = max(map(len, by_filter.values()), default=0)
        for name in BINARY_METRICS:
            p = values.get(name)
            if p is None or f"{name}_stderr" in values:
                continue
            for docs in by_filter.values():  # the filter whose documents' mean is the task's value
                xs = [d.get(name) for d in docs]
                if len(xs) < 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                          for x in xs):
                    continue
                n = len(xs)
                mean = math.fsum(xs) / n
                if math.isclose(mean, p, rel_tol=1e-9, abs_tol=1e-12):
                    values[f"{name}_stderr"] = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1) / n)
                    break
    for group in _groups_leaves_first(group_subtasks or {}):
        members = [m for m in group_subtasks[group] if m in metrics]
        values = metrics.get(group)
        if values is None or not members or len(members) != len(group_subtasks[group]):
            continue
        sizes[group] = sum(sizes.get(m, 0) for m in members)
        for name in BINARY_METRICS:
            p = values.get(name)
            ps = [metrics[m].get(name) for m in members]
            ses = [metrics[m].get(f"{name}_stderr") for m in members]
            ns = [sizes.get(m, 0) for m in members]
            if p is None or f"{name}_stderr" in values or None in ps or None in ses or min(ns) < 1:
                continue
            total = sum(ns)
            if math.isclose(p, math.fsum(n * x for n, x in zip(ns, ps)) / total, rel_tol=1e-9, abs_tol=1e-12):
                values[f"{name}_stderr"] = math.sqrt(math.fsum((n * se) ** 2 for n, se in zip(ns, ses))) / total
            elif math.isclose(p, math.fsum(ps) / len(ps), rel_tol=1e-9, abs_tol=1e-12):
                values[f"{name}_stderr"] = math.sqrt(math.fsum(se**2 for se in ses)) / len(ses)


def _groups_leaves_first(group_subtasks: dict[str, list[str]]) -> list[str]:
    """lm-eval's groups, each after the groups among its members."""
    order: list[str] = []

    def visit(g: str, path: tuple[str, ...]) -> None:
        if g in order or g in path:
            return
        for m in group_subtasks.get(g, ()):
            if m in group_subtasks:
                visit(m, (*path, g))
        order.append(g)

    for g in group_subtasks:
        visit(g, ())
    return order


def group_scores(tasks: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The paper's groups from per-task metrics; an average only where the paper defines one and all members ran."""
    groups = {}
    for group in GROUPS:
        members = {f"{t}/{m}": tasks.get(t, {}).get(m) for t, m in group.members}
        present = [v for v in members.values() if v is not None]
        if not present:
            continue
        complete = len(present) == len(members)
        average = sum(present) / len(present) if group.average and complete else None
        groups[group.name] = {"members": members, "average": average, "complete": complete}
    return groups


def build_results(
    raw: dict[str, Any],
    *,
    model: nn.Module,
    model_path: str | os.PathLike | None,
    tasks: list[str],
    limit: int | float | None = None,
    offline_dir: str | os.PathLike | None = None,
    skipped: list[str] | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """The results document (module docstring) from lm-eval's `evaluator.evaluate` output."""
    try:
        import lm_eval
    except ImportError:  # perplexity alone needs no lm-eval
        lm_eval = None

    metrics = task_metrics(raw.get("results", {}))
    add_stderr(metrics, raw.get("samples") or {}, raw.get("group_subtasks") or {})
    return {
        "format": "spectra-eval",
        "version": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model_identity(model, model_path),
        "harness": {
            "name": "lm-evaluation-harness",
            "version": None if lm_eval is None else getattr(lm_eval, "__version__", "unknown"),
            "paper_version": PAPER_HARNESS_VERSION,
            "task_versions": raw.get("versions", {}),
            "n_samples": raw.get("n-samples", {}),
        },
        "settings": {
            "tasks": tasks,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "offline_dir": None if offline_dir is None else str(offline_dir),
            "skipped": skipped or [],
        },
        "tasks": metrics,
        "groups": group_scores(metrics),
    }


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if key.split("/")[-1] in BINARY_METRICS:
            return f"{100 * v:.1f}"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _pm(stderr: Any, key: str) -> str:
    """' ± <standard error>' in the metric's own units, or nothing."""
    if not isinstance(stderr, float) or not math.isfinite(stderr):
        return ""
    return f" ± {_fmt(stderr, key)}"


def format_table(results: dict[str, Any]) -> str:
    """Per-task metrics (accuracies in %, ± their standard errors), the paper's groups, and perplexity if present, as
    plain text."""
    m = results.get("model", {})
    lines = [f"model {m.get('path') or m.get('name')}  family {m.get('family')}  kind {m.get('kind')}  "
             f"params {m.get('params', 0) / 1e6:.1f}M  size {m.get('size_bits', 0) / 1e9:.3f}e9 bits  "
             f"lm-eval {results.get('harness', {}).get('version')}"]
    tasks = results.get("tasks", {})
    requested = [t for t in results.get("settings", {}).get("tasks", []) if t in tasks] or list(tasks)
    if requested:
        width = max(len(t) for t in requested) + 2
        lines.append(f"{'task':<{width}}metrics (accuracies in %)")
        for task in requested:
            shown = "  ".join(f"{k} {_fmt(v, k)}" + _pm(tasks[task].get(f"{k}_stderr"), k)
                              for k, v in tasks[task].items() if not k.endswith("_stderr"))
            lines.append(f"{task:<{width}}{shown}")
        if len(tasks) > len(requested):
            lines.append(f"(+{len(tasks) - len(requested)} subtasks and subgroups in the JSON results)")
    for name, g in results.get("groups", {}).items():
        members = "  ".join(f"{k} {_fmt(v, k)}" for k, v in g["members"].items())
        avg = f"  average {_fmt(g['average'], 'acc')}" if g["average"] is not None else ""
        lines.append(f"[{name}]{avg}  {members}")
    ppl = results.get("perplexity")
    if ppl:
        lines.append(f"perplexity {ppl['source']} ({ppl['split']}): ppl {ppl['ppl']:.3f}  loss {ppl['loss']:.4f}  "
                     f"bits/byte {ppl['bits_per_byte']:.4f}  tokens {ppl['tokens']}  seq_len {ppl['seq_len']}  "
                     f"stride {ppl['stride']}")
    skipped = results.get("settings", {}).get("skipped")
    if skipped:
        lines.append(f"not available offline (skipped): {', '.join(skipped)}")
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """`results` as strict JSON: a NaN or infinite value (a diverged model's perplexity, a window's NLL) as null."""
    from spectra.files import finite_json, write_json

    write_json(path, finite_json(results))
    return Path(path)
