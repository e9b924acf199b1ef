"""GPTQ against an independent column-by-column restatement of the reference algorithm, and against RTN."""

import pytest
import torch
from torch import nn

from spectra.ptq import GPTQ, Quantizer


def correlated_inputs(n: int, cols: int, seed: int = 0, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """(n, 16, cols) inputs with strongly correlated features (a random mixing matrix) and optional dead features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    X = torch.randn(n, 16, cols, generator=gen) @ mix + 0.05 * torch.randn(n, 16, cols, generator=gen)
    X[..., list(dead)] = 0
    return X


def row_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero-point of every row of x, written out from the reference's rules."""
    maxq = 2**bits - 1
    scale, zero = torch.empty(x.shape[0], dtype=x.dtype), torch.empty(x.shape[0], dtype=x.dtype)
    for r in range(x.shape[0]):
        lo, hi = min(x[r].min().item(), 0.0), max(x[r].max().item(), 0.0)
        if sym:
            hi = max(abs(lo), hi)
            lo = -hi if lo < 0 else lo
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
        scale[r] = (hi - lo) / maxq
        zero[r] = (maxq + 1) / 2 if sym else round(-lo / scale[r].item())
    return scale, zero


def restated_gptq(W, H, *, bits, group_size, sym, act_order, static_groups, percdamp=0.01, block_size=128,
                  snapshot_quirk=True):
    """GPTQ one column at a time with the full rank-1 update of all later columns (no lazy blocks).

    The reference takes dynamic group parameters from its outer W, which holds the updates of earlier lazy blocks
    only; we model that with a snapshot of W taken at every multiple of block_size (snapshot_quirk=False reads the
    fully updated W instead, to show the test can tell the difference)."""
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    maxq = 2**bits - 1
    s_row, z_row = row_params(W, bits, sym)  # on the original W, before dead columns are zeroed
    dead = torch.diag(H) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1
        W[:, j] = 0
    static = [row_params(W[:, k : k + group_size], bits, sym) for k in range(0, cols, group_size)] if (
        static_groups and group_size != -1) else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = UᵀU
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    ties = torch.zeros(W.shape[0], dtype=torch.bool)
    s, z = s_row, z_row
    for j in range(cols):
        if j % block_size == 0:
            snapshot = W.clone()
        if group_size != -1:
            if static is not None:
                s, z = static[int(perm[j]) // group_size]
            elif j % group_size == 0:
                src = snapshot if snapshot_quirk else W
                s, z = row_params(src[:, j : j + group_size], bits, sym)
        w = W[:, j].clone()
        ties |= ((w / s).abs() % 1 - 0.5).abs() < 1e-9  # x.5 exactly: one ulp decides the code
        c = torch.clamp(torch.round(w / s) + z, 0, maxq)
        q = s * (c - z)
        codes[:, j], Q[:, j] = c, q
        err = (w - q) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    inv = torch.argsort(perm)
    return codes[:, inv], Q[:, inv], ties


SETTINGS = [  # bits, group, sym, act_order, static, block_size
    (4, -1, False, False, False, 128),
    (4, 128, True, False, False, 128),
    (4, 32, False, False, False, 128),  # group < block: the reference's outer-W quirk
    (3, 32, True, True, False, 128),
    (3, 128, True, True, True, 128),
    (6, 64, False, True, True, 128),
    (8, 128, True, True, False, 128),
    (2, 48, False, False, False, 128),  # groups straddling lazy blocks
    (5, 64, True, False, False, 96),
]


@pytest.mark.parametrize("bits,group,sym,act,static,block", SETTINGS)
def test_gptq_equals_restatement(bits, group, sym, act, static, block):
    torch.manual_seed(bits * 1000 + max(group, 0))
    layer = nn.Linear(384, 96, bias=False).double()
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(96, 384, seed=bits, dead=(5, 200)).double())
    Q, qw, loss = gptq.quantize(Quantizer(bits, group_size=group, sym=sym), block_size=block, act_order=act,
                                static_groups=static)
    codes, Q_ref, ties = restated_gptq(layer.weight.detach(), gptq.H, bits=bits, group_size=group, sym=sym,
                                       act_order=act, static_groups=static, block_size=block)
    # Every integer code, exactly, in every row where no value landed on a rounding tie. A symmetric grid puts a row's
    # extreme weight at ±(2^(bits-1) − ½)·s when it is the first column of its group (e.g. −7.5 at 4 bits): there the
    # last ulp of w, which depends on the order of the float updates, picks the code, and the error feedback carries
    # the difference along the row.
    assert ties.float().mean() < 0.25
    keep = ~ties
    assert torch.equal(qw.codes.double()[keep], codes[keep])
    torch.testing.assert_close(Q[keep], Q_ref[keep], rtol=1e-12, atol=1e-12)
    assert torch.equal(qw.dequantize(), Q)  # the kept codes and parameters give back Q bit for bit
    assert (Q[:, [5, 200]] == 0).all()  # dead inputs are zeroed
    assert loss > 0


def test_restatement_detects_the_group_quirk():
    """With g < block the reference's group parameters differ from those of the fully updated W."""
    layer = nn.Linear(256, 64, bias=False).double()
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(64, 256, seed=3).double())
    _, qw, _ = gptq.quantize(Quantizer(4, group_size=32, sym=False))
    args = dict(bits=4, group_size=32, sym=False, act_order=False, static_groups=False)
    quirk, _, ties = restated_gptq(layer.weight.detach(), gptq.H, **args)
    plain, _, _ = restated_gptq(layer.weight.detach(), gptq.H, snapshot_quirk=False, **args)
    assert not ties.any()  # asymmetric grid: no ties
    assert torch.equal(qw.codes.double(), quirk)
    assert not torch.equal(qw.codes.double(), plain)


