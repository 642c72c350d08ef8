"""ACEClient against a live server, and against sockets that misbehave (dead, silent, not ACECal, dropping)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import SimpleITK as sitk
from live_server import free_port
from oblique import oblique_case
from synthetic import dice, make_case, write_case

from acecal.client import (
    VOLUMES,
    ACEClient,
    InvalidInputError,
    ModelNotFoundError,
    ProtocolError,
    ResultNotFoundError,
    ServerBusyError,
    ServerTimeoutError,
    ServerUnreachableError,
)
from acecal.data.io import grid_of


def test_health_models_and_model(client_server):
    with ACEClient(client_server.url) as c:
        h = c.health()
        assert h["status"] == "ok" and h["device"] == "cpu"
        (m,) = c.models()
        assert m.id == "tiny-sphere" and m.class_names == ["background", "sphere"] and m.loss == "baseline_dice_ce"
        assert c.model("tiny-sphere").labels == m.labels
        assert c.check()["models"] == ["tiny-sphere"]
        with pytest.raises(ModelNotFoundError) as e:
            c.model("nope")
        assert e.value.status_code == 404 and "available models: tiny-sphere" in e.value.detail


def test_infer_a_file_into_arrays_with_progress(client_server, tmp_path):
    case = make_case((24, 24, 24), seed=12, spacing=(1.1, 0.9, 1.0), origin=(3.0, 4.0, 5.0))
    write_case(case, tmp_path / "c.nii.gz")
    events = []
    with ACEClient(client_server.url) as c:
        res = c.infer(
            tmp_path / "c.nii.gz", "tiny-sphere", uncertainty_threshold=0.9, progress=lambda *e: events.append(e)
        )
        with pytest.raises(ResultNotFoundError):  # deleted from the server once downloaded
            c.result(res.result_id)
    assert res.grid.same_as(grid_of(sitk.ReadImage(str(tmp_path / "c.nii.gz"))), atol=1e-6)
    assert set(res.arrays) == set(VOLUMES)
    assert res.label_map.dtype == np.uint8 and res.confidence.dtype == np.float32
    assert dice(res.label_map, case.label) > 0.9
    assert res.raw["params"]["uncertainty_threshold"] == 0.9
    assert len(res.regions) == res.summary.region_count
    for r in res.regions:
        assert r.class_name == "sphere" and r.voxels > 0
        np.testing.assert_allclose(r.centroid_ras[:2], -np.asarray(r.centroid_lps[:2]))
    uploads = [e for e in events if e[0] == "upload"]
    size = (tmp_path / "c.nii.gz").stat().st_size
    assert uploads and all(a[1] <= b[1] for a, b in zip(uploads, uploads[1:], strict=False)) and uploads[-1][2] > size
    assert uploads[-1][1] == uploads[-1][2]
    for name in VOLUMES:
        d = [e for e in events if e[0] == f"download:{name}"]
        assert d and d[-1][1] == d[-1][2]


def test_infer_an_array_on_an_oblique_grid_into_files(client_server, tmp_path):
    image, label, grid, _ = oblique_case(seed=13)
    with ACEClient(client_server.url) as c:
        res = c.infer(
            (image, grid),
            "tiny-sphere",
            out_dir=tmp_path / "out",
            keep_on_server=True,
            volumes=("labels", "confidence"),
        )
        assert c.result(res.result_id).result_id == res.result_id  # kept: fetch the rest later
        c.fetch_volumes(res, volumes=("flags",))
        c.delete_result(res.result_id)
    assert res.grid.same_as(grid, atol=1e-9)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confidence.nrrd", "labels.nrrd", "summary.json"]
    assert res.arrays.keys() == {"flags"}  # files only for the out_dir download, arrays for the later one
    lab = sitk.ReadImage(str(res.paths["labels"]))
    assert grid_of(lab).same_as(grid, atol=1e-6)
    assert dice(sitk.GetArrayFromImage(lab), label) > 0.85
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files"] == {"labels": "labels.nrrd", "confidence": "confidence.nrrd"}
    assert summary["source"]["server"] == client_server.url and summary["result_id"] == res.result_id


def test_typed_errors_carry_the_server_message(client_server, tmp_path):
    bad = np.full((8, 8, 8), np.nan, np.float32)
    from acecal.geometry import Grid

    with ACEClient(client_server.url) as c:
        with pytest.raises(InvalidInputError, match="NaN") as e:
            c.infer((bad, Grid.from_zyx_shape(bad.shape)), "tiny-sphere")
        assert e.value.status_code == 422 and e.value.code == "invalid_input"
        with pytest.raises(InvalidInputError, match="uncertainty_threshold"):
            c.infer((bad, Grid.from_zyx_shape(bad.shape)), "tiny-sphere", uncertainty_threshold=3)
        with pytest.raises(ModelNotFoundError):
            c.infer((bad, Grid.from_zyx_shape(bad.shape)), "no-model")
        with pytest.raises(ResultNotFoundError):
            c.result("0" * 32)
        with pytest.raises(FileNotFoundError):
            c.infer(tmp_path / "missing.nii.gz", "tiny-sphere")
        with pytest.raises(ValueError, match="unknown volume"):
            c.infer((bad, Grid.from_zyx_shape(bad.shape)), "tiny-sphere", volumes=("labelz",))


def test_dead_server_fails_fast_with_a_clear_error():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError, match="acecal serve"):
        ACEClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01).health()
    assert time.monotonic() - t0 < 5


def test_silent_server_times_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(5)  # accepts connections (backlog) but never answers
        port = s.getsockname()[1]
        with pytest.raises(ServerTimeoutError, match="did not answer"):
            ACEClient(f"http://127.0.0.1:{port}", timeout=(1.0, 0.3), retries=0).health()


class _Recorder(BaseHTTPRequestHandler):
    """A server that is not ACECal: counts requests; /drop closes without answering; /busy is a bare 503."""

    hits: list = []

    def log_message(self, *a):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        type(self).hits.append((self.command, self.path))
        if self.path.startswith("/drop") or self.path.startswith("/infer/drop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.path.startswith("/busy") or self.path.startswith("/infer/busy"):
            self.send_response(503)
            self.send_header("Retry-After", "2")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"busy")
            return
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture
def other_server():
    _Recorder.hits = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_retries_only_where_safe(other_server, tmp_path):
    from acecal.geometry import Grid

    c = ACEClient(other_server, retries=2, backoff_s=0.01, timeout=(2, 2))
    with pytest.raises(ProtocolError, match="expected JSON"):
        c.health()
    # GET is idempotent: retried after a dropped connection
    _Recorder.hits = []
    with pytest.raises(ServerUnreachableError):
        c.get_json("/drop")
    assert len(_Recorder.hits) == 3
    # POST /infer sent its body: never repeated
    _Recorder.hits = []
    arr = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ServerUnreachableError):
        c.infer((arr, Grid.from_zyx_shape(arr.shape)), "drop")
    assert _Recorder.hits == [("POST", "/infer/drop")]
    # a bare 503 becomes ServerBusyError with the server's Retry-After; POST is not retried unless asked
    _Recorder.hits = []
    with pytest.raises(ServerBusyError) as e:
        c.infer((arr, Grid.from_zyx_shape(arr.shape)), "busy")
    assert e.value.retry_after == 2.0 and e.value.status_code == 503 and len(_Recorder.hits) == 1


class _Cancelled(Exception):
    pass


@pytest.mark.parametrize("stage", ["upload", "download:confidence"])
def test_a_progress_callback_can_cancel(client_server, stage):
    """What the Slicer module's Cancel button does: raise from the callback; the exception comes out unchanged and
    the server keeps neither a temporary file nor the result."""
    from acecal.geometry import Grid

    arr = np.random.default_rng(0).random((40, 40, 40), dtype=np.float32)
    before = client_server.state.results.count()

    def progress(st, done, total):
        if st == stage and done > 10_000:
            raise _Cancelled(st)

    with ACEClient(client_server.url) as c, pytest.raises(_Cancelled):
        c.infer((arr, Grid.from_zyx_shape(arr.shape)), "tiny-sphere", progress=progress)
    deadline = time.monotonic() + 10
    while client_server.state.queue.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client_server.state.results.count() == before
    assert list(client_server.settings.tmp_dir.iterdir()) == []
