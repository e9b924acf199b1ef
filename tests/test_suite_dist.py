"""The suite under torchrun (#15): every record written once, the same training as one process, failures on every
rank without a hang. Multi-process runs use torchrun with gloo on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from spectra.suite import load_spec, plan

# the micro preset, cut to one size and seed: 2 trainings, a quantize, a pack, 4 evals, 2 benches
SMALL = {"sizes": ["1m"], "quant_bits": [3], "pack_formats": ["tq2"], "tasks": ["ppl"], "seeds": [0]}


def spec_file(path: Path, quantize: dict | None = None, **suite) -> Path:
    """The micro preset as a TOML file with `[suite]` keys replaced and `[quantize]` keys added."""
    lines = resources.files("spectra.suite").joinpath("presets", "micro.toml").read_text().splitlines()
    section, out = None, []
    for line in lines:
        if line.startswith("["):
            section = line.strip()
        key = line.split("=")[0].strip()
        if section == "[suite]" and key in suite:
            continue
        if section == "[quantize]" and key in (quantize or {}):
            continue
        out.append(line)
        if line.strip() == "[suite]":
            out += [f"{k} = {json.dumps(v)}" for k, v in suite.items()]
        if line.strip() == "[quantize]":
            out += [f"{k} = {json.dumps(v)}" for k, v in (quantize or {}).items()]
    path.write_text("\n".join(out) + "\n")
    return path


def spectra_suite(tmp_path: Path, nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRA_CACHE": str(tmp_path / "cache"),
           "SPECTRA_SUITE_TIMEOUT": "300"}
    launcher = [sys.executable, "-m", "spectra"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "spectra"]
    return subprocess.run([*launcher, "suite", *args, "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]


def train_losses(out: Path, name: str) -> list[float]:
    rows = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_rank_suite_writes_each_record_once_and_trains_like_one_process(tmp_path):
    spec = spec_file(tmp_path / "suite.toml", **SMALL)
    r2 = spectra_suite(tmp_path, 2, ["--spec", str(spec), "--out", str(tmp_path / "s2")])
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert r2.stdout.count("suite micro:") == 1  # rank 0 alone reports
    recs = results(tmp_path / "s2")
    keys = [r["key"] for r in recs]
    assert sorted(keys) == sorted(s.key for s in plan(load_spec(path=spec)))  # each step exactly once
    assert len(set(keys)) == len(keys)
    assert all(r["status"] == "done" for r in recs), [(r["key"], r["error"]) for r in recs]
    for r in recs:
        if r["step"] == "train":
            run = json.loads((tmp_path / "s2" / r["artifacts"]["run"] / "run.json").read_text())
            assert run["world_size"] == 2
    assert (tmp_path / "s2" / "report" / "report.html").exists()
    # one process, training only: the same losses (same global batch, same data order)
    one = spec_file(tmp_path / "one.toml", **{**SMALL, "quant_bits": [], "pack_formats": [], "bench": False})
    r1 = spectra_suite(tmp_path, 1, ["--spec", str(one), "--out", str(tmp_path / "s1"), "--jobs", "1"])
    assert r1.returncode == 0, r1.stderr[-4000:]
    for name in ("floatlm-1m-s0", "trilm-1m-s0"):
        a, b = train_losses(tmp_path / "s2", name), train_losses(tmp_path / "s1", name)
        assert len(a) == len(b) >= 4, (a, b)
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    # perplexity shared over 2 ranks scores the same windows as one process
    one_recs = {r["key"]: r for r in results(tmp_path / "s1")}
    for r in recs:
        if r["key"].startswith("eval/train/"):
            assert r["metrics"]["val_loss"] == pytest.approx(one_recs[r["key"]]["metrics"]["val_loss"], abs=1e-3)


@pytest.mark.slow
def test_a_step_failing_on_rank_0_fails_on_both_ranks_without_a_hang(tmp_path):
    """GPTQ asks for more calibration sequences than the data holds: the quantize step fails on rank 0, the record
    says why (once), the eval that needs it is blocked, the rest of the study goes on and both ranks exit 1."""
    spec = spec_file(tmp_path / "suite.toml", quantize={"n_samples": 1_000_000},
                     **{**SMALL, "families": ["floatlm"], "bench": False})
    r = spectra_suite(tmp_path, 2, ["--spec", str(spec), "--out", str(tmp_path / "s")], timeout=300)
    assert r.returncode == 1, r.stderr[-4000:]
    recs = {x["key"]: x for x in results(tmp_path / "s")}
    assert len(recs) == len(results(tmp_path / "s")) == 4
    q = recs["quantize/floatlm-1m/3bit/s0"]
    assert q["status"] == "failed" and "1000000 requested" in q["error"], q["error"]
    assert recs["eval/quantize/floatlm-1m/3bit/s0"]["status"] == "blocked"
    assert recs["train/floatlm-1m/s0"]["status"] == recs["eval/train/floatlm-1m/s0"]["status"] == "done"


def _ranks_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from spectra.suite.ranks import SuiteRanks

    seen = {}
    with SuiteRanks("cpu", timeout_s=60) as ranks:

        def fail_on(r):
            def fn():
                if ranks.info.rank == r:
                    raise ValueError(f"bad thing on rank {r}")
                return ranks.info.rank
            return fn

        for name, call in (("all_ok", lambda: ranks.on_all(lambda: ranks.info.rank * 10 + 1)),
                           ("all_fail_1", lambda: ranks.on_all(fail_on(1))),
                           ("main_ok", lambda: ranks.on_main(lambda: "made on 0")),
                           ("main_fail", lambda: ranks.on_main(fail_on(0)))):
            try:
                seen[name] = ["ok", call()]
            except Exception as e:  # noqa: BLE001 - what each rank saw is the test's subject
                seen[name] = [type(e).__name__, str(e)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


def test_a_failure_on_any_rank_reaches_every_rank(tmp_path):
    """`on_all`: rank 0's value everywhere, or, when rank 1 raised, a RankFailed on both ranks naming rank 1 and its
    reason; `on_main`: rank 0 runs alone and its value or its exception reaches rank 1."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert seen[r]["all_ok"] == ["ok", 1]
        assert seen[r]["all_fail_1"] == ["RankFailed", "rank 1 of 2 failed: ValueError: bad thing on rank 1"]
        assert seen[r]["main_ok"] == ["ok", "made on 0"]
    assert seen[0]["main_fail"] == ["ValueError", "bad thing on rank 0"]
    assert seen[1]["main_fail"] == ["RankFailed", "rank 0 failed: ValueError: bad thing on rank 0"]
