"""Explicit inference caches (spectra.layers): a frozen layer keeps W̃ until train(), load_state_dict, set_exact or an
optimizer step drops it; nothing is keyed on tensor versions or pointers, so none of the old stale cases remain."""

import pytest
import torch
from torch import nn

from spectra.config import ModelConfig
from spectra.layers import TernaryLinear, freeze_for_inference, inference_cache_bytes
from spectra.model import build_model
from spectra.ternary import dequantize, ternarize


def _layer(seed=0, shards=1):
    torch.manual_seed(seed)
    layer = TernaryLinear(64, 32, num_shards=shards)
    return layer


def _expected(layer, x):
    codes, scales = ternarize(layer.weight, layer.num_shards, layer.shard_dim)
    return x @ dequantize(codes, scales, layer.shard_dim).T


@torch.no_grad()
def test_unfrozen_eval_layer_follows_in_place_edits():
    layer = _layer().eval()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=0)
    layer.weight.data.copy_(torch.randn(32, 64))  # changes neither _version nor data_ptr of the Parameter
    torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=0)
    assert layer._frozen is None and inference_cache_bytes(layer) == 0


@torch.no_grad()
def test_frozen_layer_keeps_its_weight_until_train():
    layer = _layer()
    freeze_for_inference(layer)
    x = torch.randn(3, 64)
    before = layer(x)
    assert inference_cache_bytes(layer) == 32 * 64 * (4 + 1) + 4  # W̃ float32, codes int8, one scale
    new = torch.randn(32, 64)
    layer.weight.data.copy_(new)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)  # frozen means frozen
    layer.train()
    layer.eval()
    torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=0)
    assert not torch.equal(layer(x), before)


@torch.no_grad()
def test_load_state_dict_drops_the_frozen_weight():
    layer = freeze_for_inference(_layer(0))
    other = _layer(1)
    x = torch.randn(3, 64)
    layer(x)
    layer.load_state_dict(other.state_dict())
    assert layer._frozen is None
    torch.testing.assert_close(layer(x), _expected(other, x), rtol=0, atol=0)


def test_optimizer_step_drops_the_frozen_weight():
    model = build_model(ModelConfig(vocab_size=128, dim=64, n_layers=1, n_heads=2, glu_dim=128, max_seq_len=16,
                                    family="trilm"), seed=0)
    freeze_for_inference(model)
    idx = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        before = model(idx)
    q = model.layers[0].self_attn.q_proj
    assert q._frozen is not None
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    model(idx).sum().backward()  # eval mode with grad: the straight-through path
    opt.step()
    assert q._frozen is None  # the global step hook saw q's parameter updated
    with torch.no_grad():
        after = model(idx)
        fresh = build_model(model.config, seed=0)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, fresh.eval()(idx), rtol=0, atol=0)
    assert not torch.equal(before, after)


def test_optimizer_of_other_parameters_keeps_the_freeze():
    layer = freeze_for_inference(_layer())
    other = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([other], lr=1.0)
    other.grad = torch.ones(3)
    opt.step()
    assert layer._frozen is not None


@torch.no_grad()
def test_set_exact_is_kept_through_dtype_moves():
    layer = _layer(shards=2)
    codes = torch.randint(-1, 2, (32, 64), dtype=torch.int8)
    scales = torch.tensor([0.25, 0.5])
    layer.set_exact(codes, scales)
    layer.eval()
    x = torch.randn(3, 64)
    exact = x @ dequantize(codes, scales, 0).T
    torch.testing.assert_close(layer(x), exact, rtol=0, atol=0)
    layer.to(torch.bfloat16).to(torch.float32)  # exact codes and scales survive, W̃ rebuilt from them
    torch.testing.assert_close(layer(x), exact, rtol=0, atol=0)
    assert torch.equal(layer.codes_and_scales()[0], codes)


# ---- recomputing W̃ in backward (training memory) ------------------------------------------------------------------


def _step(model, idx, precision: str, recompute: bool):
    """Loss and gradients of one forward/backward, and the bytes autograd saved (`_saved_bytes`: each storage
    once, parameters left out, the layer's own hooks seen through)."""
    from spectra.layers import set_recompute_weight
    from tests.test_train_dist import _saved_bytes

    set_recompute_weight(model, recompute)
    model.zero_grad(set_to_none=True)
    out = {}

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(idx[:, :-1])
        out["loss"] = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())

    saved = _saved_bytes(forward, model.parameters())
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["trilm", "shards2", "warmup", "uniform4", "progressive"])
def test_recomputed_ternary_weight_gives_bit_identical_gradients_and_saves_less(precision, variant):
    """The same loss and every gradient bit for bit (torch.equal) with W̃ rebuilt in backward as with W̃ kept, in
    fp32 and under bf16 autocast, and autograd saves less by about one W̃ (or its bf16 copy) per ternary layer."""
    from spectra.quantizers import set_progress
    from spectra.train.warmup import set_quant_mix

    kw = {"trilm": {}, "shards2": {"num_scale_shards": 2}, "warmup": {}, "uniform4": {
        "quantizer": "uniform", "quantizer_options": {"bits": 4}},
        "progressive": {"quantizer_options": {"progressive": [[0.0, 8], [0.5, 1.58]]}}}[variant]
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, glu_dim=128, vocab_size=256, family="trilm", max_seq_len=32,
                      **kw)
    model = build_model(cfg, seed=0)
    if variant == "warmup":
        set_quant_mix(model, 0.5)
    if variant == "progressive":
        set_progress(model, 0.1)
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a, saved_a = _step(model, idx, precision, recompute=False)
    loss_b, grads_b, saved_b = _step(model, idx, precision, recompute=True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    w_bytes = sum(m.weight.numel() for m in layers) * (2 if precision == "bf16" else 4)
    assert saved_a - saved_b == w_bytes, (saved_a, saved_b, w_bytes)
