"""Suite runs that start from other runs of the plan (variant `init` / `teacher`, issue 17's qat-tiny preset).

The plan puts every run after the run it starts from, the converted run really starts from the FloatLM run's final
model (recorded hash, and the logits of the model it starts from at λ = 0), a study killed mid-run resumes to the
same numbers as an uninterrupted one, compute counts the FloatLM's pretraining and the teacher's forward passes, and
the report's verdicts on planted numbers follow the suite's rules, with intervals checked against scipy.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch

from spectra.accounting import flops_per_token
from spectra.config import ModelConfig
from spectra.files import read_meta
from spectra.loading import load
from spectra.suite import build_report, load_spec, plan, run_suite
from spectra.suite.conversion import arms, comparisons
from spectra.suite.records import read_records
from spectra.suite.report import model_rows, sequence_losses
from spectra.train.init import content_hash

SPEC = """
[suite]
name = "qat-micro"
sizes = ["m1"]
families = ["converted_kd", "floatlm", "scratch", "converted"]   # listed out of order on purpose
quant_bits = []
pack_formats = []
tokens = 4096
data = "builtin"
tokenizer = "builtin"
tasks = ["ppl"]
seeds = [0]
bench = false

[sizes.m1]
dim = 64
n_layers = 1
n_heads = 2
glu_dim = 128

[variants.scratch]
family = "trilm"
train = { tokens = 3072 }
[variants.converted]
family = "trilm"
init = "floatlm"
train = { tokens = 3072, quant_warmup_tokens = 1024 }
[variants.converted_kd]
family = "trilm"
init = "floatlm"
teacher = "floatlm"
train = { tokens = 3072, quant_warmup_tokens = 1024 }

[model]
max_seq_len = 64

[train]
fit_vocab = true
batch_tokens = 512
seq_len = 64
micro_batch = 8
val_every = 0
val_tokens = 1024
ckpt_every_tokens = 1024

[eval]
include_defaults = false
batch_size = 16
ppl_max_tokens = 2048
ppl_seq_len = 64
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))


def spec_file(tmp_path, text=SPEC):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_plan_runs_every_start_before_the_runs_that_need_it(tmp_path):
    spec = load_spec("qat-tiny")
    assert len(spec.seeds) >= 2 and spec.variants["converted"].init == "floatlm"
    assert spec.variants["converted_kd"].teacher == "floatlm"
    steps = plan(spec)
    where = {s.key: i for i, s in enumerate(steps)}
    for s in steps:
        for dep in s.deps:
            assert where[dep] < where[s.key], (dep, s.key)
    for seed in spec.seeds:
        for arm in ("converted", "converted_kd"):
            assert steps[where[f"train/{arm}-1m/s{seed}"]].deps == [f"train/floatlm-1m/s{seed}"]
        assert steps[where[f"train/scratch-1m/s{seed}"]].deps == []
    # listed out of order, the micro spec still trains its FloatLM first
    micro = load_spec(path=spec_file(tmp_path))
    assert [s.family for s in plan(micro) if s.kind == "train"] == ["floatlm", "converted_kd", "scratch", "converted"]
    assert micro.tokens_for("m1", "scratch") == 3072 and micro.tokens_for("m1", "floatlm") == 4096


CONV = 'family = "trilm"\ninit = "floatlm"\ntrain = { tokens = 3072, quant'
KD = 'family = "trilm"\ninit = "floatlm"\nteacher'


@pytest.mark.parametrize("edit, match", [
    ([(CONV, CONV.replace("floatlm", "nope"))], r"\[variants.converted\] init = 'nope' is not in \[suite\] families"),
    ([(CONV, CONV.replace("floatlm", "converted_kd")), (KD, KD.replace("floatlm", "converted"))],
     "init/teacher chain leads back"),
    ([(CONV, CONV.replace("train =", "model = { n_layers = 2 }\ntrain ="))],
     r"\[variants.converted\] starts from 'floatlm', whose n_layers is 1"),
    ([("train = { tokens = 3072 }", 'train = { tokens = 3072, init = "x" }')],
     r"\[variants.scratch\] train.init: a suite run starts from"),
])
def test_bad_starts_fail_before_training(tmp_path, edit, match):
    text = SPEC
    for old, new in edit:
        assert old in text
        text = text.replace(old, new, 1)
    with pytest.raises(ValueError, match=match):
        load_spec(path=spec_file(tmp_path, text))


def _kill_converted_at_step(monkeypatch, step: int):
    """Raise KeyboardInterrupt (a kill: the suite does not catch it) at `step` of the `converted` run."""
    import spectra.train.trainer as trainer

    real, calls = trainer.set_quant_mix, {"n": 0}

    def killing(model, mix):
        if getattr(model, "config", None) is not None and model.config.name.startswith("converted-"):
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt("killed mid-run")
        return real(model, mix)

    monkeypatch.setattr(trainer, "set_quant_mix", killing)


