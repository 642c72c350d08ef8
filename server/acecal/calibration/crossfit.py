"""Cross-fitting: measure a calibration method on cases it was not fitted on.

The cases are split in two halves with a fixed seed (the rule of the calibration study, ``docs/calibration_study.py``:
``random.Random(seed).shuffle`` of the case names, first half / second half); the method is fitted on one half and
measured on the other, and vice versa. Every case is then measured exactly once by a calibrator that never saw it,
and the per-case figures pool into one cross-fitted table. The calibrator to ship is fitted afterwards on all the
cases; its figures on those same cases are in-sample and reported as such, never as the result.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterable, Optional, Sequence

from acecal.calibration.calibrators import Calibrator
from acecal.calibration.fitting import CalibrationCase, case_metrics
from acecal.errors import InvalidInputError

__all__ = ["change_pct", "split_halves", "cross_fit", "summarise_cases"]

#: A fitting method: cases -> (calibrator, info about the fit).
FitMethod = Callable[[Sequence[CalibrationCase]], "tuple[Calibrator, dict]"]


def split_halves(names: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Two halves of ``names``, shuffled with ``seed`` (the first gets the smaller half when the count is odd)."""
    order = list(names)
    random.Random(seed).shuffle(order)
    k = len(order) // 2
    return order[:k], order[k:]


def _mean(vals: Iterable[Optional[float]]) -> Optional[float]:
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def change_pct(raw: Optional[float], new: Optional[float]) -> Optional[float]:
    """The change from ``raw`` to ``new`` in percent of ``raw``; None when either is missing or ``raw`` is 0."""
    return None if new is None or not raw else 100.0 * (new - raw) / raw


def summarise_cases(rows: dict[str, dict]) -> dict[str, Optional[float]]:
    """Macro figures (mean over cases) of per-case ``{"ace", "dice"}`` rows."""
    return {
        "ace": _mean(r["ace"] for r in rows.values()),
        "dice": _mean(r["dice"] for r in rows.values()),
        "num_cases": len(rows),
    }


def cross_fit(
    cases: Sequence[CalibrationCase],
    fit: FitMethod,
    *,
    seed: int = 0,
    progress: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Two-fold cross-fitted figures of the calibration method ``fit`` on ``cases``.

    Args:
        cases: held-out cases (model-space logits, labels, images) of one network.
        fit: ``cases -> (calibrator, info)``, e.g. ``lambda cs: fit_ace_temperature(cs)``.
        seed: seed of the split into halves.
        progress: called with ``{"fold", "fitted_on", "measured_on"}`` before each fold.

    Returns:
        ``{"raw": {ace, dice, num_cases}, "calibrated": {...}, "change_pct": % change of the macro ACE,
        "per_case": {name: {"raw_ace", "ace", "dice", "fold"}}, "folds": [{"fitted_on", "measured_on", "info"}],
        "seed", "calibrators": [the two fitted calibrators]}``: every case measured by the calibrator fitted on the
        other half (``calibrators[k]`` measured ``folds[k]["measured_on"]``; for further measurements).
    """
    cases = list(cases)
    by_name = {c.name: c for c in cases}
    if len(by_name) != len(cases):
        raise InvalidInputError("case names must be unique")
    if len(cases) < 4:
        raise InvalidInputError(f"cross-fitting needs at least 4 cases, got {len(cases)}")
    halves = split_halves([c.name for c in cases], seed)
    raw = case_metrics(cases)
    per_case: dict[str, dict] = {}
    folds, calibrators = [], []
    for k, (fit_names, measure_names) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
        if progress is not None:
            progress({"fold": k, "fitted_on": fit_names, "measured_on": measure_names})
        calibrator, info = fit([by_name[n] for n in fit_names])
        calibrators.append(calibrator)
        measured = case_metrics([by_name[n] for n in measure_names], calibrator)
        for n, m in measured.items():
            per_case[n] = {
                "raw_ace": raw[n]["ace"],
                "ace": m["ace"],
                "dice": m["dice"],
                "raw_dice": raw[n]["dice"],
                "fold": k,
            }
        folds.append(
            {
                "fitted_on": list(fit_names),
                "measured_on": list(measure_names),
                "info": info,
                "calibrator": {"kind": calibrator.kind, "params": calibrator.spec()},
            }
        )
    raw_sum = summarise_cases(raw)
    cal_sum = summarise_cases(per_case)
    return {
        "raw": raw_sum,
        "calibrated": cal_sum,
        "change_pct": change_pct(raw_sum["ace"], cal_sum["ace"]),
        "per_case": per_case,
        "folds": folds,
        "seed": seed,
        "calibrators": calibrators,
    }
