import json
import math
import random

import numpy as np
import pytest

from spectra.suite import fit_power_law, load_spec, pareto_front, plan, run_suite
from spectra.suite.checks import findings, study_checks
from spectra.suite.records import read_records
from spectra.suite.report import build_report, fits, seed_summary
from spectra.suite.spec import check_writable

NAMES = ["Anna", "Brutus", "Celia", "Duncan", "Emilia", "Falstaff", "Gertrude", "Horatio"]
VERBS = ["loves", "sees", "follows", "praises", "fears", "greets", "answers", "remembers"]
THINGS = ["the king", "the crown", "a letter", "the garden", "the sea", "an old friend", "the night", "the castle"]


def write_corpus(root, n_docs=60, seed=0):
    """A small deterministic corpus in train/ and validation/ files, with repeated names for the cloze task."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_docs), ("validation", n_docs // 3)):
        docs = []
        for _ in range(n):
            hero = rng.choice(NAMES)
            sentences = [
                f"{hero} {rng.choice(VERBS)} {rng.choice(THINGS)} and {rng.choice(NAMES)}."
                for _ in range(rng.randint(12, 20))
            ]
            sentences.append(f"At last {rng.choice(THINGS)} {rng.choice(VERBS)} {hero}.")
            docs.append(" ".join(sentences))
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def test_fit_recovers_a_known_law():
    N = [1e6, 3e6, 1e7, 3e7, 1e8]
    L = [185 * n**-0.26 + 1.76 for n in N]
    f = fit_power_law(N, L)
    assert f["A"] == pytest.approx(185, rel=1e-3) and f["alpha"] == pytest.approx(0.26, rel=1e-4)
    assert f["eps"] == pytest.approx(1.76, abs=1e-4) and f["rmse"] < 1e-6
    pure = fit_power_law(N, [18.13 * n**-0.093 for n in N], offset=False)
    assert pure["A"] == pytest.approx(18.13, rel=1e-4) and pure["alpha"] == pytest.approx(0.093, rel=1e-4)
    assert fit_power_law(N[:3], L[:3])["stderr"] is None  # as many parameters as points
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law(N[:2], L[:2])
    with pytest.raises(ValueError, match="no decreasing power law"):
        fit_power_law(N, L[::-1])


def test_pareto_front():
    pts = [(1, 5.0, "a"), (2, 4.0, "b"), (3, 4.5, "c"), (4, 3.0, "d"), (2, 4.2, "e")]
    assert pareto_front(pts) == ["a", "b", "d"]


def _row(kind, size, params, loss, bits=None, family=None, seed=0, fmt=None):
    family = family or ("floatlm" if kind in ("floatlm", "quantlm") else "trilm")
    series = {"floatlm": "FloatLM", "trilm": "TriLM", "packed": f"TriLM {fmt}"}.get(kind, f"QuantLM {bits}-bit")
    name = f"{family}-{size}" + (f"-{bits}bit" if bits else "") + (f"-{fmt}" if fmt else "") + f"-s{seed}"
    return dict(kind=kind, size=size, params=params, val_loss=loss, bits=bits, family=family, seed=seed,
                series=series, format=fmt, name=name, size_bits=params * 16)


def _by_check(checks):
    return {c["check"]: c for c in checks}


def test_size_checks_hold_only_when_the_seed_interval_excludes_zero():
    """Two seeds per model, seeds as blocks over the 6 latent groups: residual variance on (6 − 1)(2 − 1) = 5 df."""
    fl = {"a": (5.00, 5.02), "b": (4.70, 4.72), "c": (4.50, 4.52)}
    tl = {"a": (5.30, 5.32), "b": (4.90, 4.92), "c": (4.80, 4.78)}
    params = {"a": 10, "b": 20, "c": 40}
    rows = [_row(k, s, params[s], v, seed=i) for k, d in (("floatlm", fl), ("trilm", tl))
            for s, vals in d.items() for i, v in enumerate(vals)]
    checks = _by_check(study_checks(rows))
    # restated: with 2 seeds the residuals are ±(d_g − mean d)/2 for each group's seed difference d_g (five of
    # +0.02, one of −0.02), so SS = Σ (d_g − mean d)² / 2 on 5 df
    d = np.array([0.02] * 5 + [-0.02])
    s = math.sqrt(((d - d.mean()) ** 2).sum() / 2 / 5)
    t5 = 2.5705818366147395  # scipy.stats.t.ppf(0.975, 5)
    c = checks["FloatLM improves with size"]
    assert c["verdict"] == "holds" and c["test"] == "t with seeds as blocks, residual variance over 5 df"
    assert c["estimate"] == pytest.approx(0.20) and c["hi"] - c["estimate"] == pytest.approx(t5 * s, rel=1e-9)
    gap = checks["TriLM − FloatLM gap at c"]
    assert gap["verdict"] == "holds" and gap["estimate"] == pytest.approx(0.28)
    shrink = checks["TriLM − FloatLM gap shrinks with size"]  # 0.30 at a, 0.28 at c: 0.02 ± 0.042, unresolved
    assert shrink["verdict"] == "not resolved" and shrink["estimate"] == pytest.approx(0.02)
    assert shrink["hi"] - shrink["estimate"] == pytest.approx(t5 * s * math.sqrt(4 / 2), rel=1e-9)
    # a model that lacks one of the study's seeds: its comparisons fall back to the pooled seed variance (5 df)
    gappy = [r for r in rows if not (r["kind"] == "trilm" and r["size"] == "c" and r["seed"] == 1)]
    c = _by_check(study_checks(gappy))["TriLM − FloatLM gap at c"]
    assert c["test"] == "t with seed variance pooled over 5 df"
    # TriLM ahead of FloatLM, and further ahead with size: the gap "falls" but no deficit closes
    ahead = [r | {"val_loss": r["val_loss"] - (0.4 if r["kind"] == "trilm" else 0)
                  - (0.3 if r["kind"] == "trilm" and r["size"] == "c" else 0)} for r in rows]
    shrink = _by_check(study_checks(ahead))["TriLM − FloatLM gap shrinks with size"]
    assert shrink["verdict"] == "does not hold" and shrink["estimate"] > 0 and "premise" in shrink["detail"]
    # reversed sizes: the interval excludes zero the wrong way
    worse = [r | {"val_loss": r["val_loss"] + (0.5 if r["size"] == "c" else 0)} for r in rows]
    assert _by_check(study_checks(worse))["TriLM improves with size"]["verdict"] == "does not hold"
    # one seed: no seed variance to pool, nothing between separately trained models is resolved
    one = [r for r in rows if r["seed"] == 0]
    assert {c["verdict"] for c in study_checks(one)} == {"not resolved"}


def test_paired_checks_on_window_losses():
    """QuantLMs and packed models are compared window by window with their own base (seeds averaged)."""
    rng = np.random.default_rng(0)
    n, T = 64, 256
    rows, seqs = [], {}

    def add(row, nll):
        rows.append(row)
        seqs[row["name"]] = (list(nll), [T] * n)

    for seed in (0, 1):
        base = rng.normal(4.0, 0.3, n) * T
        add(_row("floatlm", "a", 10, base.sum() / (n * T), seed=seed), base)
        for bits, cost in ((3, 0.05), (4, 0.01), (8, 0.0)):
            nll = base + rng.normal(cost, 0.01, n) * T
            add(_row("quantlm", "a", 10, nll.sum() / (n * T), bits=bits, seed=seed), nll)
        latent = rng.normal(4.2, 0.3, n) * T
        add(_row("trilm", "a", 10, latent.sum() / (n * T), seed=seed), latent)
        add(_row("packed", "a", 10, 0, seed=seed, fmt="tq2"), latent + rng.normal(0, 1e-4, n) * T)
        add(_row("packed", "a", 10, 0, seed=seed, fmt="tq1"), latent + 0.2 * T)  # a broken packer
    checks = _by_check(study_checks(rows, seqs))
    q3 = checks["QuantLM 3-bit worse than FloatLM at a"]
    base = (np.asarray(seqs["floatlm-a-s0"][0]) + np.asarray(seqs["floatlm-a-s1"][0])) / 2
    q3_nll = (np.asarray(seqs["floatlm-a-3bit-s0"][0]) + np.asarray(seqs["floatlm-a-3bit-s1"][0])) / 2
    assert q3["verdict"] == "holds" and q3["estimate"] == pytest.approx(((q3_nll - base) / T).mean())
    assert "paired t over 64 held-out sequences (NLL averaged over 2 seeds)" == q3["test"]
    assert checks["QuantLM 3-bit worse than 4-bit at a"]["verdict"] == "holds"
    assert checks["QuantLM 8-bit ≈ FloatLM at a"]["verdict"] == "holds"
    assert checks["packed TQ2 ≈ latent trilm at a"]["verdict"] == "holds"
    assert checks["packed TQ1 ≈ latent trilm at a"]["verdict"] == "does not hold"
    # an 8-bit QuantLM costlier than the 3-bit one is not "≈ float"
    costly = {k: (list(np.asarray(v[0]) + (0.1 * T if "8bit" in k else 0)), v[1]) for k, v in seqs.items()}
    assert _by_check(study_checks(rows, costly))["QuantLM 8-bit ≈ FloatLM at a"]["verdict"] == "does not hold"
    # 3-bit no worse than float: nothing to measure "≈" against
    free = {k: (seqs[k.replace("-3bit", "")][0], v[1]) if "3bit" in k else v for k, v in seqs.items()}
    checks = _by_check(study_checks(rows, free))
    assert checks["QuantLM 3-bit worse than FloatLM at a"]["verdict"] == "not resolved"
    assert checks["QuantLM 8-bit ≈ FloatLM at a"]["verdict"] == "not resolved"
    # without window losses the paired checks are left out, not guessed
    assert not any("QuantLM" in c["check"] for c in study_checks(rows))
    # findings combine their checks: one packed format failing makes "packed ≈ latent" fail as a whole
    found = {f["finding"]: f for f in findings(study_checks(rows, seqs))}
    assert found["QuantLM 3-bit is worse than its FloatLM at every size"]["verdict"] == "holds"
    assert found["QuantLM 8-bit ≈ its FloatLM at every size"]["verdict"] == "holds"
    packed = found["packed ≈ latent TriLM in loss, every format and size"]
    assert packed["verdict"] == "does not hold" and (packed["holds"], packed["does_not_hold"]) == (1, 1)
    assert "packed weights = latent TriLM's exactly, every format and size" not in found  # no read-back recorded
    # the pack step's read-back: exact for every seed holds; one mismatched weight in one seed does not
    exact = {"layers": 7, "weights": 1000, "mismatched_weights": 0, "exact": True}
    read = [r | {"weights_match": exact} if r["kind"] == "packed" else r for r in rows]
    c = _by_check(study_checks(read, seqs))
    assert c["packed TQ2 weights = latent trilm at a"]["verdict"] == "holds"
    assert "0 of 2000 ternary weights differ" in c["packed TQ2 weights = latent trilm at a"]["detail"]
    off = {**exact, "mismatched_weights": 1, "exact": False}
    read[-1] = read[-1] | {"weights_match": off}  # the last row: tq1, seed 1
    c = _by_check(study_checks(read, seqs))
    assert c["packed TQ1 weights = latent trilm at a"]["verdict"] == "does not hold"
    assert c["packed TQ2 weights = latent trilm at a"]["verdict"] == "holds"
    assert "each family improves with size" not in found  # one size: nothing to say
    # a partial study (FloatLM seed 0's and 3-bit seed 1's evals failed): only the seeds both sides have pair up. The
    # lengths matched, so the 3-bit model of seed 0 was compared with the FloatLM of seed 1, another training
    part = [r for r in rows if r["name"] not in ("floatlm-a-s0", "floatlm-a-3bit-s1")]
    c = _by_check(study_checks(part, seqs))
    assert "QuantLM 3-bit worse than FloatLM at a" not in c  # no seed has both
    assert c["QuantLM 8-bit ≈ FloatLM at a"]["test"] == "paired t over 64 held-out sequences"  # seed 1 alone
    part = [r for r in rows if r["name"] != "trilm-a-s0"]
    c = _by_check(study_checks(part, seqs))
    q = c["packed TQ2 ≈ latent trilm at a"]
    want = ((np.asarray(seqs["trilm-a-tq2-s1"][0]) - np.asarray(seqs["trilm-a-s1"][0])) / T).mean()
    assert q["estimate"] == pytest.approx(want) and q["test"] == "paired t over 64 held-out sequences"


def test_seed_summary_averages_over_seeds():
    rows = [_row("floatlm", "a", 10, 5.0, seed=0), _row("floatlm", "a", 10, 5.2, seed=1),
            _row("trilm", "a", 10, 5.5, seed=0), _row("trilm", "a", 10, 5.5, seed=1)]
    got = {g["series"]: g for g in seed_summary(rows)}
    assert got["FloatLM"]["mean"] == pytest.approx(5.1) and got["FloatLM"]["seeds"] == 2
    assert got["FloatLM"]["sd"] == pytest.approx(math.sqrt(0.02))
    # pooled over both groups: s² = (0.02 + 0) / 2, half-width t(2) · s / sqrt(2)
    assert got["TriLM"]["half_width"] == pytest.approx(4.302652729911275 * math.sqrt(0.01 / 2), rel=1e-9)


def test_fits_use_the_mean_over_seeds():
    """Three sizes on L = 2·N^-0.5 + 1 exactly once seeds are averaged (the middle size's seeds straddle the law)."""
    law = [(n, 2 * n**-0.5 + 1) for n in (1e4, 1e5, 1e6)]
    rows = [_row("floatlm", "a", law[0][0], law[0][1]),
            _row("floatlm", "b", law[1][0], law[1][1] - 0.001, seed=0),
            _row("floatlm", "b", law[1][0], law[1][1] + 0.001, seed=1),
            _row("floatlm", "c", law[2][0], law[2][1])]
    fit = fits(rows)["FloatLM"]["offset"]
    assert fit["alpha"] == pytest.approx(0.5, rel=1e-4) and fit["eps"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"sizes": ["tiny", "7b"]}, "unknown size '7b'"),
        ({"families": ["floatlm", "binarylm"]}, "unknown family 'binarylm'"),
        ({"tokens": 100}, "0 optimizer step.*at least 4 are needed to train"),
        ({"quant_bits": [3, 9]}, "quant_bits: 9"),
        ({"colour": "red"}, "unknown \\[suite\\] key"),
    ],
)
def test_bad_specs_fail_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_spec("micro", overrides=overrides)


