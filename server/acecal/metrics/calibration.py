"""Hard-binned calibration metrics (ECE, ACE, MCE) per image and per class.

Binning is bin-for-bin MONAI's :func:`monai.metrics.calibration_binning` (the rule of :mod:`acecal.binning`, which
the losses share): edges ``linspace(0, 1 + eps32, M + 1)`` in float32, ``bucketize(p, edges[1:], right=False)`` on the
float32 value, index clamped to ``M - 1``. So bin ``m`` holds ``m/M < p <= (m+1)/M`` (bin 0 also takes 0, the last bin
takes 1 and anything up to the clamp), and a value exactly on an edge goes to the *lower* bin.

Unlike MONAI's metric (and the authors' code, github.com/cai4cai/Average-Calibration-Losses) it is

* vectorised: one ``scatter_add`` each for counts, sum of p and sum of y into a (B, C, M) accumulator, no Python loop
  over images or classes (only over large spatial chunks, to bound temporary memory);
* accumulated exactly: counts are whole numbers, sums float64 (float32 adding of ones stalls at 2**24);
* lean with label maps: a (B, 1, ...) label map is never expanded to one-hot; each voxel adds 1 to the sum_y of the
  bin its *true* class's probability falls in;
* strict: NaN/inf, probabilities outside [0, 1] and mismatched shapes raise
  :class:`~acecal.errors.InvalidInputError` (a ``ValueError``).

Everything is built on the sufficient statistics ``(count, sum_p, sum_y)``, each (B, C, M): they add up over tiles of
one image and over images, which is what :class:`acecal.metrics.CalibrationAccumulator` relies on.

Per (image b, class c), with ``n_m`` voxels in bin m, ``mean_p_m = sum_p_m / n_m``, ``mean_y_m = sum_y_m / n_m``:

* ECE = sum_m n_m |mean_p_m - mean_y_m| / sum_m n_m   (count weighted; equals sum_m |sum_p_m - sum_y_m| / N)
* ACE = mean over non-empty bins of |mean_p_m - mean_y_m|   (every occupied bin weighs the same)
* MCE = max over non-empty bins of |mean_p_m - mean_y_m|

A class absent from an image's target is computed like MONAI does (mean_y = 0 in every occupied bin, so its ACE is
the mean predicted probability over occupied bins); all three are NaN only when the image has no voxel at all.
Leaving absent classes out of dataset means is the accumulator's job, not this function's.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from acecal.binning import DEFAULT_NUM_BINS, bin_edges, bin_means, hard_bin_sums
from acecal.errors import InvalidInputError
from acecal.tensor_checks import (
    check_num_bins,
    check_prediction,
    fused_values,
    label_checks,
    raise_if_bad,
    range_checks,
    target_kind,
)

__all__ = [
    "DEFAULT_NUM_BINS",
    "PROB_TOLERANCE",
    "bin_edges",
    "binning_sums",
    "bin_means",
    "errors_from_sums",
    "calibration_errors",
    "validate_probabilities",
]

#: Probabilities may exceed [0, 1] by this much (float rounding, e.g. a sum of softmax channels) before it is an
#: error; such values are binned as MONAI bins them (below 0 -> bin 0, above 1 -> last bin) and summed unchanged.
PROB_TOLERANCE = 1e-5


def validate_probabilities(probs: torch.Tensor, name: str = "probs", *, min_ndim: int = 3) -> None:
    """Raise ``ValueError`` unless ``probs`` is a floating tensor of shape (B, C, spatial...) with at least
    ``min_ndim`` (>= 3) dimensions whose values are finite and in [0, 1] (within :data:`PROB_TOLERANCE`).

    One pass over the data (``aminmax``); NaN propagates into the min/max, so it is caught too.
    """
    check_prediction(probs, name=name, allow_empty=True)
    if probs.ndim < min_ndim:
        raise InvalidInputError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(probs.shape)}")
    if probs.numel():
        raise_if_bad(None, fused_values(range_checks("probs", probs)), probs_name=name, tolerance=PROB_TOLERANCE)


def binning_sums(
    probs: torch.Tensor,
    onehot_or_labels: torch.Tensor,
    num_bins: int = DEFAULT_NUM_BINS,
    *,
    include_background: bool = True,
    right: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin sufficient statistics of hard binning (no gradient; the metric-side binning).

    Args:
        probs: (B, C, spatial...) probabilities in [0, 1], any floating dtype (binned on its float32 value, as MONAI).
        onehot_or_labels: either a one-hot / binary target of the same shape (B, C, spatial...), or a label map
            (B, 1, spatial...) or (B, spatial...) of integer class indices in [0, C). When C == 1 a (B, 1, ...) target
            is read as one-hot.
        num_bins: M, number of equal-width bins on [0, 1].
        include_background: False drops channel 0 (output has C - 1 channels).
        right: MONAI's ``right`` flag of ``bucketize`` (keep False for the published metric).

    Returns:
        ``(count, sum_p, sum_y)``, each (B, C, M): int64 voxel count, float64 sum of p, float64 sum of y per bin.
        They add up over disjoint tiles of an image and over images.

    Raises:
        ValueError: mismatched shapes, NaN/inf, probabilities outside [0, 1], one-hot values outside [0, 1], labels
            outside [0, C), ``num_bins < 1``.
    """
    check_num_bins(num_bins)
    check_prediction(probs, name="probs", allow_empty=True)
    kind = target_kind(probs, onehot_or_labels)
    b, c_all = probs.shape[:2]
    first = 0 if include_background else 1
    if not first < max(c_all, 1):
        raise InvalidInputError(f"cannot drop channel 0 of probabilities with {c_all} channel(s)")
    target = onehot_or_labels
    checks = range_checks("probs", probs) if probs.numel() else []
    if target.numel():
        checks += range_checks("target", target) if kind == "onehot" else label_checks(target)
    raise_if_bad(
        None, fused_values(checks), probs_name="probs", label_name="target", num_classes=c_all, tolerance=PROB_TOLERANCE
    )
    p = probs.detach().reshape(b, c_all, -1)[:, first:]
    if kind == "onehot":
        y, label_offset = target.detach().reshape(b, c_all, -1)[:, first:], -1
    else:
        y, label_offset = target.detach().reshape(b, 1, -1), first
    with torch.no_grad():
        sum_p, count, sum_y = hard_bin_sums(p, y, num_bins, right=bool(right), label_offset=label_offset, clamp=True)
    return count.to(torch.int64), sum_p, sum_y


