"""Result nodes from arrays (no server): segments where the truth is, ``Uncertain`` in its own segmentation, overlays
on the input grid, display only of the module's own volumes, the review worklist, statistics, node reuse, navigation
of the relevant views only."""

from __future__ import annotations

import numpy as np
import pytest
from oblique import oblique_grid, sphere_on_grid
from replies import inference_result, region_json

from ACECalibrationLib import display, logic, nodes, regions, segmentation, stats, terminology
from ACECalibrationLib._mrml import mrml, numpy_support, vtk
from ACECalibrationLib.client.errors import ProtocolError
from ACECalibrationLib.client.geometry import lps_to_ras
from ACECalibrationLib.logic import create_result_nodes, find_result_nodes
from ACECalibrationLib.review import ReviewSession

LABELS = {"0": "background", "1": "liver", "2": "my lesion"}


def _output(grid, label, flags, regions_list=(), model_id="m1"):
    confidence = np.where(flags > 0, 0.55, 0.98).astype(np.float32)
    return inference_result(
        grid, label, confidence, (1 - confidence).astype(np.float32), flags, LABELS, regions_list, model_id=model_id
    )


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
        region_json(1, 1, "liver", int(flags.sum()), float(flags.sum() * grid.voxel_volume_ml), 0.55, centre_lps),
        region_json(2, 2, "", 60, 0.3, 0.61, [1.0, 2.0, 3.0]),  # no class_name: named from the model's labels
    ]
    res = create_result_nodes(scene, volume, _output(grid, label, flags, reply_regions))
    return scene, volume, grid, label, flags, centre_lps, res


def _slice_views(scene, names=("Red", "Yellow", "Green")):
    out = []
    for name, orient in zip(names, ("Axial", "Sagittal", "Coronal"), strict=False):
        sn = mrml.vtkMRMLSliceNode()
        sn.SetName(name)
        sn.SetLayoutName(name)
        sn.SetDefaultOrientation(orient)
        sn.SetOrientation(orient)
        sn.SetDimensions(256, 256, 1)
        sn.SetFieldOfView(200, 200, 1)
        scene.AddNode(sn)
        comp = mrml.vtkMRMLSliceCompositeNode()
        comp.SetLayoutName(name)
        scene.AddNode(comp)
        out.append((sn, comp))
    return out


def _view_centre(sn):
    return (nodes.matrix_to_numpy(sn.GetXYToRAS()) @ np.array([128.0, 128.0, 0.0, 1.0]))[:3]


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


