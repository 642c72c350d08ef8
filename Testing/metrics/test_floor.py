"""acecal.metrics.floor: the expected calibration error of a perfectly calibrated model with the given probabilities.

Checked against closed forms (every voxel of a bin with the same p: E|Binomial(n, p)/n - p|), brute-force
enumeration, the real metric on labels drawn from p (Monte Carlo, fixed seed) and the exact law where the normal
approximation is used.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from acecal.errors import InvalidInputError
from acecal.metrics import CalibrationAccumulator, binning_sums
from acecal.metrics.floor import (
    EXACT_MAX_VOXELS,
    FloorAccumulator,
    _class_laws,
    expected_max,
    floor_errors,
    positives_law,
)


def binomial_gap(n: int, p: float) -> np.ndarray:
    """(values, masses) of |Binomial(n, p)/n - p|."""
    k = np.arange(n + 1)
    return np.abs(k / n - p), binom.pmf(k, n, p)


def two_bin_image(n1: int, p1: float, n2: int, p2: float) -> np.ndarray:
    """(2, n1 + n2, 1, 1) probabilities: class 1 is p1 on n1 voxels and p2 on n2 voxels (one bin each)."""
    p = np.concatenate([np.full(n1, p1), np.full(n2, p2)]).astype(np.float32)
    return np.stack([1 - p, p]).reshape(2, -1, 1, 1)


@pytest.mark.parametrize("n,p", [(1, 0.3), (7, 0.62), (40, 0.97), (3000, 0.5), (1, 0.999)])
def test_one_value_per_bin_gives_the_binomial_mean_absolute_deviation(n, p):
    v, m = binomial_gap(n, p)
    assert positives_law(np.full(n, p)).expected_gap() == pytest.approx(float(v @ m), rel=1e-9, abs=1e-15)
    if n == 1:  # a single voxel: E|y - p| = 2 p (1 - p)
        assert positives_law([p]).expected_gap() == pytest.approx(2 * p * (1 - p))


def test_image_floor_in_closed_form():
    """Two occupied bins with constant p: E ACE = mean, E ECE = count-weighted mean, E MCE = E max of the two gaps."""
    n1, n2 = 9, 25
    p1, p2 = float(np.float32(0.22)), float(np.float32(0.83))  # the image holds float32 probabilities
    (v1, m1), (v2, m2) = binomial_gap(n1, p1), binomial_gap(n2, p2)
    g1, g2 = float(v1 @ m1), float(v2 @ m2)
    e_max = float(np.sum(np.maximum(v1[:, None], v2[None, :]) * m1[:, None] * m2[None, :]))
    fl = floor_errors(two_bin_image(n1, p1, n2, p2))
    assert fl["ace"][0] == pytest.approx((g1 + g2) / 2, rel=1e-9)
    assert fl["ece"][0] == pytest.approx((n1 * g1 + n2 * g2) / (n1 + n2), rel=1e-9)
    assert fl["mce"][0] == pytest.approx(e_max, rel=1e-9)


def test_poisson_binomial_law_is_exact():
    p = np.random.default_rng(3).uniform(0, 1, 12)
    law = positives_law(p)
    brute = np.zeros(13)
    for ys in itertools.product([0, 1], repeat=12):
        ys = np.array(ys)
        brute[ys.sum()] += np.prod(np.where(ys, p, 1 - p))
    full = np.zeros(13)
    full[law.values.astype(int)] = law.pmf
    np.testing.assert_allclose(full, brute, atol=1e-15)
    assert law.mean == pytest.approx(p.sum()) and law.exact
    # a bin near 1 (computed through 1 - p) and a wide one keep the window where the mass is
    for q in (np.full(500, 0.995), np.random.default_rng(4).uniform(0.45, 0.5, 5000)):
        law = positives_law(q)
        k = law.values
        assert law.pmf.sum() == pytest.approx(1.0) and k[0] <= q.sum() <= k[-1]
        assert float(law.pmf @ k) == pytest.approx(q.sum(), rel=1e-9)
        assert float(law.pmf @ (k - q.sum()) ** 2) == pytest.approx(float((q * (1 - q)).sum()), rel=1e-6)


def test_expected_max_of_independent_discrete_variables_by_enumeration():
    rng = np.random.default_rng(5)
    sets = []
    for size in (1, 3, 4, 2):
        vals = rng.choice([0.0, 0.1, 0.25, 0.3, 0.5], size, replace=False)
        m = rng.uniform(0.1, 1, size)
        sets.append((vals, m / m.sum()))
    brute = 0.0
    for combo in itertools.product(*[range(len(v)) for v, _ in sets]):
        brute += max(sets[i][0][j] for i, j in enumerate(combo)) * math.prod(sets[i][1][j] for i, j in enumerate(combo))
    assert expected_max(sets) == pytest.approx(brute, rel=1e-12)
    assert expected_max([(np.array([0.2]), np.array([1.0]))]) == pytest.approx(0.2)


@pytest.mark.parametrize("lo,hi", [(0.0, 0.05), (0.0, 1e-4), (0.45, 0.5), (0.95, 1.0), (0.999, 1.0)])
def test_normal_law_beyond_the_exact_limit_errs_by_less_than_a_tenth_of_a_voxel(lo, hi):
    n = EXACT_MAX_VOXELS + 5000
    p = np.random.default_rng(6).uniform(lo, hi, n)
    approx = positives_law(p)
    exact = positives_law(p, exact_max_voxels=n)
    assert not approx.exact and exact.exact
    assert abs(approx.expected_gap() - exact.expected_gap()) * n < 0.1
    # and the same bound on small bins, where the approximation is never used but would be worst
    for m in (1, 2, 5, 30, 300):
        q = np.random.default_rng(m).uniform(lo, hi, m)
        normal = positives_law(q, exact_max_voxels=0)
        assert abs(normal.expected_gap() - positives_law(q).expected_gap()) * m < 0.1


def test_bins_are_the_metric_bins():
    """Counts and mean p of the floor's bins equal the metric's, including values on bin edges."""
    edges = np.linspace(0, 1, 21, dtype=np.float32)
    rng = np.random.default_rng(7)
    p1 = np.concatenate([edges, rng.uniform(0, 1, 300).astype(np.float32), [0.0, 1.0]]).astype(np.float32)
    probs = np.stack([1 - p1, p1]).reshape(2, -1, 1, 1).astype(np.float32)
    laws = _class_laws(probs[1].reshape(-1), 20)
    count, sum_p, _ = binning_sums(
        torch.from_numpy(probs)[None], torch.zeros(1, 1, p1.size, 1, 1, dtype=torch.long), include_background=False
    )
    assert [0 if law is None else law.n for law in laws] == count[0, 0].tolist()
    np.testing.assert_allclose([0 if law is None else law.mean for law in laws], sum_p[0, 0].numpy(), rtol=1e-12)


def draws_of_the_metric(cases, n_draws: int, seed: int):
    """Macro and micro ECE/ACE/MCE of the real accumulator on labels drawn voxel-wise from each case's p."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_draws):
        acc = CalibrationAccumulator(3)
        for cid, probs, _labels in cases:
            p = torch.from_numpy(probs)
            drawn = torch.multinomial(p.reshape(3, -1).T.double(), 1, generator=g).reshape(p.shape[1:])
            acc.update(p[None], drawn[None, None], case_id=cid)
        rep = acc.aggregate()
        out.append([rep.macro[m] for m in ("ece", "ace", "mce")] + [rep.micro[m] for m in ("ece", "ace", "mce")])
    return np.array(out)


