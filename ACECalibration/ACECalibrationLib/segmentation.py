"""Segmentation nodes from label maps: one segment per model label, and the outlined ``Uncertain`` segmentation.

The anatomy and the review information live in two segmentation nodes: ``<volume> segmentation`` holds one segment
per model label (what labelmap / DICOM SEG export and Segment Statistics should see), ``<volume> uncertain`` holds the
single ``Uncertain`` segment (the server's flagged boundary voxels), drawn as a magenta outline only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import display, terminology
from ._mrml import mrml, numpy_support, vtk
from .nodes import ensure_segmentations_logic, matrix_to_numpy, numpy_to_matrix

__all__ = [
    "LABEL_VALUE_ATTRIBUTE",
    "UNCERTAIN_SEGMENT_ID",
    "create_uncertain_segmentation",
    "segment_id_for_label",
    "foreground_labels",
    "create_segmentation_node",
    "set_segment_from_mask",
    "segment_mask",
    "segment_label_value",
    "segment_tag",
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
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(mask.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    )
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def set_segment_from_mask(segmentation_node, segment_id: str, mask_zyx: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Replace the binary labelmap of ``segment_id`` with ``mask_zyx`` (nonzero = inside) on the given grid."""
    scene = segmentation_node.GetScene()
    logic = ensure_segmentations_logic(scene)
    image = _oriented_mask(np.asarray(mask_zyx) != 0, ijk_to_ras)
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not set the voxels of segment '{segment_id}'")


def _reference_geometry(reference_volume) -> tuple[np.ndarray, tuple[int, int, int]]:
    ijk_to_ras_m = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(ijk_to_ras_m)
    dims = reference_volume.GetImageData().GetDimensions()
    return matrix_to_numpy(ijk_to_ras_m), (dims[2], dims[1], dims[0])


def _prepare_node(scene, reference_volume, name: str, node=None):
    """A segmentation node on the reference volume's geometry: ``node`` emptied for reuse, or a new one."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
    else:
        node.GetSegmentation().RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    return node


def create_segmentation_node(
    scene,
    reference_volume,
    label_map_zyx: np.ndarray,
    labels: Mapping,
    name: str = "Segmentation",
    *,
    model_text: str = "",
    node=None,
):
    """A segmentation node on ``reference_volume``'s grid with one segment per foreground model label.

    Segments are named as the model names its labels, coloured by :func:`display.segment_color`, carry the label value
    (tag :data:`LABEL_VALUE_ATTRIBUTE`) and a terminology code (:func:`terminology.terminology_for` with ``model_text``,
    the model's id and description); every model label gets a segment, even one absent from this image (so the
    Segment Editor can add it). The label map must be on the reference volume's grid; the segments use its exact
    IJK-to-RAS matrix. ``node``: an existing segmentation node to refill instead of adding one. Returns
    ``(node, {label value: segment id})``.
    """
    ensure_segmentations_logic(scene)
    ijk_to_ras, expected = _reference_geometry(reference_volume)
    label_map = np.asarray(label_map_zyx)
    if label_map.shape != expected:
        raise ValueError(f"label map shape {label_map.shape} differs from the reference volume's {expected}")
    named = dict(foreground_labels(labels))
    unknown = sorted(set(np.unique(label_map).tolist()) - set(named) - {0})
    if unknown:
        raise ValueError(f"label map holds values {unknown} the model's label table does not name")

    node = _prepare_node(scene, reference_volume, name, node)
    segmentation = node.GetSegmentation()
    ids: dict[int, str] = {}
    was = node.StartModify()
    try:
        for value, seg_name in named.items():
            sid = segment_id_for_label(value)
            segmentation.AddEmptySegment(sid, seg_name, display.segment_color(value, seg_name))
            segment = segmentation.GetSegment(sid)
            segment.SetNameAutoGenerated(False)  # the model's name and colour stay, whatever the terminology says
            segment.SetColorAutoGenerated(False)
            segment.SetTag(LABEL_VALUE_ATTRIBUTE, str(value))
            segment.SetTag(terminology.TAG, terminology.terminology_for(seg_name, model_text).serialized())
            mask = label_map == value
            if mask.any():
                set_segment_from_mask(node, sid, mask, ijk_to_ras)
            ids[value] = sid
    finally:
        node.EndModify(was)
    display.configure_segmentation_display(node)
    return node, ids


def create_uncertain_segmentation(
    scene, reference_volume, flags_zyx: np.ndarray, name: str = "Uncertain", *, node=None
):
    """A segmentation node holding only the ``Uncertain`` segment (nonzero flags), outline only. Returns the node."""
    ensure_segmentations_logic(scene)
    ijk_to_ras, expected = _reference_geometry(reference_volume)
    flags = np.asarray(flags_zyx)
    if flags.shape != expected:
        raise ValueError(f"flags shape {flags.shape} differs from the reference volume's {expected}")
    node = _prepare_node(scene, reference_volume, name, node)
    was = node.StartModify()
    try:
        node.GetSegmentation().AddEmptySegment(
            UNCERTAIN_SEGMENT_ID, display.UNCERTAIN_SEGMENT_NAME, display.UNCERTAIN_COLOR
        )
        segment = node.GetSegmentation().GetSegment(UNCERTAIN_SEGMENT_ID)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if flags.any():
            set_segment_from_mask(node, UNCERTAIN_SEGMENT_ID, flags, ijk_to_ras)
    finally:
        node.EndModify(was)
    display.configure_uncertain_display(node)
    return node


def segment_tag(segment, name: str) -> str | None:
    """A segment's tag ``name`` (None when it has none)."""
    value = vtk.reference("")
    if not segment.GetTag(name, value):
        return None
    return str(value)


def segment_label_value(segment) -> int | None:
    """The model label value stored on a segment created here (None for ``Uncertain`` or a user's own segment)."""
    value = segment_tag(segment, LABEL_VALUE_ATTRIBUTE)
    return int(value) if value else None


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
