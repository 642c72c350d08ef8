"""Hard-binned calibration metrics (ECE, ACE, MCE) per image and per class.

Binning is bin-for-bin MONAI's :func:`monai.metrics.calibration_binning` (reference sheet section 2): edges
``linspace(0, 1 + eps32, M + 1)`` in float32, ``bucketize(p, edges[1:], right=False)`` on the float32 value, index
clamped to ``M - 1``. So bin ``m`` holds ``m/M < p <= (m+1)/M`` (bin 0 also takes 0, the last bin takes 1 and anything
up to the clamp), and a value exactly on an edge goes to the *lower* bin.

Unlike MONAI (and the reference code) it is

* vectorised: one flat index ``(b*C + c)*M + bin`` and one ``bincount`` each for counts, sum of p and sum of y, no
  Python loop over images or classes (only over large spatial chunks, to bound temporary memory);
* accumulated exactly: counts in int64, sums in float64 (float32 adding of ones stalls at 2**24, section 8 item 3);
* lean with label maps: a (B, 1, ...) label map is never expanded to one-hot; each voxel adds 1 to the sum_y of the
  bin its *true* class's probability falls in;
* strict: NaN/inf, probabilities outside [0, 1] and mismatched shapes raise :class:`ValueError`.

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

from acecal.errors import InvalidInputError

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

DEFAULT_NUM_BINS = 20

#: Probabilities may exceed [0, 1] by this much (float rounding, e.g. a sum of softmax channels) before it is an
#: error; such values are binned as MONAI bins them (below 0 -> bin 0, above 1 -> last bin) and summed unchanged.
PROB_TOLERANCE = 1e-5

# Elements (B * C * voxels) per chunk: bounds the int64 index and float64 temporaries to ~100 MiB.
_CHUNK_ELEMENTS = 1 << 22


def bin_edges(num_bins: int = DEFAULT_NUM_BINS, device: torch.device | str | None = None) -> torch.Tensor:
    """The M + 1 float32 bin edges MONAI uses: ``linspace(0, 1 + eps32, M + 1)``, shape (M + 1,)."""
    _check_num_bins(num_bins)
    return torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, num_bins + 1, device=device,
                          dtype=torch.float32)


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise InvalidInputError(f"num_bins must be an integer >= 1, got {num_bins!r}")


def validate_probabilities(probs: torch.Tensor, name: str = "probs", *, min_ndim: int = 3) -> None:
    """Raise ``ValueError`` unless ``probs`` is a floating tensor of finite values in [0, 1] with >= ``min_ndim`` dims.

    One pass over the data (``aminmax``); NaN propagates into the min/max, so it is caught too.
    """
    if not isinstance(probs, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim < min_ndim:
        raise InvalidInputError(
            f"{name} must have shape (B, C, spatial...) with at least {min_ndim} dimensions, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise InvalidInputError(f"{name} must hold floating-point probabilities, got dtype {probs.dtype}")
    if probs.numel() == 0:
        return
    lo, hi = torch.aminmax(probs.detach())
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi:
        raise InvalidInputError(f"{name} contains NaN values")
    if lo < -PROB_TOLERANCE or hi > 1.0 + PROB_TOLERANCE:
        raise InvalidInputError(
            f"{name} must be probabilities in [0, 1] (apply softmax/sigmoid to logits first); "
            f"found values in [{lo:.6g}, {hi:.6g}]")


def _check_binary_target(target: torch.Tensor, name: str) -> None:
    if target.numel() == 0:
        return
    t = target.detach()
    if t.dtype == torch.bool:
        return
    lo, hi = torch.aminmax(t if t.is_floating_point() else t.to(torch.int64))
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi:
        raise InvalidInputError(f"{name} contains NaN values")
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(
            f"{name} has the shape of a one-hot target, so its values must lie in [0, 1]; found [{lo:.6g}, {hi:.6g}]. "
            "Pass a label map as (B, 1, spatial...) instead.")


def _label_map(target: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """Validate an integer-valued label map and return it as int64 of the same shape."""
    t = target.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if t.numel() == 0:
        return t.to(torch.int64)
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"{name} contains NaN or infinite values")
        if not bool((t == t.round()).all()):
            raise InvalidInputError(f"{name} is a label map (one channel) but holds non-integer values")
    t = t.to(torch.int64)
    lo, hi = torch.aminmax(t)
    if int(lo) < 0 or int(hi) >= num_classes:
        raise InvalidInputError(
            f"{name} holds labels in [{int(lo)}, {int(hi)}] but the probabilities have {num_classes} channels "
            f"(labels must lie in [0, {num_classes - 1}])")
    return t


def _target_kind(probs: torch.Tensor, target: torch.Tensor, name: str = "target") -> str:
    """``"onehot"`` if ``target`` has the shape of ``probs``, ``"labels"`` for (B, 1, ...) or (B, ...) label maps."""
    if not isinstance(target, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.shape == probs.shape:
        return "onehot"
    b, _, *spatial = probs.shape
    if tuple(target.shape) == (b, 1, *spatial) or tuple(target.shape) == (b, *spatial):
        return "labels"
    raise InvalidInputError(
        f"{name} shape {tuple(target.shape)} does not fit probabilities of shape {tuple(probs.shape)}: expected a "
        f"one-hot {tuple(probs.shape)} or a label map {(b, 1, *spatial)}")


@torch.no_grad()
def _binning_sums(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int,
    first_channel: int,
    right: bool,
    validate: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over channels ``first_channel:`` of ``probs`` (label values below ``first_channel`` add to no sum_y)."""
    _check_num_bins(num_bins)
    if validate:
        validate_probabilities(probs)
    kind = _target_kind(probs, target)
    b, c_all = probs.shape[:2]
    if not 0 <= first_channel < max(c_all, 1):
        raise InvalidInputError(f"cannot drop channel 0 of probabilities with {c_all} channel(s)")
    c = c_all - first_channel
    device = probs.device
    p_all = probs.detach().reshape(b, c_all, -1)
    p = p_all[:, first_channel:]
    n = p.shape[-1]
    if kind == "onehot":
        if validate:
            _check_binary_target(target, "target")
        y = target.detach().reshape(b, c_all, -1)[:, first_channel:]
        labels = None
    else:
        labels = _label_map(target, c_all, "target") if validate else target.detach().to(torch.int64)
        labels = labels.reshape(b, -1)
        y = None

    size = b * c * num_bins
    count = torch.zeros(size, dtype=torch.int64, device=device)
    sum_p = torch.zeros(size, dtype=torch.float64, device=device)
    sum_y = torch.zeros(size, dtype=torch.float64, device=device)
    edges = bin_edges(num_bins, device=device)[1:]
    # (B, C, 1) offset of each (image, class) histogram in the flat (B*C*M) vector.
    offset = (torch.arange(b * c, device=device, dtype=torch.int64) * num_bins).view(b, c, 1)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * c))
    for start in range(0, n, step):
        pc = p[..., start:start + step]
        idx = torch.bucketize(pc.float().contiguous(), edges, right=right).clamp_(max=num_bins - 1)  # (B, C, n) int64
        flat = (idx + offset).reshape(-1)
        count += torch.bincount(flat, minlength=size)
        sum_p += torch.bincount(flat, weights=pc.reshape(-1).to(torch.float64), minlength=size)
        if y is not None:
            sum_y += torch.bincount(flat, weights=y[..., start:start + step].reshape(-1).to(torch.float64),
                                    minlength=size)
        else:
            # Label map: one-hot y is 1 only in the true class, so each voxel adds 1 to the bin that its true
            # class's probability falls in. No (B, C, n) one-hot is built.
            lab = labels[:, start:start + step] - first_channel  # (B, n)
            if first_channel:
                keep = lab >= 0
                lab = lab.clamp(min=0)
            true_bin = idx.gather(1, lab.unsqueeze(1)).squeeze(1)  # (B, n)
            img = torch.arange(b, device=device, dtype=torch.int64).view(b, 1)
            flat_true = ((img * c + lab) * num_bins + true_bin).reshape(-1)
            if first_channel:
                sum_y += torch.bincount(flat_true, weights=keep.reshape(-1).to(torch.float64), minlength=size)
            else:
                sum_y += torch.bincount(flat_true, minlength=size).to(torch.float64)
    shape = (b, c, num_bins)
    return count.view(shape), sum_p.view(shape), sum_y.view(shape)


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
    first = 0 if include_background else 1
    return _binning_sums(probs, onehot_or_labels, num_bins, first, right, validate=True)


def bin_means(count: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean_p, mean_y)`` per bin (same shape as the inputs, (..., M), float64), NaN in empty bins."""
    count = count.to(torch.float64)
    empty = count == 0
    denom = torch.where(empty, torch.ones_like(count), count)
    nan = torch.full_like(count, float("nan"))
    mean_p = torch.where(empty, nan, sum_p.to(torch.float64) / denom)
    mean_y = torch.where(empty, nan, sum_y.to(torch.float64) / denom)
    return mean_p, mean_y


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
            f"{tuple(sum_y.shape)}")
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
