"""spectra's user path against llama.cpp-family runtimes (llama-bench), side by side, with the DRAM bound measured in
the same run.

    python benchmarks/peers.py --llama-bench /path/to/llama.cpp/build/bin/llama-bench \
        --llama-bench /path/to/ik_llama.cpp/build/bin/llama-bench [--threads 1 2] [--prompt-len 128] [--gen-len 64] \
        [--rounds 2] [--reps 1] [--spectra-tq1] [--workdir DIR] [--json FILE]

The peers are llama-bench binaries you built yourself from their public sources (nothing of them is in this repo).
The run:
1. builds a TriLM with the paper's 1.1B shape and random weights (`spectra.load("trilm-1.1b")`: two scale shards per
   matrix, as the paper's model-parallel training leaves them), writes it as a packed checkpoint the way
   `spectra pack trilm-1.1b DIR --lossy` does, and opens that with `spectra.load`: the path users take. Decoding is
   `spectra.inference.bench.time_torch` (prefill of P tokens, and G single-token steps with the int8 lm_head, what
   `spectra bench` and `spectra generate` run);
2. exports the same latent model as an f16 GGUF (`spectra.interop.gguf.export_gguf`, qtype f16) and has each peer's
   own `llama-quantize` (found next to its llama-bench) quantize it to each of its ternary types that it lists
   (TQ2_0 / TQ1_0 for llama.cpp, IQ2_BN / IQ1_BN for ik_llama.cpp), token embedding and output in Q8_0 (our
   head is int8 too). Blocks that straddle two shards are rounded to their absmax by both sides alike;
3. runs everything interleaved: each round runs, per thread count, spectra and then every peer configuration (each
   type, flash attention off and on, and `-rtr 1` where the binary has run-time repacking), `--reps` samples each;
4. measures the DRAM read rate per thread count in every round, right before and right after spectra's rows (the
   larger of the two: the rate drifts within seconds on a shared VM), each the best of a torch sum, a numpy
   OR-reduce and the kernels' `stream_read` with 1, 2 and 4 streams per thread, with and without software prefetch,
   over 1 GiB on 2 MiB pages (`ReadProbe`; until 2026-12-05 only torch and numpy, which read 9-15 % below
   `stream_read` on the 2-core Xeon, so a decode could score above 100 %), and reports each runtime's fraction of
   the bandwidth bound:
   (bytes of weights read per decoded token / the median read rate) / (seconds per decoded token). Bytes of weights
   are every tensor but the token embedding (one row of it is read per token): for spectra the packed blocks, their
   scales, the int8 head and the norms; for a peer the tensors of its GGUF file.

`--spectra-tq1` also packs the same latent model as TQ1_0 and times it as a second spectra row in every round, and
prints TQ1_0 / TQ2_0 paired per round (issue 18's row "TQ1_0 decode faster than TQ2_0", in the same run).

Speeds are medians over all samples. Under the ratio row, the ratios are also taken within each round (each side's
median sample of that round) and printed as median [min-max] over the rounds, with spectra's fraction of the bound
per round against that round's read rate: on a shared VM whose speed drifts, the spread says how far to trust the
ratio of the medians. Both sides run llama-bench's tests: the prompt of P tokens from an empty context
(`pp`), and G single-token steps from an empty context (`tg`: positions 0 .. G-1), with a float16 KV cache (llama.cpp's
default). Until 2026-12-03 spectra decoded after its prompt (positions P .. P+G-1) into a float32 cache, which on the
1.1B at P = 128 cost it 8-9 % of its decode rate on 2 Zen 4 threads (attention was 14 % of the profile); the README's
tables from before that date were measured that way.
The machine must be otherwise idle for numbers worth quoting; the load average before and after is printed. The
defaults (2 rounds × 1 sample of 9 runtimes on 1 and 2 threads; each llama-bench call also makes its own warm-up run)
take about 5 minutes with both peers on the 2-core Zen 4; `--rounds 3 --reps 2` gives 6 samples each in about 10.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spectra.files import check_output_file, write_json

TERNARY_TYPES = ("TQ2_0", "TQ1_0", "IQ2_BN", "IQ1_BN")
OURS_TQ1 = "spectra TQ1_0 (packed checkpoint, spectra.load)"
PROBE_BYTES = 1 << 30


# ---- DRAM read rate -------------------------------------------------------------------------------------------------


STREAM_SETTINGS = ((1, 0), (2, 1024), (4, 1024))  # (streams per thread, prefetch bytes) of the stream_read probes


class ReadProbe:
    """A 1 GiB buffer on 2 MiB pages, read whole with `threads` threads; best of a few reads, in bytes/s."""

    def __init__(self, nbytes: int = PROBE_BYTES) -> None:
        from spectra.packed import kernels as K

        self.t = torch.ones(nbytes // 4)
        K.use_huge_pages(self.t)
        self.u64 = self.t.numpy().view(np.uint64)

    def _torch(self, threads: int) -> float:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            self.t.sum()
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(old)

    def _numpy(self, threads: int) -> float:  # numpy's reductions release the GIL: one thread per part
        parts = np.array_split(self.u64, threads)
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    def _stream(self, threads: int, streams: int, prefetch: int) -> float:  # seconds per byte
        from spectra.packed import kernels as K

        t0 = time.perf_counter()
        n = K.stream_read(self.t, threads, streams=streams, prefetch=prefetch)
        return (time.perf_counter() - t0) / n

    def __call__(self, threads: int, tries: int = 3) -> float:
        """The best rate over `tries` reads by each method: torch's sum, numpy's OR-reduce, and the kernels'
        `stream_read` with 1, 2 and 4 streams per thread, with and without software prefetch (2 streams and prefetch
        read 9-15 % faster than numpy on the 2-core Xeon; a decode that prefetches must not beat its own bound)."""
        n = self.t.nbytes
        per_byte = [read(threads) / n for _ in range(tries) for read in (self._torch, self._numpy)]
        for streams, prefetch in STREAM_SETTINGS:
            per_byte += [self._stream(threads, streams, prefetch) for _ in range(tries)]
        return 1.0 / min(per_byte)


# ---- spectra --------------------------------------------------------------------------------------------------------


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer except the token embedding and RoPE tables
    (the packed layers' code bytes and scales, the int8 head, the norms); tensors shared by two names count once."""
    emb = model.embed_tokens
    skip = {id(t) for t in [*emb.parameters(), *emb.buffers()]}
    skip |= {id(getattr(model, "rope_cos", None)), id(getattr(model, "rope_sin", None))}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build_spectra(
    size: str, workdir: Path, seed: int, tq1: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module | None, Path, dict]:
    """(the packed model as users open it, with `tq1` the same latent model packed as TQ1_0 and opened the same way
    (else None), the f16 GGUF of the same latent model, facts about them)."""
    from spectra.config import from_name
    from spectra.inference.bench import with_int8_head
    from spectra.interop.gguf import export_gguf
    from spectra.loading import load
    from spectra.model import build_model
    from spectra.packed.io import pack_model

    latent = build_model(from_name(size), seed=seed).eval()  # what `spectra pack trilm-1.1b` packs
    shards = latent.config.num_scale_shards
    packed_dir, f16 = workdir / "packed", workdir / "model-f16.gguf"
    try:
        summary = pack_model(latent, packed_dir, lossy=False)
        lossy = False
    except ValueError:  # shards of 896 columns at dim 1792: blocks straddle two shards, as `spectra pack --lossy`
        summary = pack_model(latent, packed_dir, lossy=True)
        lossy = True
    facts = {"scale_shards": shards, "lossy": lossy, "packed_file_bytes": summary["file_bytes"]}
    if tq1:
        facts["tq1_file_bytes"] = pack_model(latent, workdir / "packed-tq1", format="tq1", lossy=lossy)["file_bytes"]
    export_gguf(latent, f16, qtype="f16")
    del latent
    gc.collect()
    model = with_int8_head(load(packed_dir))
    tq1_model = with_int8_head(load(workdir / "packed-tq1")) if tq1 else None
    return model, tq1_model, f16, facts


