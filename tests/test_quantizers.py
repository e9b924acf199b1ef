import math

import pytest
import torch
import torch.nn.functional as F

import spectra
from spectra.checkpoint import save_model
from spectra.layers import TernaryLinear
from spectra.loading import load
from spectra.quantizers import (
    QUANTIZER_CLASSES,
    Quantizer,
    absmax_quantize_activations,
    bits_per_weight,
    build_quantizer,
    set_progress,
    stochastic_round,
)
from spectra.ternary import dequantize, ternarize

# mean|W| = 5/8 = 0.625, mean W = -2/8 = -0.25 (two entries equal the mean: sign(0) -> +1), all exact in binary
W_A = torch.tensor([[0.75, -0.25, 0.5, -1.0], [-0.25, 0.25, -1.5, -0.5]])
# max|W| = 1.4, no rounding ties for k = 2, 3, 8
W_U = torch.tensor([[0.8, -0.1, 0.33, -0.62], [0.0, 0.27, -1.4, 0.06]])

PROGRESSIVE = [[0.0, 16], [0.25, 8], [0.5, 4], [0.75, 1.58]]


def test_trilm_hand_computed_and_unchanged():
    codes, scales = build_quantizer("trilm").codes_and_scales(W_A)
    # γ = 0.625 + 1e-5; W/γ = [1.2, -0.4, 0.8, -1.6], [-0.4, 0.4, -2.4, -0.8] -> clip, round
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, -1, -1]] and codes.dtype == torch.int8
    assert scales.tolist() == pytest.approx([0.62501], abs=1e-7)
    # the default path is spectra.ternary's reference functions, bit for bit
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q = build_quantizer("trilm", num_shards=2, dim=1)
    ref_codes, ref_scales = ternarize(W, 2, 1)
    c, s = q.codes_and_scales(W)
    assert torch.equal(c, ref_codes) and torch.equal(s, ref_scales)
    assert torch.equal(q.forward_weight(W), dequantize(ref_codes, ref_scales, 1))
    # the general path (a one-stage progressive schedule) gives the same codes and scales
    c2, s2 = build_quantizer("trilm", num_shards=2, dim=1, progressive=[[0.0, "trilm"]]).codes_and_scales(W)
    assert torch.equal(c2, ref_codes)
    torch.testing.assert_close(s2, ref_scales, rtol=1e-6, atol=0)


def test_bitnet158_weights_hand_computed():
    codes, scales = build_quantizer("bitnet158").codes_and_scales(W_A)
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, -1, -1]]
    assert scales.tolist() == [0.625]  # max(mean|W|, 1e-5), no ε added
    # tiny weights: trilm adds ε (3e-5), bitnet clamps at ε (mean 2e-5 stays 2e-5)
    tiny = torch.tensor([[2e-5, -2e-5]])
    assert build_quantizer("trilm").codes_and_scales(tiny)[1].item() == pytest.approx(3e-5, rel=1e-5)
    assert build_quantizer("bitnet158").codes_and_scales(tiny)[1].item() == pytest.approx(2e-5, rel=1e-5)
    assert build_quantizer("bitnet158").codes_and_scales(torch.zeros(2, 2))[1].item() == pytest.approx(1e-5)


