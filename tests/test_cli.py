import json
import subprocess
import sys

import pytest

from spectra.__main__ import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "spectra", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("init", "info", "export"):
        assert cmd in out


def test_init_info_export(tmp_path, capsys):
    assert main(["init", "trilm-tiny", str(tmp_path / "m"), "--seed", "3", "--vocab-size", "512"]) == 0
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["family"] == "trilm" and report["kind"] == "model"
    assert report["params"] == 2 * 512 * 256 + 2 * (4 * 256 * 256 + 3 * 256 * 512) + 5 * 256
    assert main(["export", "hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0


def test_info_size_name_json(capsys):
    assert main(["info", "trilm-3.9b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"params", "non_embedding_params", "bits"}
    assert report["bits"]["trilm"] / 1e9 == pytest.approx(10.76, abs=0.05)


def test_errors_are_clear(tmp_path, capsys):
    assert main(["info", "trilm-7b"]) == 2
    assert "unknown model size 'trilm-7b'" in capsys.readouterr().err
    assert main(["init", "trilm-huge", str(tmp_path / "x")]) == 2
    assert main(["export", "hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_torchrun_worker_exits_with_its_output_and_status():
    """Under torchrun (WORLD_SIZE > 1) `python -m spectra` leaves through os._exit after the command (the interpreter's
    teardown aborted 2-process gloo runs now and then): what it printed to a pipe still arrives whole, and the exit
    status is the command's, 0 or 2 for a user's mistake."""
    import os

    def spectra(*args, world):
        env = {**os.environ, "WORLD_SIZE": world}
        return subprocess.run([sys.executable, "-m", "spectra", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    alone, worker = spectra("info", "trilm-99m", world="1"), spectra("info", "trilm-99m", world="2")
    assert worker.returncode == alone.returncode == 0
    assert worker.stdout == alone.stdout and "trilm-99m" in worker.stdout
    bad = spectra("info", "no-such-model", world="2")
    assert bad.returncode == 2 and bad.stderr.startswith("spectra info: error:")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C printed a 17-66 line traceback and exited 1 in every command (a CLI review, 2026-12-07)."""
    import spectra.accounting
    from spectra.__main__ import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spectra.accounting, "size_report", interrupted)
    assert main(["info", "trilm-1m"]) == 130
    assert capsys.readouterr().err == "spectra info: interrupted\n"
