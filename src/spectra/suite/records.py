"""The suite's results file, `OUT/results.jsonl`: one JSON line per step attempt, the last record of a key wins.

Shared by the runner (which appends) and the report (which reads), so neither imports the other.

    {"key": "quantize/floatlm-5m/4bit/s0", "step": "quantize", "status": "done" | "failed" | "blocked",
     "model": {...}, "metrics": {...}, "artifacts": {"model": "quantlm/floatlm-5m-4bit-s0"}, "error": null,
     "seconds": 12.3, "time": "2026-01-01T00:00:00"}

Eval records of perplexity also carry the held-out windows' losses, `metrics["seq_nll"]` and `metrics["seq_tokens"]`,
so paired comparisons can be made from the file alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


class Records:
    """The append-only results file as the runner uses it: lines it cannot parse (a run killed mid-write) are
    skipped with a warning. With `write=False` (every rank of a torchrun suite but rank 0) records are held, not
    written."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.write = path, write
        self.last: dict[str, dict[str, Any]] = {}
        if path.exists():
            text = path.read_text()
            if write and text and not text.endswith("\n"):
                # a record cut off mid-write (a kill, a full disk): drop the torn tail, or the next record would be
                # glued to it and lost with it, and the report would refuse the file
                keep = text.rfind("\n") + 1
                log.warning("%s ends in a record cut off mid-write; removing it", path)
                with open(path, "r+b") as f:
                    f.truncate(len(text[:keep].encode()))
                text = text[:keep]
            elif text and not text.endswith("\n"):  # a reader: the tail may be a record being appended right now
                text = text[: text.rfind("\n") + 1]
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d is not JSON (a run killed mid-write?); ignoring that line", path, n)
                    continue
                self.last[rec["key"]] = rec

    def append(self, rec: dict[str, Any]) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
        self.last[rec["key"]] = rec

    def done(self, key: str, root: Path) -> bool:
        rec = self.last.get(key)
        if rec is None or rec["status"] != "done":
            return False
        return all((root / p).exists() for p in rec.get("artifacts", {}).values())


def _check_metrics(metrics: dict[str, Any], where: str) -> None:
    """The metric fields the report reads, by type: numbers (or null) and objects."""
    for key in ("val_loss", "perplexity", "bits_per_byte"):
        v = metrics.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"{where}: metrics.{key} must be a number or null, got {v!r}")
    for key in ("tasks", "groups"):
        if not isinstance(metrics.get(key, {}), dict):
            raise ValueError(f"{where}: metrics.{key} must be an object, got {metrics[key]!r}")
    for task, values in metrics.get("tasks", {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"{where}: metrics.tasks.{task} must be an object, got {values!r}")


def _one_document(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """The last record of every key in a results file (or a suite folder), strictly: a bad line is an error."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a suite writes results.jsonl in its output folder)")
    last: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a results file (JSON lines of text)") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if n == 1 and _one_document(text):  # spec.json, summary.json, an eval's --output: a likely slip
                    raise ValueError(f"{path} is one JSON document, not a results file (one suite record per line): "
                                     f"give the study's {RESULTS_FILE} or its folder") from None
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("key", "status", "step")):
                raise ValueError(f"{path}:{n} is not a suite record (needs the strings 'key', 'step' and 'status')")
            if rec["step"] == "eval" and rec["status"] == "done":
                model, metrics = rec.get("model"), rec.get("metrics")
                if not isinstance(model, dict) or not isinstance(metrics, dict):
                    raise ValueError(f"{path}:{n}: the done eval record {rec['key']!r} needs 'model' and 'metrics' "
                                     "objects")
                need = ["name", "kind", "family", "size", "params", "size_bits", "seed"] + {
                    "quantlm": ["bits"], "packed": ["format"]}.get(model.get("kind"), [])
                missing = [k for k in need if k not in model]
                if missing:
                    raise ValueError(f"{path}:{n}: the done eval record {rec['key']!r} has no model field(s) {missing}")
                _check_metrics(metrics, f"{path}:{n}: the done eval record {rec['key']!r}")
            last[rec["key"]] = rec
    if not last:  # an empty report "of" nothing was written, rc 0
        raise ValueError(f"{path} holds no records (a suite writes one line per finished step)")
    return last