def errors_from_sums(count: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """ECE, ACE and MCE from per-bin statistics.

    Args:
        count, sum_p, sum_y: (..., M) as returned by :func:`binning_sums` (any leading shape, e.g. (B, C) or (C,)).

    Returns:
        ``{"ece", "ace", "mce"}``, each (...) float64; NaN where every bin is empty (as MONAI).
    """
    if not (count.shape == sum_p.shape == sum_y.shape):
        raise InvalidInputError(
            f"count, sum_p and sum_y must have the same shape, got {tuple(count.shape)}, {tuple(sum_p.shape)}, "
            f"{tuple(sum_y.shape)}"
        )
    mean_p, mean_y = bin_means(count, sum_p, sum_y)
    gap = (mean_p - mean_y).abs()  # NaN in empty bins
    occupied = count > 0
    n_occ = occupied.sum(-1)
    total = count.to(torch.float64).sum(-1)
    none = n_occ == 0
    nan = torch.full(none.shape, float("nan"), dtype=torch.float64, device=count.device)
    gap0 = torch.where(occupied, gap, torch.zeros_like(gap))
    ece = torch.where(none, nan, (gap0 * count.to(torch.float64)).sum(-1) / total.clamp(min=1))
    ace = torch.where(none, nan, gap0.sum(-1) / n_occ.clamp(min=1).to(torch.float64))
    mce = torch.where(none, nan, gap0.amax(-1) if gap0.shape[-1] else nan)
    return {"ece": ece, "ace": ace, "mce": mce}


def calibration_errors(
    probs: torch.Tensor,
    onehot: torch.Tensor,
    num_bins: int = DEFAULT_NUM_BINS,
    include_background: bool = True,
    *,
    right: bool = False,
) -> Dict[str, torch.Tensor]:
    """ECE, ACE and MCE per image and class, equal to MONAI's ``CalibrationErrorMetric`` with
    ``calibration_reduction`` expected / average / maximum and ``metric_reduction="none"``.

    Args:
        probs: (B, C, spatial...) probabilities in [0, 1].
        onehot: one-hot (B, C, spatial...) target, or a label map (B, 1, spatial...) / (B, spatial...).
        num_bins: M.
        include_background: False drops channel 0 (outputs are (B, C - 1)).
        right: MONAI's ``right`` flag.

    Returns:
        ``{"ece": (B, C), "ace": (B, C), "mce": (B, C)}`` float64. Classes absent from an image's target are computed
        as MONAI does (not NaN); NaN only where the image has no voxels.

    Raises:
        ValueError: as :func:`binning_sums`.
    """
    count, sum_p, sum_y = binning_sums(probs, onehot, num_bins, include_background=include_background, right=right)
    return errors_from_sums(count, sum_p, sum_y)
