"""Progress reporting: the JSON-lines log a server job tails, the callback hook, and cooperative cancellation.

Log format: one JSON object per line, appended and flushed as it happens, each a
:class:`acecal.protocol.JobEvent` (``start``, one ``epoch`` per finished epoch counting from 1, ``stopped`` with a
resumable reason, ``published``; its docstring lists every event's keys). ``JobEvent.from_line`` reads a line back,
``JobEvent.epoch_metrics`` turns an ``epoch`` event into a job view's metrics entry.

The callback receives the same events as JSON objects, plus a ``step`` event every iteration (never logged).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Union

from tqdm.auto import tqdm

from acecal.formatting import number
from acecal.protocol import EVENT_EPOCH, EVENT_STEP, JobEvent
from acecal.storage.files import json_finite

#: a progress hook: called with one event (``JobEvent.to_json()``) at a time; it must return quickly and not raise
ProgressCallback = Callable[[dict], None]
#: cooperative cancel: a ``threading.Event`` (or anything with ``is_set()``) or a callable returning True to stop
CancelToken = Union[threading.Event, Callable[[], bool], None]


class Cancelled(Exception):
    """Raised inside a training step, a validation pass or an evaluation when the cancel token fires."""


def is_cancelled(token: CancelToken) -> bool:
    if token is None:
        return False
    is_set = getattr(token, "is_set", None)
    if callable(is_set):
        return bool(is_set())
    return bool(token())  # type: ignore[operator]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class JsonLinesLog:
    """Append-only JSON-lines file; each record is flushed and fsynced so a reader never sees half a line."""

    def __init__(self, path: Optional[str | os.PathLike]):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> dict:
        record = json_finite({**record, "time": record.get("time") or now()})
        if self.path:
            line = json.dumps(record, allow_nan=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        return record


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (a trailing partial line is ignored)."""
    out: list[dict] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Reporter:
    """Fans events out to the log file, the callback and (on a terminal) a tqdm bar. Rank 0 only."""

    def __init__(
        self,
        log_path: Optional[str | os.PathLike],
        callback: Optional[ProgressCallback] = None,
        show_bar: Optional[bool] = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.log = JsonLinesLog(log_path if enabled else None)
        self.callback = callback if enabled else None
        if show_bar is None:
            show_bar = sys.stderr.isatty()
        self.show_bar = bool(show_bar) and enabled
        self.bar: Optional[tqdm] = None

    def open_bar(self, total: int, initial: int, desc: str) -> None:
        if self.show_bar:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def _notify(self, record: dict) -> None:
        if self.callback is not None:
            try:
                self.callback(record)
            except Exception:  # noqa: BLE001 - a broken hook must not kill training
                pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
        if self.callback is not None:
            self._notify(JobEvent(EVENT_STEP, epoch=epoch, step=step, steps=steps, loss=loss).to_json())

    def event(self, event: JobEvent, *, log: bool = True) -> dict:
        """Log ``event`` (with its time) and pass it to the callback; returns the JSON object written."""
        if not self.enabled:
            return event.to_json()
        record = event.to_json()
        rec = self.log.write(record) if log else json_finite({**record, "time": now()})
        if self.bar is not None and event.event == EVENT_EPOCH and event.val:
            v = event.val
            self.bar.write(
                f"epoch {event.epoch}: loss {number(event.train_loss)}  val dice {number(v.get('dice'))}"
                f"  ace {number(v.get('ace'))}  ece {number(v.get('ece'))}  mce {number(v.get('mce'))}"
            )
        self._notify(rec)
        return rec

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
