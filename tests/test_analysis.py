import json
import math

import pytest
import torch

from spectra.__main__ import main
from spectra.analysis import analyze, collect, list_checkpoints, read_metrics
from spectra.checkpoint import save_model
from spectra.model import build_model
from spectra.ternary import ternarize
from tests.conftest import tiny_config

STEPS = [0, 10, 20, 30]
TOKENS_PER_STEP = 512
LAYER_NAMES = [
    f"layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def fake_run(root, family="trilm", **cfg_overrides):
    """A run dir like spectra.train writes: 4 checkpoints of a tiny model whose weights drift with a decaying step
    size, a metrics.jsonl with train and val lines (and a line cut by a kill), an unfinished temporary checkpoint.
    Returns the run dir and the block weights saved at each checkpoint."""
    run = root / "run"
    model = build_model(tiny_config(family=family, **cfg_overrides), seed=0)
    gen = torch.Generator().manual_seed(1)
    saved = []
    for i, step in enumerate(STEPS):
        if i:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("_proj.weight"):
                        p.add_(torch.randn(p.shape, generator=gen) * 0.02 / i)
        meta = {"step": step, "tokens": step * TOKENS_PER_STEP, "train": {"lr": 1e-3}}
        save_model(model, run / "checkpoints" / f"step_{step:08d}", meta=meta)
        saved.append({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_proj.weight")})
    (run / "checkpoints" / ".step_00000040.tmp-x").mkdir()  # an interrupted write
    lines = []
    for step in range(0, 31, 5):
        lr = 1e-3 * (1 - step / 40)
        lines.append({"step": step, "tokens": step * TOKENS_PER_STEP, "loss": 5.5 - step / 20, "lr": lr, "wd": 0.1})
        if step in (10, 30):
            lines.append({"split": "val", "step": step, "tokens": step * TOKENS_PER_STEP, "val_loss": 5.6 - step / 20})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 35, "tok'
    (run / "metrics.jsonl").write_text(text)
    return run, saved


def test_list_checkpoints_and_metrics(tmp_path):
    run, _ = fake_run(tmp_path)
    found = list_checkpoints(run)
    assert [(s, t) for s, t, _ in found] == [(s, s * TOKENS_PER_STEP) for s in STEPS]
    metrics = read_metrics(run)
    assert metrics["train"]["step"] == [0, 5, 10, 15, 20, 25, 30]
    assert metrics["train"]["lr"][1] == pytest.approx(1e-3 * 0.875)
    assert metrics["train"]["grad_norm"] == [None] * 7
    assert metrics["val"] == {"step": [10, 30], "tokens": [5120, 15360], "val_loss": [5.1, pytest.approx(4.1)]}


def test_analyze_series_match_the_checkpoints(tmp_path):
    run, saved = fake_run(tmp_path)
    result = analyze(run, tmp_path / "out")
    n = len(STEPS)
    assert result["checkpoints"]["step"] == STEPS
    assert result["checkpoints"]["delta_tokens"] == [s * TOKENS_PER_STEP for s in STEPS[1:]]
    assert result["quantizer"]["name"] == "trilm" and result["quantizer"]["bits"] == pytest.approx(math.log2(3))
    assert list(result["layers"]) == LAYER_NAMES
    lengths = {
        "frac_neg": n,
        "frac_zero": n,
        "frac_pos": n,
        "scale": n,
        "latent_norm": n,
        "flip_rate": n - 1,
        "max_update": n - 1,
        "update_norm": n - 1,
    }
    for series in [result["model"], *result["layers"].values()]:
        assert {k: len(v) for k, v in series.items()} == lengths
    # every value against a direct computation on the saved weights
    flips_total = [0] * (n - 1)
    for name, series in result["layers"].items():
        Ws = [s[name + ".weight"] for s in saved]
        codes = [ternarize(W)[0] for W in Ws]
        for t, (W, c) in enumerate(zip(Ws, codes, strict=True)):
            assert series["frac_neg"][t] == pytest.approx((c == -1).float().mean().item())
            assert series["frac_zero"][t] == pytest.approx((c == 0).float().mean().item())
            assert series["frac_pos"][t] == pytest.approx((c == 1).float().mean().item())
            assert series["scale"][t] == pytest.approx(ternarize(W)[1].item(), rel=1e-6)
            assert series["latent_norm"][t] == pytest.approx(W.norm().item(), rel=1e-5)
        for t in range(n - 1):
            assert series["max_update"][t] == pytest.approx((Ws[t + 1] - Ws[t]).abs().max().item(), rel=1e-6)
            assert series["update_norm"][t] == pytest.approx((Ws[t + 1] - Ws[t]).norm().item(), rel=1e-5)
            assert series["flip_rate"][t] == pytest.approx((codes[t + 1] != codes[t]).float().mean().item())
            flips_total[t] += int((codes[t + 1] != codes[t]).sum())
    model = result["model"]
    numel = sum(W.numel() for W in saved[0].values())
    assert model["flip_rate"] == pytest.approx([f / numel for f in flips_total])
    assert all(0 < f < 0.5 for f in model["flip_rate"])  # the drift does flip states
    # the step size decays 0.02, 0.01, 0.0067: so does the largest update (Gaussian maxima of ~30k draws: ~4σ)
    assert model["max_update"][0] > model["max_update"][1] > model["max_update"][2]
    assert model["max_update"] == pytest.approx(
        [max(s[t] for s in (x["max_update"] for x in result["layers"].values())) for t in range(n - 1)]
    )
    for t in range(n):
        assert model["frac_neg"][t] + model["frac_zero"][t] + model["frac_pos"][t] == pytest.approx(1.0)
    # outputs: the JSON equals the returned series, and every PNG is a PNG
    out = tmp_path / "out"
    on_disk = json.loads((out / "analysis.json").read_text())
    assert all(on_disk["model"][k] == pytest.approx(v) for k, v in model.items())
    assert on_disk["checkpoints"]["step"] == STEPS
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"overview.png"} | {f"layers_{k}.png" for k in lengths}
    assert sorted(result["files"]) == sorted([str(out / "analysis.json")] + [str(out / p) for p in pngs])
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_final_dir_is_used_when_newer(tmp_path):
    run, saved = fake_run(tmp_path)
    model = build_model(tiny_config(family="trilm"), seed=0)
    save_model(model, run / "final", meta={"step": 40, "tokens": 40 * TOKENS_PER_STEP})
    series = collect(run)
    assert series["checkpoints"]["step"] == STEPS + [40]
    assert len(series["model"]["flip_rate"]) == len(STEPS)


def test_analyze_floatlm_run_has_latent_series_only(tmp_path):
    run, saved = fake_run(tmp_path, family="floatlm")
    series = collect(run)
    assert series["quantizer"] is None
    assert set(series["model"]) == {"latent_norm", "max_update", "update_norm"}
    name = "layers.1.mlp.up_proj"
    assert series["layers"][name]["latent_norm"] == pytest.approx([s[name + ".weight"].norm().item() for s in saved])


def test_analyze_uniform_run_counts_code_signs(tmp_path):
    run, saved = fake_run(tmp_path, quantizer="uniform", quantizer_options={"bits": 4})
    series = collect(run)
    name = "layers.0.self_attn.o_proj"
    W = saved[0][name + ".weight"]
    codes = torch.round(W / (W.abs().max() / 7))
    assert series["layers"][name]["frac_zero"][0] == pytest.approx((codes == 0).float().mean().item())
    assert series["quantizer"]["bits"] == 4


def test_cli_analyze(tmp_path, capsys):
    run, _ = fake_run(tmp_path)
    assert main(["analyze", str(run), "--no-plots"]) == 0
    assert (run / "analysis" / "analysis.json").exists() and not list((run / "analysis").glob("*.png"))
    assert "4 checkpoints, steps 0..30, 14 layers" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err


def test_single_checkpoint_has_empty_delta_series(tmp_path):
    run = tmp_path / "run"
    model = build_model(tiny_config(family="trilm"), seed=0)
    save_model(model, run / "checkpoints" / "step_00000000", meta={"step": 0, "tokens": 0})
    result = analyze(run)
    assert result["model"]["flip_rate"] == [] and result["model"]["max_update"] == []
    assert len(result["model"]["frac_zero"]) == 1
    assert (run / "analysis" / "overview.png").exists() and not (run / "analysis" / "layers_flip_rate.png").exists()


def test_sharded_checkpoints_are_analysed_like_whole_ones(tmp_path):
    """An FSDP or tensor-parallel run writes step folders with dcp/ and no model.safetensors; `analyze` skipped them
    without a word (and said "no checkpoints" without final/). The series from the sharded copies equal those from
    the same weights saved whole."""
    from spectra.train.state import save_distributed_checkpoint

    run, _ = fake_run(tmp_path)
    sharded = tmp_path / "sharded"
    for step in STEPS:
        src = run / "checkpoints" / f"step_{step:08d}"
        model = __import__("spectra").load(src).train()
        opt = torch.optim.AdamW(model.parameters())
        meta = {"step": step, "tokens": step * TOKENS_PER_STEP}
        save_distributed_checkpoint(sharded, model, opt, {"step": step}, meta, tokenizer=None, is_main=True,
                                    barrier=lambda: None, whole_model=None)
    assert not list(sharded.glob("checkpoints/*/model.safetensors"))
    assert [s for s, _, _ in list_checkpoints(sharded)] == STEPS
    whole, parts = collect(run), collect(sharded)
    assert parts["checkpoints"]["step"] == STEPS and parts["model"] == whole["model"]
    assert parts["layers"] == whole["layers"]
    (sharded / "checkpoints" / f"step_{STEPS[1]:08d}" / "dcp" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"dcp cannot be read as this model's distributed checkpoint"):
        collect(sharded)


def test_broken_checkpoint_meta_and_metrics_lines(tmp_path, capsys):
    """A checkpoint meta without its config was a KeyError traceback, NaN tokens "cannot convert float NaN to
    integer" without a file name, a metrics line that is JSON but not an object an AttributeError."""
    run, _ = fake_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n[1, 2]\n')
    assert read_metrics(run)["train"]["loss"] == [5.0]
    meta_path = run / "checkpoints" / "step_00000000" / "spectra.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokens": math.nan}))
    assert main(["analyze", str(run), "--no-plots"]) == 2
    assert "step_00000000/spectra.json: field 'tokens' must be a number, got nan" in capsys.readouterr().err
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    assert main(["analyze", str(run), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "step_00000000/spectra.json: field 'config' is not a valid model config" in err and "Traceback" not in err
