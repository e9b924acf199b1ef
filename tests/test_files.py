"""Every kind of file spectra reads, corrupted: each reader raises `FormatError` naming the file, and the CLI prints
one line and exits with 2. (spectra writes GGUF but reads none, so GGUF has no reader to corrupt.) Also: run
directories work wherever model directories do, and pickle-only checkpoints are refused, never unpickled."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from spectra.__main__ import main as cli_main
from spectra.checkpoint import save_model
from spectra.files import FormatError, safetensors_header, write_json
from spectra.loading import find_tokenizer, load
from spectra.model import build_model
from tests.conftest import byte_bpe, tiny_config


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_bpe("the quick brown fox jumps over the lazy dog " * 20, 300).save(str(path))
    return path


@pytest.fixture
def latent(tmp_path, tok_file):
    return save_model(build_model(tiny_config(vocab_size=384), seed=0), tmp_path / "m", tokenizer=tok_file)


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _cli_error(capsys, *argv) -> str:
    code = cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _loads_until_truncated(model_dir, capsys):
    assert load(model_dir) is not None
    _truncate(model_dir / "model.safetensors")
    with pytest.raises(FormatError, match="model.safetensors is truncated"):
        load(model_dir)
    assert "model.safetensors is truncated" in _cli_error(capsys, "info", str(model_dir))


def test_safetensors_header_checks_sizes(latent):
    header = safetensors_header(latent / "model.safetensors")
    assert "embed_tokens.weight" in header
    _truncate(latent / "model.safetensors")
    with pytest.raises(FormatError, match="model.safetensors is truncated"):
        safetensors_header(latent / "model.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "tiny", "garbage_header", "missing"])
def test_broken_latent_weights(latent, capsys, damage):
    weights = latent / "model.safetensors"
    if damage == "truncate":
        _truncate(weights)
    elif damage == "tiny":
        _truncate(weights, keep=5)
    elif damage == "garbage_header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    with pytest.raises(FormatError, match="model.safetensors"):
        load(latent)
    assert "model.safetensors" in _cli_error(capsys, "info", str(latent))
    assert "model.safetensors" in _cli_error(capsys, "generate", str(latent), "--prompt", "the")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "other"}', '{"format": "spectra"}'])
def test_broken_meta(latent, capsys, content):
    (latent / "spectra.json").write_text(content)
    with pytest.raises(FormatError, match="spectra.json"):
        load(latent)
    assert "spectra.json" in _cli_error(capsys, "info", str(latent))


def test_broken_tokenizer(latent, capsys):
    (latent / "tokenizer.json").write_text('{"model": ')
    from spectra.data.tokenizer import load_tokenizer

    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(latent / "tokenizer.json")
    assert "tokenizer.json" in _cli_error(capsys, "generate", str(latent), "--prompt", "the")


def test_broken_packed(tmp_path, capsys):
    from spectra.packed.io import pack_model

    cfg = tiny_config(family="trilm", dim=256, glu_dim=512, n_heads=4, vocab_size=256)
    out = tmp_path / "p"
    pack_model(build_model(cfg, seed=0), out, format="tq2")
    _loads_until_truncated(out, capsys)


def _hf_dir(tmp_path, tok_file):
    pytest.importorskip("transformers")
    from spectra.interop.hf import export_hf

    return export_hf(build_model(tiny_config(vocab_size=384), seed=0), tmp_path / "hf", tokenizer=tok_file)


def test_broken_hf(tmp_path, tok_file, capsys):
    hf = _hf_dir(tmp_path, tok_file)
    assert load(hf) is not None
    (hf / "config.json").write_text("{")
    with pytest.raises(FormatError, match="config.json"):
        load(hf)
    assert "config.json" in _cli_error(capsys, "info", str(hf))


def test_pickle_only_hf_is_refused_without_unpickling(tmp_path, tok_file, capsys, monkeypatch):
    hf = _hf_dir(tmp_path, tok_file)
    (hf / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, hf / "pytorch_model.bin")

    def never(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(FormatError, match="pickle checkpoint.*convert it to safetensors"):
        load(hf)
    assert "safetensors" in _cli_error(capsys, "info", str(hf))


def test_broken_quantlm(tmp_path, capsys):
    from spectra.ptq import quantize_model, save_gptq

    model = build_model(tiny_config(vocab_size=256), seed=0)
    quantize_model(model, torch.randint(0, 256, (8, 32)), bits=4, group_size=32, progress=False)
    out = save_gptq(model, tmp_path / "q")
    _loads_until_truncated(out, capsys)


def test_broken_shards(tmp_path, tok_file):
    from spectra.data.shards import TokenStream, read_manifest

    d = tmp_path / "shards"
    d.mkdir()
    np.arange(100, dtype=np.uint16).tofile(d / "train_00000.bin")
    manifest = {"format": "spectra-shards", "tokenizer": {"eos_id": 0, "vocab_size": 300}, "dtype": "uint16",
                "splits": {"train": {"shards": [{"file": "train_00000.bin", "tokens": 100, "docs": 1}],
                                     "tokens": 100, "docs": 1, "complete": True}}}
    write_json(d / "manifest.json", manifest)
    assert len(TokenStream(d)) == 100
    _truncate(d / "train_00000.bin", keep=150)
    with pytest.raises(FormatError, match="train_00000.bin is 150 bytes"):
        TokenStream(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(FormatError, match="manifest.json"):
        read_manifest(d)


def test_run_directory_works_as_a_model_directory(latent, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "run.json", {"model": {}})
    with pytest.raises(FormatError, match="training run without a final model"):
        load(run)
    shutil.copytree(latent, run / "final")
    assert find_tokenizer(run) == run / "final" / "tokenizer.json"
    idx = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(load(run)(idx), load(latent)(idx), rtol=0, atol=0)
    assert cli_main(["info", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"
