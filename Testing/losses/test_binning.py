"""hard_binned_calibration / soft_binned_calibration: MONAI equality (edges included), soft kernel, errors."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import calibration_binning

from acecal.binning import _bin_index, _edge_tables_from
from acecal.losses import hard_binned_calibration, soft_binned_calibration

EPS32 = torch.finfo(torch.float32).eps


def _edge_values(num_bins: int) -> torch.Tensor:
    """k/M for every k (rounded to float32 from float64, and computed in float32), their float32 neighbours,
    MONAI's own edges, 0, 1, the values that sit on an edge for M = 20, and random values."""
    k64 = torch.arange(num_bins + 1, dtype=torch.float64) / num_bins
    k32 = torch.arange(num_bins + 1, dtype=torch.float32) / num_bins
    edges = torch.linspace(0.0, 1.0 + EPS32, num_bins + 1)
    base = torch.cat([k64.float(), k32, edges])
    up = torch.nextafter(base, torch.full_like(base, 2.0))
    down = torch.nextafter(base, torch.full_like(base, -1.0))
    special = torch.tensor([0.0, 1.0, 0.95, 0.15, 0.3, 0.05, 0.5, 0.35, 0.45, 0.55, 0.65, 0.7, 0.85, 0.9])
    gen = torch.Generator().manual_seed(num_bins)
    values = torch.cat([base, up, down, special, torch.rand(4000, generator=gen)])
    return values[(values >= 0) & (values <= 1)]