@pytest.mark.slow
def test_conversion_study_end_to_end_and_resume_after_a_kill(tmp_path, monkeypatch, caplog):
    import spectra.train.trainer as trainer
    from spectra.train.warmup import set_quant_mix

    spec = load_spec(path=spec_file(tmp_path))
    starts = {}
    real_open = trainer.open_init

    def recording(path, *args, **kwargs):  # the model each --init run really starts from
        start = real_open(path, *args, **kwargs)
        starts.setdefault(start.config.name, (path, copy.deepcopy(start.model)))
        return start

    monkeypatch.setattr(trainer, "open_init", recording)
    whole = tmp_path / "whole"
    result = run_suite(spec, whole, progress=False)
    assert result["steps"]["failed"] == 0 and result["steps"]["blocked"] == 0, read_records(whole)
    records = read_records(whole)
    fl_final = whole / records["train/floatlm-m1/s0"]["artifacts"]["model"]

    # the converted runs start from the FloatLM run's final model: recorded hash, and the same logits at λ = 0
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load(fl_final).eval()(idx)
    for arm in ("converted", "converted_kd"):
        run = whole / records[f"train/{arm}-m1/s0"]["artifacts"]["run"]
        info = json.loads((run / "run.json").read_text())
        assert info["init"]["sha256"] == content_hash(fl_final)
        assert info["init"]["path"] == str(fl_final.resolve()) and info["init"]["conversion"] == "floatlm->trilm"
        assert read_meta(run / "final")["init"]["sha256"] == content_hash(fl_final)
        path, model = starts[f"{arm}-m1"]
        assert str(path) == str(whole / records["train/floatlm-m1/s0"]["artifacts"]["model"])
        set_quant_mix(model, 0.0)
        with torch.no_grad():
            assert torch.equal(model.eval()(idx), ref), arm
    assert json.loads((whole / records["train/converted_kd-m1/s0"]["artifacts"]["run"] / "run.json").read_text()
                      )["teacher"]["sha256"] == content_hash(fl_final)

    # compute: each arm's own FLOPs, the FloatLM's pretraining for the converted arms, the teacher's forward passes
    fcfg = ModelConfig.from_dict(read_meta(fl_final)["config"])
    tcfg = fcfg.replace(family="trilm")
    comp = {k.split("/")[1].rsplit("-", 1)[0]: r["metrics"]["compute"] for k, r in records.items()
            if r["step"] == "train"}
    f_pre = flops_per_token(fcfg, 64) * 4096
    f_tri = flops_per_token(tcfg, 64) * 3072
    assert comp["floatlm"]["total_flops"] == pytest.approx(f_pre) and comp["floatlm"]["total_tokens"] == 4096
    assert comp["scratch"]["total_flops"] == pytest.approx(f_tri) and comp["scratch"]["total_tokens"] == 3072
    assert comp["converted"]["total_flops"] == pytest.approx(f_pre + f_tri)
    assert comp["converted"]["total_tokens"] == 4096 + 3072
    assert comp["converted_kd"]["total_flops"] == pytest.approx(f_pre + f_tri + flops_per_token(fcfg, 64) * 3072 / 3)

    report = build_report(whole)
    md = (whole / "report" / "report.md").read_text()
    assert "## Runs started from other runs: loss and compute" in md and "## Conversion compared" in md
    conv = {c["comparison"]: c for c in report["conversion"]}
    assert set(conv) == {"converted − scratch", "converted_kd − scratch"}
    for c in conv.values():
        assert c["basis"] == "same trilm token budget" and c["verdict"] in ("holds", "not resolved", "does not hold")
        assert c["paired"] is not None

    # a study killed in the middle of the converted run resumes to the same numbers
    killed = tmp_path / "killed"
    _kill_converted_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_suite(spec, killed, progress=False)
    monkeypatch.undo()
    part = read_records(killed)
    assert "train/floatlm-m1/s0" in part and "train/converted-m1/s0" not in part
    assert list((killed / "runs" / "converted-m1-s0" / "checkpoints").glob("step_*"))  # it had saved a checkpoint
    with caplog.at_level(logging.INFO, logger="spectra.train.trainer"):
        again = run_suite(spec, killed, progress=False, report=False)
    assert "resuming" in caplog.text and "converted-m1-s0 from step_" in caplog.text  # from its checkpoint
    assert again["steps"]["failed"] == 0 and again["steps"]["skipped"] >= 1
    lines = [json.loads(x) for x in (killed / "results.jsonl").read_text().splitlines()]
    assert sum(r["key"] == "train/floatlm-m1/s0" for r in lines) == 1  # the FloatLM was not trained again
    after = read_records(killed)
    for key, rec in records.items():
        if rec["step"] in ("train", "eval"):
            assert after[key]["metrics"]["val_loss"] == rec["metrics"]["val_loss"], key
    for key in ("train/converted-m1/s0", "train/converted_kd-m1/s0"):
        assert after[key]["metrics"]["compute"]["total_flops"] == records[key]["metrics"]["compute"]["total_flops"]


# ---- the report's verdicts on planted numbers ------------------------------------------------------------------


