"""What a job process and the server exchange: the files of one job's folder and the process's exit statuses.

``<data_dir>/jobs/<job_id>/`` holds

- ``spec.json``     what the server asks the job process to run (its TrainConfig, threads, the server's pid);
- ``dataset.json``  the job's cases (MSD layout, absolute paths into the dataset store);
- ``job.log``       the process's output plus the server's own lines about the job (``[server] ...``);
- ``train.jsonl``   the engine's JSON-lines log of :class:`acecal.protocol.JobEvent` records (the server follows it
  into the job's row);
- ``progress.json`` the current step within the epoch (overwritten at most twice a second);
- ``result.json``   written atomically at the end: ``{"status": "published" | "cancelled" | "error", ...}``;
- ``work/``         the engine's checkpoints (a resumed job continues from them).

Stdlib and :mod:`acecal.protocol` only (the job process imports this module before torch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from acecal.errors import ProtocolError
from acecal.protocol import EVENT_EPOCH, EVENT_START, JobEvent

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_DISK_FULL",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_PUBLISHED",
    "JOBS_DIR",
    "JobFolder",
    "TrainProgress",
    "history_metrics",
    "tail_lines",
]

JOBS_DIR = "jobs"
#: exit statuses of a job process: published, unexpected error, refused/failed (reason in result.json), cancelled,
#: disk full (even when result.json could not be written)
EXIT_PUBLISHED, EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED, EXIT_DISK_FULL = 0, 1, 2, 3, 28
LOG_TAIL_LINES = 20


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, max_bytes: int = 32768) -> list[str]:
    """The last ``n`` non-empty lines of a text file (each cut to 500 characters); [] when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return [ln[:500] for ln in lines if ln.strip()][-n:]


def history_metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A bundle's training history (the engine's epoch records) as the job's metrics list (``EpochMetrics``);
    entries that are not epoch records are skipped."""
    out = []
    for h in history:
        try:
            out.append(JobEvent.from_json({**h, "event": EVENT_EPOCH}).epoch_metrics().to_json())
        except (ProtocolError, ValueError, TypeError):
            continue
    return out


def _read_json_dict(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class JobFolder:
    """The paths of one job's files, and the reads and writes the server makes there."""

    def __init__(self, jobs_dir: Path, job_id: str):
        self.job_id = job_id
        self.path = Path(jobs_dir) / job_id
        self.spec = self.path / "spec.json"
        self.dataset_json = self.path / "dataset.json"
        self.log = self.path / "job.log"
        self.train_log = self.path / "train.jsonl"
        self.progress = self.path / "progress.json"
        self.result = self.path / "result.json"
        self.work = self.path / "work"

    def note(self, text: str) -> None:
        """A line from the server into the job's log (best effort: a full disk must not stop anything)."""
        try:
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} [server] {text}\n")
        except OSError:
            pass

    def tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
        return tail_lines(self.log, n)

    def clear_outcome(self) -> None:
        """Remove the result and progress of an earlier attempt (before the process starts again)."""
        for p in (self.result, self.progress):
            p.unlink(missing_ok=True)

    def read_result(self) -> Optional[dict[str, Any]]:
        return _read_json_dict(self.result)

    def read_progress(self) -> Optional[dict[str, Any]]:
        return _read_json_dict(self.progress)

    def read_train_log(self, offset: int) -> tuple[list[JobEvent], int]:
        """The complete events of ``train.jsonl`` after byte ``offset``, and the offset after the last of them (a
        half-written last line is left for the next read; a line that is not an event is skipped)."""
        try:
            with open(self.train_log, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return [], offset
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset
        lines = data[: end + 1].decode("utf-8", errors="replace").splitlines()
        events = [ev for ev in map(JobEvent.from_line, lines) if ev is not None]
        return events, offset + end + 1


@dataclass
class TrainProgress:
    """How far a job's process got, as read from its folder: finished epochs and their metrics (``train.jsonl``), the
    step within the current epoch (``progress.json``)."""

    epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step: Optional[int] = None
    steps: Optional[int] = None
    offset: int = 0  # bytes of train.jsonl read so far

    def read(self, folder: JobFolder) -> bool:
        """Take in what the process wrote since the last call; returns whether anything changed."""
        changed = False
        events, self.offset = folder.read_train_log(self.offset)
        for ev in events:
            if ev.event == EVENT_START:  # a resumed run starts after its last checkpoint: later epochs are done again
                self.epoch = ev.start_epoch or 0
                self.metrics = [m for m in self.metrics if m["epoch"] <= self.epoch]
                changed = True
            elif ev.event == EVENT_EPOCH and ev.epoch is not None:
                try:
                    entry = ev.epoch_metrics().to_json()
                except ProtocolError:  # validation metrics that are not numbers: the epoch without them
                    entry = (
                        JobEvent(EVENT_EPOCH, epoch=ev.epoch, train_loss=ev.train_loss, lr=ev.lr, seconds=ev.seconds)
                        .epoch_metrics()
                        .to_json()
                    )
                self.metrics = [m for m in self.metrics if m["epoch"] < ev.epoch] + [entry]
                self.epoch = ev.epoch
                self.step = 0
                changed = True
        p = folder.read_progress()
        if p is not None:
            try:
                step, steps = p.get("step"), p.get("steps")
                if int(p.get("epoch") or 0) == self.epoch and (step, steps) != (self.step, self.steps):
                    self.step, self.steps = step, steps
                    changed = True
            except (TypeError, ValueError):
                pass
        return changed