def test_float32_matches_float64_restatement_closely():
    layer = nn.Linear(256, 128, bias=False)
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(64, 256, seed=7))
    Q, qw, _ = gptq.quantize(Quantizer(4, group_size=128, sym=True))
    codes, _, _ = restated_gptq(layer.weight.detach().double(), gptq.H.double(), bits=4, group_size=128, sym=True,
                                act_order=False, static_groups=False)
    assert (qw.codes.double() == codes).float().mean() > 0.999


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_beats_rtn(bits):
    torch.manual_seed(0)
    layer = nn.Linear(512, 256, bias=False)
    X = correlated_inputs(128, 512, seed=1)
    gptq = GPTQ(layer)
    gptq.add_batch(X)
    quantizer = Quantizer(bits, group_size=128, sym=True)
    Q, _, _ = gptq.quantize(quantizer)
    R = quantizer.rtn(layer.weight.detach()).dequantize()
    Y = X @ layer.weight.detach().T

    def rel(W):
        return ((X @ W.T - Y).norm() / Y.norm()).item()

    assert rel(Q) < 0.8 * rel(R), (rel(Q), rel(R))


def test_quantizer_grid():
    x = torch.tensor([[-1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    q = Quantizer(4, sym=True)
    scale, zero = q.find_params(x)
    assert zero.flatten().tolist() == [8, 8, 8]
    # the empty row gets the range [-1, 1]; a non-negative row keeps xmin = 0
    torch.testing.assert_close(scale.flatten(), torch.tensor([2 / 15, 2 / 15, 0.6 / 15]))
    codes = q.codes(x, scale, zero)
    assert codes.min() >= 0 and codes.max() <= 15
    xq = q.quantize(x, scale, zero)
    assert ((xq[0] - x[0]).abs() <= scale[0] / 2 + 1e-7).all()
    # the reference keeps xmin = 0 for a non-negative row, so its symmetric grid tops out at 7·s = 0.28 there
    torch.testing.assert_close(xq[2], torch.tensor([0.2, 0.28, 0.28]))
    qa = Quantizer(3, sym=False)
    scale, zero = qa.find_params(x)
    torch.testing.assert_close(scale.flatten(), torch.tensor([1.5 / 7, 2 / 7, 0.6 / 7]))
    assert zero.flatten().tolist()[0::2] == [5, 0]  # round(1 / (1.5/7)) = round(4.67); xmin = 0


def test_rtn_groups_and_g_idx():
    W = torch.randn(64, 256)
    qw = Quantizer(4, group_size=64, sym=False).rtn(W)
    assert qw.scales.shape == (4, 64) and qw.g_idx.tolist() == [i // 64 for i in range(256)]
    assert ((qw.dequantize() - W).abs() <= qw.scales[qw.g_idx.long()].T / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match="bits"):
        Quantizer(bits)


def test_group_size_must_divide_in_features():
    layer = nn.Linear(96, 32, bias=False)
    gptq = GPTQ(layer)
    gptq.add_batch(torch.randn(4, 8, 96))
    with pytest.raises(ValueError, match="group_size 64 does not divide the 96 input features"):
        gptq.quantize(Quantizer(4, group_size=64))
    with pytest.raises(ValueError, match="group_size"):
        Quantizer(4, group_size=0)