def test_bitnet158_activations_hand_computed():
    x = torch.tensor([[0.3, -1.0, 0.25, 0.1], [2.0, 0.5, -0.01, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # token 1: a = 127/1 -> [38.1, -127, 31.75, 12.7] -> [38, -127, 32, 13]/127
    # token 2: a = 127/2 = 63.5 -> [127, 31.75, -0.635, 0] -> [127, 32, -1, 0]/63.5 ; token 3: all zero stays zero
    expected = torch.tensor([[38 / 127, -1.0, 32 / 127, 13 / 127], [2.0, 32 / 63.5, -1 / 63.5, 0.0], [0.0] * 4])
    torch.testing.assert_close(absmax_quantize_activations(x), expected)
    # straight through: the gradient reaches x unchanged
    x.requires_grad_(True)
    g = torch.randn(3, 4)
    absmax_quantize_activations(x).backward(g)
    torch.testing.assert_close(x.grad, g)


def test_bitnet158_layer_norms_then_quantizes_input():
    torch.manual_seed(0)
    layer = TernaryLinear(8, 4, quantizer="bitnet158")
    assert [n for n, _ in layer.named_parameters()] == ["weight", "input_norm.weight"]
    with torch.no_grad():
        layer.input_norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 4)
    y = layer(x)
    # restatement: RMSNorm with weight, then 8-bit absmax per token, then x̃ W̃ᵀ
    xd = x.detach().requires_grad_(True)
    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.input_norm.weight.detach()
    a = 127 / xn.detach().abs().amax(-1, keepdim=True)
    xq = xn + (torch.round(xn.detach() * a) / a - xn).detach()
    gamma = layer.weight.detach().abs().mean().clamp(min=1e-5)
    W_q = torch.round(torch.clamp(layer.weight.detach() / gamma, -1, 1)) * gamma
    y_ref = xq @ W_q.t()
    torch.testing.assert_close(y, y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.weight.grad, g.t() @ xq.detach())  # STE to the latent weight
    torch.testing.assert_close(x.grad, xd.grad)  # STE through the activation quantizer, then the norm
    # eval mode (cached weight) gives the same output
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ref)


def test_bilm_hand_computed():
    codes, scales = build_quantizer("bilm").codes_and_scales(W_A)
    # W - mean W = [1, 0, 0.75, -0.75], [0, 0.5, -1.25, -0.25]; sign(0) = +1
    assert codes.tolist() == [[1, 1, 1, -1], [1, 1, -1, -1]]
    assert scales.tolist() == [0.625]  # α = mean|W| (of W, not of W - mean W), no ε
    # two shards along the input dim: columns 0-1 (mean 0.125, α 0.375), columns 2-3 (mean -0.625, α 0.875)
    codes, scales = build_quantizer("bilm", num_shards=2, dim=1).codes_and_scales(W_A)
    assert codes.tolist() == [[1, -1, 1, -1], [-1, 1, -1, 1]]
    assert scales.tolist() == [0.375, 0.875]


def test_twn_hand_computed():
    q = build_quantizer("twn")
    codes, scales = q.codes_and_scales(W_A)
    # Δ = 0.7 * 0.625 = 0.4375: |W| = 0.25 -> 0; kept |W| = 0.75, 0.5, 1.0, 1.5, 0.5 -> α = 4.25/5 = 0.85
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, -1, -1]]
    assert scales.tolist() == pytest.approx([0.85])
    codes, scales = build_quantizer("twn", threshold=1.0).codes_and_scales(W_A)  # Δ = 0.625
    assert codes.tolist() == [[1, 0, 0, -1], [0, 0, -1, 0]]
    assert scales.tolist() == pytest.approx([(0.75 + 1.0 + 1.5) / 3])
    codes, scales = q.codes_and_scales(torch.zeros(2, 3))  # nothing kept: zero codes, zero scale, no NaN
    assert codes.abs().sum() == 0 and scales.tolist() == [0.0]


