"""The Spectra paper's evaluation tasks and how its tables group them (arXiv 2407.12327 §5; lm-eval 0.4.2 in the
paper, 0.4.x here).

Paper task list (zero-shot): arc_easy, arc_challenge, hellaswag, boolq, piqa, winogrande, lambada_openai, sciq,
logiqa, mmlu_continuation, triviaqa, crows_pairs_english, truthfulqa_mc1.

Groups as the paper reports them:

    commonsense_reasoning   the six-benchmark average (the only average the paper defines):
                            mean(ARC-C acc_norm, ARC-E acc_norm, BoolQ acc, HellaSwag acc_norm, PIQA acc_norm,
                            WinoGrande acc); FloatLM 3.9B: (34.6 + 63.0 + 65.9 + 66.1 + 75.8 + 62.8) / 6 = 61.4
    knowledge               SciQ acc_norm, TriviaQA exact match, MMLU (continuation) acc, LAMBADA acc/perplexity
    toxicity                TruthfulQA MC1 acc
    stereotypes             CrowS-Pairs (English) likelihood difference and % stereotype

Groups other than commonsense_reasoning are reported member by member, without an average, as in the paper.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

PAPER_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "boolq",
    "piqa",
    "winogrande",
    "lambada_openai",
    "sciq",
    "logiqa",
    "mmlu_continuation",
    "triviaqa",
    "crows_pairs_english",
    "truthfulqa_mc1",
)
CLOZE_TASK = "spectra_cloze"
PPL_TASK = "ppl"  # not an lm-eval task: spectra.eval.perplexity on the --data corpus
PRESETS: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS, "cloze": (CLOZE_TASK,), "ppl": (PPL_TASK,)}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[tuple[str, str], ...]  # (task, metric) with lm-eval metric names
    average: bool  # the paper averages this group's members


GROUPS: tuple[Group, ...] = (
    Group(
        "commonsense_reasoning",
        (
            ("arc_challenge", "acc_norm"),
            ("arc_easy", "acc_norm"),
            ("boolq", "acc"),
            ("hellaswag", "acc_norm"),
            ("piqa", "acc_norm"),
            ("winogrande", "acc"),
        ),
        average=True,
    ),
    Group(
        "knowledge",
        (
            ("sciq", "acc_norm"),
            ("sciq", "acc"),
            ("triviaqa", "exact_match"),
            ("mmlu_continuation", "acc"),
            ("lambada_openai", "acc"),
            ("lambada_openai", "perplexity"),
        ),
        average=False,
    ),
    Group("toxicity", (("truthfulqa_mc1", "acc"),), average=False),
    Group("stereotypes", (("crows_pairs_english", "likelihood_diff"), ("crows_pairs_english", "pct_stereotype")),
          average=False),
)


def resolve(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """'paper' | 'cloze' | 'a,b' | ['a', 'paper'] -> task names, presets expanded, order kept, duplicates dropped."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in (t.strip() for t in items):
        if not item:
            continue
        for name in PRESETS.get(item, (item,)):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no tasks given; use 'paper', 'cloze', 'ppl' or lm-eval task names, e.g. {PAPER_TASKS[0]}")
    return names


def check_known(names: list[str], manager) -> None:
    """Raise ValueError naming each unknown task with the closest known names."""
    known = set(manager.all_tasks) | {PPL_TASK}
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = "; ".join(
            f"{n!r} (close: {', '.join(difflib.get_close_matches(n, known, n=4, cutoff=0.6)) or 'none'})"
            for n in unknown
        )
        raise ValueError(f"unknown task {hints}. Presets: {sorted(PRESETS)}; list all with `lm-eval ls tasks`")


def read_manifest(offline_dir: str | os.PathLike) -> dict:
    """The offline data's manifest, checked to be one (`spectra data evals` writes it) and to have been built for the
    installed lm-eval: its task YAMLs include lm-eval's own by absolute path, and where that path is gone lm-eval
    drops the override without a word and reads the hub."""
    import lm_eval

    from spectra.files import FormatError, read_json

    path = Path(offline_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: no offline benchmark data in {offline_dir}. Build it with "
            f"`spectra data evals --out {offline_dir}`"
        )
    manifest = read_json(path, "the manifest of `spectra data evals`")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), dict):
        raise FormatError(f"{path} is not an offline eval manifest (no 'tasks' object); build one with "
                          f"`spectra data evals --out {offline_dir}`")
    built, installed = manifest.get("lm_eval_version"), getattr(lm_eval, "__version__", "unknown")
    if built != installed:
        raise FileNotFoundError(f"{offline_dir} was built for lm-eval {built}, this is lm-eval {installed} (its task "
                                f"YAMLs include the installed ones); rebuild with `spectra data evals --out "
                                f"{offline_dir}`")
    return manifest


def offline_tasks(
    offline_dir: str | os.PathLike, names: list[str], *, strict: bool
) -> tuple[Path, list[str], list[str]]:
    """(folder of task YAMLs, names available offline, names not available offline) for `names`.

    `strict`: a requested task without local data raises FileNotFoundError (explicit task lists); otherwise such
    tasks are returned as missing (the `paper` preset, whose logiqa/crows_pairs/truthfulqa have no offline source).
    """
    manifest = read_manifest(offline_dir)
    have = set(manifest["tasks"]) | {CLOZE_TASK, PPL_TASK}
    missing = [n for n in names if n not in have]
    if missing and strict:
        raise FileNotFoundError(
            f"no offline data for {missing} in {offline_dir} (available: {sorted(manifest['tasks'])}). "
            f"Run `spectra data evals --out {offline_dir}`; tasks {manifest.get('unavailable', [])} have no offline "
            "source and need the Hugging Face hub"
        )
    for name in names:  # an lm-eval reinstalled elsewhere (another venv) moved the YAMLs they include
        yaml = Path(offline_dir) / "tasks" / f"{name}.yaml"
        if name in manifest["tasks"] and yaml.exists():
            include = json.loads(yaml.read_text()).get("include")
            if include is not None and not Path(include).exists():
                raise FileNotFoundError(f"{yaml} includes {include}, which no longer exists (lm-eval installed "
                                        f"elsewhere since); rebuild with `spectra data evals --out {offline_dir}`")
    return Path(offline_dir) / "tasks", [n for n in names if n in have], missing
