"""Progress reporting: the JSON-lines log a server job tails, the callback hook, and cooperative cancellation.

Log format: one JSON object per line, appended and flushed as it happens, each a
:class:`acecal.protocol.JobEvent` (``start``, one ``epoch`` per finished epoch counting from 1, ``stopped`` with a
resumable reason, ``published``; its docstring lists every event's keys). ``JobEvent.from_line`` reads a line back,
``JobEvent.epoch_metrics`` turns an ``epoch`` event into a job view's metrics entry.

The callback receives the same dicts, plus a ``step`` event every iteration (never logged).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

#: a progress hook: called with one event dict at a time; it must return quickly and not raise
ProgressCallback = Callable[[dict], None]
#: cooperative cancel: a ``threading.Event`` (or anything with ``is_set()``) or a callable returning True to stop
CancelToken = Union[threading.Event, Callable[[], bool], None]


def is_cancelled(token: CancelToken) -> bool:
    if token is None:
        return False
    is_set = getattr(token, "is_set", None)
    if callable(is_set):
        return bool(is_set())
    return bool(token())  # type: ignore[operator]


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy/torch scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class JsonLinesLog:
    """Append-only JSON-lines file; each record is flushed and fsynced so a reader never sees half a line."""

    def __init__(self, path: Optional[str | os.PathLike]):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> dict:
        record = _clean({**record, "time": record.get("time") or now()})
        if self.path:
            line = json.dumps(record, allow_nan=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        return record


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (a trailing partial line is ignored)."""
    out = []
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

    def __init__(self, log_path: Optional[str | os.PathLike], callback: Optional[ProgressCallback] = None,
                 show_bar: Optional[bool] = None, enabled: bool = True):
        self.enabled = enabled
        self.log = JsonLinesLog(log_path if enabled else None)
        self.callback = callback if enabled else None
        if show_bar is None:
            import sys

            show_bar = sys.stderr.isatty()
        self.show_bar = bool(show_bar) and enabled
        self.bar = None

    def open_bar(self, total: int, initial: int, desc: str) -> None:
        if self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def _notify(self, record: dict) -> None:
        if self.callback is not None:
            try:
                self.callback(record)
            except Exception:  # a broken hook must not kill training
                pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
        if self.callback is not None:
            self._notify({"event": "step", "epoch": epoch, "step": step, "steps": steps, "loss": loss})

    def event(self, record: dict, *, log: bool = True) -> dict:
        if not self.enabled:
            return record
        rec = self.log.write(record) if log else _clean({**record, "time": now()})
        if self.bar is not None and record.get("event") == "epoch" and record.get("val"):
            v = record["val"]

            def n(x: Any) -> str:
                return "n/a" if x is None else f"{x:.4f}"

            self.bar.write(f"epoch {record['epoch']}: loss {n(record.get('train_loss'))}  val dice {n(v.get('dice'))}"
                           f"  ace {n(v.get('ace'))}  ece {n(v.get('ece'))}  mce {n(v.get('mce'))}")
        self._notify(rec)
        return rec

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
