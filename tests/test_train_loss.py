import math

import pytest
import torch
import torch.nn.functional as F

from spectra.train.loss import cross_entropy_rows, kernel_paths, lm_loss, reference_lm_loss

pytestmark = pytest.mark.skipif(not kernel_paths(), reason="spectra.train._kernels is not built")


def _reference(x: torch.Tensor, t: torch.Tensor, scale: float):
    """Float64 restatement: loss_i = logsumexp(x_i) - x_{i,t_i}; grad = scale * (softmax - onehot)."""
    xd = x.double()
    loss = torch.logsumexp(xd, -1) - xd.gather(1, t[:, None]).squeeze(1)
    grad = (torch.softmax(xd, -1) - F.one_hot(t, x.shape[1]).double()) * scale
    return loss, grad


@pytest.mark.parametrize("path", kernel_paths())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_reference(path, dtype):
    gen = torch.Generator().manual_seed(0)
    N, V = 37, 1000 + 13  # V not a multiple of 16: the tail runs the scalar code
    x = (torch.randn(N, V, generator=gen) * 4).to(dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    t[:3] = torch.tensor([0, V - 1, V - 14])  # first column, the tail, the last full vector
    loss, grad = cross_entropy_rows(x, t, scale=1 / N, path=path)
    ref_loss, ref_grad = _reference(x, t, 1 / N)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)
    else:  # one rounding to bf16 of a float32 value within 1e-6 of the reference: at most one bf16 step apart
        step = ref_grad.abs() * 2**-8 + 1e-12
        assert ((grad.double() - ref_grad).abs() <= step).all()
    loss_only, none = cross_entropy_rows(x, t, path=path)
    assert none is None and torch.equal(loss_only, loss)


def test_lm_loss_forward_backward_matches_torch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 11, 517, generator=gen).bfloat16()
    targets = torch.randint(0, 517, (3, 11), generator=gen)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = lm_loss(a, targets), reference_lm_loss(b, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (ours * 0.25).backward()  # a grad_output other than 1, as with gradient accumulation
    (ref * 0.25).backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=2**-8 * b.grad.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(logits, targets), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", kernel_paths())
def test_nonfinite_logits_give_nan_loss(path):
    x = torch.zeros(3, 40)
    x[0, 5] = float("nan")
    x[1, 39] = float("inf")
    x[2, :20] = float("-inf")  # masked logits are fine
    loss, _ = cross_entropy_rows(x, torch.tensor([1, 2, 30]), scale=1.0, path=path)
    assert math.isnan(loss[0]) and math.isnan(loss[1])
    assert loss[2].item() == pytest.approx(math.log(20), rel=1e-6)


def test_bad_input_is_named():
    x = torch.zeros(4, 10)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        cross_entropy_rows(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        cross_entropy_rows(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2-D bfloat16 or float32"):
        cross_entropy_rows(x.half(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="not available"):
        cross_entropy_rows(x, torch.tensor([0, 1, 2, 3]), path="neon")
