"""The scriptable entry point: segment a volume node on an ACECalibration server and build the result nodes.

From Slicer's Python console::

    from ACECalibrationLib.logic import run_segmentation
    r = run_segmentation(slicer.mrmlScene, getNode("ACECalHippocampus"), "http://127.0.0.1:8000", "hippocampus-softace")
    r.segmentation_node, r.uncertain_node, r.confidence_node, r.uncertainty_node, r.regions_table_node

The work is split so the GUI never blocks: :func:`prepare_input` (GUI thread: copy the voxels and grid out of the
node), :func:`infer` (any thread: upload, inference, download through the extension's own copy of the project's
client, :class:`ACECalibrationLib.client.ACEClient`; the result is the client's
:class:`~ACECalibrationLib.client.InferenceResult`), :func:`create_result_nodes` (GUI thread: MRML).
:func:`run_segmentation` runs all three in a row; :mod:`.controller` runs the middle one on a worker thread.

Result nodes carry the attribute :data:`~.display.ROLE_ATTRIBUTE` (what they are) and
:data:`~.display.INPUT_VOLUME_ATTRIBUTE` (the input's node ID); a new run on the same input refills them
(:func:`find_result_nodes`) unless new nodes are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import display, regions as regions_mod, segmentation as segmentation_mod, stats
from .client.errors import ACECalError, InvalidInputError, ProtocolError, UnauthorizedError
from .client.geometry import Grid
from .client.protocol import BACKGROUND_LABEL, VOLUMES, Summary
from .client.results import InferenceResult
from .nodes import (
    add_volume_from_array,
    ensure_segmentations_logic,
    grid_from_volume_node,
    update_volume_from_array,
    volume_node_to_array,
)
from .worker import Cancelled, TaskContext

__all__ = [
    "SegmentationResult",
    "ROLES",
    "make_client",
    "prepare_input",
    "infer",
    "find_result_nodes",
    "create_result_nodes",
    "run_segmentation",
    "user_message",
]

#: Roles of the result nodes (the value of the node attribute ``display.ROLE_ATTRIBUTE``).
ROLE_SEGMENTATION, ROLE_UNCERTAIN, ROLE_REGIONS, ROLE_STATISTICS = "segmentation", "uncertain", "regions", "statistics"
ROLES = (
    ROLE_SEGMENTATION,
    ROLE_UNCERTAIN,
    display.ROLE_CONFIDENCE,
    display.ROLE_UNCERTAINTY,
    ROLE_REGIONS,
    ROLE_STATISTICS,
)
_ROLE_CLASS = {
    ROLE_SEGMENTATION: "vtkMRMLSegmentationNode",
    ROLE_UNCERTAIN: "vtkMRMLSegmentationNode",
    display.ROLE_CONFIDENCE: "vtkMRMLScalarVolumeNode",
    display.ROLE_UNCERTAINTY: "vtkMRMLScalarVolumeNode",
    ROLE_REGIONS: "vtkMRMLTableNode",
    ROLE_STATISTICS: "vtkMRMLTableNode",
}
_ROLE_NAME = {
    ROLE_SEGMENTATION: "segmentation",
    ROLE_UNCERTAIN: "uncertain",
    display.ROLE_CONFIDENCE: "confidence",
    display.ROLE_UNCERTAINTY: "uncertainty",
    ROLE_REGIONS: "uncertain regions",
    ROLE_STATISTICS: "segment statistics",
}
MODEL_ID_ATTRIBUTE = "ACECalibration.ModelId"
RESULT_ID_ATTRIBUTE = "ACECalibration.ResultId"


@dataclass
class SegmentationResult:
    """The nodes :func:`create_result_nodes` filled, plus the server's summary (None once rebuilt from the scene)
    and the regions table's rows (:class:`~.regions.RegionRow`)."""

    segmentation_node: Any
    uncertain_node: Any
    confidence_node: Any
    uncertainty_node: Any
    regions_table_node: Any
    statistics_table_node: Any
    segment_ids: dict
    regions: list
    summary: Optional[Summary]
    label_names: dict
    model_id: str = ""
    result_id: str = ""
    reused: bool = False

    @property
    def uncertain_segment_id(self) -> str:
        return segmentation_mod.UNCERTAIN_SEGMENT_ID

    def shown_node_ids(self) -> list:
        """IDs of the input and result volumes: the slice views showing one of them are the ones that follow."""
        ids = [self.confidence_node.GetID(), self.uncertainty_node.GetID()]
        return ids + [self.confidence_node.GetAttribute(display.INPUT_VOLUME_ATTRIBUTE) or ""]

    def navigator(self) -> regions_mod.RegionNavigator:
        """Next/previous through the uncertain regions (points in world RAS)."""
        return regions_mod.RegionNavigator(self.regions_table_node, self.segmentation_node, self.shown_node_ids())


