"""acecal.calibration: post-hoc temperature scaling (fit one T on validation logits by NLL, apply it at inference)."""

from acecal.calibration.temperature import DEFAULT_BOUNDS, apply_temperature, fit_temperature, temperature_nll

__all__ = ["DEFAULT_BOUNDS", "apply_temperature", "fit_temperature", "temperature_nll"]
