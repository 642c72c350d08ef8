"""Regenerate the module icon and the sample data's thumbnail, numpy + VTK only.

- ``ACECalibration/Resources/Icons/ACECalibration.png`` (128x128 RGBA): a grey slice, an organ tinted by confidence
  (viridis: yellow = confident core, purple = doubtful rim) and the magenta outline of an uncertain region, as the
  module shows them.
- ``ACECalibration/Resources/SampleData/ACECalHippocampus.png`` (160x160): the sample case's axial slice with the
  most hippocampus, its reference segments outlined in their colours (read by Slicer's own readers, slicer-core).

    .venv/bin/python docs/make_icon.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ACECalibration"))

from ACECalibrationLib.display import UNCERTAIN_COLOR, viridis  # noqa: E402

N, SS = 128, 4  # size, supersampling


def render() -> np.ndarray:
    n = N * SS
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SS
    rgba = np.zeros((n, n, 4))
    # rounded square, dark slate
    r = 18.0
    dx = np.maximum(np.maximum(r - x, x - (N - r)), 0)
    dy = np.maximum(np.maximum(r - y, y - (N - r)), 0)
    inside = dx**2 + dy**2 <= r**2
    rgba[inside] = (0.12, 0.14, 0.18, 1.0)
    # body cross-section: grey ellipse with soft shading
    body = ((x - 64) / 52) ** 2 + ((y - 66) / 44) ** 2
    m = body <= 1
    grey = 0.35 + 0.25 * (1 - body)
    rgba[m, :3] = np.stack([grey[m]] * 3, axis=-1)
    # organ: confidence tint, yellow core fading to purple at the boundary
    d = np.sqrt(((x - 58) / 30) ** 2 + ((y - 62) / 24) ** 2)
    organ = d <= 1
    conf = np.clip(1.0 - d**3 * 0.8, 0, 1)
    rgba[organ, :3] = 0.35 * rgba[organ, :3] + 0.65 * viridis(conf[organ])
    # organ outline (light)
    rim = (d > 0.95) & (d <= 1.03)
    rgba[rim, :3] = (0.95, 0.95, 0.95)
    # uncertain region: magenta ring on the organ's upper right boundary
    u = np.sqrt(((x - 84) / 12) ** 2 + ((y - 46) / 10) ** 2)
    ring = (u > 0.82) & (u <= 1.0) & (body <= 1)
    rgba[ring, :3] = UNCERTAIN_COLOR
    rgba[ring, 3] = 1.0
    # downsample
    out = rgba.reshape(N, SS, N, SS, 4).mean(axis=(1, 3))
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(rgba: np.ndarray, path: Path) -> None:
    import vtk
    from vtkmodules.util import numpy_support

    h, w, c = rgba.shape
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    flipped = np.ascontiguousarray(rgba[::-1]).reshape(-1, c)  # VTK's first row is the bottom one
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flipped, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


def render_sample_thumbnail(size: int = 160) -> np.ndarray:
    """The sample hippocampus case: its fullest axial slice, grey, with the reference segments' outlines."""
    from ACECalibrationLib import nodes, sampledata, segmentation
    from ACECalibrationLib._mrml import mrml

    folder = sampledata.sample_dir(ROOT / "ACECalibration")
    scene = nodes.new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(folder / "ACECalHippocampus.nii.gz"))
    assert reader.ReadData(volume)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg_reader = mrml.vtkMRMLSegmentationStorageNode()
    scene.AddNode(seg_reader)
    seg_reader.SetFileName(str(folder / "ACECalHippocampusReference.seg.nrrd"))
    assert seg_reader.ReadData(seg)
    image = nodes.array_from_volume_node(volume).astype(float)
    s = seg.GetSegmentation()
    masks = [
        (segmentation.segment_mask(seg, s.GetNthSegmentID(i), volume) > 0, s.GetNthSegment(i).GetColor())
        for i in range(s.GetNumberOfSegments())
    ]
    k = int(np.argmax(sum(m for m, _ in masks).sum(axis=(1, 2))))
    lo, hi = np.percentile(image, [1, 99.5])
    grey = np.clip((image[k] - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for mask, color in masks:
        m = mask[k]
        inner = m.copy()
        for ax in (0, 1):
            for sh in (1, -1):
                inner &= np.roll(m, sh, ax)
        rgb[m & ~inner] = color
    rgb = rgb[::-1, ::-1]  # the array's (j, i) runs P->A and L->R here: flip to radiological A-up, R-left
    scale = max(1, size // max(rgb.shape[:2]))
    big = np.kron(rgb, np.ones((scale, scale, 1)))
    out = np.zeros((size, size, 4))
    out[..., 3] = 1.0
    y0, x0 = (size - big.shape[0]) // 2, (size - big.shape[1]) // 2
    out[y0 : y0 + big.shape[0], x0 : x0 + big.shape[1], :3] = big
    scene.Clear(1)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


if __name__ == "__main__":
    out = ROOT / "ACECalibration" / "Resources" / "Icons" / "ACECalibration.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(render(), out)
    print(out)
    thumb = ROOT / "ACECalibration" / "Resources" / "SampleData" / "ACECalHippocampus.png"
    write_png(render_sample_thumbnail(), thumb)
    print(thumb)
