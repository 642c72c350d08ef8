"""Stopping an inference half-way: a cancelled CancelToken ends the forward pass at the next batch of sliding windows,
between stages, or before queued device work starts (the server cancels it when the client disconnects)."""

import contextlib
import threading
import time

import pytest
from slow_model import slow_bundle, slow_volume

from acecal.api.queue import InferenceQueue
from acecal.bundles import Bundle
from acecal.inference.pipeline import run_inference
from acecal.inference.predictor import Predictor
from acecal.inference.window import CancelToken, InferenceCancelled


@pytest.fixture(scope="module")
def slow(tiny_bundle, tmp_path_factory):
    """The tiny network with a sliding window of 15625 single-window batches on a 48^3 volume: minutes if not
    stopped."""
    root = tmp_path_factory.mktemp("slow")
    predictor = Predictor(Bundle.load(slow_bundle(tiny_bundle, root / "models")), "cpu")
    return predictor, slow_volume(root / "slow.nrrd")


@contextlib.contextmanager
def count_windows(predictor: Predictor, cancel_at: int = 0, token: CancelToken = None):
    """Record the network's calls (one per batch of windows here); cancel ``token`` during call number ``cancel_at``."""
    calls = []

    def hook(module, inputs, output):
        calls.append(tuple(inputs[0].shape))
        if len(calls) == cancel_at:
            token.cancel("test")

    handle = predictor.network.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_a_cancelled_forward_pass_stops_at_the_next_window_batch(slow):
    predictor, image = slow
    token = CancelToken()
    t0 = time.monotonic()
    with count_windows(predictor, 3, token) as calls, pytest.raises(InferenceCancelled, match="test"):
        run_inference(predictor, image, cancel=token)
    assert len(calls) == 3, "windows ran after the cancel"  # the batch running when it came was the last one
    assert calls[0] == (1, 1, 24, 24, 24)  # one window per batch: the check sits between windows
    assert time.monotonic() - t0 < 30  # the whole pass would take minutes


def test_a_token_cancelled_before_the_device_stage_runs_nothing(slow):
    predictor, image = slow
    token = CancelToken()
    token.cancel("gone")
    with count_windows(predictor) as calls, pytest.raises(InferenceCancelled, match="gone"):
        predictor.predict(image, cancel=token)
    assert calls == [] and token.cancelled and token.reason == "gone"


def test_queued_device_work_is_dropped_at_once_and_the_worker_stays_free():
    queue = InferenceQueue(queue_size=2, workers=1)
    release, started = threading.Event(), threading.Event()

    def busy():  # the device is taken by another request
        started.set()
        release.wait(30)
        return "first"

    ran = []
    first = threading.Thread(target=lambda: ran.append(queue.call(busy)))
    first.start()
    assert started.wait(10)
    token = CancelToken()
    outcome = []

    def waiting():
        try:
            queue.call(lambda: ran.append("queued work ran"), cancel=token)
        except InferenceCancelled as e:
            outcome.append((str(e), time.monotonic()))

    second = threading.Thread(target=waiting)
    second.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    token.cancel("the client disconnected")
    second.join(5)
    assert outcome and outcome[0][0] == "the client disconnected" and outcome[0][1] - t0 < 1.0
    assert queue.stats()["running"] == 1  # the first request still holds the device
    release.set()
    first.join(10)
    assert ran == ["first"]  # the dropped work never ran
    assert queue.call(lambda: "next") == "next" and queue.stats()["running"] == 0
    queue.shutdown()


def test_callbacks_run_once_and_late_ones_at_once():
    token, seen = CancelToken(), []
    token.on_cancel(lambda: seen.append("early"))
    token.check()  # not cancelled: nothing raised
    token.cancel("first reason")
    token.cancel("second reason")
    token.on_cancel(lambda: seen.append("late"))
    assert seen == ["early", "late"] and token.reason == "first reason"
    with pytest.raises(InferenceCancelled):
        token.check()