def test_shapes_that_gptq_or_packing_cannot_take_fail_before_training(tmp_path):
    path = tmp_path / "narrow.toml"
    base = '[suite]\nname = "n"\nsizes = ["s1"]\ntokens = 1e5\n{extra}\n[sizes.s1]\ndim = 192\nn_layers = 1\n' \
           'n_heads = 3\nglu_dim = 512\n'
    path.write_text(base.format(extra='families = ["floatlm"]\nquant_bits = [3]'))
    with pytest.raises(ValueError, match=r"floatlm-s1: GPTQ at 3 bits uses groups of 128 input features, which do not "
                                         r"divide dim = 192, n_heads\*head_dim = 192"):
        load_spec(path=path)
    path.write_text(base.format(extra='families = ["floatlm"]\nquant_bits = [8]'))  # 8-bit: one group per row
    assert load_spec(path=path).quant_bits == [8]
    path.write_text(base.format(extra='families = ["trilm"]\npack_formats = ["tq2"]'))
    with pytest.raises(ValueError, match=r"trilm-s1: packing to tq2 needs rows in blocks of 256 weights, and dim = "
                                         r"192, glu_dim = 512, n_heads\*head_dim = 192|is not a multiple of 256"):
        load_spec(path=path)


def test_a_study_wide_quantizer_is_the_trilms(tmp_path):
    """[model] quantizer fields apply to every TriLM; the FloatLMs keep none (they were carried and ignored), and a
    FloatLM variant that sets one is refused before training."""
    path = tmp_path / "q.toml"
    base = ('[suite]\nname = "q"\nsizes = ["1m"]\ntokens = 1e5\nfamilies = ["floatlm", "trilm"{extra_family}]\n'
            'quant_bits = []\npack_formats = []\n[model]\nquantizer = "uniform"\nquantizer_options = {{ bits = 4 }}\n'
            '{extra}')
    path.write_text(base.format(extra_family="", extra=""))
    spec = load_spec(path=path)
    f, t = spec.model_config("1m", "floatlm"), spec.model_config("1m", "trilm")
    assert (f.quantizer, f.quantizer_options) == ("trilm", {})
    assert (t.quantizer, t.quantizer_options) == ("uniform", {"bits": 4})
    path.write_text(base.format(extra_family=', "fq"', extra='[variants.fq]\nfamily = "floatlm"\n'
                                                           'model = { quantizer = "bilm" }\n'))
    with pytest.raises(ValueError, match="fq-1m: ModelConfig.quantizer and quantizer_options apply to family 'trilm'"):
        load_spec(path=path)


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        check_writable(blocker / "out")


