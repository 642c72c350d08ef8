"""Segmentation nodes from label maps: one segment per model label plus the outlined ``Uncertain`` segment."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import display
from ._mrml import mrml, numpy_support, vtk
from .nodes import ensure_segmentations_logic, matrix_to_numpy, numpy_to_matrix

__all__ = [
    "LABEL_VALUE_ATTRIBUTE",
    "segment_id_for_label",
    "foreground_labels",
    "create_segmentation_node",
    "set_segment_from_mask",
    "segment_mask",
    "segment_label_value",
]

#: Segment tag holding the model's label value, so corrected segmentations map back to label values.
LABEL_VALUE_ATTRIBUTE = "ACECalibration.LabelValue"
UNCERTAIN_SEGMENT_ID = "uncertain"


def segment_id_for_label(value: int) -> str:
    return f"label_{int(value)}"


def foreground_labels(labels: Mapping) -> list[tuple[int, str]]:
    """(value, name) of every model label except background (value 0), sorted by value."""
    out = []
    for k, name in labels.items():
        v = int(k)
        if v != 0:
            out.append((v, str(name)))
    return sorted(out)


def _oriented_mask(mask_zyx: np.ndarray, ijk_to_ras: np.ndarray):
    mask = np.ascontiguousarray(mask_zyx, dtype=np.uint8)
    image = mrml.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def set_segment_from_mask(segmentation_node, segment_id: str, mask_zyx: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Replace the binary labelmap of ``segment_id`` with ``mask_zyx`` (nonzero = inside) on the given grid."""
    scene = segmentation_node.GetScene()
    logic = ensure_segmentations_logic(scene)
    image = _oriented_mask(np.asarray(mask_zyx) != 0, ijk_to_ras)
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not set the voxels of segment '{segment_id}'")


def create_segmentation_node(
    scene,
    reference_volume,
    label_map_zyx: np.ndarray,
    labels: Mapping,
    flags_zyx: np.ndarray | None = None,
    name: str = "Segmentation",
):
    """A segmentation node on ``reference_volume``'s grid: one segment per foreground model label, plus ``Uncertain``.

    Segments are named as the model names its labels and coloured by :func:`display.segment_color`; every model label
    gets a segment, even one absent from this image (so the Segment Editor can add it). ``flags_zyx`` (nonzero =
    uncertain boundary voxel) becomes the outline-only ``Uncertain`` segment. The arrays must be on the reference
    volume's grid; the segments use its exact IJK-to-RAS matrix. Returns ``(node, {label value: segment id},
    uncertain segment id or None)``.
    """
    ensure_segmentations_logic(scene)
    ijk_to_ras_m = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(ijk_to_ras_m)
    ijk_to_ras = matrix_to_numpy(ijk_to_ras_m)
    dims = reference_volume.GetImageData().GetDimensions()
    expected = (dims[2], dims[1], dims[0])
    label_map = np.asarray(label_map_zyx)
    if label_map.shape != expected:
        raise ValueError(f"label map shape {label_map.shape} differs from the reference volume's {expected}")

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    if reference_volume.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    segmentation = node.GetSegmentation()
    ids: dict[int, str] = {}
    was = node.StartModify()
    try:
        for value, seg_name in foreground_labels(labels):
            sid = segment_id_for_label(value)
            segmentation.AddEmptySegment(sid, seg_name, display.segment_color(value, seg_name))
            segmentation.GetSegment(sid).SetTag(LABEL_VALUE_ATTRIBUTE, str(value))
            mask = label_map == value
            if mask.any():
                set_segment_from_mask(node, sid, mask, ijk_to_ras)
            ids[value] = sid
        unknown = sorted(set(np.unique(label_map).tolist()) - set(ids) - {0})
        if unknown:
            raise ValueError(f"label map holds values {unknown} the model's label table does not name")
        uncertain_id = None
        if flags_zyx is not None:
            flags = np.asarray(flags_zyx)
            if flags.shape != expected:
                raise ValueError(f"flags shape {flags.shape} differs from the reference volume's {expected}")
            uncertain_id = UNCERTAIN_SEGMENT_ID
            segmentation.AddEmptySegment(uncertain_id, display.UNCERTAIN_SEGMENT_NAME, display.UNCERTAIN_COLOR)
            if flags.any():
                set_segment_from_mask(node, uncertain_id, flags, ijk_to_ras)
    finally:
        node.EndModify(was)
    display.configure_segmentation_display(node, uncertain_id)
    return node, ids, uncertain_id


def segment_label_value(segment) -> int | None:
    """The model label value stored on a segment created here (None for ``Uncertain`` or a user's own segment)."""
    value = vtk.reference("")
    if not segment.GetTag(LABEL_VALUE_ATTRIBUTE, value) or not str(value):
        return None
    return int(str(value))


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """The segment as a (z, y, x) uint8 mask on ``reference_volume``'s grid (exported through a temporary labelmap)."""
    scene = segmentation_node.GetScene()
    logic = ensure_segmentations_logic(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__acecal_tmp__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume):
            raise RuntimeError(f"could not export segment '{segment_id}'")
        image = labelmap.GetImageData()
        i, j, k = image.GetDimensions()
        return (numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i) != 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)
