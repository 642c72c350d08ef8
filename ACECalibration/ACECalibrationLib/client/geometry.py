# Generated from server/acecal/geometry.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""Image grids and the one place where LPS and RAS meet.

Files, ITK and SimpleITK describe physical space in **LPS** (x to the patient's Left, y Posterior, z Superior);
3D Slicer and MONAI's affines speak **RAS** (Right-to-left flipped: x Right, y Anterior, z Superior). The two differ by
a sign flip of the first two physical axes. Every conversion in this project goes through :data:`LPS_TO_RAS` here,
on the server, in the client and in the Slicer module alike.

Array axis order is a second classic trap: a :class:`Grid` is indexed (i, j, k) = (x, y, z) like ITK's index, while
numpy arrays from SimpleITK or Slicer are (k, j, i) = (z, y, x). :meth:`Grid.from_zyx_shape` and
:attr:`Grid.shape_zyx` make the order explicit.

numpy only: importable by the light client and inside 3D Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: Homogeneous 4x4 flip between LPS and RAS physical coordinates (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(points: Any) -> np.ndarray:
    """Convert physical points (..., 3) from LPS to RAS (also RAS to LPS: the flip is its own inverse)."""
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1] != 3:
        raise ValueError(f"points must have 3 coordinates in the last axis, got shape {p.shape}")
    return p * LPS_TO_RAS.diagonal()[:3]


ras_to_lps = lps_to_ras


def affine_lps_to_ras(affine: Any) -> np.ndarray:
    """Convert a 4x4 index-to-physical matrix from LPS to RAS (or back)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    return LPS_TO_RAS @ a


affine_ras_to_lps = affine_lps_to_ras


@dataclass(frozen=True)
class Grid:
    """A 3-D image grid in LPS, as ITK and every image file describe it.

    Attributes:
        size: number of voxels along (i, j, k) = (x, y, z).
        spacing: voxel size in mm along (i, j, k).
        origin: LPS position in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major as SimpleITK's ``GetDirection()``; column n is axis n's unit vector.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("a Grid needs a 3-D size, spacing and origin and 9 direction cosines")
        if any(int(s) < 1 for s in self.size):
            raise ValueError(f"grid size must be positive, got {self.size}")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"grid spacing must be positive and finite, got {self.spacing}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_zyx_shape(
        cls,
        shape_zyx: Sequence[int],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[float] | None = None,
    ) -> Grid:
        """Grid for a numpy array of shape (z, y, x), as SimpleITK's ``GetArrayFromImage`` returns."""
        z, y, x = (int(s) for s in shape_zyx)
        d = tuple(np.eye(3).ravel()) if direction is None else tuple(np.asarray(direction, float).ravel())
        return cls((x, y, z), tuple(spacing), tuple(origin), d)  # type: ignore[arg-type]

    @classmethod
    def from_ijk_to_lps(cls, size: Sequence[int], matrix: Any) -> Grid:
        """Grid from a 4x4 index-to-LPS matrix (columns = spacing-scaled axis vectors)."""
        m = np.asarray(matrix, dtype=np.float64)
        axes = m[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("index-to-physical matrix has a zero-length axis")
        direction = axes / spacing
        return cls(tuple(size), tuple(spacing), tuple(m[:3, 3]), tuple(direction.ravel()))  # type: ignore[arg-type]

    @classmethod
    def from_ijk_to_ras(cls, size: Sequence[int], matrix: Any) -> Grid:
        """Grid from a 4x4 index-to-RAS matrix, as a Slicer volume node's ``GetIJKToRASMatrix``."""
        return cls.from_ijk_to_lps(size, affine_ras_to_lps(matrix))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(tuple(d["size"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    # --- views --------------------------------------------------------------------------------------------------
    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy array shape (z, y, x) of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping a continuous index (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping a continuous index (i, j, k, 1) to RAS millimetres (Slicer's IJKToRAS)."""
        return affine_lps_to_ras(self.ijk_to_lps)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, ijk: Any) -> np.ndarray:
        """Continuous indices (..., 3) in (i, j, k) order to LPS points (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        m = self.ijk_to_lps
        lps: np.ndarray = p @ m[:3, :3].T + m[:3, 3]
        return lps

    def index_to_ras(self, ijk: Any) -> np.ndarray:
        return lps_to_ras(self.index_to_lps(ijk))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        """True when both grids have the same size and, within ``atol`` (mm / cosines), the same geometry."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )
