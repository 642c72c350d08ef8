"""A background task (a future with progress and cancel) that needs no Qt, so it is testable in plain Python.

Slicer must never block its GUI thread on the network. The widget starts a :class:`Task` for the slow part (upload,
inference, download) and polls it from a ``qt.QTimer``: :attr:`Task.progress` feeds the progress bar, and once
:meth:`Task.done` the widget collects :meth:`Task.result` and builds MRML nodes *on the GUI thread* (MRML is not
thread-safe: the worker never touches the scene).

Cancel is cooperative and immediate for the caller: :meth:`Task.cancel` marks the task cancelled at once (``done()``
is true, ``result()`` raises :class:`Cancelled`), and the worker stops at its next :meth:`TaskContext.check`, which
the client's upload/download progress callbacks call every chunk. A late result of a cancelled task is discarded.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from typing import Any, Callable

__all__ = ["Cancelled", "TaskContext", "Task", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
_KEEP = object()


#: how many progress messages a task keeps (a fine-tuning job reports one per epoch)
MESSAGE_HISTORY = 500


class Cancelled(Exception):
    """The task was cancelled by the user."""

    def __init__(self, detail: str = "Cancelled."):
        super().__init__(detail)
        self.detail = detail


class TaskContext:
    """What the worker function sees: progress reporting and the cancel flag."""

    def __init__(self, task: Task):
        self._task = task

    @property
    def cancelled(self) -> bool:
        return self._task._cancel_event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` when the task was cancelled (call it often)."""
        if self.cancelled:
            raise Cancelled()

    def progress(self, fraction: Any = _KEEP, message: str | None = None) -> None:
        """Report progress (fraction 0..1, or None for "busy, amount unknown"; omitted = unchanged) and a short
        message; also checks for cancel."""
        with self._task._lock:
            if fraction is None:
                self._task._progress = None
            elif fraction is not _KEEP:
                self._task._progress = max(0.0, min(1.0, float(fraction)))
            if message is not None:
                if message != self._task._message:
                    self._task._messages.append(message)
                self._task._message = message
        self.check()

    def bytes_callback(self, phase: str, start: float, end: float) -> Callable[..., None]:
        """A ``callback(done, total)`` for the client's upload/download progress, mapped onto ``start..end``."""

        def callback(done: int, total: int | None = None, *_: Any) -> None:
            if total:
                self.progress(start + (end - start) * min(1.0, done / total), phase)
            else:
                self.progress(None, phase)

        return callback


class Task:
    """Run ``fn(context, *args, **kwargs)`` on a daemon thread; a small future with progress and cancel."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "ACECalibration task", **kwargs: Any):
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._lock = threading.Lock()
        self._cancel_event = threading.Event()
        self._done_event = threading.Event()
        self._state = PENDING
        self._result: Any = None
        self._error: BaseException | None = None
        self._traceback = ""
        self._progress: float | None = None
        self._message = ""
        self._messages: collections.deque[str] = collections.deque(maxlen=MESSAGE_HISTORY)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.started_at: float | None = None
        self.finished_at: float | None = None

    # --- control ------------------------------------------------------------------------------------------------
    def start(self) -> Task:
        with self._lock:
            if self._state != PENDING:
                raise RuntimeError("a task can only be started once")
            self._state = RUNNING
            self.started_at = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> bool:
        """Ask the task to stop; it counts as cancelled at once. False when it had already finished."""
        with self._lock:
            if self._state in (SUCCEEDED, FAILED, CANCELLED):
                return False
            self._cancel_event.set()
            self._state = CANCELLED
            self._message = "Cancelled."
            self.finished_at = time.monotonic()
        self._done_event.set()
        return True

    # --- the worker ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = TaskContext(self)
        try:
            result = self._fn(ctx, *self._args, **self._kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through result()
            with self._lock:
                if self._state != CANCELLED:
                    if isinstance(e, Cancelled):
                        self._state = CANCELLED
                    else:
                        self._state = FAILED
                        self._error = e
                        self._traceback = traceback.format_exc()
                    self.finished_at = time.monotonic()
        else:
            with self._lock:
                if self._state != CANCELLED:  # a late result of a cancelled task is discarded
                    self._state = SUCCEEDED
                    self._result = result
                    self._progress = 1.0
                    self.finished_at = time.monotonic()
        finally:
            self._done_event.set()

    # --- observation --------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def progress(self) -> tuple[float | None, str]:
        """(fraction 0..1 or None when unknown, message)."""
        with self._lock:
            return self._progress, self._message

    @property
    def messages(self) -> list[str]:
        """Every distinct progress message so far, oldest first (the last ``MESSAGE_HISTORY``), for a log view."""
        with self._lock:
            return list(self._messages)

    @property
    def traceback(self) -> str:
        """Formatted traceback of a failure (for a "details" box), empty otherwise."""
        return self._traceback

    def done(self) -> bool:
        return self._done_event.is_set()

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def wait(self, timeout: float | None = None) -> bool:
        return self._done_event.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._done_event.wait(timeout):
            raise TimeoutError("task still running")
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value; re-raises its exception; :class:`Cancelled` when cancelled."""
        if not self._done_event.wait(timeout):
            raise TimeoutError("task still running")
        if self._state == CANCELLED:
            raise Cancelled()
        if self._error is not None:
            raise self._error
        return self._result

    def worker_finished(self, timeout: float | None = None) -> bool:
        """Wait for the thread itself to end (a cancelled worker may still be unwinding); True if it ended."""
        if self._state == PENDING:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
