"""acecal.calibration: post-hoc calibration of a frozen network's logits.

- temperature scaling fitted by NLL (:func:`fit_temperature`, Guo et al. 2017);
- calibrators that rescale the logits by a positive temperature per voxel (the label map never changes):
  a global temperature fitted for ACE (:func:`fit_ace_temperature`) and local temperature scaling trained with the
  soft-binned L1-ACE loss (:func:`fit_local_temperature`, Ding et al. 2021); stored in a bundle
  (:func:`publish_calibrated`, :func:`load_calibrator`) and applied by the predictor;
- two-fold cross-fitting to measure a method on cases it was not fitted on (:func:`cross_fit`).

Fitting a bundle's calibrator end to end (its cases' logits through the network, ``acecal calibrate``) is
:mod:`acecal.training.calibrate`: it runs the network, so it sits above :mod:`acecal.inference`, which applies the
calibrators defined here.

torch is needed by everything here except the bundle records.
"""

from acecal.calibration.calibrators import (
    CALIBRATOR_KINDS,
    Calibrator,
    LocalTemperatureCalibrator,
    TemperatureCalibrator,
    build_calibrator,
)
from acecal.calibration.crossfit import cross_fit, split_halves, summarise_cases
from acecal.calibration.fitting import (
    LTS_DEFAULTS,
    CalibrationCase,
    case_metrics,
    fit_ace_temperature,
    fit_local_temperature,
    macro_ace,
)
from acecal.calibration.store import calibrator_config, load_calibrator, publish_calibrated
from acecal.calibration.temperature import DEFAULT_BOUNDS, apply_temperature, fit_temperature, temperature_nll

__all__ = [
    "CALIBRATOR_KINDS",
    "Calibrator",
    "LocalTemperatureCalibrator",
    "TemperatureCalibrator",
    "build_calibrator",
    "cross_fit",
    "split_halves",
    "summarise_cases",
    "LTS_DEFAULTS",
    "CalibrationCase",
    "case_metrics",
    "fit_ace_temperature",
    "fit_local_temperature",
    "macro_ace",
    "calibrator_config",
    "load_calibrator",
    "publish_calibrated",
    "DEFAULT_BOUNDS",
    "apply_temperature",
    "fit_temperature",
    "temperature_nll",
]
