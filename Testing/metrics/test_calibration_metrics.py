"""acecal.metrics.calibration: bin-for-bin and number-for-number agreement with MONAI's CalibrationErrorMetric."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import CalibrationErrorMetric, calibration_binning

from acecal.binning import bin_index
from acecal.losses import hard_binned_calibration
from acecal.metrics import PROB_TOLERANCE, bin_edges, bin_means, binning_sums, calibration_errors, errors_from_sums

REDUCTIONS = {"ece": "expected", "ace": "average", "mce": "maximum"}


def monai_errors(probs, onehot, num_bins=20, include_background=True, right=False):
    out = {}
    for key, red in REDUCTIONS.items():
        metric = CalibrationErrorMetric(
            num_bins=num_bins,
            include_background=include_background,
            calibration_reduction=red,
            metric_reduction="none",
            right=right,
        )
        metric(y_pred=probs, y=onehot)
        out[key] = metric.aggregate()
    return out


def assert_same(ours, ref, atol=2e-6):
    for key in REDUCTIONS:
        a, b = ours[key], ref[key].to(torch.float64)
        assert a.shape == b.shape, key
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{key}: NaN pattern differs"
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=atol, rtol=0, msg=key)


def float64_reference(probs, onehot, num_bins=20):
    """Obviously-correct loop in float64 over (image, class), with MONAI's bin assignment."""
    edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, num_bins + 1)
    b, c = probs.shape[:2]
    out = {k: torch.full((b, c), float("nan"), dtype=torch.float64) for k in REDUCTIONS}
    for i in range(b):
        for j in range(c):
            p = probs[i, j].reshape(-1)
            y = onehot[i, j].reshape(-1).double()
            idx = torch.bucketize(p.float(), edges[1:]).clamp(max=num_bins - 1)
            gaps, counts = [], []
            for m in range(num_bins):
                sel = idx == m
                if sel.any():
                    gaps.append(abs(p[sel].double().mean().item() - y[sel].mean().item()))
                    counts.append(int(sel.sum()))
            if counts:
                out["ece"][i, j] = sum(g * n for g, n in zip(gaps, counts, strict=True)) / sum(counts)
                out["ace"][i, j] = sum(gaps) / len(gaps)
                out["mce"][i, j] = max(gaps)
    return out


def random_case(b=2, c=4, spatial=(12, 10, 6), scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, c, *spatial, generator=g) * scale, 1)
    labels = torch.randint(0, c, (b, 1, *spatial), generator=g)
    onehot = F.one_hot(labels[:, 0], c).movedim(-1, 1).float()
    return probs, labels, onehot


@pytest.mark.parametrize("num_bins", [1, 5, 15, 20, 50])
@pytest.mark.parametrize("include_background", [True, False])
def test_matches_monai_random(num_bins, include_background):
    probs, labels, onehot = random_case(seed=num_bins)
    ref = monai_errors(probs, onehot, num_bins, include_background)
    assert_same(calibration_errors(probs, onehot, num_bins, include_background), ref)
    # a label map gives the same numbers without building the one-hot
    assert_same(calibration_errors(probs, labels, num_bins, include_background), ref)
    assert_same(calibration_errors(probs, labels[:, 0], num_bins, include_background), ref)


