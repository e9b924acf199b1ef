import pytest
import torch

from spectra.config import ModelConfig, from_name, size_names
from spectra.model import build_model
from tests.conftest import tiny_config


def test_named_sizes_exist_for_both_families():
    names = size_names()
    for size in ("tiny", "5m", "20m", "99m", "190m", "390m", "560m", "830m", "1.1b", "1.5b", "2.4b", "3.9b"):
        assert f"floatlm-{size}" in names and f"trilm-{size}" in names
    big = from_name("trilm-3.9b")
    assert (big.dim, big.glu_dim, big.n_heads, big.head_dim, big.n_layers, big.num_scale_shards) == (
        3072, 9216, 24, 128, 30, 6)
    assert from_name("floatlm-3.9b").num_scale_shards == 1
    assert from_name("trilm-1.1b").vocab_size == 50432  # padded to 128 x MP=2
    cfg = from_name("floatlm-99m")
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (50304, 2048, 10000.0, 1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=60, n_heads=7), "not divisible by n_heads"),
        (dict(family="bitlm"), "family must be one of"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(mlp_act="tanh"), "mlp_act must be one of"),
        (dict(family="trilm", num_scale_shards=3), "num_scale_shards"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(init_scheme="xavier"), "init_scheme must be one of"),
        (dict(family="floatlm", quantizer="bilm"), "apply to family 'trilm' only"),
        (dict(family="floatlm", quantizer_options={"bits": 4}), "apply to family 'trilm' only"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_a_floatlm_has_no_quantizer():
    """A FloatLM's linears are not quantized: its config refuses quantizer fields (they were accepted and ignored),
    becoming a FloatLM drops them, and metadata written before the check still loads."""
    from spectra.config import ModelConfig

    bilm = tiny_config(family="trilm", quantizer="bilm", quantizer_options={"stochastic_rounding": True})
    as_float = bilm.replace(family="floatlm")
    assert (as_float.quantizer, as_float.quantizer_options) == ("trilm", {})
    old = {**tiny_config(family="floatlm").to_dict(), "quantizer": "uniform", "quantizer_options": {"bits": 4}}
    cfg = ModelConfig.from_meta({"config": old}, "old/spectra.json")
    assert (cfg.family, cfg.quantizer, cfg.quantizer_options) == ("floatlm", "trilm", {})


def test_unknown_size_lists_accepted():
    with pytest.raises(ValueError, match="unknown model size 'trilm-7b'.*trilm-99m"):
        from_name("trilm-7b")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "hidden": 3})


def test_param_count_matches_paper_99m():
    from spectra.accounting import param_counts

    # paper Table 3 (exact parameter counts); the 190M entry is printed as 190.0M, we count 190.5M
    paper = {"99m": 99.74e6, "190m": 190.0e6, "390m": 392.4e6, "560m": 569.2e6, "830m": 834.0e6, "1.1b": 1.149e9,
             "1.5b": 1.515e9, "2.4b": 2.461e9, "3.9b": 3.989e9}
    for size, n in paper.items():
        assert param_counts(from_name(f"trilm-{size}"))["params"] == pytest.approx(n, rel=3e-3), size
    model = build_model(tiny_config(family="trilm"))
    assert model.num_params() == param_counts(tiny_config())["params"]
    assert model.num_params(non_embedding=True) == param_counts(tiny_config())["non_embedding_params"]