def time_spectra(model, prompt: torch.Tensor, decode_ids: torch.Tensor, threads: int) -> tuple[float, float]:
    from spectra.inference.bench import time_torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, d = time_torch(model, prompt, decode_ids, decode_from_empty=True, kv_dtype=torch.float16)
    finally:
        torch.set_num_threads(old)
    return prompt.shape[1] / p, decode_ids.shape[1] / d


# ---- peers ----------------------------------------------------------------------------------------------------------


class Peer:
    """One llama-bench binary, its llama-quantize, and what they support."""

    def __init__(self, bench: str) -> None:
        self.bench = Path(bench).resolve()
        if not self.bench.is_file() or not os.access(self.bench, os.X_OK):
            raise SystemExit(f"--llama-bench {bench}: not an executable file")
        self.quantize = self.bench.with_name("llama-quantize")
        if not self.quantize.is_file():
            raise SystemExit(f"--llama-bench {bench}: no llama-quantize next to it ({self.quantize})")
        help_bench = _help(self.bench)
        help_quant = _help(self.quantize)
        self.types = [t for t in TERNARY_TYPES if re.search(rf"\b{t}\b", help_quant)]
        if not self.types:
            raise SystemExit(f"{self.quantize} lists none of the ternary types {', '.join(TERNARY_TYPES)}")
        self.rtr = bool(re.search(r"(^|\s)-rtr\b", help_bench))
        fa_line = next((ln for ln in help_bench.splitlines() if "--flash-attn" in ln), "")
        self.fa_values = ("off", "on") if "on|off" in fa_line else ("0", "1")  # newer llama.cpp: <on|off|auto>
        self.name = "ik_llama.cpp" if any(t.endswith("_BN") for t in self.types) else "llama.cpp"
        self.models: dict[str, Path] = {}
        self.bytes: dict[str, int] = {}

    def prepare(self, f16: Path, workdir: Path) -> None:
        from gguf import GGUFReader

        embd = next(t for t in GGUFReader(str(f16)).tensors if t.name == "token_embd.weight")
        q8_embedding_bytes = int(embd.n_elements) // 32 * 34  # Q8_0: 32 int8 + one fp16 scale per block
        for t in self.types:
            out = workdir / f"{self.name}-{t}.gguf"
            cmd = [str(self.quantize), "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0", str(f16),
                   str(out), t]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
            self.models[t] = out
            self.bytes[t] = gguf_weight_bytes(out, q8_embedding_bytes)

    def configs(self) -> list[dict]:
        return [{"type": t, "fa": fa} for t in self.types for fa in self.fa_values]

    def label(self, cfg: dict) -> str:
        flags = f"-fa {cfg['fa']}" + (" -rtr 1" if self.rtr else "")
        return f"{self.name} {cfg['type']} ({flags})"

    def run(self, cfg: dict, threads: int, prompt_len: int, gen_len: int, reps: int) -> tuple[list, list]:
        cmd = [str(self.bench), "-m", str(self.models[cfg["type"]]), "-t", str(threads), "-p", str(prompt_len),
               "-n", str(gen_len), "-r", str(reps), "-fa", cfg["fa"], "-o", "json"]
        if self.rtr:
            cmd += ["-rtr", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        pp, tg = [], []
        for test in json.loads(r.stdout):
            samples = test.get("samples_ts") or [test["avg_ts"]]
            (pp if test.get("n_gen", 0) == 0 else tg).extend(float(s) for s in samples)
        return pp, tg


def _help(binary: Path) -> str:
    r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def gguf_weight_bytes(path: Path, embedding_bytes: int) -> int:
    """Bytes of every tensor in a GGUF file except the token embedding (what a decode step reads). Types the gguf
    package does not know (ik_llama.cpp's IQ2_BN / IQ1_BN) are counted as the file's size less the embedding's
    `embedding_bytes` (the metadata is a few hundred kB of tokens at most)."""
    from gguf import GGUFReader

    try:
        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")
    except ValueError:
        return path.stat().st_size - embedding_bytes


# ---- the run --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from spectra.packed import kernels as K

    peers = [Peer(p) for p in args.llama_bench]
    seen: dict[str, int] = {}
    for peer in peers:  # two builds of one family were one row each under one name: the second replaced the first
        seen[peer.name] = seen.get(peer.name, 0) + 1
        if seen[peer.name] > 1:
            peer.name = f"{peer.name} #{seen[peer.name]}"
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="spectra-peers-", dir=args.workdir))
    try:
        print(f"building {args.size} (random weights), packing it and exporting the f16 GGUF into {workdir} ...")
        model, tq1_model, f16, facts = build_spectra(args.size, workdir, args.seed, tq1=args.spectra_tq1)
        for p in peers:
            print(f"{p.name}: quantizing to {', '.join(p.types)} with {p.quantize}")
            p.prepare(f16, workdir)
        f16.unlink()
        ours = "spectra (packed checkpoint, spectra.load)"
        runtimes: dict[str, dict] = {ours: {"bytes": weight_bytes_per_token(model), "model": model}}
        if tq1_model is not None:
            runtimes[OURS_TQ1] = {"bytes": weight_bytes_per_token(tq1_model), "model": tq1_model}
        for p in peers:
            for cfg in p.configs():
                runtimes[p.label(cfg)] = {"bytes": p.bytes[cfg["type"]], "peer": p, "cfg": cfg}
        g = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g)
        decode_ids = torch.randint(0, vocab, (1, args.gen_len), generator=g)
        probe = ReadProbe()
        for rt in runtimes.values():  # warm up: page faults, dispatch
            if "model" in rt:
                time_spectra(rt["model"], prompt[:, :8], decode_ids[:, :4], 1)
        samples = {(name, t): {"pp": [], "tg": []} for name in runtimes for t in args.threads}
        bandwidth: dict[int, list[float]] = {t: [] for t in args.threads}
        placement: dict[int, list[list[float | None]]] = {t: [] for t in args.threads}
        load_before = os.getloadavg()
        steps = args.rounds * len(args.threads) * len(runtimes)
        with tqdm(total=steps, desc="interleaved rounds", unit="run") as bar:
            for _ in range(args.rounds):
                for t in args.threads:
                    where = [K.core_round_trip_ns()]
                    before = probe(t)
                    for name, rt in runtimes.items():
                        if "peer" in rt and before is not None:  # spectra's rows are done: their round's read rate
                            where.append(K.core_round_trip_ns())
                            bandwidth[t].append(max(before, probe(t)))
                            where.append(K.core_round_trip_ns())
                            placement[t].append(where)
                            before = None
                        s = samples[(name, t)]
                        if "peer" in rt:
                            pp, tg = rt["peer"].run(rt["cfg"], t, args.prompt_len, args.gen_len, args.reps)
                            s["pp"] += pp
                            s["tg"] += tg
                        else:
                            for _ in range(args.reps):
                                pp, tg = time_spectra(rt["model"], prompt, decode_ids, t)
                                s["pp"].append(pp)
                                s["tg"].append(tg)
                        bar.set_postfix_str(f"{t}T {name[:40]}")
                        bar.update()
                    if before is not None:  # no peers
                        where.append(K.core_round_trip_ns())
                        bandwidth[t].append(max(before, probe(t)))
                        placement[t].append(where + [K.core_round_trip_ns()])
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for (name, t), s in samples.items():
        bw = statistics.median(bandwidth[t])
        tg = statistics.median(s["tg"])
        rows.append(
            {
                "runtime": name,
                "threads": t,
                "decode_tok_s": tg,
                "prompt_tok_s": statistics.median(s["pp"]),
                "decode_samples": s["tg"],
                "prompt_samples": s["pp"],
                "weight_bytes_per_token": runtimes[name]["bytes"],
                "read_bytes_s": bw,
                "bound_fraction": tg * runtimes[name]["bytes"] / bw,
                "spectra": "model" in runtimes[name],
            }
        )
    return {
        "size": args.size,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "rounds": args.rounds,
        "reps": args.reps,
        "threads": args.threads,
        "model": facts,
        "bandwidth_samples": {str(t): v for t, v in bandwidth.items()},
        "core_round_trip_ns": {str(t): v for t, v in placement.items()},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }


