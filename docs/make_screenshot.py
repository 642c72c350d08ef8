"""Regenerate the Slicer pictures of the docs: what the ACECalibration module shows, rendered offscreen.

- ``docs/images/slicer_overlay.png``: the module's result on the sample hippocampus case (Sample Data >
  ACECalibration, an MSD Task04 MRI the shipped models were not trained on) with a shipped model: segments, the
  confidence overlay with confident voxels hidden, the magenta outline of the flagged uncertain regions, and the
  whole confidence map with its colour bar.
- ``docs/images/slicer_review.png``: the review worklist: three views centred on a flagged region (only the views
  showing the case move) with the regions table and its verdicts drawn beside them.

The pictures are made by Slicer's own slice-view machinery from slicer-core (no Slicer application, no display):
``vtkMRMLSliceLogic`` blends the layers exactly as a slice view does (image in the background, the confidence volume
in the foreground with its colour table, window and threshold), and the segmentations and colour-legend displayable
managers draw the segments, the outline of the ``Uncertain`` segmentation and the colour bar. The result nodes come
from the module's own controller (``ACECalibrationLib.controller``) against a real server serving ``models/``, the
same calls the module's buttons make.

    .venv/bin/python docs/make_screenshot.py                       # serves models/ itself (~1 min on 2 cores)
    .venv/bin/python docs/make_screenshot.py --server http://127.0.0.1:8000 --model ID [--image scan.nii.gz]

Offscreen OpenGL: VTK picks EGL (or OSMesa) when there is no X display; ``VTK_DEFAULT_OPENGL_WINDOW`` overrides it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "ACECalibration", ROOT / "Testing"):
    sys.path.insert(0, str(p))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from ACECalibrationLib import nodes, regions, sampledata, settings  # noqa: E402
from ACECalibrationLib._mrml import mrml, numpy_support, vtk  # noqa: E402
from ACECalibrationLib.controller import Controller, View  # noqa: E402
from ACECalibrationLib.display import add_color_legend, set_confidence_threshold  # noqa: E402

OUT = ROOT / "docs" / "images" / "slicer_overlay.png"
OUT_REVIEW = ROOT / "docs" / "images" / "slicer_review.png"
SAMPLE = sampledata.sample_dir(ROOT / "ACECalibration") / "ACECalHippocampus.nii.gz"
DEFAULT_MODEL = "hippocampus-softace"


# --------------------------------------------------------------------------------------------------- input volume
def load_volume(scene, path: Path):
    """A scalar volume node read from a file by Slicer's own reader (geometry as Slicer would load it)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SystemExit(f"could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


# --------------------------------------------------------------------------------------------------- rendering
_VIEWS = 0  # each rendered view gets its own slice node and composite node, like the views of a Slicer layout