def test_presets_plan():
    tiny = load_spec("tiny")
    steps = plan(tiny)
    kinds = [s.kind for s in steps]
    assert kinds.count("train") == 12 and kinds.count("quantize") == 24 and kinds.count("pack") == 12
    assert kinds.count("eval") == 12 + 24 + 12
    # the tiny ladder: 3 sizes spanning >= 4x in non-embedding parameters, a small BPE trained on the data
    from spectra.accounting import size_report

    ne = [size_report(tiny.model_config(s, "floatlm"))["non_embedding_params"] for s in tiny.sizes]
    assert len(ne) >= 3 and ne == sorted(ne) and ne[-1] >= 4 * ne[0]
    assert tiny.tokenizer.startswith("bpe:") and 512 <= int(tiny.tokenizer[4:]) <= 2048
    for name in ("tiny", "small", "medium", "paper", "ablations-tiny", "ablations-small", "micro"):
        assert len(load_spec(name).seeds) >= 2, name  # every preset can put an interval on a seed difference
    paper = load_spec("paper")
    assert len(paper.sizes) == 9 and paper.tasks == ["ppl", "paper"]
    ablations = load_spec("ablations-tiny")
    assert {"bilm", "bitnet158", "twn"} <= set(ablations.families)
    claims = load_spec("ablations-small")  # the 2 x 2 and seed 002's claims, each a contrast at one rate
    assert len(claims.seeds) >= 3 and "lr drop × wd removal interaction" in claims.contrasts
    assert {claims.train_overrides(f, "s2").get("lr") for f in claims.families} == {4e-3}


