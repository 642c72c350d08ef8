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

__all__ = ["TrainingPair", "segment_values", "labelmap_from_segmentation", "training_pair", "start_finetune"]


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


def start_finetune(client, pairs: Sequence[TrainingPair], base_model: str, loss: str, epochs: int,
                   dataset_name: str = "Slicer corrections", poll_s: float = 2.0) -> Task:
    """Upload ``pairs`` as a dataset, start a fine-tuning job and follow it until it ends, on a worker thread.

    The task's progress message carries the epoch and the latest validation metrics; its result is the final job
    (a dict with ``model_id`` when it succeeded). Cancelling the task cancels the job on the server.
    """
    if not pairs:
        raise InvalidInputError("Add at least one (image, corrected segmentation) pair first.")
    for needed in ("create_dataset", "add_case", "finetune", "job", "cancel_job"):
        if not hasattr(client, needed):
            raise InvalidInputError("This version of the acecal client cannot fine-tune yet (update the extension).")

    def work(ctx: TaskContext) -> Any:
        import time

        ds = client.create_dataset(dataset_name)
        ds_id = ds["id"] if isinstance(ds, Mapping) else getattr(ds, "id", ds)
        for i, p in enumerate(pairs):
            ctx.progress(0.1 * i / len(pairs), f"Uploading case {i + 1}/{len(pairs)}: {p.name}")
            client.add_case(ds_id, (p.image, p.grid), (p.label, p.grid))
        job = client.finetune(base_model=base_model, dataset=ds_id, loss=loss, epochs=int(epochs))
        job_id = job["job_id"] if isinstance(job, Mapping) else getattr(job, "job_id", job)
        try:
            while True:
                ctx.check()
                state = client.job(job_id)
                st = state if isinstance(state, Mapping) else vars(state)
                prog = st.get("progress") or {}
                ep, n = prog.get("epoch", 0) or 0, prog.get("epochs", epochs) or epochs
                metrics = (st.get("metrics") or [{}])[-1] if st.get("metrics") else {}
                shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
                ctx.progress(0.1 + 0.9 * ep / max(n, 1), f"{st.get('status')}: epoch {ep}/{n} {shown}".strip())
                if st.get("status") in ("succeeded", "failed", "cancelled"):
                    return st
                time.sleep(poll_s)
        except BaseException:
            if ctx.cancelled:
                try:
                    client.cancel_job(job_id)
                except Exception:  # noqa: BLE001 - best effort: the job may have ended meanwhile
                    pass
            raise

    return Task(work, name="ACECalibration fine-tune").start()
