"""Inputs larger than one chunk of the element-wise work (2**20 elements on the CPU): same results as one pass."""

from __future__ import annotations

import pytest
import torch
from monai.metrics import calibration_binning

from acecal.binning import _CHUNK_CPU, spatial_chunks
from acecal.losses import HardL1ACELoss, SoftL1ACELoss, hard_binned_calibration, soft_binned_calibration

EPS32 = torch.finfo(torch.float32).eps
SHAPE = (2, 3, 190_001)  # 1.14 M elements: two chunks, the second one short


def _reference_soft_sums(p: torch.Tensor, y: torch.Tensor, num_bins: int = 20):
    """Independent float64 soft binning (left bin, clamped fraction, two scatters), autograd-differentiable."""
    m = num_bins
    t = p * m - 0.5
    left = t.detach().floor().clamp(0, m - 2).long()
    frac = (t - left).clamp(0.0, 1.0)
    zeros = torch.zeros(*p.shape[:2], m, dtype=p.dtype)
    w = zeros.scatter_add(2, left, 1 - frac).scatter_add(2, left + 1, frac)
    wp = zeros.scatter_add(2, left, (1 - frac) * p).scatter_add(2, left + 1, frac * p)
    wy = zeros.scatter_add(2, left, (1 - frac) * y).scatter_add(2, left + 1, frac * y)
    return w, wp, wy


def _reference_ace(w, wp, wy, present, empty_weight=None):
    nonempty = w > 0 if empty_weight is None else (w >= empty_weight) & (w > 0)
    safe = torch.where(nonempty, w, torch.ones_like(w))
    gap = torch.where(nonempty, (wp - wy).abs() / safe, torch.zeros_like(w))
    ace = gap.sum(-1) / nonempty.sum(-1)
    return (ace * present).sum() / present.sum()


@pytest.fixture(scope="module")
def big_case():
    assert len(spatial_chunks(torch.Size(SHAPE), torch.device("cpu"))) == 2
    assert SHAPE[0] * SHAPE[1] * SHAPE[2] > _CHUNK_CPU
    gen = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, SHAPE[1], (SHAPE[0], 1, SHAPE[2]), generator=gen)
    labels[1][labels[1] == 2] = 0  # class 2 absent from image 1
    onehot = torch.nn.functional.one_hot(labels[:, 0], SHAPE[1]).movedim(-1, 1).double()
    return logits, labels, onehot


def test_hard_binning_over_chunks_equals_monai(big_case):
    logits, _, onehot = big_case
    probs = torch.softmax(logits, 1).float()
    mp_ref, my_ref, n_ref = calibration_binning(probs, onehot.float())
    mp, my, n = hard_binned_calibration(probs, onehot)
    assert torch.equal(n, n_ref.double())
    torch.testing.assert_close(mp, mp_ref.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(my, my_ref.double(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_soft_binning_over_chunks_equals_reference(big_case):
    logits, _, onehot = big_case
    probs = torch.softmax(logits, 1)
    w, wp, wy = _reference_soft_sums(probs, onehot)
    mp, my, weights = soft_binned_calibration(probs, onehot, empty_weight=0.0)
    torch.testing.assert_close(weights, w, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(mp, wp / w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(my, wy / w, rtol=1e-10, atol=1e-12)


def test_hard_loss_and_gradient_over_chunks(big_case):
    logits, labels, onehot = big_case
    probs = torch.softmax(logits, 1).requires_grad_()
    loss = HardL1ACELoss(to_onehot_y=True, include_background=False)(probs, labels)
    loss.backward()
    # closed form, vectorised: sign(mean_p - mean_y) / (K n) by MONAI's bin of each element, / #valid classes
    p = probs.detach()[:, 1:]
    y = onehot[:, 1:]
    idx = torch.bucketize(p.float(), torch.linspace(0, 1 + EPS32, 21)[1:]).clamp(max=19)
    n = torch.zeros(2, 2, 20, dtype=torch.float64).scatter_add(2, idx, torch.ones_like(p))
    sp = torch.zeros_like(n).scatter_add(2, idx, p)
    sy = torch.zeros_like(n).scatter_add(2, idx, y)
    k = (n > 0).sum(-1, keepdim=True)
    coef = torch.sign(sp - sy) / (k * n.clamp(min=1))
    present = (y.sum(-1) > 0).double()
    expected_loss = (((sp - sy).abs() / n.clamp(min=1)).sum(-1) / k[..., 0] * present).sum() / present.sum()
    torch.testing.assert_close(loss, expected_loss)
    expected = torch.zeros_like(probs)
    expected[:, 1:] = coef.gather(2, idx) * (present / present.sum())[..., None]
    torch.testing.assert_close(probs.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("to_onehot_y", [True, False])
def test_soft_loss_and_gradient_over_chunks(big_case, to_onehot_y):
    logits, labels, onehot = big_case
    x = logits.clone().requires_grad_()
    loss = SoftL1ACELoss(to_onehot_y=to_onehot_y, softmax=True, empty_weight=0.0)(x, labels if to_onehot_y else onehot)
    loss.backward()
    x_ref = logits.clone().requires_grad_()
    probs = torch.softmax(x_ref, 1)
    present = (onehot.sum(-1) > 0).double()
    ref = _reference_ace(*_reference_soft_sums(probs, onehot), present)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("cls", [HardL1ACELoss, SoftL1ACELoss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_over_chunks(big_case, cls, dtype):
    # the same reduced-precision probabilities in float32: identical bins, same loss, gradient = float32 one rounded
    logits, labels, _ = big_case
    p16 = torch.softmax(logits, 1).to(dtype).requires_grad_()
    out = cls(to_onehot_y=True)(p16, labels)
    out.backward()
    p32 = p16.detach().float().requires_grad_()
    ref = cls(to_onehot_y=True)(p32, labels)
    ref.backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    assert p16.grad.dtype == dtype
    torch.testing.assert_close(p16.grad, p32.grad.to(dtype), rtol=0, atol=0)
