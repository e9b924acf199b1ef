"""The first GPU run: a few training steps of trilm-99m and trilm-1.1b on every visible GPU, resume included.

    python benchmarks/gpu.py [--sizes trilm-99m,trilm-1.1b] [--steps 12] [--seq-len 2048] [--micro-batch 8]
    python benchmarks/gpu.py --device cpu --sizes trilm-tiny --steps 4 --seq-len 64 --micro-batch 2 --no-compile

Launched without torchrun on a machine with several GPUs, it relaunches itself under
`torchrun --standalone --nproc_per_node <GPUs>`. Each size trains through `spectra.train.train` exactly as
`spectra train` does: FSDP2 over all ranks (one GPU: a single process), bf16 (FSDP's mixed-precision policy: bf16
parameters and compute, fp32 reductions), TF32, torch.compile per block (`--no-compile` to skip), with a DCP
checkpoint halfway. Then the run is cut back to that checkpoint and resumed in a second directory, and the resumed
steps' losses are compared with the uninterrupted run's.

Printed per size: tokens/s (all GPUs, timed over the training steps only, the first steps' compilation included;
`--steps` more to amortise it), MFU = FLOPs/token (`spectra.accounting.flops_per_token`: 6·N + attention) × tokens/s
/ (GPUs × peak bf16 FLOP/s of the GPU: a datasheet table by name, `--peak-tflops` to override, else a measured
8192³ bf16 matmul), the peak memory per GPU (`torch.cuda.max_memory_allocated`, the largest over ranks; on CPU the
resident-set peak) against the memory plan's estimate, and the largest |Δ loss| of the resumed steps.

Data: by default a synthetic corpus (random words from a fixed list, 2,000 documents) and a 4,096-id BPE trained on
it, both written under `--out`, so the script needs no network; `--data`/`--tokenizer` take anything `spectra train`
does. The model keeps its size's vocabulary (50,304 rows), so the lm_head costs what it costs in the paper's runs.
Results go to `--out/gpu.json` as well.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# bf16 dense tensor-core peak (FLOP/s, no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="trilm-99m,trilm-1.1b", help="comma-separated model names (spectra sizes)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per size (even, >= 2; the checkpoint is "
                   "written halfway)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU and micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default=None, choices=["bf16", "fp32", "fp16"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--data", default=None, help="default: a synthetic corpus written under --out")
    p.add_argument("--tokenizer", default=None, help="default: a 4096-id BPE trained on the synthetic corpus")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU for MFU")
    p.add_argument("--out", default="runs/gpu-bench")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.steps < 2 or args.steps % 2:
        p.error(f"--steps must be an even number >= 2, got {args.steps}")
    for f in ("seq_len", "micro_batch", "grad_accum"):
        if getattr(args, f) < 1:
            p.error(f"--{f.replace('_', '-')} must be positive, got {getattr(args, f)}")
    from spectra.config import from_name

    for s in args.sizes:
        try:
            from_name(s)
        except ValueError as e:
            p.error(str(e))
    return args


def synthetic_corpus(out: Path, docs: int = 2000, seed: int = 0) -> Path:
    """A jsonl corpus of random words (a fixed list of 3,000 letter strings, Zipf-like frequencies)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    path = out / "corpus.jsonl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for _ in range(docs):
            text = " ".join(rng.choices(words, weights, k=rng.randint(200, 600)))
            fh.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path


