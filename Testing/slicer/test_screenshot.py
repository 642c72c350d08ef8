"""The offscreen slice-view rendering of docs/make_screenshot.py draws what the module shows (no server needed).

Runs in a subprocess: OpenGL problems (no EGL/OSMesa) must skip the test, not crash the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1] + "/docs", sys.argv[1] + "/Testing", sys.argv[1] + "/Testing/slicer"]
    import make_screenshot as ms
    from ACECalibrationLib import display, nodes
    from ACECalibrationLib.logic import create_result_nodes
    from oblique import oblique_grid, sphere_on_grid
    from replies import inference_result

    scene = nodes.new_scene()
    ms.add_default_colors(scene)
    grid = oblique_grid(size=(40, 40, 20), spacing=(1.0, 1.0, 1.5))
    image, label, centre = sphere_on_grid(grid, radius_mm=9.0)
    volume = nodes.add_volume_from_array(scene, image, grid, "img")
    flags = np.zeros_like(label)
    flags[8:12, 10:30, 10:30] = label[8:12, 10:30, 10:30]
    assert flags.sum() > 100
    conf = np.where(flags > 0, 0.3, 0.99).astype(np.float32)
    out = inference_result(grid, label, conf, 1 - conf, flags, {"0": "background", "1": "liver"})
    res = create_result_nodes(scene, volume, out, confidence_display_threshold=0.9)
    centre_ras = np.array([-centre[0], -centre[1], centre[2]])
    rgb = ms.render_slice_view(scene, volume, res.confidence_node, size=(240, 240), centre_ras=centre_ras)
    ms.write_png(rgb, sys.argv[2])
    px = rgb.reshape(-1, 3).astype(int)
    magenta = int(((px[:, 0] > 200) & (px[:, 1] < 60) & (px[:, 2] > 200)).sum())
    low_conf = np.round(display.viridis(0.3) * 255).astype(int)  # tint of confidence 0.3 (blended with the image)
    tinted = int((np.abs(px - low_conf).sum(axis=1) < 120).sum())
    grey = int(((np.abs(px[:, 0] - px[:, 1]) < 4) & (np.abs(px[:, 1] - px[:, 2]) < 4) & (px[:, 0] > 30)).sum())
    print(json.dumps({"magenta": magenta, "tinted": tinted, "grey": grey, "shape": list(rgb.shape)}))
""")


def test_offscreen_slice_view_shows_image_overlay_and_uncertain_outline(tmp_path):
    png = tmp_path / "view.png"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT), str(png)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        err = proc.stderr[-2000:]
        if proc.returncode < 0 or "OpenGL" in err or "EGL" in err or "display" in err.lower():
            pytest.skip(f"no offscreen OpenGL here (rc {proc.returncode}): {err[-300:]}")
        raise AssertionError(err)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["shape"] == [240, 240, 3]
    assert png.is_file() and png.stat().st_size > 1000
    assert stats["grey"] > 5000, stats  # the image in the background
    assert stats["magenta"] > 50, stats  # the Uncertain segment's outline
    assert stats["tinted"] > 50, stats  # low-confidence voxels tinted by the foreground layer
