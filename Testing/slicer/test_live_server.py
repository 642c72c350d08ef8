"""ACECalibrationLib against a real ACECal server on loopback (uvicorn, the tiny trained bundle), on real MRML.

The volume is an oblique (tilted, axes permuted and flipped), anisotropic, offset grid holding a physical sphere
whose position is known, so "the segment is where the truth is" is checked in world coordinates too.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, torch, monai) is needed")

from oblique import oblique_grid, sphere_on_grid

from ACECalibrationLib import display, nodes, regions, segmentation, stats
from ACECalibrationLib.client import ACEClient, ModelNotFoundError, UnauthorizedError
from ACECalibrationLib.client.geometry import lps_to_ras
from ACECalibrationLib.logic import (
    create_result_nodes,
    infer,
    prepare_input,
    run_segmentation,
    user_message,
)

KEY = "slicer-test-key"  # = conftest.SERVER_KEY
MODEL = "tiny-sphere"


@pytest.fixture
def case(scene):
    grid = oblique_grid()  # tilted, axes permuted and flipped, anisotropic, offset (Testing/oblique.py)
    image, label, centre_lps = sphere_on_grid(grid, radius_mm=5.5, seed=3)
    volume = nodes.add_volume_from_array(scene, image, grid, "Oblique sphere")
    return volume, grid, label, centre_lps


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_segmentation_overlays_and_table_from_the_server(scene, case, client):
    volume, grid, truth, centre_lps = case
    array, sent_grid = prepare_input(volume)
    assert sent_grid.same_as(grid, atol=1e-9)
    # a high threshold so the model's (few) doubtful boundary voxels are flagged as regions
    output = infer(client, MODEL, array, sent_grid, uncertainty_threshold=0.999)
    result = create_result_nodes(scene, volume, output)

    # overlays: on the input's exact grid
    for node in (result.confidence_node, result.uncertainty_node):
        assert nodes.volume_nodes_share_grid(volume, node)
        a = nodes.array_from_volume_node(node)
        assert a.shape == grid.shape_zyx and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0

    # segments: named as the model names them, standard colours, where the ground truth is
    seg = result.segmentation_node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["sphere"]  # anatomy only; Uncertain is its own segmentation
    assert np.allclose(seg.GetSegment(result.segment_ids[1]).GetColor(), display.segment_color(1, "sphere"))
    uncertain = result.uncertain_node.GetSegmentation().GetSegment(result.uncertain_segment_id)
    assert uncertain.GetName() == display.UNCERTAIN_SEGMENT_NAME
    assert np.allclose(uncertain.GetColor(), display.UNCERTAIN_COLOR)
    mask = segmentation.segment_mask(result.segmentation_node, result.segment_ids[1], volume)
    assert np.array_equal(mask, (output.label_map == 1).astype(np.uint8))
    assert _dice(mask, truth) > 0.8, _dice(mask, truth)
    m = vtk_matrix(volume)
    k, j, i = np.nonzero(mask)
    centroid_ras = (np.stack([i, j, k, np.ones_like(i)], 1) @ m.T)[:, :3].mean(0)
    assert np.linalg.norm(centroid_ras - lps_to_ras(centre_lps)) < 1.5  # mm
    flags = segmentation.segment_mask(result.uncertain_node, result.uncertain_segment_id, volume)
    assert np.array_equal(flags, (output.flags > 0).astype(np.uint8))

    # the regions table matches the server's regions, row by row (read with the copied wire protocol)
    assert len(output.regions) > 0, "expected flagged regions at threshold 0.999"
    assert output.regions[0].extra == {}  # the protocol knows every key the server sends
    rows = regions.regions_from_table(result.regions_table_node)
    assert len(rows) == len(output.regions) == result.summary.region_count
    for row, r in zip(rows, output.regions, strict=True):
        assert row.id == r.id and row.class_name == r.class_name == "sphere"
        assert row.voxels == r.voxels
        assert row.volume_ml == pytest.approx(r.volume_ml) and row.mean_confidence == pytest.approx(r.mean_confidence)
        assert np.allclose(row.centroid_ras, r.centroid_ras)
        assert np.allclose(row.centroid_ras, lps_to_ras(r.centroid_lps))
    # the per-segment statistics computed in Slicer agree with the server's summary of the same label map
    classes = {c.name: c for c in result.summary.classes}
    for row in stats.segment_statistics(
        result.segmentation_node, volume, result.confidence_node, result.uncertain_node
    ):
        assert row.voxels == classes[row.name].voxels
        assert row.volume_ml == pytest.approx(classes[row.name].volume_ml, rel=1e-9)
        assert row.mean_confidence == pytest.approx(classes[row.name].mean_confidence, rel=1e-4)
        assert row.uncertain_ml == pytest.approx(classes[row.name].uncertain_volume_ml, rel=1e-9)
    # navigation goes to the first region's centroid
    assert np.allclose(result.navigator().next(scene), rows[0].centroid_ras)


def vtk_matrix(node):
    from ACECalibrationLib._mrml import vtk

    mat = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(mat)
    return nodes.matrix_to_numpy(mat)


def test_run_segmentation_entry_point(scene, case, server):
    volume, grid, truth, _ = case
    result = run_segmentation(scene, volume, server.url, MODEL, api_key=KEY)
    assert result.model_id == MODEL and result.label_names == {"0": "background", "1": "sphere"}
    for name in (
        "segmentation_node",
        "uncertain_node",
        "confidence_node",
        "uncertainty_node",
        "regions_table_node",
        "statistics_table_node",
    ):
        assert getattr(result, name) is not None and getattr(result, name).GetScene() is scene
    assert result.regions_table_node.GetNumberOfColumns() == len(regions.COLUMNS)
    assert result.regions_table_node.GetNumberOfRows() == len(result.regions)


def test_errors_server_down_wrong_key_unknown_model(scene, case, server):
    from live_server import free_port

    volume = case[0]
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as e:
        run_segmentation(scene, volume, down, MODEL, api_key=KEY)
    msg = user_message(e.value, down)
    assert msg.startswith(f"Cannot reach the ACECalibration server at {down}") and "acecal serve" in msg

    with pytest.raises(UnauthorizedError) as e:
        run_segmentation(scene, volume, server.url, MODEL, api_key="wrong-key")
    msg = user_message(e.value, server.url)
    assert "refused the API key" in msg and e.value.detail in msg

    with pytest.raises(UnauthorizedError):  # no key at all
        run_segmentation(scene, volume, server.url, MODEL, api_key=None, client=ACEClient(server.url, api_key=""))

    with pytest.raises(ModelNotFoundError) as e:
        run_segmentation(scene, volume, server.url, "no-such-model", api_key=KEY)
    assert "no-such-model" in user_message(e.value)
    # nothing half-made was left in the scene by the failures
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