def render_slice_view(
    scene,
    background,
    foreground,
    size=(640, 640),
    centre_ras=None,
    orientation="Axial",
    foreground_opacity=0.6,
    caption="",
    footer="",
    zoom: float = 1.0,
    legend: bool = True,
    mark_centre: bool = False,
) -> np.ndarray:
    """Render one slice view like Slicer's (layers + segmentations + colour legend) to an RGB array (h, w, 3)."""
    app = mrml.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    slice_logic = mrml.vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    slice_logic.SetMRMLApplicationLogic(app)
    global _VIEWS
    _VIEWS += 1
    slice_node = slice_logic.AddSliceNode(
        ("Red", "Yellow", "Green")[(_VIEWS - 1) % 3] + ("" if _VIEWS <= 3 else str(_VIEWS))
    )
    logics = vtk.vtkCollection()  # the colour legend asks the application which layers a view shows
    logics.AddItem(slice_logic)
    app.SetSliceLogics(logics)
    slice_node.SetOrientation(orientation)
    slice_node.SetDimensions(size[0], size[1], 1)
    comp = slice_logic.GetSliceCompositeNode()
    comp.SetBackgroundVolumeID(background.GetID())
    comp.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    comp.SetForegroundOpacity(foreground_opacity)
    slice_logic.FitSliceToAll(size[0], size[1])
    if zoom != 1.0:
        fov = slice_node.GetFieldOfView()
        slice_node.SetFieldOfView(fov[0] / zoom, fov[1] / zoom, fov[2])
    if centre_ras is not None:
        slice_node.JumpSliceByCentering(*[float(x) for x in centre_ras])

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()  # displayable managers expect one
    interactor.SetRenderWindow(window)

    mapper = vtk.vtkImageMapper()  # the blended slice image, as qMRMLSliceView draws it
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(mapper)
    renderer.AddViewProp(image_actor)

    factory = mrml.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app)
    for name in ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLColorLegendDisplayableManager"):
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(slice_node)
    # the legend manager builds colour bars for legend nodes added after it exists: (re)add the foreground's
    for i in reversed(range(scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode"))):
        scene.RemoveNode(scene.GetNthNodeByClass(i, "vtkMRMLColorLegendDisplayNode"))
    if foreground is not None and legend:
        bar = add_color_legend(foreground, "Confidence")
        bar.SetSize(0.1, 0.4)
        bar.Modified()

    for text, y, fsize in ((caption, size[1] - 10, 15), (footer, 10, 13)):
        if not text:
            continue
        actor = vtk.vtkTextActor()
        actor.SetInput(text)
        prop = actor.GetTextProperty()
        prop.SetFontSize(fsize)
        prop.SetColor(1, 1, 1)
        prop.SetBackgroundColor(0, 0, 0)
        prop.SetBackgroundOpacity(0.55)
        prop.SetVerticalJustificationToTop() if y > size[1] / 2 else prop.SetVerticalJustificationToBottom()
        actor.SetDisplayPosition(10, y)
        renderer.AddViewProp(actor)

    if mark_centre:  # a small cross where the view is centred (the region's centroid), like Slicer's crosshair
        cx, cy, arm = size[0] / 2.0, size[1] / 2.0, 9.0
        points = vtk.vtkPoints()
        lines = vtk.vtkCellArray()
        for a, b in (
            ((cx - arm, cy), (cx - 3, cy)),
            ((cx + 3, cy), (cx + arm, cy)),
            ((cx, cy - arm), (cx, cy - 3)),
            ((cx, cy + 3), (cx, cy + arm)),
        ):
            i = points.InsertNextPoint(a[0], a[1], 0.0)
            j = points.InsertNextPoint(b[0], b[1], 0.0)
            lines.InsertNextCell(2, [i, j])
        cross = vtk.vtkPolyData()
        cross.SetPoints(points)
        cross.SetLines(lines)
        cross_mapper = vtk.vtkPolyDataMapper2D()
        cross_mapper.SetInputData(cross)
        cross_actor = vtk.vtkActor2D()
        cross_actor.SetMapper(cross_mapper)
        cross_actor.GetProperty().SetColor(1.0, 0.85, 0.0)
        cross_actor.GetProperty().SetLineWidth(2)
        renderer.AddViewProp(cross_actor)

    group.RequestRender()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 3)[::-1].copy()
    group.SetMRMLDisplayableNode(None)
    window.Finalize()
    return rgb


def write_png(rgb: np.ndarray, path) -> None:
    path = Path(path)
    h, w, c = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, c)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


def add_default_colors(scene) -> None:
    """The default colour nodes (Grey for the image, ...) a slice view needs; the Slicer application adds them
    itself."""
    logic = mrml.vtkMRMLColorLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLScene(None)


# --------------------------------------------------------------------------------------------------- main
def segment_with_controller(scene, volume, url: str, model: str, api_key=None, threshold: float = 0.0):
    """The module's own state machine, headless: connect, choose the model, segment, wait."""
    controller = Controller(scene, settings.MemorySettings(), View(), api_key=api_key or "")
    controller.set_server(url)
    controller.connect()
    while controller.poll():
        time.sleep(0.05)
    if model not in controller.models:
        raise SystemExit(f"{url} has no model {model}: {controller.connection_text}")
    controller.select_model(model)
    if not controller.segment(volume, threshold):
        raise SystemExit(controller.status_text)
    while controller.poll():
        time.sleep(0.05)
    if controller.result is None:
        raise SystemExit(controller.status_text)
    return controller


