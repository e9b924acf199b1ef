"""Every kind of file spectra reads, corrupted: each reader raises `FormatError` naming the file, and the CLI prints
one line and exits with 2. (spectra writes GGUF but reads none, so GGUF has no reader to corrupt.) Also: run
directories work wherever model directories do, and pickle-only checkpoints are refused, never unpickled."""

from __future__ import annotations

import json
import os
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
    manifest = {"format": "spectra-shards", "source": {"source": "x"},
                "tokenizer": {"sha256": "0" * 64, "eos_id": 0, "vocab_size": 300}, "dtype": "uint16",
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


def _header_edit(weights, edit):
    """Rewrite a safetensors file's JSON header through `edit(header)`, keeping the data bytes."""
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_safetensors_damage_the_reader_refuses_is_a_format_error(latent, capsys):
    """Bytes after the tensors' data (safetensors: "file not fully covered") and offsets that are not integers were
    tracebacks from `spectra pack`/`info` (2026-12-07 review); now one line naming the file."""
    weights = latent / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b"\0" * 8)
    with pytest.raises(FormatError, match="8 bytes follow its tensors' data"):
        safetensors_header(weights)
    assert "model.safetensors is corrupt" in _cli_error(capsys, "info", str(latent))
    weights.write_bytes(original)

    def strings(header):
        header["embed_tokens.weight"]["data_offsets"] = [str(v) for v in header["embed_tokens.weight"]["data_offsets"]]

    _header_edit(weights, strings)
    assert "tensor 'embed_tokens.weight' has an invalid header entry" in _cli_error(capsys, "info", str(latent))
    weights.write_bytes(original)

    def alias(header):  # two tensors of one size pointed at the same bytes: each size checks, the layout does not
        names = [k for k, t in header.items() if k != "__metadata__" and t["shape"] == [64]][:2]
        header[names[0]]["data_offsets"] = list(header[names[1]]["data_offsets"])

    _header_edit(weights, alias)
    assert "where the tensors before it end at" in _cli_error(capsys, "info", str(latent))


def _packed(tmp_path):
    from spectra.packed.io import pack_model

    cfg = tiny_config(family="trilm", dim=256, glu_dim=512, n_heads=4, vocab_size=256)
    pack_model(build_model(cfg, seed=0), tmp_path / "p", format="tq2")
    return tmp_path / "p"


@pytest.mark.parametrize("field, value, said", [
    ("format", ["tq2_0"], "packed.format is ['tq2_0']; accepted"),
    ("format", "q4_0", "packed.format is 'q4_0'; accepted"),
    ("format", None, "packed.format is None; accepted"),
    ("embedding", ["float16"], "packed.embedding/head are ['float16']/"),
    ("kind", ["packed"], "unknown kind ['packed']"),
    ("layer", [256, 2**50], "is not a ternary layer of the config"),
])
def test_broken_packed_meta_values(tmp_path, capsys, field, value, said):
    """A list where spectra.json has a string crashed membership tests (unhashable), `spectra info` indexed a missing
    format, and a layer's shape sized the code arena (2^50 columns: an allocation of 144 PB) before it was checked."""
    out = _packed(tmp_path)
    meta = json.loads((out / "spectra.json").read_text())
    if field == "kind":
        meta["kind"] = value
    elif field == "layer":
        meta["packed"]["layers"]["layers.0.self_attn.q_proj"] = value
    else:
        meta["packed"][field] = value
    (out / "spectra.json").write_text(json.dumps(meta))
    assert said in _cli_error(capsys, "pack", str(out), str(tmp_path / "again"))
    if field in ("format", "kind"):
        assert said in _cli_error(capsys, "info", str(out))