def test_anatomy_segments_named_coloured_coded_and_where_the_truth_is(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    seg = res.segmentation_node
    s = seg.GetSegmentation()
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == ["liver", "my lesion"]
    assert res.segment_ids == {1: "label_1", 2: "label_2"}
    assert np.allclose(s.GetSegment("label_1").GetColor(), np.array((221, 130, 101)) / 255)  # GenericAnatomy liver
    assert np.allclose(s.GetSegment("label_2").GetColor(), np.array(display.LABEL_PALETTE[1]) / 255)
    assert segmentation.segment_label_value(s.GetSegment("label_2")) == 2
    # terminology codes as Slicer serialises them: liver is SNOMED 10200004, an unknown name gets Slicer's Tissue
    tag = mrml.vtkSegment.GetTerminologyEntryTagName()
    assert tag == terminology.TAG
    liver = segmentation.segment_tag(s.GetSegment("label_1"), tag)
    assert (
        liver.split("~")[:3]
        == [terminology.GENERAL_ANATOMY, "SCT^123037004^Anatomical Structure", "SCT^10200004^Liver"]
        and len(liver.split("~")) == 7
    )
    assert segmentation.segment_tag(s.GetSegment("label_2"), tag) == terminology.DEFAULT.serialized()
    # voxel-exact on the input grid
    for value, sid in res.segment_ids.items():
        assert np.array_equal(segmentation.segment_mask(seg, sid, volume), (label == value).astype(np.uint8))
    # and physically where the truth is: the sphere segment's centroid is the sphere centre in RAS
    assert np.linalg.norm(_segment_world_centroid(seg, "label_1") - lps_to_ras(centre_lps)) < 0.5 * min(grid.spacing)


def test_uncertain_is_its_own_segmentation_and_never_a_class(result):
    scene, volume, grid, label, flags, _, res = result
    u = res.uncertain_node
    assert u is not res.segmentation_node and u.GetSegmentation().GetNumberOfSegments() == 1
    only = u.GetSegmentation().GetNthSegment(0)
    assert only.GetName() == display.UNCERTAIN_SEGMENT_NAME and np.allclose(only.GetColor(), display.UNCERTAIN_COLOR)
    assert np.array_equal(segmentation.segment_mask(u, res.uncertain_segment_id, volume), flags)
    d = u.GetDisplayNode()
    assert not d.GetVisibility2DFill() and d.GetVisibility2DOutline() and not d.GetVisibility3D()
    # labelmap export (what DICOM SEG export and Segment Statistics see) of the anatomy holds the classes only
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic_ = nodes.ensure_segmentations_logic(scene)
    assert logic_.ExportAllSegmentsToLabelmapNode(res.segmentation_node, labelmap, 0)
    exported = nodes.array_from_volume_node(labelmap)
    assert exported.any() and res.segmentation_node.GetSegmentation().GetNumberOfSegments() == 2
    assert set(np.unique(exported)) <= {0, 1, 2}
    assert int((exported > 0).sum()) == int((label > 0).sum())  # no flagged voxel added as a class


def test_confidence_display_and_only_result_volumes_are_restyled(result):
    scene, volume, grid, label, flags, _, res = result
    cd = res.confidence_node.GetDisplayNode()
    assert cd.GetColorNode().GetName() == display.CONFIDENCE_COLOR_NODE_NAME  # slicer-core: no Slicer Viridis here
    assert (cd.GetWindow(), cd.GetLevel()) == (pytest.approx(1.0), pytest.approx(0.5))
    assert cd.GetApplyThreshold() and cd.GetUpperThreshold() == pytest.approx(0.9)  # confident voxels hidden
    ud = res.uncertainty_node.GetDisplayNode()
    assert ud.GetApplyThreshold() and ud.GetLowerThreshold() == pytest.approx(0.1)
    display.set_confidence_threshold(res.confidence_node, 0.7, res.uncertainty_node)
    assert cd.GetUpperThreshold() == pytest.approx(0.7) and ud.GetLowerThreshold() == pytest.approx(0.3)
    display.set_confidence_threshold(res.confidence_node, 1.0)
    assert not cd.GetApplyThreshold()
    # the scan itself is never recoloured: its colour table and window stay as they were
    volume.CreateDefaultDisplayNodes()
    vd = volume.GetDisplayNode()
    before = (vd.GetColorNodeID(), vd.GetWindow(), vd.GetLevel(), vd.GetApplyThreshold())
    with pytest.raises(ValueError, match="not a confidence or uncertainty volume"):
        display.set_confidence_threshold(volume, 0.5)
    with pytest.raises(ValueError, match="not a confidence or uncertainty volume"):
        display.set_overlay(scene, volume, volume)
    assert (vd.GetColorNodeID(), vd.GetWindow(), vd.GetLevel(), vd.GetApplyThreshold()) == before
    legend = mrml.vtkSlicerColorLogic.GetColorLegendDisplayNode(res.confidence_node)
    assert legend is not None and legend.GetTitleText() == "Confidence"


def test_slicer_own_viridis_is_used_when_the_scene_has_it(scene, tmp_path):
    # the application loads ColorFiles/Viridis.txt as node vtkMRMLColorTableNodeFileViridis.txt; here a table in
    # that file format, read by Slicer's own colour-table reader, stands in for it
    rgb = np.round(display.viridis(np.linspace(0, 1, 256)) * 255).astype(int)
    path = tmp_path / "Viridis.txt"
    path.write_text("# 256 values\n" + "".join(f"{i} {i} {r} {g} {b} 255\n" for i, (r, g, b) in enumerate(rgb)))
    color = mrml.vtkMRMLColorTableNode()
    storage = mrml.vtkMRMLColorTableStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(color)
    color.SetName("Viridis")
    # a colour-file node is a singleton tagged as vtkMRMLColorLogic tags it: that makes the application's node ID
    color.SetSingletonTag(mrml.vtkMRMLColorLogic().GetFileColorNodeSingletonTag(str(path)))
    scene.AddNode(color)
    assert scene.GetNodeByID(display.SLICER_VIRIDIS_ID) is color
    grid = oblique_grid(size=(6, 5, 4))
    volume = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "img")
    res = create_result_nodes(
        scene, volume, _output(grid, np.zeros(grid.shape_zyx, np.uint8), np.zeros(grid.shape_zyx, np.uint8))
    )
    assert res.confidence_node.GetDisplayNode().GetColorNodeID() == display.SLICER_VIRIDIS_ID
    assert scene.GetFirstNodeByName(display.CONFIDENCE_COLOR_NODE_NAME) is None  # no hand-built table next to it


