"""The scriptable entry point: segment a volume node on an ACECalibration server and build the result nodes.

From Slicer's Python console::

    from ACECalibrationLib.logic import run_segmentation
    r = run_segmentation(slicer.mrmlScene, getNode("CTChest"), "http://127.0.0.1:8000", "spleen_hardl1ace")
    r.segmentation_node, r.confidence_node, r.uncertainty_node, r.regions_table_node

The work is split so the GUI never blocks: :func:`prepare_input` (GUI thread: copy the voxels and grid out of the
node), :func:`infer` (any thread: upload, inference, download through :class:`acecal.client.ACEClient`, the one
client the CLI uses too), :func:`create_result_nodes` (GUI thread: MRML). :func:`run_segmentation` runs all three in
a row; :func:`start_segmentation` runs the middle one on a :class:`~ACECalibrationLib.worker.Task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acecal.errors import ACECalError, InvalidInputError, UnauthorizedError
from acecal.geometry import Grid

from . import display, regions as regions_mod
from .nodes import add_volume_from_array, ensure_segmentations_logic, grid_from_volume_node, volume_node_to_array
from .segmentation import create_segmentation_node
from .worker import Cancelled, Task, TaskContext

__all__ = [
    "InferenceOutput",
    "SegmentationResult",
    "make_client",
    "prepare_input",
    "infer",
    "create_result_nodes",
    "run_segmentation",
    "start_segmentation",
    "user_message",
]


@dataclass
class InferenceOutput:
    """What the server returned for one image, as numpy arrays (z, y, x) on ``grid`` (LPS)."""

    labels: np.ndarray
    confidence: np.ndarray
    uncertainty: np.ndarray
    flags: np.ndarray
    grid: Grid
    label_names: dict[str, str]
    regions: list[Any] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    result_id: str = ""
    model_id: str = ""


@dataclass
class SegmentationResult:
    """The nodes :func:`run_segmentation` created, plus the server's summary and regions."""

    segmentation_node: Any
    confidence_node: Any
    uncertainty_node: Any
    regions_table_node: Any
    segment_ids: dict[int, str]
    uncertain_segment_id: str | None
    regions: list[regions_mod.Region]
    summary: dict
    label_names: dict[str, str]
    model_id: str = ""
    result_id: str = ""

    def navigator(self) -> regions_mod.RegionNavigator:
        """Next/previous through the uncertain regions (points in world RAS)."""
        return regions_mod.RegionNavigator(self.regions_table_node, self.segmentation_node)


# ------------------------------------------------------------------------------------------------------- client
def make_client(server_url: str, api_key: str | None = None, **kwargs: Any):
    """The project's :class:`acecal.client.ACEClient` for ``server_url`` (imported lazily: only ``requests`` needed)."""
    from acecal.client import ACEClient

    from .settings import normalize_server_url

    return ACEClient(normalize_server_url(server_url), api_key=api_key or None, **kwargs)


def _to_output(result: Any, model_id: str) -> InferenceOutput:
    """The client's :class:`acecal.client.InferenceResult` as an :class:`InferenceOutput`."""
    arrays = result.arrays
    missing = [n for n in ("labels", "confidence", "uncertainty", "flags") if arrays.get(n) is None]
    if missing:
        raise ACECalError(f"The server's result lacks the {', '.join(missing)} volume(s).", code="bad_response")
    return InferenceOutput(
        labels=np.asarray(arrays["labels"]),
        confidence=np.asarray(arrays["confidence"], dtype=np.float32),
        uncertainty=np.asarray(arrays["uncertainty"], dtype=np.float32),
        flags=np.asarray(arrays["flags"]),
        grid=result.grid,
        label_names={str(k): str(v) for k, v in dict(result.labels).items()},
        regions=[getattr(r, "raw", None) or r for r in result.regions],
        summary=dict(result.summary or {}),
        result_id=str(result.result_id),
        model_id=str(result.model_id or model_id),
    )


def _progress_callback(context: TaskContext):
    """Map the client's ``progress(stage, done, total)`` onto the task: upload 0-30 %, downloads 70-100 %.

    It also checks the cancel flag on every chunk, so Cancel stops an upload or download within one chunk.
    """
    downloads = ("labels", "confidence", "uncertainty", "flags")

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


def prepare_input(volume_node) -> tuple[np.ndarray, Grid]:
    """GUI thread: a copy of the volume's voxels (z, y, x) and its grid, safe to hand to a worker thread."""
    return volume_node_to_array(volume_node)


def infer(
    client,
    model_id: str,
    array_zyx: np.ndarray,
    grid: Grid,
    uncertainty_threshold: float | None = None,
    context: TaskContext | None = None,
) -> InferenceOutput:
    """Any thread: upload the volume, run inference on the server, download the four volumes."""
    if not model_id:
        raise InvalidInputError("No model selected: choose a model from the list (press 'Test connection' to fill it).")
    params: dict[str, Any] = {}
    if uncertainty_threshold is not None and uncertainty_threshold > 0:
        params["uncertainty_threshold"] = float(uncertainty_threshold)
    progress = None
    if context is not None:
        context.progress(0.0, "Uploading")
        progress = _progress_callback(context)
    result = client.infer((array_zyx, grid), model_id, params=params or None, progress=progress)
    if context is not None:
        context.check()
    out = _to_output(result, model_id)
    if out.grid is not None and not out.grid.same_as(grid):
        raise ACECalError(
            "The server returned volumes on a different grid than the input "
            f"(sent {grid.size} voxels, got {out.grid.size}); the overlay would not line up.", code="grid_mismatch")
    if out.labels.shape != grid.shape_zyx:
        raise ACECalError(f"The server returned a label map of shape {out.labels.shape}, expected {grid.shape_zyx}.",
                          code="grid_mismatch")
    return out