@pytest.mark.parametrize(
    "bits,codes,scale",
    [
        # Q = 2^(k-1) - 1, s = max|W| / Q = 1.4 / Q
        (2, [[1, 0, 0, 0], [0, 0, -1, 0]], 1.4),  # W/s = [0.57, -0.07, 0.24, -0.44], [0, 0.19, -1, 0.04]
        (3, [[2, 0, 1, -1], [0, 1, -3, 0]], 1.4 / 3),  # W/s = [1.71, -0.21, 0.71, -1.33], [0, 0.58, -3, 0.13]
        (8, [[73, -9, 30, -56], [0, 24, -127, 5]], 1.4 / 127),  # W/s = [72.57, -9.07, 29.94, -56.24], ...
    ],
)
def test_uniform_hand_computed(bits, codes, scale):
    q = build_quantizer("uniform", bits=bits)
    c, s = q.codes_and_scales(W_U)
    assert c.tolist() == codes and c.dtype == torch.int8
    assert s.tolist() == pytest.approx([scale], rel=1e-6)
    assert q.bits == bits
    torch.testing.assert_close(q.forward_weight(W_U), torch.tensor(codes, dtype=torch.float32) * s)


ALL = [
    ("trilm", {}),
    ("bitnet158", {}),
    ("bilm", {}),
    ("twn", {}),
    ("uniform", {"bits": 4}),
    ("trilm", {"stochastic_rounding": True}),
    ("uniform", {"bits": 3, "progressive": [[0.0, 8], [0.5, 3]]}),
]


@pytest.mark.parametrize("name,options", ALL)
def test_straight_through_gradients(name, options):
    torch.manual_seed(0)
    layer = TernaryLinear(16, 8, num_shards=2, shard_dim=1, quantizer=name, quantizer_options=options)
    layer.quantizer.eval()  # nearest rounding, so the forward weight is reproducible
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 8)
    layer(x).backward(g)
    x_in = x.detach() if name != "bitnet158" else None
    if x_in is None:  # bitnet158: the input is normalised and quantized first
        x_in = absmax_quantize_activations(layer.input_norm(x.detach())).detach()
    W_q = layer.quantizer.dequantize(*layer.quantizer.codes_and_scales(layer.weight))
    # the latent weight receives exactly ∂L/∂W̃ = gᵀ x̃, as if the quantizer were the identity
    torch.testing.assert_close(layer.weight.grad, g.t() @ x_in)
    if name != "bitnet158":
        torch.testing.assert_close(x.grad, g @ W_q)


