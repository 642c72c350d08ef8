"""Per-segment volume and mean confidence of a (possibly corrected) segmentation, as a table node.

Computed from the segments as they are now (so after corrections too), on the input's grid: each segment's voxels,
volume in ml (voxel count x voxel volume of the input grid), the mean calibrated confidence over its voxels, and how
much of it the ``Uncertain`` segmentation flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import segmentation
from ._mrml import vtk
from .nodes import array_from_volume_node, grid_from_volume_node

__all__ = ["SegmentStatistics", "COLUMNS", "segment_statistics", "update_statistics_table"]

COL_SEGMENT, COL_VOXELS, COL_VOLUME, COL_CONFIDENCE, COL_UNCERTAIN = (
    "Segment",
    "Voxels",
    "Volume (ml)",
    "Mean confidence",
    "Flagged uncertain (ml)",
)
COLUMNS = (COL_SEGMENT, COL_VOXELS, COL_VOLUME, COL_CONFIDENCE, COL_UNCERTAIN)


@dataclass(frozen=True)
class SegmentStatistics:
    segment_id: str
    name: str
    voxels: int
    volume_ml: float
    mean_confidence: float  # NaN for an empty segment or without a confidence volume
    uncertain_ml: float


def segment_statistics(segmentation_node, reference_volume, confidence_node=None, uncertain_node=None) -> list:
    """One :class:`SegmentStatistics` per segment of ``segmentation_node``, on ``reference_volume``'s grid."""
    voxel_ml = grid_from_volume_node(reference_volume).voxel_volume_ml
    confidence = array_from_volume_node(confidence_node, copy=False) if confidence_node is not None else None
    flags = None
    if uncertain_node is not None and uncertain_node.GetSegmentation().GetSegment(segmentation.UNCERTAIN_SEGMENT_ID):
        flags = segmentation.segment_mask(uncertain_node, segmentation.UNCERTAIN_SEGMENT_ID, reference_volume) > 0
    seg = segmentation_node.GetSegmentation()
    out = []
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        mask = segmentation.segment_mask(segmentation_node, sid, reference_volume) > 0
        n = int(mask.sum())
        mean = float(confidence[mask].mean()) if (confidence is not None and n) else float("nan")
        flagged = int((mask & flags).sum()) if flags is not None else 0
        out.append(SegmentStatistics(sid, seg.GetSegment(sid).GetName(), n, n * voxel_ml, mean, flagged * voxel_ml))
    return out


def _column(cls, name, values):
    arr = cls()
    arr.SetName(name)
    for v in values:
        arr.InsertNextValue(v)
    return arr


def update_statistics_table(table_node, stats: Sequence[SegmentStatistics]) -> None:
    """Fill ``table_node`` with one row per segment (replacing its content)."""
    table = vtk.vtkTable()
    table.AddColumn(_column(vtk.vtkStringArray, COL_SEGMENT, [s.name for s in stats]))
    table.AddColumn(_column(vtk.vtkIntArray, COL_VOXELS, [s.voxels for s in stats]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_VOLUME, [s.volume_ml for s in stats]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_CONFIDENCE, [s.mean_confidence for s in stats]))
    table.AddColumn(_column(vtk.vtkDoubleArray, COL_UNCERTAIN, [s.uncertain_ml for s in stats]))
    was = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
    for name, unit, desc in (
        (COL_VOLUME, "ml", "Segment volume on the input grid"),
        (COL_CONFIDENCE, "", "Mean calibrated probability of the predicted class over the segment's voxels"),
        (COL_UNCERTAIN, "ml", "Volume of the segment inside the flagged uncertain regions"),
    ):
        table_node.SetColumnDescription(name, desc)
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
    table_node.EndModify(was)
