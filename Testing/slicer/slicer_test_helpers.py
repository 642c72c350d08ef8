"""Volumes with awkward geometry and their known answers, for the Slicer Lib tests (numpy only)."""

from __future__ import annotations

import numpy as np

from acecal.geometry import Grid


def rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def oblique_grid(shape_zyx=(18, 22, 26), spacing=(0.7, 1.3, 2.5), origin=(-31.5, 47.25, 12.0)) -> Grid:
    """A tilted (two rotations), axis-permuted and flipped, anisotropic grid with an offset origin (LPS)."""
    permute_flip = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # i -> +P, j -> -S, k -> -L
    direction = rotation((1, 2, 3), 23.0) @ rotation((0, 0, 1), -37.0) @ permute_flip
    return Grid.from_zyx_shape(shape_zyx, spacing, origin, direction.ravel())


def sphere_case(grid: Grid, centre_ijk=None, radius_mm: float = 7.0, seed: int = 0):
    """(image float32, label uint8, centre in LPS): a bright sphere of physical radius ``radius_mm`` on ``grid``."""
    rng = np.random.default_rng(seed)
    size = np.array(grid.size)
    c_ijk = size / 2.0 - 0.5 if centre_ijk is None else np.asarray(centre_ijk, float)
    centre_lps = grid.index_to_lps(c_ijk)
    kk, jj, ii = np.meshgrid(*[np.arange(s) for s in grid.shape_zyx], indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).astype(float)
    lps = grid.index_to_lps(ijk)
    label = (np.linalg.norm(lps - centre_lps, axis=-1) <= radius_mm).astype(np.uint8)
    image = (label * 100.0 + rng.normal(0, 5.0, label.shape)).astype(np.float32)
    return image, label, centre_lps
