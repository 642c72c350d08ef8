"""ACECalibrationLib inside the Slicer application (ctest ``py_ACECalibrationLibTest``).

The same Lib functions the pytest suite (``Testing/slicer``) runs on slicer-core, here on the application's own MRML
classes and ``slicer.mrmlScene``: exact geometry of an oblique, anisotropic, offset volume, and result nodes.
"""

import os
import sys
import unittest

import numpy as np
import slicer

MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)


class ACECalibrationLibTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def _grid(self):
        from ACECalibrationLib.client import Grid  # the extension's own copy of the client: nothing installed

        direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
        return Grid.from_zyx_shape((6, 7, 8), (0.7, 1.3, 2.5), (-31.5, 47.25, 12.0), direction.ravel())

    def test_round_trip_exact_geometry(self):
        from ACECalibrationLib import nodes

        grid = self._grid()
        array = np.arange(np.prod(grid.shape_zyx), dtype=np.float32).reshape(grid.shape_zyx)
        node = nodes.add_volume_from_array(slicer.mrmlScene, array, grid, "oblique")
        back, back_grid = nodes.volume_node_to_array(node)
        self.assertTrue(np.array_equal(back, array))
        self.assertTrue(back_grid.same_as(grid, atol=1e-9))
        self.assertTrue(np.allclose(slicer.util.arrayFromVolume(node), array))  # Slicer's own reader agrees

    def test_segments_and_uncertain_outline(self):
        from ACECalibrationLib import display, nodes, segmentation

        grid = self._grid()
        volume = nodes.add_volume_from_array(slicer.mrmlScene, np.zeros(grid.shape_zyx, np.float32), grid, "img")
        label = np.zeros(grid.shape_zyx, np.uint8)
        label[2:4, 2:5, 3:6] = 1
        flags = np.zeros_like(label)
        flags[2, 2, 3] = 1
        seg, ids = segmentation.create_segmentation_node(
            slicer.mrmlScene, volume, label, {"0": "background", "1": "liver"}
        )
        uncertain = segmentation.create_uncertain_segmentation(slicer.mrmlScene, volume, flags)
        self.assertEqual(seg.GetSegmentation().GetSegment(ids[1]).GetName(), "liver")
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)  # Uncertain is not a class
        self.assertEqual(
            uncertain.GetSegmentation().GetSegment(segmentation.UNCERTAIN_SEGMENT_ID).GetName(),
            display.UNCERTAIN_SEGMENT_NAME,
        )
        self.assertTrue(np.array_equal(segmentation.segment_mask(seg, ids[1], volume), label))
        self.assertFalse(uncertain.GetDisplayNode().GetVisibility2DFill())
