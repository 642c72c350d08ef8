"""Uncertainty maps and uncertain boundary regions on constructed probability maps whose answer is known."""

import math

import numpy as np
import pytest
from scipy import ndimage

from acecal.geometry import Grid, lps_to_ras
from acecal.inference.uncertainty import (
    boundary_band,
    boundary_mask,
    confidence_maps,
    describe_regions,
    summarize,
    uncertain_boundary_flags,
)


def _two_class(p1: np.ndarray) -> np.ndarray:
    p1 = p1.astype(np.float32)
    return np.stack([1.0 - p1, p1])


def test_confidence_maps_known_values():
    probs = np.zeros((3, 1, 1, 4), np.float32)
    probs[:, 0, 0, 0] = [1.0, 0.0, 0.0]  # certain background
    probs[:, 0, 0, 1] = [1 / 3, 1 / 3, 1 / 3]  # uniform
    probs[:, 0, 0, 2] = [0.1, 0.2, 0.7]
    probs[:, 0, 0, 3] = [0.0, 0.0, 1.0]
    labels, conf, unc = confidence_maps(probs)
    assert labels.dtype == np.uint8 and conf.dtype == np.float32 and unc.dtype == np.float32
    assert labels.ravel().tolist() == [0, 0, 2, 2]  # ties go to the lowest class
    np.testing.assert_allclose(conf.ravel(), [1.0, 1 / 3, 0.7, 1.0], rtol=1e-6)
    h = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7)) / math.log(3)
    np.testing.assert_allclose(unc.ravel(), [0.0, 1.0, h, 0.0], atol=1e-5)


def test_boundary_mask_marks_both_sides_of_an_interface():
    lab = np.zeros((5, 6, 7), np.uint8)
    lab[:, :, 3:] = 1  # interface between x = 2 and x = 3
    b = boundary_mask(lab)
    assert b[:, :, 2].all() and b[:, :, 3].all()
    assert b.sum() == 2 * 5 * 6


def test_boundary_band_in_voxels_and_in_mm_with_anisotropic_spacing():
    lab = np.zeros((4, 4, 20), np.uint8)
    lab[:, :, 10:] = 1  # boundary voxels at x = 9 and 10
    band = boundary_band(lab, band_voxels=2)
    xs = np.nonzero(band[0, 0])[0].tolist()
    assert xs == [7, 8, 9, 10, 11, 12]
    # x spacing 2 mm: a 3 mm band reaches one voxel (2 mm) beyond each boundary voxel, not two (4 mm)
    band_mm = boundary_band(lab, spacing_zyx=(1.0, 1.0, 2.0), band_mm=3.0)
    assert np.nonzero(band_mm[0, 0])[0].tolist() == [8, 9, 10, 11]
    # no boundary at all: empty band
    assert not boundary_band(np.ones((3, 3, 3), np.uint8)).any()


def _sphere(shape, centre, r):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= r * r


def test_flags_keep_boundary_regions_drop_small_ones_and_ignore_interior_doubt():
    shape = (32, 32, 32)
    inside = _sphere(shape, (16, 16, 16), 8)
    p1 = np.where(inside, 0.99, 0.01).astype(np.float32)
    # (a) a doubtful patch straddling the boundary on the +x side: 5x5 in (z, y), x 22..25
    p1[14:19, 14:19, 22:26] = np.where(inside[14:19, 14:19, 22:26], 0.6, 0.4)
    # (b) a tiny doubtful patch on the -x boundary (2 voxels): dropped by min_region_voxels
    p1[16, 16, 8:10] = np.where(inside[16, 16, 8:10], 0.55, 0.45)
    # (c) doubt deep inside the sphere, far from any boundary: never flagged
    p1[15:18, 15:18, 15:18] = 0.6
    labels, conf, _ = confidence_maps(_two_class(p1))
    flags, regions, n = uncertain_boundary_flags(labels, conf, 0.8, band_voxels=2, min_region_voxels=5)
    assert n == 1
    assert flags.dtype == np.uint8 and set(np.unique(flags)) <= {0, 1}
    assert (flags == (regions > 0)).all()
    expected = np.zeros(shape, bool)
    expected[14:19, 14:19, 22:26] = True
    band = boundary_band(labels, band_voxels=2)
    np.testing.assert_array_equal(flags.astype(bool), expected & band)
    assert not flags[15:18, 15:18, 15:18].any()
    # with a lower minimum size the tiny patch is a second (smaller, so second) region
    _, regions2, n2 = uncertain_boundary_flags(labels, conf, 0.8, band_voxels=2, min_region_voxels=1)
    assert n2 == 2 and (regions2[16, 16, 8:10] == 2).all()
    # the threshold is strict: at exactly 0.6 nothing in patch (a) is below 0.6
    _, _, n3 = uncertain_boundary_flags(labels, conf, 0.6, band_voxels=2, min_region_voxels=1)
    assert n3 == 1  # only the tiny patch (0.55) remains


def test_connectivity_changes_grouping():
    lab = np.zeros((3, 6, 6), np.uint8)
    lab[:, :, 3:] = 1
    conf = np.ones(lab.shape, np.float32)
    conf[1, 1, 2] = 0.5  # two diagonal neighbours along the boundary
    conf[1, 2, 3] = 0.5
    _, _, n6 = uncertain_boundary_flags(lab, conf, 0.8, min_region_voxels=1, connectivity=6)
    _, _, n26 = uncertain_boundary_flags(lab, conf, 0.8, min_region_voxels=1, connectivity=26)
    assert (n6, n26) == (2, 1)
    with pytest.raises(ValueError):
        uncertain_boundary_flags(lab, conf, 0.8, connectivity=4)