def test_floor_is_the_mean_error_of_labels_drawn_from_p():
    """Monte Carlo with the real metric (fixed seed): the exact floor lies within 4.5 standard errors."""
    rng = np.random.default_rng(8)
    cases = []
    for i, scale in enumerate((1.5, 3.0, 4.0)):
        labels = np.zeros((8, 9, 7), np.int64)
        labels[2:6, 2:5] = 1
        labels[2:6, 5:8] = 2
        logits = rng.normal(size=(3, 8, 9, 7)) * scale + 2.0 * np.eye(3)[labels].transpose(3, 0, 1, 2)
        probs = torch.softmax(torch.from_numpy(logits), 0).float().numpy()
        cases.append((f"case{i}", probs, labels))
    fl = FloorAccumulator(3)
    for cid, probs, labels in cases:
        fl.update(probs, labels, cid)
    agg = fl.aggregate()
    expect = [agg["macro"][m] for m in ("ece", "ace", "mce")] + [agg["micro"][m] for m in ("ece", "ace", "mce")]
    mc = draws_of_the_metric(cases, 300, seed=0)
    mean, se = mc.mean(0), mc.std(0, ddof=1) / math.sqrt(len(mc))
    assert np.all(np.abs(mean - np.array(expect)) < 4.5 * se), (mean, expect, se)
    assert all(0 < v < 1 for v in expect)


