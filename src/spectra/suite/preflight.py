"""What the suite settles before its first step: one tokenizer for the whole study, data big enough for it, and
evaluation tasks that exist.

Every model of a study must share one tokenizer, so that a QuantLM and its FloatLM (or a TriLM and a FloatLM) are
scored on the same held-out windows and can be compared window by window. With `tokenizer = "bpe:N"` the BPE is
trained once on the study's own data (train split) and kept in `OUT/tokenizer/`, whatever `data` points at.

The data is then measured in that tokenizer's tokens, and the run stops with one line naming the file when

    validation tokens < MIN_EVAL_WINDOWS · eval window      (too few held-out windows for a paired interval), or
    train tokens · MAX_PASSES < the largest per-model budget (the models would see the same text too many times).

Streamed `hf:` sources are not measured (they are large by nature, and reading them twice costs a download).

A study resumed in its folder (`spectra suite ... --out OUT` again) must be the same study: settings that change
what a finished step made (tokens, data, tokenizer, the [model], [train], [quantize], [eval] tables, variants,
learning rates, tasks) are compared with OUT/spec.json, and a change is refused while OUT holds finished steps (they
would be kept as they are, beside steps made with the new settings). Adding sizes, seeds, families, bit widths or
pack formats only adds steps, and is allowed.

The `tasks` are checked as every eval step will run them (`spectra.eval.check_tasks`, with the spec's [eval] options):
a misspelt task, or one without offline data, stops the study here rather than after its training. Tasks that are
neither "ppl", "cloze" nor in `offline_dir` are looked up in lm-eval's task index (20-30 s to build).
"""

from __future__ import annotations

import collections.abc
import os
import types
import typing
from pathlib import Path
from typing import Any

from spectra.suite.spec import SuiteSpec

MIN_EVAL_WINDOWS = 32  # paired t-intervals over fewer held-out windows are too wide to resolve anything
MAX_PASSES = 4  # a budget may repeat the training text at most this many times


def study_tokenizer(spec: SuiteSpec, out: Path, *, progress: bool = False) -> str:
    """The tokenizer every model of the study uses: 'builtin', a path, or a 'bpe:N' trained once on `spec.data`."""
    from spectra.data.tokenizer import resolve_tokenizer

    if str(spec.tokenizer).startswith("bpe:"):
        return str(resolve_tokenizer(spec.tokenizer, spec.data, out / "tokenizer"))
    return spec.tokenizer


def count_tokens(source: str | os.PathLike, tokenizer: str | os.PathLike, split: str) -> tuple[int, int]:
    """(tokens, documents) of one split of `source` in `tokenizer`, each document followed by EOS as in training."""
    from spectra.data import load_tokenizer, read_documents
    from spectra.data.tokenizer import resolve_tokenizer

    if str(tokenizer).startswith("bpe:"):
        raise ValueError(f"count_tokens needs a trained tokenizer, got {tokenizer!r} (see study_tokenizer)")
    tok = load_tokenizer(resolve_tokenizer(tokenizer, source, "."))  # 'builtin' or a path: nothing is written
    n_tokens, n_docs, batch = 0, 0, []

    def flush() -> int:
        n = sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))
        batch.clear()
        return n

    for doc in read_documents(source, split):
        batch.append(doc)
        n_docs += 1
        if len(batch) == 256:
            n_tokens += flush()
    if batch:
        n_tokens += flush()
    return n_tokens, n_docs


def check_data(spec: SuiteSpec, tokenizer: str | os.PathLike) -> dict[str, Any]:
    """Measure the study's data in `tokenizer`'s tokens; raise a one-line ValueError when it is too small."""
    src = str(spec.data)
    if src.startswith("hf:"):
        return {"source": src, "measured": False}
    train_tokens, train_docs = count_tokens(src, tokenizer, "train")
    val_tokens, _ = count_tokens(src, tokenizer, "validation")
    window = spec.eval_window()
    need_val = MIN_EVAL_WINDOWS * window
    if val_tokens < need_val:
        raise ValueError(
            f"data {src}: its validation split holds {val_tokens} tokens, fewer than the {need_val} "
            f"({MIN_EVAL_WINDOWS} windows of {window}) the paired comparisons need; use a larger file (a few MB of "
            "text: the last 5% of a .txt file's lines are held out)")
    budget = max(spec.tokens_for(s, f) for s in spec.sizes for f in spec.families)
    if train_tokens * MAX_PASSES < budget:
        raise ValueError(
            f"data {src}: its train split holds {train_tokens} tokens; the largest model's budget of {budget:.3g} "
            f"tokens would repeat it more than {MAX_PASSES} times; use a file of at least "
            f"{budget / MAX_PASSES / max(train_tokens, 1) * _size_mb(src):.1f} MB or lower [suite] tokens")
    return {"source": src, "measured": True, "train_tokens": train_tokens, "train_documents": train_docs,
            "validation_tokens": val_tokens, "passes": budget / train_tokens}


def _size_mb(source: str) -> float:
    """Bytes of a source's files, in MB (the builtin corpus: its text)."""
    from spectra.data.corpora import builtin_corpus_dir, list_files

    if source == "builtin":
        files = list(builtin_corpus_dir().glob("*.txt"))
    else:
        files = list_files(source)
    return sum(f.stat().st_size for f in files) / 1e6


