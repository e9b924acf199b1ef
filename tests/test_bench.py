"""`bench`: the variants it builds compute the same function as the source model; result structure; the CLI."""

import importlib
import json

import pytest
import torch

from spectra.config import ModelConfig, from_name
from spectra.inference.bench import bench, dense_copy, synthetic_trilm
from spectra.interop.weights import ternary_weight
from spectra.model import build_model


def cfg(**kw) -> ModelConfig:
    c = dict(dim=256, n_layers=2, n_heads=4, glu_dim=512, vocab_size=256, max_seq_len=64, family="trilm")
    c.update(kw)
    return ModelConfig(**c)


@pytest.mark.parametrize("shards", [1, 2])
def test_dense_copy_computes_the_same_logits(shards):
    model = build_model(cfg(num_scale_shards=shards), seed=3).eval()
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(idx)
        dense = dense_copy(model, torch.float32)
        assert all(type(m) is torch.nn.Linear for m in (dense.layers[0].mlp.up_proj, dense.layers[1].self_attn.o_proj))
        torch.testing.assert_close(dense(idx), ref, rtol=1e-5, atol=1e-5)
        bf = dense_copy(model, torch.bfloat16)
        assert bf.lm_head.weight.dtype == torch.bfloat16
        torch.testing.assert_close(bf(idx).float(), ref, rtol=0.1, atol=0.1)


def test_synthetic_model_is_ternary_with_the_named_shape():
    model = synthetic_trilm("trilm-tiny")
    ref = from_name("trilm-tiny")
    c = model.config
    assert (c.dim, c.glu_dim, c.n_layers, c.n_heads, c.vocab_size) == (
        ref.dim,
        ref.glu_dim,
        ref.n_layers,
        ref.n_heads,
        ref.vocab_size,
    )
    tw = ternary_weight(model.layers[0].mlp.down_proj)
    assert set(tw.codes.unique().tolist()) == {-1, 0, 1}
    assert tw.scales.unique().numel() == 1  # one scale per matrix: packs losslessly


def test_bench_floatlm_result_structure():
    model = build_model(cfg(family="floatlm"), seed=0)
    r = bench(
        model,
        prompt_len=8,
        gen_len=4,
        threads=[1],
        dtypes=["packed", "bf16", "fp32", "model"],
        repeats=2,
        llama_cpp=False,
    )
    assert r["skipped"]["packed"] == "not a ternary model" and r["kv_cache"] == "auto"
    got = {(x["variant"], x["threads"]) for x in r["results"]}
    assert got == {("bf16", 1), ("fp32", 1), ("model", 1)}
    for x in r["results"]:
        assert len(x["decode_runs"]) == 2 and x["decode_tokens_per_s"] > 0 and x["prompt_tokens_per_s"] > 0
        assert x["ms_per_token"] == pytest.approx(1000 / x["decode_tokens_per_s"])
    fp32 = next(x for x in r["results"] if x["variant"] == "fp32")
    assert fp32["weights_mb"] == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 2**20, rel=0.01)
    assert set(r["ratios"]["threads=1"]) == {
        "decode model/bf16",
        "prompt model/bf16",
        "decode model/fp32",
        "prompt model/fp32",
    }


def test_bench_bad_input():
    model = build_model(cfg(family="floatlm"), seed=0)
    with pytest.raises(ValueError, match="variant"):
        bench(model, dtypes=["int4"])
    with pytest.raises(ValueError, match="max_seq_len"):
        bench(model, prompt_len=60, gen_len=10, llama_cpp=False)
    with pytest.raises(ValueError, match="unknown model size"):
        bench("trilm-7b", llama_cpp=False)
    with pytest.raises(ValueError, match="kv_cache must be one of auto, f32, f16, q8"):
        bench(model, kv_cache="q4", llama_cpp=False)


