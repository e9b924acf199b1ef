"""Requests per second of our lm-eval adapter (`spectra.eval.harness.SpectraLM`) against lm-eval's built-in `hf`
model (`HFLM`) on the same model and the same multiple-choice task, measured in one run, interleaved round by round.

    python benchmarks/eval.py [--size floatlm-20m] [--questions 100] [--batch-size 16] [--repeats 3] [--threads 2]
                              [--offline-dir DIR]   # real ARC-Easy questions from `spectra data evals`

The model is a randomly initialised FloatLM of the given size, saved as a spectra directory and exported with
`spectra.interop.hf.export_hf` (float32) for HFLM. The task is ARC-Easy's YAML on local data: synthetic questions
with four choices by default, or the first N real ARC-Easy test questions. Both models receive the identical
`Instance` list built by lm-eval from that task (only `loglikelihood` is timed; the harness overhead is the same for
both). The log-likelihoods are compared as well. Target (issue 6): >= 1.5x on CPU.
The machine is shared: the load average is printed; compare the ratio, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from spectra.files import check_output_file, write_json

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 1.5
WORDS = (
    "the a of to and in that it was he for on are with as his they be at one have this from by hot word but what "
    "some is it you or had the of to and a in we can out other were which do their time if will way about many then "
    "them would write like so these her long make thing see him two has look more day could go come did my sound no "
    "most number who over know water than call first people may down side been now find any new work part take get "
    "place made live where after back little only round man year came show every good me give our under name very "
    "through just form much great think say help low line before turn cause same mean differ move right boy old too "
    "does tell sentence set three want air well also play small end put home read hand port large spell add even land "
    "here must big high such follow act why ask men change went light kind off need house picture try us again animal"
).split()


def synthetic_questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"id": f"q{i}", "question": phrase(20, 45).capitalize() + "?",
         "choices": {"text": [phrase(2, 9) for _ in range(4)], "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="floatlm-20m")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offline-dir", default=None, help="use real ARC-Easy questions from this folder")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    if args.json:  # a bad path is found now, not after the measuring
        try:
            check_output_file(args.json, "--json")
        except ValueError as e:
            parser.error(str(e))

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from spectra.checkpoint import save_model
    from spectra.config import from_name
    from spectra.data import train_bpe
    from spectra.eval.harness import SpectraLM
    from spectra.interop.hf import export_hf
    from spectra.loading import load
    from spectra.model import build_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="spectra-bench-eval-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    if args.offline_dir:
        rows = [json.loads(line) for line in open(Path(args.offline_dir) / "data" / "arc_easy" / "test.jsonl")]
        docs = rows[: args.questions]
    else:
        docs = synthetic_questions(args.questions)
    texts = [d["question"] + " " + " ".join(d["choices"]["text"]) for d in docs]
    tok = train_bpe(texts * 2 + [" ".join(WORDS)] * 4, 4096, work / "tokenizer.json", min_frequency=1)
    model = build_model(from_name(args.size), seed=0)
    spectra_dir = save_model(model, work / "spectra", tokenizer=tok)
    hf_dir = export_hf(model, work / "hf", dtype=torch.float32, tokenizer=tok)

    (work / "tasks").mkdir()
    (work / "tasks" / "bench_arc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = {"include": str(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"), "task": "bench_arc",
           "dataset_path": "json", "dataset_name": None, "training_split": None, "validation_split": None,
           "test_split": "test", "dataset_kwargs": {"data_files": {"test": str(work / "tasks" / "bench_arc.jsonl")}}}
    (work / "tasks" / "bench_arc.yaml").write_text(json.dumps(cfg))
    manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)
    task = manager.load(["bench_arc"])["tasks"]["bench_arc"]
    task.build_all_requests(limit=None)
    requests = task.instances
    n = len(requests)

    ours = SpectraLM(load(spectra_dir), str(spectra_dir / "tokenizer.json"), batch_size=args.batch_size)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    runners = {"spectra": ours, "hf": hf}
    times: dict[str, list[float]] = {k: [] for k in runners}
    outputs = {}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, lm in runners.items():
            t0 = time.perf_counter()
            outputs[name] = lm.loglikelihood(requests, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()

    max_diff = max(abs(a[0] - b[0]) for a, b in zip(outputs["spectra"], outputs["hf"]))
    greedy_same = all(a[1] == b[1] for a, b in zip(outputs["spectra"], outputs["hf"]))
    rps = {k: n / statistics.median(v) for k, v in times.items()}
    ratio = rps["spectra"] / rps["hf"]
    result = {
        "size": args.size, "task": "arc_easy schema", "data": "ARC-Easy test" if args.offline_dir else "synthetic",
        "requests": n, "batch_size": args.batch_size, "threads": args.threads,
        "seconds": times, "requests_per_s": rps, "ratio": ratio, "target": TARGET,
        "max_abs_logprob_diff": max_diff, "greedy_flags_identical": greedy_same,
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(f"{args.size}, {n} loglikelihood requests ({len(docs)} questions x choices, {result['data']}), "
          f"batch {args.batch_size}, {args.threads} threads, median of {args.repeats} interleaved rounds")
    for name in runners:
        print(f"  {name:8s} {rps[name]:8.1f} requests/s   rounds: {', '.join(f'{t:.2f}s' for t in times[name])}")
    print(f"  ratio spectra / hf = {ratio:.2f}x (target >= {TARGET}x)   max |d logprob| = {max_diff:.2e}   "
          f"greedy flags identical: {greedy_same}")
    print(f"  load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
