"""Voxel-wise confidence, uncertainty and the uncertain boundary regions, from calibrated class probabilities.

numpy + scipy only; every array is (z, y, x) on one :class:`acecal.geometry.Grid` (probabilities (C, z, y, x)).

Definitions (also in ``docs/api.md``):

- **labels**: the predicted class, ``argmax_c p_c``.
- **confidence**: the (temperature-calibrated) probability of the predicted class, ``max_c p_c`` in [1/C, 1].
- **uncertainty**: normalised entropy ``-sum_c p_c log p_c / log C`` in [0, 1] (0 = certain, 1 = uniform).
- **boundary**: voxels with at least one face neighbour (6-connectivity) of a different predicted class.
- **band**: voxels whose distance to the nearest boundary voxel is at most ``band_mm`` millimetres (physical distance,
  so anisotropic spacing is honoured) or, when ``band_mm`` is not given, ``band_voxels`` voxel steps.
- **flags**: voxels in the band whose confidence is below the threshold, grouped into connected components
  (``connectivity`` 6, 18 or 26); components with fewer than ``min_region_voxels`` voxels are dropped from the mask
  and from the region list. Low confidence far from any predicted boundary (a structure missed altogether) is not
  flagged: the regions are meant for reviewing and correcting boundaries.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
from scipy import ndimage

from acecal.geometry import Grid, lps_to_ras

#: defaults shared by the server's params schema, the CLI and in-process inference
DEFAULT_BAND_VOXELS = 2.0
DEFAULT_MIN_REGION_VOXELS = 10
DEFAULT_CONNECTIVITY: Literal[6, 18, 26] = 26
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 label maps up to 255 classes (the documented case), uint16 beyond."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def confidence_maps(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidence, uncertainty) from class probabilities of shape (C, z, y, x).

    Returns: labels (uint8 or uint16), confidence float32 (probability of the predicted class), uncertainty float32
    (entropy normalised by log C).
    """
    p = np.asarray(probs)
    if p.ndim != 4 or p.shape[0] < 2:
        raise ValueError(f"expected probabilities of shape (C >= 2, z, y, x), got {p.shape}")
    # class by class over contiguous (z, y, x) planes: faster than argmax over the strided class axis
    labels = np.zeros(p.shape[1:], label_dtype(p.shape[0]))
    confidence = p[0].astype(np.float32, copy=True)
    for c in range(1, p.shape[0]):
        better = p[c] > confidence  # strict: ties go to the lowest class, as argmax does
        labels[better] = c
        np.maximum(confidence, p[c], out=confidence)
    ent = np.zeros(p.shape[1:], np.float32)
    for c in range(p.shape[0]):  # class by class: no (C, z, y, x) temporary
        pc = p[c].astype(np.float32, copy=False)
        ent -= pc * np.log(np.clip(pc, 1e-12, 1.0))
    ent /= math.log(p.shape[0])
    np.clip(ent, 0.0, 1.0, out=ent)
    return labels, confidence, ent


def boundary_mask(labels: np.ndarray) -> np.ndarray:
    """Voxels with at least one face neighbour of a different label (both sides of every interface)."""
    lab = np.asarray(labels)
    b = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        a = np.swapaxes(lab, 0, ax)
        bb = np.swapaxes(b, 0, ax)
        diff = a[1:] != a[:-1]
        bb[1:] |= diff
        bb[:-1] |= diff
    return b


_MAX_BALL = 250  # structuring elements up to this many voxels: dilation; larger bands: distance transform
_MAX_BALL_BOX = 4096  # a ball is built only when its bounding box is this small (a bigger one holds > _MAX_BALL voxels)


def _ball(sampling: np.ndarray, radius: float) -> np.ndarray:
    """Offsets (z, y, x) whose physical length (``sampling`` per axis) is at most ``radius``."""
    half = np.floor(radius / sampling + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, sampling, strict=True)], indexing="ij")
    return sum(g**2 for g in grids) <= radius**2 + 1e-6


def _margin_voxels(spacing_zyx: Sequence[float], band_mm: Optional[float], band_voxels: float) -> np.ndarray:
    if band_mm is not None:
        return np.ceil(band_mm / np.asarray(spacing_zyx, float)).astype(int) + 1
    return np.full(3, int(math.ceil(band_voxels)) + 1)


