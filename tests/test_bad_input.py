"""Bad input found by a review of every command (2026-12-07): each case is a one-line error that names the field, file
or option at fault and what would be accepted (no traceback, nothing written), where it used to crash, run on
garbage, or replace its own input."""

from __future__ import annotations

import json
import math
import re

import pytest

from spectra.__main__ import main
from spectra.config import ModelConfig, from_name
from spectra.train.config import TrainConfig


@pytest.mark.parametrize("field, value, said", [
    ("rope_theta", None, "ModelConfig.rope_theta must be a finite number"),
    ("rope_theta", -5.0, "ModelConfig.rope_theta must be a finite number > 0"),
    ("init_std", math.nan, "ModelConfig.init_std must be a finite number"),
    ("norm_eps", -1.0, "ModelConfig.norm_eps must be a finite number >= 0"),
    ("quantizer_options", "x", "ModelConfig.quantizer_options must be a table"),
    ("eos_token_id", 99999, "ModelConfig.eos_token_id must be a token id in 0..511"),
    ("bos_token_id", -1, "ModelConfig.bos_token_id must be a token id"),
    ("head_dim", -2, "ModelConfig.head_dim must be a positive integer"),
    ("vocab_size", 0, "ModelConfig.vocab_size must be a positive integer"),
    ("bogus", 1, "unknown ModelConfig field(s) ['bogus']"),
])
def test_model_config_values_are_checked(field, value, said):
    overrides = {"vocab_size": 512, field: value} if field != "vocab_size" else {field: value}
    with pytest.raises(ValueError, match=rf"^{said}".replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        from_name("trilm-tiny", **overrides)


def test_model_config_takes_what_it_took():
    cfg = from_name("trilm-99m")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert from_name("trilm-tiny", vocab_size=512, eos_token_id=511, norm_eps=0.0).eos_token_id == 511


@pytest.mark.parametrize("field, value, said", [
    ("compile", "yes", "train.compile must be true or false, got 'yes'"),
    ("loggers", "tensorboard", "train.loggers must be a list of strings"),
    ("tokens", "lots", "train.tokens must be a finite number"),
    ("tokens", math.inf, "train.tokens must be a finite number"),
    ("weight_decay", math.nan, "train.weight_decay must be a finite number"),
    ("warmup", -1, "train.warmup must be >= 0"),
    ("grad_clip", -1.0, "train.grad_clip must be >= 0"),
    ("ckpt_every_tokens", -1.0, "train.ckpt_every_tokens must be >= 0"),
    ("memory_limit_gb", -1.0, "train.memory_limit_gb must be >= 0"),
    ("batch_tokens", 0, "train.batch_tokens must be > 0"),
    ("lr", -1.0, "train.lr must be >= 0"),
    ("eps", 0.0, "train.eps must be > 0"),
    ("beta1", 2.0, r"train.beta1 must lie in \[0, 1\)"),
])
def test_train_config_values_are_checked(field, value, said):
    with pytest.raises(ValueError, match=said):
        TrainConfig(**{field: value})


def test_train_config_takes_integral_floats_and_its_defaults():
    assert TrainConfig(batch_tokens=1.6e4).batch_tokens == 16000 and isinstance(TrainConfig(batch_tokens=1.6e4)
                                                                                 .batch_tokens, int)
    assert TrainConfig(memory_limit_gb=0, grad_clip=0).grad_clip == 0  # 0: no check / no clipping, as documented


def test_run_files_name_their_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, said in [('model = 5\n', "'model' must be a table"),
                       ('[model]\nsize = "trilm-tiny"\nbogus = 1\n', "unknown ModelConfig field(s) ['bogus']"),
                       ('[model]\nsize = "trilm-tiny"\n[train]\ntokens = "lots"\n', "train.tokens must be a number"),
                       ('[model]\nsize = "trilm-tiny"\n[train]\ncompile = "yes"\n', "train.compile must be true or "
                                                                                   "false")]:
        bad.write_text(text)
        assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2, text
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (text, err)
    assert main(["train", "--size", "trilm-tiny", "--tokens", "inf", "--out", str(tmp_path / "run")]) == 2
    assert "train.tokens must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_train_that_fails_before_its_run_begins_leaves_no_folder(tmp_path, capsys):
    """The run folder is made before the data is read; a bad data source used to leave it behind, empty. A folder
    that existed before stays."""
    argv = ["train", "--size", "trilm-1m", "--tokens", "7e4", "--data", str(tmp_path / "missing.txt"), "--out"]
    assert main([*argv, str(tmp_path / "run")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    assert main([*argv, str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()


def hf_config(**changes):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512}
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes, said", [
    ({"architectures": None, "model_type": None}, "accepted: a Llama checkpoint"),
    ({"eos_token_id": []}, "field 'eos_token_id' must be a token id"),
    ({"rms_norm_eps": None}, "field 'rms_norm_eps' must be a finite number, got None"),
    ({"hidden_size": "abc"}, "field 'hidden_size' must be a positive integer, got 'abc'"),
    ({"num_attention_heads": 0}, "field 'num_attention_heads' must be a positive integer, got 0"),
    ({"rope_theta": "abc"}, "field 'rope_theta' must be a finite number"),
    ({"eos_token_id": 4096}, "(config.json field 'eos_token_id')"),
])
def test_hf_config_values_name_the_field(changes, said):
    from spectra.interop.hf import config_from_hf

    with pytest.raises(ValueError) as e:
        config_from_hf(hf_config(**changes), "m/config.json")
    assert str(e.value).startswith("m/config.json: ") and said in str(e.value)
    assert config_from_hf(hf_config(eos_token_id=[2, 3], bos_token_id=None), "x").eos_token_id == 2


def test_a_quantization_config_that_is_not_an_object(tmp_path):
    from spectra.ptq.formats import read_quant_config

    (tmp_path / "config.json").write_text(json.dumps(hf_config(quantization_config="yes")))
    with pytest.raises(ValueError, match="quantization_config must be an object"):
        read_quant_config(tmp_path)


@pytest.mark.parametrize("suite, said", [
    ({"sizes": ["1m"]}, "[suite] name is required"),
    ({"name": "x", "sizes": 5}, "[suite] sizes must be a non-empty list"),
    ({"name": "x", "sizes": ["1m"], "quant_bits": 4}, "[suite] quant_bits must be a list"),
    ({"name": "x", "sizes": ["1m"], "seeds": 3}, "[suite] seeds must be a non-empty list of integer seeds"),
    ({"name": "x", "sizes": ["1m"], "bench": "yes"}, "[suite] bench must be true or false"),
    ({"name": "x", "sizes": ["1m"], "tokens": math.nan}, "[suite] tokens must be a positive number"),
])
def test_suite_specs_check_their_types(suite, said):
    from spectra.suite.spec import parse_spec

    with pytest.raises(ValueError) as e:
        parse_spec({"suite": suite}, "s.toml")
    assert str(e.value).startswith("s.toml: ") and said in str(e.value)
    with pytest.raises(ValueError, match=r"\[variants\] must be a table"):
        parse_spec({"suite": {"name": "x", "sizes": ["1m"]}, "variants": 3}, "s.toml")


MODEL = {"name": "floatlm-1m-s0", "kind": "floatlm", "family": "floatlm", "size": "1m", "params": 1, "size_bits": 16,
         "seed": 0}


def test_results_records_are_checked_before_the_report(tmp_path, capsys):
    r = tmp_path / "results.jsonl"
    for line, said in [({"key": "eval/x", "status": "done"}, "needs the strings 'key', 'step' and 'status'"),
                       ({"key": "eval/x", "status": "done", "step": "eval", "model": {}, "metrics": {}},
                        "has no model field(s) ['name', 'kind', 'family', 'size', 'params', 'size_bits', 'seed']"),
                       ({"key": "eval/x", "status": "done", "step": "eval"}, "needs 'model' and 'metrics' objects"),
                       # fields the report reads, by type (they were KeyError / TypeError tracebacks)
                       ({"key": "eval/x", "status": "done", "step": "eval", "model": MODEL, "metrics": {
                           "val_loss": "3.6"}}, "metrics.val_loss must be a number or null, got '3.6'"),
                       ({"key": "eval/x", "status": "done", "step": "eval", "model": MODEL, "metrics": {
                           "tasks": ["arc"]}}, "metrics.tasks must be an object, got ['arc']")]:
        r.write_text(json.dumps(line) + "\n")
        assert main(["report", str(r)]) == 2
        err = capsys.readouterr().err
        assert f"{r}:1" in err and said in err and "Traceback" not in err
    r.write_text(json.dumps({"key": "eval/x", "status": "done", "step": "eval", "model": MODEL,
                             "metrics": {"val_loss": 3.5}}) + "\n")
    for spec, said in [("{not json", "spec.json is not valid JSON"), ("[1, 2]", "spec.json is not the study's spec")]:
        (tmp_path / "spec.json").write_text(spec)
        assert main(["report", str(r)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    (tmp_path / "spec.json").write_text(json.dumps({"name": "tiny", "sizes": ["s1"]}, indent=2))
    assert main(["report", str(tmp_path / "spec.json")]) == 2  # the study's spec given for its results: a slip
    assert "spec.json is one JSON document, not a results file (one suite record per line): give the study's " \
           "results.jsonl or its folder" in capsys.readouterr().err
    (tmp_path / "spec.json").unlink()
    assert main(["report", str(r)]) == 0  # one model, one seed: its unbounded intervals are null in strict JSON
    json.loads((tmp_path / "report" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_devices_and_wheels_say_what_is_accepted(tmp_path):
    from spectra.loading import load
    from spectra.ptq.sequential import resolve_device

    with pytest.raises(ValueError, match="device 'bogus' is not a torch device; accepted: cpu, cuda"):
        load("trilm-1m", device="bogus")
    with pytest.raises(ValueError, match="accepted: cpu, cuda, cuda:N, auto"):
        resolve_device("bogus", None)
    pytest.importorskip("lm_eval")
    from spectra.eval.offline import build_eval_data

    not_a_wheel = tmp_path / "small.txt"
    not_a_wheel.write_text("hello")
    with pytest.raises(ValueError, match="small.txt is not a wheel"):
        build_eval_data(tmp_path / "ev", wheel=not_a_wheel)
    assert not (tmp_path / "ev").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    """`--device cuda` without a CUDA device: one line before any work (a RuntimeError traceback from deep inside the
    checkpoint load: pin_memory needs an accelerator); an index past the devices too."""
    from spectra.loading import check_device, load

    with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device"):
        load("trilm-1m", device="cuda")
    with pytest.raises(ValueError, match="device 'cuda:1': this machine has no CUDA device"):
        check_device("cuda:1")
    assert check_device("cpu").type == "cpu"
    assert main(["eval", "trilm-1m", "--tasks", "ppl", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spectra eval: error: device 'cuda': this machine has no CUDA device (torch "
                   f"{__import__('torch').__version__}); accepted: cpu"]


def test_an_output_that_would_replace_the_input_is_refused(tmp_path, capsys):
    m = tmp_path / "m"
    assert main(["init", "trilm-1m", str(m), "--vocab-size", "384"]) == 0
    before = (m / "model.safetensors").read_bytes()
    for argv in (["pack", str(m), str(m)], ["pack", str(m), str(tmp_path)], ["export", "hf", str(m), str(m)],
                 ["quantize", str(m), str(m), "--bits", "4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "would replace the input; choose another output directory" in err, argv
    assert (m / "model.safetensors").read_bytes() == before and json.loads((m / "spectra.json").read_text())[
        "kind"] == "model"


def test_numbers_that_used_to_mean_default_or_nothing(tmp_path, capsys):
    cases = [
        (["init", "trilm-tiny", str(tmp_path / "v"), "--vocab-size", "0"], "ModelConfig.vocab_size must be a positive"),
        (["eval", "trilm-1m", "--tasks", "ppl", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["eval", "trilm-1m", "--tasks", "ppl", "--seq-len", "0"], "--seq-len must be a positive integer"),
        (["eval", "trilm-1m", "--tasks", "cloze", "--limit", "-1"], "--limit must be a positive number"),
        (["eval", "trilm-1m", "--tasks", "cloze", "--limit", "nan"], "--limit must be a positive number"),
        (["eval", "trilm-1m", "--tasks", "ppl", "--device", "bogus"], "device 'bogus' is not a torch device"),
        (["data", "shards", "--out", str(tmp_path / "s"), "--max-tokens", "-1"], "--max-tokens must be a positive"),
        (["data", "shards", "--out", str(tmp_path / "s"), "--max-tokens", "0"], "--max-tokens must be a positive"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "v").exists() and not (tmp_path / "s").exists()


def test_serve_warns_when_the_tokenizer_covers_a_small_part_of_the_vocabulary(tmp_path, caplog):
    """A 50304-id random model served with the built-in 4096-id tokenizer (the README's first serving example) picks
    ids the tokenizer lacks, which decode to nothing: a warning at start; padding to 128 ids is not warned about."""
    pytest.importorskip("uvicorn")
    from spectra.serve.server import build_engine

    assert main(["init", "trilm-1m", str(tmp_path / "big")]) == 0
    with caplog.at_level("WARNING", logger="spectra.serve.server"):
        build_engine(str(tmp_path / "big"), tokenizer="builtin", max_batch=1, ctx_len=16)
    assert "the tokenizer has 4096 ids and the model 50304: ids 4096..50303 decode to nothing" in caplog.text
    caplog.clear()
    assert main(["init", "trilm-1m", str(tmp_path / "fit"), "--vocab-size", "4096"]) == 0
    with caplog.at_level("WARNING", logger="spectra.serve.server"):
        build_engine(str(tmp_path / "fit"), tokenizer="builtin", max_batch=1, ctx_len=16)
    assert "decode to nothing" not in caplog.text


def test_serve_options_are_checked_before_it_starts(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    m = tmp_path / "m"
    assert main(["init", "trilm-1m", str(m), "--vocab-size", "384"]) == 0
    for extra, said in [(["--port", "70000"], "--port must be in 0..65535"),
                        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number of seconds"),
                        (["--shutdown-timeout", "-5"], "--shutdown-timeout must be a finite number of seconds"),
                        (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an address"),
                        (["--max-batch", "100000000"], "GiB of KV cache; this machine has"),
                        (["--ctx-len", "99999"], "--ctx-len must be in 1..2048 (the model's max_seq_len), got 99999")]:
        assert main(["serve", str(m), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (extra, err)
    import socket

    with socket.socket() as busy:  # a port another server holds: one line, before "serving ..." (uvicorn's exit 3)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(m), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--host 127.0.0.1 --port {port}: cannot listen there" in err and "Traceback" not in err, err


def test_paths_are_told_apart_from_size_names(tmp_path, capsys):
    m = tmp_path / "m"
    assert main(["init", "trilm-1m", str(m), "--vocab-size", "384"]) == 0
    for argv, said in [(["info", str(tmp_path / "nope")], "nope does not exist (expected a model directory"),
                       (["info", str(m / "model.safetensors")], "model.safetensors is a file; a model is a directory"),
                       (["bench", "./nosuch/dir"], "./nosuch/dir does not exist (expected a model directory"),
                       (["train", "--out", str(tmp_path / "nosuchrun"), "--resume"], "holds no run.json to resume")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (argv, err)


def test_writers_name_the_output_not_their_temporary(tmp_path):
    from spectra.files import atomic_dir, atomic_file

    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="d is a directory; give a file name"), atomic_file(tmp_path / "d"):
        pass
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for open_ in (atomic_dir, atomic_file):
        with pytest.raises(OSError) as e, open_(blocker / "out"):
            pass
        assert str(e.value).startswith(f"cannot write {blocker / 'out'}: ") and ".tmp-" not in str(e.value)


def test_init_checks_the_tokenizer_it_stores(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    for argv, said in [(["--tokenizer", str(bad)], "bad.json is not a valid tokenizer.json"),
                       (["--tokenizer", "builtin", "--vocab-size", "384"],
                        "has 4096 ids; the model's vocabulary is 384")]:
        assert main(["init", "trilm-1m", str(tmp_path / "m"), *argv]) == 2, argv
        assert said in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["init", "trilm-1m", str(tmp_path / "m"), "--tokenizer", "builtin"]) == 0  # as generate takes it
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_binary_and_corrupt_inputs_name_their_file(tmp_path, capsys):
    m = tmp_path / "m"
    assert main(["init", "trilm-1m", str(m), "--vocab-size", "384"]) == 0
    weights = m / "model.safetensors"
    assert main(["train", "--config", str(weights), "--out", str(tmp_path / "r")]) == 2
    assert f"run file {weights} is not valid TOML" in capsys.readouterr().err
    assert main(["report", str(weights)]) == 2
    assert f"{weights} is not a results file" in capsys.readouterr().err
    meta = json.loads((m / "spectra.json").read_text())
    (m / "spectra.json").write_text(json.dumps({**meta, "kind": "weird"}))
    assert main(["info", str(m)]) == 2
    assert "unknown kind 'weird'" in capsys.readouterr().err
    assert main(["init", "trilm-tiny", str(tmp_path / "big"), "--vocab-size", "1000000000"]) == 2
    assert "GiB in float32; this machine has" in capsys.readouterr().err and not (tmp_path / "big").exists()
    pytest.importorskip("pyarrow")
    bad = tmp_path / "bad.parquet"
    bad.write_text("garbage")
    assert main(["data", "shards", "--data", str(bad), "--out", str(tmp_path / "sh")]) == 2
    assert f"{bad} is not a readable parquet file" in capsys.readouterr().err


def test_an_unknown_dotted_train_option_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--size", "trilm-tiny", "--model.bogus=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown option --model.bogus; accepted --model.FIELD" in err and "rope_theta" in err
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
    f = tmp_path / "f"
    assert main(["init", "floatlm-1m", str(f), "--vocab-size", "384"]) == 0
    gguf = tmp_path / "g.gguf"
    gguf.write_bytes(b"GGUF")
    for argv, said in [(["bench", str(f), "--variants", "packed"], "nothing to measure: packed (not a ternary model)"),
                       (["quantize", str(f), str(tmp_path / "q"), "--bits", "4", "--method", "rtn", "--act-order"],
                        "method 'rtn' rounds each weight alone"),
                       (["generate", str(gguf), "--prompt", "hi"], "g.gguf is a file; a model is a directory")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "q").exists()


def test_suite_checks_its_tasks_before_training(tmp_path, capsys):
    """A misspelt task used to fail each eval step after its model had trained (2026-12-07: 142 s of training, then
    `unknown task 'arc_eazy'` in the report); now the study stops before its first step, with nothing trained."""
    spec = tmp_path / "s.toml"
    spec.write_text('[suite]\nname = "x"\nsizes = ["1m"]\nfamilies = ["trilm"]\nquant_bits = []\npack_formats = []\n'
                    'tokens = 7e4\nbench = false\ntasks = ["ppl", "arc_eazy"]\n')
    out = tmp_path / "out"
    assert main(["suite", "--spec", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spectra suite: error: [suite] tasks: unknown task 'arc_eazy' (close: arc_easy")
    assert "\n" not in err and not (out / "runs").exists() and not (out / "results.jsonl").exists()


@pytest.mark.parametrize("table, said", [
    ("[eval]\nppl_max_token = 1000\n", "[eval] unknown key 'ppl_max_token'; accepted: ['batch_size', "),
    ("[eval]\ntasks = 'ppl'\n", "[eval] tasks: set by the study itself"),
    ("[quantize]\ngroupsize = 64\n", "[quantize] unknown key 'groupsize'; accepted: ['act_order', "),
    ("[quantize]\nbits = 4\n", "[quantize] bits: set by the study itself"),
    ("[bench]\nthread = [2]\n", "[bench] unknown key 'thread'; accepted: ["),
])
def test_suite_checks_its_step_options_before_training(tmp_path, capsys, table, said):
    """A misspelt [eval] key failed every eval step after the models had trained (2026-12-07: 443 s of training, then
    `evaluate() got an unexpected keyword argument 'ppl_max_token'` five times); now the study stops first."""
    spec = tmp_path / "s.toml"
    spec.write_text('[suite]\nname = "x"\nsizes = ["1m"]\nfamilies = ["floatlm"]\nquant_bits = [4]\n'
                    'tokens = 7e4\ntasks = ["ppl"]\n' + table)
    out = tmp_path / "out"
    assert main(["suite", "--spec", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spectra suite: error: " + said), err
    assert "\n" not in err and not (out / "runs").exists() and not (out / "results.jsonl").exists()


def test_cloze_on_data_too_short_for_a_passage_is_refused_before_training(tmp_path):
    """check_tasks accepted "cloze" on data with no 50-word passage; `evaluate` then failed on it after each model had
    trained."""
    from spectra.eval import check_tasks

    (tmp_path / "c" / "validation").mkdir(parents=True)
    (tmp_path / "c" / "validation" / "a.txt").write_text("Too short. Far too short to cut a passage from.")
    with pytest.raises(ValueError, match=r"gave no cloze items: it needs passages of >= 50 words"):
        check_tasks("ppl,cloze", data=str(tmp_path / "c"))
    assert check_tasks("ppl", data=str(tmp_path / "c")) == ["ppl"]


def test_eval_max_tokens_below_two_is_refused(tmp_path, capsys):
    """--max-tokens 1 said the corpus "has no text to score"; the budget, not the corpus, left nothing."""
    assert main(["eval", str(tmp_path), "--tasks", "ppl", "--max-tokens", "1"]) == 2
    assert "--max-tokens must be at least 2" in capsys.readouterr().err


def test_every_preset_passes_the_step_option_check():
    from spectra.suite.preflight import check_options
    from spectra.suite.spec import PRESETS, load_spec

    for name in PRESETS:
        check_options(load_spec(name))


@pytest.mark.parametrize("table,options,said", [
    ("eval", {"ppl_max_tokens": "lots"}, "[eval] ppl_max_tokens = 'lots': expected int | None"),
    ("eval", {"dtype": "bf16"}, "[eval] dtype = 'bf16': expected torch.dtype | None"),
    ("quantize", {"sym": 1}, "[quantize] sym = 1: expected bool"),
    ("bench", {"threads": [True]}, "[bench] threads = [True]: expected Sequence[int]"),
    ("bench", {"threads": [1, 2], "repeats": 2}, None),
    ("quantize", {"percdamp": 1}, None),
])
def test_step_option_values_are_checked_by_type(table, options, said):
    """Only the keys were checked: `ppl_max_tokens = "lots"` passed and failed every eval step after training."""
    import dataclasses

    from spectra.suite.preflight import check_options
    from spectra.suite.spec import load_spec

    spec = dataclasses.replace(load_spec("micro"), **{"bench_options" if table == "bench" else table: options})
    if said is None:
        check_options(spec)
    else:
        with pytest.raises(ValueError, match=re.escape(said)):
            check_options(spec)


def test_task_check_skips_the_task_index_for_local_tasks(tmp_path, monkeypatch):
    """check_tasks answers for "ppl", "cloze" and offline tasks without building lm-eval's task index (20-30 s), and
    raises as `evaluate` does for an explicitly named task the offline folder lacks."""
    import lm_eval
    import lm_eval.tasks

    from spectra.eval import check_tasks

    def no_index(*args, **kwargs):
        raise AssertionError("the task index was built")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", no_index)
    assert check_tasks(["ppl", "cloze"], limit=5) == ["spectra_cloze", "ppl"]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"tasks": {"arc_easy": {"split": "test", "rows": 1}},
                                                        "unavailable": ["logiqa"],
                                                        "lm_eval_version": lm_eval.__version__}))
    assert check_tasks("arc_easy,ppl", offline_dir=tmp_path) == ["arc_easy", "ppl"]
    with pytest.raises(FileNotFoundError, match=r"no offline data for \['piqa'\]"):
        check_tasks(["piqa"], offline_dir=tmp_path)
    with pytest.raises(AssertionError, match="task index was built"):  # a name that is not local needs the index
        check_tasks(["piqa"])


def test_cli_review_one_line_errors(tmp_path, capsys):
    """A CLI review (2026-12-07): each of these ran to the end, crashed or wrote over its input before."""
    from spectra.__main__ import main

    def err(*argv: str) -> str:
        assert main(list(argv)) == 2, argv
        text = capsys.readouterr().err
        assert len(text.strip().splitlines()) == 1, text
        return text

    assert main(["init", "floatlm-1m", str(tmp_path / "m"), "--vocab-size", "384"]) == 0
    capsys.readouterr()
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    # export gguf over a file of its own input destroyed it; into a folder it failed after the work, naming a temp
    assert "is a file of the input model" in err("export", "gguf", str(tmp_path / "m"),
                                                 str(tmp_path / "m" / "model.safetensors"), "--type", "f16")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert "is a folder; give a file name" in err("export", "gguf", str(tmp_path / "m"), str(tmp_path), "--type",
                                                  "f16")
    (tmp_path / "f").write_text("")
    assert "is a file, not a folder" in err("eval", str(tmp_path / "m"), "--tasks", "ppl", "--output",
                                            str(tmp_path / "f" / "r.json"))
    assert "--limit and --num-fewshot apply to benchmark tasks" in err("eval", str(tmp_path / "m"), "--tasks", "ppl",
                                                                       "--limit", "3")
    assert "--threads must be in 1..256" in err("generate", "trilm-1m", "--prompt", "hi", "--threads", "100000")
    assert "threads must be integers in 1..256" in err("bench", "trilm-1m", "--threads", "100000")
    assert "--seed must be in 0..2^63-1" in err("init", "trilm-1m", str(tmp_path / "s"), "--seed",
                                                "99999999999999999999")
    assert "unknown model size 'nosuch' (read as 'trilm-nosuch')" in err("bench", "nosuch")
    (tmp_path / "empty.jsonl").write_text("")
    assert "holds no records" in err("report", str(tmp_path / "empty.jsonl"))
    assert "has no quantized layers" in err("generate", str(tmp_path / "m"), "--tokenizer", "builtin", "--prompt",
                                            "hi", "--max-new-tokens", "1", "--cache-dequantized")
    with pytest.raises(ValueError, match=r"train.seed must be in 0..2\^63-1"):
        TrainConfig(seed=2**64)