def check_tasks(spec: SuiteSpec) -> list[str]:
    """The spec's evaluation tasks as its eval steps will run them; a one-line ValueError naming [suite] tasks when one
    is unknown or has no offline data."""
    from spectra.eval import check_tasks as check

    try:
        return check(spec.tasks, data=spec.data, **spec.eval)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"[suite] tasks: {e}") from None


RUNNER_ARGS = {
    "eval": ("model_path", "tasks", "data", "progress"),
    "quantize": ("model_path", "out_dir", "bits", "calib", "seed", "format", "progress"),
    "bench": ("model_or_size", "dtypes"),
}
"""Arguments the study's steps pass themselves, which its [eval], [quantize] and [bench] tables may not set."""


def check_options(spec: SuiteSpec) -> None:
    """The [eval], [quantize] and [bench] tables' keys checked against the functions their steps call
    (`spectra.eval.evaluate`, `spectra.ptq.pipeline.quantize`, `spectra.inference.bench.bench`): a misspelt key is
    refused here, with the accepted ones, instead of failing every such step after the training."""
    import inspect

    from spectra.eval.run import evaluate
    from spectra.inference.bench import bench
    from spectra.ptq.pipeline import quantize

    tables = {"eval": (spec.eval, evaluate), "quantize": (spec.quantize, quantize),
              "bench": (spec.bench_options, bench)}
    for table, (options, fn) in tables.items():
        own = RUNNER_ARGS[table]
        accepted = sorted(set(inspect.signature(fn).parameters) - set(own))
        hints = typing.get_type_hints(fn)
        for key, value in options.items():
            if key in own:
                raise ValueError(f"[{table}] {key}: set by the study itself, not in [{table}]; accepted: {accepted}")
            if key not in accepted:
                raise ValueError(f"[{table}] unknown key {key!r}; accepted: {accepted}")
            if key in hints and not _fits(value, hints[key]):  # `ppl_max_tokens = "lots"` failed every eval step
                raise ValueError(f"[{table}] {key} = {value!r}: expected {_type_text(hints[key])}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value can be the argument annotated `hint` (bool is not a number here; a type this cannot
    judge is left to the function)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if isinstance(hint, type) and hint.__module__ in ("torch", "torch.nn.modules.module"):
        return False  # a torch object: a study file cannot give one
    return True


def _type_text(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace("'>", "")
    return text.replace("torch.nn.modules.module.Module", "torch.nn.Module")


EXTENDING = ("name", "sizes", "seeds", "families", "quant_bits", "pack_formats", "bench", "preset", "contrasts")
"""[suite] keys whose change only adds (or leaves out) steps, or only changes the report: a resumed study may change
them. Every other key of the spec redefines what a finished step made."""


PER_SIZE = ("tokens", "size_table", "lr")
"""Spec keys with an entry per size: a resumed study may add or leave out sizes' entries (a narrowed ladder drops the
left-out sizes' [lr] rates, a wider one adds them), but not change the entry of a size it shares with the study."""


def _size_entry(key: str, value: Any, size: str, families: list[str]) -> Any:
    """One size's entry of a PER_SIZE key's value: its token budget, its [sizes] table, or its [lr] rate per family."""
    if key == "lr":
        return {f: value[f][size] for f in families if isinstance(value, dict) and size in (value.get(f) or {})}
    return value.get(size) if isinstance(value, dict) else value


def check_same_study(out: Path, spec: SuiteSpec, data: dict[str, Any] | None = None) -> None:
    """Refuse to resume the study in `out` with settings that redefine its finished steps (module docstring); `data`:
    this run's `check_data` measurement, compared with the one the study recorded (the same file, other contents)."""
    import json

    from spectra.suite.records import RESULTS_FILE, Records

    prev_file, results = out / "spec.json", out / RESULTS_FILE
    if not prev_file.exists() or not results.exists():
        return
    if not any(r.get("status") == "done" for r in Records(results, write=False).last.values()):
        return
    try:
        prev = json.loads(prev_file.read_text())
    except (OSError, ValueError):
        return
    new = json.loads(json.dumps(spec.to_dict()))
    changed = [f"{k}: {prev.get(k)!r} -> {new.get(k)!r}" for k in new
               if k not in EXTENDING and k not in PER_SIZE and prev.get(k) != new[k]]
    shared = [s for s in new["sizes"] if s in (prev.get("sizes") or [])]  # the sizes that may have finished steps
    families = [f for f in new["families"] if f in (prev.get("families") or [])]
    for k in PER_SIZE:
        for size in shared:
            was, now = (_size_entry(k, d.get(k), size, families) for d in (prev, new))
            if was != now:
                changed.append(f"{k} of size {size}: {was!r} -> {now!r}")
    before = prev.get("data_measured") or {}
    if data and data.get("measured") and before.get("measured"):
        for k in ("train_tokens", "validation_tokens"):
            if before.get(k) != data.get(k):
                changed.append(f"data {k}: {before.get(k)} -> {data.get(k)} (the data changed)")
    if changed:
        raise ValueError(f"{out} holds a study with finished steps made with other settings ({'; '.join(changed[:3])}"
                         f"{'; ...' if len(changed) > 3 else ''}); they would be kept as they are beside steps made "
                         f"with the new ones: use another --out, or delete {results} to run every step again")
