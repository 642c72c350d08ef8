"""Training pairs from the scene: (volume, corrected segmentation) -> (image, label map, grid) for fine-tuning.

A clinician corrects the segmentation the module produced in the Segment Editor, then sends (image, label map)
pairs to the server to fine-tune the model. Segment -> label value: the value stored on segments this module created
(:data:`~ACECalibrationLib.segmentation.LABEL_VALUE_ATTRIBUTE`), otherwise the model label with the same name
(case-insensitive). The ``Uncertain`` segment is review information, not anatomy: it is never exported. Every label
map is on the image's exact grid.

Node names often carry patient names or record numbers, so they never leave the computer: uploaded cases are named
``case 1``, ``case 2``, ... and datasets ``Slicer corrections`` / ``Slicer evaluation``; messages about a refused case
name the node again, locally. The network part (dataset upload, job start, progress) goes through the extension's
:class:`ACECalibrationLib.client.ACEClient`; replies are read with its wire protocol
(:mod:`ACECalibrationLib.client.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from . import display
from .client.errors import InvalidInputError
from .client.geometry import Grid
from .client.protocol import DATASET_ID, EVAL_FIGURES, EVAL_FIGURES_CASES, JOB_ACCEPTED_ID, METRIC_NAMES, JobInfo
from .nodes import volume_node_to_array
from .segmentation import segment_label_value, segment_mask
from .worker import Task, TaskContext

__all__ = [
    "TrainingPair",
    "upload_name",
    "segment_values",
    "labelmap_from_segmentation",
    "training_pair",
    "upload_pairs",
    "describe_job",
    "start_finetune",
    "evaluate_case",
]


@dataclass
class TrainingPair:
    name: str  # the node's name: shown locally, never uploaded
    image: np.ndarray  # (z, y, x)
    label: np.ndarray  # (z, y, x) uint8
    grid: Grid


def upload_name(index: int) -> str:
    """The name case ``index`` (0-based) is uploaded under: neutral, never the node's name."""
    return f"case {index + 1}"


def segment_values(segmentation_node, labels: Mapping[str, str]) -> dict[str, int]:
    """segment id -> model label value for every segment except ``Uncertain``; unknown names raise."""
    by_name = {str(name).strip().lower(): int(v) for v, name in labels.items()}
    seg = segmentation_node.GetSegmentation()
    out: dict[str, int] = {}
    unknown = []
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        segment = seg.GetSegment(sid)
        name = segment.GetName()
        if name == display.UNCERTAIN_SEGMENT_NAME:
            continue
        value = segment_label_value(segment)
        if value is None:
            value = by_name.get(name.strip().lower())
        if value is None:
            unknown.append(name)
        elif value != 0:
            out[sid] = value
    if unknown:
        known = ", ".join(n for v, n in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(v) != 0)
        raise InvalidInputError(
            f"Segment(s) {', '.join(repr(u) for u in unknown)} of '{segmentation_node.GetName()}' match no label "
            f"of the model ({known}). "
            "Rename them to a model label or delete them."
        )
    return out


def labelmap_from_segmentation(segmentation_node, reference_volume, labels: Mapping[str, str]) -> np.ndarray:
    """A (z, y, x) uint8 label map of the segmentation on ``reference_volume``'s grid (later segments win overlaps)."""
    values = segment_values(segmentation_node, labels)
    dims = reference_volume.GetImageData().GetDimensions()
    label = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    for sid, value in values.items():
        label[segment_mask(segmentation_node, sid, reference_volume) > 0] = value
    return label


def training_pair(volume_node, segmentation_node, labels: Mapping[str, str]) -> TrainingPair:
    """GUI thread: copy one (image, label map) pair out of the scene."""
    image, grid = volume_node_to_array(volume_node)
    label = labelmap_from_segmentation(segmentation_node, volume_node, labels)
    if not label.any():
        raise InvalidInputError(f"Segmentation '{segmentation_node.GetName()}' is empty on '{volume_node.GetName()}'.")
    return TrainingPair(volume_node.GetName(), image, label, grid)


def _upload_progress(ctx: TaskContext | None, lo: float, hi: float, message: str):
    if ctx is None:
        return None

    def progress(stage: str, done: int, total: int | None) -> None:  # the client's callback; checks cancel per chunk
        ctx.bytes_callback(message, lo, hi)(done, total)

    return progress