def _planted(losses: dict[str, list[float]], tokens: dict[str, float], init: dict[str, str | None],
             windows: dict[str, list[float]]) -> dict[str, dict]:
    """Records of a conversion study with given validation losses per seed, tokens per arm, starts and per-window
    NLL offsets (added to a common base, per window)."""
    recs = {}
    flops = {a: 10.0 * t for a, t in tokens.items()}
    base = np.linspace(4.0, 6.0, 8)
    for arm, values in losses.items():
        fam = "floatlm" if arm == "floatlm" else "trilm"
        for seed, loss in enumerate(values):
            key = f"train/{arm}-1m/s{seed}"
            runs = {key: {"tokens": tokens[arm], "flops": flops[arm], "teacher_flops": 0.0}}
            if init[arm]:
                src = f"train/{init[arm]}-1m/s{seed}"
                runs[src] = {"tokens": tokens[init[arm]], "flops": flops[init[arm]], "teacher_flops": 0.0}
            model = {"name": f"{arm}-1m-s{seed}", "family": arm, "base_family": fam, "kind": fam, "size": "1m",
                     "seed": seed, "params": 1000, "bits": None, "format": None, "size_bits": 1e4,
                     "non_embedding_params": 500, "quantizer": None}
            recs[key] = {"key": key, "step": "train", "status": "done", "model": model, "artifacts": {},
                         "metrics": {"tokens": tokens[arm], "tokens_per_s": 1.0,
                                     "compute": {"init": init[arm], "teacher": None, "runs": runs,
                                                 "total_tokens": sum(r["tokens"] for r in runs.values()),
                                                 "total_flops": sum(r["flops"] for r in runs.values())}}}
            nll = (base + windows[arm][seed]) * 64
            recs["eval/" + key] = {"key": "eval/" + key, "step": "eval", "status": "done", "model": model,
                                   "artifacts": {}, "metrics": {"val_loss": loss, "seq_nll": nll.tolist(),
                                                                "seq_tokens": [64] * 8}}
    return recs


def test_verdicts_on_planted_numbers():
    scipy_stats = pytest.importorskip("scipy.stats")
    losses = {"floatlm": [5.00, 5.02, 5.04], "scratch": [5.50, 5.52, 5.54], "converted": [5.20, 5.22, 5.24],
              "worse": [5.80, 5.82, 5.84], "close": [5.49, 5.53, 5.55], "long": [5.10, 5.12, 5.14]}
    tokens = {"floatlm": 4e5, "scratch": 2e5, "converted": 2e5, "worse": 2e5, "close": 2e5, "long": 6e5}
    init = {"floatlm": None, "scratch": None, "converted": "floatlm", "worse": "floatlm", "close": "floatlm",
            "long": None}
    jitter = {a: [0.001 * ((i * 7 + s * 3) % 5) for s in range(3)] for i, a in enumerate(losses)}
    windows = {a: [jitter[a][s] + losses[a][s] for s in range(3)] for a in losses}
    recs = _planted(losses, tokens, init, windows)
    rows = model_rows(recs)
    table = arms(recs, rows)
    by_arm = {a["arm"]: a for a in table}
    assert by_arm["converted"]["total_tokens"] == 6e5 and by_arm["converted"]["total_flops"] == 6e6
    assert by_arm["scratch"]["init"] is None and by_arm["converted"]["init"] == "floatlm"
    got = {(c["comparison"], c["basis"]): c for c in comparisons(table, rows, sequence_losses(recs))}
    assert set(got) == {(f"{a} − {b}", basis) for a in ("converted", "worse", "close")
                        for b, basis in (("scratch", "same trilm token budget"), ("long", "same total tokens"))}
    verdicts = {k: c["verdict"] for k, c in got.items()}
    assert verdicts[("converted − scratch", "same trilm token budget")] == "holds"
    assert verdicts[("worse − scratch", "same trilm token budget")] == "does not hold"
    assert verdicts[("close − scratch", "same trilm token budget")] == "not resolved"
    assert verdicts[("converted − long", "same total tokens")] == "does not hold"
    # the seed interval restated: seeds as blocks over all six arms (an arm and its init share the seed), the
    # residual variance of arm + seed effects on (6 − 1)(3 − 1) = 10 degrees of freedom
    y = np.asarray(list(losses.values()))
    r = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (y.shape[0] - 1) * (y.shape[1] - 1)
    se = math.sqrt(float((r * r).sum()) / df * (1 / 3 + 1 / 3))
    half = scipy_stats.t.ppf(0.975, df) * se
    c = got[("converted − scratch", "same trilm token budget")]["seed"]
    assert c["estimate"] == pytest.approx(-0.30) and c["hi"] - c["estimate"] == pytest.approx(half, rel=1e-9)
    # the paired interval: per-window differences of the seed-averaged NLLs, t over the 8 windows
    p = got[("converted − scratch", "same trilm token budget")]["paired"]
    d = np.mean(windows["converted"]) - np.mean(windows["scratch"])
    assert p["estimate"] == pytest.approx(d, abs=1e-12) and p["n"] == 8
    # the report renders both tables
    assert arms({k: v for k, v in recs.items() if "converted" not in k and "worse" not in k and "close" not in k},
                rows) == []  # no run started from another: no conversion section
