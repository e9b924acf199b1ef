"""benchmarks/gpu.py: argument checks, its CPU path end to end (1 process and 2 gloo ranks, resume included), and the
GPU run itself (marked `gpu`: skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_are_checked(capsys):
    gpu = _module()
    a = gpu.parse_args([])
    assert a.sizes == ["trilm-99m", "trilm-1.1b"] and a.steps == 12 and a.seq_len == 2048 and not a.no_compile
    a = gpu.parse_args(["--sizes", "trilm-tiny, floatlm-99m", "--steps", "4", "--device", "cpu", "--no-compile"])
    assert a.sizes == ["trilm-tiny", "floatlm-99m"] and a.steps == 4 and a.device == "cpu" and a.no_compile
    for bad, msg in ((["--steps", "3"], "--steps must be an even number >= 2, got 3"),
                     (["--micro-batch", "0"], "--micro-batch must be positive, got 0"),
                     (["--sizes", "trilm-7b"], "unknown model size 'trilm-7b'")):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)
        assert msg in capsys.readouterr().err


def test_mfu_peak_table_and_override():
    gpu = _module()
    assert gpu.peak_flops(torch.device("cpu"), 123.0) == 123e12
    assert gpu.PEAK_BF16["H100"] == gpu.PEAK_BF16["H200"] == 989.4e12  # dense bf16, no sparsity


def _run(tmp_path: Path, nproc: int, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRA_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    out = subprocess.run([*launcher, str(SCRIPT), "--out", str(tmp_path / "out"), *extra], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_cpu_path_trains_resumes_and_reports(tmp_path, nproc):
    """The whole script on CPU with trilm-tiny: 4 steps, a checkpoint at step 2, the cut-back copy resumed from it
    continues the loss curve exactly (same world size and device), and every reported number is there."""
    out = _run(tmp_path, nproc, ["--device", "cpu", "--sizes", "trilm-tiny", "--steps", "4", "--seq-len", "64",
                                 "--micro-batch", "2", "--no-compile"])
    (row,) = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert (row["size"], row["gpus"], row["steps"], row["resumed_steps"]) == ("trilm-tiny", nproc, 4, 2)
    assert row["batch_tokens"] == nproc * 2 * 64
    assert row["resume_max_abs_dloss"] <= 1e-6 and row["resumed_final_loss"] == row["final_loss"]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert 0 < row["memory_plan_gb"] and 0 < row["peak_memory_gb_per_gpu"]
    assert "tok/s/GPU" in out.stdout and "trilm-tiny" in out.stdout.splitlines()[-1]
    run = json.loads((tmp_path / "out" / "trilm-tiny" / "full" / "run.json").read_text())
    assert run["train"]["parallel"] == ("fsdp" if nproc == 2 else "ddp") and run["world_size"] == nproc


@pytest.mark.gpu
def test_gpu_benchmark_runs_99m(tmp_path):
    """On a CUDA machine: trilm-99m, bf16, compiled, FSDP over every visible GPU, resume included."""
    _run(tmp_path, 1, ["--sizes", "trilm-99m", "--steps", "4", "--micro-batch", "4"])
    (row,) = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert row["gpus"] == torch.cuda.device_count() and row["resume_max_abs_dloss"] < 1e-3
    assert row["peak_memory_gb_per_gpu"] < 1.25 * row["memory_plan_gb"]
