"""Wall time of GPTQ on a 99M-shaped FloatLM: spectra vs GPTQModel 7.6.0 on the same model and calibration tokens.

    python benchmarks/gptq.py [--size floatlm-99m] [--n-samples 32] [--seq-len 512] [--bits 4] [--group-size 128]
                              [--gptqmodel-python /work/venv-gptq/bin/python] [--rounds 1]

Both quantize the same random-init model (exported as a Hugging Face Llama directory) at the same settings: symmetric,
damp 0.01, no act-order, true-sequential, GPTQModel with its RTN fallback and act-group-aware reordering off.
GPTQModel runs in its own virtualenv (it pins its own dependencies), as a subprocess with GPTQMODEL_CPU_WORKERS=2;
runs are interleaved (ours, theirs, ours, ...) because the machine is shared. We report "quantize" (calibration
forward passes + GPTQ, model already in memory) and "end to end" (load + quantize + write the GPTQ checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GPTQMODEL_SCRIPT = r"""
import json, os, sys, time
import torch
from gptqmodel import GPTQModel, QuantizeConfig
src, calib_path, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
calib = torch.load(calib_path)
data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
t0 = time.perf_counter()
cfg = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, damp_percent=0.01,
                     act_group_aware=False, fallback=None, true_sequential=True)
model = GPTQModel.load(src, cfg, device="cpu")
t1 = time.perf_counter()
model.quantize(data, batch_size=len(data))
t2 = time.perf_counter()
model.save(out)
t3 = time.perf_counter()
print("RESULT " + json.dumps({"load": t1 - t0, "quantize": t2 - t1, "save": t3 - t2, "end_to_end": t3 - t0}))
"""


def byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer (<|endoftext|> = 0, then the 256 byte symbols), enough for the HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return path


def run_ours(src: Path, calib: torch.Tensor, out: Path, bits: int, group: int) -> dict:
    import spectra
    from spectra.ptq import quantize_model, save_gptq

    t0 = time.perf_counter()
    model = spectra.load(src, dtype=torch.float32)
    t1 = time.perf_counter()
    quantize_model(model, calib, bits=bits, group_size=group, progress=False)
    t2 = time.perf_counter()
    save_gptq(model, out)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "quantize": t2 - t1, "save": t3 - t2, "end_to_end": t3 - t0}


def run_gptqmodel(python: str, src: Path, calib_path: Path, out: Path, bits: int, group: int) -> dict:
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH="")
    proc = subprocess.run([python, "-c", GPTQMODEL_SCRIPT, str(src), str(calib_path), str(out), str(bits), str(group)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"GPTQModel run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="floatlm-99m")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--gptqmodel-python", default="/work/venv-gptq/bin/python",
                   help="python of a venv with gptqmodel==7.6.0 (skipped if missing)")
    args = p.parse_args()

    import spectra
    from spectra.interop.hf import export_hf

    have_theirs = Path(args.gptqmodel_python).exists()
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as tmp:
        tmp = Path(tmp)
        model = spectra.load(args.size, seed=0)
        src = export_hf(model, tmp / "float", dtype=torch.float32, tokenizer=byte_tokenizer(tmp / "tok.json"))
        n_params = sum(p.numel() for p in model.parameters())
        del model
        gen = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 257, (args.n_samples, args.seq_len), generator=gen)
        torch.save(calib, tmp / "calib.pt")
        print(f"{args.size} ({n_params / 1e6:.2f}M params), {args.bits}-bit g{args.group_size} sym, damp 0.01, "
              f"calibration {args.n_samples} x {args.seq_len} tokens, torch threads {torch.get_num_threads()}")
        rows = []
        for r in range(args.rounds):
            ours = run_ours(src, calib, tmp / f"ours{r}", args.bits, args.group_size)
            rows.append(("spectra", ours))
            print(f"  spectra    quantize {ours['quantize']:7.1f} s   end to end {ours['end_to_end']:7.1f} s",
                  flush=True)
            if have_theirs:
                theirs = run_gptqmodel(args.gptqmodel_python, src, tmp / "calib.pt", tmp / f"theirs{r}", args.bits,
                                       args.group_size)
                rows.append(("gptqmodel", theirs))
                print(f"  GPTQModel  quantize {theirs['quantize']:7.1f} s   end to end {theirs['end_to_end']:7.1f} s",
                      flush=True)
        if have_theirs:
            best = {name: min(r["end_to_end"] for n, r in rows if n == name) for name in ("spectra", "gptqmodel")}
            bestq = {name: min(r["quantize"] for n, r in rows if n == name) for name in ("spectra", "gptqmodel")}
            print(f"speed-up (GPTQModel / spectra): quantize {bestq['gptqmodel'] / bestq['spectra']:.2f}x, "
                  f"end to end {best['gptqmodel'] / best['spectra']:.2f}x")
            # Cross-check: GPTQModel's checkpoint opens with spectra.load and agrees with ours on the logits.
            idx = calib[:2, :128]
            with torch.no_grad():
                a = spectra.load(tmp / "ours0")(idx)
                b = spectra.load(tmp / "theirs0")(idx)
                f = spectra.load(src)(idx)
            rel = lambda x: ((x - f).norm() / f.norm()).item()  # noqa: E731
            print(f"logit rel. error vs float: spectra {rel(a):.4f}, GPTQModel {rel(b):.4f} "
                  f"(GPTQModel checkpoint loaded by spectra.load)")
        else:
            print(f"GPTQModel not found at {args.gptqmodel_python}: only spectra measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
