"""The packed C kernels of a git revision against the working tree's, both loaded into one process.

    python benchmarks/kernel_ab.py [--base HEAD] [--size trilm-99m] [--threads 2] [--batch 16] [--pos 32]
                                   [--prefill 0 | --decode | --chunks C [--chunk-len 32]] [--format tq2] [--vocab V]
                                   [--shards 1] [--rounds 15]
                                   [-D NAME=VALUE ...] [--base-define NAME=VALUE ...] [--no-amx] [--placement NS]
                                   [--tree-prefetch NAME=VALUE ...]

On a shared VM whose speed drifts by half between minutes, two builds timed in separate processes, even alternated,
rarely give a ratio the noise does not swallow. Here both builds of `spectra.packed._kernels` are compiled into
temporary folders with the same compiler flags (`--base`'s sources from `git archive`, the working tree's as they
are; `-D` adds a macro to the working tree's build only, to try a tuning constant, `--base-define` one to the
base's), loaded side by side with importlib, and swapped into the decoder (its layer, attention and output-layer
calls) between alternating rounds.

The workload is the synthetic packed model of `--size` (random ternary blocks, int8 output layer, float16 KV cache
or `--kv-cache q8 | f32`): `--batch` sequences stepped 64 times from position `--pos` (`BatchDecoder.step`, the
batched decode of `generate` with several prompts and of `spectra serve`; with `--chunks C` each step also prefills C
prompt chunks of `--chunk-len` tokens in the same pass, as a server's step does while prompts arrive), or with
`--prefill P` a prompt of P
tokens through `Decoder.prefill`,
or with `--decode` 64 single-token steps of `Decoder` from an empty cache (llama-bench's `tg`; with `--greedy` through
`Decoder.greedy`, one C call per token, as `generate` and `spectra bench` decode).
`--format tq1` packs the model as TQ1_0; `--vocab` overrides the vocabulary (32000: `benchmarks/decode.py`);
`--shards 2` gives every matrix two scale shards, as real checkpoints have (the row-parallel ones then have two scale
segments per row).
Prints each build's median time and the median [range] of the per-round ratios base / tree (above 1: the working
tree is faster), and in how many rounds the tree was faster. The Python side is the working tree's for both, so a
base whose C functions take other arguments cannot be compared this way (the call fails with a TypeError).
Built with `-D POOL_STATS=1 --base-define POOL_STATS=1` (the thread pool's wait counters, pool.h), it also prints per
build where the pool's threads waited: per job, the caller's and the workers' chunks, the caller's wait after its
own, and the time between jobs (the caller's work outside them, while the workers wait), as shares of the caller's
time.
`--tree-prefetch NAME=VALUE` changes one of the working tree's build's prefetch settings (`kernels.set_prefetch`'s
arguments: gemv_step, i8_bytes, i8_every_line, gemv_copies, tq1_step, gemv_fixed) after import, where `prefetch_tune`
chose them for this CPU; the base build keeps its own. With `--base HEAD` that is one build against itself with one
setting changed, as `--tree-prefetch gemv_fixed=1` tries on AMD the loop Intel runs (README, "The one-token GEMV's
prefetches fixed at compile time").
With `--placement NS` it also times a core-to-core round trip around every round and reports the rounds apart by
where the two cores sat: the 2-core Zen 5 VM moves its vCPUs between one CCD and two within seconds, which moves the
2-thread read rate between ~50 and ~80 GB/s and changes what a kernel change is worth (README, "Where the VM's two
cores sit").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from spectra.config import from_name
from spectra.inference.batch import BatchDecoder
from spectra.inference.bench import packed_copy, synthetic_trilm, with_int8_head
from spectra.inference.decode import Decoder
from spectra.inference.generate import kv_dtype_from_name
from spectra.model import build_model
from spectra.packed import kernels as K
from spectra.packed.linear import convert_to_packed

ROOT = Path(__file__).resolve().parents[1]
CSRC = "src/spectra/packed/csrc"
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def build(source_dir: Path, out_dir: Path, defines: list[str]) -> Path:
    """Compile ternary_kernels.c of `source_dir` (a checkout's root) as setup.py does on Linux."""
    out = out_dir / f"_kernels{SUFFIX}"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    cmd = [cc, "-O3", "-ffp-contract=off", "-std=c11", "-fopenmp", "-fPIC", "-shared", "-fwrapv",
           f"-I{sysconfig.get_paths()['include']}", *[f"-D{d}" for d in defines],
           str(source_dir / CSRC / "ternary_kernels.c"), "-o", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"compiling {source_dir / CSRC} failed:\n{r.stderr.strip()}")
    return out


def load(path: Path):
    loader = importlib.machinery.ExtensionFileLoader("_kernels", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_kernels", loader))
    loader.exec_module(module)
    return module


PREFETCH_SETTINGS = ("gemv_step", "i8_bytes", "i8_every_line", "gemv_copies", "tq1_step", "gemv_fixed")


def parse_prefetch(items: list[str]) -> dict[str, int]:
    """--tree-prefetch NAME=VALUE items as {name: int}, refusing unknown names and non-integer values."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in PREFETCH_SETTINGS or not value.lstrip("-").isdigit():
            raise SystemExit(f"--tree-prefetch {item!r}: need NAME=INTEGER with NAME one of "
                             f"{', '.join(PREFETCH_SETTINGS)}")
        out[name] = int(value)
    return out


def set_prefetch_of(module, changes: dict[str, int]) -> None:
    """Apply `changes` to one loaded build's prefetch settings, keeping the others as its import chose them."""
    now = module.set_prefetch(0, 0, False)  # returns the settings it replaced: put them back with the changes
    if len(now) < len(PREFETCH_SETTINGS):
        raise SystemExit("--tree-prefetch: this build's set_prefetch takes fewer settings than "
                         + ", ".join(PREFETCH_SETTINGS))
    merged = {**dict(zip(PREFETCH_SETTINGS, now)), **changes}
    module.set_prefetch(*(merged[name] for name in PREFETCH_SETTINGS))  # the C call takes all six by position
    print(f"tree build's prefetch settings: {merged}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree against")
    ap.add_argument("--no-amx", action="store_true", help="switch AMX off in both builds (the AVX-512 kernels)")
    ap.add_argument("--size", default="trilm-99m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pos", type=int, default=32, help="position the batch's 64 steps start from")
    ap.add_argument("--prefill", type=int, default=0, help="time a prompt of this many tokens instead")
    ap.add_argument("--chunks", type=int, default=0,
                    help="with the batch step: each step also prefills this many prompt chunks of --chunk-len tokens, "
                         "each into its own slot from position 0, in the same pass (`step_with_prefill`: a server's "
                         "step while prompts arrive)")
    ap.add_argument("--chunk-len", type=int, default=32)
    ap.add_argument("--decode", action="store_true", help="time 64 single-token decode steps instead")
    ap.add_argument("--greedy", action="store_true",
                    help="with --decode: step through Decoder.greedy (one C call per token: what `generate` and "
                         "`spectra bench` run) instead of the decoder's per-layer calls")
    ap.add_argument("--format", choices=["tq2", "tq1"], default="tq2")
    ap.add_argument("--kv-cache", choices=["f16", "q8", "f32"], default="f16",
                    help="the KV cache of the batch step and --decode (serve's --kv-cache)")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary")
    ap.add_argument("--shards", type=int, default=1,
                    help="scale shards per matrix (2: as `spectra.load('trilm-1.1b')` and packed checkpoints; blocks "
                         "that straddle two shards are rounded as `spectra pack --lossy` does)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--placement", type=float, default=None, metavar="NS",
                    help="time a core-to-core round trip (kernels.core_round_trip_ns) before and after every round "
                         "and also report the rounds apart by placement: both round trips below NS (the cores share "
                         "a last-level cache) or both above (they do not); on the 2-core Zen 5 VM about 90 against "
                         "400 ns, so 250 splits them")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="NAME=VALUE for the tree's build")
    ap.add_argument("--base-define", dest="base_defines", action="append", default=[],
                    help="NAME=VALUE for the base's build")
    ap.add_argument("--tree-prefetch", action="append", default=[], metavar="NAME=VALUE",
                    help="a set_prefetch setting for the tree's build only (gemv_step, i8_bytes, i8_every_line, "
                         "gemv_copies, tq1_step, gemv_fixed)")
    args = ap.parse_args()
    if args.rounds < 1:  # (0 used to fail only after both builds had compiled)
        ap.error("--rounds must be >= 1")
    tree_prefetch = parse_prefetch(args.tree_prefetch)
    if K.extension() is None:
        raise SystemExit("the C extension is not built here (pip install -e .)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_src = tmp / "base"
        base_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, CSRC], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {args.base}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive.stdout, check=True)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        builds = {"base": load(build(base_src, tmp / "a", args.base_defines)),
                  "tree": load(build(ROOT, tmp / "b", args.defines))}
        if args.no_amx:  # both builds on the AVX-512 kernels that CPUs without AMX (Zen 4) run
            for mod in builds.values():
                mod.set_amx(False)
        if tree_prefetch:
            set_prefetch_of(builds["tree"], tree_prefetch)

        torch.set_num_threads(args.threads)
        if args.shards == 1:
            latent = synthetic_trilm(args.size, vocab_size=args.vocab)
            model = with_int8_head(packed_copy(latent, args.format, inplace=True))
        else:
            name = args.size if args.size.startswith("trilm-") else f"trilm-{args.size}"
            cfg = from_name(name, num_scale_shards=args.shards, **({"vocab_size": args.vocab} if args.vocab else {}))
            latent = build_model(cfg, seed=0).eval()
            convert_to_packed(latent, args.format, lossy=True)
            model = with_int8_head(latent)
        vocab = model.config.vocab_size
        kv_dtype = kv_dtype_from_name(args.kv_cache)
        g = torch.Generator().manual_seed(0)
        if args.prefill:
            dec = Decoder(model)
            ids = torch.randint(0, vocab, (1, args.prefill), generator=g)

            def measure() -> float:
                cache = dec.new_cache(1, args.prefill, torch.float16)
                with torch.inference_mode(), K.serial_torch():
                    t0 = time.perf_counter()
                    dec.prefill(ids, cache)
                    return time.perf_counter() - t0

            what = f"prompt of {args.prefill} tokens"
        elif args.decode:
            dec = Decoder(model)
            ids = torch.randint(0, vocab, (65, 1, 1), generator=g)
            cache = model.new_cache(1, 66, kv_dtype)

            def measure() -> float:
                with torch.inference_mode(), K.serial_torch() if args.greedy else contextlib.nullcontext():
                    cache.pos = 0
                    dec(ids[0], cache=cache)
                    t0 = time.perf_counter()
                    for t in ids[1:]:
                        if args.greedy:
                            dec.greedy(int(t), cache)
                        else:
                            dec(t, cache=cache)
                    return (time.perf_counter() - t0) / 64

            if args.greedy:
                with torch.inference_mode():
                    if not dec.greedy_ready(cache):
                        raise SystemExit("--greedy: this model's decoder has no one-call greedy step")
            what = f"decode step{' (Decoder.greedy)' if args.greedy else ''}, 64 tokens from an empty cache"
        else:
            bd = BatchDecoder(model, args.batch + args.chunks, max(args.pos + 64, args.chunk_len), kv_dtype)
            dec = bd.kernel["decoder"]
            slots = [bd.acquire() for _ in range(args.batch)]
            for s in slots:
                bd.prefill(s, torch.randint(0, vocab, (args.pos,), generator=g).tolist())
            steps = torch.randint(0, vocab, (64, args.batch), generator=g).tolist()
            chunk_slots = [bd.acquire() for _ in range(args.chunks)]
            chunks = [[(s, torch.randint(0, vocab, (args.chunk_len,), generator=g).tolist()) for s in chunk_slots]
                      for _ in steps]

            def measure() -> float:
                for s in slots:
                    bd.caches[s].pos = args.pos
                t0 = time.perf_counter()
                for tokens, pre in zip(steps, chunks):
                    for s in chunk_slots:
                        bd.caches[s].pos = 0
                    if pre:
                        bd.step_with_prefill(slots, tokens, pre)
                    else:
                        bd.step(slots, tokens)
                return (time.perf_counter() - t0) / len(steps)

            what = f"batch-{args.batch} step at positions {args.pos}-{args.pos + 63}"
            if args.chunks:
                what += f", {args.chunks} prompt chunks of {args.chunk_len} tokens in each"

        real = K.extension
        waits: dict[str, dict[str, int]] = {}

        def run(name: str) -> float:
            dec._ext = builds[name]
            K.extension = lambda: builds[name]  # the output layer and argmax calls too
            stats = getattr(builds[name], "pool_stats", None)
            if stats:
                stats()
            try:
                return measure()
            finally:
                K.extension = real
                if stats:
                    for key, v in stats().items():
                        waits.setdefault(name, {}).setdefault(key, 0)
                        waits[name][key] += v

        run("base"), run("tree")  # first calls: page faults, buffers
        waits.clear()
        times: dict[str, list[float]] = {"base": [], "tree": []}
        where: list[tuple[float | None, float | None]] = []
        for r in range(args.rounds):
            before = K.core_round_trip_ns(20_000) if args.placement else None
            for name in ("base", "tree") if r % 2 == 0 else ("tree", "base"):
                times[name].append(run(name))
            where.append((before, K.core_round_trip_ns(20_000) if args.placement else None))
    ratios = sorted(b / t for b, t in zip(times["base"], times["tree"]))
    extra = f" (-D {' '.join(args.defines)})" if args.defines else ""
    extra += f" (tree prefetch {' '.join(args.tree_prefetch)})" if args.tree_prefetch else ""
    extra += f" (base -D {' '.join(args.base_defines)})" if args.base_defines else ""
    print(f"{args.size} {args.format}, {args.threads} threads, {what}; {args.base} against the working tree{extra}, "
          f"{args.rounds} alternating rounds in one process")
    for name in ("base", "tree"):
        print(f"  {name:5s} median {statistics.median(times[name]) * 1e3:.3f} ms")
    print(f"  base / tree: {statistics.median(ratios):.3f}x [{ratios[0]:.3f}-{ratios[-1]:.3f}], "
          f"tree faster in {sum(x > 1 for x in ratios)}/{len(ratios)} rounds")
    for name, w in waits.items():  # builds with -D POOL_STATS (pool.h)
        jobs = max(w["jobs"], 1)
        span = w["caller_work"] + w["caller_wait"] + w["between"]
        print(f"  {name:5s} pool, {w['jobs'] / args.rounds:.0f} jobs a round; per job (us): caller's chunks "
              f"{w['caller_work'] / jobs / 1e3:.2f}, workers' chunks {w['worker_work'] / jobs / 1e3:.2f} (first "
              f"starting {w['wake'] / jobs / 1e3:.2f} after publishing), caller waiting after its chunks "
              f"{w['caller_wait'] / jobs / 1e3:.2f} ({100 * w['caller_wait'] / max(span, 1):.1f} %), between jobs "
              f"(the workers waiting) {w['between'] / jobs / 1e3:.2f} ({100 * w['between'] / max(span, 1):.1f} %)")
    if args.placement:
        for label, below in (("sharing a last-level cache", True), ("apart", False)):
            idx = [i for i, (a, b) in enumerate(where)
                   if a is not None and b is not None and (a < args.placement) == below == (b < args.placement)]
            head = f"  cores {label} (round trip {'<' if below else '>'} {args.placement:.0f} ns)"
            if not idx:
                print(f"{head}: no round")
                continue
            rs = sorted(times["base"][i] / times["tree"][i] for i in idx)
            print(f"{head}, {len(idx)} rounds: base {statistics.median(times['base'][i] for i in idx) * 1e3:.3f} ms, "
                  f"tree {statistics.median(times['tree'][i] for i in idx) * 1e3:.3f} ms, base / tree "
                  f"{statistics.median(rs):.3f}x [{rs[0]:.3f}-{rs[-1]:.3f}], tree faster in "
                  f"{sum(x > 1 for x in rs)}/{len(rs)}")
        mixed = sum(1 for a, b in where if a is None or b is None
                    or (a < args.placement) != (b < args.placement))
        print(f"  rounds whose placement changed (or was not measured): {mixed}")


if __name__ == "__main__":
    sys.exit(main())
