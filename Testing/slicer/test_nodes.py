"""Volume node <-> numpy + Grid with exact geometry, on real MRML (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
from oblique import oblique_grid

from ACECalibrationLib import nodes
from ACECalibrationLib._mrml import mrml, vtk
from ACECalibrationLib.client.errors import InvalidInputError
from ACECalibrationLib.client.geometry import LPS_TO_RAS, Grid

SPACING = (0.7, 1.3, 2.5)  # strongly anisotropic


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return nodes.matrix_to_numpy(m)


def test_matrix_round_trip():
    a = np.arange(16, dtype=float).reshape(4, 4)
    assert np.array_equal(nodes.matrix_to_numpy(nodes.numpy_to_matrix(a)), a)
    with pytest.raises(ValueError):
        nodes.numpy_to_matrix(np.eye(3))


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_oblique_anisotropic_offset_round_trip(scene, dtype):
    grid = oblique_grid(spacing=SPACING)
    rng = np.random.default_rng(1)
    array = (rng.random(grid.shape_zyx) * 100).astype(dtype)
    node = nodes.add_volume_from_array(scene, array, grid, "oblique")

    back, back_grid = nodes.volume_node_to_array(node)
    assert back.dtype == array.dtype and back.shape == grid.shape_zyx
    assert np.array_equal(back, array)
    assert back_grid.same_as(grid, atol=1e-9)
    # Slicer's own view of the geometry: spacing, and IJK->RAS = flip(LPS) of the grid's IJK->LPS
    assert np.allclose(node.GetSpacing(), grid.spacing)
    assert np.allclose(_ijk_to_ras(node), LPS_TO_RAS @ grid.ijk_to_lps, atol=1e-12)
    assert np.allclose(node.GetOrigin(), [-grid.origin[0], -grid.origin[1], grid.origin[2]])


def test_physical_position_of_a_voxel_matches_lps_to_ras(scene):
    """A voxel Slicer places at RAS (r, a, s) is the voxel the grid places at LPS (-r, -a, s)."""
    grid = oblique_grid(spacing=SPACING)
    centre_lps = grid.index_to_lps([9.0, 13.0, 6.0])
    node = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.uint8), grid, "sphere")
    ras_of_centre = _ijk_to_ras(node) @ np.array([9.0, 13.0, 6.0, 1.0])
    assert np.allclose(ras_of_centre[:3], [-centre_lps[0], -centre_lps[1], centre_lps[2]])
    # and Slicer's RAS->IJK brings it back to the same index
    m = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(m)
    assert np.allclose(nodes.matrix_to_numpy(m) @ ras_of_centre, [9.0, 13.0, 6.0, 1.0])


def test_grid_from_a_node_built_the_slicer_way(scene):
    """A node set up with Slicer's own calls (spacing, origin, directions in RAS) gives the expected LPS grid."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ras")
    nodes.update_volume_from_array(node, np.zeros((4, 5, 6), np.int16))
    node.SetSpacing(0.5, 2.0, 3.0)
    node.SetOrigin(10.0, -20.0, 30.0)  # RAS
    dirs = vtk.vtkMatrix4x4()  # IJK to RAS directions: i -> A, j -> -R, k -> S
    for r, row in enumerate([[0, -1, 0], [1, 0, 0], [0, 0, 1]]):
        for c, v in enumerate(row):
            dirs.SetElement(r, c, v)
    node.SetIJKToRASDirectionMatrix(dirs)
    grid = nodes.grid_from_volume_node(node)
    assert grid.size == (6, 5, 4)
    assert np.allclose(grid.spacing, (0.5, 2.0, 3.0))
    assert np.allclose(grid.origin, (-10.0, 20.0, 30.0))  # LPS
    assert np.allclose(grid.direction_matrix, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # RAS directions with x, y flipped


def test_extent_not_starting_at_zero_is_folded_into_the_origin(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "extent")
    image = vtk.vtkImageData()
    image.SetExtent(2, 5, 1, 3, 0, 1)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 2.0, 2.0)
    grid = nodes.grid_from_volume_node(node)
    assert grid.size == (4, 3, 2)
    assert np.allclose(grid.index_to_ras([0, 0, 0]), [4.0, 2.0, 0.0])


def test_volume_under_a_parent_transform_keeps_it_for_results(scene):
    grid = oblique_grid(spacing=SPACING)
    ref = nodes.add_volume_from_array(scene, np.zeros(grid.shape_zyx, np.float32), grid, "ref")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 15.0)
    t.SetMatrixTransformToParent(m)
    ref.SetAndObserveTransformNodeID(t.GetID())
    out = nodes.add_volume_from_array(
        scene, np.ones(grid.shape_zyx, np.float32), nodes.grid_from_volume_node(ref), "out", reference_node=ref
    )
    assert out.GetTransformNodeID() == t.GetID()
    assert nodes.volume_nodes_share_grid(ref, out)


def test_shape_mismatch_and_bad_inputs(scene):
    grid = oblique_grid(spacing=SPACING)
    with pytest.raises(ValueError, match="does not match"):
        nodes.add_volume_from_array(scene, np.zeros((2, 2, 2)), grid, "bad")
    with pytest.raises(InvalidInputError, match="No volume selected"):
        nodes.volume_node_to_array(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidInputError, match="no voxels"):
        nodes.volume_node_to_array(empty)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(3, 3, 3)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    with pytest.raises(InvalidInputError, match="3 components"):
        nodes.volume_node_to_array(rgb)


def test_identity_grid_round_trip(scene):
    grid = Grid.from_zyx_shape((3, 4, 5))
    node = nodes.add_volume_from_array(scene, np.arange(60, dtype=np.int32).reshape(3, 4, 5), grid, "id")
    assert np.allclose(_ijk_to_ras(node), np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert isinstance(node, mrml.vtkMRMLScalarVolumeNode)
