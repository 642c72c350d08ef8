"""A bundle's default uncertainty threshold, from the top-label reliability of held-out cases.

The top-label histogram counts, per confidence bin, the voxels whose served confidence falls in it and how many of
them had the right label. Training sets ``BundleConfig.uncertainty_threshold`` from the validation cases' histogram
(:mod:`acecal.training.publish`); ``acecal calibrate`` sets it again for the calibrated confidence
(:func:`acecal.calibration.fitting.served_threshold`). One rule for both, here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["NUM_BINS", "top_label_bins", "uncertainty_threshold"]

#: confidence bins of the top-label histogram (the calibration metrics' 20 equal-width bins)
NUM_BINS = 20


def top_label_bins(
    probs: torch.Tensor, label: torch.Tensor, num_bins: int = NUM_BINS, predicted: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and correct counts per top-label confidence bin, bins (k/M, (k+1)/M] as the calibration metrics use.

    Args:
        probs: (B, C, spatial...) class probabilities.
        label: (B, 1, spatial...) or (B, spatial...) true label map.
        predicted: (B, 1, spatial...) the served label map when it is not the argmax of ``probs`` (two heads); the
            confidence is then the probability of that label.

    Returns:
        ``(counts, correct)``, each (num_bins,) int64 on the CPU.
    """
    if predicted is None:
        conf, pred = probs.max(dim=1)  # (B, ...)
    else:
        pred = predicted[:, 0].long()
        conf = probs.gather(1, predicted.long()).squeeze(1)
    correct = pred == label.reshape(pred.shape).long()
    idx = (torch.ceil(conf.double() * num_bins).long() - 1).clamp_(0, num_bins - 1).reshape(-1)
    counts = torch.bincount(idx, minlength=num_bins)
    right = torch.bincount(idx, weights=correct.reshape(-1).double(), minlength=num_bins).round().long()
    return counts.cpu(), right.cpu()


def uncertainty_threshold(
    counts: torch.Tensor, correct: torch.Tensor, *, target: float = 0.9, min_count: int = 100, num_classes: int = 2
) -> float:
    """The bundle's default confidence threshold, from the top-label reliability.

    Rule: scan the confidence bins from the most confident down; the threshold is the lower edge of the lowest bin
    such that it and every populated bin above it (>= ``min_count`` voxels) have an observed accuracy of at least
    ``target``. Voxels below the threshold are those whose bin, on validation data, was right less than ``target``
    of the time. Clamped to [max(0.5, 1/C) rounded up to a bin edge, 0.95]; 0.95 when even the top bin misses the
    target (everything but the most confident voxels is then suspect).
    """
    m = counts.numel()
    floor = math.ceil(max(0.5, 1.0 / num_classes) * m) / m
    thr = 1.0
    for k in range(m - 1, -1, -1):
        n = int(counts[k])
        if n < min_count:
            continue
        if int(correct[k]) / n >= target:
            thr = k / m
        else:
            break
    return float(min(max(thr, floor), (m - 1) / m))