def per_round(samples: list[float], rounds: int, reps: int) -> list[float]:
    """The median of each round's samples (a round holds `reps` consecutive samples)."""
    return [statistics.median(samples[i * reps : (i + 1) * reps]) for i in range(rounds)]


def paired_ratio(result: dict, ours: str, peer: str, key: str, threads: int) -> str:
    """spectra over `peer` within each interleaved round (both ran minutes apart at most), as median [min-max]: the
    spread a shared machine's drift leaves on the ratio of the medians."""
    by = {(r["runtime"], r["threads"]): r for r in result["rows"]}
    field = "decode_samples" if key == "decode_tok_s" else "prompt_samples"
    a = per_round(by[(ours, threads)][field], result["rounds"], result["reps"])
    b = per_round(by[(peer, threads)][field], result["rounds"], result["reps"])
    ratios = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"


# A core-to-core round trip below this many ns: the two cores share a last-level cache (the 2-core Zen 5 VM reads
# about 90 ns then, about 400 ns when its vCPUs sit on two CCDs).
PLACEMENT_NS = 250.0


def round_fractions(result: dict, ours: str, threads: int) -> list[float]:
    """spectra's decode as a fraction of the bound (%), round by round against that round's read rate."""
    r = next(r for r in result["rows"] if r["runtime"] == ours and r["threads"] == threads)
    per = per_round(r["decode_samples"], result["rounds"], result["reps"])
    bws = result["bandwidth_samples"][str(threads)]
    return [100 * tg * r["weight_bytes_per_token"] / bw for tg, bw in zip(per, bws)]


