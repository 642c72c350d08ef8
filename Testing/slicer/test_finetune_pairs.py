"""Training pairs from the scene (corrected segmentation -> label map on the image grid) and finding the client copy."""

from __future__ import annotations

import numpy as np
import pytest

from acecal.errors import InvalidInputError

from ACECalibrationLib import dependencies, nodes, segmentation
from ACECalibrationLib.finetune import labelmap_from_segmentation, segment_values, start_finetune, training_pair
from oblique import oblique_grid

LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _scene_with_result(scene):
    grid = oblique_grid(size=(14, 12, 10))
    volume = nodes.add_volume_from_array(scene, np.random.default_rng(0).random(grid.shape_zyx).astype(np.float32),
                                         grid, "img")
    label = np.zeros(grid.shape_zyx, np.uint8)
    label[2:6, 3:8, 4:9] = 1
    label[3:5, 4:6, 5:7] = 2
    flags = (label == 2).astype(np.uint8)
    seg, ids, uid = segmentation.create_segmentation_node(scene, volume, label, LABELS, flags)
    return volume, grid, label, seg, ids


def test_corrected_segmentation_becomes_a_label_map_on_the_image_grid(scene):
    volume, grid, label, seg, ids = _scene_with_result(scene)
    # the clinician corrects: grows the liver by one slab, and the Uncertain segment is ignored
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


def test_client_source_and_requirements(tmp_path):
    repo = tmp_path / "repo"
    module = repo / "ACECalibration"
    (module / "Resources").mkdir(parents=True)
    (module / "Resources" / "requirements.txt").write_text("# comment\nrequests>=2.31,<3\n\nnumpy>=1.26  # inline\n")
    assert dependencies.client_source(module) is None
    (repo / "server" / "acecal" / "client").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "acecal"\n')
    assert dependencies.client_source(module) == repo.resolve()
    reqs = dependencies.client_requirements(module)
    assert reqs[:2] == ["requests>=2.31,<3", "numpy>=1.26"] and reqs[2] == f"acecal @ {repo.resolve().as_uri()}"
    wheels = module / "Resources" / "wheels"
    wheels.mkdir()
    (wheels / "acecal-0.1.0-py3-none-any.whl").write_bytes(b"")
    assert dependencies.client_source(module).name == "acecal-0.1.0-py3-none-any.whl"  # a bundled wheel wins


def test_this_checkout_provides_the_client():
    from pathlib import Path

    module_dir = Path(__file__).resolve().parents[2] / "ACECalibration"
    assert dependencies.client_source(module_dir) == module_dir.parent
    assert dependencies.use_checkout(module_dir) and dependencies.client_available()
