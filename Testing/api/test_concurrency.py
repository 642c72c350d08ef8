"""Inference never blocks the event loop: /health stays fast during inference, concurrent requests all succeed,
and a full queue answers 503 with Retry-After."""

import threading
import time

import numpy as np
import requests
from live_server import LiveServer, make_settings
from oblique import oblique_case
from synthetic import dice, make_case, write_case

from acecal.client import ACEClient, ServerBusyError
from acecal.data.io import write_volume


def _slow_case(tmp_path):
    """A volume big enough that its inference outlasts a few /health round trips on any machine."""
    case = make_case((48, 48, 48), seed=31)
    write_case(case, tmp_path / "slow.nrrd")
    return tmp_path / "slow.nrrd"


def _post_in_background(url, path, results, key):
    def run():
        with open(path, "rb") as fh:
            results[key] = requests.post(url + "/infer/tiny-sphere", files={"image": (path.name, fh)}, timeout=300)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_health_answers_fast_while_inference_runs(server, tmp_path):
    path = _slow_case(tmp_path)
    results = {}
    t = _post_in_background(server.url, path, results, "slow")
    seen_running, latencies = 0, []
    while t.is_alive():
        t0 = time.perf_counter()
        h = requests.get(server.url + "/health", timeout=5)
        latencies.append(time.perf_counter() - t0)
        assert h.status_code == 200
        seen_running += h.json()["queue"]["running"] > 0
        time.sleep(0.01)
    t.join()
    assert results["slow"].status_code == 200, results["slow"].text
    assert seen_running >= 1, "inference finished before /health could observe it"
    assert max(latencies) < 1.0, latencies  # functional bound: the event loop is never blocked


def test_concurrent_requests_all_succeed_with_their_own_results(server, tmp_path):
    cases = []
    for i in range(4):
        image, label, grid, _ = oblique_case(seed=100 + i)
        path = write_volume(image, grid, tmp_path / f"c{i}.nrrd")
        cases.append((path, label, grid))
    out = {}

    def run(i):
        with ACEClient(server.url) as c:
            out[i] = c.infer(cases[i][0], "tiny-sphere")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(out) == [0, 1, 2, 3]
    assert len({r.result_id for r in out.values()}) == 4
    for i, (_, label, grid) in enumerate(cases):
        assert out[i].grid.same_as(grid, atol=1e-6)
        assert dice(out[i].label_map, label) > 0.85


def test_full_queue_answers_503_with_retry_after(tiny_bundle, tmp_path):
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent], queue_size=0)  # one request at a time
    path = _slow_case(tmp_path)
    with LiveServer(settings) as s:
        results = {}
        t = _post_in_background(s.url, path, results, "first")
        deadline = time.monotonic() + 60
        while requests.get(s.url + "/health", timeout=5).json()["queue"]["in_flight"] == 0:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        small = make_case((12, 12, 12), seed=1)
        write_case(small, tmp_path / "small.nrrd")
        r = requests.post(
            s.url + "/infer/tiny-sphere",
            files={"image": ("small.nrrd", (tmp_path / "small.nrrd").read_bytes())},
            timeout=30,
        )
        busy_while_running = t.is_alive()
        with ACEClient(s.url, busy_retries=0) as c:
            try:
                c.infer(tmp_path / "small.nrrd", "tiny-sphere")
                client_busy = None
            except ServerBusyError as e:
                client_busy = e
        t.join(timeout=300)
        assert busy_while_running
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "busy" and int(r.headers["retry-after"]) >= 1
        assert results["first"].status_code == 200
        if client_busy is not None:  # the first may have finished in between: then the client simply succeeded
            assert client_busy.retry_after >= 1 and "busy" in client_busy.detail
        # afterwards the server takes work again, and a client that waits on 503 gets through
        with ACEClient(s.url, busy_retries=3) as c:
            res = c.infer(tmp_path / "small.nrrd", "tiny-sphere")
        assert np.asarray(res.label_map).shape == (12, 12, 12)
        stats = requests.get(s.url + "/health", timeout=5).json()["queue"]
        assert stats["rejected"] >= 1 and stats["in_flight"] == 0