def boundary_band(
    labels: np.ndarray,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    band_mm: Optional[float] = None,
    band_voxels: float = DEFAULT_BAND_VOXELS,
    within: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Voxels within the band around predicted boundaries (see the module docstring).

    Args:
        spacing_zyx: voxel size in mm along (z, y, x) (``Grid.spacing`` reversed).
        band_mm: half-width in millimetres; wins over ``band_voxels`` when given.
        band_voxels: half-width in voxel steps (Euclidean in index space).
        within: optional mask of the only voxels the caller cares about: the distance transform then runs on their
            bounding box (plus the band) instead of the whole volume. Voxels outside ``within`` come back False.
    """
    lab = np.asarray(labels)
    band = np.zeros(lab.shape, bool)
    boundary = boundary_mask(lab)
    if not boundary.any():
        return band
    if within is not None:
        if not within.any():
            return band
        margin = _margin_voxels(spacing_zyx, band_mm, band_voxels)
        box_slices = []
        for ax, (m, n) in enumerate(zip(margin, lab.shape, strict=True)):
            hit = np.nonzero(within.any(axis=tuple(a for a in range(within.ndim) if a != ax)))[0]
            box_slices.append(slice(max(int(hit[0]) - m, 0), min(int(hit[-1]) + m + 1, n)))
        sl: tuple[slice, ...] = tuple(box_slices)
    else:
        sl = tuple(slice(0, n) for n in lab.shape)
    sub = boundary[sl]
    if not sub.any():
        return band
    sampling = np.asarray(spacing_zyx, float) if band_mm is not None else np.ones(3)
    radius = float(band_mm) if band_mm is not None else float(band_voxels)
    # a band wider than the volume's diagonal covers all of it: the same band, with a bounded radius
    radius = min(radius, float(np.sqrt(np.sum((np.asarray(lab.shape) * sampling) ** 2))))
    # the ball's bounding box, counted arithmetically: no (2r+1)^3 grid is built just to learn it is large
    box = math.prod(2 * min(int(math.floor(radius / max(s, 1e-9) + 1e-9)), 1 << 20) + 1 for s in sampling)
    ball = _ball(sampling, radius) if box <= _MAX_BALL_BOX else None
    if ball is not None and ball.sum() <= _MAX_BALL:  # small band: one dilation by the ball is exact, much faster
        band[sl] = ndimage.binary_dilation(sub, structure=ball)
    else:
        dist = ndimage.distance_transform_edt(~sub, sampling=tuple(sampling))
        band[sl] = dist <= radius + 1e-6
    if within is not None:
        band &= within
    return band


def uncertain_boundary_flags(
    labels: np.ndarray,
    confidence: np.ndarray,
    threshold: float,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    band_mm: Optional[float] = None,
    band_voxels: float = DEFAULT_BAND_VOXELS,
    min_region_voxels: int = DEFAULT_MIN_REGION_VOXELS,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Flag uncertain boundary voxels and group them into regions.

    Returns:
        flags: uint8 mask (1 = in a kept uncertain region);
        regions: int32 map, 0 outside, 1..n inside the kept regions, numbered by decreasing size;
        n: the number of regions.
    """
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError("connectivity must be 6, 18 or 26")
    candidates = np.asarray(confidence) < threshold
    band = boundary_band(labels, spacing_zyx, band_mm=band_mm, band_voxels=band_voxels, within=candidates)
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    comp, n = ndimage.label(band, structure=structure)
    regions = np.zeros(comp.shape, np.int32)
    if n == 0:
        return np.zeros(comp.shape, np.uint8), regions, 0
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = np.nonzero(sizes >= max(int(min_region_voxels), 1))[0]
    order = keep[np.argsort(-sizes[keep], kind="stable")]  # biggest first; ties by original (scan) order
    lut = np.zeros(n + 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    regions = lut[comp]
    return (regions > 0).astype(np.uint8), regions, int(len(order))


def _box(grid: Grid, lo_ijk: np.ndarray, hi_ijk: np.ndarray, to_ras: bool) -> dict:
    """Axis-aligned box (in LPS or RAS) enclosing the voxels lo..hi (inclusive), voxel edges included."""
    lo, hi = lo_ijk - 0.5, hi_ijk + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    pts = grid.index_to_lps(corners)
    if to_ras:
        pts = lps_to_ras(pts)
    return {"min": [_r(v, 4) for v in pts.min(0)], "max": [_r(v, 4) for v in pts.max(0)]}


def _r(v: float, digits: int) -> float:
    """Rounded for the JSON reply: 4 decimals of a mm (0.1 um), 6 of a probability; keeps replies small."""
    return round(float(v), digits)


def describe_regions(
    regions: np.ndarray,
    n: int,
    probs: np.ndarray,
    confidence: np.ndarray,
    grid: Grid,
    class_names: Sequence[str],
) -> list[dict]:
    """One dict per region (id 1..n): class, voxels, volume, confidence, centroid and bounding boxes (LPS and RAS).

    ``class`` is the foreground class whose boundary the region sits on: the non-background class with the largest
    summed probability over the region's voxels (the region straddles the boundary, so it holds voxels predicted as
    that class and as its neighbour).
    """
    out: list[dict] = []
    if n == 0:
        return out
    voxel_ml = grid.voxel_volume_ml
    flat = regions.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    conf_sum = np.bincount(flat, weights=confidence.ravel(), minlength=n + 1)
    fg = np.stack(
        [np.bincount(flat, weights=probs[c].ravel(), minlength=n + 1) for c in range(1, probs.shape[0])]
    )  # (C-1, n+1) summed probability per region
    slices = ndimage.find_objects(regions, max_label=n)
    for rid, sl in enumerate(slices, start=1):
        if sl is None:  # pragma: no cover - every kept id has voxels
            continue
        m = regions[sl] == rid
        count = int(counts[rid])
        # centroid from the mask's marginal sums: no per-voxel coordinate arrays
        kji = [
            float(np.dot(m.sum(axis=tuple(a for a in range(3) if a != ax)), np.arange(m.shape[ax]))) / count
            + sl[ax].start
            for ax in range(3)
        ]
        centroid_ijk = np.array(kji[::-1])
        lo = np.array([s.start for s in sl][::-1], float)  # find_objects gives the tight box
        hi = np.array([s.stop - 1 for s in sl][::-1], float)
        cls = int(np.argmax(fg[:, rid])) + 1
        centroid_lps = grid.index_to_lps(centroid_ijk)
        out.append(
            {
                "id": rid,
                "class": cls,
                "class_name": class_names[cls],
                "voxels": count,
                "volume_ml": _r(count * voxel_ml, 7),
                "mean_confidence": _r(conf_sum[rid] / count, 6),
                "min_confidence": _r(confidence[sl][m].min(), 6),
                "centroid_ijk": [_r(v, 4) for v in centroid_ijk],
                "centroid_lps": [_r(v, 4) for v in centroid_lps],
                "centroid_ras": [_r(v, 4) for v in lps_to_ras(centroid_lps)],
                "bbox_ijk": {"min": [int(v) for v in lo], "max": [int(v) for v in hi]},
                "bbox_lps": _box(grid, lo, hi, to_ras=False),
                "bbox_ras": _box(grid, lo, hi, to_ras=True),
            }
        )
    return out


def summarize(
    labels: np.ndarray, confidence: np.ndarray, flags: np.ndarray, grid: Grid, class_names: Sequence[str]
) -> dict:
    """Per class: voxels, volume (ml), mean confidence and uncertain volume; overall uncertain volume."""
    nc = len(class_names)
    lab = labels.ravel().astype(np.int64)
    counts = np.bincount(lab, minlength=nc)[:nc]
    conf_sum = np.bincount(lab, weights=confidence.ravel().astype(np.float64), minlength=nc)[:nc]
    unc = np.bincount(lab, weights=flags.ravel().astype(np.float64), minlength=nc)[:nc]
    voxel_ml = grid.voxel_volume_ml
    classes = []
    for c in range(nc):
        classes.append(
            {
                "value": c,
                "name": class_names[c],
                "voxels": int(counts[c]),
                "volume_ml": float(counts[c] * voxel_ml),
                "mean_confidence": float(conf_sum[c] / counts[c]) if counts[c] else None,
                "uncertain_voxels": int(unc[c]),
                "uncertain_volume_ml": float(unc[c] * voxel_ml),
            }
        )
    n_unc = int(flags.sum())
    return {
        "classes": classes,
        "mean_confidence": float(confidence.mean()),
        "uncertain_voxels": n_unc,
        "uncertain_volume_ml": float(n_unc * voxel_ml),
        "voxel_volume_ml": float(voxel_ml),
    }