@pytest.mark.slow
def test_micro_suite_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    spec = load_spec("micro", overrides={"data": str(corpus), "tokenizer": "bpe:512", "quant_bits": [3, 8]})
    out = tmp_path / "suite"
    result = run_suite(spec, out, progress=False)
    assert result["steps"]["failed"] == 0 and result["steps"]["blocked"] == 0, read_records(out)
    records = read_records(out)
    assert set(records) == {s.key for s in plan(spec)}
    for key, rec in records.items():
        assert rec["status"] == "done", key
        for path in rec["artifacts"].values():
            assert (out / path).exists(), (key, path)
    # the records agree with the files they name
    for key, rec in records.items():
        if rec["step"] == "eval":
            doc = json.loads((out / rec["artifacts"]["results"]).read_text())
            assert doc["perplexity"]["loss"] == pytest.approx(rec["metrics"]["val_loss"])
            assert doc["model"]["params"] == rec["model"]["params"]
        if rec["step"] == "bench":  # every kind is measured: float/bf16 latents, the QuantLM, the packed TriLM
            variants = {r["variant"] for r in rec["metrics"]["results"]}
            want = {"floatlm": {"fp32", "bf16"}, "trilm": {"fp32", "bf16"}, "quantlm": {"model"}, "packed": {"packed"}}
            assert variants == want[rec["model"]["kind"]], (key, variants)
            assert all(r["decode_tokens_per_s"] > 0 for r in rec["metrics"]["results"])
        if rec["step"] == "train":
            meta = json.loads((out / rec["artifacts"]["model"] / "spectra.json").read_text())
            assert meta["config"]["vocab_size"] == 512  # fitted to the tokenizer
            dim = meta["config"]["dim"]
            assert rec["model"]["params"] == 2 * 512 * dim + rec["model"]["non_embedding_params"]
    q3 = records["eval/quantize/floatlm-4m/3bit/s0"]["model"]
    assert q3["kind"] == "quantlm" and q3["bits"] == 3
    # a rerun does no work
    again = run_suite(spec, out, progress=False, report=False)
    assert again["steps"]["done"] == 0 and again["steps"]["skipped"] == len(records)
    # the report renders from the results alone
    report = build_report(out / "results.jsonl", tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert (tmp_path / "report" / "figures" / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "| floatlm-4m-8bit | quantlm |" in report["summary_table"]  # one row per model, over both seeds
    # every eval carries its window losses, and the paired checks use them
    for key, rec in records.items():
        if rec["step"] == "eval":
            assert len(rec["metrics"]["seq_nll"]) == len(rec["metrics"]["seq_tokens"]) > 1, key
    checks = {c["check"]: c for c in report["checks"]}
    assert {"FloatLM improves with size", "QuantLM 3-bit worse than FloatLM at 4m", "QuantLM 8-bit ≈ FloatLM at 4m",
            "packed TQ2 ≈ latent trilm at 4m", "TriLM − FloatLM gap shrinks with size"} <= set(checks)
    for name, c in checks.items():
        if name.startswith("packed TQ") and " weights = " in name:  # an equality read back, not an interval
            assert c["verdict"] == "holds" and c["estimate"] is None and "0 of " in c["detail"], c
            continue
        assert c["verdict"] in ("holds", "not resolved", "does not hold") and c["lo"] <= c["estimate"] <= c["hi"]
        assert c["test"]
    assert checks["packed TQ2 weights = latent trilm at 4m"]["verdict"] == "holds"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {"FloatLM", "TriLM"} <= set(summary["fits"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"Steps: {len(records)} done, of {len(records)} planned." in md and "Unfinished" not in md
    # a study cut short says so: the report of its records so far names the planned steps not done
    lines = (out / "results.jsonl").read_text().splitlines()
    part = tmp_path / "part"
    part.mkdir()
    (part / "results.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    (part / "spec.json").write_bytes((out / "spec.json").read_bytes())
    build_report(part / "results.jsonl", tmp_path / "part_report")
    md = (tmp_path / "part_report" / "report.md").read_text()
    assert f"of {len(records)} planned. **Unfinished**: 3 planned step(s) are not done" in md


@pytest.mark.slow
def test_steps_side_by_side_match_one_after_another(tmp_path):
    """jobs=2: the steps run as a dependency graph in two worker processes (the first two trainings build the
    study's cold shard cache at once), the benchmark alone in the main process; every record matches the serial
    run's up to the float rounding of another thread count."""
    corpus = write_corpus(tmp_path / "corpus")
    spec = load_spec("micro", overrides={"data": str(corpus), "tokenizer": "bpe:512", "sizes": ["1m"], "seeds": [0],
                                         "quant_bits": [3], "pack_formats": ["tq2"], "tasks": ["ppl"]})
    side = run_suite(spec, tmp_path / "side", progress=False, report=False, jobs=2)
    one = run_suite(spec, tmp_path / "one", progress=False, report=False, jobs=1)
    assert side["jobs"] == 2 and one["jobs"] == 1
    assert side["steps"] == one["steps"] == {"done": len(plan(spec)), "skipped": 0, "failed": 0, "blocked": 0}
    a, b = read_records(tmp_path / "side"), read_records(tmp_path / "one")
    assert set(a) == set(b) == {s.key for s in plan(spec)}
    for key in a:
        assert a[key]["artifacts"] == b[key]["artifacts"], key
        if a[key]["step"] in ("train", "eval"):
            assert a[key]["metrics"]["val_loss"] == pytest.approx(b[key]["metrics"]["val_loss"], abs=2e-3), key
        if a[key]["step"] == "bench":
            assert all(r["decode_tokens_per_s"] > 0 for r in a[key]["metrics"]["results"]), key
    # the evals scored the same windows with the models the workers trained and quantized
    q, f = a["eval/quantize/floatlm-1m/3bit/s0"]["metrics"], a["eval/train/floatlm-1m/s0"]["metrics"]
    assert len(q["seq_nll"]) == len(f["seq_nll"]) > 1 and q["seq_tokens"] == f["seq_tokens"]
    # a rerun with jobs does no work
    again = run_suite(spec, tmp_path / "side", progress=False, report=False, jobs=2)
    assert again["steps"]["done"] == 0 and again["steps"]["skipped"] == len(a)


@pytest.mark.slow
def test_a_failed_step_in_a_worker_blocks_only_what_needs_it(tmp_path):
    """jobs=2: GPTQ asks for more calibration sequences than the data holds, so the quantize step fails in its
    worker; its record says why, the eval that needs it is blocked, the rest of the study is done."""
    spec = load_spec("micro", overrides={"sizes": ["1m"], "seeds": [0], "families": ["floatlm"], "quant_bits": [3],
                                         "tasks": ["ppl"], "bench": False})
    spec.quantize["n_samples"] = 1_000_000
    result = run_suite(spec, tmp_path / "s", progress=False, report=False, jobs=2)
    assert result["steps"] == {"done": 2, "skipped": 0, "failed": 1, "blocked": 1}
    recs = read_records(tmp_path / "s")
    q = recs["quantize/floatlm-1m/3bit/s0"]
    assert q["status"] == "failed" and q["error"].startswith("ValueError"), q["error"]
    assert "1000000 requested" in q["error"], q["error"]
    assert recs["eval/quantize/floatlm-1m/3bit/s0"]["status"] == "blocked"
    blocked_by = "needs quantize/floatlm-1m/3bit/s0, which did not finish"
    assert recs["eval/quantize/floatlm-1m/3bit/s0"]["error"] == blocked_by
    assert recs["train/floatlm-1m/s0"]["status"] == recs["eval/train/floatlm-1m/s0"]["status"] == "done"


def test_jobs_resolve_to_processes_and_threads(monkeypatch):
    from spectra.suite import runner

    monkeypatch.setattr(runner, "_cpus", lambda: 8)
    assert runner.resolve_jobs("auto") == (4, 2)  # one per core, at most MAX_AUTO_JOBS
    assert runner.resolve_jobs("auto", "cuda") == (1, 8) and runner.resolve_jobs("auto", "cpu", world=2) == (1, 8)
    assert runner.resolve_jobs("2") == (2, 4) and runner.resolve_jobs(3) == (3, 2)
    assert runner.resolve_jobs(16) == (16, 1)
    monkeypatch.setattr(runner, "_cpus", lambda: 2)
    assert runner.resolve_jobs("auto") == (2, 1)
    for bad in ("0", "-1", "two", "2.5", 0):
        with pytest.raises(ValueError, match="jobs must be a positive whole number or 'auto'"):
            runner.resolve_jobs(bad)


def test_bad_jobs_is_one_line_before_any_work(tmp_path, capsys):
    from spectra.__main__ import main

    assert main(["suite", "--preset", "micro", "--out", str(tmp_path / "x"), "--jobs", "zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "spectra suite: error: jobs must be a positive whole number or 'auto', got 'zero'"
    assert not (tmp_path / "x").exists()


def write_text(path, n_lines, seed=0):
    """A plain-text file of `n_lines` lines of prose-like sentences (no split named: its last 5% is held out)."""
    rng = random.Random(seed)
    lines = [" ".join(f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}." for _ in range(4))
             for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_any_text_file_trains_its_own_tokenizer(tmp_path):
    """`--set data=FILE`: the study's BPE is trained once on the file and every model uses it."""
    from spectra.data import load_tokenizer, tokenizer_hash

    text = write_text(tmp_path / "book.txt", 3000)
    spec = load_spec("micro", overrides={"data": str(text), "tokenizer": "bpe:300", "sizes": ["1m"],
                                         "families": ["floatlm"], "quant_bits": [3], "pack_formats": [],
                                         "tasks": ["ppl"], "bench": False})
    out = tmp_path / "suite"
    result = run_suite(spec, out, progress=False, report=False)
    assert result["steps"]["failed"] == 0 and result["steps"]["blocked"] == 0, read_records(out)
    tok = out / "tokenizer" / "bpe300.json"
    assert load_tokenizer(tok).get_vocab_size() == 300
    assert result["data"]["measured"] and result["data"]["validation_tokens"] >= 32 * 64
    records = read_records(out)
    for seed in (0, 1):
        run = json.loads((out / records[f"train/floatlm-1m/s{seed}"]["artifacts"]["run"] / "run.json").read_text())
        assert run["tokenizer_sha256"] == tokenizer_hash(tok)
    # both seeds' FloatLMs and QuantLMs were scored on the same windows, so the paired check is there
    checks = {c["check"] for c in build_report(out)["checks"]}
    assert "QuantLM 3-bit worse than FloatLM at 1m" in checks


def test_a_file_too_small_is_one_clear_error_before_training(tmp_path, capsys):
    from spectra.__main__ import main

    small = write_text(tmp_path / "small.txt", 200)  # ~10 held-out lines: far fewer than 32 windows of 64 tokens
    out = tmp_path / "suite"
    code = main(["suite", "--preset", "micro", "--set", f"data={small}", "--set", "tokenizer=bpe:300",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"data {small}: its validation split holds" in err and "need" in err and "larger file" in err
    assert not (out / "runs").exists() and not (out / "results.jsonl").exists()  # nothing was trained
    # enough held-out text, but a budget that would repeat the train split more than 4 times
    mid = write_text(tmp_path / "mid.txt", 1200)
    with pytest.raises(ValueError, match=r"mid.txt: its train split holds \d+ tokens; the largest model's budget of "
                                         r"1e\+06 tokens would repeat it more than 4 times"):
        run_suite(load_spec("micro", overrides={"data": str(mid), "tokenizer": "bpe:300", "tokens": 1e6}),
                  tmp_path / "suite2", progress=False)


def test_own_sizes_and_learning_rates_per_size(tmp_path):
    from spectra.train.config import TrainConfig, resolve

    text = """
[suite]
name = "ladder"
sizes = ["s1", "tiny"]
families = ["floatlm", "trilm"]
tokens = 1e5
quant_bits = [8]
pack_formats = []
[sizes.s1]
dim = 128
n_layers = 2
n_heads = 2
glu_dim = 384
[lr.floatlm]
s1 = 4e-3
[lr.trilm]
s1 = 9e-3
tiny = [5e-3, 2e-3]
"""
    path = tmp_path / "ladder.toml"
    path.write_text(text)
    spec = load_spec(path=path)
    cfg = spec.model_config("s1", "trilm")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.glu_dim, cfg.family, cfg.name) == (128, 2, 2, 384, "trilm",
                                                                                       "trilm-s1")
    assert spec.train_overrides("floatlm", "s1")["lr"] == 4e-3 and "lr2" not in spec.train_overrides("floatlm", "s1")
    tri = resolve(cfg, TrainConfig.from_dict({"tokens": 1e5, **spec.train_overrides("trilm", "s1")}))
    assert tri.lr == 9e-3 and tri.lr2 == pytest.approx(6e-3)  # lr2 = 2/3 lr unless given
    assert spec.train_overrides("trilm", "tiny")["lr2"] == 2e-3
    assert "lr" not in spec.train_overrides("floatlm", "tiny")  # no entry: the size's default
    for bad, match in ((text.replace("[sizes.s1]", "[sizes.tiny]"), "built-in size"),
                       (text.replace("glu_dim = 384\n", ""), r"\[sizes.s1\] needs dim, n_layers, n_heads, glu_dim"),
                       (text.replace("s1 = 4e-3", "s1 = -1"), r"\[lr.floatlm\] s1 = -1"),
                       (text.replace("s1 = 4e-3", "s9 = 4e-3"), r"\[lr.floatlm\] s9: not in \[suite\] sizes")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            load_spec(path=path)


def test_contrasts_restated_by_least_squares_and_the_t_over_seeds(tmp_path):
    """A 2 × 2 interaction as a named contrast: its estimate is the weighted sum of seed means; its deciding interval
    the one-sample t over the per-seed contrast; the seed-blocked one beside it, restated here by least squares on
    group and seed indicators over every latent model."""
    from spectra.suite.checks import contrast_rows

    rng = np.random.default_rng(3)
    fams = {"trilm": 4.30, "trilm_no_drop": 4.25, "trilm_no_wd_removal": 4.31, "trilm_neither": 4.20, "floatlm": 4.6}
    seed_shift = {0: 0.0, 1: 0.03, 2: -0.02}
    rows = []
    for f, base in fams.items():
        for seed, shift in seed_shift.items():
            r = _row("floatlm" if f == "floatlm" else "trilm", "s2", 10, base + shift + rng.normal(0, 0.01),
                     seed=seed)
            rows.append(r | {"family": f, "series": {"trilm": "TriLM", "floatlm": "FloatLM"}.get(f, f)})
    weights = {"trilm": 1, "trilm_no_drop": -1, "trilm_no_wd_removal": -1, "trilm_neither": 1}
    (c,) = contrast_rows(rows, {"lr drop x wd removal": weights})
    y = np.array([r["val_loss"] for r in rows])
    groups, seeds = list(fams), list(seed_shift)
    X = np.array([[r["family"] == g for g in groups] + [r["seed"] == s for s in seeds[1:]] for r in rows], float)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = len(y) - X.shape[1]  # 15 − (5 + 2) = 8
    s2 = ((y - X @ beta) ** 2).sum() / df
    est = sum(w * beta[groups.index(f)] for f, w in weights.items())
    t8 = 2.306004135204166  # scipy.stats.t.ppf(0.975, 8)
    half = t8 * math.sqrt(s2 * sum(w * w for w in weights.values()) / 3)
    bl = c["blocked"]
    assert c["size"] == "s2" and bl.estimate == pytest.approx(est) and bl.hi - bl.estimate == pytest.approx(half)
    assert bl.test == "t with seeds as blocks, residual variance over 8 df"
    # the contrast's own interval: the per-seed contrast's mean with its t on n − 1 = 2 df (scipy's one-sample t)
    per_seed = [sum(w * next(r["val_loss"] for r in rows if r["family"] == f and r["seed"] == s)
                    for f, w in weights.items()) for s in seeds]
    t2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
    iv = c["interval"]
    assert iv.estimate == pytest.approx(est) and iv.test == "t over 3 seed(s)"
    assert iv.hi - iv.estimate == pytest.approx(t2 * np.std(per_seed, ddof=1) / math.sqrt(3))
    assert c["sign"] == ("< 0" if iv.hi < 0 else "> 0" if iv.lo > 0 else "not resolved")
    big = [r | {"val_loss": r["val_loss"] + (0.5 if r["family"] == "trilm_neither" else 0)} for r in rows]
    assert contrast_rows(big, {"x": weights})[0]["sign"] == "> 0"
    # one model lacks a seed: the seed-blocked interval is the one used
    gappy = [r for r in rows if not (r["family"] == "trilm_neither" and r["seed"] == 2)]
    g = contrast_rows(gappy, {"x": weights})[0]
    assert g["interval"] is g["blocked"] and g["interval"].test.startswith("t with seed variance pooled")
    from spectra.suite.report import _plot_contrasts

    png = _plot_contrasts([c, g], tmp_path / "fig" / "contrasts.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob(".*tmp*"))

    text = '[suite]\nname = "c"\nsizes = ["tiny"]\nfamilies = ["floatlm", "trilm"]\ntokens = 1e5\n[contrasts]\n'
    path = tmp_path / "c.toml"
    path.write_text(text + '"tri - float" = { trilm = 1, floatlm = -1 }\n')
    assert load_spec(path=path).contrasts == {"tri - float": {"trilm": 1.0, "floatlm": -1.0}}
    for bad, match in (('"a" = { trilm = 1, floatlm = -2 }', "weights sum to -1; a contrast's weights sum to zero"),
                       ('"a" = { trilm = 1, bilm = -1 }', r"\['bilm'\] not in \[suite\] families"),
                       ('"a" = { trilm = 1 }', "at least two family = nonzero weight")):
        path.write_text(text + bad + "\n")
        with pytest.raises(ValueError, match=match):
            load_spec(path=path)


def test_perplexity_is_scored_in_the_windows_the_models_trained_on(tmp_path):
    """A spec without [model] max_seq_len trains at 256 tokens (the CPU sizes' sequence) but perplexity was scored in
    the model's max_seq_len, 2048: windows it never trained on, and fewer than the preflight's 32 (which it counted
    at 256; a review, 2026-12-07). The eval now scores in the trained length, and the preflight counts the same."""
    path = tmp_path / "w.toml"
    path.write_text('[suite]\nname = "w"\nsizes = ["1m"]\nfamilies = ["floatlm"]\nquant_bits = []\npack_formats = []\n'
                    'tokens = 7e4\ntasks = ["ppl"]\nbench = false\nseeds = [0]\n[eval]\nppl_max_tokens = 16384\n')
    spec = load_spec(path=path)
    assert spec.eval_window() == 256 and spec.model_config("1m", "floatlm").max_seq_len == 2048
    run_suite(spec, tmp_path / "out", progress=False)
    metrics = read_records(tmp_path / "out")["eval/train/floatlm-1m/s0"]["metrics"]
    assert metrics["seq_tokens"][0] == 256 and len(metrics["seq_nll"]) >= 32


def test_a_workers_process_ends_when_the_study_is_killed(tmp_path):
    """`--jobs N` workers outlived a killed study and kept training into the run folders the resumed study trained
    into again (a review, 2026-12-07). A worker now ends within a second or two of its parent."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, os, time\n"
        "from spectra.suite.runner import _init_worker\n"
        "def child(parent):\n"
        "    _init_worker(1, 30, parent)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('spawn').Process(target=child, args=(os.getpid(),))\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1)  # the worker may still be importing torch: it learns of its parent's death afterwards, the
    # parent's pid given (it read os.getppid() after the import, and missed a parent killed before)

    def alive(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")

    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.time() + 60  # a liveness bound (torch's import under load), not a speed
    while alive(child) and time.time() < deadline:
        time.sleep(0.2)
    gone = not alive(child)
    if not gone:
        os.kill(child, 9)
    assert gone


def test_a_preset_narrowed_by_set_drops_the_rates_and_contrasts_it_leaves_out():
    """`--set sizes=...` or `--set families=...` on a preset with [lr] tables or [contrasts] was refused for naming
    sizes or families not in the study, the CLI help's own example included (a review, 2026-12-07)."""
    one = load_spec("tiny", overrides={"sizes": ["s1"]})
    assert one.sizes == ["s1"] and one.lr["floatlm"] == {"s1": load_spec("tiny").lr["floatlm"]["s1"]}
    assert load_spec("tiny", overrides={"sizes": ["tiny"], "tokens": 1e5}).sizes == ["tiny"]
    floats = load_spec("small", overrides={"families": ["floatlm"]})
    assert floats.families == ["floatlm"] and list(floats.lr) == ["floatlm"] and not floats.contrasts


def test_sigterm_ends_a_parallel_study_and_its_workers(tmp_path):
    """SIGTERM (or Ctrl-C) to `spectra suite --jobs 2` ends the study and its running steps' workers at once: it
    waited at exit for every running step to finish (36 s in a review's run, a training run's length in a real one),
    whose records it then never wrote. The resumed study runs them again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    env = dict(os.environ, SPECTRA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "spectra", "suite", "--preset", "micro", "--set", "tokens=4000000",
                             "--jobs", "2", "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("runs/*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    took = time.time() - t0
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "spectra suite: terminated", err
    assert took < 30, took  # a liveness bound (it waited for the steps to end), not a speed
    time.sleep(2)
    assert not [c for c in children if os.path.exists(f"/proc/{c}") and
                open(f"/proc/{c}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")]
