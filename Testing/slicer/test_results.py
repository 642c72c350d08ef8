"""Result nodes from arrays (no server): segments where the truth is, overlays on the input grid, display, table, navigation."""

from __future__ import annotations

import numpy as np
import pytest

from acecal.geometry import lps_to_ras

from ACECalibrationLib import display, nodes, regions, segmentation
from ACECalibrationLib._mrml import mrml, numpy_support, vtk
from ACECalibrationLib.logic import InferenceOutput, create_result_nodes
from oblique import oblique_grid, sphere_on_grid

LABELS = {"0": "background", "1": "liver", "2": "my lesion"}


def _output(grid, label, flags, regions_list=()):
    confidence = np.where(flags > 0, 0.55, 0.98).astype(np.float32)
    return InferenceOutput(
        labels=label, confidence=confidence, uncertainty=(1 - confidence).astype(np.float32), flags=flags,
        grid=grid, label_names=dict(LABELS), regions=list(regions_list), summary={"uncertain_volume_ml": 1.0},
        result_id="r1", model_id="m1")


def _two_class_case(grid):
    image, sphere, centre_lps = sphere_on_grid(grid, radius_mm=6.0)
    label = sphere.copy()
    label[:3, :4, :5] = 2  # a small box of class 2 in a corner
    # flags: the sphere's boundary shell (dilated minus eroded by one voxel along each array axis)
    core = sphere.astype(bool)
    grown, shrunk = core.copy(), core.copy()
    for ax in range(3):
        for sh in (1, -1):
            grown |= np.roll(core, sh, ax)
            shrunk &= np.roll(core, sh, ax)
    flags = (grown & ~shrunk).astype(np.uint8)
    return image, label, flags, centre_lps


def _segment_world_centroid(seg_node, segment_id):
    """Centroid in world RAS of a segment's own binary labelmap (its own geometry, no resampling)."""
    oriented = mrml.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, oriented)
    ext = oriented.GetExtent()
    dims = (ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1)
    a = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    k, j, i = np.nonzero(a)
    ijk = np.stack([i + ext[0], j + ext[2], k + ext[4], np.ones_like(i)], axis=1).astype(float)
    m = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(m)
    return (ijk @ nodes.matrix_to_numpy(m).T)[:, :3].mean(axis=0)


@pytest.fixture
def result(scene):
    grid = oblique_grid()
    image, label, flags, centre_lps = _two_class_case(grid)
    volume = nodes.add_volume_from_array(scene, image, grid, "CT")
    reply_regions = [
        {"id": 1, "class": "liver", "voxel_count": int(flags.sum()), "volume_ml": float(flags.sum() * grid.voxel_volume_ml),
         "mean_confidence": 0.55, "centroid_lps": list(centre_lps), "centroid_ras": list(lps_to_ras(centre_lps))},
        {"id": 2, "class": 2, "voxel_count": 60, "volume_ml": 0.3, "mean_confidence": 0.61,
         "centroid_lps": [1.0, 2.0, 3.0]},
    ]
    res = create_result_nodes(scene, volume, _output(grid, label, flags, reply_regions))
    return scene, volume, grid, label, flags, centre_lps, res


def test_overlays_share_the_input_grid(result):
    scene, volume, grid, label, flags, _, res = result
    for node in (res.confidence_node, res.uncertainty_node):
        assert nodes.volume_nodes_share_grid(volume, node)
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m1)
        node.GetIJKToRASMatrix(m2)
        assert np.array_equal(nodes.matrix_to_numpy(m1), nodes.matrix_to_numpy(m2))  # identical, not just close
    conf = nodes.array_from_volume_node(res.confidence_node)
    assert conf.dtype == np.float32 and np.allclose(conf[flags > 0], 0.55) and np.allclose(conf[flags == 0], 0.98)