def upload_pairs(
    client,
    pairs: Sequence[TrainingPair],
    model_id: str,
    dataset_name: str,
    ctx: TaskContext | None = None,
    share: float = 0.1,
    cleanup_client=None,
) -> str:
    """Create a dataset checked against ``model_id``'s labels and upload ``pairs`` into it; returns its id.

    The server validates each case on arrival (a bad one raises ``InvalidInputError`` naming it); on any failure
    the half-filled dataset is deleted again, through ``cleanup_client`` when given (the task's own client may have
    been aborted by Cancel).
    """
    if not pairs:
        raise InvalidInputError("Add at least one (image, corrected segmentation) pair first.")
    ds_id = client.create_dataset(dataset_name, model=model_id)[DATASET_ID]
    try:
        for i, p in enumerate(pairs):
            lo, hi = share * i / len(pairs), share * (i + 1) / len(pairs)
            if ctx is not None:
                ctx.progress(lo, f"Uploading case {i + 1}/{len(pairs)}: {p.name}")
            try:
                client.add_case(
                    ds_id,
                    (p.image, p.grid),
                    (p.label, p.grid),
                    name=upload_name(i),
                    progress=_upload_progress(ctx, lo, hi, f"Uploading case {i + 1}/{len(pairs)}"),
                )
            except InvalidInputError as e:
                raise InvalidInputError(f"{p.name}: {e.detail}", code=e.code) from None
    except BaseException:
        try:
            (cleanup_client or client).delete_dataset(ds_id)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        raise
    return ds_id


def describe_job(job: JobInfo | Mapping[str, Any]) -> str:
    """One line for the log: status, epoch and the latest validation metrics (``job``: a job view, typed or JSON)."""
    job = job if isinstance(job, JobInfo) else JobInfo.from_json(job)
    text = f"{job.status}: epoch {job.progress.epoch}/{job.progress.epochs}"
    if job.metrics and job.metrics[-1].train_loss is not None:
        text += f", loss {job.metrics[-1].train_loss:.4f}"
    v = job.last_validation()
    if v is not None:
        values = v.metric_values()
        text += ", validation " + ", ".join(f"{k} {values[k]:.3f}" for k in METRIC_NAMES if values[k] is not None)
    if job.error:
        text += f" ({job.error})"
    return text


def start_finetune(
    client,
    pairs: Sequence[TrainingPair],
    base_model: str,
    loss: str,
    epochs: int,
    dataset_name: str = "Slicer corrections",
    poll_s: float = 2.0,
    **options: Any,
) -> Task:
    """Upload ``pairs`` as a dataset, start a fine-tuning job and follow it until it ends, on a worker thread.

    The task's progress is the job's (uploads take the first 10 %); its message is :func:`describe_job`'s line.
    Its result is the final job (a :class:`~ACECalibrationLib.client.protocol.JobInfo`; ``model_id`` is the new model
    when ``status == "succeeded"``).
    Cancelling the task cancels the job on the server. ``options`` go to ``client.finetune`` (``val_fraction``, ...).
    """
    if not pairs:
        raise InvalidInputError("Add at least one (image, corrected segmentation) pair first.")

    def work(ctx: TaskContext) -> Any:
        ds_id = upload_pairs(client, pairs, base_model, dataset_name, ctx)
        ctx.progress(0.1, "Starting the fine-tuning job")
        job_id = client.finetune(base_model, ds_id, loss=loss, epochs=int(epochs), **options)[JOB_ACCEPTED_ID]
        try:
            job = JobInfo.from_json(client.job(job_id))
            while True:
                ctx.progress(0.1 + 0.9 * job.progress.fraction, describe_job(job))
                if job.final:
                    return job
                job = JobInfo.from_json(client.job(job_id, wait=poll_s, after=job.rev))  # answers on any change
        except BaseException:
            if ctx.cancelled:
                try:
                    client.cancel_job(job_id)
                except Exception:  # noqa: BLE001 - best effort: the job may have ended meanwhile
                    pass
            raise

    return Task(work, name="ACECalibration fine-tune").start()


def evaluate_case(
    client,
    pair: TrainingPair,
    model_id: str,
    temperature: bool = False,
    ctx: TaskContext | None = None,
    cleanup_client=None,
) -> tuple:
    """The case's calibration against its reference segmentation: (the server's evaluation reply, reliability PNG).

    Uploads the pair as a one-case dataset, runs ``POST /evaluate/{model_id}``, downloads the case's reliability
    diagram and deletes the dataset again (through ``cleanup_client`` when given, see :func:`upload_pairs`).
    """
    import io

    ds_id = upload_pairs(client, [pair], model_id, "Slicer evaluation", ctx, share=0.3, cleanup_client=cleanup_client)
    try:
        if ctx is not None:
            ctx.progress(None, "Evaluating on the server")
        reply = client.evaluate(model_id, ds_id, temperature=temperature)
        figures = (reply.get(EVAL_FIGURES) or {}).get(EVAL_FIGURES_CASES) or {}
        png = b""
        if figures:
            buf = io.BytesIO()
            client.download(next(iter(figures.values())), buf, stage="download:figure")
            png = buf.getvalue()
        return reply, png
    finally:
        try:
            (cleanup_client or client).delete_dataset(ds_id)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