def test_region_geometry_on_an_oblique_grid():
    # a 3-class map: a doubtful box on the boundary of class 2 (near label 0)
    shape = (10, 12, 14)
    probs = np.zeros((3,) + shape, np.float32)
    probs[0] = 0.98
    probs[1] = 0.01
    probs[2] = 0.01
    probs[:, :, :, 7:] = np.array([0.01, 0.01, 0.98])[:, None, None, None]
    box = (slice(3, 6), slice(4, 8), slice(6, 8))  # z 3..5, y 4..7, x 6..7: straddles the 0|2 boundary
    probs[:, box[0], box[1], box[2]] = np.array([0.45, 0.1, 0.45])[:, None, None, None]
    probs[2, box[0], box[1], 7] = 0.46  # the x = 7 side stays class 2
    probs[0, box[0], box[1], 7] = 0.44
    labels, conf, _ = confidence_maps(probs)
    c, s = math.cos(0.3), math.sin(0.3)
    direction = (c, 0.0, s, 0.0, -1.0, 0.0, s, 0.0, -c)  # tilted, with a flipped axis
    grid = Grid((14, 12, 10), (0.5, 2.0, 1.5), (10.0, -20.0, 30.0), direction)
    flags, regions, n = uncertain_boundary_flags(
        labels, conf, 0.9, grid.spacing[::-1], band_voxels=1, min_region_voxels=1
    )
    assert n == 1
    (r,) = describe_regions(regions, n, probs, conf, grid, ["background", "a", "b"])
    assert r["class"] == 2 and r["class_name"] == "b"
    assert r["voxels"] == 3 * 4 * 2
    assert r["volume_ml"] == pytest.approx(24 * 0.5 * 2.0 * 1.5 / 1000)
    centre_ijk = np.array([6.5, 5.5, 4.0])
    np.testing.assert_allclose(r["centroid_ijk"], centre_ijk)
    # reported to 1e-4 mm
    np.testing.assert_allclose(r["centroid_lps"], grid.index_to_lps(centre_ijk), atol=1e-4)
    np.testing.assert_allclose(r["centroid_ras"], lps_to_ras(grid.index_to_lps(centre_ijk)), atol=1e-4)
    assert r["bbox_ijk"] == {"min": [6, 4, 3], "max": [7, 7, 5]}
    lo, hi = np.array(r["bbox_lps"]["min"]), np.array(r["bbox_lps"]["max"])
    corners = grid.index_to_lps(np.array([[i, j, k] for i in (5.5, 7.5) for j in (3.5, 7.5) for k in (2.5, 5.5)]))
    np.testing.assert_allclose(lo, corners.min(0), atol=1e-4)
    np.testing.assert_allclose(hi, corners.max(0), atol=1e-4)
    ras = lps_to_ras(corners)
    np.testing.assert_allclose(r["bbox_ras"]["min"], ras.min(0), atol=1e-4)
    np.testing.assert_allclose(r["bbox_ras"]["max"], ras.max(0), atol=1e-4)
    assert r["mean_confidence"] == pytest.approx(0.455, abs=1e-3)


def test_summary_volumes_and_confidence_per_class():
    lab = np.zeros((2, 2, 5), np.uint8)
    lab[..., 3:] = 1
    conf = np.full(lab.shape, 0.9, np.float32)
    conf[..., 3:] = 0.7
    flags = np.zeros(lab.shape, np.uint8)
    flags[..., 2:4] = 1
    grid = Grid((5, 2, 2), (2.0, 1.0, 0.5), (0, 0, 0))
    s = summarize(lab, conf, flags, grid, ["background", "lesion"])
    bg, les = s["classes"]
    assert (bg["voxels"], les["voxels"]) == (12, 8)
    assert bg["volume_ml"] == pytest.approx(12 * 1e-3) and les["volume_ml"] == pytest.approx(8 * 1e-3)
    assert bg["mean_confidence"] == pytest.approx(0.9) and les["mean_confidence"] == pytest.approx(0.7)
    assert (bg["uncertain_voxels"], les["uncertain_voxels"]) == (4, 4)
    assert s["uncertain_volume_ml"] == pytest.approx(8e-3)
    # a class with no voxels has no mean confidence
    s2 = summarize(lab, conf, flags, grid, ["background", "lesion", "other"])
    assert s2["classes"][2]["voxels"] == 0 and s2["classes"][2]["mean_confidence"] is None


@pytest.mark.parametrize(
    "kw",
    [
        dict(band_voxels=0),
        dict(band_voxels=1.5),
        dict(band_voxels=2.5),
        dict(band_mm=2.0),
        dict(band_mm=3.5),
        dict(band_mm=9.0),
    ],
)
def test_band_equals_the_distance_transform_definition(kw):
    """The fast path (dilation by a ball) and the slow one (distance transform) are the same definition."""
    rng = np.random.default_rng(0)
    lab = (ndimage.gaussian_filter(rng.random((20, 22, 24)), 2) > 0.5).astype(np.uint8)
    spacing = (1.5, 0.7, 1.2)
    band = boundary_band(lab, spacing, **kw)
    b = boundary_mask(lab)
    if "band_mm" in kw:
        expected = ndimage.distance_transform_edt(~b, sampling=spacing) <= kw["band_mm"] + 1e-6
    else:
        expected = ndimage.distance_transform_edt(~b) <= kw["band_voxels"] + 1e-6
    np.testing.assert_array_equal(band, expected)