def test_segments_named_coloured_and_where_the_truth_is(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    seg = res.segmentation_node
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == 3
    assert [s.GetNthSegment(i).GetName() for i in range(3)] == ["liver", "my lesion", "Uncertain"]
    assert res.segment_ids == {1: "label_1", 2: "label_2"}
    assert np.allclose(s.GetSegment("label_1").GetColor(), np.array((221, 130, 101)) / 255)  # GenericAnatomy liver
    assert np.allclose(s.GetSegment("label_2").GetColor(), np.array(display.LABEL_PALETTE[1]) / 255)
    assert np.allclose(s.GetSegment(res.uncertain_segment_id).GetColor(), display.UNCERTAIN_COLOR)
    assert segmentation.segment_label_value(s.GetSegment("label_2")) == 2
    assert segmentation.segment_label_value(s.GetSegment(res.uncertain_segment_id)) is None
    # voxel-exact on the input grid
    for value, sid in res.segment_ids.items():
        assert np.array_equal(segmentation.segment_mask(seg, sid, volume), (label == value).astype(np.uint8))
    assert np.array_equal(segmentation.segment_mask(seg, res.uncertain_segment_id, volume), flags)
    # and physically where the truth is: the sphere segment's centroid is the sphere centre in RAS
    truth_ras = lps_to_ras(centre_lps)
    sphere_ras = _segment_world_centroid(seg, "label_1")
    assert np.linalg.norm(sphere_ras - truth_ras) < 0.5 * min(grid.spacing)


def test_uncertain_is_outline_only_and_confidence_display(result):
    scene, volume, grid, label, flags, _, res = result
    d = res.segmentation_node.GetDisplayNode()
    uid = res.uncertain_segment_id
    assert d.GetSegmentOpacity2DFill(uid) == 0.0 and d.GetSegmentOpacity2DOutline(uid) == 1.0
    assert not d.GetSegmentVisibility3D(uid)
    assert d.GetSegmentOpacity2DFill("label_1") == 1.0 and d.GetOpacity2DFill() == pytest.approx(0.3)
    cd = res.confidence_node.GetDisplayNode()
    assert cd.GetColorNode().GetName() == display.CONFIDENCE_COLOR_NODE_NAME
    assert (cd.GetWindow(), cd.GetLevel()) == (pytest.approx(1.0), pytest.approx(0.5))
    assert cd.GetApplyThreshold() and cd.GetUpperThreshold() == pytest.approx(0.9)  # confident voxels hidden
    ud = res.uncertainty_node.GetDisplayNode()
    assert ud.GetApplyThreshold() and ud.GetLowerThreshold() == pytest.approx(0.1)
    display.set_confidence_threshold(res.confidence_node, 0.7, res.uncertainty_node)
    assert cd.GetUpperThreshold() == pytest.approx(0.7) and ud.GetLowerThreshold() == pytest.approx(0.3)
    display.set_confidence_threshold(res.confidence_node, 1.0)
    assert not cd.GetApplyThreshold()
    # one shared colour table however many results
    assert display.ensure_confidence_color_node(scene) is cd.GetColorNode()
    color = cd.GetColorNode()
    assert color.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    color.GetColor(255, rgba)
    assert np.allclose(rgba[:3], display.VIRIDIS_ANCHORS[-1], atol=1 / 255)  # stored as 8-bit
    legend = scene.GetFirstNodeByClass("vtkMRMLColorLegendDisplayNode")
    assert legend is not None and legend.GetTitleText() == "Confidence"


def test_regions_table_rows(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    t = res.regions_table_node
    assert t.GetNumberOfColumns() == len(regions.COLUMNS)
    assert [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())] == list(regions.COLUMNS)
    rows = regions.regions_from_table(t)
    assert [r.id for r in rows] == [1, 2]
    assert [r.class_name for r in rows] == ["liver", "my lesion"]  # label value 2 named from the model's labels
    assert rows[0].voxel_count == int(flags.sum())
    assert rows[0].mean_confidence == pytest.approx(0.55)
    assert np.allclose(rows[0].centroid_ras, lps_to_ras(centre_lps))
    assert np.allclose(rows[1].centroid_ras, [-1.0, -2.0, 3.0])  # only LPS given: converted by acecal.geometry
    assert t.GetColumnUnitLabel(regions.COL_VOLUME) == "ml"


def test_navigation_centres_slice_views(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    slices = []
    for name, orient in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        sn = mrml.vtkMRMLSliceNode()
        sn.SetName(name)
        sn.SetLayoutName(name)
        sn.SetDefaultOrientation(orient)
        sn.SetOrientation(orient)
        sn.SetDimensions(256, 256, 1)
        sn.SetFieldOfView(200, 200, 1)
        scene.AddNode(sn)
        slices.append(sn)
    scene.AddNode(mrml.vtkMRMLCrosshairNode())
    camera = scene.AddNewNodeByClass("vtkMRMLCameraNode")
    camera.SetPosition(0.0, 500.0, 0.0)
    camera.SetFocalPoint(0.0, 0.0, 0.0)
    nav = res.navigator()
    assert len(nav) == 2
    p = nav.next(scene)
    assert nav.index == 0 and np.allclose(p, lps_to_ras(centre_lps))
    for sn in slices:
        xy_to_ras = nodes.matrix_to_numpy(sn.GetXYToRAS())
        centre = xy_to_ras @ np.array([128.0, 128.0, 0.0, 1.0])
        assert np.allclose(centre[:3], p, atol=1e-6), sn.GetName()
    cross = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    assert np.allclose(cross.GetCrosshairRAS(), p)
    assert np.allclose(camera.GetFocalPoint(), p) and np.allclose(camera.GetPosition(), p + [0.0, 500.0, 0.0])
    assert np.allclose(nav.next(scene), [-1.0, -2.0, 3.0]) and nav.index == 1
    nav.next()
    assert nav.index == 0  # wraps
    nav.previous()
    assert nav.index == 1


def test_navigation_follows_a_parent_transform(scene):
    grid = oblique_grid()
    image, label, flags, centre_lps = _two_class_case(grid)
    volume = nodes.add_volume_from_array(scene, image, grid, "CT")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(2, 3, 40.0)
    t.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(t.GetID())
    reply = [{"id": 1, "class": 1, "voxel_count": 1, "volume_ml": 0.1, "mean_confidence": 0.5,
              "centroid_ras": [1.0, 2.0, 3.0]}]
    res = create_result_nodes(scene, volume, _output(grid, label, flags, reply))
    for n in (res.segmentation_node, res.confidence_node, res.uncertainty_node):
        assert n.GetTransformNodeID() == t.GetID()
    assert np.allclose(res.navigator().point(0), [1.0, 2.0, 43.0])


def test_absent_labels_still_get_segments_and_unknown_values_are_refused(scene):
    grid = oblique_grid(size=(8, 7, 6))
    volume = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "blank")
    empty = np.zeros(grid.shape_zyx, np.uint8)
    seg, ids, uid = segmentation.create_segmentation_node(scene, volume, empty, LABELS, empty)
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    bad = empty.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        segmentation.create_segmentation_node(scene, volume, bad, LABELS)


def test_overlay_goes_to_every_slice_view(result):
    scene, volume, grid, label, flags, _, res = result
    comps = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    n = display.apply_overlay_to_slice_views(scene, volume, res.confidence_node, 0.4)
    assert n == 3
    for c in comps:
        assert c.GetBackgroundVolumeID() == volume.GetID()
        assert c.GetForegroundVolumeID() == res.confidence_node.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.4)


def test_segment_colours_palette():
    assert display.segment_color(1, "Liver") == pytest.approx(tuple(np.array((221, 130, 101)) / 255))
    assert display.segment_color(3, "whatever") == pytest.approx(tuple(np.array(display.LABEL_PALETTE[2]) / 255))
    assert display.segment_color(17, "x") == display.segment_color(1, "x")  # cycles after 16
    assert np.allclose(display.viridis([0.0, 1.0]), display.VIRIDIS_ANCHORS[[0, -1]])