def test_regions_table_rows_and_review_states(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    t = res.regions_table_node
    assert [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())] == list(regions.COLUMNS)
    rows = regions.regions_from_table(t)
    assert [r.id for r in rows] == [1, 2]
    assert [r.class_name for r in rows] == ["liver", "my lesion"]  # value 2 named from the model's labels
    assert rows[0].voxels == int(flags.sum()) and rows[0].mean_confidence == pytest.approx(0.55)
    assert np.allclose(rows[0].centroid_ras, lps_to_ras(centre_lps))
    assert [r.review for r in rows] == [regions.UNREVIEWED] * 2
    regions.set_review_state(t, 1, regions.ACCEPTED)
    assert regions.review_state(t, 1) == regions.ACCEPTED and regions.review_state(t, 0) == regions.UNREVIEWED
    with pytest.raises(ValueError, match="unknown review state"):
        regions.set_review_state(t, 0, "fine")
    with pytest.raises(IndexError):
        regions.set_review_state(t, 2, regions.ACCEPTED)
    assert t.GetColumnUnitLabel(regions.COL_VOLUME) == "ml"


def test_a_reply_without_the_real_keys_is_refused():
    good = region_json(1, 1, "liver", 10, 0.1, 0.5, [1.0, 2.0, 3.0])
    assert regions.region_from_reply(good).voxels == 10
    for key in ("voxels", "centroid_ras", "mean_confidence"):
        bad = {k: v for k, v in good.items() if k != key}
        with pytest.raises(ProtocolError, match=key):
            regions.region_from_reply(bad)
    renamed = dict(good, voxel_count=10)  # a spelling the server does not use is not guessed at
    del renamed["voxels"]
    with pytest.raises(ProtocolError, match="'voxels' is missing"):
        regions.region_from_reply(renamed)
    with pytest.raises(ProtocolError, match="centroid_ras"):
        regions.region_from_reply(dict(good, centroid_ras=[1.0, 2.0]))


def test_review_states_are_saved_with_the_scene(result, tmp_path):
    scene, volume, grid, label, flags, centre_lps, res = result
    t = res.regions_table_node
    regions.set_review_state(t, 0, regions.CORRECTED)
    regions.set_review_state(t, 1, regions.REVIEWED)
    t.AddDefaultStorageNode()
    storage = t.GetStorageNode()
    storage.SetFileName(str(tmp_path / "regions.tsv"))
    assert storage.WriteData(t)
    back = mrml.vtkMRMLTableNode()
    reader = mrml.vtkMRMLTableStorageNode()
    reader.SetFileName(str(tmp_path / "regions.tsv"))
    assert reader.ReadData(back)
    assert [r.review for r in regions.regions_from_table(back)] == [regions.CORRECTED, regions.REVIEWED]
    assert [r.id for r in regions.regions_from_table(back)] == [1, 2]


