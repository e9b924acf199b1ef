import json

import pytest
import torch

import spectra
from spectra import checkpoint
from spectra.checkpoint import save_model
from spectra.files import atomic_dir
from spectra.model import build_model
from tests.conftest import tiny_config


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_save_load_round_trip(tmp_path, family):
    model = build_model(tiny_config(family=family), seed=2)
    save_model(model, tmp_path / "m", meta={"seed": 2})
    meta = json.loads((tmp_path / "m" / "spectra.json").read_text())
    assert meta["kind"] == "model" and meta["config"]["family"] == family and meta["seed"] == 2
    loaded = spectra.load(tmp_path / "m")
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    model = build_model(tiny_config(), seed=0)
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", boom)
    with pytest.raises(OSError, match="No space left"):
        save_model(build_model(tiny_config(), seed=1), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left
    with pytest.raises(OSError):
        save_model(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_atomic_dir_replaces_whole(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "spectra.json").write_text("{}")  # a model folder a writer made: marked, only model files
    (tmp_path / "d" / "old.safetensors").write_text("old")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new.txt"]
    (tmp_path / "d" / "spectra.json").write_text("{}")  # a mark beside someone's notes: refused, nothing deleted
    with pytest.raises(FileExistsError, match="holds other files"), atomic_dir(tmp_path / "d"):
        pass
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new.txt", "spectra.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        spectra.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown model size"):
        spectra.load("trilm-7b")
    save_model(build_model(tiny_config()), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "spectra.json").read_text())
    (tmp_path / "m" / "spectra.json").write_text(json.dumps({**meta, "kind": "weird"}))
    with pytest.raises(ValueError, match="unknown kind 'weird'"):
        spectra.load(tmp_path / "m")
    (tmp_path / "m" / "spectra.json").write_text(json.dumps({**meta, "config": {**meta["config"], "family": "x"}}))
    with pytest.raises(ValueError, match="field 'config' is not a valid model config.*family must be one of"):
        spectra.load(tmp_path / "m")
    (tmp_path / "m" / "spectra.json").write_text(json.dumps({**meta, "config": {**meta["config"], "dim": 63}}))
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(256, 64\), the config needs \(256, 63\)"):
        spectra.load(tmp_path / "m")
    (tmp_path / "m" / "spectra.json").write_text("{not json")
    with pytest.raises(ValueError, match="spectra.json is not valid JSON"):
        spectra.load(tmp_path / "m")


def test_load_named_size_is_random_init():
    model = spectra.load("floatlm-tiny", seed=5)
    assert model.config.name == "floatlm-tiny" and not model.training
    assert torch.equal(model.lm_head.weight, build_model(model.config, seed=5).lm_head.weight)
