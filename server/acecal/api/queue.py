"""The bounded inference queue: device work runs on dedicated worker threads, never on the event loop.

A request first *reserves* a slot (:meth:`InferenceQueue.slot`); at most ``workers + queue_size`` requests hold one
at a time and the next gets :class:`acecal.errors.ServerBusyError` (503, ``Retry-After`` estimated from the median of
recent request durations). Inside its slot a request runs CPU stages in the normal thread pool and its device stage on
``workers`` threads (one by default: the device is used by one forward pass at a time, like a GPU lock): awaited
from the event loop with :meth:`InferenceQueue.run`, or from a thread-pool thread with :meth:`InferenceQueue.call`
(the ``run_on_device`` hook of :func:`acecal.inference.pipeline.run_inference`).

A request whose client has gone cancels its :class:`~acecal.inference.window.CancelToken`: device work it still waits
for is taken out of the queue at once (``call(..., cancel=token)``), and work already running stops at its next
sliding-window batch; the caller then leaves its slot.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from acecal.errors import ServerBusyError
from acecal.inference.window import CancelToken, InferenceCancelled

T = TypeVar("T")


class InferenceQueue:
    def __init__(self, queue_size: int = 8, workers: int = 1):
        self.queue_size = int(queue_size)
        self.workers = int(workers)
        self.capacity = self.workers + self.queue_size
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="acecal-device")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._running = 0
        self._durations: deque[float] = deque(maxlen=20)
        self.completed = 0
        self.rejected = 0
        self.cancelled = 0

    # --- slots --------------------------------------------------------------------------------------------------
    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the median recent request time (one request that took an hour, or
        a burst of instant refusals, does not skew it) times the waves of requests ahead, within 1..600 s."""
        typical = statistics.median(self._durations) if self._durations else 5.0
        waves = math.ceil(max(self._in_flight, 1) / self.workers)
        return max(1.0, min(typical * waves, 600.0))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``capacity`` places for the duration of a request (503 when none is free)."""
        with self._lock:
            if self._in_flight >= self.capacity:
                self.rejected += 1
                raise ServerBusyError(
                    f"the server is busy: {self._in_flight} inference request(s) in progress or waiting "
                    f"(capacity {self.capacity}); retry later",
                    retry_after=self._retry_after(),
                )
            self._in_flight += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._durations.append(time.perf_counter() - t0)
                self.completed += 1

    # --- device work --------------------------------------------------------------------------------------------
    def _wrap(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        with self._lock:
            self._running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a device worker thread and await its result without blocking the event loop."""
        fut = self._executor.submit(self._wrap, fn, args, kwargs)
        return await asyncio.wrap_future(fut)

    def call(self, fn: Callable[..., T], *args: Any, cancel: Optional[CancelToken] = None, **kwargs: Any) -> T:
        """Run ``fn`` on a device worker thread and wait for its result (from a thread, never the event loop).

        ``cancel``: when it is cancelled before ``fn`` started, ``fn`` is dropped from the queue and this raises
        :class:`~acecal.inference.window.InferenceCancelled` at once (a running ``fn`` checks the token itself).
        """
        future = self._executor.submit(self._wrap, fn, args, kwargs)
        if cancel is not None:
            cancel.on_cancel(future.cancel)  # succeeds only while the work waits for a device worker
        try:
            return future.result()
        except CancelledError:
            if cancel is not None and cancel.cancelled:
                raise InferenceCancelled(cancel.reason) from None
            raise

    def count_cancelled(self) -> None:
        """A request stopped because its client disconnected (reported by ``/health``)."""
        with self._lock:
            self.cancelled += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "running": self._running,
                "capacity": self.capacity,
                "workers": self.workers,
                "queue_size": self.queue_size,
                "completed": self.completed,
                "rejected": self.rejected,
                "cancelled": self.cancelled,
            }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
