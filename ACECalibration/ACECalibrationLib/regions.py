"""The uncertain-regions table and jumping from one region to the next.

The server finds uncertain boundary regions (connected components of low-confidence voxels near predicted
boundaries) and reports each with its class, size, mean confidence and centroid in LPS and RAS. This module turns
that list into a ``vtkMRMLTableNode`` (one row per region) and turns a row back into the RAS point the slice views
should centre on. The RAS centroid comes from the server (computed there with :mod:`acecal.geometry`); where a reply
carries only LPS, :func:`acecal.geometry.lps_to_ras` converts it: no second conversion exists here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from acecal.geometry import lps_to_ras

from ._mrml import mrml, vtk

__all__ = [
    "COLUMNS",
    "Region",
    "region_from_reply",
    "create_regions_table",
    "update_regions_table",
    "regions_from_table",
    "region_ras",
    "to_world_ras",
    "jump_slices_to",
    "RegionNavigator",
]

COL_ID = "ID"
COL_CLASS = "Class"
COL_VOXELS = "Voxels"
COL_VOLUME = "Volume (ml)"
COL_CONFIDENCE = "Mean confidence"
COL_R, COL_A, COL_S = "Centroid R", "Centroid A", "Centroid S"
#: Column names of the regions table, in order.
COLUMNS = (COL_ID, COL_CLASS, COL_VOXELS, COL_VOLUME, COL_CONFIDENCE, COL_R, COL_A, COL_S)


@dataclass(frozen=True)
class Region:
    """One uncertain region as the table shows it; ``centroid_ras`` in the (local) RAS of the input volume."""

    id: int
    class_name: str
    voxel_count: int
    volume_ml: float
    mean_confidence: float
    centroid_ras: tuple[float, float, float]


def _first(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def region_from_reply(d: Any, labels: Mapping[Any, str] | None = None) -> Region:
    """A :class:`Region` from one entry of the server's ``regions`` list (a dict or an object with attributes).

    ``class`` may be a label value or a name; with ``labels`` (value -> name) values become names.
    """
    if not isinstance(d, Mapping):  # acecal.client.Region: its server dict, or its attributes
        raw = getattr(d, "raw", None)
        d = raw if isinstance(raw, Mapping) and raw else {k: getattr(d, k) for k in dir(d) if not k.startswith("_")}
    cls = _first(d, "class_name", "class", "label_name", "label", default="")
    if labels is not None and not isinstance(cls, str):
        cls = labels.get(str(cls), labels.get(cls, str(cls)))  # type: ignore[arg-type]
    ras = _first(d, "centroid_ras")
    if ras is None:
        lps = _first(d, "centroid_lps", "centroid")
        if lps is None:
            raise ValueError(f"region {d!r} has no centroid")
        ras = lps_to_ras(lps)
    ras = tuple(float(x) for x in np.asarray(ras, dtype=float).ravel()[:3])
    return Region(
        id=int(_first(d, "id", "region_id", default=0)),
        class_name=str(cls),
        voxel_count=int(_first(d, "voxel_count", "voxels", "n_voxels", default=0)),
        volume_ml=float(_first(d, "volume_ml", "volume", default=0.0)),
        mean_confidence=float(_first(d, "mean_confidence", "confidence", default=float("nan"))),
        centroid_ras=ras,  # type: ignore[arg-type]
    )


def _column(cls, name: str, values: Sequence[Any]):
    arr = cls()
    arr.SetName(name)
    for v in values:
        arr.InsertNextValue(v)
    return arr


def update_regions_table(table_node, regions: Sequence[Region]) -> None:
    """Fill ``table_node`` with one row per region (replacing its content)."""
    table = vtk.vtkTable()
    table.AddColumn(_column(vtk.vtkIntArray, COL_ID, [r.id for r in regions]))
    table.AddColumn(_column(vtk.vtkStringArray, COL_CLASS, [r.class_name for r in regions]))
    table.AddColumn(_column(vtk.vtkIntArray, COL_VOXELS, [r.voxel_count for r in regions]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_VOLUME, [r.volume_ml for r in regions]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_CONFIDENCE, [r.mean_confidence for r in regions]))
    for i, name in enumerate((COL_R, COL_A, COL_S)):
        table.AddColumn(_column(vtk.vtkDoubleArray, name, [r.centroid_ras[i] for r in regions]))
    was = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # a result: read-only in the table view
    for name, unit, desc in (
        (COL_ID, "", "Region number, as the server reports it"),
        (COL_CLASS, "", "Predicted class at the region"),
        (COL_VOXELS, "", "Number of voxels"),
        (COL_VOLUME, "ml", "Region volume"),
        (COL_CONFIDENCE, "", "Mean calibrated probability of the predicted class (0..1)"),
        (COL_R, "mm", "Centroid, RAS"),
        (COL_A, "mm", "Centroid, RAS"),
        (COL_S, "mm", "Centroid, RAS"),
    ):
        table_node.SetColumnDescription(name, desc)
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
    table_node.EndModify(was)


def create_regions_table(scene, regions: Sequence[Region], name: str = "Uncertain regions"):
    """A new table node in ``scene`` with one row per region."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    update_regions_table(node, regions)
    return node


