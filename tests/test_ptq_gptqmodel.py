"""Optional cross-check: our GPTQ checkpoints load in GPTQModel 7.6.0 and give our logits.

Skipped unless `gptqmodel==7.6.0` is importable. GPTQModel is heavy and pins its own torch/transformers, so it lives
in its own virtualenv; run this file there with spectra on the path, e.g.
    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=src:. /work/venv-gptq/bin/python -m pytest -q tests/test_ptq_gptqmodel.py
"""

import os

import pytest
import torch

import spectra
from spectra.model import build_model
from spectra.ptq import quantize_model, save_gptq
from tests.conftest import tiny_config

gptqmodel = pytest.importorskip("gptqmodel")
if gptqmodel.__version__ != "7.6.0":
    pytest.skip(f"needs gptqmodel 7.6.0, found {gptqmodel.__version__}", allow_module_level=True)


@pytest.mark.parametrize("bits,group,act", [(4, 64, False), (3, 32, True), (8, 128, False), (6, -1, False)])
def test_gptqmodel_loads_our_checkpoint(tmp_path, bits, group, act):
    from gptqmodel import GPTQModel

    from tests.test_ptq_model import _word_tokenizer

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    model = build_model(tiny_config(dim=128, glu_dim=256), seed=1).eval()
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, bits=bits, group_size=group, act_order=act, progress=False)
    out = save_gptq(model, tmp_path / "q", tokenizer=_word_tokenizer(tmp_path / "tokenizer.json"))
    theirs = GPTQModel.load(str(out), device="cpu", backend="torch")  # its torch kernel computes in fp16
    ours = spectra.load(out)
    # Their dequantized weights (their unpacking and zero-point conventions) against ours, matrix by matrix.
    n = 0
    for name, module in ours.named_modules():
        if hasattr(module, "qweight"):
            theirs_layer = theirs.model.get_submodule(f"model.{name}")
            W_theirs = theirs_layer.dequantize_weight().T  # theirs is (in, out), in their compute dtype
            eps = torch.finfo(W_theirs.dtype).eps
            W_ours = module.dequantize_weight()
            # equal up to one rounding of their dtype (a code or zero-point off by one would be >= 1/2^(bits-1))
            assert ((W_theirs.float() - W_ours).abs() <= 1.5 * eps * W_ours.abs()).all(), (name, W_theirs.dtype)
            n += 1
    assert n == 14
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = theirs.model(input_ids=idx).logits.float()
        want = ours(idx)
    assert (got - want).norm() / want.norm() < 2e-2  # their torch kernel computes in fp16, ours in fp32
