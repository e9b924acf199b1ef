"""`evaluate` and `check_tasks`: which tasks a request names, and running them. Perplexity ("ppl") needs only the
core; lm-eval (the `eval` extra) is imported, with our adapter `spectra.eval.harness`, only when a benchmark or the
cloze task is named."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _lm_eval_tasks():
    """lm-eval's task module, with the adapter registered (`spectra.eval.harness` says which extra a missing lm-eval
    needs)."""
    from spectra.eval import harness  # registers the `spectra` model class; a clear error without lm-eval

    return harness.lm_eval.tasks


def _task_plan(tasks: str | list[str], offline_dir, include_path, include_defaults: bool, data,
               index: bool = True) -> tuple[list[str], bool, list[str], Any]:
    """(lm-eval task names, whether "ppl" was asked for, names skipped as unavailable offline, the TaskManager or None)
    for `evaluate`'s arguments, every name checked (ValueError: unknown, with the closest names; FileNotFoundError: an
    explicitly named task without offline data). `index=False`: lm-eval's task index (20-30 s to build) is built
    only for names that are neither the cloze task nor in `offline_dir`'s manifest."""
    import spectra.eval.tasks as task_lib

    names = task_lib.resolve(tasks)
    want_ppl = task_lib.PPL_TASK in names
    names = [n for n in names if n != task_lib.PPL_TASK]
    include = [] if include_path is None else (list(include_path) if isinstance(include_path, list) else [include_path])
    unavailable: list[str] = []
    manager = None
    if names:
        if offline_dir is not None:
            requested = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
            yaml_dir, names, unavailable = task_lib.offline_tasks(offline_dir, names, strict="paper" not in requested)
            if unavailable:
                log.warning("not available offline, skipped: %s", ", ".join(unavailable))
            include.append(yaml_dir)
        # offline_tasks kept only the names the offline folder holds: every one is local there, and elsewhere cloze
        local = offline_dir is not None or set(names) <= {task_lib.CLOZE_TASK}
        if not index and include_path is None and local:
            return names, want_ppl, unavailable, None
        if task_lib.CLOZE_TASK in names:
            from spectra.eval.cloze import write_cloze_task

            include.append(write_cloze_task(source=data or "builtin"))
        TaskManager = _lm_eval_tasks().TaskManager
        logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)  # local YAMLs override built-ins on purpose
        manager = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=include_defaults)
        task_lib.check_known(names, manager)
    return names, want_ppl, unavailable, manager


def check_tasks(tasks: str | list[str], *, offline_dir: str | os.PathLike | None = None,
                include_path: str | os.PathLike | list | None = None, include_defaults: bool = True,
                data: str | os.PathLike | None = None, **_: Any) -> list[str]:
    """The task names `evaluate(model, tasks, ...)` would run with these options, checked before any model exists
    (`spectra suite` calls it before its first training step): raises as `evaluate` would on an unknown name or a
    task without offline data. Options `evaluate` takes that do not choose tasks are ignored."""
    from spectra.eval.tasks import CLOZE_TASK, PPL_TASK

    names, want_ppl, _, _ = _task_plan(tasks, offline_dir, include_path, include_defaults, data, index=False)
    if CLOZE_TASK in names:  # the items exist (`_task_plan` writes the task only when it builds lm-eval's index)
        from spectra.eval.cloze import cloze_items

        cloze_items(data or "builtin")
    return names + ([PPL_TASK] if want_ppl else [])


def evaluate(
    model_path: str | os.PathLike | nn.Module,
    tasks: str | list[str] = "paper",
    *,
    limit: int | float | None = None,
    batch_size: int = 16,
    offline_dir: str | os.PathLike | None = None,
    include_path: str | os.PathLike | list | None = None,
    include_defaults: bool = True,
    tokenizer: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    num_fewshot: int | None = None,
    data: str | os.PathLike | None = None,
    ppl_seq_len: int | None = None,
    ppl_stride: int | None = None,
    ppl_max_tokens: int | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on lm-eval tasks (zero-shot unless `num_fewshot`, as in the paper) and/or perplexity.

    `tasks`: "paper", "cloze", "ppl", a comma-separated string or a list mixing those and lm-eval task names.
    "ppl" measures `spectra.eval.perplexity` on `data` (a `read_documents` source, default "builtin", validation
    split); "cloze" builds the LAMBADA-style task from the same `data`. With `offline_dir` (the output of
    `spectra data evals`) local copies of the benchmark data replace the hub datasets: an explicitly named task
    without local data raises; the "paper" preset skips logiqa, crows_pairs_english and truthfulqa_mc1 (no offline
    source) and records them as skipped. `include_path` adds task YAML folders; `include_defaults=False` skips
    indexing lm-eval's built-in YAMLs (20-30 s) when every task is local. `progress=False` draws no progress bars
    (lm-eval's, the scoring's, perplexity's). Returns the results document
    (`spectra.eval.results`).
    """
    from spectra.eval.perplexity import perplexity
    from spectra.eval.results import build_results
    from spectra.loading import model_tokenizer

    names, want_ppl, unavailable, manager = _task_plan(tasks, offline_dir, include_path, include_defaults, data)
    if isinstance(model_path, nn.Module):
        model, path = model_path, None
    else:
        from spectra.loading import load

        model, path = load(model_path, device=device, dtype=dtype), model_path
    tok = model_tokenizer(path, tokenizer)
    raw: dict[str, Any] = {}
    if names:
        from spectra.eval.harness import SpectraLM, _run_tasks

        lm = SpectraLM(model, tok, batch_size=batch_size, progress=progress)
        lm.name = str(path or lm.name)
        raw = _run_tasks(lm, names, manager, limit=limit, num_fewshot=num_fewshot, seed=seed)
    results = build_results(
        raw,
        model=model,
        model_path=path,
        tasks=names,
        limit=limit,
        offline_dir=offline_dir,
        skipped=unavailable,
        num_fewshot=num_fewshot,
    )
    if want_ppl:
        results["perplexity"] = perplexity(
            model,
            tok,
            data or "builtin",
            seq_len=ppl_seq_len,
            stride=ppl_stride,
            batch_size=batch_size,
            max_tokens=ppl_max_tokens,
            progress=progress,
        )
    return results
