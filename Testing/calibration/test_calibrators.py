"""Calibrators: the label map never changes, ACE goes down on a synthetic over-confident model, the metric objective is
exactly the accumulator's macro ACE, tiles give the one-piece result, cross-fitting never measures on fitted cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from acecal.calibration import (
    CalibrationCase,
    LocalTemperatureCalibrator,
    TemperatureCalibrator,
    build_calibrator,
    case_metrics,
    cross_fit,
    fit_ace_temperature,
    fit_local_temperature,
    macro_ace,
    split_halves,
)
from acecal.calibration.fitting import error_auroc, served_threshold
from acecal.errors import InvalidInputError
from acecal.metrics import CalibrationAccumulator
from acecal.metrics.error_detection import roi_mask

SHAPE = (18, 18, 18)


def _true_logits(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, x, y, z) logits of a calibrated model (two soft blobs and background) and a (1, x, y, z) image."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij"))
    z = torch.zeros(3, *SHAPE)
    for c in (1, 2):
        centre = torch.rand(3, generator=gen) * 6 + (3 if c == 1 else 9)
        radius = 3.0 + 2.0 * float(torch.rand(1, generator=gen))
        dist = ((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0).sqrt()
        z[c] = 1.2 * (radius - dist)
    image = (z[1:].amax(0) > 0).float()[None] + 0.1 * torch.randn(1, *SHAPE, generator=gen)
    return z, image


def synthetic_cases(n: int, *, seed: int = 0, scale=3.0) -> list[CalibrationCase]:
    """Labels drawn voxel-wise from ``softmax(z)`` (so ``z`` is perfectly calibrated); the model's logits are
    ``scale * z``: over-confident by a factor ``scale`` (a number, or a function of the image giving a map)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        z, image = _true_logits(gen)
        p = torch.softmax(z, 0).permute(1, 2, 3, 0).reshape(-1, 3)
        label = torch.multinomial(p, 1, generator=gen).view(SHAPE)
        s = scale(image) if callable(scale) else scale
        out.append(CalibrationCase(f"case{i:02d}", (s * z).float(), label, image))
    return out


@pytest.fixture(scope="module")
def over_confident():
    return synthetic_cases(12, seed=1)


def _labels(z: torch.Tensor) -> torch.Tensor:
    return z.argmax(dim=1)


def test_macro_ace_is_the_accumulators_macro_ace(over_confident):
    acc = CalibrationAccumulator(3, include_background=False)
    cal = TemperatureCalibrator(1.7)
    for c in over_confident:
        z, img, y = c.batch()
        acc.update(torch.softmax(cal(z), dim=1), y, case_id=c.name)
    assert macro_ace(over_confident, cal) == pytest.approx(float(acc.aggregate().macro["ace"]), abs=1e-12)


def test_ace_temperature_recovers_the_over_confidence_and_keeps_the_label_map(over_confident):
    cal, info = fit_ace_temperature(over_confident)
    assert 2.0 < info["temperature"] < 4.5  # the logits are 3 x the calibrated ones
    assert info["ace"] < 0.7 * info["raw_ace"]
    assert info["raw_ace"] == pytest.approx(macro_ace(over_confident))
    assert info["ace"] == pytest.approx(macro_ace(over_confident, cal))
    for c in over_confident:
        z, img, _ = c.batch()
        assert torch.equal(_labels(cal.calibrate(z, img)), _labels(z))


def test_cross_fitted_ace_temperature_lowers_ace_on_cases_it_never_saw(over_confident):
    res = cross_fit(over_confident, fit_ace_temperature, seed=0)
    halves = split_halves([c.name for c in over_confident], 0)
    for fold, (fit_on, measured) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
        assert res["folds"][fold]["fitted_on"] == fit_on and res["folds"][fold]["measured_on"] == measured
        assert not set(fit_on) & set(measured)
    assert sorted(res["per_case"]) == sorted(c.name for c in over_confident)
    assert res["calibrated"]["ace"] < 0.75 * res["raw"]["ace"]
    assert res["change_pct"] < -25
    assert res["calibrated"]["dice"] == pytest.approx(res["raw"]["dice"], abs=1e-12)  # the label map is unchanged


def test_local_temperature_starts_as_its_global_temperature_and_keeps_argmax_for_any_weights():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 9, 10, 11, generator=gen) * 4
    img = torch.randn(2, 1, 9, 10, 11, generator=gen)
    lts = LocalTemperatureCalibrator(3, 1, hidden=4, layers=2, dilation=2, init_temperature=1.8)
    assert torch.allclose(lts.temperature(z, img), torch.full((2, 1, 9, 10, 11), 1.8), atol=1e-5)
    with torch.no_grad():
        for p in lts.parameters():
            p.normal_(0, 1.0)  # arbitrary weights: the temperature is still positive everywhere
    t = lts.temperature(z, img).detach()
    assert float(t.min()) > 0 and float(t.std()) > 0
    assert torch.equal(_labels(lts(z, img)), _labels(z))


def test_tiles_give_the_one_piece_result():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 3, 21, 17, 13, generator=gen) * 3
    img = torch.randn(1, 1, 21, 17, 13, generator=gen)
    lts = LocalTemperatureCalibrator(3, 1, hidden=4, layers=3, dilation=2)
    with torch.no_grad():
        for p in lts.parameters():
            p.normal_(0, 0.5)
    assert lts.receptive_radius == 1 + 2 + 2
    whole = lts.calibrate(z, img, tile=64)
    tiled = lts.calibrate(z, img, tile=2 * lts.receptive_radius + 4)  # many tiles of 4 voxels plus the halo
    assert torch.allclose(whole, tiled, atol=1e-5)


