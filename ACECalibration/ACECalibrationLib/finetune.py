"""Training pairs from the scene: (volume, corrected segmentation) -> (image, label map, grid) for fine-tuning.

A clinician corrects the segmentation the module produced in the Segment Editor, then sends (image, label map)
pairs to the server to fine-tune the model. Segment -> label value: the value stored on segments this module created
(:data:`~ACECalibrationLib.segmentation.LABEL_VALUE_ATTRIBUTE`), otherwise the model label with the same name
(case-insensitive). The ``Uncertain`` segment is review information, not anatomy: it is never exported. Every label
map is on the image's exact grid.

The network part (dataset upload, job start, progress) goes through :class:`acecal.client.ACEClient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from acecal.errors import InvalidInputError
from acecal.geometry import Grid

from . import display
from .nodes import volume_node_to_array
from .segmentation import segment_label_value, segment_mask
from .worker import Task, TaskContext

__all__ = ["TrainingPair", "segment_values", "labelmap_from_segmentation", "training_pair", "upload_pairs",
           "describe_job", "start_finetune", "evaluate_case"]


@dataclass
class TrainingPair:
    name: str
    image: np.ndarray  # (z, y, x)
    label: np.ndarray  # (z, y, x) uint8
    grid: Grid


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
        raise InvalidInputError(
            f"Segment(s) {', '.join(repr(u) for u in unknown)} of '{segmentation_node.GetName()}' match no label of the "
            f"model ({', '.join(n for v, n in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(v) != 0)}). "
            "Rename them to a model label or delete them.")
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


def upload_pairs(client, pairs: Sequence[TrainingPair], model_id: str, dataset_name: str,
                 ctx: TaskContext | None = None, share: float = 0.1) -> str:
    """Create a dataset checked against ``model_id``'s labels and upload ``pairs`` into it; returns its id.

    The server validates each case on arrival (a bad one raises ``InvalidInputError`` naming it); on any failure
    the half-filled dataset is deleted again.
    """
    if not pairs:
        raise InvalidInputError("Add at least one (image, corrected segmentation) pair first.")
    ds_id = client.create_dataset(dataset_name, model=model_id)["id"]
    try:
        for i, p in enumerate(pairs):
            lo, hi = share * i / len(pairs), share * (i + 1) / len(pairs)
            if ctx is not None:
                ctx.progress(lo, f"Uploading case {i + 1}/{len(pairs)}: {p.name}")
            try:
                client.add_case(ds_id, (p.image, p.grid), (p.label, p.grid), name=p.name,
                                progress=_upload_progress(ctx, lo, hi, f"Uploading case {i + 1}/{len(pairs)}"))
            except InvalidInputError as e:
                raise InvalidInputError(f"{p.name}: {e.detail}", code=e.code) from None
    except BaseException:
        try:
            client.delete_dataset(ds_id)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        raise
    return ds_id


def describe_job(job: Mapping[str, Any]) -> str:
    """One line for the log: status, epoch and the latest validation metrics."""
    prog = job.get("progress") or {}
    text = f"{job.get('status')}: epoch {prog.get('epoch', 0)}/{prog.get('epochs', job.get('epochs', '?'))}"
    validated = [m for m in (job.get("metrics") or []) if m.get("dice") is not None]
    last = (job.get("metrics") or [{}])[-1]
    if last.get("train_loss") is not None:
        text += f", loss {last['train_loss']:.4f}"
    if validated:
        v = validated[-1]
        text += ", validation " + ", ".join(f"{k} {v[k]:.3f}" for k in ("dice", "ace", "ece", "mce")
                                              if v.get(k) is not None)
    if job.get("error"):
        text += f" ({job['error']})"
    return text


def start_finetune(client, pairs: Sequence[TrainingPair], base_model: str, loss: str, epochs: int,
                   dataset_name: str = "Slicer corrections", poll_s: float = 2.0, **options: Any) -> Task:
    """Upload ``pairs`` as a dataset, start a fine-tuning job and follow it until it ends, on a worker thread.

    The task's progress is the job's (uploads take the first 10 %); its message is :func:`describe_job`'s line.
    Its result is the final job (a dict; ``model_id`` is the new model when ``status == "succeeded"``).
    Cancelling the task cancels the job on the server. ``options`` go to ``client.finetune`` (``val_fraction``, ...).
    """
    if not pairs:
        raise InvalidInputError("Add at least one (image, corrected segmentation) pair first.")

    def work(ctx: TaskContext) -> Any:
        ds_id = upload_pairs(client, pairs, base_model, dataset_name, ctx)
        ctx.progress(0.1, "Starting the fine-tuning job")
        job_id = client.finetune(base_model, ds_id, loss=loss, epochs=int(epochs), **options)["job_id"]
        try:
            job = client.job(job_id)
            while True:
                prog = job.get("progress") or {}
                ctx.progress(0.1 + 0.9 * float(prog.get("fraction") or 0.0), describe_job(job))
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
                job = client.job(job_id, wait=poll_s, after=job.get("rev"))  # long-poll: answers on any change
        except BaseException:
            if ctx.cancelled:
                try:
                    client.cancel_job(job_id)
                except Exception:  # noqa: BLE001 - best effort: the job may have ended meanwhile
                    pass
            raise

    return Task(work, name="ACECalibration fine-tune").start()


def evaluate_case(client, pair: TrainingPair, model_id: str, temperature: bool = False,
                  ctx: TaskContext | None = None) -> tuple[dict, bytes]:
    """The case's calibration against its reference segmentation: (the server's evaluation reply, reliability PNG).

    Uploads the pair as a one-case dataset, runs ``POST /evaluate/{model_id}``, downloads the case's reliability
    diagram and deletes the dataset again.
    """
    import io

    ds_id = upload_pairs(client, [pair], model_id, f"Slicer evaluation of {pair.name}", ctx, share=0.3)
    try:
        if ctx is not None:
            ctx.progress(None, "Evaluating on the server")
        reply = client.evaluate(model_id, ds_id, temperature=temperature)
        figures = (reply.get("figures") or {}).get("cases") or {}
        png = b""
        if figures:
            buf = io.BytesIO()
            client.download(next(iter(figures.values())), buf, stage="download:figure")
            png = buf.getvalue()
        return reply, png
    finally:
        try:
            client.delete_dataset(ds_id)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
