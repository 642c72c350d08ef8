"""An oblique (tilted, axes permuted and flipped), anisotropic, offset volume whose segmentation is known exactly.

The image is sampled directly in physical space, so the truth on its own grid needs no resampling: a voxel is in the
sphere when its centre (LPS mm) is within ``radius_mm`` of the sphere's centre. Intensities follow
``synthetic.make_case`` (sphere ~ N(1, noise), background ~ N(0, noise), times a scale), so the tiny model sees
what it was trained on. numpy only.
"""

from __future__ import annotations

import numpy as np

from acecal.geometry import Grid


def rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


#: axis i along +S, axis j along +L, axis k along -P (= anterior): permuted and flipped (left-handed)
PERMUTE_FLIP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def oblique_grid(
    size=(26, 20, 24), spacing=(0.9, 1.3, 1.1), origin=(-120.5, 37.25, 410.0), tilt_deg: float = 20.0
) -> Grid:
    direction = rotation((1.0, 1.0, 0.0), tilt_deg) @ PERMUTE_FLIP
    return Grid(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def sphere_on_grid(
    grid: Grid,
    *,
    radius_mm: float = 5.0,
    noise: float = 0.15,
    scale: float = 10.0,
    seed: int = 0,
    centre_offset_mm=(0.0, 0.0, 0.0),
):
    """(image float32, label uint8), both (z, y, x) on ``grid``, and the sphere's LPS centre."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
    lps = grid.index_to_lps(np.stack([i, j, k], axis=-1))
    centre = grid.index_to_lps((np.asarray(grid.size, float) - 1) / 2) + np.asarray(centre_offset_mm, float)
    label = (np.linalg.norm(lps - centre, axis=-1) <= radius_mm).astype(np.uint8)
    image = label.astype(np.float32) + rng.normal(0.0, noise, grid.shape_zyx).astype(np.float32)
    return (image * scale).astype(np.float32), label, centre


def oblique_case(**kw):
    """(image, label, grid, centre_lps) for the default oblique, anisotropic, offset grid."""
    grid = oblique_grid()
    image, label, centre = sphere_on_grid(grid, **kw)
    return image, label, grid, centre