def draw_table(rgb: np.ndarray, lines, title: str) -> np.ndarray:
    """The regions table beside the views: text drawn by VTK onto a dark panel (the module shows it in a table view)."""
    h, w, _ = rgb.shape
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(w, h)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.12, 0.13, 0.16)
    window.AddRenderer(renderer)
    for i, (text, size, color) in enumerate([(title, 16, (1, 1, 1))] + [(line, 13, c) for line, c in lines]):
        actor = vtk.vtkTextActor()
        actor.SetInput(text)
        prop = actor.GetTextProperty()
        prop.SetFontSize(size)
        prop.SetFontFamilyToCourier()
        prop.SetColor(*color)
        actor.SetDisplayPosition(12, h - 30 - 22 * i)
        renderer.AddViewProp(actor)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    out = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 3)[::-1].copy()
    window.Finalize()
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="URL of a running ACECal server (default: serve models/ here)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model id (default {DEFAULT_MODEL})")
    ap.add_argument("--api-key", default=os.environ.get("ACECAL_API_KEY"))
    ap.add_argument("--image", type=Path, default=SAMPLE, help="the scan (default: the sample hippocampus case)")
    ap.add_argument("--threshold", type=float, default=0.9, help="hide confidence above this (the module's slider)")
    ap.add_argument(
        "--flag-below",
        type=float,
        default=0.6,
        help="flag boundary voxels below this confidence (the module's 'Flag below confidence'; 0 = the "
        "model's own threshold, which for the shipped models joins the whole boundary band into one "
        "region on this case)",
    )
    ap.add_argument("--zoom", type=float, default=1.0, help="zoom of the slice views")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--out-review", type=Path, default=OUT_REVIEW)
    args = ap.parse_args(argv)

    scene = nodes.new_scene()
    add_default_colors(scene)
    volume = load_volume(scene, args.image)
    volume.SetName("ACECalHippocampus" if args.image == SAMPLE else volume.GetName())

    server = None
    try:
        url = args.server
        if not url:
            from live_server import LiveServer, make_settings

            work = Path(tempfile.mkdtemp(prefix="acecal_screenshot_"))
            server = LiveServer(make_settings(work / "data", [ROOT / "models"])).start()
            url = server.url
        controller = segment_with_controller(scene, volume, url, args.model, args.api_key, args.flag_below)
    finally:
        if server is not None:
            server.stop()
    result = controller.result
    n = len(result.regions)
    review = controller.review
    centre = review.goto(0) if n else None
    size = (520, 520)
    set_confidence_threshold(result.confidence_node, args.threshold, result.uncertainty_node)
    left = render_slice_view(
        scene,
        volume,
        result.confidence_node,
        size=size,
        centre_ras=centre,
        zoom=args.zoom,
        legend=False,
        caption=f"Module view: segments, confidence < {args.threshold:.2f} tinted,\n"
        f"{n} region{'s' if n != 1 else ''} flagged below {args.flag_below:.2f} outlined (magenta)",
        footer=f"{args.model} on ACECalHippocampus  |  region 1 of {n}" if n else args.model,
    )
    set_confidence_threshold(result.confidence_node, 1.0, result.uncertainty_node)
    for seg in (result.segmentation_node, result.uncertain_node):
        seg.GetDisplayNode().SetVisibility(False)
    right = render_slice_view(
        scene,
        volume,
        result.confidence_node,
        size=size,
        centre_ras=centre,
        zoom=args.zoom,
        caption="Confidence map (slider at 1.0): calibrated probability\nthat the predicted class is right",
        footer="viridis: dark = doubtful, yellow = confident",
    )
    gap = np.full((size[1], 6, 3), 255, np.uint8)
    write_png(np.concatenate([left, gap, right], axis=1), args.out)
    print(args.out)

    # the review worklist: verdicts as a clinician would give them (set here for the picture), three views
    for seg in (result.segmentation_node, result.uncertain_node):
        seg.GetDisplayNode().SetVisibility(True)
    set_confidence_threshold(result.confidence_node, args.threshold, result.uncertainty_node)
    if n:
        review.mark(regions.ACCEPTED, 0)
    if n > 1:
        review.mark(regions.CORRECTED, 1)
    if n > 2:
        review.mark(regions.REVIEWED, 2)
    row = min(1, n - 1) if n else -1
    centre = review.goto(row) if n else None
    views = [
        render_slice_view(
            scene,
            volume,
            result.confidence_node,
            size=(360, 360),
            centre_ras=centre,
            orientation=o,
            zoom=args.zoom,
            legend=False,
            caption=o,
            mark_centre=bool(n),
            footer=f"centred on region {row + 1} (cross)" if n else "",
        )
        for o in ("Axial", "Sagittal", "Coronal")
    ]
    rows = regions.regions_from_table(result.regions_table_node)
    colours = {
        regions.ACCEPTED: (0.5, 0.9, 0.5),
        regions.CORRECTED: (1.0, 0.6, 0.3),
        regions.REVIEWED: (0.7, 0.8, 1.0),
        regions.UNREVIEWED: (0.8, 0.8, 0.8),
    }
    lines = [(f"{'ID':>3} {'Class':<10} {'Review':<11} {'Vol ml':>7} {'Conf':>5}", (1, 1, 1))]
    lines += [
        (
            f"{r.id:>3} {r.class_name[:10]:<10} {r.review:<11} {r.volume_ml:7.3f} {r.mean_confidence:5.2f}"
            + ("  <" if i == row else ""),
            colours[r.review],
        )
        for i, r in enumerate(rows[:13])
    ]
    if len(rows) > 13:
        lines.append((f"... {len(rows) - 13} more", (0.8, 0.8, 0.8)))
    table = draw_table(np.zeros((360, 420, 3), np.uint8), lines, "Uncertain regions (the worklist)")
    gap = np.full((360, 6, 3), 255, np.uint8)
    write_png(np.concatenate([views[0], gap, views[1], gap, views[2], gap, table], axis=1), args.out_review)
    print(args.out_review)
    return args.out


if __name__ == "__main__":
    main()
