"""Regenerate ``docs/images/slicer_overlay.png``: what the ACECalibration module shows, rendered offscreen.

The picture is made by Slicer's own slice-view machinery from slicer-core (no Slicer application, no display):
``vtkMRMLSliceLogic`` blends the layers exactly as a slice view does (image in the background, the confidence volume
in the foreground with its colour table, window and threshold), and the segmentations and colour-legend displayable
managers draw the segments, the magenta outline of the ``Uncertain`` segment and the colour bar. The result nodes
come from ``ACECalibrationLib.logic.run_segmentation`` against a real server, the same call the module makes.

    .venv/bin/python docs/make_screenshot.py                       # trains the tiny test model (~15 s), serves it
    .venv/bin/python docs/make_screenshot.py --server http://127.0.0.1:8000 --model ID [--image scan.nii.gz]

Offscreen OpenGL: VTK picks EGL (or OSMesa) when there is no X display; ``VTK_DEFAULT_OPENGL_WINDOW`` overrides it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "ACECalibration", ROOT / "Testing"):
    sys.path.insert(0, str(p))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from acecal.geometry import Grid  # noqa: E402

from ACECalibrationLib import nodes  # noqa: E402
from ACECalibrationLib.display import add_color_legend, set_confidence_threshold  # noqa: E402
from ACECalibrationLib._mrml import mrml, numpy_support, vtk  # noqa: E402
from ACECalibrationLib.logic import run_segmentation  # noqa: E402

OUT = ROOT / "docs" / "images" / "slicer_overlay.png"


# --------------------------------------------------------------------------------------------------- input volume
def synthetic_volume(scene, seed: int = 7):
    """Bright spheres in noise (the kind of image the tiny test model learned), on an oblique, anisotropic grid."""
    rng = np.random.default_rng(seed)
    tilt = np.array([[0.9848, -0.1736, 0.0], [0.1736, 0.9848, 0.0], [0.0, 0.0, 1.0]])  # 10 degrees about S
    grid = Grid.from_zyx_shape((40, 72, 72), (0.8, 0.8, 1.2), (-30.0, -25.0, -20.0), tilt.ravel())
    kk, jj, ii = np.meshgrid(*[np.arange(s) for s in grid.shape_zyx], indexing="ij")
    lps = grid.index_to_lps(np.stack([ii, jj, kk], -1).astype(float))
    centre = grid.index_to_lps(np.array(grid.size) / 2.0)
    image = np.zeros(grid.shape_zyx, np.float32)
    for offset, radius in (((-9.0, -8.0, 0.0), 6.5), ((10.0, 9.0, 1.0), 5.0), ((9.0, -11.0, -1.0), 3.8)):
        d = np.linalg.norm(lps - (centre + np.array(offset)), axis=-1)
        image += (1.0 / (1.0 + np.exp((d - radius) / 0.6))).astype(np.float32)  # soft edges: doubt at boundaries
    image += rng.normal(0.0, 0.22, image.shape).astype(np.float32)
    return nodes.add_volume_from_array(scene, image * 40.0, grid, "Synthetic scan")


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

def render_slice_view(scene, background, foreground, size=(640, 640), centre_ras=None, orientation="Axial",
                      foreground_opacity=0.6, caption="", footer="", zoom: float = 1.0,
                      legend: bool = True) -> np.ndarray:
    """Render one slice view like Slicer's (layers + segmentations + colour legend) to an RGB array (h, w, 3)."""
    app = mrml.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    slice_logic = mrml.vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    slice_logic.SetMRMLApplicationLogic(app)
    global _VIEWS
    _VIEWS += 1
    slice_node = slice_logic.AddSliceNode(("Red", "Yellow", "Green")[(_VIEWS - 1) % 3] + ("" if _VIEWS <= 3 else str(_VIEWS)))
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
    """The default colour nodes (Grey for the image, ...) a slice view needs; the Slicer application adds them itself."""
    logic = mrml.vtkMRMLColorLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLScene(None)


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="URL of a running ACECal server (default: train and serve the tiny test model)")
    ap.add_argument("--model", help="model id on --server")
    ap.add_argument("--api-key", default=os.environ.get("ACECAL_API_KEY"))
    ap.add_argument("--image", type=Path, help="a scan to segment (default: a synthetic one)")
    ap.add_argument("--threshold", type=float, default=0.9, help="hide confidence above this (the module's slider)")
    ap.add_argument("--zoom", type=float, default=1.6, help="zoom of the slice view")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    scene = nodes.new_scene()
    add_default_colors(scene)
    volume = load_volume(scene, args.image) if args.image else synthetic_volume(scene)

    server = None
    try:
        if args.server:
            url, model = args.server, args.model
            if not model:
                raise SystemExit("--model is needed with --server")
        else:
            from conftest import train_tiny_bundle
            from live_server import LiveServer, make_settings

            work = Path(tempfile.mkdtemp(prefix="acecal_screenshot_"))
            bundle = train_tiny_bundle(work / "train", epochs=20, n_cases=12)
            server = LiveServer(make_settings(work / "data", [bundle.parent])).start()
            url, model = server.url, bundle.name
        result = run_segmentation(scene, volume, url, model, api_key=args.api_key,
                                  confidence_display_threshold=args.threshold)
    finally:
        if server is not None:
            server.stop()

    nav = result.navigator()
    centre = nav.next() if len(nav) else None
    n = len(result.regions)
    size = (560, 560)
    # left: what the module shows after a run (slider at its default: confident voxels untinted)
    left = render_slice_view(
        scene, volume, result.confidence_node, size=size, centre_ras=centre, zoom=args.zoom, legend=False,
        caption=f"Module view: segments, confidence < {args.threshold:.2f} tinted,\n"
                f"{n} uncertain region{'s' if n != 1 else ''} outlined (segment 'Uncertain')",
        footer=f"model {model}  |  centred on region 1 of {n} ('Next region')" if n else f"model {model}")
    # right: the same slice with the slider at 1.0 (the whole confidence map) and the segments hidden
    set_confidence_threshold(result.confidence_node, 1.0, result.uncertainty_node)
    result.segmentation_node.GetDisplayNode().SetVisibility(False)
    right = render_slice_view(
        scene, volume, result.confidence_node, size=size, centre_ras=centre, zoom=args.zoom,
        caption="Confidence map (slider at 1.0): calibrated probability\nthat the predicted class is right",
        footer="viridis: dark = doubtful, yellow = confident")
    gap = np.full((size[1], 6, 3), 255, np.uint8)
    rgb = np.concatenate([left, gap, right], axis=1)
    write_png(rgb, args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