def regions_from_table(table_node) -> list[Region]:
    """The rows of a regions table as :class:`Region` objects."""
    table = table_node.GetTable()
    out = []
    for row in range(table.GetNumberOfRows()):
        get = lambda col: table.GetValueByName(row, col)  # noqa: E731
        out.append(Region(
            id=get(COL_ID).ToInt(),
            class_name=get(COL_CLASS).ToString(),
            voxel_count=get(COL_VOXELS).ToInt(),
            volume_ml=get(COL_VOLUME).ToDouble(),
            mean_confidence=get(COL_CONFIDENCE).ToDouble(),
            centroid_ras=(get(COL_R).ToDouble(), get(COL_A).ToDouble(), get(COL_S).ToDouble()),
        ))
    return out


def region_ras(table_node, row: int) -> np.ndarray:
    """The RAS centroid (3,) of table row ``row`` (local coordinates of the result nodes)."""
    table = table_node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"row {row} is not in the regions table ({table.GetNumberOfRows()} rows)")
    return np.array([table.GetValueByName(row, c).ToDouble() for c in (COL_R, COL_A, COL_S)])


def to_world_ras(point_ras, node=None) -> np.ndarray:
    """``point_ras`` in the local RAS of ``node`` (e.g. the segmentation) mapped to world RAS via its parent transforms."""
    p = np.asarray(point_ras, dtype=float)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return p
    transform = vtk.vtkGeneralTransform()
    mrml.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, transform)
    return np.asarray(transform.TransformPoint(*p), dtype=float)


def jump_slices_to(scene, point_ras, view_group: int = -1, move_3d: bool = True) -> np.ndarray:
    """Centre every slice view of ``scene`` on the world RAS point, move the crosshair there and (``move_3d``) shift
    every 3D view's camera so it looks at the point from the same direction and distance. Returns the point."""
    r, a, s = (float(x) for x in point_ras)
    mrml.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, mrml.vtkMRMLSliceNode.CenteredJumpSlice, view_group)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLCrosshairNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLCrosshairNode").SetCrosshairRAS(r, a, s)
    if move_3d:
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLCameraNode")):
            camera = scene.GetNthNodeByClass(i, "vtkMRMLCameraNode")
            shift = np.array([r, a, s]) - np.array(camera.GetFocalPoint())
            position = np.array(camera.GetPosition()) + shift
            was = camera.StartModify()
            camera.SetFocalPoint(r, a, s)
            camera.SetPosition(*position)
            camera.EndModify(was)
    return np.array([r, a, s])


class RegionNavigator:
    """Next / previous through the rows of a regions table, wrapping around; ``goto`` centres the slice views.

    ``reference_node`` (the segmentation or confidence node) supplies the parent transform, if any, so the point the
    views jump to is in world coordinates.
    """

    def __init__(self, table_node, reference_node=None):
        self.table_node = table_node
        self.reference_node = reference_node
        self.index = -1

    def __len__(self) -> int:
        table = self.table_node.GetTable() if self.table_node is not None else None
        return table.GetNumberOfRows() if table is not None else 0

    def point(self, row: int) -> np.ndarray:
        """World RAS point of ``row``."""
        return to_world_ras(region_ras(self.table_node, row), self.reference_node)

    def goto(self, row: int, scene=None) -> np.ndarray:
        """Select ``row`` and, with a scene, centre its slice views on it. Returns the world RAS point."""
        p = self.point(row)
        self.index = row
        if scene is not None:
            jump_slices_to(scene, p)
        return p

    def next(self, scene=None) -> np.ndarray | None:
        if len(self) == 0:
            return None
        return self.goto((self.index + 1) % len(self), scene)

    def previous(self, scene=None) -> np.ndarray | None:
        if len(self) == 0:
            return None
        return self.goto((self.index - 1) % len(self) if self.index >= 0 else len(self) - 1, scene)