def test_seeded_init_is_deterministic_and_scaled():
    a, b = build_model(tiny_config(), seed=3), build_model(tiny_config(), seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    w = build_model(tiny_config(dim=256, glu_dim=512), seed=0).layers[0].mlp.up_proj.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(a.layers[0].input_layernorm.weight, torch.ones(64))


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_scaled_init_shrinks_only_the_branch_outputs(family):
    """init_scheme "scaled": o_proj and down_proj ~ N(0, (init_std / sqrt(2 L))²); every other matrix, the draw order
    and so the random stream are those of "normal" (the branch outputs are the normal draws times 1 / sqrt(2 L))."""
    cfg = dict(dim=256, glu_dim=512, n_layers=3, family=family)
    normal = dict(build_model(tiny_config(**cfg), seed=5).named_parameters())
    scaled = dict(build_model(tiny_config(init_scheme="scaled", **cfg), seed=5).named_parameters())
    shrink = (2 * 3) ** -0.5
    for name, p in scaled.items():
        branch_out = name.endswith(("o_proj.weight", "down_proj.weight"))
        torch.testing.assert_close(p, normal[name] * (shrink if branch_out else 1.0), rtol=1e-6, atol=0, msg=name)
    assert scaled["layers.2.mlp.down_proj.weight"].std().item() == pytest.approx(0.02 * shrink, rel=0.03)


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_kv_cache_matches_full_forward(family):
    torch.manual_seed(0)
    model = build_model(tiny_config(family=family)).eval()
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 64)
        parts = [model(idx[:, :17], cache=cache), model(idx[:, 17:18], cache=cache), model(idx[:, 18:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 40


def test_sequence_too_long_is_an_error():
    model = build_model(tiny_config(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("norm,act", [("layernorm", "swiglu"), ("rmsnorm", "gelu"), ("rmsnorm", "relu")])
def test_ablation_architectures_train(norm, act):
    torch.manual_seed(0)
    model = build_model(tiny_config(norm=norm, mlp_act=act, family="trilm"))
    if act != "swiglu":
        assert not hasattr(model.layers[0].mlp, "gate_proj")
    idx = torch.randint(0, 256, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_flops_per_token():
    cfg = tiny_config()
    model = build_model(cfg)
    n = model.num_params() - model.embed_tokens.weight.numel()
    assert model.flops_per_token(128) == 6 * n + 12 * 2 * 4 * 16 * 128


def _attention_outputs(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_causal_attention_matches_sdpa(dtype):
    """The CPU training kernel: output and all three gradients against SDPA in float64; in bf16 its error is no more
    than 1.5x that of torch's own (flash) kernel on the same inputs."""
    import torch.nn.functional as F

    from spectra.kernels.attention import causal_attention, dense_causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(2, 3, 37, 16, generator=gen) for _ in range(4))
    ref = _attention_outputs(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True),
                             *(t.double() for t in (q, k, v)), g.double())
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ours = _attention_outputs(dense_causal_attention, q, k, v, g)
    assert ours[0].shape == ref[0].shape
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        flash = _attention_outputs(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), q, k, v, g)
        for a, f, b in zip(ours, flash, ref):
            assert (a - b).abs().max() <= 1.5 * (f - b).abs().max() + 1e-6
    # causal_attention takes the dense path only when a gradient is wanted
    with torch.no_grad():
        torch.testing.assert_close(causal_attention(q, k, v), ours[0].to(dtype), rtol=2e-2, atol=2e-2)


def _bhtd(B, H, T, D, gen, transposed=False):
    """A (B, H, T, D) bf16 tensor; transposed: a view of a (B, T, H, D) one, as the attention layer passes it."""
    if transposed:
        return torch.randn(B, T, H, D, generator=gen).to(torch.bfloat16).transpose(1, 2)
    return torch.randn(B, H, T, D, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 2, 100, 48), (2, 4, 256, 64), (1, 1, 130, 128)])
def test_dense_attention_bf16_error_against_flash(shape, use_kernel):
    """bf16 training attention against float64, output and all three gradients: RMS error at most 1.25x (the C
    kernel; the torch path, which rounds dP to bf16, 1.5x) and max error at most 2x those of torch's flash kernel on
    the same inputs."""
    import torch.nn.functional as F

    from spectra.kernels.attention import attention_kernel, dense_causal_attention

    if use_kernel and attention_kernel() is None:
        pytest.skip("no AVX-512 BF16 attention kernel on this machine")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_bhtd(*shape, gen, transposed=True) for _ in range(3))
    g = torch.randn(*shape, generator=gen)
    sdpa = lambda *a: F.scaled_dot_product_attention(*a, is_causal=True)  # noqa: E731
    ref = _attention_outputs(sdpa, *(t.double() for t in (q, k, v)), g.double())
    flash = _attention_outputs(sdpa, q, k, v, g)
    ours = _attention_outputs(lambda *a: dense_causal_attention(*a, use_kernel=use_kernel), q, k, v, g)
    for name, a, f, b in zip(("out", "dq", "dk", "dv"), ours, flash, ref):
        rms, rms_flash = (a - b).pow(2).mean().sqrt(), (f - b).pow(2).mean().sqrt()
        assert rms <= (1.25 if use_kernel else 1.5) * rms_flash, (name, float(rms), float(rms_flash))
        assert (a - b).abs().max() <= 2 * (f - b).abs().max(), name


def test_attention_kernel_probabilities_and_strides():
    """The kernel's saved P is softmax(q kᵀ/√D) with the causal mask, rounded once to bf16 (exact zeros above the
    diagonal), and its results do not depend on the inputs' strides."""
    from spectra.kernels.attention import _DenseCausalAttention, attention_kernel

    if attention_kernel() is None:
        pytest.skip("no AVX-512 BF16 attention kernel on this machine")
    B, H, T, D = 2, 3, 45, 32
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_bhtd(B, H, T, D, gen, transposed=True) for _ in range(3))

    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    ctx = Ctx()
    out = _DenseCausalAttention.forward(ctx, q, k, v, True)
    probs = ctx.saved_tensors[3].double()
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    want = torch.softmax(s + torch.full((T, T), float("-inf")).triu(1), -1).reshape(B * H, T, T)
    assert torch.equal(probs.triu(1), torch.zeros_like(probs))
    assert ((probs - want).abs() <= 2**-8 * want + 1e-30).all()  # one bf16 rounding of float32 values
    ctx2 = Ctx()
    out2 = _DenseCausalAttention.forward(ctx2, q.contiguous(), k.contiguous(), v.contiguous(), True)
    assert torch.equal(out, out2) and torch.equal(ctx2.saved_tensors[3], ctx.saved_tensors[3])
    g = torch.randn(B, H, T, D, generator=gen).to(torch.bfloat16)
    grads = _DenseCausalAttention.backward(ctx, g.transpose(1, 2).contiguous().transpose(1, 2))
    grads2 = _DenseCausalAttention.backward(ctx2, g)
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads2[:3]))