def _assert_same_as_monai(probs: torch.Tensor, target: torch.Tensor, num_bins: int, right: bool) -> None:
    mp_ref, my_ref, n_ref = calibration_binning(probs, target, num_bins=num_bins, right=right)
    mp, my, n = hard_binned_calibration(probs, target, num_bins=num_bins, right=right)
    assert mp.shape == my.shape == n.shape == (probs.shape[0], probs.shape[1], num_bins)
    assert n.dtype == torch.float64
    assert torch.equal(n, n_ref.double()), f"bin counts differ for M={num_bins}, right={right}"
    assert torch.equal(torch.isnan(mp), torch.isnan(mp_ref))
    torch.testing.assert_close(mp, mp_ref.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(my, my_ref.double(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("num_bins", [1, 2, 3, 5, 7, 10, 15, 20, 33, 50, 100, 255, 300])
@pytest.mark.parametrize("right", [False, True])
def test_hard_binning_equals_monai_on_edges(num_bins, right):
    values = _edge_values(num_bins)
    probs = values.view(1, 1, -1)
    target = (torch.arange(values.numel()) % 3 == 0).float().view(1, 1, -1)
    _assert_same_as_monai(probs, target, num_bins, right)


def test_hard_binning_documented_tie_rule():
    # bins are (k/M, (k+1)/M]: a value exactly on k/M goes to the lower bin (MONAI's rule)
    values = torch.tensor([0.05, 0.5, 0.0, 1.0, 0.95, 0.15, 0.3])
    _, _, counts = hard_binned_calibration(values.view(1, 1, -1), torch.zeros(1, 1, 7))
    expected = torch.zeros(20, dtype=torch.float64)
    for b in (0, 9, 0, 19, 18, 2, 5):
        expected[b] += 1
    assert torch.equal(counts[0, 0], expected)
    # right=True moves the float32 edges that equal k/M exactly (0.15 and 0.30 for M = 20) up a bin
    _, _, counts_r = hard_binned_calibration(values.view(1, 1, -1), torch.zeros(1, 1, 7), right=True)
    _, _, n_ref = calibration_binning(values.view(1, 1, -1), torch.zeros(1, 1, 7), right=True)
    assert torch.equal(counts_r, n_ref.double())
    assert not torch.equal(counts_r, counts)


@pytest.mark.parametrize("right", [False, True])
def test_hard_binning_equals_monai_random_multichannel(right):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 4, 9, 8, 7, generator=gen)
    probs = torch.softmax(logits, 1)
    labels = torch.randint(0, 4, (3, 9, 8, 7), generator=gen)
    target = torch.nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    for num_bins in (20, 13):
        _assert_same_as_monai(probs, target, num_bins, right)
    # 1-D and 2-D spatial shapes, soft (probability) targets
    _assert_same_as_monai(probs[:, :, 0, 0], torch.rand(3, 4, 7, generator=gen), 20, right)
    _assert_same_as_monai(probs[:, :, 0], target[:, :, 0], 20, right)


def test_hard_binning_reduced_precision_and_float64_bins_like_monai():
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(2, 3, 500, generator=gen) > 0.5).float()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        probs = torch.softmax(2 * torch.randn(2, 3, 500, generator=gen), 1).to(dtype)
        # values next to edges in the input's own precision
        probs[0, 0, :21] = (torch.arange(21, dtype=torch.float64) / 20).to(dtype)
        probs[0, 1, :21] = torch.nextafter(probs[0, 0, :21], torch.ones(21, dtype=dtype))
        # MONAI casts to float32 before binning; so do we
        _, _, n_ref = calibration_binning(probs.float(), target, 20)
        mp, my, n = hard_binned_calibration(probs, target, 20)
        assert torch.equal(n, n_ref.double()), dtype
        mean_ref = torch.where(n > 0, torch.zeros_like(n), torch.full_like(n, math.nan))
        assert torch.equal(torch.isnan(mp), torch.isnan(mean_ref))


@pytest.mark.parametrize("right", [False, True])
def test_bin_index_general_path_with_edges_below_exact_values(right):
    # float32 edges of MONAI's linspace all satisfy e_m >= m / M on the CPU; another device might round an edge
    # down. The general path (two table lookups) must then still equal bucketize: nudge edges down and compare.
    num_bins = 20
    edges = torch.linspace(0.0, 1.0 + EPS32, num_bins + 1)
    for m, ulps in ((3, 1), (7, 2), (10, 1), (19, 3)):
        e = edges[m]
        for _ in range(ulps):
            e = torch.nextafter(e, torch.tensor(0.0))
        edges[m] = e
    lo, hi = _edge_tables_from(edges)
    assert hi is not None
    values = torch.cat([_edge_values(num_bins), edges[:-1], torch.nextafter(edges[:-1], torch.ones(num_bins))])
    values = values[(values >= 0) & (values <= 1)]
    expected = torch.bucketize(values, edges[1:], right=right).clamp(max=num_bins - 1)
    idx, compact = _bin_index(values, num_bins, right, lo, hi)
    assert torch.equal(idx, expected)
    assert torch.equal(compact.long(), expected)
    # the general path with MONAI's own edges equals the fast path
    lo2, hi2 = _edge_tables_from(torch.linspace(0.0, 1.0 + EPS32, num_bins + 1))
    assert hi2 is None
    assert torch.equal(
        _bin_index(values, num_bins, right, lo2, hi2, fast=False)[0], _bin_index(values, num_bins, right, lo2, hi2)[0]
    )


def test_hard_mean_p_is_differentiable_with_closed_form_gradient():
    gen = torch.Generator().manual_seed(2)
    probs = torch.rand(2, 2, 50, dtype=torch.float64, generator=gen).requires_grad_()
    target = (torch.rand(2, 2, 50, generator=gen) > 0.5).double()
    mp, my, n = hard_binned_calibration(probs, target)
    assert not my.requires_grad and not n.requires_grad
    torch.nan_to_num(mp).sum().backward()
    # d mean_p[m] / d p_i = 1 / n_m for the element's own bin
    idx = torch.bucketize(probs.detach().float(), torch.linspace(0, 1 + EPS32, 21)[1:]).clamp(max=19)
    expected = 1.0 / n.gather(2, idx)
    torch.testing.assert_close(probs.grad, expected)


def test_counts_accumulate_in_float64_beyond_float32_range():
    # float32 accumulation stalls at 2**24; here ~1.7e7 elements in one bin must be counted exactly and summed
    # precisely (0.1 in float32 is 0.100000001490116...)
    n = 2**24 + 3
    probs = torch.full((1, 1, n), 0.1)
    target = torch.zeros(1, 1, n, dtype=torch.uint8)
    target[0, 0, :5] = 1
    mp, my, counts = hard_binned_calibration(probs, target)
    assert counts[0, 0, 1].item() == n
    assert mp[0, 0, 1].item() == pytest.approx(float(torch.tensor(0.1)), rel=1e-12)
    assert my[0, 0, 1].item() == pytest.approx(5 / n, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# soft binning
# ----------------------------------------------------------------------------------------------------------------


def _dense_soft_reference(probs: torch.Tensor, target: torch.Tensor, num_bins: int, empty_weight: float):
    """Obviously correct float64 triangular kernel with a dense (N, M) weight matrix, per image and class."""
    centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins
    bsz, nch = probs.shape[:2]
    out = [torch.full((bsz, nch, num_bins), math.nan, dtype=torch.float64) for _ in range(2)]
    weights_out = torch.zeros(bsz, nch, num_bins, dtype=torch.float64)
    for b in range(bsz):
        for c in range(nch):
            p = probs[b, c].reshape(-1).double()
            y = target[b, c].reshape(-1).double()
            w = (1.0 - (p[:, None] - centres[None, :]).abs() * num_bins).clamp(min=0.0)
            low = p < centres[0]
            high = p >= centres[-1]
            w[low] = 0.0
            w[high] = 0.0
            w[low, 0] = 1.0
            w[high, -1] = 1.0
            weight = w.sum(0)
            weights_out[b, c] = weight
            ok = (weight >= empty_weight) & (weight > 0)
            out[0][b, c, ok] = ((w * p[:, None]).sum(0) / weight)[ok]
            out[1][b, c, ok] = ((w * y[:, None]).sum(0) / weight)[ok]
    return out[0], out[1], weights_out


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.05, {0: 0.5, 1: 0.5}),
        (0.0625, {0: 0.25, 1: 0.75}),
        (0.075, {1: 1.0}),
        (0.5, {9: 0.5, 10: 0.5}),
        (0.02, {0: 1.0}),
        (0.0, {0: 1.0}),
        (1.0, {19: 1.0}),
        (0.98, {19: 1.0}),
    ],
)
def test_soft_kernel_reference_examples(value, expected):
    probs = torch.tensor([[[value]]], dtype=torch.float64)
    _, _, weights = soft_binned_calibration(probs, torch.zeros_like(probs))
    dense = torch.zeros(20, dtype=torch.float64)
    for k, w in expected.items():
        dense[k] = w
    torch.testing.assert_close(weights[0, 0], dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("num_bins", [1, 2, 5, 20, 37])
def test_soft_binning_matches_dense_float64_reference(num_bins):
    gen = torch.Generator().manual_seed(num_bins)
    probs = torch.softmax(3 * torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=gen), 1)
    probs[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / num_bins, 1 - 0.5 / num_bins], dtype=torch.float64)
    target = torch.rand(2, 3, 6, 7, dtype=torch.float64, generator=gen)
    mp, my, w = soft_binned_calibration(probs, target, num_bins=num_bins, empty_weight=0.01)
    rp, ry, rw = _dense_soft_reference(probs, target, num_bins, 0.01)
    torch.testing.assert_close(w, rw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mp, rp, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(my, ry, rtol=1e-12, atol=1e-12, equal_nan=True)
    # every element spreads a total weight of exactly one
    torch.testing.assert_close(w.sum(-1), torch.full((2, 3), 42.0, dtype=torch.float64))


def test_soft_binning_float32_and_half_close_to_float64():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(2, 4, 300, generator=gen), 1)
    target = (torch.rand(2, 4, 300, generator=gen) > 0.7).float()
    ref = soft_binned_calibration(probs.double(), target.double())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = probs.to(dtype)
        out = soft_binned_calibration(p, target)
        ref_q = soft_binned_calibration(p.double(), target.double())  # same quantised values, float64 maths
        for a, b in zip(out, ref_q, strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    for a, b in zip(soft_binned_calibration(probs, target), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_soft_empty_weight_threshold():
    # one element at 0.05 gives bins 0 and 1 a weight of 0.5 each; with empty_weight 0.6 both are empty
    probs = torch.tensor([[[0.05]]], dtype=torch.float64)
    mp, my, w = soft_binned_calibration(probs, torch.ones_like(probs), empty_weight=0.6)
    assert torch.isnan(mp).all() and torch.isnan(my).all()
    mp, my, w = soft_binned_calibration(probs, torch.ones_like(probs), empty_weight=0.5)
    assert (~torch.isnan(mp)).sum() == 2
    # empty_weight = 0 still treats zero-weight bins as empty (no 0/0)
    mp, _, _ = soft_binned_calibration(probs, torch.ones_like(probs), empty_weight=0.0)
    assert (~torch.isnan(mp)).sum() == 2


def test_soft_outputs_differentiable():
    probs = torch.tensor([[[0.06, 0.3, 0.61, 0.9]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)

    def f(p):
        mp, my, w = soft_binned_calibration(p, target)
        return torch.nan_to_num(mp).sum() + torch.nan_to_num(my).sum() + w.pow(2).sum()

    assert torch.autograd.gradcheck(f, (probs,))


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [hard_binned_calibration, soft_binned_calibration])
def test_binning_errors(fn):
    p = torch.rand(1, 2, 5)
    y = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="same shape"):
        fn(p, y[:, :1])
    with pytest.raises(ValueError, match="spatial"):
        fn(p[0], y[0])
    with pytest.raises(ValueError, match="num_bins"):
        fn(p, y, num_bins=0)
    with pytest.raises(ValueError, match="num_bins"):
        fn(p, y, num_bins=2.5)
    bad = p.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, y)
    bad[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(bad, y)
    bad[0, 0, 0] = 1.0001
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(bad, y)
    bad[0, 0, 0] = -1e-6
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(bad, y)
    y_bad = y.clone()
    y_bad[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="target contains NaN"):
        fn(p, y_bad)
    y_bad[0, 1, 2] = 2.0
    with pytest.raises(ValueError, match="target"):
        fn(p, y_bad)
    with pytest.raises(ValueError, match="floating point"):
        fn(torch.zeros(1, 2, 5, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(1, 2, 0), torch.zeros(1, 2, 0))


def test_soft_binning_bad_empty_weight():
    p = torch.rand(1, 2, 5)
    for bad in (-0.1, math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match="empty_weight"):
            soft_binned_calibration(p, torch.zeros_like(p), empty_weight=bad)