def test_local_temperature_learns_a_spatially_varying_over_confidence():
    # over-confident x4 where the image is bright (inside the blobs), x1 elsewhere: one T cannot fix both
    def scale(image):
        return torch.where(image[0] > 0.5, 4.0, 1.0)

    fit_cases = synthetic_cases(8, seed=5, scale=scale)
    test_cases = synthetic_cases(6, seed=6, scale=scale)
    cal, info = fit_local_temperature(
        fit_cases, epochs=10, lr=0.01, nll_weight=0.1, hidden=4, layers=1, dilation=1, use_image=True
    )  # here the over-confidence is set by the image
    t_only, _ = fit_ace_temperature(fit_cases)
    raw, glob, local = macro_ace(test_cases), macro_ace(test_cases, t_only), macro_ace(test_cases, cal)
    assert local < 0.85 * glob < 0.85 * raw, (raw, glob, local)  # about 0.12, 0.094, 0.06
    assert info["init_temperature"] == pytest.approx(t_only.value)
    assert len(info["history"]) == 10 and info["best_epoch"] > 0
    assert info["fit_ace"] == pytest.approx(macro_ace(fit_cases, cal))  # the kept weights are the best epoch's
    for c in test_cases:
        z, img, _ = c.batch()
        assert torch.equal(_labels(cal.calibrate(z, img)), _labels(z))


def test_keep_best_never_ends_worse_than_the_start_on_the_fitting_cases(over_confident):
    # a learning rate far too high: the soft-binned loss wanders off, the kept weights do not
    cal, info = fit_local_temperature(over_confident[:4], epochs=3, lr=1.0, hidden=2, layers=1, clip_grad=None)
    start = info["init_fit"]["ace"]
    assert macro_ace(over_confident[:4], cal) <= start + 1e-12


def test_case_metrics_dice_does_not_depend_on_the_calibrator(over_confident):
    raw = case_metrics(over_confident)
    cal = case_metrics(over_confident, TemperatureCalibrator(5.0))
    for name in raw:
        assert raw[name]["dice"] == cal[name]["dice"]
        assert raw[name]["ace"] != cal[name]["ace"]


@pytest.mark.parametrize(
    "kind, params",
    [
        ("nope", {}),
        ("temperature", {"temperature": -1.0}),
        ("temperature", {"temperature": float("nan")}),
        ("temperature", {"temperature": 1.0, "extra": 1}),
        ("local_temperature", {"num_classes": 3, "hidden": 10**6}),
        ("local_temperature", {"num_classes": 3, "layers": 100}),
        ("local_temperature", {"num_classes": 3, "kernel_size": 4}),
        ("local_temperature", {"num_classes": 3, "init_temperature": 0.01}),
        ("local_temperature", {"num_classes": 3, "logit_scale": math.inf}),
        ("local_temperature", "not a dict"),
    ],
)
def test_hostile_or_broken_specs_are_input_errors(kind, params):
    with pytest.raises(InvalidInputError):
        build_calibrator(kind, params)


def test_spec_rebuilds_the_same_calibrator():
    lts = LocalTemperatureCalibrator(3, 1, hidden=5, layers=2, dilation=3, use_image=False, init_temperature=1.3)
    again = build_calibrator(lts.kind, lts.spec())
    again.load_state_dict(lts.state_dict())
    z = torch.randn(1, 3, 8, 8, 8)
    assert torch.equal(again(z), lts(z))
    assert build_calibrator("temperature", {"temperature": 2.5}).value == 2.5


def test_error_auroc_is_the_mann_whitney_statistic_within_the_roi(over_confident):
    cal = TemperatureCalibrator(2.0)
    wrong_scores, right_scores = [], []
    for c in over_confident:
        z, img, _ = c.batch()
        conf = torch.softmax(cal(z), 1)[0].amax(0).numpy()
        pred, truth = c.logits.argmax(0).numpy(), c.label.numpy()
        roi = roi_mask((pred > 0) | (truth > 0))
        wrong = (pred != truth)[roi]
        wrong_scores.append((1 - conf[roi])[wrong])
        right_scores.append((1 - conf[roi])[~wrong])
    w, r = np.concatenate(wrong_scores), np.concatenate(right_scores)
    exact = mannwhitneyu(w, r).statistic / (len(w) * len(r))
    assert error_auroc(over_confident, cal) == pytest.approx(exact, abs=1e-3)


def test_the_ranking_guard_keeps_only_weights_that_do_not_lose_error_detection(over_confident):
    # an impossible guard (AUROC must rise by 1): no epoch is eligible, the start (the global temperature) is kept
    cal, info = fit_local_temperature(over_confident[:4], epochs=2, lr=0.05, hidden=2, layers=1, ranking_tolerance=-1.0)
    assert info["best_epoch"] == 0 and all("fit_auroc" in h for h in info["history"])
    z, img, _ = over_confident[0].batch()
    assert torch.allclose(cal.temperature(z, img), torch.tensor(info["init_temperature"]), atol=1e-5)


def test_a_served_label_map_other_than_the_argmax_is_what_dice_and_error_detection_judge(over_confident):
    # a two-head network serves the segmentation head's labels with the calibration head's probabilities
    plain = over_confident[:3]
    shifted = [
        CalibrationCase(c.name, c.logits, c.label, c.image, prediction=torch.roll(c.logits.argmax(0), 2, 0))
        for c in plain
    ]
    a, b = case_metrics(plain), case_metrics(shifted)
    for n in a:
        assert b[n]["ace"] == a[n]["ace"] and b[n]["dice"] < a[n]["dice"]
    assert error_auroc(shifted) != error_auroc(plain)
    assert 0.5 <= served_threshold(shifted) <= 0.95
    with pytest.raises(InvalidInputError):
        CalibrationCase("x", plain[0].logits, plain[0].label, prediction=plain[0].label[:-1])
