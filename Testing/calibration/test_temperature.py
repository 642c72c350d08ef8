"""acecal.calibration: temperature scaling recovers a known over-confidence factor."""

import math

import pytest
import torch

from acecal.calibration import DEFAULT_BOUNDS, apply_temperature, fit_temperature, temperature_nll


def calibrated(n=20000, c=4, seed=0):
    """Logits z and labels drawn from softmax(z): perfectly calibrated at T = 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    return z, y


@pytest.mark.parametrize("k", [0.5, 2.0, 3.5])
def test_recovers_overconfidence_factor(k):
    z, y = calibrated()
    t = fit_temperature(z * k, y)
    assert DEFAULT_BOUNDS[0] <= t <= DEFAULT_BOUNDS[1]
    assert t == pytest.approx(k, rel=0.05)
    # the fit lowers the NLL and the optimum is a minimum
    assert temperature_nll(z * k, y, t) < temperature_nll(z * k, y, 1.0)
    assert temperature_nll(z * k, y, t) <= min(temperature_nll(z * k, y, t * 1.02), temperature_nll(z * k, y, t / 1.02))


def test_per_case_iterable_equals_one_tensor():
    g = torch.Generator().manual_seed(1)
    cases = []
    for _ in range(4):
        z = torch.randn(3, 16, 12, 6, generator=g) * 2
        y = torch.multinomial(torch.softmax(z, 0).reshape(3, -1).t(), 1, generator=g)[:, 0].reshape(16, 12, 6)
        cases.append((z * 2.5, y))
    t_list = fit_temperature(cases)
    t_gen = fit_temperature((z, y.unsqueeze(0)) for z, y in cases)  # a one-shot generator, labels (1, spatial)
    flat_z = torch.cat([z.reshape(3, -1).t() for z, _ in cases])
    flat_y = torch.cat([y.reshape(-1) for _, y in cases])
    t_flat = fit_temperature(flat_z, flat_y)
    t_batch = fit_temperature(torch.stack([z for z, _ in cases]), torch.stack([y for _, y in cases]).unsqueeze(1))
    assert t_list == pytest.approx(t_flat, rel=1e-6)
    assert t_gen == pytest.approx(t_flat, rel=1e-6)
    assert t_batch == pytest.approx(t_flat, rel=1e-6)
    assert t_flat == pytest.approx(2.5, rel=0.1)
    # a subsample of each case gives a nearby value
    t_sub = fit_temperature(cases, max_voxels_per_case=600, seed=3)
    assert t_sub == pytest.approx(t_flat, rel=0.15)


def test_ignore_index_and_half_precision():
    z, y = calibrated(n=8000, seed=2)
    y_ign = y.clone()
    y_ign[::4] = 255
    t = fit_temperature((z * 2).half(), y_ign, ignore_index=255)
    keep = y_ign != 255
    assert t == pytest.approx(fit_temperature(z[keep] * 2, y[keep]), rel=1e-2)


def test_separable_logits_hit_the_lower_bound_with_a_warning():
    z = torch.randn(200, 3, generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="outside the bounds"):
        t = fit_temperature(z * 10, z.argmax(1), bounds=(0.1, 10.0))
    assert t == 0.1


def test_apply_temperature_keeps_argmax():
    z = torch.randn(2, 3, 4, 4)
    out = apply_temperature(z, 2.0)
    torch.testing.assert_close(out, z / 2)
    assert torch.equal(out.argmax(1), z.argmax(1))
    assert apply_temperature(z, torch.tensor(1.0)) is not z
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(z, bad)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.tensor([[0.0, float("nan")]]), torch.tensor([0])), {}, "NaN"),
        ((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), {}, "no labelled voxels"),
        (([],), {}, "no labelled voxels"),
        ((torch.zeros(4, 3), torch.tensor([0, 1, 2, 3])), {}, r"labels in \[0, 3\]"),
        ((torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)), {}, "do not fit"),
        ((torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), {}, "at least 2 classes"),
        ((torch.zeros(4, 3),), {}, "labels are required"),
        ((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), {"bounds": (2.0, 1.0)}, "bounds"),
        ((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), {"init": 0.0}, "init"),
        ((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), {"max_iter": 0}, "max_iter"),
        (([(torch.zeros(3, 2, 2), torch.zeros(3, 2, dtype=torch.long))],), {}, "do not fit"),
        (([torch.zeros(3, 2)],), {}, "pair"),
        ((torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)), {}, "floating"),
        ((torch.zeros(4, 3), torch.full((4,), 0.5)), {}, "integer"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(*args, **kwargs)


def test_result_is_a_plain_finite_float():
    z, y = calibrated(n=2000, seed=5)
    t = fit_temperature(z * 1.7, y, max_iter=50, init=5.0)
    assert isinstance(t, float) and math.isfinite(t) and t == pytest.approx(1.7, rel=0.15)