# ------------------------------------------------------------------------------------------------------- client
#: Client settings per kind of call. Interactive calls (health, models) must answer fast or fail: a short connect
#: timeout, a short read timeout, no retries. Transfers (inference, uploads, evaluation) wait longer for the server's
#: reply (inference on a CPU server) but still give up connecting after a few seconds, and retry nothing: the user
#: decides whether to try again.
CONNECT_TIMEOUT_S = 3.0
INTERACTIVE = {"timeout": (CONNECT_TIMEOUT_S, 10.0), "retries": 0}
TRANSFER = {"timeout": (CONNECT_TIMEOUT_S, 600.0), "retries": 0}


def make_client(server_url: str, api_key: str | None = None, **kwargs: Any):
    """The extension's :class:`ACECalibrationLib.client.ACEClient` for ``server_url`` (the :data:`TRANSFER` settings
    unless ``kwargs`` say otherwise; ``session=`` an :class:`~.transport.AbortableSession` for a cancellable task).

    ``api_key`` None or empty sends no key (the environment is not consulted: the key comes from the user)."""
    from .client import ACEClient
    from .settings import normalize_server_url

    options = dict(TRANSFER)
    options.update(kwargs)
    client = ACEClient(normalize_server_url(server_url), api_key=api_key or "", **options)
    client.api_key = api_key or None
    return client


def _progress_callback(context: TaskContext):
    """Map the client's ``progress(stage, done, total)`` onto the task: upload 0-30 %, downloads 70-100 %.

    It also checks the cancel flag on every chunk, so Cancel stops an upload or download within one chunk.
    """
    downloads = VOLUMES

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage == "upload":
            if total and done >= total:
                context.progress(None, "Running the model on the server")
            else:
                context.bytes_callback("Uploading", 0.0, 0.3)(done, total)
        elif stage.startswith("download:"):
            name = stage.split(":", 1)[1]
            i = downloads.index(name) if name in downloads else 0
            lo = 0.7 + 0.3 * i / len(downloads)
            context.bytes_callback(f"Downloading {name}", lo, lo + 0.3 / len(downloads))(done, total)
        else:
            context.progress(None, stage)

    return progress


def prepare_input(volume_node) -> tuple:
    """GUI thread: a copy of the volume's voxels (z, y, x) and its grid, safe to hand to a worker thread."""
    return volume_node_to_array(volume_node)


def infer(
    client,
    model_id: str,
    array_zyx: np.ndarray,
    grid: Grid,
    uncertainty_threshold: float | None = None,
    context: TaskContext | None = None,
) -> InferenceResult:
    """Any thread: upload the volume, run inference on the server, download the four volumes (checked to lie on the
    input's grid)."""
    if not model_id:
        raise InvalidInputError("No model selected: connect to a server and choose a model.")
    params: dict = {}
    if uncertainty_threshold is not None and uncertainty_threshold > 0:
        params["uncertainty_threshold"] = float(uncertainty_threshold)
    progress = None
    if context is not None:
        context.progress(0.0, "Uploading")
        progress = _progress_callback(context)
    result = client.infer((array_zyx, grid), model_id, params=params or None, progress=progress)
    if context is not None:
        context.check()
    missing = result.missing_volumes()
    if missing:
        raise ProtocolError(f"The server's result lacks the {', '.join(missing)} volume(s).")
    if not result.grid.same_as(grid):
        raise ACECalError(
            "The server returned volumes on a different grid than the input "
            f"(sent {grid.size} voxels, got {result.grid.size}); the overlay would not line up.",
            code="grid_mismatch",
        )
    if result.label_map.shape != grid.shape_zyx:
        raise ACECalError(
            f"The server returned a label map of shape {result.label_map.shape}, expected {grid.shape_zyx}.",
            code="grid_mismatch",
        )
    return result


# ----------------------------------------------------------------------------------------------------- MRML side
def find_result_nodes(scene, volume_node) -> dict:
    """role -> the most recent result node of that role made from ``volume_node`` (roles without a node left out)."""
    found: dict = {}
    vid = volume_node.GetID() if volume_node is not None else None
    if not vid:
        return found
    for role, cls in _ROLE_CLASS.items():
        for i in range(scene.GetNumberOfNodesByClass(cls)):
            node = scene.GetNthNodeByClass(i, cls)
            if (
                node.GetAttribute(display.ROLE_ATTRIBUTE) == role
                and node.GetAttribute(display.INPUT_VOLUME_ATTRIBUTE) == vid
            ):
                found[role] = node  # later nodes win: the newest run
    return found