def test_counts_and_means_bin_for_bin():
    probs, labels, onehot = random_case(b=3, c=3, spatial=(40, 30), seed=3)
    mean_p_ref, mean_y_ref, counts_ref = calibration_binning(probs, onehot, num_bins=20)
    count, sum_p, sum_y = binning_sums(probs, labels, 20)
    assert count.dtype == torch.int64 and sum_p.dtype == torch.float64 and sum_y.dtype == torch.float64
    assert count.shape == (3, 3, 20)
    assert torch.equal(count, counts_ref.to(torch.int64))
    mean_p, mean_y = bin_means(count, sum_p, sum_y)
    torch.testing.assert_close(mean_p, mean_p_ref.double(), atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(mean_y, mean_y_ref.double(), atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("num_bins", [3, 10, 20, 100])
def test_values_on_edges_go_where_monai_puts_them(right, num_bins):
    edges = bin_edges(num_bins)
    grid = torch.arange(num_bins + 1, dtype=torch.float32) / num_bins
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = torch.cat(
        [
            grid,
            edges,
            torch.nextafter(edges, up),
            torch.nextafter(edges, down).clamp(min=0),
            torch.nextafter(grid, up).clamp(max=1),
            torch.tensor([0.0, 1.0, 0.05, 0.15, 0.3, 0.5, 0.95]),
        ]
    )
    probs = torch.stack([vals, 1 - vals]).unsqueeze(0)  # (1, 2, n)
    onehot = (torch.arange(vals.numel()) % 3 == 0).float().expand(1, 2, -1).clone()
    _, _, counts_ref = calibration_binning(probs, onehot, num_bins, right=right)
    count, _, _ = binning_sums(probs, onehot, num_bins, right=right)
    assert torch.equal(count, counts_ref.to(torch.int64))
    assert_same(
        calibration_errors(probs, onehot, num_bins, right=right), monai_errors(probs, onehot, num_bins, right=right)
    )


def test_documented_edge_assignment():
    # MONAI's rule: 0.05 -> 0, 0.5 -> 9, 0 -> 0, 1.0 -> 19 (a value on k/M goes to the lower bin)
    vals = torch.tensor([0.05, 0.5, 0.0, 1.0, 0.051])
    count, _, _ = binning_sums(vals.view(1, 1, -1), torch.zeros(1, 1, 5), 20)
    expected = torch.zeros(20, dtype=torch.int64)
    for b in (0, 9, 0, 19, 1):
        expected[b] += 1
    assert torch.equal(count[0, 0], expected)


def test_edge_cases_match_monai():
    # one bin only, a class absent from the target, a class everywhere, a single voxel, all-zero/all-one probs
    probs = torch.zeros(3, 3, 5, 5)
    probs[0, 0] = 0.42
    probs[0, 1] = 0.58
    probs[1, 0] = 1.0
    probs[1, 2] = 0.0
    probs[2] = torch.softmax(torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(1)), 0)
    target = torch.zeros(3, 3, 5, 5)
    target[0, 0] = 1.0  # class 0 everywhere in image 0, class 1/2 absent
    target[1, 0, :2] = 1.0
    target[1, 1, 2:] = 1.0
    target[2, 2] = 1.0
    ours = calibration_errors(probs, target)
    assert_same(ours, monai_errors(probs, target))
    # absent class: computed as MONAI (mean_y = 0 in every occupied bin), not NaN
    assert not torch.isnan(ours["ace"][0, 1])
    assert ours["ace"][0, 1] == pytest.approx(0.58, abs=1e-6)
    single = torch.tensor([[[0.7]], [[0.3]]]).view(1, 2, 1)
    t1 = torch.tensor([1.0, 0.0]).view(1, 2, 1)
    assert_same(calibration_errors(single, t1), monai_errors(single, t1))
    assert calibration_errors(single, t1)["mce"][0, 0].item() == pytest.approx(0.3, abs=1e-6)


def test_no_voxels_gives_nan_like_monai():
    probs = torch.rand(2, 3, 0)
    target = torch.zeros(2, 3, 0)
    ours = calibration_errors(probs, target)
    assert_same(ours, monai_errors(probs, target))
    assert torch.isnan(ours["ece"]).all() and torch.isnan(ours["mce"]).all()


def test_other_dtypes():
    probs, labels, onehot = random_case(seed=5)
    ref = monai_errors(probs, onehot)
    assert_same(calibration_errors(probs.double(), labels), ref)
    half = probs.half()
    assert_same(calibration_errors(half, onehot.bool()), monai_errors(half, onehot), atol=1e-5)
    assert_same(calibration_errors(probs, onehot.to(torch.uint8)), ref)


def test_many_chunks_match_monai_and_float64_reference():
    # B*C*N above the internal chunk size, so the spatial loop runs more than once. MONAI sums 720,000 voxels per
    # (image, class) in float32 (errors ~1e-5); we match a float64 loop to 1e-10 and MONAI to its float32 accuracy.
    probs, labels, onehot = random_case(b=2, c=3, spatial=(120, 100, 60), seed=7)
    _, _, counts_ref = calibration_binning(probs, onehot, 20)
    count, _, _ = binning_sums(probs, labels)
    assert torch.equal(count, counts_ref.to(torch.int64))
    ours = calibration_errors(probs, labels, include_background=False)
    assert_same(ours, monai_errors(probs, onehot, include_background=False), atol=1e-4)
    ref64 = float64_reference(probs[:, 1:], onehot[:, 1:])
    assert_same(ours, ref64, atol=1e-10)


def test_matches_float64_reference_small():
    probs, labels, onehot = random_case(b=2, c=3, spatial=(7, 6, 5), seed=17)
    assert_same(
        calibration_errors(probs.double(), labels, 10), float64_reference(probs.double(), onehot, 10), atol=1e-12
    )


def test_sums_add_up_over_tiles():
    probs, labels, _ = random_case(b=1, c=3, spatial=(20, 16, 8), seed=9)
    whole = binning_sums(probs, labels)
    a = binning_sums(probs[..., :5], labels[..., :5])
    b = binning_sums(probs[..., 5:], labels[..., 5:])
    assert torch.equal(whole[0], a[0] + b[0])
    torch.testing.assert_close(whole[1], a[1] + b[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(whole[2], a[2] + b[2], atol=0, rtol=0)
    torch.testing.assert_close(errors_from_sums(*whole)["ace"], calibration_errors(probs, labels)["ace"])


def test_ece_equals_pooled_absolute_sum_difference():
    probs, labels, _ = random_case(seed=11)
    count, sum_p, sum_y = binning_sums(probs, labels)
    ece = errors_from_sums(count, sum_p, sum_y)["ece"]
    torch.testing.assert_close(ece, (sum_p - sum_y).abs().sum(-1) / count.sum(-1), atol=1e-12, rtol=0)


def test_counts_exact_beyond_float32_range():
    # float32 accumulation of ones stalls at 2**24; ours counts exactly
    n = (1 << 24) + 1001
    probs = torch.full((1, 1, n), 0.1)
    count, sum_p, sum_y = binning_sums(probs, torch.zeros(1, 1, n, dtype=torch.uint8), 20)
    assert int(count.sum()) == n and int(count[0, 0, 1]) == n  # 0.1 is in bin 1
    assert float(sum_p.sum()) == pytest.approx(n * float(torch.tensor(0.1)), rel=1e-12)
    assert float(sum_y.sum()) == 0.0


def test_include_background_false_label_map_ignores_background_voxels():
    probs, labels, onehot = random_case(b=2, c=3, spatial=(9, 7), seed=13)
    count, sum_p, sum_y = binning_sums(probs, labels, include_background=False)
    assert count.shape == (2, 2, 20)
    ref = binning_sums(probs[:, 1:], onehot[:, 1:])
    assert torch.equal(count, ref[0])
    torch.testing.assert_close(sum_y, ref[2], atol=0, rtol=0)
    assert float(sum_y.sum()) == float((labels > 0).sum())


def test_probabilities_slightly_above_one_are_tolerated():
    probs = torch.tensor([1.0 + PROB_TOLERANCE / 2, 0.5, 0.0 - PROB_TOLERANCE / 2]).view(1, 1, 3)
    target = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3)
    count, _, _ = binning_sums(probs, target)
    assert count[0, 0, 19] == 1 and count[0, 0, 0] == 1 and count[0, 0, 9] == 1
    assert_same(calibration_errors(probs, target), monai_errors(probs, target))


@pytest.mark.parametrize(
    "probs, target, match",
    [
        (torch.full((1, 2, 4), float("nan")), torch.zeros(1, 2, 4), "NaN"),
        (torch.tensor([[[0.5, float("nan")]]]), torch.zeros(1, 1, 2), "NaN"),
        (torch.tensor([[[0.5, float("inf")]]]), torch.zeros(1, 1, 2), r"\[0, 1\]"),
        (torch.tensor([[[0.5, 1.2]]]), torch.zeros(1, 1, 2), r"\[0, 1\]"),
        (torch.tensor([[[-0.1, 0.5]]]), torch.zeros(1, 1, 2), r"\[0, 1\]"),
        (torch.rand(2, 3, 4), torch.zeros(2, 2, 4), "shape"),
        (torch.rand(2, 3, 4), torch.zeros(2, 3, 5), "shape"),
        (torch.rand(2, 3), torch.zeros(2, 3), "dimensions"),
        (torch.randint(0, 2, (1, 2, 4)), torch.zeros(1, 2, 4), "floating"),
        (torch.rand(1, 3, 4), torch.tensor([[[0, 1, 3, 1]]]), r"labels in \[0, 3\]"),
        (torch.rand(1, 3, 4), torch.tensor([[[0, 1, -1, 1]]]), "labels"),
        (torch.rand(1, 3, 4), torch.tensor([[[0.0, 1.5, 2.0, 1.0]]]), "non-integer"),
        (torch.rand(1, 2, 4), torch.full((1, 2, 4), 2.0), "one-hot"),
        (torch.rand(1, 2, 4), torch.full((1, 2, 4), float("nan")), "NaN"),
    ],
)
def test_bad_input_raises_value_error(probs, target, match):
    with pytest.raises(ValueError, match=match):
        calibration_errors(probs, target)


def test_bad_num_bins():
    with pytest.raises(ValueError, match="num_bins"):
        binning_sums(torch.rand(1, 1, 3), torch.zeros(1, 1, 3), 0)
    with pytest.raises(ValueError, match="num_bins"):
        binning_sums(torch.rand(1, 1, 3), torch.zeros(1, 1, 3), 2.5)


def test_no_background_to_drop():
    with pytest.raises(ValueError, match="channel 0"):
        calibration_errors(torch.rand(1, 1, 3), torch.zeros(1, 1, 3), include_background=False)


def test_errors_from_sums_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        errors_from_sums(torch.zeros(2, 20, dtype=torch.int64), torch.zeros(2, 20), torch.zeros(2, 19))


def test_errors_hand_computed():
    # two bins occupied: bin 1 (p = 0.1, two voxels, one positive), bin 17 (p = 0.9, one voxel, positive)
    probs = torch.tensor([0.1, 0.1, 0.9]).view(1, 1, 3)
    target = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 3)
    out = calibration_errors(probs, target, 10)
    gaps = [abs(0.1 - 0.5), abs(0.9 - 1.0)]
    assert out["ece"].item() == pytest.approx((2 * gaps[0] + gaps[1]) / 3, abs=1e-7)
    assert out["ace"].item() == pytest.approx(sum(gaps) / 2, abs=1e-7)
    assert out["mce"].item() == pytest.approx(max(gaps), abs=1e-7)
    assert not math.isnan(out["ece"].item())


def test_the_metric_bins_as_the_loss_bins():
    """One bin rule (acecal.binning) for both: equal counts and sums, label map or one-hot, background or not."""
    probs, labels, onehot = random_case(b=2, c=3, spatial=(9, 8, 7), seed=21)
    probs[0, 1, :3, 0, 0] = torch.tensor([0.05, 0.5, 1.0])  # values on bin edges
    probs[0, 0, :3, 0, 0] = 1.0 - probs[0, 1, :3, 0, 0]
    probs[0, 2, :3, 0, 0] = 0.0
    mean_p, mean_y, counts = hard_binned_calibration(probs, onehot)
    for target in (labels, onehot):
        count, sum_p, sum_y = binning_sums(probs, target)
        assert torch.equal(count, counts.to(torch.int64))
        ours_p, ours_y = bin_means(count, sum_p, sum_y)
        torch.testing.assert_close(ours_p, mean_p, rtol=0, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(ours_y, mean_y, rtol=0, atol=1e-12, equal_nan=True)
        count_fg, _, _ = binning_sums(probs, target, include_background=False)
        assert torch.equal(count_fg, counts[:, 1:].to(torch.int64))


def test_bin_index_is_monai_rule_and_clamps_out_of_range_values():
    values = torch.cat([bin_edges(20), torch.rand(500, generator=torch.Generator().manual_seed(3))])
    expected = torch.bucketize(values, bin_edges(20)[1:]).clamp(max=19)
    assert torch.equal(bin_index(values, 20), expected)
    assert torch.equal(bin_index(values.double(), 20), expected)  # float64 is binned on its float32 value
    # tolerated overshoot goes to the end bins, where MONAI's bucketize + clamp puts it
    out = torch.tensor([-PROB_TOLERANCE, 1.0 + PROB_TOLERANCE])
    assert bin_index(out, 20).tolist() == [0, 19]
    assert torch.bucketize(out, bin_edges(20)[1:]).clamp(max=19).tolist() == [0, 19]