def test_micro_floor_pools_bins_across_images():
    """The pooled law is the convolution of the images' laws: the micro floor of two images equals the floor of the
    one image holding all their voxels."""
    rng = np.random.default_rng(9)
    a = torch.softmax(torch.from_numpy(rng.normal(size=(3, 6, 5, 4)) * 3), 0).float().numpy()
    b = torch.softmax(torch.from_numpy(rng.normal(size=(3, 7, 5, 4)) * 2), 0).float().numpy()
    la, lb = np.zeros((6, 5, 4), int), np.zeros((7, 5, 4), int)
    la[0, 0, :2], lb[0, 0, :2] = (1, 2), (1, 2)
    two = FloorAccumulator(3, class_names=["bg", "x", "y"])
    two.update(a, la, "a")
    two.update(b, lb, "b")
    one = FloorAccumulator(3, class_names=["bg", "x", "y"])
    one.update(np.concatenate([a, b], axis=1), np.concatenate([la, lb]), "ab")
    t, o = two.aggregate(), one.aggregate()
    for m in ("ece", "ace", "mce"):
        assert t["micro"][m] == pytest.approx(o["macro"][m], rel=1e-9)
        for name in ("x", "y"):
            assert t["per_class"][name][f"micro_{m}"] == pytest.approx(o["per_class"][name][f"macro_{m}"], rel=1e-9)
    # macro = mean over images of the mean over present classes
    assert t["macro"]["ace"] == pytest.approx((t["per_case"]["a"]["ace"] + t["per_case"]["b"]["ace"]) / 2)


def test_macro_leaves_out_absent_classes_and_images_without_foreground():
    rng = np.random.default_rng(10)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(3, 5, 5, 5))), 0).float().numpy()
    labels = np.zeros((5, 5, 5), int)
    labels[0, 0, 0] = 1  # class 2 absent
    fl = FloorAccumulator(3, class_names=["bg", "x", "y"])
    fl.update(probs, labels, "one")
    fl.update(probs, np.zeros_like(labels), "none")
    agg = fl.aggregate()
    row = agg["per_case"]["one"]
    assert row["ace"] == pytest.approx(row["classes"]["x"]["ace"]) and not row["classes"]["y"]["present"]
    assert math.isnan(agg["per_case"]["none"]["ace"])
    assert agg["macro"]["ace"] == pytest.approx(row["ace"])
    assert agg["per_class"]["y"]["cases_present"] == 0 and math.isnan(agg["per_class"]["y"]["macro_ace"])
    assert math.isfinite(agg["per_class"]["y"]["micro_ace"])  # pooled like the metric, even where absent
    assert agg["micro"]["ace"] == pytest.approx(agg["per_class"]["x"]["micro_ace"])  # only classes seen count


def test_bad_input_is_refused():
    fl = FloorAccumulator(3)
    good = np.full((3, 4, 4, 4), 1 / 3, np.float32)
    with pytest.raises(InvalidInputError, match="shape"):
        fl.update(good[:2], np.zeros((4, 4, 4)), "a")
    with pytest.raises(InvalidInputError, match="spatial shape"):
        fl.update(good, np.zeros((4, 4, 3)), "a")
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        fl.update(good * 4, np.zeros((4, 4, 4)), "a")
    fl.update(good, np.zeros((4, 4, 4)), "a")
    with pytest.raises(InvalidInputError, match="already"):
        fl.update(good, np.zeros((4, 4, 4)), "a")
    with pytest.raises(InvalidInputError):
        FloorAccumulator(1)
