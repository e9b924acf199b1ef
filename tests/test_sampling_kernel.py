"""`kernels.sample`, the C draw behind sampled decoding, against its torch restatement (`reference_sample`) and the
rules of `spectra.inference.generate`: temperature, top-k with ties, the nucleus with ties, -inf, NaN and +inf, on
every compiled path (the same token on each)."""

import pytest
import torch

from spectra.packed import kernels as K

COMPILED = [p for p in K.PATHS if p in K.supported_paths()]
needs_ext = pytest.mark.skipif(K.extension() is None, reason="spectra's C extension is not built")


def _kept_intervals(x, temperature, top_k, top_p):
    """The reference's kept tokens and the [lo, hi) share of [0, 1) each covers, in index order (float64)."""
    s = x.double() / temperature
    w = torch.exp(s - s.max())
    keep = torch.isfinite(s)
    if top_k is not None and top_k < s.numel():
        keep &= x.float() / temperature >= torch.topk(x.float() / temperature, top_k).values[-1]
    if top_p is not None and top_p < 1:  # the weight of the kept tokens strictly above each value
        ws = torch.where(keep, w, torch.zeros((), dtype=torch.float64))
        sv, order = torch.sort(s)
        suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(ws[order], [0]), 0), [0]), torch.zeros(1).double()])
        above = suffix[torch.searchsorted(sv, s, right=True)]
        keep &= above < top_p * float(ws.sum())
    w = torch.where(keep, w, torch.zeros(()))
    cum = torch.cumsum(w, 0) / w.sum()
    lo = cum - w / w.sum()
    return [(i, float(lo[i]), float(cum[i])) for i in torch.nonzero(keep).flatten().tolist()]


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_sample_draws_the_token_whose_interval_holds_u(path):
    """For u in the middle of each kept token's share of the cumulative distribution, the draw is that token, for
    temperature alone, top-k, top-p and both; tokens outside top-k / the nucleus are never drawn; and C, its torch
    restatement and every path agree. Rows large enough for the block-max and bin prefilters (5000 values)."""
    g = torch.Generator().manual_seed(3)
    for V, spread in ((5, 1.0), (97, 2.0), (5000, 3.0), (5000, 0.2)):
        x = torch.randn(V, generator=g) * spread
        for T, k, p in ((1.0, None, None), (0.7, 7, None), (1.3, None, 0.9), (0.8, 20, 0.6), (1.0, None, 0.3),
                        (0.9, 300, None), (1.0, 4500, 0.8)):  # the last two: top-k by bins, then the nucleus too
            kept = _kept_intervals(x, T, k, p)
            checked = 0
            for i, lo, hi in kept:
                if hi - lo < 1e-6:
                    continue  # a sliver: rounding could move the boundary across u
                u = (lo + hi) / 2
                got = K.sample(x, T, k, p, u=u, path=path)
                assert got == i, (V, T, k, p, u, got, i)
                assert K.reference_sample(x, T, k, p, u=u) == i
                checked += 1
                if checked >= 60:
                    break
            assert checked > 0
            never = set(range(V)) - {i for i, _, _ in kept}
            draws = {K.sample(x, T, k, p, u=(j + 0.5) / 300, path=path) for j in range(300)}
            assert not draws & never, (V, T, k, p)
            if path != "scalar":
                assert draws == {K.sample(x, T, k, p, u=(j + 0.5) / 300, path="scalar") for j in range(300)}


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_sample_ties_infinities_and_nan(path):
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, float("-inf"), 0.5, 2.0])
    # top-k = 2 at a three-way tie for the largest: all three stay, nothing else
    assert {K.sample(x, 1.0, 2, u=(j + 0.5) / 200, path=path) for j in range(200)} == {1, 3, 4}
    # the nucleus: the tie at 3.0 weighs as one (each member sees nothing strictly above), so a small top_p keeps all
    assert {K.sample(x, 1.0, None, 0.05, u=(j + 0.5) / 200, path=path) for j in range(200)} == {1, 3, 4}
    # -inf is never drawn, even at a very high temperature, or first in line at u = 0
    assert 5 not in {K.sample(x, 50.0, u=(j + 0.5) / 400, path=path) for j in range(400)}
    assert K.sample(torch.tensor([float("-inf"), 0.0, 1.0]), 1.0, u=0.0, path=path) == 1
    # NaN: argmax's answer (the first NaN); +inf: the first +inf; every value -inf: 0
    assert K.sample(torch.tensor([0.0, float("nan"), 5.0]), 1.0, u=0.3, path=path) == 1
    assert K.sample(torch.tensor([0.0, float("inf"), float("inf")]), 1.0, u=0.9, path=path) == 1
    assert K.sample(torch.full((4,), float("-inf")), 1.0, u=0.5, path=path) == 0
    # u at the ends of [0, 1): the first and the last kept token
    y = torch.tensor([0.0, 0.0, float("-inf"), 0.0])
    assert K.sample(y, 1.0, u=0.0, path=path) == 0 and K.sample(y, 1.0, u=0.999999, path=path) == 3


def test_sample_refuses_bad_arguments():
    x = torch.zeros(8)
    for kw in (dict(temperature=0.0, u=0.5), dict(temperature=1.0, u=1.0), dict(temperature=1.0, u=-0.1),
               dict(temperature=1.0, top_p=0.0, u=0.5), dict(temperature=1.0, top_k=-1, u=0.5)):
        with pytest.raises(ValueError):
            K.sample(x, **kw)


@needs_ext
@pytest.mark.parametrize("path", COMPILED)
def test_sample_rows_equals_sample_row_by_row(path):
    """One call for several rows (any subset, in any order, over the pool) draws what `sample` draws row by row."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 3001, generator=g) * 2
    T, k, p = [0.5, 1.0, 1.5, 0.8, 1.0, 2.0], [None, 10, None, 50, 1, 3001], [None, None, 0.9, 0.7, None, 0.5]
    u = [0.1, 0.5, 0.9, 0.33, 0.7, 0.999]
    rows = [6, 0, 3, 3, 2, 5]
    for n_threads in (1, 2, 3):
        got = K.sample_rows(x, T, k, p, u, rows=rows, n_threads=n_threads, path=path)
        assert got == [K.sample(x[r], T[i], k[i], p[i], u=u[i], path=path) for i, r in enumerate(rows)]
    with pytest.raises(ValueError, match="rows must be"):
        K.sample_rows(x, T, k, p, u, rows=[7, 0, 1, 2, 3, 4], path=path)
    with pytest.raises(ValueError, match="one temperature"):
        K.sample_rows(x, T[:2], k, p, u, path=path)


@pytest.mark.parametrize("path", ["torch", *COMPILED])
def test_a_temperature_near_zero_is_greedy(path):
    """x / T overflowed for several logits (or T rounded to a float 0: 0/0), and the first +inf or index 0 came back
    instead of the largest logit; the limit T -> 0 is greedy."""
    for x, T in (([5.0, 10.0], 1e-38), ([-3.0, -1.0, -2.0], 1e-50), ([3.0, 40.0, 50.0], 1e-37), ([1.0, 2.0], 1e-46)):
        row = torch.tensor(x)
        want = int(torch.argmax(row))
        assert K.reference_sample(row, T, u=0.5) == want
        if path != "torch":
            assert K.sample(row, T, u=0.5, path=path) == want, (x, T, path)
