"""MRML volume nodes <-> numpy arrays + :class:`acecal.geometry.Grid`, with exact geometry.

A Slicer volume node keeps its voxels in a ``vtkImageData`` and its geometry in an IJK-to-RAS matrix. The project's
:class:`~acecal.geometry.Grid` describes the same geometry in LPS, as files and the server do. The one and only
RAS <-> LPS conversion is :mod:`acecal.geometry` (``Grid.from_ijk_to_ras`` and ``Grid.ijk_to_ras``); this module only
moves 4x4 matrices and arrays between VTK and numpy.

Arrays are always in numpy (k, j, i) = (z, y, x) order, as ``slicer.util.arrayFromVolume`` and SimpleITK use.

A volume under a parent transform keeps it: the grid is the node's *local* grid, and result nodes created from it are
placed under the same transform node, so they overlay the input exactly whatever the transform.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._mrml import mrml, numpy_support, vtk
from .client.errors import InvalidInputError
from .client.geometry import Grid

__all__ = [
    "matrix_to_numpy",
    "numpy_to_matrix",
    "grid_from_volume_node",
    "array_from_volume_node",
    "volume_node_to_array",
    "set_volume_geometry",
    "update_volume_from_array",
    "add_volume_from_array",
    "volume_nodes_share_grid",
]


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a (4, 4) float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: Any) -> vtk.vtkMatrix4x4:
    """A (4, 4) array as a new ``vtkMatrix4x4``."""
    a = np.asarray(array, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {a.shape}")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _image_data(node) -> vtk.vtkImageData:
    if node is None:
        raise InvalidInputError("No volume selected: choose the image to segment.")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InvalidInputError(f"Volume '{node.GetName()}' has no voxels loaded.")
    dims = image.GetDimensions()
    if any(d < 1 for d in dims):
        raise InvalidInputError(f"Volume '{node.GetName()}' is empty (dimensions {dims}).")
    return image


def grid_from_volume_node(node) -> Grid:
    """The node's grid in LPS (size, spacing, origin, direction), from its IJK-to-RAS matrix.

    An image extent that does not start at 0 is folded into the origin, so index (0, 0, 0) of the returned grid is
    the first voxel of the array :func:`array_from_volume_node` returns.
    """
    image = _image_data(node)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = matrix_to_numpy(ijk_to_ras)
    extent = image.GetExtent()
    start = np.array([extent[0], extent[2], extent[4], 1.0])
    if np.any(start[:3] != 0):
        m[:3, 3] = (m @ start)[:3]
    return Grid.from_ijk_to_ras(image.GetDimensions(), m)


def array_from_volume_node(node, copy: bool = True) -> np.ndarray:
    """The voxels of a scalar volume node as a (z, y, x) array (a copy unless ``copy=False``)."""
    image = _image_data(node)
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InvalidInputError(
            f"Volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel (colour or "
            "vector image); the model needs a single-channel scalar volume. Convert it with the "
            "'Vector to Scalar Volume' module first."
        )
    i, j, k = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).reshape(k, j, i)
    return array.copy() if copy else array


def volume_node_to_array(node) -> tuple[np.ndarray, Grid]:
    """``(array_zyx, grid)`` of a scalar volume node: what :meth:`acecal.client.ACEClient.infer` takes."""
    return array_from_volume_node(node), grid_from_volume_node(node)


def set_volume_geometry(node, grid: Grid) -> None:
    """Give ``node`` the geometry of ``grid`` (IJK-to-RAS from :attr:`Grid.ijk_to_ras`)."""
    node.SetIJKToRASMatrix(numpy_to_matrix(grid.ijk_to_ras))


def update_volume_from_array(node, array_zyx: np.ndarray) -> None:
    """Replace the voxels of ``node`` with a deep copy of a (z, y, x) array (any numeric dtype numpy and VTK share)."""
    a = np.ascontiguousarray(array_zyx)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) array, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    scalars = numpy_support.numpy_to_vtk(a.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)


def add_volume_from_array(
    scene,
    array_zyx: np.ndarray,
    grid: Grid,
    name: str,
    class_name: str = "vtkMRMLScalarVolumeNode",
    reference_node=None,
):
    """Add a volume node holding ``array_zyx`` on ``grid`` to ``scene`` and return it.

    With ``reference_node`` the new node is placed under the same parent transform, so both stay aligned in world
    space. Display nodes are created (``CreateDefaultDisplayNodes``).
    """
    if tuple(np.shape(array_zyx)) != grid.shape_zyx:
        raise ValueError(
            f"array shape {np.shape(array_zyx)} does not match the grid's (z, y, x) shape {grid.shape_zyx}"
        )
    node = scene.AddNewNodeByClass(class_name, name)
    if node is None:
        raise RuntimeError(f"could not create a {class_name} node")
    update_volume_from_array(node, array_zyx)
    set_volume_geometry(node, grid)
    if reference_node is not None and reference_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def volume_nodes_share_grid(a, b, atol: float = 1e-6) -> bool:
    """True when two volume nodes have the same dimensions, the same IJK-to-RAS matrix and the same parent transform."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return bool(np.allclose(matrix_to_numpy(ma), matrix_to_numpy(mb), atol=atol)) and (
        (a.GetTransformNodeID() or "") == (b.GetTransformNodeID() or "")
    )


def new_scene():
    """A fresh MRML scene (plain Python) with the segmentations logic registered, ready for the Lib.

    Inside Slicer use ``slicer.mrmlScene`` instead.
    """
    scene = mrml.vtkMRMLScene()
    ensure_segmentations_logic(scene)
    return scene


_SEGMENTATION_LOGICS: dict[int, Any] = {}


def ensure_segmentations_logic(scene):
    """The segmentations module logic for ``scene``, created (and bound to the scene) once.

    slicer-core gotcha: the logic must exist with ``SetMRMLScene(scene)`` *before* any segment is touched, or the
    binary labelmap converter rules are missing ("Unable to construct empty representation type").
    Inside the application the module's own logic is used.
    """
    modules = getattr(mrml, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):  # pragma: no cover - inside Slicer
        return modules.segmentations.logic()
    key = id(scene)
    logic = _SEGMENTATION_LOGICS.get(key)
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = mrml.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        _SEGMENTATION_LOGICS[key] = logic
    return logic