def test_cli_bench_json(capsys):
    from spectra.__main__ import main

    assert (
        main(
            [
                "bench",
                "floatlm-tiny",
                "--prompt-len",
                "4",
                "--gen-len",
                "2",
                "--repeats",
                "1",
                "--variants",
                "bf16",
                "--no-llama-cpp",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["results"][0]["variant"] == "bf16" and r["config"]["dim"] == 256


def test_bench_trilm_packed_variant_and_int8_head():
    pytest.importorskip("spectra.packed.linear")
    from spectra.inference.bench import packed_copy, with_int8_head

    model = build_model(cfg(), seed=4).eval()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(idx)
        packed = packed_copy(model, "tq2")
        assert type(model.layers[0].mlp.up_proj).__name__ == "TernaryLinear"  # the source is left alone
        fast = with_int8_head(packed)
        assert type(packed.lm_head) is torch.nn.Linear and fast.layers is packed.layers
        rel = ((fast(idx) - ref).norm() / ref.norm()).item()
        assert rel < 0.05  # int8 activations in the blocks and the head, ~1-2 % each
        # dense copies of the packed model hold W = fp16(γ)·Ŵ: the latent weights up to fp16 rounding of γ
        dense = dense_copy(packed, torch.float32)
        torch.testing.assert_close(dense(idx), ref, rtol=2e-3, atol=2e-3)
    r = bench(model, prompt_len=8, gen_len=3, threads=[1, 1], dtypes=["packed", "fp32"], repeats=1, llama_cpp=False)
    assert {x["variant"] for x in r["results"]} == {"packed", "fp32"}
    # a thread count given twice used to be measured twice per round: "median of 1" over 2 runs (a review, 2026-12-07)
    assert len(r["results"]) == 2 and all(len(x["prompt_runs"]) == 1 for x in r["results"])
    assert set(r["ratios"]["threads=1"]) == {"decode packed/fp32", "prompt packed/fp32"}
    packed_mb = next(x["weights_mb"] for x in r["results"] if x["variant"] == "packed")
    fp32_mb = next(x["weights_mb"] for x in r["results"] if x["variant"] == "fp32")
    assert packed_mb < fp32_mb


def test_bench_against_llama_cpp():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("spectra.packed.linear")
    model = build_model(cfg(), seed=0)
    r = bench(model, prompt_len=8, gen_len=4, threads=[1], dtypes=["packed"], repeats=1, llama_cpp=True)
    assert {x["variant"] for x in r["results"]} == {"packed", "llama.cpp"}
    assert {"decode packed/llama.cpp", "prompt packed/llama.cpp"} <= set(r["ratios"]["threads=1"])
    gguf_mb = next(x["weights_mb"] for x in r["results"] if x["variant"] == "llama.cpp")
    assert 0.1 < gguf_mb < 1.0  # TQ2_0 blocks + Q8_0 embedding and output of this 2-layer model


@pytest.mark.parametrize("from_empty", [False, True])
def test_time_torch_decodes_at_the_positions_asked(monkeypatch, from_empty):
    """llama-bench's `tg` decodes from an empty context (benchmarks/peers.py): with `decode_from_empty` the G steps
    run at positions 0 .. G-1 of a cache of the asked dtype, else after the prompt at P .. P+G-1."""
    B = importlib.import_module("spectra.inference.bench")  # the module (the package exports a function `bench`)
    model = build_model(cfg(family="floatlm"), seed=0).eval()
    seen = []

    def step(ids, cache):
        seen.append((cache.pos, cache.k.dtype))
        return model(ids, cache=cache)

    monkeypatch.setattr(B, "decoder_for", lambda m: step)
    prompt, decode_ids = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 4))
    B.time_torch(model, prompt, decode_ids, decode_from_empty=from_empty, kv_dtype=torch.float16)
    start = 0 if from_empty else 7
    assert seen == [(start + i, torch.float16) for i in range(4)]


def test_peers_pairs_each_round_and_reports_the_spread():
    """benchmarks/peers.py: the ratio to a peer is also taken within each interleaved round (median of that round's
    samples on each side) and printed as median [min-max], with spectra's fraction of the bound round by round."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers", script)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    assert peers.per_round([1.0, 3.0, 10.0, 20.0], 2, 2) == [2.0, 15.0]
    ours, peer = "spectra (packed checkpoint, spectra.load)", "ik_llama.cpp IQ2_BN (-fa 0 -rtr 1)"
    rows = [
        {"runtime": ours, "threads": 1, "decode_tok_s": 60.0, "prompt_tok_s": 150.0,
         "decode_samples": [60.0, 80.0, 40.0], "prompt_samples": [150.0, 150.0, 160.0],
         "weight_bytes_per_token": 10**8, "read_bytes_s": 1e10,
         "bound_fraction": 0.6},
        {"runtime": peer, "threads": 1, "decode_tok_s": 40.0, "prompt_tok_s": 100.0,
         "decode_samples": [40.0, 40.0, 50.0], "prompt_samples": [100.0, 120.0, 100.0],
         "weight_bytes_per_token": 10**8, "read_bytes_s": 1e10,
         "bound_fraction": 0.4},
    ]  # fmt: skip
    result = {"threads": [1], "prompt_len": 128, "gen_len": 64, "rounds": 3, "reps": 1, "rows": rows,
              "bandwidth_samples": {"1": [1e10, 1e10, 2e10]}, "loadavg_before": (0.5,), "loadavg_after": (0.6,),
              "size": "trilm-1.1b", "model": {"scale_shards": 2, "lossy": True}}  # fmt: skip
    assert peers.paired_ratio(result, ours, peer, "decode_tok_s", 1) == "1.50× [0.80–2.00]"  # 1.5, 2.0, 0.8
    text = peers.markdown(result)
    assert "| paired per round (median [range] of 3) | 1.50× [0.80–2.00] | 1.50× [1.25–1.60] |" in text
    assert "1T 60 %, 80 %, 20 %" in text  # 60 tok/s x 1e8 B / 1e10 B/s, then 80 %, then 40 x 1e8 / 2e10
    # each round's core-to-core round trips (before, between and after its read probes) beside its fraction
    result["core_round_trip_ns"] = {"1": [[90.2, 88.0, 91.0], [412.0, None, 405.5], [89.0, 90.0, 300.0]]}
    text = peers.markdown(result)
    assert "1T 60 % (90/88/91), 80 % (412/–/406), 20 % (89/90/300)" in text
    # only round 1 held its placement (round 2 has a missing trip, round 3 crossed 250 ns)
    assert "held (all three round trips on one side of 250 ns), median: 1T one last-level cache: 60 % (rounds 60)." \
        in text
    result["core_round_trip_ns"]["1"][1][1] = 399.0
    assert "1T one last-level cache: 60 % (rounds 60); 1T apart: 80 % (rounds 80)." in peers.markdown(result)
    assert "TQ1_0 / TQ2_0" not in text

    # --spectra-tq1: a second spectra row, never taken for the best peer, and TQ1_0 over TQ2_0 paired per round
    result["rows"].append({"runtime": peers.OURS_TQ1, "threads": 1, "decode_tok_s": 70.0, "prompt_tok_s": 150.0,
                           "decode_samples": [66.0, 76.0, 44.0], "prompt_samples": [120.0, 150.0, 160.0],
                           "weight_bytes_per_token": 8 * 10**7, "read_bytes_s": 1e10, "bound_fraction": 0.56,
                           "spectra": True})  # fmt: skip
    text = peers.markdown(result)
    assert "| ratio (best peer) | 1.50× (ik_llama.cpp IQ2_BN (-fa 0 -rtr 1)) |" in text
    assert "spectra TQ1_0 / TQ2_0, paired per round (median [range]): decode 1T 1.10× [0.95–1.10]; prompt 1T 1.00× " \
           "[0.80–1.00]." in text  # decode 66/60, 76/80, 44/40; prompt 120/150, 150/150, 160/160


def _script(name: str):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_ratios_are_also_paired_per_round():
    """`spectra bench` printed a ratio of medians with no interval; every round times every variant, so the ratio
    within each round gives one: [median, min, max]."""
    from spectra.inference.bench import ratios

    results = [{"variant": "packed", "threads": 1, "decode_tokens_per_s": 90.0, "prompt_tokens_per_s": 300.0,
                "decode_runs": [80.0, 90.0, 120.0], "prompt_runs": [300.0, 300.0, 280.0]},
               {"variant": "bf16", "threads": 1, "decode_tokens_per_s": 10.0, "prompt_tokens_per_s": 100.0,
                "decode_runs": [10.0, 9.0, 20.0], "prompt_runs": [100.0, 150.0, 70.0]}]
    assert ratios(results)["threads=1"]["decode packed/bf16"] == 9.0
    assert ratios(results, paired=True)["threads=1"]["decode packed/bf16"] == [8.0, 6.0, 10.0]  # 8, 10, 6
    assert ratios(results, paired=True)["threads=1"]["prompt packed/bf16"] == [3.0, 2.0, 4.0]


def test_benchmark_scripts_import_beside_transformers_and_check_their_arguments(tmp_path):
    """benchmarks/kernels.py hid the `kernels` package transformers imports (eval.py, forward.py and train.py failed at
    import); bad arguments and --json paths are one line before any measuring; two builds of one peer family keep
    their own rows."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    assert not (root / "kernels.py").exists()
    (tmp_path / "file").write_text("")
    for script, args, said in (("serve", ["--threads", "0"], "--threads must be positive"),
                               ("serve", ["--json", str(tmp_path / "file" / "x.json")], "is a file, not a folder"),
                               ("batch_decode", ["--repeats", "0"], "--repeats must be positive"),
                               ("gemv", ["--size", "100"], "a multiple of 256"),
                               ("peers", ["--gen-len", "0"], "--gen-len must be positive"),
                               ("decode", ["--json", str(tmp_path)], "is a folder")):
        out = subprocess.run([sys.executable, str(root / f"{script}.py"), *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, (script, out.stderr)


def test_serve_benchmark_leaves_rows_that_lost_requests_out_of_the_ratios():
    serve = _script("serve")
    row = dict(server="spectra", repeat=0, clients=4, tok_s=100.0, sequential_tok_s=50.0, transport_errors=0,
               status_other=0, status_5xx=0)
    peer = dict(row, server="llama-server", tok_s=50.0)
    assert "vs llama-server 2.00x" in serve.summarize([row, peer])["lines"][1]
    lines = serve.summarize([row, dict(peer, transport_errors=2)])["lines"]
    assert "vs llama-server" not in lines[1] and "1 of 1 repeats lost requests" in lines[2]


def test_a_packed_checkpoint_is_measured_as_stored(tmp_path):
    """`spectra bench` on a packed checkpoint ran it as stored (TQ2_0, int8 head) while recording --format tq1 and
    --packed-head float: another model under the asked labels."""
    from spectra.__main__ import main

    assert main(["pack", "trilm-1m", str(tmp_path / "p"), "--lossy"]) == 0
    kw = dict(prompt_len=4, gen_len=2, repeats=1, dtypes=("packed",), llama_cpp=False)
    with pytest.raises(ValueError, match="the model is packed as tq2; measuring it as tq1 needs it packed so"):
        bench(str(tmp_path / "p"), packed_format="tq1", **kw)
    with pytest.raises(ValueError, match="lm_head is stored in int8; a float head needs"):
        bench(str(tmp_path / "p"), packed_head="float", **kw)
    r = bench(str(tmp_path / "p"), **kw)
    assert (r["packed_format"], r["packed_head"]) == ("tq2", "int8")