def test_writers_refuse_a_folder_of_other_files_and_publish_readable_modes(tmp_path, tok_file, capsys):
    """`spectra pack`/`save_model` into a folder replaced it whole, deleting files the user kept there; and the written
    model kept mkdtemp/mkstemp's 0700/0600, unreadable to another user (a server's) whatever the umask."""
    import os
    import stat

    from spectra.files import atomic_dir

    model = build_model(tiny_config(vocab_size=384), seed=0)
    mine = tmp_path / "mine"
    (mine / "other_model").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt, other_model\)"):
        save_model(model, mine, tokenizer=tok_file)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "other_model").is_dir()
    saved = save_model(model, tmp_path / "m", tokenizer=tok_file)
    tri_cfg = tiny_config(family="trilm", dim=256, glu_dim=512, n_heads=4, vocab_size=256)
    trilm = save_model(build_model(tri_cfg, seed=0), tmp_path / "t")
    assert "holds other files" in _cli_error(capsys, "pack", str(trilm), str(mine))
    save_model(model, saved, tokenizer=tok_file)  # a model folder is replaced, as before
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(model, empty, tokenizer=tok_file)
    with atomic_dir(tmp_path / "both") as tmp:  # `quantize --format both`: a folder of model folders
        for sub in ("gptq", "unpacked"):
            (tmp / sub).mkdir()
            (tmp / sub / "config.json").write_text("{}")
    with atomic_dir(tmp_path / "both") as tmp:
        (tmp / "config.json").write_text("{}")
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (saved, saved / "spectra.json", saved / "model.safetensors"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))
    write_json(tmp_path / "x.json", {})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
    # a marker file was enough: a Hugging Face clone (config.json beside README.md, .git, notes) was replaced whole,
    # and so was a folder holding only model folders (a collection, not `quantize --format both`)
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    for name in ("config.json", "README.md", "train_notes.txt"):
        (clone / name).write_text("{}")
    assert "holds other files (.git, README.md, config.json, ...)" in _cli_error(capsys, "export", "hf", str(saved),
                                                                                  str(clone))
    assert sorted(p.name for p in clone.iterdir()) == [".git", "README.md", "config.json", "train_notes.txt"]
    models = tmp_path / "models"
    for name in ("floatlm-a", "trilm-b"):
        save_model(model, models / name, tokenizer=tok_file)
    assert "holds other files (floatlm-a, trilm-b)" in _cli_error(capsys, "pack", str(trilm), str(models))
    assert sorted(p.name for p in models.iterdir()) == ["floatlm-a", "trilm-b"]


def test_writers_remove_what_a_killed_writer_left(tmp_path):
    """A writer killed by SIGKILL leaves its temporary folder or file (a whole model each, and nothing removed them:
    two `.hf.tmp-*` copies after killed `export hf` runs); the next writer of the same output removes those of
    processes that are gone on this machine, and leaves a live process's and other names' alone."""
    from spectra.files import _host_tag, atomic_dir, atomic_file, temporary_name

    dead, live, tag = 2**22 + 12345, os.getppid(), _host_tag()
    stale = [tmp_path / f".out.tmp-{tag}{dead}-x1", tmp_path / f".out.old-{tag}{dead}-x2",
             tmp_path / f".f.json.tmp-{tag}{dead}-x3"]
    kept = [tmp_path / f".out.tmp-{tag}{live}-x4", tmp_path / f".out.tmp-00000000{dead}-x5",  # another machine's
            tmp_path / f".other.tmp-{tag}{dead}-x6"]
    for p in stale[:2] + kept:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    stale[2].write_text("{")
    with atomic_dir(tmp_path / "out") as d:
        (d / "spectra.json").write_text("{}")
    with atomic_file(tmp_path / "f.json") as f:
        f.write("{}")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    name = temporary_name(tmp_path / "m.gguf", "gguf")
    assert name.name.startswith(f".m.gguf.tmp-{tag}{os.getpid()}-") and name.parent == tmp_path


def test_the_command_starts_without_torch_and_sigterm_is_one_line(tmp_path):
    """`import spectra` and building the command line import no torch (Ctrl-C in the first seconds was a traceback
    from inside torch's import; `spectra --help` took 2.7 s); SIGTERM ends a command in one line, exit 143, and its
    writer's temporary folder is removed (the default action left it)."""
    import signal
    import subprocess
    import sys
    import time

    code = "import sys, spectra, spectra.__main__ as m; m.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    env = dict(os.environ, SPECTRA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "spectra", "train", "--size", "trilm-1m", "--tokens", "1e9",
                             "--train.batch_tokens=2048", "--train.ckpt_every_tokens=2048", "--no-progress",
                             "--out", str(tmp_path / "run")], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "run" / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "spectra train: terminated", err
    assert "Traceback" not in err
    assert not list((tmp_path / "run").rglob(".*tmp*"))


def test_an_interrupt_between_the_two_renames_keeps_the_previous_version(tmp_path, monkeypatch):
    """atomic_dir replaces OUT in two renames (OUT away, the new one in); an interrupt between them put neither in
    place, and the next writer's sweep then deleted the hidden copy of the previous one. It goes back now."""
    from spectra import files

    with files.atomic_dir(tmp_path / "out") as d:
        (d / "spectra.json").write_text('{"v": 1}')
    real, calls = os.rename, []

    def rename(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as SIGTERM's handler raises, right after the first rename

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), files.atomic_dir(tmp_path / "out") as d:
        (d / "spectra.json").write_text('{"v": 2}')
    monkeypatch.setattr(files.os, "rename", real)
    assert (tmp_path / "out" / "spectra.json").read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