def lsq_reference(quantizer: Quantizer, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """∂L/∂a for s = a·s₀ (one shard): Σ G·(Ŵ − v·[|v| ≤ Q])·s₀ for clip-and-round schemes, Σ G·Ŵ·s₀ otherwise."""
    scheme = quantizer.scheme
    s0 = scheme.scales(W)
    s = s0 * quantizer.scale.detach()
    codes = scheme.codes(W, s).float()
    dW_ds = codes.clone()
    if scheme.qmax is not None:
        v = W / s
        dW_ds -= v * (v.abs() <= scheme.qmax)
    return (G * dW_ds).sum() * s0


@pytest.mark.parametrize("name,options", [("trilm", {}), ("bilm", {}), ("twn", {}), ("uniform", {"bits": 3})])
def test_learnable_scale_receives_lsq_gradient(name, options):
    torch.manual_seed(0)
    layer = TernaryLinear(16, 8, quantizer=name, quantizer_options={**options, "learnable_scale": True})
    assert layer.quantizer.scale.tolist() == [1.0]
    with torch.no_grad():
        layer.quantizer.scale.fill_(0.8)  # not 1, so the scale actually changes the codes
    s = layer.quantizer.scheme.scales(layer.weight.detach()) * 0.8
    codes = layer.quantizer.scheme.codes(layer.weight.detach(), s)
    x = torch.randn(5, 16)
    g = torch.randn(5, 8)
    y = layer(x)
    torch.testing.assert_close(y, x @ (codes.float() * s).t())  # forward uses s = a·s₀
    y.backward(g)
    G = g.t() @ x
    torch.testing.assert_close(layer.weight.grad, G)  # latent weight: plain straight-through
    grad = layer.quantizer.scale.grad
    assert grad is not None and grad.abs().item() > 0
    torch.testing.assert_close(grad, lsq_reference(layer.quantizer, layer.weight.detach(), G).reshape(1))


def test_learnable_scale_in_model_trains_and_eval_cache_follows_it():
    cfg = spectra.from_name("trilm-tiny", vocab_size=256, quantizer_options={"learnable_scale": True})
    model = spectra.build_model(cfg)
    scales = [n for n, _ in model.named_parameters() if n.endswith("quantizer.scale")]
    assert len(scales) == 2 * 7 and "layers.0.self_attn.q_proj.quantizer.scale" in scales
    idx = torch.randint(0, 256, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in scales)
    layer = model.layers[0].mlp.down_proj.eval()
    x = torch.randn(3, cfg.glu_dim)
    with torch.no_grad():
        y1 = layer(x)
        layer.quantizer.scale.mul_(0.5)  # an optimizer step, in place
        codes, s = layer.quantizer.codes_and_scales(layer.weight)
        torch.testing.assert_close(layer(x), x @ (codes.float() * s).t())
        assert not torch.allclose(layer(x), y1)


def test_stochastic_round_keeps_integers_and_stays_in_the_grid(monkeypatch):
    """floor(x + U) in float32 turned x = 1 into 2 when U rounded 1 + U up to 2 (U ≥ 1 − 2^-25: 1 draw in 2^24): a
    ternary code of 2, a BiLM code of 3, and at the 16-bit progressive stage a code of 32768 that int16 wrapped to
    the layer's largest weight negated. Every draw below is U = 1 − 2^-24, the largest float32 below 1."""
    top = 1 - 2**-24
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.full(tuple(size), top, dtype=kw.get("dtype")))
    x = torch.tensor([1.0, -1.0, 32767.0, 127.0, 0.5, -0.25])
    assert stochastic_round(x).tolist() == [1.0, -1.0, 32767.0, 127.0, 0.0, -1.0]  # up only where U < frac(x)
    q = build_quantizer("trilm", stochastic_rounding=True, progressive=[[0.0, 16], [0.5, 1.58]])
    q.train()
    q.set_progress(0.0)
    W = torch.tensor([[1.0, -0.5, 0.25, 0.1]])
    assert q.forward_weight(W)[0, 0] > 0.99  # the largest weight keeps its sign (it came out as -1.00003)
    b = build_quantizer("bilm", stochastic_rounding=True)
    b.train()
    W = torch.tensor([[3.0, -3.0, 3.0, -3.0]])
    assert set((b.forward_weight(W) / 3.0).tolist()[0]) == {-1.0, 1.0}


def test_stochastic_round_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([0.3, -0.6, 1.75, -2.2, 0.0, 5.0, 0.999])
    n = 20000
    samples = stochastic_round(x.expand(n, -1).contiguous(), generator=gen)
    assert torch.equal(samples - torch.floor(x), (samples - torch.floor(x)).clamp(0, 1))  # floor or ceil only
    assert torch.equal(samples[:, 4], torch.zeros(n)) and torch.equal(samples[:, 5], torch.full((n,), 5.0))
    # σ of a mean of n Bernoulli draws ≤ 0.5/√n = 0.0035: a tolerance of 0.015 is over 4σ
    torch.testing.assert_close(samples.mean(0), x, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "name,options,expected",
    [
        # trilm: E[Ŵ] = clip(W/γ, -1, 1)
        ("trilm", {}, lambda W, s: torch.clamp(W / s, -1, 1)),
        # uniform 3-bit: E[Ŵ] = W/s (inside [-Q, Q] by construction)
        ("uniform", {"bits": 3}, lambda W, s: W / s),
        # bilm: E[Ŵ] = clip((W - mean W)/α, -1, 1)
        ("bilm", {}, lambda W, s: torch.clamp((W - W.mean()) / s, -1, 1)),
    ],
)
def test_stochastic_rounding_in_quantizer_is_unbiased(name, options, expected):
    torch.manual_seed(0)
    q = build_quantizer(name, stochastic_rounding=True, **options)
    n = 4000
    mean = sum(q.forward_weight(W_U) for _ in range(n)) / n
    _, s = q.codes_and_scales(W_U)
    # each entry is s·(mean of n draws of a two-point variable one step apart): σ ≤ s/(2√n) ≈ 0.008·s; tolerance 5σ
    torch.testing.assert_close(mean / s, expected(W_U, s), atol=0.04, rtol=0)
    # draws differ from each other, while eval mode rounds to nearest
    assert not torch.equal(q.forward_weight(W_U), q.forward_weight(W_U))
    q.eval()
    torch.testing.assert_close(q.forward_weight(W_U), q.dequantize(*q.codes_and_scales(W_U)))


