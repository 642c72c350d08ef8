"""The Qt-free worker task (progress, result, errors, cancel) and the settings rules (API key never stored)."""

from __future__ import annotations

import threading
import time

import pytest

from ACECalibrationLib import settings
from ACECalibrationLib.worker import CANCELLED, FAILED, SUCCEEDED, Cancelled, Task


def test_task_result_and_progress():
    seen = threading.Event()

    def work(ctx, a, b=0):
        ctx.progress(0.5, "half way")
        seen.wait(5)
        return a + b

    t = Task(work, 2, b=3).start()
    deadline = time.monotonic() + 5
    while t.progress[0] != 0.5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.progress == (0.5, "half way") and not t.done()
    seen.set()
    assert t.result(5) == 5 and t.state == SUCCEEDED and t.progress[0] == 1.0
    with pytest.raises(RuntimeError):
        t.start()


def test_task_error_is_reraised_with_traceback():
    def work(ctx):
        raise ValueError("bad input")

    t = Task(work).start()
    with pytest.raises(ValueError, match="bad input"):
        t.result(5)
    assert t.state == FAILED and "ValueError" in t.traceback and isinstance(t.exception(), ValueError)


def test_cancel_is_immediate_and_stops_the_worker():
    started, stopped = threading.Event(), threading.Event()

    def work(ctx):
        started.set()
        try:
            while True:  # a long upload: the client's progress callback checks every chunk
                ctx.bytes_callback("Uploading", 0.0, 0.3)(1, 10)
                time.sleep(0.005)
        finally:
            stopped.set()

    t = Task(work).start()
    assert started.wait(5)
    t0 = time.monotonic()
    assert t.cancel()
    assert t.done() and t.cancelled() and t.state == CANCELLED and time.monotonic() - t0 < 0.1
    with pytest.raises(Cancelled):
        t.result(0)
    assert stopped.wait(5) and t.worker_finished(5)
    assert not t.cancel()  # already finished


def test_a_late_result_of_a_cancelled_task_is_discarded():
    release = threading.Event()

    def work(ctx):
        release.wait(5)  # a blocking call that cannot check the cancel flag
        return "late"

    t = Task(work).start()
    t.cancel()
    release.set()
    assert t.worker_finished(5)
    with pytest.raises(Cancelled):
        t.result(0)


def test_server_url_normalisation_and_history():
    assert settings.normalize_server_url("") == settings.DEFAULT_SERVER_URL
    assert settings.normalize_server_url(" gpu-box:8000/ ") == "http://gpu-box:8000"
    assert settings.normalize_server_url("https://x.org/acecal/") == "https://x.org/acecal"
    with pytest.raises(ValueError):
        settings.normalize_server_url("ftp://x")
    store = settings.MemorySettings()
    for i in range(12):
        settings.remember_server_url(store, f"host{i}:8000")
    settings.remember_server_url(store, "host5:8000")
    hist = settings.server_history(store)
    assert hist[0] == "http://host5:8000" and len(hist) == settings.MAX_HISTORY and len(set(hist)) == len(hist)
    assert settings.last_server_url(store) == "http://host5:8000"
    assert settings.last_server_url(settings.MemorySettings()) == settings.DEFAULT_SERVER_URL


def test_api_key_is_never_written(monkeypatch):
    store = settings.MemorySettings()
    settings.remember_server_url(store, "localhost:8000")
    for key in ("ACECalibration/apiKey", "ACECalibration/token", "ACECalibration/password"):
        with pytest.raises(ValueError, match="never written"):
            settings.save_setting(store, key, "s3cret")
    assert not any("s3cret" in str(v) for v in store.values.values())
    assert set(store.values) == {settings.KEY_SERVER_URL, settings.KEY_SERVER_HISTORY}
    monkeypatch.setenv(settings.API_KEY_ENV, "from-env")
    assert settings.api_key_from_environment() == "from-env"
