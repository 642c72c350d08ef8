"""The uncertain-regions table: the review worklist, and jumping from one region to the next.

The server finds uncertain boundary regions (connected components of low-confidence voxels near predicted
boundaries) and reports each with its class, size, mean confidence and centroid in LPS and RAS
(:class:`ACECalibrationLib.client.protocol.Region`). This module turns that list into a ``vtkMRMLTableNode`` (one
row per region, :class:`RegionRow`) with a ``Review``
column, the clinician's verdict on each region (:data:`REVIEW_STATES`), saved with the scene like any table, and
turns a row back into the RAS point the slice views should centre on. Only the slice views that show the input or
its results move; 3D cameras stay where the user put them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import display
from ._mrml import mrml, vtk
from .client.protocol import Region

__all__ = [
    "COLUMNS",
    "REVIEW_STATES",
    "RegionRow",
    "region_from_reply",
    "create_regions_table",
    "update_regions_table",
    "regions_from_table",
    "region_ras",
    "review_state",
    "set_review_state",
    "to_world_ras",
    "jump_slices_to",
    "RegionNavigator",
]

COL_ID = "ID"
COL_CLASS = "Class"
COL_REVIEW = "Review"
COL_VOXELS = "Voxels"
COL_VOLUME = "Volume (ml)"
COL_CONFIDENCE = "Mean confidence"
COL_R, COL_A, COL_S = "Centroid R", "Centroid A", "Centroid S"
#: Column names of the regions table, in order.
COLUMNS = (COL_ID, COL_CLASS, COL_REVIEW, COL_VOXELS, COL_VOLUME, COL_CONFIDENCE, COL_R, COL_A, COL_S)

UNREVIEWED, REVIEWED, ACCEPTED, CORRECTED = "unreviewed", "reviewed", "accepted", "corrected"
#: A region's review state: not yet looked at, looked at, boundary accepted as it is, boundary corrected.
REVIEW_STATES = (UNREVIEWED, REVIEWED, ACCEPTED, CORRECTED)


@dataclass(frozen=True)
class RegionRow:
    """One row of the regions table: the server's region as the table shows it (a subset of its
    :class:`~ACECalibrationLib.client.protocol.Region`) and the review state; ``centroid_ras`` in the (local) RAS of
    the input volume."""

    id: int
    class_name: str
    voxels: int
    volume_ml: float
    mean_confidence: float
    centroid_ras: tuple
    review: str = UNREVIEWED


def region_from_reply(region: Region | Mapping[str, Any], labels: Mapping[str, str] | None = None) -> RegionRow:
    """The table row of one of the server's regions (a :class:`~ACECalibrationLib.client.protocol.Region`, or its
    JSON, checked by ``Region.from_json``: a missing or misspelt key raises ``ProtocolError``).

    The class is named by the region's ``class_name``; where that is empty, by ``labels`` (value -> name).
    """
    r = region if isinstance(region, Region) else Region.from_json(region)
    name = r.class_name
    if not name and labels is not None:
        name = str(labels.get(str(r.class_value), r.class_value))
    return RegionRow(
        id=r.id,
        class_name=name,
        voxels=r.voxels,
        volume_ml=r.volume_ml,
        mean_confidence=r.mean_confidence,
        centroid_ras=tuple(r.centroid_ras),
    )


def _column(cls, name: str, values: Sequence[Any]):
    arr = cls()
    arr.SetName(name)
    for v in values:
        arr.InsertNextValue(v)
    return arr


def update_regions_table(table_node, regions: Sequence[RegionRow]) -> None:
    """Fill ``table_node`` with one row per region (replacing its content); review states from the regions."""
    for r in regions:
        if r.review not in REVIEW_STATES:
            raise ValueError(f"region {r.id}: unknown review state {r.review!r}; one of {REVIEW_STATES}")
    table = vtk.vtkTable()
    table.AddColumn(_column(vtk.vtkIntArray, COL_ID, [r.id for r in regions]))
    table.AddColumn(_column(vtk.vtkStringArray, COL_CLASS, [r.class_name for r in regions]))
    table.AddColumn(_column(vtk.vtkStringArray, COL_REVIEW, [r.review for r in regions]))
    table.AddColumn(_column(vtk.vtkIntArray, COL_VOXELS, [r.voxels for r in regions]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_VOLUME, [r.volume_ml for r in regions]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_CONFIDENCE, [r.mean_confidence for r in regions]))
    for i, name in enumerate((COL_R, COL_A, COL_S)):
        table.AddColumn(_column(vtk.vtkDoubleArray, name, [r.centroid_ras[i] for r in regions]))
    was = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # read-only in the table view: the review buttons set the Review column
    for name, unit, desc in (
        (COL_ID, "", "Region number, as the server reports it"),
        (COL_CLASS, "", "Predicted class at the region"),
        (COL_REVIEW, "", "Review: unreviewed, reviewed, accepted (boundary right as it is) or corrected"),
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


def create_regions_table(scene, regions: Sequence[RegionRow], name: str = "Uncertain regions"):
    """A new table node in ``scene`` with one row per region."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    update_regions_table(node, regions)
    return node


