"""`run_suite`: the Spectra study as a resumable list of steps.

For every size, family and seed the suite trains a model; every FloatLM is quantized by GPTQ at each bit width into
QuantLMs; every ternary model is packed; every resulting model (float, quantized, latent ternary, packed) is
evaluated; the largest size of each kind is benchmarked. All models of a seed see the same data in the same order.
A variant with `init` (or `teacher`) trains after the run of the same size and seed it starts from (or distils
from), from that run's final model; every training record carries its compute (`SuiteRunner._compute`).

Each step appends one JSON line to `OUT/results.jsonl`:

    {"key": "quantize/floatlm-5m/4bit/s0", "step": "quantize", "status": "done" | "failed" | "blocked",
     "model": {"name", "family", "kind", "size", "bits", "seed", "params", "non_embedding_params", "size_bits"},
     "metrics": {...}, "artifacts": {"model": "quantlm/floatlm-5m-4bit-s0"}, "error": null, "seconds": 12.3}

A rerun reads the file, skips steps whose last record is "done" and whose artifacts still exist, and retries the
rest. A failed step records its reason and blocks only the steps that need its output. A killed training run resumes
from its last checkpoint when its [train] table sets `ckpt_every_tokens` (the medium and paper presets do; the
shorter presets' trainings keep only their final model and start over). Paths in records are relative to OUT, so a
results folder can be moved.

With `jobs` > 1 (on CPU, one process) independent steps run side by side in worker processes, each with its share of
the cores (`resolve_jobs`): a model of a few million parameters keeps one core busy far better than it splits over
two, so two one-thread trainings finish sooner than the same two run one after another on two threads. Steps that
measure speed (`EXCLUSIVE`) wait until nothing else runs and then run alone, in the main process.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.config import ModelConfig
from spectra.files import read_meta, write_json
from spectra.suite.ranks import SuiteRanks
from spectra.suite.records import RESULTS_FILE, Records
from spectra.suite.spec import SuiteSpec, check_writable

log = logging.getLogger(__name__)

PACKABLE_QUANTIZERS = ("trilm", "twn")  # ternary codes x one scale per shard, activations in float
# Steps every rank runs under torchrun (the rest run on rank 0): training, and evaluation, whose perplexity shares
# its windows over the ranks of the process group (`spectra.eval.perplexity`).
ALL_RANKS = ("train", "eval")
EXCLUSIVE = ("bench",)  # steps that time the machine: with jobs > 1 they run alone, after the steps before them
MAX_AUTO_JOBS = 4  # "auto" runs one step per core up to this many (more small processes gain little and cost memory)


@dataclass
class Step:
    kind: str  # train | quantize | pack | eval | bench
    family: str  # a family or variant name
    size: str
    seed: int
    bits: int | None = None
    fmt: str | None = None
    target: str | None = None  # eval/bench: the key of the step whose model it measures
    deps: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        name = f"{self.family}-{self.size}"
        if self.bits is not None:
            name += f"-{self.bits}bit"
        if self.fmt is not None:
            name += f"-{self.fmt}"
        return f"{name}-s{self.seed}"

    @property
    def key(self) -> str:
        if self.kind in ("eval", "bench"):
            return f"{self.kind}/{self.target}"
        parts = [self.kind, f"{self.family}-{self.size}"]
        if self.bits is not None:
            parts.append(f"{self.bits}bit")
        if self.fmt is not None:
            parts.append(self.fmt)
        return "/".join(parts + [f"s{self.seed}"])


def plan(spec: SuiteSpec) -> list[Step]:
    """Every step of the study in a dependency-respecting order: train (a variant's init and teacher runs first),
    quantize, pack, eval, bench."""
    trains, derived, evals = [], [], []
    for seed in spec.seeds:
        for size in spec.sizes:
            for family in spec.train_order():  # a run started from (or distilled from) another comes after it
                t = Step("train", family, size, seed,
                         deps=[Step("train", dep, size, seed).key for dep in spec.sources(family)])
                trains.append(t)
                evals.append(Step("eval", family, size, seed, target=t.key, deps=[t.key]))
                cfg = spec.model_config(size, family)
                if cfg.family == "floatlm":
                    for b in spec.quant_bits:
                        q = Step("quantize", family, size, seed, bits=b, deps=[t.key])
                        derived.append(q)
                        evals.append(Step("eval", family, size, seed, bits=b, target=q.key, deps=[q.key]))
                elif cfg.quantizer in PACKABLE_QUANTIZERS:
                    for fmt in spec.pack_formats:
                        p = Step("pack", family, size, seed, fmt=fmt, deps=[t.key])
                        derived.append(p)
                        evals.append(Step("eval", family, size, seed, fmt=fmt, target=p.key, deps=[p.key]))
    benches = []
    if spec.bench:
        largest, seed = spec.sizes[-1], spec.seeds[0]
        for s in trains + derived:
            if s.size == largest and s.seed == seed and (s.kind == "train" or s.bits == 4 or s.fmt == "tq2"):
                cfg = spec.model_config(s.size, s.family)
                if (
                    s.kind == "train"
                    and cfg.family == "trilm"
                    and cfg.quantizer in PACKABLE_QUANTIZERS
                    and "tq2" in spec.pack_formats
                ):
                    continue  # the packed copy is benchmarked instead (it runs our kernels)
                benches.append(
                    Step("bench", s.family, s.size, s.seed, bits=s.bits, fmt=s.fmt, target=s.key, deps=[s.key])
                )
    return trains + derived + evals + benches


def _model_info(cfg: ModelConfig, step: Step, kind: str, group_size: int | None = None) -> dict[str, Any]:
    """Identity and size of a model; `cfg` is the trained model's own config (its vocabulary may be fitted);
    `group_size`: a QuantLM's (spectra.ptq.pipeline.default_group_size for its bits when None)."""
    from spectra.accounting import quantlm_bits, size_in_bits, size_report

    report = size_report(cfg)
    if kind == "quantlm":
        from spectra.ptq.pipeline import default_group_size

        g = default_group_size(step.bits) if group_size is None else group_size
        size_bits = size_in_bits(cfg, quantlm_bits(step.bits, g))
    elif kind == "packed":
        size_bits = report["bits"][f"trilm_{step.fmt}"]
    else:
        size_bits = report["bits"]["this_model"]
    return {
        "name": step.model_name,
        "family": step.family,
        "base_family": cfg.family,
        "kind": kind,
        "quantizer": cfg.quantizer if cfg.family == "trilm" else None,
        "size": step.size,
        "bits": step.bits,
        "format": step.fmt,
        "seed": step.seed,
        "params": report["params"],
        "non_embedding_params": report["non_embedding_params"],
        "size_bits": size_bits,
    }


class SuiteRunner:
    def __init__(self, spec: SuiteSpec, out: Path, *, progress: bool = True, tokenizer: str | None = None,
                 ranks: SuiteRanks | None = None, writes: bool = True) -> None:
        self.ranks = ranks or SuiteRanks()  # under torchrun: rank 0 decides, runs non-training steps and writes
        self.spec, self.out, self.progress = spec, out, progress and self.ranks.is_main
        self.tokenizer = tokenizer or spec.tokenizer  # one tokenizer for every model (preflight.study_tokenizer)
        # `writes=False`: a --jobs worker, which returns its records for the main process to write (one opening the
        # file to write truncated a record the main process was appending: it looks like a torn tail)
        self.records = Records(out / RESULTS_FILE, write=self.ranks.is_main and writes)
        self.steps = {s.key: s for s in plan(spec)}

    # ---- step bodies: each returns (model info, metrics, artifacts relative to out) ---------------------------
    def _artifact(self, key: str) -> Path:
        return self.out / self.records.last[key]["artifacts"]["model"]

    def _kind_of(self, step: Step) -> str:
        """What a train / quantize / pack step makes: floatlm or trilm (the base family), quantlm, or packed."""
        if step.kind == "train":
            return self.spec.model_config(step.size, step.family).family
        return {"quantize": "quantlm", "pack": "packed"}[step.kind]

    def _trained_config(self, step: Step) -> ModelConfig:
        """The config the model of `step` was trained with, read from its training run's final model."""
        train_key = Step("train", step.family, step.size, step.seed).key
        return ModelConfig.from_dict(read_meta(self._artifact(train_key))["config"])

    def _trained_seq_len(self, step: Step) -> int | None:
        """The sequence length the model of `step` was trained at (its run's run.json): perplexity's window unless
        [eval] ppl_seq_len says otherwise (the model's max_seq_len, 2048 unless set, scored windows it never trained
        on, and fewer of them than the preflight counted; a review, 2026-12-07). None for a run without run.json."""
        rec = self.records.last.get(Step("train", step.family, step.size, step.seed).key, {})
        run = rec.get("artifacts", {}).get("run")
        if run is None or not (self.out / run / "run.json").exists():
            return None
        return int(json.loads((self.out / run / "run.json").read_text())["train"]["seq_len"])

    def run_train(self, step: Step) -> tuple[dict, dict, dict]:
        from spectra.train import TrainConfig, train

        cfg = self.spec.model_config(step.size, step.family)
        over = {
            "tokens": self.spec.tokens_for(step.size, step.family),
            "data": self.spec.data,
            "tokenizer": self.tokenizer,
            "seed": step.seed,
            **self.spec.train_overrides(step.family, step.size),
        }
        model: ModelConfig | dict[str, Any] = cfg
        variant = self.spec.variants.get(step.family)
        if variant is not None and variant.init is not None:
            # the model, its vocabulary and tokenizer come from the init run's final model; cfg's own fields that
            # may differ from it (family, quantizer, ...) are overrides
            model = {**self.spec.model, **variant.model, "family": cfg.family, "name": cfg.name}
            over.pop("tokenizer")
            over.pop("fit_vocab", None)
            over["init"] = str(self._artifact(self._source_key(step, variant.init)))
        if variant is not None and variant.teacher is not None:
            over["teacher"] = str(self._artifact(self._source_key(step, variant.teacher)))
        tcfg = TrainConfig.from_dict(over)
        run_dir = self.out / "runs" / step.model_name
        result = train(model, tcfg, out_dir=run_dir, resume=(run_dir / "run.json").exists(), progress=self.progress)
        metrics = {
            k: result[k]
            for k in ("val_loss", "train_loss", "tokens", "steps", "wall_time", "tokens_per_s", "skipped_steps")
            if k in result
        }
        rel = run_dir.relative_to(self.out)
        trained = ModelConfig.from_dict(read_meta(run_dir / "final")["config"])
        metrics["compute"] = self._compute(step, trained, tcfg, result)
        return _model_info(trained, step, trained.family), metrics, {"model": str(rel / "final"), "run": str(rel)}

    def _source_key(self, step: Step, family: str) -> str:
        return Step("train", family, step.size, step.seed).key

    def _compute(self, step: Step, cfg: ModelConfig, tcfg: Any, result: dict[str, Any]) -> dict[str, Any]:
        """What it cost to make this model: this run's training FLOPs (6·N + attention per token,
        `spectra.accounting.flops_per_token`), the teacher's forward passes (a third of its training FLOPs per
        token), and the training of every run it started from or distilled from, each counted once (`runs`)."""
        from spectra.accounting import flops_per_token

        seq_len = int(json.loads((self.out / "runs" / step.model_name / "run.json").read_text())["train"]["seq_len"])
        tokens = float(result["tokens"])
        own = {"tokens": tokens, "flops": float(flops_per_token(cfg, seq_len)) * tokens, "teacher_flops": 0.0}
        runs = {step.key: own}
        variant = self.spec.variants.get(step.family)
        if variant is not None and variant.teacher is not None:
            teacher = self._trained_config(Step("train", variant.teacher, step.size, step.seed))
            own["teacher_flops"] = float(flops_per_token(teacher, seq_len)) * tokens / 3
        for dep in step.deps:
            runs.update(self.records.last[dep]["metrics"].get("compute", {}).get("runs", {}))
        return {"init": variant.init if variant else None, "teacher": variant.teacher if variant else None,
                "runs": runs, "total_tokens": sum(r["tokens"] for r in runs.values()),
                "total_flops": sum(r["flops"] + r["teacher_flops"] for r in runs.values())}

    def run_quantize(self, step: Step) -> tuple[dict, dict, dict]:
        from spectra.ptq.pipeline import quantize

        src = self._artifact(step.deps[0])
        out = self.out / "quantlm" / step.model_name
        opts = {"n_samples": 32, "seq_len": 256, **self.spec.quantize}
        result = quantize(
            src,
            out,
            bits=step.bits,
            calib=self.spec.data,
            seed=step.seed,
            format="gptq",
            progress=self.progress,
            **opts,
        )
        from spectra.accounting import stored_bits

        metrics = {"stored_bits": stored_bits(out)["total_bits"], "stats": result.get("stats")}
        return (
            _model_info(self._trained_config(step), step, "quantlm", self.spec.quantize.get("group_size")),
            metrics,
            {"model": str(out.relative_to(self.out))},
        )

    def run_pack(self, step: Step) -> tuple[dict, dict, dict]:
        from spectra.accounting import stored_bits
        from spectra.loading import find_tokenizer, load
        from spectra.packed.io import pack_model, weights_match

        src = self._artifact(step.deps[0])
        out = self.out / "packed" / step.model_name
        latent = load(src)
        summary = pack_model(latent, out, format=step.fmt, tokenizer=find_tokenizer(src))
        metrics = {
            "packed": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
            "stored_bits": stored_bits(out)["total_bits"],
            "weights_match": weights_match(latent, out),  # read back, against the latent model's own W̃
        }
        return (
            _model_info(self._trained_config(step), step, "packed"),
            metrics,
            {"model": str(out.relative_to(self.out))},
        )

    def run_eval(self, step: Step) -> tuple[dict, dict, dict]:
        from spectra.eval import evaluate

        target = self.steps[step.target]
        path = self._artifact(step.target)
        opts = {"batch_size": 8, "ppl_max_tokens": 65536, "ppl_seq_len": self._trained_seq_len(target),
                **self.spec.eval}
        res = evaluate(path, self.spec.tasks, data=self.spec.data, progress=self.progress, **opts)
        out = self.out / "evals" / f"{target.model_name}.json"
        if self.ranks.is_main:
            write_json(out, res)
        metrics: dict[str, Any] = {
            "tasks": res.get("tasks", {}),
            "groups": {k: v.get("average") for k, v in res.get("groups", {}).items()},
        }
        ppl = res.get("perplexity")
        if ppl:
            metrics["perplexity"] = ppl.get("ppl")
            metrics["val_loss"] = ppl.get("loss")
            metrics["bits_per_byte"] = ppl.get("bits_per_byte")
            # per held-out window, for the report's paired comparisons (QuantLM vs FloatLM, packed vs latent)
            metrics["seq_nll"] = ppl.get("window_nll")
            metrics["seq_tokens"] = ppl.get("window_tokens")
        kind = self._kind_of(target)
        if kind == "packed":  # the pack step's read-back of the ternary weights, for the report's exactness check
            metrics["weights_match"] = self.records.last[target.key]["metrics"].get("weights_match")
        return (
            _model_info(self._trained_config(target), target, kind, self.spec.quantize.get("group_size")),
            metrics,
            {"results": str(out.relative_to(self.out))},
        )

    def run_bench(self, step: Step) -> tuple[dict, dict, dict]:
        from spectra.inference.bench import bench

        target = self.steps[step.target]
        path = self._artifact(step.target)
        kind = self._kind_of(target)
        dtypes = {"floatlm": ("fp32", "bf16"), "trilm": ("fp32", "bf16"), "quantlm": ("model",), "packed": ("packed",)}[
            kind
        ]
        opts = {
            "prompt_len": 64,
            "gen_len": 32,
            "threads": (2,),
            "repeats": 2,
            "llama_cpp": False,
            **self.spec.bench_options,
        }
        res = bench(path, dtypes=dtypes, **opts)
        out = self.out / "bench" / f"{target.model_name}.json"
        write_json(out, res)
        metrics = {"results": res.get("results", []), "peak_rss_mb": res.get("peak_rss_mb")}
        return (
            _model_info(self._trained_config(target), target, kind, self.spec.quantize.get("group_size")),
            metrics,
            {"results": str(out.relative_to(self.out))},
        )

    # ---- driver -----------------------------------------------------------------------------------------------
    def _action(self, step: Step) -> str | list[str]:
        """What to do with `step` (decided on rank 0): "skip" (done), "run", or the deps that block it."""
        if self.records.done(step.key, self.out):
            return "skip"
        blockers = [d for d in step.deps if not self.records.done(d, self.out)]
        return blockers or "run"

    def _bodies(self) -> dict[str, Callable[[Step], tuple[dict, dict, dict]]]:
        return {"train": self.run_train, "quantize": self.run_quantize, "pack": self.run_pack, "eval": self.run_eval,
                "bench": self.run_bench}

    @staticmethod
    def _record(step: Step) -> dict[str, Any]:
        return {"key": step.key, "step": step.kind, "model": None, "metrics": {}, "artifacts": {}, "error": None,
                "seconds": 0.0}

    def _finish(self, rec: dict[str, Any], counts: dict[str, int]) -> None:
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        counts[rec["status"]] += 1
        self.records.append(rec)

    def run(self, jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
        """Run every step not done yet; `jobs` > 1 runs independent steps side by side in worker processes with
        `threads` torch threads each (`resolve_jobs`). Returns the counts of steps done, skipped, failed, blocked."""
        if jobs > 1:  # one process (run_suite refuses jobs > 1 under torchrun)
            return self._run_parallel(jobs, threads or 1)
        from tqdm.auto import tqdm

        bodies = self._bodies()
        counts = {"done": 0, "skipped": 0, "failed": 0, "blocked": 0}
        steps = list(self.steps.values())
        bar = tqdm(steps, desc="suite", unit="step", disable=not self.progress, position=0)
        for step in bar:
            bar.set_postfix_str(step.key)
            action = self.ranks.broadcast(self._action(step) if self.ranks.is_main else None)
            if action == "skip":
                counts["skipped"] += 1
                continue
            rec = self._record(step)
            if action != "run":
                rec.update(status="blocked", error=f"needs {', '.join(action)}, which did not finish")
            else:
                t0 = time.perf_counter()
                try:  # training on every rank, the rest on rank 0; a failure anywhere fails the step everywhere
                    run_on = self.ranks.on_all if step.kind in ALL_RANKS else self.ranks.on_main
                    info, metrics, artifacts = run_on(lambda: bodies[step.kind](step))
                    rec.update(status="done", model=info, metrics=metrics, artifacts=artifacts)
                except Exception as e:  # noqa: BLE001 - a failed step is recorded and the study goes on
                    if self.ranks.is_main:
                        log.error("suite step %s failed: %s", step.key, e)
                        log.debug("%s", traceback.format_exc())
                    rec.update(status="failed", error=f"{type(e).__name__}: {e}")
                rec["seconds"] = round(time.perf_counter() - t0, 3)
            rec = self.ranks.broadcast(rec)  # rank 0's record, written once, held by every rank
            self._finish(rec, counts)
        return counts

    def _run_parallel(self, jobs: int, threads: int) -> dict[str, Any]:
        """The steps as a dependency graph over `jobs` worker processes: a step starts once every step it needs has
        finished (in plan order among the ready ones); one whose dependency failed is recorded as blocked. Records
        are written here, in the main process, as steps finish. A worker that dies (killed, out of memory) fails
        the steps it was running, and a fresh pool takes over."""
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        from tqdm.auto import tqdm

        counts = {"done": 0, "skipped": 0, "failed": 0, "blocked": 0}
        finished: dict[str, str] = {}  # key -> the status it ended this run with ("done" for one done before)
        pending: list[Step] = []
        for step in self.steps.values():
            if self.records.done(step.key, self.out):
                counts["skipped"] += 1
                finished[step.key] = "done"
            else:
                pending.append(step)
        bar = tqdm(total=len(self.steps), initial=counts["skipped"], desc="suite", unit="step",
                   disable=not self.progress, position=0)

        def new_pool() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                       initargs=(threads, logging.getLogger().getEffectiveLevel(), os.getpid()))

        def close(rec: dict[str, Any]) -> None:
            finished[rec["key"]] = rec["status"]
            self._finish(rec, counts)
            bar.update(1)

        running: dict[Future, Step] = {}
        pool = new_pool()
        try:
            while pending or running:
                for step in list(pending):
                    if any(d not in finished for d in step.deps):
                        continue
                    failed = [d for d in step.deps if finished[d] != "done"]
                    if failed:
                        pending.remove(step)
                        close({**self._record(step), "status": "blocked",
                               "error": f"needs {', '.join(failed)}, which did not finish"})
                    elif step.kind in EXCLUSIVE:
                        if not running:  # alone on the machine, here in the main process
                            pending.remove(step)
                            bar.set_postfix_str(step.key)
                            close(_run_step(self, step))
                    elif len(running) < jobs:
                        pending.remove(step)
                        running[pool.submit(_run_step_in_worker, self.spec, str(self.out), self.tokenizer,
                                            step.key)] = step
                if not running:
                    continue
                bar.set_postfix_str(", ".join(s.key for s in running.values()))
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    step = running.pop(future)
                    try:
                        rec = future.result()
                    except BrokenProcessPool:
                        broken = True
                        log.error("suite step %s failed: its worker process died (killed, or out of memory?)",
                                  step.key)
                        rec = {**self._record(step), "status": "failed",
                               "error": "worker process died while running this step (killed, or out of memory?)"}
                    close(rec)
                if broken:  # every other step of the dead pool failed with it; a fresh pool runs the rest
                    for future, step in list(running.items()):
                        with_error = {**self._record(step), "status": "failed",
                                      "error": "worker process pool died while running this step"}
                        close(with_error)
                    running.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = new_pool()
        except BaseException:  # Ctrl-C, SIGTERM, an error here: the running steps' workers end now (the study
            # process otherwise waited at exit for every running step to finish, whose records it then never wrote)
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            raise
        finally:
            pool.shutdown(wait=not running, cancel_futures=True)
            bar.close()
        return counts


def _run_step(runner: SuiteRunner, step: Step) -> dict[str, Any]:
    """Run one step in this process and return its record (a failure is recorded, not raised)."""
    rec = runner._record(step)
    t0 = time.perf_counter()
    try:
        info, metrics, artifacts = runner._bodies()[step.kind](step)
        rec.update(status="done", model=info, metrics=metrics, artifacts=artifacts)
    except Exception as e:  # noqa: BLE001 - a failed step is recorded and the study goes on
        log.error("suite step %s failed: %s", step.key, e)
        log.debug("%s", traceback.format_exc())
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _init_worker(threads: int, level: int, parent: int | None = None) -> None:
    """A step worker's setup. `parent`: the study's pid, given by the pool's creator (os.getppid() here would name the
    process that adopted this worker when the study died while it started: under load, importing torch took longer
    than the study lived, and the worker then outlived it)."""
    parent = os.getppid() if parent is None else parent
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for code that reads it (spectra.inference threads_from_env)
    import threading

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(message)s")
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker once the study's process is gone: a pool's workers outlive a killed parent, and kept
    training into the run folders that the resumed study trains into again (a review, 2026-12-07: two writers of one
    metrics.jsonl)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _run_step_in_worker(spec: SuiteSpec, out: str, tokenizer: str, key: str) -> dict[str, Any]:
    """A worker's step: a runner of its own reads the records the step's dependencies wrote, runs it, and returns
    its record for the main process to write."""
    runner = SuiteRunner(spec, Path(out), progress=False, tokenizer=tokenizer, writes=False)
    return _run_step(runner, runner.steps[key])


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int | str, device_type: str = "cpu", world: int = 1) -> tuple[int, int]:
    """(steps run side by side, torch threads for each) for `jobs`: a count, or "auto": one step per core up to
    MAX_AUTO_JOBS on CPU, one step on a GPU or under torchrun (whose ranks share every step)."""
    cpus = _cpus()
    if jobs == "auto":
        n = 1 if world > 1 or device_type != "cpu" else min(cpus, MAX_AUTO_JOBS)
    else:
        try:
            n = int(jobs)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(n) != str(jobs).strip():
            raise ValueError(f"jobs must be a positive whole number or 'auto', got {jobs!r}")
    return n, max(1, cpus // n)


def run_suite(spec: SuiteSpec, out_dir: str | Path, *, progress: bool = True, report: bool = True,
              jobs: int | str = 1) -> dict[str, Any]:
    """Run (or resume) the study and build its report. Returns step counts, timings and the report paths.

    `jobs`: steps run side by side on CPU, each in its own process with its share of the cores; "auto" is one per
    core (at most MAX_AUTO_JOBS), and 1 on a GPU or under torchrun (`resolve_jobs`)."""
    from spectra.suite.preflight import check_data, check_options, check_same_study, check_tasks, study_tokenizer

    device = spec.train.get("device", "auto")
    with SuiteRanks(device) as ranks:  # one process group for the whole study (training steps join it)
        n_jobs, threads = resolve_jobs(jobs, ranks.info.device.type, ranks.world)
        if n_jobs > 1 and ranks.world > 1:
            raise ValueError(f"jobs = {jobs} runs steps in separate processes; under torchrun every rank already "
                             "shares each step: use jobs = 1 (or 'auto')")
        out = ranks.on_main(lambda: check_writable(out_dir))
        t0 = time.perf_counter()

        def preflight():
            check_options(spec)
            check_tasks(spec)  # before the tokenizer, which `bpe:N` trains
            check_same_study(out, spec)
            tokenizer = study_tokenizer(spec, out)
            data = check_data(spec, tokenizer)  # a file too small for the budget stops here, before any training
            check_same_study(out, spec, data)
            write_json(out / "spec.json", {**spec.to_dict(), "study_tokenizer": tokenizer, "data_measured": data,
                                           "planned_steps": [s.key for s in plan(spec)]})  # the report's "of N"
            return tokenizer, data

        tokenizer, data = ranks.on_main(preflight)
        counts = SuiteRunner(spec, out, progress=progress, tokenizer=tokenizer, ranks=ranks).run(n_jobs, threads)
        result: dict[str, Any] = {"out_dir": str(out), "steps": counts, "seconds": round(time.perf_counter() - t0, 1),
                                  "data": data, "rank": ranks.info.rank, "world_size": ranks.world,
                                  "jobs": n_jobs, "threads_per_job": threads if n_jobs > 1 else None}
        if report:
            from spectra.suite.report import build_report

            result["report"] = ranks.on_main(lambda: build_report(out))
        return result
