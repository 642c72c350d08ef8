"""How well the served confidence and uncertainty flags find the segmentation's errors.

numpy + scipy only; arrays are (z, y, x) on one grid: the predicted label map, the served confidence (probability of
the predicted class), the served flags mask (:func:`acecal.inference.uncertainty.uncertain_boundary_flags`) and the
true label map.

Definitions (a voxel is *wrong* when its predicted class differs from the true one):

* **ROI**: the union of the predicted and the true foreground, dilated by ``roi_radius`` voxel steps (a Euclidean
  ball in index space). Every wrong voxel lies in it (a wrong voxel is foreground in the prediction or the truth);
  the dilation adds a shell of background that a reviewer would look at, and leaves out the far background, whose
  trivially right voxels would inflate the AUROC.
* **AUROC**: of the score 1 - confidence for "voxel is wrong" against "voxel is right", over the ROI's voxels: the
  probability that a random wrong voxel is less confident than a random right one, ties counted half.
* **recall**: the volume of wrong voxels inside the flags mask / the volume of wrong voxels.
* **flagged_over_wrong**: the flagged volume (the whole served mask) / the wrong volume: how much a reviewer must look
  at per unit of error (1 with recall 1 would be a perfect mask).
* **precision**: the wrong volume inside the flags / the flagged volume.
* **Per class c** (one class against the rest): the ROI is the voxels predicted or true c, dilated the same way;
  *wrong* means the voxel is c in exactly one of prediction and truth (a false positive or a false negative of c);
  flagged volume = the flags inside that ROI. AUROC, recall, flagged_over_wrong and precision as above.

Over a dataset the voxels are pooled (volumes in ml, so cases of different voxel size weigh by volume). The AUROC is
pooled streaming: each case adds its wrong and right voxels to two histograms of the confidence on a fine logarithmic
grid of 1 - confidence (:func:`confidence_bins`: 4096 bins per power of two, down to 2**-25, so bins are 0.02 % wide
relative to 1 - confidence, where the confident voxels crowd); a wrong and a right voxel in the same bin count half.
That is exact for true ties and otherwise off by at most half the pairs that share a bin: the bound
``auroc_max_error`` is reported with it (Testing/metrics/test_error_detection.py checks it against the exact
Mann-Whitney statistic).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from acecal.errors import InvalidInputError

__all__ = [
    "DEFAULT_ROI_RADIUS",
    "ErrorDetectionAccumulator",
    "auroc_from_histograms",
    "confidence_bins",
    "roi_mask",
]

#: ROI margin around the predicted and true foreground, in voxel steps.
DEFAULT_ROI_RADIUS = 3.0

# Histogram of 1 - confidence by its float32 bit pattern (monotone for non-negative floats): the exponent and the top
# _MANTISSA_BITS of the mantissa. Everything below 2**_MIN_EXP (confidence within 3e-8 of 1, or 1) shares bin 0.
_MANTISSA_BITS = 12
_MIN_EXP = -25
_SHIFT = 23 - _MANTISSA_BITS
_BASE = (127 + _MIN_EXP) << 23
#: Number of histogram bins (1 - confidence < 1 always).
NUM_HIST_BINS = ((127 << 23) - _BASE >> _SHIFT) + 1


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    """Histogram bin of each voxel's confidence, increasing with 1 - confidence (int64, same shape).

    ``1 - confidence`` is formed in float32 (exact for confidence >= 0.5, Sterbenz) and binned by its bit pattern.
    """
    u = (np.float32(1.0) - np.asarray(confidence, dtype=np.float32)).astype(np.float32)
    bits = np.maximum(u, np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.clip((bits - _BASE) >> _SHIFT, 0, NUM_HIST_BINS - 1)


def auroc_from_histograms(wrong: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """(AUROC, bound on its binning error) from histograms over bins of increasing score (``confidence_bins``).

    AUROC = P(score of a wrong voxel > score of a right one) + P(same bin) / 2; NaN without wrong or right voxels.
    """
    w = np.asarray(wrong, dtype=np.float64)
    r = np.asarray(right, dtype=np.float64)
    nw, nr = w.sum(), r.sum()
    if nw == 0 or nr == 0:
        return float("nan"), float("nan")
    right_below = np.cumsum(r) - r
    pairs = nw * nr
    same = float((w * r).sum())
    return float((w * (right_below + 0.5 * r)).sum() / pairs), 0.5 * same / pairs


def _ball(radius: float) -> np.ndarray:
    h = int(math.floor(radius + 1e-9))
    g = np.mgrid[-h : h + 1, -h : h + 1, -h : h + 1]
    return (g**2).sum(0) <= radius**2 + 1e-9


def roi_mask(mask: np.ndarray, radius: float = DEFAULT_ROI_RADIUS) -> np.ndarray:
    """``mask`` dilated by a Euclidean ball of ``radius`` voxel steps (computed on the mask's bounding box)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, bool)
    if not mask.any():
        return out
    if radius <= 0:
        return mask.copy()
    h = int(math.floor(radius + 1e-9))
    sides = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        sides.append(slice(max(int(hit[0]) - h, 0), min(int(hit[-1]) + h + 1, mask.shape[ax])))
    box = tuple(sides)
    out[box] = ndimage.binary_dilation(mask[box], structure=_ball(radius))
    return out


def _stats(wrong: np.ndarray, flags: np.ndarray, roi: np.ndarray, bins: np.ndarray) -> Dict[str, Any]:
    """Counts and histograms of one view (overall or one class) of one case; ``flags``: the view's flagged voxels."""
    in_roi = roi.ravel()
    w = wrong.ravel()[in_roi]
    b = bins.ravel()[in_roi]
    return {
        "hist_wrong": np.bincount(b[w], minlength=NUM_HIST_BINS),
        "hist_right": np.bincount(b[~w], minlength=NUM_HIST_BINS),
        "wrong": int(wrong.sum()),
        "flagged": int(flags.sum()),
        "flagged_wrong": int((flags & wrong).sum()),
        "roi": int(in_roi.sum()),
    }


def _ratios(wrong_ml: float, flagged_ml: float, flagged_wrong_ml: float) -> Dict[str, Optional[float]]:
    wrong_ml, flagged_ml, flagged_wrong_ml = float(wrong_ml), float(flagged_ml), float(flagged_wrong_ml)
    return {
        "recall": flagged_wrong_ml / wrong_ml if wrong_ml > 0 else None,
        "flagged_over_wrong": flagged_ml / wrong_ml if wrong_ml > 0 else None,
        "precision": flagged_wrong_ml / flagged_ml if flagged_ml > 0 else None,
    }


def _nan_none(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


class ErrorDetectionAccumulator:
    """Pool error detection over cases (module docstring for the definitions).

    Args:
        class_names: names of all C classes (index 0 is the background).
        roi_radius: ROI margin in voxel steps.

    Memory: two histograms of :data:`NUM_HIST_BINS` int64 per view (overall + one per foreground class) and one short
    row per case.
    """

    def __init__(self, class_names: Sequence[str], roi_radius: float = DEFAULT_ROI_RADIUS) -> None:
        if len(class_names) < 2:
            raise InvalidInputError("error detection needs a background and at least one foreground class")
        if not (isinstance(roi_radius, (int, float)) and 0 <= roi_radius <= 50):
            raise InvalidInputError(f"roi_radius must be a number of voxel steps in [0, 50], got {roi_radius!r}")
        self.class_names = [str(n) for n in class_names]
        self.roi_radius = float(roi_radius)
        views = ["all", *self.class_names[1:]]
        self._hist = {v: (np.zeros(NUM_HIST_BINS, np.int64), np.zeros(NUM_HIST_BINS, np.int64)) for v in views}
        self._vol = {v: np.zeros(3) for v in views}  # wrong, flagged, flagged & wrong (ml)
        self._vox = {v: np.zeros(4, np.int64) for v in views}  # wrong, flagged, flagged & wrong, roi (voxels)
        self._cases: Dict[str, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._cases)

    def update(
        self,
        predicted: np.ndarray,
        confidence: np.ndarray,
        flags: np.ndarray,
        truth: np.ndarray,
        case_id: str,
        voxel_ml: float = 1.0,
    ) -> Dict[str, Any]:
        """Add one case; returns its row (the same fields as :meth:`aggregate`, without the per-class part).

        Args:
            predicted: (z, y, x) predicted label map (the served ``labels``).
            confidence: (z, y, x) served confidence in [0, 1].
            flags: (z, y, x) served flags mask (non-zero = flagged).
            truth: (z, y, x) true label map.
            voxel_ml: volume of one voxel in ml (the grid's), for the volume ratios.
        """
        pred = np.asarray(predicted)
        true = np.asarray(truth)
        conf = np.asarray(confidence)
        flag = np.asarray(flags) != 0
        if not (pred.shape == true.shape == conf.shape == flag.shape) or pred.ndim != 3:
            raise InvalidInputError(
                f"predicted, confidence, flags and truth must be 3-D and of one shape, got {pred.shape}, {conf.shape}, "
                f"{flag.shape}, {true.shape}"
            )
        if not (isinstance(voxel_ml, (int, float)) and voxel_ml > 0 and math.isfinite(voxel_ml)):
            raise InvalidInputError(f"voxel_ml must be a positive number, got {voxel_ml!r}")
        case_id = str(case_id)
        if case_id in self._cases:
            raise InvalidInputError(f"case {case_id!r} was already added")
        bins = confidence_bins(conf)
        wrong = pred != true
        views = {"all": (wrong, roi_mask((pred != 0) | (true != 0), self.roi_radius), flag)}
        for c, name in enumerate(self.class_names[1:], start=1):
            pc, tc = pred == c, true == c
            roi_c = roi_mask(pc | tc, self.roi_radius)
            views[name] = (pc != tc, roi_c, flag & roi_c)
        row: Dict[str, Any] = {}
        for name, (w, roi, fl) in views.items():
            s = _stats(w, fl, roi, bins)
            hw, hr = self._hist[name]
            hw += s["hist_wrong"]
            hr += s["hist_right"]
            counts = np.array([s["wrong"], s["flagged"], s["flagged_wrong"], s["roi"]], np.int64)
            self._vox[name] += counts
            self._vol[name] += counts[:3] * float(voxel_ml)
            if name == "all":
                auroc, bound = auroc_from_histograms(s["hist_wrong"], s["hist_right"])
                row = {
                    "auroc": _nan_none(auroc),
                    "auroc_max_error": _nan_none(bound),
                    **_ratios(*(counts[:3] * float(voxel_ml))),
                    "wrong_voxels": int(counts[0]),
                    "flagged_voxels": int(counts[1]),
                    "flagged_wrong_voxels": int(counts[2]),
                    "roi_voxels": int(counts[3]),
                }
        self._cases[case_id] = row
        return row

    def _view(self, name: str) -> Dict[str, Any]:
        hw, hr = self._hist[name]
        auroc, bound = auroc_from_histograms(hw, hr)
        vol, vox = self._vol[name], self._vox[name]
        return {
            "auroc": _nan_none(auroc),
            "auroc_max_error": _nan_none(bound),
            **_ratios(*vol),
            "wrong_ml": float(vol[0]),
            "flagged_ml": float(vol[1]),
            "flagged_wrong_ml": float(vol[2]),
            "wrong_voxels": int(vox[0]),
            "flagged_voxels": int(vox[1]),
            "flagged_wrong_voxels": int(vox[2]),
            "roi_voxels": int(vox[3]),
        }

    def aggregate(self) -> Dict[str, Any]:
        """Pooled over the cases: the overall view's fields, ``per_class`` {name: fields}, ``per_case`` {id: row},
        ``roi_radius`` and ``num_cases``. Ratios are None where undefined (no wrong or no flagged voxel)."""
        return {
            **self._view("all"),
            "per_class": {n: self._view(n) for n in self.class_names[1:]},
            "per_case": {k: dict(v) for k, v in self._cases.items()},
            "roi_radius": self.roi_radius,
            "num_cases": len(self._cases),
        }

    @property
    def case_ids(self) -> List[str]:
        return list(self._cases)
