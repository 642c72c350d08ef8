"""Training pairs from the scene: a corrected segmentation becomes a label map on the image grid."""

from __future__ import annotations

import numpy as np
import pytest
from oblique import oblique_grid

from ACECalibrationLib import nodes, segmentation
from ACECalibrationLib.client.errors import InvalidInputError
from ACECalibrationLib.finetune import labelmap_from_segmentation, segment_values, start_finetune, training_pair

LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _scene_with_result(scene):
    grid = oblique_grid(size=(14, 12, 10))
    volume = nodes.add_volume_from_array(
        scene, np.random.default_rng(0).random(grid.shape_zyx).astype(np.float32), grid, "img"
    )
    label = np.zeros(grid.shape_zyx, np.uint8)
    label[2:6, 3:8, 4:9] = 1
    label[3:5, 4:6, 5:7] = 2
    seg, ids = segmentation.create_segmentation_node(scene, volume, label, LABELS)
    return volume, grid, label, seg, ids


def test_corrected_segmentation_becomes_a_label_map_on_the_image_grid(scene):
    volume, grid, label, seg, ids = _scene_with_result(scene)
    # the clinician corrects: grows the liver by one slab
    corrected = label.copy()
    corrected[6, 3:8, 4:9] = 1
    segmentation.set_segment_from_mask(seg, ids[1], corrected == 1, grid.ijk_to_ras)
    assert segment_values(seg, LABELS) == {"label_1": 1, "label_2": 2}
    pair = training_pair(volume, seg, LABELS)
    assert pair.grid.same_as(grid) and pair.label.dtype == np.uint8
    assert np.array_equal(pair.label, corrected)


def test_user_segments_map_by_name_and_unknown_names_are_refused(scene):
    volume, grid, label, seg, ids = _scene_with_result(scene)
    s = seg.GetSegmentation()
    s.AddEmptySegment("mine", "Tumour", (1.0, 0.0, 0.0))  # a user's own segment, matched by name (case-insensitive)
    assert segment_values(seg, LABELS)["mine"] == 2
    s.AddEmptySegment("other", "spleen", (0.0, 1.0, 0.0))
    with pytest.raises(InvalidInputError, match="'spleen'"):
        labelmap_from_segmentation(seg, volume, LABELS)


def test_empty_pair_and_no_pairs_are_refused(scene):
    volume, grid, label, seg, ids = _scene_with_result(scene)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    with pytest.raises(InvalidInputError, match="empty"):
        training_pair(volume, empty, LABELS)
    with pytest.raises(InvalidInputError, match="at least one"):
        start_finetune(object(), [], "m", "hardl1ace_dice_ce", 1)