def test_progressive_schedule_switches_at_fractions():
    q = build_quantizer("trilm", progressive=PROGRESSIVE)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    expected = [(0.0, 16), (0.2499, 16), (0.25, 8), (0.4999, 8), (0.5, 4), (0.7499, 4), (0.75, 1.58), (1.0, 1.58)]
    for fraction, bits in expected:
        q.set_progress(fraction)
        assert round(q.current_bits, 2) == bits, fraction
        codes, scales = q.codes_and_scales(W)
        if bits == 1.58:
            ref_codes, ref_scales = ternarize(W)
            assert torch.equal(codes, ref_codes)
            torch.testing.assert_close(scales, ref_scales)
        else:  # uniform k-bit: s = max|W|/Q, codes reach ±Q exactly
            Q = 2 ** (bits - 1) - 1
            assert scales.item() == pytest.approx(W.abs().max().item() / Q, rel=1e-6)
            assert codes.abs().max().item() == Q
            torch.testing.assert_close(codes.float(), torch.round(W / scales), atol=0, rtol=0)
    assert q.bits == pytest.approx(math.log2(3))  # what the model counts as: its final stage


def test_progressive_schedule_in_model_and_saved_with_it(tmp_path):
    cfg = spectra.from_name("trilm-tiny", vocab_size=256, quantizer_options={"progressive": PROGRESSIVE})
    model = spectra.build_model(cfg).eval()
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert len(quantizers) == 14
    idx = torch.randint(0, 256, (1, 8))
    outputs = {}
    for fraction, bits in [(0.1, 16), (0.3, 8), (0.6, 4), (0.9, 1.58)]:
        set_progress(model, fraction)
        assert {round(q.current_bits, 2) for q in quantizers} == {bits}
        with torch.no_grad():
            outputs[bits] = model(idx)
    assert not torch.allclose(outputs[8], outputs[1.58])  # the eval cache follows the stage
    save_model(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert {round(m.current_bits, 2) for m in loaded.modules() if isinstance(m, Quantizer)} == {1.58}
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), outputs[1.58])


@pytest.mark.parametrize(
    "progressive,match",
    [
        ([[0.0, 16], [0.5, 8]], "last stage must be the quantizer itself"),
        ([[0.1, 8], [0.5, 1.58]], r"\[0\]: the first stage must start at fraction 0.0"),
        ([[0.0, 8], [0.5, 4], [0.4, 1.58]], r"\[2\]: fractions must increase"),
        ([[0.0, 17], [0.5, 1.58]], r"\[0\]: bits must be an integer 2..16"),
        ([[0.0, 8], [1.0, 1.58]], r"\[1\]: fraction must be a number in \[0, 1\)"),
        ([0.0, 8], r"\[0\] must be a \[fraction, bits\] pair"),
        ([], "non-empty list"),
    ],
)
def test_progressive_schedule_errors(progressive, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer("trilm", progressive=progressive)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("uniform", {}, r"needs quantizer_options\['bits'\]"),
        ("uniform", {"bits": 9}, r"quantizer_options\['bits'\] for uniform must be an integer 2..8"),
        ("uniform", {"bits": 4.0}, r"quantizer_options\['bits'\]"),
        ("trilm", {"bits": 4}, r"unknown quantizer_options \['bits'\] for quantizer 'trilm'"),
        ("twn", {"stochastic_rounding": True}, "not defined for twn"),
        ("trilm", {"learnable_scale": 1}, r"quantizer_options\['learnable_scale'\] must be true or false"),
        ("twn", {"threshold": -1}, r"quantizer_options\['threshold'\]"),
        ("trilm", {"eps": "1e-5"}, r"quantizer_options\['eps'\] for trilm must be a finite number >= 0"),
        ("trilm", {"eps": -1.0}, r"quantizer_options\['eps'\] for trilm"),
        ("trilm", {"eps": math.nan}, r"quantizer_options\['eps'\] for trilm"),
        ("trilm", {"eps": True}, r"quantizer_options\['eps'\] for trilm"),
        ("ternary", {}, "unknown quantizer 'ternary'"),
    ],
)
def test_option_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer(name, **options)