def result_from_nodes(scene, volume_node):
    """The :class:`SegmentationResult` the scene holds for ``volume_node`` (after a scene was reloaded, say), or None
    when some of its nodes are missing. Regions and summary come from the tables; the server's raw reply is gone."""
    nodes = find_result_nodes(scene, volume_node)
    if set(nodes) != set(ROLES):
        return None
    seg = nodes[ROLE_SEGMENTATION]
    ids = {}
    s = seg.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        value = segmentation_mod.segment_label_value(s.GetNthSegment(i))
        if value is not None:
            ids[value] = s.GetNthSegmentID(i)
    names = {str(v): s.GetSegment(sid).GetName() for v, sid in ids.items()}
    return SegmentationResult(
        seg,
        nodes[ROLE_UNCERTAIN],
        nodes[display.ROLE_CONFIDENCE],
        nodes[display.ROLE_UNCERTAINTY],
        nodes[ROLE_REGIONS],
        nodes[ROLE_STATISTICS],
        ids,
        regions_mod.regions_from_table(nodes[ROLE_REGIONS]),
        None,
        names,
        seg.GetAttribute(MODEL_ID_ATTRIBUTE) or "",
        seg.GetAttribute(RESULT_ID_ATTRIBUTE) or "",
        reused=True,
    )


def _volume(scene, volume_node, array: np.ndarray, grid: Grid, name: str, node=None):
    """A float volume on ``volume_node``'s exact grid: ``node`` refilled, or a new node."""
    if node is None:
        node = add_volume_from_array(scene, array, grid, name, reference_node=volume_node)
    else:
        update_volume_from_array(node, array)
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.CopyOrientation(volume_node)  # the same IJK-to-RAS matrix bit for bit, not only within float tolerance
    return node


def create_result_nodes(
    scene,
    volume_node,
    result: InferenceResult,
    confidence_display_threshold: float | None = 0.9,
    overlay_opacity: float = 0.5,
    show_in_slice_views: bool = True,
    *,
    reuse: bool = True,
    model_text: str = "",
) -> SegmentationResult:
    """GUI thread: the anatomy segmentation, the ``Uncertain`` segmentation, confidence and uncertainty volumes, the
    regions table (the review worklist) and the per-segment statistics table, from an inference ``result`` with its
    four arrays (what :func:`infer` returns).

    Every volume is placed on ``volume_node``'s exact grid: the same IJK-to-RAS matrix and parent transform. With
    ``reuse`` the nodes of the previous result of the same input are refilled (review states start afresh) instead
    of adding six new nodes per run. ``model_text`` (the model's id and description) helps name the terminology of
    segments that are parts of a structure. With ``show_in_slice_views`` the confidence volume becomes the
    foreground of the slice views showing the input (all views when none does).
    """
    ensure_segmentations_logic(scene)
    grid = grid_from_volume_node(volume_node)
    if not result.grid.same_as(grid):
        raise ACECalError("The result does not lie on the input volume's grid.", code="grid_mismatch")
    missing = result.missing_volumes()
    if missing:
        raise ProtocolError(f"The result lacks the {', '.join(missing)} volume(s).")
    old = find_result_nodes(scene, volume_node) if reuse else {}
    base = volume_node.GetName() or "Volume"

    def name(role: str) -> str:
        return scene.GenerateUniqueName(f"{base} {_ROLE_NAME[role]}")

    confidence = _volume(
        scene,
        volume_node,
        result.confidence.astype(np.float32, copy=False),
        grid,
        name(display.ROLE_CONFIDENCE),
        old.get(display.ROLE_CONFIDENCE),
    )
    uncertainty = _volume(
        scene,
        volume_node,
        result.uncertainty.astype(np.float32, copy=False),
        grid,
        name(display.ROLE_UNCERTAINTY),
        old.get(display.ROLE_UNCERTAINTY),
    )
    confidence.SetAttribute(display.ROLE_ATTRIBUTE, display.ROLE_CONFIDENCE)
    uncertainty.SetAttribute(display.ROLE_ATTRIBUTE, display.ROLE_UNCERTAINTY)
    display.set_confidence_threshold(confidence, confidence_display_threshold, uncertainty)
    display.add_color_legend(confidence, "Confidence")

    labels = dict(result.labels) or {BACKGROUND_LABEL: "background"}
    seg, ids = segmentation_mod.create_segmentation_node(
        scene,
        volume_node,
        result.label_map,
        labels,
        name(ROLE_SEGMENTATION),
        model_text=model_text,
        node=old.get(ROLE_SEGMENTATION),
    )
    uncertain = segmentation_mod.create_uncertain_segmentation(
        scene, volume_node, result.flags, name(ROLE_UNCERTAIN), node=old.get(ROLE_UNCERTAIN)
    )

    region_rows = [regions_mod.region_from_reply(r, labels) for r in result.regions]
    table = old.get(ROLE_REGIONS) or scene.AddNewNodeByClass("vtkMRMLTableNode", name(ROLE_REGIONS))
    regions_mod.update_regions_table(table, region_rows)
    statistics = old.get(ROLE_STATISTICS) or scene.AddNewNodeByClass("vtkMRMLTableNode", name(ROLE_STATISTICS))
    stats.update_statistics_table(statistics, stats.segment_statistics(seg, volume_node, confidence, uncertain))

    for role, node in (
        (ROLE_SEGMENTATION, seg),
        (ROLE_UNCERTAIN, uncertain),
        (display.ROLE_CONFIDENCE, confidence),
        (display.ROLE_UNCERTAINTY, uncertainty),
        (ROLE_REGIONS, table),
        (ROLE_STATISTICS, statistics),
    ):
        node.SetAttribute(display.ROLE_ATTRIBUTE, role)
        node.SetAttribute(display.INPUT_VOLUME_ATTRIBUTE, volume_node.GetID() or "")
        node.SetAttribute(MODEL_ID_ATTRIBUTE, result.model_id)
        node.SetAttribute(RESULT_ID_ATTRIBUTE, result.result_id or "")

    if show_in_slice_views:
        display.set_overlay(scene, volume_node, confidence, overlay_opacity)
    return SegmentationResult(
        seg,
        uncertain,
        confidence,
        uncertainty,
        table,
        statistics,
        ids,
        region_rows,
        result.summary,
        dict(labels),
        result.model_id,
        result.result_id or "",
        reused=bool(old),
    )


