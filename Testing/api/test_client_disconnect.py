"""A client that disconnects stops its inference: the server drops queued work, stops a running forward pass at its
next sliding-window batch, stores nothing, frees the slot at once and says so in its log; the next request is
served at once. Driven over raw sockets against a real server serving a deliberately slow model (minutes per volume).
"""

import logging
import socket
import time

import pytest
import requests
from live_server import LiveServer, make_settings
from slow_model import slow_bundle, slow_volume
from synthetic import make_case, write_case

from acecal.client import ACEClient

SLOW = "tiny-slow"
BOUNDARY = "acecal-disconnect-test"


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """The tiny model and its slow copy, on one device worker."""
    models = tmp_path_factory.mktemp("slow-models")
    slow_bundle(tiny_bundle, models, SLOW)
    settings = make_settings(tmp_path_factory.mktemp("disconnect-data"), [tiny_bundle.parent, models])
    with LiveServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory):
    return slow_volume(tmp_path_factory.mktemp("slow-image") / "slow.nrrd").read_bytes()


def open_infer(url: str, model_id: str, image: bytes) -> socket.socket:
    """Send a whole ``POST /infer/{model_id}`` on a raw socket and leave it waiting for the reply."""
    host, port = url.removeprefix("http://").split(":")
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="slow.nrrd"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /infer/{model_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + body)
    return sock


def queue(url: str) -> dict:
    return requests.get(url + "/health", timeout=5).json()["queue"]


def wait_for(url: str, what, timeout: float) -> tuple[dict, float]:
    """Poll /health until ``what(queue)``; returns that queue and the seconds it took."""
    t0 = time.monotonic()
    while True:
        q = queue(url)
        if what(q):
            return q, time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"/health never showed it within {timeout} s: {q}"
        time.sleep(0.05)


def results_left(server) -> list:
    folder = server.settings.results_dir
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_running_inference_stops_when_its_client_leaves(server, slow_image, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="acecal.api")
    before = queue(server.url)
    sock = open_infer(server.url, SLOW, slow_image)
    wait_for(server.url, lambda q: q["running"] == 1, 60)  # uploaded, read, now in the forward pass
    time.sleep(0.5)
    sock.close()
    q, seconds = wait_for(server.url, lambda q: q["in_flight"] == 0 and q["running"] == 0, 10)
    assert seconds < 2.0, f"the slot was held {seconds:.2f} s after the client left"
    assert q["cancelled"] == before["cancelled"] + 1
    assert results_left(server) == [] and list(server.settings.tmp_dir.iterdir()) == []
    assert "inference cancelled" in caplog.text and "the client disconnected" in caplog.text

    # the device is free: the next request is served at once (the slow pass alone would take minutes)
    write_case(make_case((24, 24, 24), seed=3), tmp_path / "next.nii.gz")
    t0 = time.monotonic()
    with ACEClient(server.url, timeout=(5, 60)) as c:
        assert c.infer(tmp_path / "next.nii.gz", "tiny-sphere").model_id == "tiny-sphere"
    assert time.monotonic() - t0 < 20
    assert results_left(server) == []  # the client deleted its result after download


def test_queued_work_is_dropped_when_its_client_leaves(server, slow_image):
    running = open_infer(server.url, SLOW, slow_image)
    try:
        wait_for(server.url, lambda q: q["running"] == 1, 60)
        waiting = open_infer(server.url, SLOW, slow_image)
        q, _ = wait_for(server.url, lambda q: q["in_flight"] == 2, 30)
        time.sleep(1.0)  # its upload is in and read: it waits for the device
        cancelled = q["cancelled"]
        waiting.close()
        q, seconds = wait_for(server.url, lambda q: q["in_flight"] == 1, 10)
        assert seconds < 2.0 and q["running"] == 1 and q["cancelled"] == cancelled + 1  # the first one runs on
    finally:
        running.close()
    q, seconds = wait_for(server.url, lambda q: q["in_flight"] == 0 and q["running"] == 0, 10)
    assert seconds < 2.0 and q["cancelled"] == cancelled + 2
    assert results_left(server) == []


def test_a_client_that_stays_gets_its_reply(server, tmp_path):
    """The watcher never cancels a request whose client is still there (here: a reply after several polls)."""
    case = make_case((40, 40, 40), seed=8)
    write_case(case, tmp_path / "c.nii.gz")
    with ACEClient(server.url, timeout=(5, 120)) as c:
        result = c.infer(tmp_path / "c.nii.gz", "tiny-sphere", overlap=0.75)
    assert result.label_map.shape == (40, 40, 40) and result.params["overlap"] == 0.75