def regions_from_table(table_node) -> list:
    """The rows of a regions table as :class:`RegionRow` objects (review state included)."""
    table = table_node.GetTable()
    out = []
    for row in range(table.GetNumberOfRows()):
        get = partial(table.GetValueByName, row)  # get(column) -> this row's vtkVariant
        out.append(
            RegionRow(
                id=get(COL_ID).ToInt(),
                class_name=get(COL_CLASS).ToString(),
                voxels=get(COL_VOXELS).ToInt(),
                volume_ml=get(COL_VOLUME).ToDouble(),
                mean_confidence=get(COL_CONFIDENCE).ToDouble(),
                centroid_ras=(get(COL_R).ToDouble(), get(COL_A).ToDouble(), get(COL_S).ToDouble()),
                review=review_state(table_node, row),
            )
        )
    return out


def _check_row(table_node, row: int) -> None:
    n = table_node.GetTable().GetNumberOfRows()
    if not 0 <= row < n:
        raise IndexError(f"row {row} is not in the regions table ({n} rows)")


def region_ras(table_node, row: int) -> np.ndarray:
    """The RAS centroid (3,) of table row ``row`` (local coordinates of the result nodes)."""
    _check_row(table_node, row)
    table = table_node.GetTable()
    return np.array([table.GetValueByName(row, c).ToDouble() for c in (COL_R, COL_A, COL_S)])


def review_state(table_node, row: int) -> str:
    """The review state of ``row`` (an empty cell, as a table read back from a file may hold, is unreviewed)."""
    _check_row(table_node, row)
    return table_node.GetTable().GetValueByName(row, COL_REVIEW).ToString() or UNREVIEWED


def set_review_state(table_node, row: int, state: str) -> None:
    """Set the review state of ``row`` (one of :data:`REVIEW_STATES`)."""
    if state not in REVIEW_STATES:
        raise ValueError(f"unknown review state {state!r}; one of {REVIEW_STATES}")
    _check_row(table_node, row)
    column = table_node.GetColumnIndex(COL_REVIEW)
    if column < 0:
        raise ValueError(f"'{table_node.GetName()}' has no {COL_REVIEW} column: not a regions table of this module")
    if not table_node.SetCellText(row, column, state):
        raise RuntimeError(f"could not set the review state of row {row}")


def to_world_ras(point_ras, node=None) -> np.ndarray:
    """``point_ras`` in the local RAS of ``node`` (e.g. the segmentation) mapped to world RAS via its parent
    transforms."""
    p = np.asarray(point_ras, dtype=float)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return p
    transform = vtk.vtkGeneralTransform()
    mrml.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, transform)
    return np.asarray(transform.TransformPoint(*p), dtype=float)


def jump_slices_to(scene, point_ras, shown_node_ids: Iterable[str] = ()) -> list:
    """Centre the slice views that show one of ``shown_node_ids`` (every slice view when none does) on the world
    RAS point and move the crosshair there. 3D views are left alone. Returns the slice nodes that moved."""
    r, a, s = (float(x) for x in point_ras)
    moved = display.slice_nodes_of(scene, display.views_showing(scene, shown_node_ids))
    for slice_node in moved:
        slice_node.JumpSliceByCentering(r, a, s)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLCrosshairNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLCrosshairNode").SetCrosshairRAS(r, a, s)
    return moved


class RegionNavigator:
    """Next / previous through the rows of a regions table, wrapping around; ``goto`` centres the slice views.

    ``reference_node`` (the segmentation or confidence node) supplies the parent transform, if any, so the point the
    views jump to is in world coordinates. ``shown_node_ids``: the input and result volumes; only slice views showing
    one of them move (see :func:`jump_slices_to`).
    """

    def __init__(self, table_node, reference_node=None, shown_node_ids: Iterable[str] = ()):
        self.table_node = table_node
        self.reference_node = reference_node
        self.shown_node_ids = [i for i in shown_node_ids if i]
        self.index = -1

    def __len__(self) -> int:
        table = self.table_node.GetTable() if self.table_node is not None else None
        return table.GetNumberOfRows() if table is not None else 0

    def point(self, row: int) -> np.ndarray:
        """World RAS point of ``row``."""
        return to_world_ras(region_ras(self.table_node, row), self.reference_node)

    def goto(self, row: int, scene=None) -> np.ndarray:
        """Select ``row`` and, with a scene, centre the relevant slice views on it. Returns the world RAS point."""
        p = self.point(row)
        self.index = row
        if scene is not None:
            jump_slices_to(scene, p, self.shown_node_ids)
        return p

    def next(self, scene=None):
        if len(self) == 0:
            return None
        return self.goto((self.index + 1) % len(self), scene)

    def previous(self, scene=None):
        if len(self) == 0:
            return None
        return self.goto((self.index - 1) % len(self) if self.index >= 0 else len(self) - 1, scene)

    def next_unreviewed_row(self):
        """The next row (after the current one, wrapping) still unreviewed; None when every row is reviewed."""
        n = len(self)
        for step in range(1, n + 1):
            row = (self.index + step) % n
            if review_state(self.table_node, row) == UNREVIEWED:
                return row
        return None