def test_a_correction_while_a_region_is_current_marks_it_corrected(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    review = ReviewSession(scene, res.regions_table_node, res.segmentation_node, res.shown_node_ids())
    try:
        grown = label == 1
        grown[0] = True
        segmentation.set_segment_from_mask(res.segmentation_node, "label_1", grown, grid.ijk_to_ras)  # no region yet
        assert review.counts()[regions.CORRECTED] == 0
        assert review.next_unreviewed() == 0
        review.mark(regions.ACCEPTED)
        assert review.next_unreviewed() == 1 and review.current == 1
        segmentation.set_segment_from_mask(res.segmentation_node, "label_2", label == 2, grid.ijk_to_ras)  # an edit
        assert review.state(1) == regions.CORRECTED and review.state(0) == regions.ACCEPTED
        assert review.next_unreviewed() is None  # all reviewed
    finally:
        review.close()
    segmentation.set_segment_from_mask(res.segmentation_node, "label_1", label == 1, grid.ijk_to_ras)
    assert regions.review_state(res.regions_table_node, 0) == regions.ACCEPTED  # closed: no longer observing


def test_segment_statistics(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    rows = stats.segment_statistics(res.segmentation_node, volume, res.confidence_node, res.uncertain_node)
    conf = nodes.array_from_volume_node(res.confidence_node)
    for row, value in zip(rows, (1, 2), strict=True):
        mask = label == value
        assert row.voxels == int(mask.sum())
        assert row.volume_ml == pytest.approx(mask.sum() * grid.voxel_volume_ml)
        assert row.mean_confidence == pytest.approx(float(conf[mask].mean()), rel=1e-6)
        assert row.uncertain_ml == pytest.approx((mask & (flags > 0)).sum() * grid.voxel_volume_ml)
    table = res.statistics_table_node
    assert table.GetNumberOfRows() == 2 and table.GetCellText(0, 0) == "liver"
    assert float(table.GetCellText(0, 2)) == pytest.approx(rows[0].volume_ml, rel=1e-5)


def test_a_new_run_refills_the_previous_nodes_unless_asked(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    before = {
        c: scene.GetNumberOfNodesByClass(c)
        for c in ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode", "vtkMRMLTableNode")
    }
    regions.set_review_state(res.regions_table_node, 0, regions.ACCEPTED)
    smaller = np.where(label == 1, 1, 0).astype(np.uint8)
    again = create_result_nodes(scene, volume, _output(grid, smaller, flags, model_id="m2"))
    assert again.reused and again.segmentation_node is res.segmentation_node
    assert again.confidence_node is res.confidence_node and again.regions_table_node is res.regions_table_node
    assert {c: scene.GetNumberOfNodesByClass(c) for c in before} == before
    assert np.array_equal(segmentation.segment_mask(again.segmentation_node, "label_2", volume), 0 * label)
    assert again.regions_table_node.GetNumberOfRows() == 0  # refilled: the new run's (no) regions
    assert res.segmentation_node.GetAttribute(logic.MODEL_ID_ATTRIBUTE) == "m2"
    assert nodes.volume_nodes_share_grid(volume, again.confidence_node)
    fresh = create_result_nodes(scene, volume, _output(grid, label, flags), reuse=False)
    assert not fresh.reused and fresh.segmentation_node is not res.segmentation_node
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before["vtkMRMLSegmentationNode"] + 2
    assert find_result_nodes(scene, volume)[logic.ROLE_SEGMENTATION] is fresh.segmentation_node  # newest wins
    back = logic.result_from_nodes(scene, volume)  # as after loading a saved scene
    assert back.segmentation_node is fresh.segmentation_node and back.segment_ids == {1: "label_1", 2: "label_2"}


def test_navigation_moves_only_the_views_showing_the_result(result):
    scene, volume, grid, label, flags, centre_lps, res = result
    (red, red_c), (yellow, yellow_c), (green, green_c) = _slice_views(scene)
    other = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "other scan")
    red_c.SetBackgroundVolumeID(volume.GetID())
    yellow_c.SetBackgroundVolumeID(other.GetID())
    green_c.SetBackgroundVolumeID(other.GetID())
    green_c.SetForegroundVolumeID(res.confidence_node.GetID())
    scene.AddNode(mrml.vtkMRMLCrosshairNode())
    camera = scene.AddNewNodeByClass("vtkMRMLCameraNode")
    camera.SetPosition(0.0, 500.0, 0.0)
    camera.SetFocalPoint(0.0, 0.0, 0.0)
    yellow_before = _view_centre(yellow)
    nav = res.navigator()
    p = nav.next(scene)
    assert nav.index == 0 and np.allclose(p, lps_to_ras(centre_lps))
    assert np.allclose(_view_centre(red), p, atol=1e-6) and np.allclose(_view_centre(green), p, atol=1e-6)
    assert np.allclose(_view_centre(yellow), yellow_before)  # a view of another scan stays where it was
    assert np.allclose(scene.GetFirstNodeByClass("vtkMRMLCrosshairNode").GetCrosshairRAS(), p)
    assert np.allclose(camera.GetFocalPoint(), [0, 0, 0]) and np.allclose(camera.GetPosition(), [0, 500, 0])
    assert np.allclose(nav.next(scene), lps_to_ras([1.0, 2.0, 3.0])) and nav.index == 1
    nav.next()
    assert nav.index == 0  # wraps
    nav.previous()
    assert nav.index == 1


def test_overlay_goes_to_the_relevant_views_or_all_when_none_shows_it(result):
    scene, volume, grid, label, flags, _, res = result
    (red, red_c), (yellow, yellow_c) = _slice_views(scene, ("Red", "Yellow"))
    n = display.set_overlay(scene, volume, res.uncertainty_node, 0.4)  # nobody shows the input yet: every view
    assert n == 2 and all(c.GetForegroundVolumeID() == res.uncertainty_node.GetID() for c in (red_c, yellow_c))
    other = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "other scan")
    yellow_c.SetBackgroundVolumeID(other.GetID())
    yellow_c.SetForegroundVolumeID(None)
    assert display.set_overlay(scene, volume, res.confidence_node, 0.6) == 1
    assert red_c.GetForegroundVolumeID() == res.confidence_node.GetID()
    assert red_c.GetForegroundOpacity() == pytest.approx(0.6) and red_c.GetBackgroundVolumeID() == volume.GetID()
    assert yellow_c.GetBackgroundVolumeID() == other.GetID() and yellow_c.GetForegroundVolumeID() is None
    assert display.set_overlay(scene, volume, None) == 1 and red_c.GetForegroundVolumeID() is None


def test_navigation_follows_a_parent_transform(scene):
    grid = oblique_grid()
    image, label, flags, centre_lps = _two_class_case(grid)
    volume = nodes.add_volume_from_array(scene, image, grid, "CT")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(2, 3, 40.0)
    t.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(t.GetID())
    reply = [region_json(1, 1, "liver", 1, 0.1, 0.5, lps_to_ras([1.0, 2.0, 3.0]))]
    res = create_result_nodes(scene, volume, _output(grid, label, flags, reply))
    for n in (res.segmentation_node, res.uncertain_node, res.confidence_node, res.uncertainty_node):
        assert n.GetTransformNodeID() == t.GetID()
    assert np.allclose(res.navigator().point(0), [1.0, 2.0, 43.0])


def test_absent_labels_still_get_segments_and_unknown_values_are_refused(scene):
    grid = oblique_grid(size=(8, 7, 6))
    volume = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "blank")
    empty = np.zeros(grid.shape_zyx, np.uint8)
    seg, ids = segmentation.create_segmentation_node(scene, volume, empty, LABELS)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    bad = empty.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        segmentation.create_segmentation_node(scene, volume, bad, LABELS)


def test_terminology_of_parts_and_palette():
    hippocampus = terminology.terminology_for("Anterior", "hippocampus-softace SegResNet hippocampus model")
    assert hippocampus.type == terminology.Code("SCT", "5366008", "Hippocampus")
    assert hippocampus.context == terminology.DICOM_MASTER
    assert terminology.terminology_for("Liver") == terminology.STRUCTURES["liver"]
    assert terminology.terminology_for("Anterior", "a knee model") == terminology.DEFAULT
    assert terminology.DEFAULT.serialized() == (
        "Segmentation category and type - 3D Slicer General Anatomy list~"
        "SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM "
        "master list~^^~^^"
    )  # vtkSegment's own default, verbatim
    assert display.segment_color(1, "Liver") == pytest.approx(tuple(np.array((221, 130, 101)) / 255))
    assert display.segment_color(3, "whatever") == pytest.approx(tuple(np.array(display.LABEL_PALETTE[2]) / 255))
    assert display.segment_color(17, "x") == display.segment_color(1, "x")  # cycles after 16
    assert np.allclose(display.viridis([0.0, 1.0]), display.VIRIDIS_ANCHORS[[0, -1]])