def placement_summary(result: dict, ours: str) -> str:
    """spectra's fraction of the bound over the rounds whose three round trips all fell on one side of PLACEMENT_NS
    (the placement held from the first read probe to the second), per thread count and side; "" without records."""
    parts = []
    for t in result["threads"]:
        where = result.get("core_round_trip_ns", {}).get(str(t), [])
        for label, below in (("one last-level cache", True), ("apart", False)):
            fr = [f for f, w in zip(round_fractions(result, ours, t), where)
                  if w and all(v is not None and (v < PLACEMENT_NS) == below for v in w)]
            if fr:
                rounds = ", ".join(f"{x:.0f}" for x in fr)
                parts.append(f"{t}T {label}: {statistics.median(fr):.0f} % (rounds {rounds})")
    if not parts:
        return ""
    return (f"spectra's fraction of the bound over the rounds whose placement held (all three round trips on one side "
            f"of {PLACEMENT_NS:.0f} ns), median: " + "; ".join(parts) + ".")


def round_trips(values: list[float | None]) -> str:
    return "/".join("–" if v is None else f"{v:.0f}" for v in values)


def markdown(result: dict) -> str:
    """The README table: tok/s per runtime and thread count, ratios to the best peer, fraction of the DRAM bound."""
    threads, P, G = result["threads"], result["prompt_len"], result["gen_len"]
    by = {(r["runtime"], r["threads"]): r for r in result["rows"]}
    names = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    ours = names[0]
    peers = [n for n in names if not by[(n, threads[0])].get("spectra", n == ours)]
    head = ["runtime"]
    for t in threads:
        head += [f"decode {t}T", f"% of bound {t}T", f"prompt {P} {t}T"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for t in threads:
        for key in ("decode_tok_s", "prompt_tok_s"):
            if peers:
                best[(key, t)] = max(peers, key=lambda n, k=key, tt=t: by[(n, tt)][k])
    for name in names:
        cells = [name]
        for t in threads:
            r = by[(name, t)]
            bold = [name == best.get((k, t)) for k in ("decode_tok_s", "prompt_tok_s")]
            cells += [
                f"**{r['decode_tok_s']:.1f}**" if bold[0] else f"{r['decode_tok_s']:.1f}",
                f"{100 * r['bound_fraction']:.0f} %",
                f"**{r['prompt_tok_s']:.0f}**" if bold[1] else f"{r['prompt_tok_s']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["\n".join(lines), ""]
    if peers:
        cols = " | ".join(f"{k} {t}T" for t in threads for k in ("decode", "prompt"))
        rat = [f"| spectra / best peer | {cols} |", "|---|" + "---|" * (2 * len(threads))]
        cells = []
        for t in threads:
            for key in ("decode_tok_s", "prompt_tok_s"):
                b = best[(key, t)]
                cells.append(f"{by[(ours, t)][key] / by[(b, t)][key]:.2f}× ({b})")
        rat.append("| ratio (best peer) | " + " | ".join(cells) + " |")
        rat.append(f"| paired per round (median [range] of {result['rounds']}) | "
                   + " | ".join(paired_ratio(result, ours, best[(key, t)], key, t) for t in threads
                                for key in ("decode_tok_s", "prompt_tok_s")) + " |")  # fmt: skip
        out += ["\n".join(rat), ""]
        fractions = []
        for t in threads:
            where = result.get("core_round_trip_ns", {}).get(str(t), [])
            cells = [f"{f:.0f} %" + (f" ({round_trips(where[i])})" if i < len(where) else "")
                     for i, f in enumerate(round_fractions(result, ours, t))]
            fractions.append(f"{t}T " + ", ".join(cells))
        out += ["spectra's decode as a fraction of the bound, round by round (that round's read rate; in brackets the "
                "core-to-core round trip in ns before the round's first read probe, after spectra's rows and after the "
                "second probe: on a 2-core VM it says whether the cores share a last-level cache, and the 2-thread "
                "read rate moves with it): " + "; ".join(fractions) + ".", ""]
        held = placement_summary(result, ours)
        if held:
            out += [held, ""]
    if OURS_TQ1 in names:
        out += ["spectra TQ1_0 / TQ2_0, paired per round (median [range]): decode "
                + ", ".join(f"{t}T {paired_ratio(result, OURS_TQ1, ours, 'decode_tok_s', t)}" for t in threads)
                + "; prompt " + ", ".join(f"{t}T {paired_ratio(result, OURS_TQ1, ours, 'prompt_tok_s', t)}"
                                          for t in threads) + ".", ""]
    bw = ", ".join(
        f"{t}T {statistics.median(v) / 1e9:.1f} GB/s (samples {', '.join(f'{x / 1e9:.1f}' for x in v)})"
        for t, v in ((int(k), v) for k, v in result["bandwidth_samples"].items())
    )
    mb = {name: by[(name, threads[0])]["weight_bytes_per_token"] / 2**20 for name in names}
    m = result["model"]
    lossy = " (straddling blocks rounded to their absmax, as `spectra pack --lossy` and llama-quantize do)"
    out.append(
        f"TriLM {result['size']} shape, random weights, {m['scale_shards']} scale shards per matrix"
        f"{lossy if m['lossy'] else ''}; "
        f"prompt {P}, decode {G} tokens; tok/s are medians of {result['rounds']} interleaved rounds × "
        f"{result['reps']} samples. DRAM read rate measured in the same run: {bw}. Bound = weight bytes per decoded "
        f"token / read rate; weight MiB per token: "
        + ", ".join(f"{'spectra' if n == ours else n.split(' (')[0]} {v:.0f}" for n, v in mb.items() if n != OURS_TQ1)
        + (f", spectra TQ1_0 {mb[OURS_TQ1]:.0f}" if OURS_TQ1 in mb else "")
        + f". Load average before {result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}."
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", action="append", default=[], metavar="PATH",
                    help="a llama.cpp-family llama-bench binary (repeatable); llama-quantize must sit next to it")
    ap.add_argument("--size", default="trilm-1.1b")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=1, help="samples per runtime per round (llama-bench -r)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spectra-tq1", action="store_true",
                    help="also time the same model packed as TQ1_0 (a second spectra row, and TQ1_0 / TQ2_0 paired)")
    ap.add_argument("--workdir", default=None, help="where the temporary models go (default: the system temp dir)")
    ap.add_argument("--json", default=None, help="also write the full result to this file")
    args = ap.parse_args()
    if args.json:  # a bad path is found now, not after the measuring
        try:
            check_output_file(args.json, "--json")
        except ValueError as e:
            ap.error(str(e))
    if args.rounds < 1 or args.reps < 1 or not args.threads or min(args.threads) < 1:
        raise SystemExit("--rounds, --reps and --threads must be positive")
    if args.prompt_len < 1 or args.gen_len < 1:
        ap.error(f"--prompt-len and --gen-len must be positive, got {args.prompt_len} and {args.gen_len}")
    from spectra.config import from_name

    try:
        from_name(args.size)
    except ValueError as e:
        ap.error(f"--size: {e}")
    result = run(args)
    print(f"cpus={os.cpu_count()}")
    print(markdown(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
