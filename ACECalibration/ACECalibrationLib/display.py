"""How results look: segment colours, the confidence colour map, overlay and outline settings.

Everything here works on MRML nodes only (no Qt, no ``slicer.modules``), so it runs headless with slicer-core and
is shared by the module widget and the tests.

Colours
-------
Segments get the colour Slicer's ``GenericAnatomyColors`` table gives the structure's name when the name is one of
:data:`ANATOMY_COLORS` (``liver`` -> (221, 130, 101), ...); otherwise label value ``n`` gets entry ``n`` of
:data:`LABEL_PALETTE`, the first 16 entries of Slicer's ``Labels`` / ``GenericAnatomyColors`` table (tissue, bone,
skin, connective tissue, blood, organ, mass, muscle, ...), cycling after 16. The ``Uncertain`` segment is pure magenta
(:data:`UNCERTAIN_COLOR`), drawn as an outline only: no anatomy colour and no value of the confidence colour map is
close to it.

Confidence
----------
Confidence (the calibrated probability of the predicted class) and uncertainty (normalised entropy) are shown with
window 0..1 through Slicer's own ``Viridis`` colour table (node ``vtkMRMLColorTableNodeFileViridis.txt``, which the
application loads from ``ColorFiles/Viridis.txt``: perceptually uniform, readable by colour-blind users). Only where
the scene lacks it (slicer-core, which ships no colour files) an equivalent table is built from matplotlib's viridis
anchors. The "hide confident voxels" slider sets the display threshold: confidence voxels above it, uncertainty voxels
below ``1 - threshold``, become transparent, so only doubtful voxels tint the image. Only the module's own result
volumes (role attribute :data:`ROLE_ATTRIBUTE`) are ever restyled: a scan chosen by mistake is refused, never
recoloured.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from ._mrml import mrml

__all__ = [
    "LABEL_PALETTE",
    "ANATOMY_COLORS",
    "UNCERTAIN_COLOR",
    "UNCERTAIN_SEGMENT_NAME",
    "VIRIDIS_ANCHORS",
    "segment_color",
    "viridis",
    "SLICER_VIRIDIS_ID",
    "ROLE_ATTRIBUTE",
    "ROLE_CONFIDENCE",
    "ROLE_UNCERTAINTY",
    "ensure_confidence_color_node",
    "configure_probability_display",
    "set_confidence_threshold",
    "configure_segmentation_display",
    "configure_uncertain_display",
    "composite_nodes",
    "views_showing",
    "slice_nodes_of",
    "set_overlay",
    "result_probability_nodes",
    "show_color_legend",
    "add_color_legend",
]

UNCERTAIN_SEGMENT_NAME = "Uncertain"

#: High-contrast outline colour of the ``Uncertain`` segment (RGB 0..1): magenta.
UNCERTAIN_COLOR = (1.0, 0.0, 1.0)

#: Entries 1..16 of Slicer's ``Labels`` colour table (= GenericAnatomyColors 1..16), RGB 0..255.
LABEL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128),  # 1 tissue
    (241, 214, 145),  # 2 bone
    (177, 122, 101),  # 3 skin
    (111, 184, 210),  # 4 connective tissue
    (216, 101, 79),  # 5 blood
    (221, 130, 101),  # 6 organ
    (144, 238, 144),  # 7 mass
    (192, 104, 88),  # 8 muscle
    (220, 245, 20),  # 9 foreign object
    (78, 63, 0),  # 10
    (255, 250, 220),  # 11
    (230, 220, 70),  # 12 fat
    (200, 200, 235),  # 13
    (250, 250, 210),  # 14
    (244, 214, 49),  # 15
    (0, 151, 206),  # 16
)

#: GenericAnatomyColors entries for structure names (lower case, words joined by ``_``), RGB 0..255.
ANATOMY_COLORS: dict[str, tuple[int, int, int]] = {
    "tissue": (128, 174, 128),
    "bone": (241, 214, 145),
    "skin": (177, 122, 101),
    "connective_tissue": (111, 184, 210),
    "blood": (216, 101, 79),
    "organ": (221, 130, 101),
    "mass": (144, 238, 144),
    "tumor": (144, 238, 144),
    "tumour": (144, 238, 144),
    "lesion": (144, 238, 144),
    "muscle": (192, 104, 88),
    "fat": (230, 220, 70),
    "liver": (221, 130, 101),
    "kidney": (185, 102, 83),
    "left_kidney": (185, 102, 83),
    "right_kidney": (185, 102, 83),
    "lung": (197, 165, 145),
    "left_lung": (197, 165, 145),
    "right_lung": (197, 165, 145),
    "heart": (206, 110, 84),
    "aorta": (224, 97, 76),
    "cyst": (205, 205, 100),
}

#: matplotlib's viridis at 0, 1/8, ..., 1 (RGB 0..1); :func:`viridis` interpolates linearly between them.
VIRIDIS_ANCHORS = np.array(
    [
        (0.267004, 0.004874, 0.329415),
        (0.277018, 0.185228, 0.489898),
        (0.229739, 0.322361, 0.545706),
        (0.172719, 0.448791, 0.557885),
        (0.127568, 0.566949, 0.550556),
        (0.157851, 0.683765, 0.501686),
        (0.369214, 0.788888, 0.382914),
        (0.678489, 0.863742, 0.189503),
        (0.993248, 0.906157, 0.143936),
    ]
)

#: Slicer's own Viridis colour table (loaded by the application from ColorFiles/Viridis.txt).
SLICER_VIRIDIS_ID = "vtkMRMLColorTableNodeFileViridis.txt"
#: Name of the stand-in table built where the scene lacks Slicer's (slicer-core).
CONFIDENCE_COLOR_NODE_NAME = "Viridis (ACECalibration)"
_COLOR_NODE_TAG = "ACECalibrationViridis"

#: Node attribute naming what a result node is; the display functions only restyle nodes carrying it.
ROLE_ATTRIBUTE = "ACECalibration.Role"
ROLE_CONFIDENCE, ROLE_UNCERTAINTY = "confidence", "uncertainty"
#: Node attribute holding the ID of the input volume a result node was made from.
INPUT_VOLUME_ATTRIBUTE = "ACECalibration.InputVolumeID"


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def segment_color(label_value: int, name: str = "") -> tuple[float, float, float]:
    """RGB (0..1) of the segment for model label ``label_value`` named ``name`` (see the module docstring)."""
    rgb = ANATOMY_COLORS.get(_normalise_name(name))
    if rgb is None:
        rgb = LABEL_PALETTE[(max(int(label_value), 1) - 1) % len(LABEL_PALETTE)]
    return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)


def viridis(values) -> np.ndarray:
    """Viridis RGB (..., 3) in 0..1 for values in 0..1 (clipped)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(VIRIDIS_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return VIRIDIS_ANCHORS[lo] * (1 - t) + VIRIDIS_ANCHORS[hi] * t


def ensure_confidence_color_node(scene):
    """Slicer's ``Viridis`` colour table node; where the scene has none (slicer-core), a stand-in built once."""
    slicer_viridis = scene.GetNodeByID(SLICER_VIRIDIS_ID)
    if slicer_viridis is not None:
        return slicer_viridis
    existing = scene.GetSingletonNode(_COLOR_NODE_TAG, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    node = mrml.vtkMRMLColorTableNode()
    node.SetSingletonTag(_COLOR_NODE_TAG)
    node.SetName(CONFIDENCE_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetHideFromEditors(False)
    node.SetAttribute("Category", "ACECalibration")
    rgb = viridis(np.linspace(0.0, 1.0, 256))
    for i, (r, g, b) in enumerate(rgb):
        node.SetColor(i, f"{i / 255:.3f}", float(r), float(g), float(b), 1.0)
    node.SetSaveWithScene(True)
    scene.AddNode(node)
    return scene.GetSingletonNode(_COLOR_NODE_TAG, "vtkMRMLColorTableNode")


def configure_probability_display(volume_node, hide_below: float | None = None, hide_above: float | None = None):
    """Show a 0..1 map (confidence or uncertainty) with the viridis table, window 0..1, optional threshold.

    Voxels outside ``[hide_below, hide_above]`` become transparent in slice views when a bound is given.
    Returns the display node. Raises ValueError for a volume that is not one of the module's probability maps.
    """
    if volume_node.GetAttribute(ROLE_ATTRIBUTE) not in (ROLE_CONFIDENCE, ROLE_UNCERTAINTY):
        raise ValueError(
            f"'{volume_node.GetName()}' is not a confidence or uncertainty volume made by ACECalibration; "
            "its display is left as it is"
        )
    scene = volume_node.GetScene()
    color = ensure_confidence_color_node(scene)
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    was = display.StartModify()
    display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetInterpolate(0)
    if hide_below is None and hide_above is None:
        display.SetApplyThreshold(0)
    else:
        display.AutoThresholdOff()
        display.SetThreshold(
            -1.0 if hide_below is None else float(hide_below), 2.0 if hide_above is None else float(hide_above)
        )
        display.SetApplyThreshold(1)
    display.EndModify(was)
    return display


def set_confidence_threshold(confidence_node, threshold: float | None, uncertainty_node=None) -> None:
    """The "hide confident voxels" slider: hide confidence above ``threshold`` (and uncertainty below 1-threshold).

    ``threshold`` None or >= 1 shows every voxel.
    """
    if threshold is None or threshold >= 1.0:
        configure_probability_display(confidence_node)
        if uncertainty_node is not None:
            configure_probability_display(uncertainty_node)
        return
    t = float(np.clip(threshold, 0.0, 1.0))
    configure_probability_display(confidence_node, hide_above=t)
    if uncertainty_node is not None:
        configure_probability_display(uncertainty_node, hide_below=1.0 - t)


def configure_segmentation_display(segmentation_node, fill_opacity: float = 0.3, outline_thickness: int = 2):
    """Anatomy segments: light fill plus outline in slice views, surfaces in 3D. Returns the display node."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    was = display.StartModify()
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(fill_opacity)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(int(outline_thickness))
    display.EndModify(was)
    return display


def configure_uncertain_display(segmentation_node, outline_thickness: int = 2):
    """The ``Uncertain`` segmentation: magenta outline only in slice views, nothing in 3D. Returns the display node."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    was = display.StartModify()
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DOutline(1.0)
    display.SetVisibility3D(False)
    display.SetSliceIntersectionThickness(int(outline_thickness))
    display.EndModify(was)
    return display


def composite_nodes(scene) -> list:
    """Every slice view's composite node (its background / foreground / label layers)."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def views_showing(scene, node_ids: Iterable[str]) -> list:
    """Composite nodes of the slice views whose background or foreground layer shows one of ``node_ids``; every
    slice view when none does (a fresh layout, or the user put other volumes up)."""
    ids = {i for i in node_ids if i}
    comps = composite_nodes(scene)
    showing = [c for c in comps if {c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()} & ids]
    return showing or comps


def slice_nodes_of(scene, comps: Iterable) -> list:
    """The slice nodes that belong to the given composite nodes (matched by layout name, as Slicer pairs them)."""
    names = {c.GetLayoutName() for c in comps}
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() in names:
            out.append(node)
    return out


def set_overlay(scene, image_node, overlay_node, opacity: float = 0.5, comps: Iterable | None = None) -> int:
    """Show ``image_node`` in the background and ``overlay_node`` (confidence, uncertainty or None) in the foreground
    of the slice views that show the image or a result of it (all views when none does). MRML only: what
    ``slicer.util.setSliceViewerLayers`` does, restricted to the relevant views. Returns the number of views set."""
    if overlay_node is not None and overlay_node.GetAttribute(ROLE_ATTRIBUTE) not in (
        ROLE_CONFIDENCE,
        ROLE_UNCERTAINTY,
    ):
        raise ValueError(f"'{overlay_node.GetName()}' is not a confidence or uncertainty volume made by ACECalibration")
    if comps is None:
        ids = [image_node.GetID() if image_node is not None else None]
        if overlay_node is not None:
            ids.append(overlay_node.GetID())
        ids += [n.GetID() for n in result_probability_nodes(scene, image_node)]
        comps = views_showing(scene, ids)
    n = 0
    for comp in comps:
        was = comp.StartModify()
        if image_node is not None:
            comp.SetBackgroundVolumeID(image_node.GetID())
        comp.SetForegroundVolumeID(overlay_node.GetID() if overlay_node is not None else None)
        comp.SetForegroundOpacity(float(opacity))
        comp.EndModify(was)
        n += 1
    return n


def result_probability_nodes(scene, image_node) -> list:
    """The confidence and uncertainty volumes the module made for ``image_node`` (any run)."""
    if image_node is None:
        return []
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if (
            node.GetAttribute(ROLE_ATTRIBUTE) in (ROLE_CONFIDENCE, ROLE_UNCERTAINTY)
            and node.GetAttribute(INPUT_VOLUME_ATTRIBUTE) == image_node.GetID()
        ):
            out.append(node)
    return out


def add_color_legend(volume_node, title: str = "Confidence"):
    """A colour legend (colour bar) for ``volume_node`` in the slice views (reused when it has one)."""
    scene = volume_node.GetScene()
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # plain slicer-core scene
        scene.RegisterNodeClass(mrml.vtkMRMLColorLegendDisplayNode())
    legend = mrml.vtkSlicerColorLogic.GetColorLegendDisplayNode(volume_node)
    if legend is None:
        legend = mrml.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume_node)
    if legend is not None:
        legend.SetTitleText(title)
        legend.SetNumberOfLabels(6)  # 0.0, 0.2, ..., 1.0: exact with one decimal
        legend.SetLabelFormat("%.1f")
    return legend


def show_color_legend(volume_node, visible: bool) -> None:
    """Show or hide the colour legend of ``volume_node`` (if it has one)."""
    legend = mrml.vtkSlicerColorLogic.GetColorLegendDisplayNode(volume_node)
    if legend is not None:
        legend.SetVisibility(bool(visible))