# ----------------------------------------------------------------------------------------------------- MRML side
def create_result_nodes(
    scene,
    volume_node,
    output: InferenceOutput,
    confidence_display_threshold: float | None = 0.9,
    overlay_opacity: float = 0.5,
    show_in_slice_views: bool = True,
) -> SegmentationResult:
    """GUI thread: segmentation (+ ``Uncertain``), confidence and uncertainty volumes, regions table.

    Every volume is placed on ``volume_node``'s exact grid: the same IJK-to-RAS matrix and parent transform.
    The confidence volume becomes the foreground of every slice view, over the input as background.
    """
    ensure_segmentations_logic(scene)
    grid = grid_from_volume_node(volume_node)
    if output.grid is not None and not output.grid.same_as(grid):
        raise ACECalError("The result does not lie on the input volume's grid.", code="grid_mismatch")
    base = volume_node.GetName() or "Volume"
    unique = scene.GenerateUniqueName

    confidence = add_volume_from_array(scene, output.confidence.astype(np.float32, copy=False), grid,
                                       unique(f"{base} confidence"), reference_node=volume_node)
    uncertainty = add_volume_from_array(scene, output.uncertainty.astype(np.float32, copy=False), grid,
                                        unique(f"{base} uncertainty"), reference_node=volume_node)
    # Same IJK-to-RAS matrix, bit for bit (not only within float tolerance): copy it from the input.
    for node in (confidence, uncertainty):
        node.CopyOrientation(volume_node)
    display.set_confidence_threshold(confidence, confidence_display_threshold, uncertainty)
    display.add_color_legend(confidence, "Confidence")

    labels = output.label_names or {"0": "background"}
    seg, ids, uncertain_id = create_segmentation_node(
        scene, volume_node, output.labels, labels, output.flags, unique(f"{base} segmentation"))

    regions = [regions_mod.region_from_reply(r, labels) for r in output.regions]
    table = regions_mod.create_regions_table(scene, regions, unique(f"{base} uncertain regions"))

    for node in (confidence, uncertainty, seg, table):
        node.SetAttribute("ACECalibration.ModelId", output.model_id)
        node.SetAttribute("ACECalibration.ResultId", output.result_id)
        node.SetAttribute("ACECalibration.InputVolumeID", volume_node.GetID() or "")

    if show_in_slice_views:
        display.apply_overlay_to_slice_views(scene, volume_node, confidence, overlay_opacity)
    return SegmentationResult(seg, confidence, uncertainty, table, ids, uncertain_id, regions, output.summary,
                              dict(labels), output.model_id, output.result_id)


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
) -> SegmentationResult:
    """Segment ``volume_node`` with model ``model_id`` on the server and add the results to ``scene`` (blocking).

    ``api_key`` None uses ``ACECAL_API_KEY`` from the environment when set (never a stored setting).
    ``uncertainty_threshold`` overrides the model's default confidence threshold for flagging uncertain regions.
    ``client`` reuses an existing :class:`acecal.client.ACEClient` (then ``server_url``/``api_key`` are ignored).
    Raises :class:`acecal.errors.ACECalError` subclasses (or the client's connection errors) with a message for the
    user; :func:`user_message` turns any exception into one.
    """
    array, grid = prepare_input(volume_node)
    client = client if client is not None else make_client(server_url, api_key)
    output = infer(client, model_id, array, grid, uncertainty_threshold)
    return create_result_nodes(scene, volume_node, output, confidence_display_threshold)


def start_segmentation(
    volume_node,
    server_url: str,
    model_id: str,
    api_key: str | None = None,
    uncertainty_threshold: float | None = None,
    *,
    client=None,
) -> Task:
    """Start the network part of :func:`run_segmentation` on a worker thread (call on the GUI thread).

    Poll the returned task; when it is done, call ``create_result_nodes(scene, volume_node, task.result())`` on the
    GUI thread. ``task.cancel()`` stops it.
    """
    array, grid = prepare_input(volume_node)
    client = client if client is not None else make_client(server_url, api_key)

    def work(ctx: TaskContext) -> InferenceOutput:
        return infer(client, model_id, array, grid, uncertainty_threshold, ctx)

    return Task(work, name=f"ACECalibration inference {model_id}").start()


# ------------------------------------------------------------------------------------------------------ messages
def user_message(exc: BaseException, server_url: str = "") -> str:
    """A message a clinician understands for any failure (the server's own detail included when there is one)."""
    where = f" at {server_url}" if server_url else ""
    if isinstance(exc, Cancelled):
        return "Cancelled."
    if isinstance(exc, UnauthorizedError):
        return (f"The server{where} refused the API key. Enter the key the server was started with "
                f"(acecal serve --api-key ... or ACECAL_API_KEY) in the API key field. Server said: {exc.detail}")
    if isinstance(exc, TimeoutError):  # the client's ServerTimeoutError included
        return (f"The ACECalibration server{where} did not answer in time. It may be busy or the volume very large; "
                f"try again, or check the server's log. ({exc})")
    if isinstance(exc, ConnectionError):  # the client's ServerUnreachableError included
        return (f"Cannot reach the ACECalibration server{where}. Check that it is running ('acecal serve' or "
                f"'make serve') and that the address and port are right. ({exc})")
    if isinstance(exc, ACECalError):
        return exc.detail
    try:
        import requests

        if isinstance(exc, requests.exceptions.ConnectionError):
            return user_message(ConnectionError(str(exc)), server_url)
        if isinstance(exc, requests.exceptions.Timeout):
            return user_message(TimeoutError(str(exc)), server_url)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):
        return f"Cannot reach the ACECalibration server{where}: {exc}"
    return f"Unexpected error: {exc}"