def test_bits_per_weight():
    assert bits_per_weight("trilm") == pytest.approx(math.log2(3))
    assert bits_per_weight("bitnet158") == bits_per_weight("twn") == bits_per_weight("trilm")
    assert bits_per_weight("bilm") == 1.0
    assert [bits_per_weight("uniform", {"bits": k}) for k in range(2, 9)] == list(range(2, 9))
    assert bits_per_weight("uniform", {"bits": 4, "progressive": [[0.0, 16], [0.5, 4]]}) == 4


MODEL_CASES = [
    ("trilm", {}),
    ("bilm", {}),
    ("bitnet158", {}),
    ("twn", {}),
    ("uniform", {"bits": 2}),
    ("uniform", {"bits": 8}),
    ("trilm", {"stochastic_rounding": True, "learnable_scale": True, "progressive": PROGRESSIVE}),
    ("bilm", {"stochastic_rounding": True, "learnable_scale": True}),
    ("bitnet158", {"learnable_scale": True, "progressive": [[0.0, 8], [0.5, 1.58]]}),
    ("twn", {"learnable_scale": True, "threshold": 0.5}),
]


@pytest.mark.parametrize("name,options", MODEL_CASES)
def test_model_with_each_quantizer_runs_forward_and_backward(name, options):
    assert set(QUANTIZER_CLASSES) == set(spectra.config.QUANTIZERS)
    cfg = spectra.from_name("trilm-tiny", vocab_size=256, quantizer=name, quantizer_options=options)
    model = spectra.build_model(cfg, seed=0)
    set_progress(model, 0.3)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    assert torch.isfinite(loss) and abs(loss.item() - math.log(256)) < 0.5
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if n.endswith(("_proj.weight", "quantizer.scale")):
            assert p.grad.abs().sum() > 0, n
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(idx)).all()


def test_bitnet158_norms_replace_the_blocks():
    """BitNet b1.58 puts a norm before each linear in place of the block's (paper-facts §9, BitNet's training notes:
    4-7 norms per layer); the block's two norms used to stay, so each linear's input was normalised twice."""
    from spectra.config import from_name
    from spectra.model import build_model

    def norms(quantizer: str) -> list[str]:
        layer = build_model(from_name("trilm-1m", quantizer=quantizer)).layers[0]
        return sorted(n for n, m in layer.named_modules() if type(m).__name__ in ("RMSNorm", "LayerNorm"))

    assert norms("bitnet158") == sorted(f"{p}.input_norm" for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.v_proj", "self_attn.o_proj",
                                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert norms("trilm") == ["input_layernorm", "post_attention_layernorm"]
    # the linears' own norm is the model's kind with its eps (it was an RMSNorm with eps 1e-5 whatever the config)
    layer = build_model(from_name("trilm-1m", quantizer="bitnet158", norm="layernorm", norm_eps=1e-2)).layers[0]
    norm = layer.self_attn.q_proj.input_norm
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-2
