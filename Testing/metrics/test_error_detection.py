"""acecal.metrics.error_detection: AUROC, recall and flagged volume of the flags on hand-built volumes whose answers
are known by construction, and the streaming AUROC against the exact Mann-Whitney statistic."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from acecal.errors import InvalidInputError
from acecal.metrics.error_detection import (
    NUM_HIST_BINS,
    ErrorDetectionAccumulator,
    auroc_from_histograms,
    confidence_bins,
    roi_mask,
)

NAMES = ["background", "a", "b"]


def cube_case():
    """Truth: class a in x 10..19, class b in x 20..29 (a 20^3 slab in a 40^3 volume). Prediction: b grows one slice
    into a (x = 19: 400 a->b errors) and a loses its first slice (x = 10: 400 a->background errors)."""
    truth = np.zeros((40, 40, 40), np.uint8)
    truth[10:30, 10:30, 10:20] = 1
    truth[10:30, 10:30, 20:30] = 2
    pred = truth.copy()
    pred[10:30, 10:30, 19] = 2
    pred[10:30, 10:30, 10] = 0
    return pred, truth


def test_recall_flagged_volume_and_precision_known_by_construction():
    pred, truth = cube_case()
    conf = np.full(pred.shape, 0.99, np.float32)
    flags = np.zeros(pred.shape, np.uint8)
    flags[10:30, 10:30, 19] = 1  # every a->b error
    flags[10:30, 10:20, 10] = 1  # half of the a->background errors
    flags[10:30, 10:30, 21] = 1  # 400 right voxels of b
    ed = ErrorDetectionAccumulator(NAMES)
    row = ed.update(pred, conf, flags, truth, "cube", voxel_ml=0.001)
    assert row["wrong_voxels"] == 800 and row["flagged_voxels"] == 1000 and row["flagged_wrong_voxels"] == 600
    assert row["recall"] == pytest.approx(600 / 800)
    assert row["flagged_over_wrong"] == pytest.approx(1000 / 800)
    assert row["precision"] == pytest.approx(600 / 1000)
    agg = ed.aggregate()
    assert agg["wrong_ml"] == pytest.approx(0.8) and agg["flagged_ml"] == pytest.approx(1.0)
    # per class, one against the rest: a's errors are both slices (800), b's only the slice it grew into (400)
    a, b = agg["per_class"]["a"], agg["per_class"]["b"]
    assert a["wrong_voxels"] == 800 and a["recall"] == pytest.approx(600 / 800)
    assert b["wrong_voxels"] == 400 and b["recall"] == pytest.approx(1.0)
    assert b["flagged_voxels"] == 800 and b["flagged_over_wrong"] == pytest.approx(2.0)  # x = 21 is b's ROI, x = 10 not
    # all right-confidence 0.99 and all wrong 0.99 too: no ranking at all
    assert agg["auroc"] == pytest.approx(0.5) and agg["auroc_max_error"] == pytest.approx(0.5)


def test_auroc_known_by_construction_and_only_within_the_roi():
    pred, truth = cube_case()
    wrong = pred != truth
    conf = np.full(pred.shape, 0.8, np.float32)
    conf[wrong] = 0.6
    conf[10:30, 10:30, 19] = 0.9  # a->b errors more confident than the right voxels (0.8)
    roi = roi_mask((pred > 0) | (truth > 0), 3)
    conf[~roi] = 0.4  # far background: very unsure and right; would pull the AUROC down if it counted
    ed = ErrorDetectionAccumulator(NAMES, roi_radius=3)
    row = ed.update(pred, conf, np.zeros(pred.shape, np.uint8), truth, "cube")
    assert row["auroc"] == pytest.approx(0.5)  # half of the wrong voxels below every right one, half above
    assert row["roi_voxels"] == int(roi.sum()) and row["recall"] == 0.0 and row["precision"] is None
    # b's errors are the 0.9 ones only: ranked below every right voxel of its ROI
    assert ed.aggregate()["per_class"]["b"]["auroc"] == pytest.approx(0.0)
    conf[10:30, 10:30, 19] = 0.6
    ed2 = ErrorDetectionAccumulator(NAMES, roi_radius=3)
    assert ed2.update(pred, conf, np.zeros(pred.shape, np.uint8), truth, "cube")["auroc"] == pytest.approx(1.0)


def test_roi_is_the_dilated_union_of_predicted_and_true_foreground():
    m = np.zeros((15, 15, 15), bool)
    m[7, 7, 7] = True
    r = roi_mask(m, 2)
    assert r.sum() == 33  # lattice points within distance 2 of a point
    assert r[7, 7, 9] and r[7, 8, 8] and not r[7, 9, 9]
    assert roi_mask(m, 0).sum() == 1 and roi_mask(np.zeros_like(m), 3).sum() == 0


def test_streaming_auroc_is_within_its_bound_of_the_exact_statistic():
    rng = np.random.default_rng(0)
    right = np.concatenate([1 - rng.beta(1, 40, 20000), np.ones(3000)]).astype(np.float32)  # many exact ties at 1
    wrong = np.concatenate([1 - rng.beta(2, 6, 2000), np.ones(40)]).astype(np.float32)
    hw = np.bincount(confidence_bins(wrong), minlength=NUM_HIST_BINS)
    hr = np.bincount(confidence_bins(right), minlength=NUM_HIST_BINS)
    auroc, bound = auroc_from_histograms(hw, hr)
    exact = mannwhitneyu(1 - wrong, 1 - right).statistic / (wrong.size * right.size)  # ties counted half
    assert abs(auroc - exact) <= bound + 1e-12
    assert bound < 0.005 and 0.8 < exact < 1.0
    # without ties across bins the streaming value is exact
    w = np.array([0.5, 0.7, 0.95], np.float32)
    r = np.array([0.6, 0.99, 0.999, 1.0], np.float32)
    a, _ = auroc_from_histograms(
        np.bincount(confidence_bins(w), minlength=NUM_HIST_BINS),
        np.bincount(confidence_bins(r), minlength=NUM_HIST_BINS),
    )
    assert a == pytest.approx((4 + 3 + 3) / 12)


def test_confidence_bins_increase_with_uncertainty():
    c = np.array([1.0, 1 - 2**-26, 0.9999, 0.999, 0.9, 0.5, 1 / 3], np.float32)
    b = confidence_bins(c)
    assert b[0] == b[1] == 0 and np.all(np.diff(b[1:]) > 0) and b.max() < NUM_HIST_BINS


def test_cases_pool_by_volume():
    pred, truth = cube_case()
    conf = np.full(pred.shape, 0.9, np.float32)
    flags = (pred != truth).astype(np.uint8)
    none = np.zeros_like(flags)
    ed = ErrorDetectionAccumulator(NAMES)
    ed.update(pred, conf, flags, truth, "fine", voxel_ml=0.001)  # 800 wrong, all flagged
    ed.update(pred, conf, none, truth, "coarse", voxel_ml=0.003)  # 800 wrong, none flagged, 3x the volume
    agg = ed.aggregate()
    assert agg["recall"] == pytest.approx(0.8 / (0.8 + 2.4))
    assert agg["per_case"]["fine"]["recall"] == 1.0 and agg["per_case"]["coarse"]["recall"] == 0.0
    assert agg["wrong_voxels"] == 1600 and agg["num_cases"] == 2


def test_no_error_and_bad_input():
    pred, truth = cube_case()
    ed = ErrorDetectionAccumulator(NAMES)
    row = ed.update(truth, np.ones(truth.shape, np.float32), np.zeros(truth.shape), truth, "perfect")
    assert row["auroc"] is None and row["recall"] is None and row["flagged_over_wrong"] is None
    with pytest.raises(InvalidInputError, match="already"):
        ed.update(truth, np.ones(truth.shape), np.zeros(truth.shape), truth, "perfect")
    with pytest.raises(InvalidInputError, match="one shape"):
        ed.update(pred, np.ones((3, 3, 3)), np.zeros(truth.shape), truth, "x")
    with pytest.raises(InvalidInputError, match="voxel_ml"):
        ed.update(pred, np.ones(truth.shape), np.zeros(truth.shape), truth, "x", voxel_ml=0)
    with pytest.raises(InvalidInputError):
        ErrorDetectionAccumulator(["background"])
    assert math.isnan(auroc_from_histograms(np.zeros(3), np.ones(3))[0])
