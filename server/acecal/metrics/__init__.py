"""acecal.metrics: calibration errors (ECE, ACE, MCE), Dice, and streaming accumulation over a dataset.

- :func:`binning_sums` / :func:`calibration_errors`: MONAI-identical hard binning per (image, class), vectorised and
  accumulated in int64/float64 (the bin rule and sums of :mod:`acecal.binning`, which the losses share);
  ``errors_from_sums`` turns additive per-bin sums into ECE/ACE/MCE.
- :func:`dice_counts` / :func:`dice_scores`: Dice of the argmax segmentation per (image, class).
- :class:`CalibrationAccumulator`: macro (per image, then mean) and micro (pooled) metrics, per-class and per-case
  tables and the dataset reliability histogram, with (classes x bins) memory per image and DDP merge/reduce.
- :mod:`acecal.metrics.floor`: the floor, the expected ECE/ACE/MCE of a perfectly calibrated model with the given
  probabilities (exact Poisson-binomial per bin), macro and micro, streaming.
- :mod:`acecal.metrics.error_detection`: how well confidence and the served flags find the wrong voxels (AUROC,
  recall, flagged / wrong volume), streaming.
"""

from acecal.metrics.accumulator import METRICS, CalibrationAccumulator, CalibrationReport
from acecal.metrics.calibration import (
    DEFAULT_NUM_BINS,
    PROB_TOLERANCE,
    bin_edges,
    bin_means,
    binning_sums,
    calibration_errors,
    errors_from_sums,
    validate_probabilities,
)
from acecal.metrics.dice import dice_counts, dice_from_counts, dice_scores

__all__ = [
    "CalibrationAccumulator",
    "CalibrationReport",
    "DEFAULT_NUM_BINS",
    "METRICS",
    "PROB_TOLERANCE",
    "bin_edges",
    "bin_means",
    "binning_sums",
    "calibration_errors",
    "dice_counts",
    "dice_from_counts",
    "dice_scores",
    "errors_from_sums",
    "validate_probabilities",
]