def run_segmentation(
    scene,
    volume_node,
    server_url: str,
    model_id: str,
    api_key: str | None = None,
    uncertainty_threshold: float | None = None,
    *,
    client=None,
    confidence_display_threshold: float | None = 0.9,
    reuse: bool = True,
) -> SegmentationResult:
    """Segment ``volume_node`` with model ``model_id`` on the server and add the results to ``scene`` (blocking: for
    scripts; the module runs the network part on a worker thread, see :mod:`.controller`).

    ``uncertainty_threshold`` overrides the model's default confidence threshold for flagging uncertain regions.
    ``client`` reuses an existing :class:`ACECalibrationLib.client.ACEClient` (then ``server_url``/``api_key`` are
    ignored). Raises :class:`ACECalibrationLib.client.ACECalError` subclasses with a message for the user;
    :func:`user_message` turns any exception into one.
    """
    array, grid = prepare_input(volume_node)
    client = client if client is not None else make_client(server_url, api_key)
    result = infer(client, model_id, array, grid, uncertainty_threshold)
    return create_result_nodes(
        scene, volume_node, result, confidence_display_threshold, reuse=reuse, model_text=model_id
    )


# ------------------------------------------------------------------------------------------------------ messages
def user_message(exc: BaseException, server_url: str = "") -> str:
    """A message a clinician understands for any failure (the server's own detail included when there is one)."""
    where = f" at {server_url}" if server_url else ""
    if isinstance(exc, Cancelled):
        return "Cancelled."
    if isinstance(exc, UnauthorizedError):
        return (
            f"The server{where} refused the API key. Enter the key the server was started with "
            f"(acecal serve --api-key ... or ACECAL_API_KEY) in the API key field. Server said: {exc.detail}"
        )
    if isinstance(exc, TimeoutError):  # the client's ServerTimeoutError included
        return (
            f"The ACECalibration server{where} did not answer in time. It may be busy, unreachable from this "
            f"computer, or the volume very large; try again, or check the server's log. ({exc})"
        )
    if isinstance(exc, ConnectionError):  # the client's ServerUnreachableError included
        return (
            f"Cannot reach the ACECalibration server{where}. Check that it is running ('acecal serve' or "
            f"'make serve') and that the address and port are right. ({exc})"
        )
    if isinstance(exc, ACECalError):
        return exc.detail
    try:
        import requests

        if isinstance(exc, requests.exceptions.Timeout):
            return user_message(TimeoutError(str(exc)), server_url)
        if isinstance(exc, requests.exceptions.ConnectionError):
            return user_message(ConnectionError(str(exc)), server_url)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):
        return f"Cannot reach the ACECalibration server{where}: {exc}"
    return f"Unexpected error: {exc}"