def test_training_attention_uses_the_kernel(monkeypatch):
    """A bf16 training step on CPU goes through the attention kernel when the machine has one."""
    import spectra.kernels.attention as model_mod

    ext = model_mod.attention_kernel()
    if ext is None:
        pytest.skip("no AVX-512 BF16 attention kernel on this machine")
    calls = []

    class Counting:
        def attention_forward(self, *a):
            calls.append("forward")
            return ext.attention_forward(*a)

        def attention_backward(self, *a):
            calls.append("backward")
            return ext.attention_backward(*a)

    monkeypatch.setattr(model_mod, "attention_kernel", lambda: Counting())
    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx).float().mean()
    loss.backward()
    assert calls == ["forward"] * cfg.n_layers + ["backward"] * cfg.n_layers


def test_training_forward_matches_inference_forward():
    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa = model(idx)
    dense = model(idx)  # parameters require grad: the dense CPU kernel
    assert dense.requires_grad
    torch.testing.assert_close(dense.detach(), sdpa, rtol=1e-5, atol=1e-5)


def test_loading_skips_the_random_init(tmp_path, monkeypatch):
    """spectra.load builds the model without initialising it (empty_model) and gives the saved model's logits."""
    from spectra.checkpoint import save_model
    from spectra.loading import load
    from spectra.model import Transformer, empty_model

    cfg = tiny_config()
    model = build_model(cfg, seed=3).eval()
    save_model(model, tmp_path / "m")
    fresh = empty_model(cfg)
    torch.testing.assert_close(fresh.rope_cos, model.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(fresh.rope_sin, model.rope_sin, rtol=0, atol=0)

    def no_init(self, seed=None):
        if self.embed_tokens.weight.device.type != "meta":
            raise AssertionError("random init while loading")

    monkeypatch.setattr(Transformer, "reset_parameters", no_init)
    loaded = load(tmp_path / "m")
    idx = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_causal_attention_dispatch(monkeypatch):
    """Dense kernel only when training on CPU within the length and probability-count limits; SDPA otherwise."""
    import spectra.kernels.attention as model_mod

    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    assert "DenseCausalAttention" in type(model_mod.causal_attention(q, k, v).grad_fn).__name__
    with torch.no_grad():
        assert model_mod.causal_attention(q, k, v).grad_fn is None
    monkeypatch.setattr(model_mod, "DENSE_ATTENTION_MAX_PROBS", 2 * 3 * 16 * 16 - 1)
    assert "DenseCausalAttention" not in type(model_mod.causal_attention(q, k, v).grad_fn).__name__
    monkeypatch.setattr(model_mod, "DENSE_ATTENTION_MAX_PROBS", 1 << 25)
    monkeypatch.setattr(model_mod, "DENSE_ATTENTION_MAX_LEN", 15)
    assert "DenseCausalAttention" not in type(model_mod.causal_attention(q, k, v).grad_fn).__name__