def peak_flops(device: torch.device, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return _measured_matmul(device, torch.float32, 1024)
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return _measured_matmul(device, torch.bfloat16, 8192)


def _measured_matmul(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cut_at(run: Path, dst: Path, step: int) -> None:
    """A copy of `run` as it was when checkpoint `step` had just been written."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.startswith("step_") and int(p.name[5:]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dst / "final", ignore_errors=True)
    (dst / "result.json").unlink(missing_ok=True)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def bench_size(name: str, args, info, data: str, tokenizer: str, out: Path) -> dict:
    import torch.distributed as torch_dist

    from spectra.accounting import flops_per_token
    from spectra.config import from_name
    from spectra.train import dist, train
    from spectra.train.config import TrainConfig

    cfg = from_name(name)
    T = args.seq_len
    if T > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=T)
    batch_tokens = info.world * args.micro_batch * args.grad_accum * T
    half = args.steps // 2
    tc = TrainConfig(data=data, tokenizer=tokenizer, tokens=args.steps * batch_tokens, batch_tokens=batch_tokens,
                     seq_len=T, micro_batch=args.micro_batch, precision=args.precision,
                     parallel="fsdp" if info.world > 1 else None, compile=not args.no_compile,
                     activation_checkpointing=args.activation_checkpointing, device=info.device.type,
                     val_every=0, val_tokens=2 * info.world * T, ckpt_every_tokens=half * batch_tokens, ckpt_keep=4,
                     warmup=1, reuse_heap=False)
    full, resumed = out / name / "full", out / name / "resumed"
    if info.is_main:
        shutil.rmtree(out / name, ignore_errors=True)
    dist.barrier(info)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    r = train(cfg, tc, out_dir=full, progress=False)
    if info.device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(info.device)
        peak = max(dist.all_reduce_sum([float(mine) if i == info.rank else 0.0 for i in range(info.world)], info))
    else:
        peak = max(r.get("peak_memory_bytes") or [0])
    if info.is_main:
        cut_at(full, resumed, half)
    dist.barrier(info)
    r2 = train(cfg, tc, out_dir=resumed, resume=True, progress=False)
    row = {"size": name, "gpus": info.world, "device": str(info.device.type), "precision": tc.precision or "default",
           "compile": tc.compile, "seq_len": T, "micro_batch": args.micro_batch, "batch_tokens": batch_tokens,
           "steps": args.steps}
    if info.is_main:
        a, b = losses(full), losses(resumed)
        resumed_steps = [s for s in b if s > half]
        flops = flops_per_token(cfg, T)
        tps = r["tokens_per_s"]
        row.update({
            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / info.world,
            "mfu": flops * tps / (info.world * peak_flops(info.device, args.peak_tflops)),
            "peak_memory_gb_per_gpu": peak / 1e9, "memory_plan_gb": r["memory_plan_bytes"] / 1e9,
            "final_loss": r["train_loss"], "resumed_steps": len(resumed_steps),
            "resume_max_abs_dloss": max((abs(a[s] - b[s]) for s in resumed_steps), default=float("nan")),
            "resumed_final_loss": r2["train_loss"],
        })
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and "WORLD_SIZE" not in os.environ and torch.cuda.device_count() > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(torch.cuda.device_count()), os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd)
    from spectra.data.tokenizer import train_bpe
    from spectra.train import dist

    info = dist.init("cuda" if use_cuda else "cpu")  # joined here so that train() leaves the group to us
    out = Path(args.out)
    data, tokenizer = args.data, args.tokenizer
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if data is None:
            data = str(synthetic_corpus(out, docs=max(2000, 250 * info.world)))  # 5 % of it validates
        if tokenizer is None:
            tok = out / "tokenizer-bpe4096.json"
            if not tok.exists():
                train_bpe(data, 4096, tok)
            tokenizer = str(tok)
    data, tokenizer = dist.broadcast_object((data, tokenizer), info)
    rows = []
    try:
        for name in args.sizes:
            rows.append(bench_size(name, args, info, data, tokenizer, out))
            if info.is_main:
                print(json.dumps(rows[-1]), flush=True)
    finally:
        dist.cleanup(info)
    if info.is_main:
        from spectra.files import write_json

        write_json(out / "gpu.json", rows)
        hdr = (f"{'size':<12} {'GPUs':>4} {'tok/s':>10} {'tok/s/GPU':>10} {'MFU':>6} {'peak GB/GPU':>11} "
               f"{'plan GB':>8} {'resume |Δloss|':>14}")
        print(hdr)
        for r in rows:
            print(f"{r['size']:<12} {r['gpus']:>4} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_per_gpu']:>10.0f} "
                  f"{r['mfu']:>6.1%} {r['peak_memory_gb_per_gpu']:>11.2f} {r['memory_plan_gb']:>8.2f} "
                  f"{r['resume_max_abs_dloss']:>14.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
