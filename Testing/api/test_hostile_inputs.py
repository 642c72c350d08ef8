"""Hostile files and requests against a real server (``acecal serve`` in a subprocess on loopback, with an API key and
small voxel budgets): every attack gets a 4xx with a clear message, quickly; the server reads nothing it was not
sent, its memory stays bounded (RSS of the server process, sampled while each request runs) and it stays healthy.

The attacks are built by Testing/hostile.py: headers pointing to a secret file this test creates (absolute and
``../`` relative paths, MetaImage and NRRD, as image and as label), to a FIFO and to /dev/zero; gzip bombs; huge
spacing; +-3e38 voxels; huge bands; deep nesting; bad patch sizes; big bodies without the key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import requests
from hostile import fifo, gz, mha_pointer, nifti_gz_bomb, nifti_header, nrrd_gzip_bomb, nrrd_pointer, secret_file
from live_server import LiveServer, make_settings, start_cli_server, stop_process
from synthetic import make_case, write_case

from acecal.geometry import Grid
from acecal.nrrd import encode_nrrd

KEY = "hostile-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_VOXELS = 1_000_000
MAX_MODEL_VOXELS = 2_000_000
#: the most the server process may grow while refusing one attack (an unbounded one grows by 512 MB or more)
RSS_BOUND = 100 * 1024 * 1024


class Served:
    def __init__(self, url: str, data: Path, proc, root: Path):
        self.url, self.data, self.proc, self.root = url, data, proc, root
        self.process = psutil.Process(proc.pid)

    def post_image(self, name: str, blob: bytes, params=None, model: str = "tiny-sphere", timeout: float = 60):
        data = {"params": params} if params is not None else None
        return requests.post(
            f"{self.url}/infer/{model}", files={"image": (name, blob)}, data=data, headers=AUTH, timeout=timeout
        )

    def post_case(self, ds: str, image: tuple, label: tuple, timeout: float = 60, **form):
        return requests.post(
            f"{self.url}/datasets/{ds}/cases",
            files={"image": image, "label": label},
            data=form,
            headers=AUTH,
            timeout=timeout,
        )

    def healthy(self) -> bool:
        return requests.get(self.url + "/health", timeout=2).status_code == 200

    def results(self) -> set[str]:
        d = self.data / "results"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def leftovers(self) -> list[Path]:
        return [p for p in (self.data / "tmp").iterdir() if p.name.startswith("upload-")]

    @contextmanager
    def peak_rss(self):
        """Samples the server's RSS every 5 ms; yields a dict whose ``growth`` is set on exit."""
        out = {"growth": 0}
        base = self.process.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], self.process.memory_info().rss)
                time.sleep(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield out
        finally:
            stop.set()
            t.join()
            out["growth"] = peak[0] - base


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data, systmp = root / "data", root / "systmp"
    systmp.mkdir()
    proc, url = start_cli_server(
        [
            "--models",
            str(tiny_bundle.parent),
            "--data-dir",
            str(data),
            "--max-upload-mb",
            "64",
            "--max-voxels",
            str(MAX_VOXELS),
            "--max-model-voxels",
            str(MAX_MODEL_VOXELS),
        ],
        env={"ACECAL_API_KEY": KEY, "TMPDIR": str(systmp)},
    )
    yield Served(url, data, proc, root)
    stop_process(proc)


@pytest.fixture(scope="module")
def secret(served):
    """A secret file next to the data directory: ``(path, token)``."""
    return secret_file(served.root, "secret.bin")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    case = make_case((16, 16, 16), seed=11)
    write_case(case, d / "img.nrrd", d / "lab.nrrd")
    return (d / "img.nrrd").read_bytes(), (d / "lab.nrrd").read_bytes()


@pytest.fixture(scope="module")
def dataset(served):
    r = requests.post(
        served.url + "/datasets", json={"name": "hostile", "model": "tiny-sphere"}, headers=AUTH, timeout=10
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _relative(secret_path: Path, served: Served) -> str:
    """The secret's path relative to the server's temporary upload folder (where a relative pointer resolves)."""
    return os.path.relpath(secret_path, served.data / "tmp")


def _attacks(served: Served, secret_path: Path) -> list[tuple[str, str, bytes]]:
    rel = _relative(secret_path, served)
    return [
        ("mha absolute", "scan.mha", mha_pointer(str(secret_path), element_type="MET_UCHAR")),
        ("mha relative", "scan.mha", mha_pointer(rel, element_type="MET_LONG_LONG")),
        ("nrrd absolute", "scan.nrrd", nrrd_pointer(str(secret_path), ntype="uchar")),
        ("nrrd relative datafile", "scan.nrrd", nrrd_pointer(rel, ntype="longlong", key="datafile")),
        ("nrrd /dev/zero 1024^3", "zero.nrrd", nrrd_pointer("/dev/zero", sizes=(1024, 1024, 1024))),
        ("nhdr", "scan.nhdr", nrrd_pointer(str(secret_path))),
        ("mhd", "scan.mhd", mha_pointer(str(secret_path))),
        ("nifti .hdr/.img pair", "scan.nii", nifti_header((16, 16, 16), magic=b"ni1\x00")),
    ]


def _assert_refused(r, token: bytes, served: Served, *, status: int = 422, elapsed_s: float = 5.0):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    assert token.decode() not in r.text
    assert str(served.root) not in r.text and str(served.data) not in r.text  # no server paths
    assert r.elapsed.total_seconds() < elapsed_s
    return body["detail"]


# --- parse before you read --------------------------------------------------------------------------------------------
def test_infer_refuses_headers_pointing_elsewhere(served, secret):
    path, token = secret
    before = served.results()
    for what, name, blob in _attacks(served, path):
        detail = _assert_refused(served.post_image(name, blob), token, served)
        assert "does not hold its voxel data" in detail or "detached header" in detail, (what, detail)
    assert served.results() == before and served.leftovers() == []


def test_case_upload_refuses_pointers_as_label_and_as_image(served, secret, good, dataset):
    path, token = secret
    img, lab = good
    for what, name, blob in _attacks(served, path):
        for image, label in (((name, blob), ("lab.nrrd", lab)), (("img.nrrd", img), (name, blob))):
            detail = _assert_refused(served.post_case(dataset, image, label), token, served)
            assert "voxel data" in detail or "detached header" in detail, (what, detail)
            assert "label values" not in detail  # the pointed-to bytes were never read as labels
    got = requests.get(f"{served.url}/datasets/{dataset}", headers=AUTH, timeout=10).json()
    assert got["cases"] == [] and served.leftovers() == []


def test_fifo_pointers_never_block_and_health_answers_meanwhile(served, good, dataset):
    pipe = fifo(served.root, "pipe")
    img, _ = good
    pointer = mha_pointer(str(pipe))
    health_times = []
    stop = threading.Event()

    def poll_health():
        while not stop.is_set():
            t0 = time.monotonic()
            assert served.healthy()
            health_times.append(time.monotonic() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    with ThreadPoolExecutor(16) as pool:
        t0 = time.monotonic()
        infers = [pool.submit(served.post_image, "scan.mha", pointer, timeout=30) for _ in range(12)]
        cases = [
            pool.submit(served.post_case, dataset, ("img.nrrd", img), ("lab.mha", pointer), timeout=30)
            for _ in range(12)
        ]
        replies = [f.result() for f in infers + cases]
        elapsed = time.monotonic() - t0
    stop.set()
    poller.join()
    assert elapsed < 20, elapsed
    assert {r.status_code for r in replies} <= {422, 503}, [r.text for r in replies]
    assert any(r.status_code == 422 for r in replies)
    assert health_times and max(health_times) < 2.0
    # the queue is free again: a real image is segmented
    assert served.post_image("img.nrrd", img).status_code == 200


def test_stored_cases_are_reencoded_and_checked_again_before_evaluation(served, good, dataset):
    img, lab = good
    marked = img.replace(b"\n\n", b"\nacecal-marker:=never stored\n\n", 1)  # an NRRD key/value in the upload
    r = served.post_case(dataset, ("img.nrrd", marked), ("lab.nrrd", lab))
    assert r.status_code == 201, r.text
    case = r.json()["case_id"]
    folder = served.data / "datasets" / dataset
    stored_img, stored_lab = folder / "images" / f"{case}.nii.gz", folder / "labels" / f"{case}.nii.gz"
    assert stored_img.read_bytes()[:2] == b"\x1f\x8b" and b"acecal-marker" not in stored_img.read_bytes()
    body = {"dataset": dataset}
    assert requests.post(f"{served.url}/evaluate/tiny-sphere", json=body, headers=AUTH, timeout=120).status_code == 200
    # a case stored by an older server, as uploaded: its file points elsewhere, or is a FIFO
    original = stored_lab.read_bytes()
    try:
        stored_lab.write_bytes(gz(nifti_header((16, 16, 16), magic=b"ni1\x00")))
        r = requests.post(f"{served.url}/evaluate/tiny-sphere", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 422 and "does not hold its voxel data" in r.json()["detail"], r.text
        stored_lab.unlink()
        os.mkfifo(stored_lab)
        r = requests.post(f"{served.url}/evaluate/tiny-sphere", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 422 and "FIFO" in r.json()["detail"], r.text
        assert r.elapsed.total_seconds() < 5 and str(served.data) not in r.text
    finally:
        stored_lab.unlink(missing_ok=True)
        stored_lab.write_bytes(original)
    assert served.post_image("img.nrrd", img).status_code == 200  # the device worker was never blocked
    requests.delete(f"{served.url}/datasets/{dataset}/cases/{case}", headers=AUTH, timeout=10)


# --- budgets ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, bomb",
    [
        ("bomb.nii.gz", lambda: nifti_gz_bomb((512, 512, 512), 512 << 20)),  # ~0.5 MB inflating to 512 MB
        ("bomb.nrrd", lambda: nrrd_gzip_bomb((512, 512, 512), 512 << 20)),
    ],
)
def test_gzip_bombs_are_refused_from_their_header_with_memory_bounded(served, good, dataset, name, bomb):
    blob = bomb()
    assert len(blob) < 1 << 20
    with served.peak_rss() as rss:
        r = served.post_image(name, blob)
    assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text
    detail = r.json()["detail"]
    assert "134,217,728 voxel values" in detail and f"{MAX_VOXELS:,}" in detail and "ACECAL_MAX_VOXELS" in detail
    assert rss["growth"] < RSS_BOUND, rss
    with served.peak_rss() as rss:
        r = served.post_case(dataset, (name, blob), ("lab.nrrd", good[1]))
    assert r.status_code == 413 and "max_voxels" in r.json()["detail"], r.text
    assert rss["growth"] < RSS_BOUND, rss
    assert served.healthy() and served.leftovers() == []


def test_a_small_header_never_lets_the_rest_of_a_bomb_inflate(served):
    """16^3 announced, 512 MB of zeros behind it: read as the 16^3 volume it says it is."""
    blob = nifti_gz_bomb((16, 16, 16), 512 << 20)
    with served.peak_rss() as rss:
        r = served.post_image("small.nii.gz", blob)
    assert r.status_code == 200, r.text
    assert r.json()["grid"]["size"] == [16, 16, 16]
    assert rss["growth"] < RSS_BOUND, rss
    assert r.elapsed.total_seconds() < 30


@pytest.mark.parametrize("spacing", [50.0, 1e30])
def test_huge_spacing_is_refused_before_resampling(served, good, dataset, spacing):
    arr = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    blob = encode_nrrd(arr, Grid((4, 4, 4), (spacing,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    r = served.post_image("wide.nrrd", blob)
    assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text
    assert "max_model_voxels" in r.json()["detail"] and "ACECAL_MAX_MODEL_VOXELS" in r.json()["detail"]
    assert r.elapsed.total_seconds() < 5
    label = encode_nrrd(
        np.zeros((4, 4, 4), np.uint8), Grid((4, 4, 4), (spacing,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    )
    r = served.post_case(dataset, ("wide.nrrd", blob), ("wide-label.nrrd", label))
    assert r.status_code == 413 and "max_model_voxels" in r.json()["detail"], r.text


# --- no 500 from input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3e38, -3e38])
def test_values_that_overflow_the_normalisation_are_422_and_leave_no_result(served, value):
    arr = np.zeros((16, 16, 16), np.float32)
    arr[::2] = value
    arr[1::2] = -value
    before = served.results()
    r = served.post_image("huge.nrrd", encode_nrrd(arr, Grid.from_zyx_shape(arr.shape)))
    assert r.status_code == 422 and "NaN or infinity" in r.json()["detail"], r.text
    assert served.results() == before and served.healthy()


@pytest.mark.parametrize(
    "params", ['{"band_mm": 1000}', '{"band_voxels": 1000}', '{"band_mm": 1000, "uncertainty_threshold": 1}']
)
def test_huge_bands_are_bounded(served, good, params):
    r = served.post_image("img.nrrd", good[0], params=params)
    assert r.status_code == 200, r.text
    assert r.elapsed.total_seconds() < 30
    assert served.post_image("img.nrrd", good[0], params='{"band_mm": 1e6}').status_code == 422


def test_deep_nesting_is_422_not_a_crash(served, good, dataset):
    deep = "[" * 100_000 + "]" * 100_000
    r = served.post_image("img.nrrd", good[0], params="[" * 30_000 + "]" * 30_000)  # within the 64 KB field cap
    assert r.status_code == 422 and "nests" in r.json()["detail"], r.text
    r = served.post_image("img.nrrd", good[0], params=deep)
    assert r.status_code == 422 and "longer than 64 KB" in r.json()["detail"], r.text
    for path, body in (
        ("/datasets", '{"name": ' + deep + "}"),
        (
            "/finetune",
            '{"base_model": "tiny-sphere", "dataset": "' + dataset + '", "loss_params": {"a": ' + deep + "}}",
        ),
        ("/evaluate/tiny-sphere", '{"dataset": ' + deep + "}"),
    ):
        r = requests.post(
            served.url + path, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=10
        )
        assert r.status_code == 422 and "nests" in r.json()["detail"], (path, r.text)
    r = requests.post(
        served.url + "/datasets",
        data=b'{"name": "' + b"x" * (2 << 20) + b'"}',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and "JSON requests may be at most 1 MB" in r.json()["detail"]
    r = requests.post(served.url + "/finetune", files={"x": ("x.bin", bytes(2 << 20))}, headers=AUTH, timeout=10)
    assert r.status_code == 413, r.text  # a multipart body to a JSON route gets the JSON cap, not the upload cap
    assert served.healthy()


@pytest.mark.parametrize(
    "patch, message",
    [
        ([0, 0, 0], "greater than or equal to 1"),
        ([-1, -1, -1], "greater than or equal to 1"),
        ([100000] * 3, "less than or equal to 512"),
        ([25, 24, 24], "divisible by 2"),
    ],
)
def test_bad_patch_sizes_are_refused_at_submission(served, dataset, patch, message):
    jobs = requests.get(served.url + "/jobs", headers=AUTH, timeout=10).json()["jobs"]
    r = requests.post(
        served.url + "/finetune",
        json={"base_model": "tiny-sphere", "dataset": dataset, "patch_size": patch},
        headers=AUTH,
        timeout=10,
    )
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert requests.get(served.url + "/jobs", headers=AUTH, timeout=10).json()["jobs"] == jobs  # nothing queued


# --- key before body --------------------------------------------------------------------------------------------------
def _raw_post(url: str, path: str, headers: dict, first: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send the request line, ``headers`` and only the ``first`` bytes of the body; return the reply (status, body)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        )
        s.sendall(head.encode() + first)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            [ln.split(b":")[1] for ln in head_part.split(b"\r\n") if ln.lower().startswith(b"content-length")][0]
        )
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(head_part.split(b" ")[1]), rest


def test_bodies_without_the_key_are_refused_before_they_are_read(served):
    big = 200 << 20  # declared, never sent: the reply must come after the headers alone
    multipart = {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(big)}
    first = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.nrrd"\r\n\r\n' + bytes(64 << 10)
    with served.peak_rss() as rss:
        t0 = time.monotonic()
        status, body = _raw_post(served.url, "/infer/tiny-sphere", multipart, first)
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
        status, body = _raw_post(
            served.url, "/datasets", {"Content-Type": "application/json", "Content-Length": str(big)}, b'{"name": "'
        )
        assert status == 401
        status, body = _raw_post(
            served.url, "/infer/tiny-sphere", {**multipart, "Authorization": "Bearer wrong"}, first
        )
        assert status == 401 and b"refused" in body
        assert time.monotonic() - t0 < 5
    assert rss["growth"] < 20 << 20 and served.leftovers() == []
    # with the key: an unknown model is 404 before the body is read
    status, body = _raw_post(
        served.url, "/infer/no-such-model", {**multipart, **AUTH, "Content-Length": str(32 << 20)}, first
    )
    assert status == 404 and json.loads(body)["error"] == "model_not_found"
    assert served.healthy()


def test_uploads_stream_into_the_data_directory_only(served):
    """A 4 MB upload sent in two halves: while it arrives, the server writes it under <data>/tmp and holds no file in
    the system temporary folder (TMPDIR points to an empty folder for this server)."""
    arr = np.random.default_rng(3).random((100, 100, 100)).astype(np.float32)
    nrrd = encode_nrrd(arr, Grid.from_zyx_shape(arr.shape))
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.nrrd"\r\n\r\n' + nrrd + b"\r\n--b--\r\n"
    u = urlparse(served.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(
            (
                f"POST /infer/tiny-sphere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        deadline = time.monotonic() + 10
        while not served.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        partial = served.leftovers()
        assert partial, "the upload is not being written into the data directory"
        open_files = [f.path for f in served.process.open_files()]
        assert any(str(served.data / "tmp") in p for p in open_files), open_files
        assert not any(str(served.root / "systmp") in p for p in open_files), open_files
        while partial[0].stat().st_size < (1 << 20) and time.monotonic() < deadline:  # the first half, as it lands
            time.sleep(0.05)
        assert partial[0].stat().st_size >= (1 << 20)
        s.sendall(body[len(body) // 2 :])
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(65536)
        assert reply.split(b" ")[1] == b"200", reply[:300]
    time.sleep(0.2)
    assert served.leftovers() == []
    assert list((served.root / "systmp").glob("tmp*")) == []


# --- messages and names -----------------------------------------------------------------------------------------------
def test_messages_carry_no_server_path_and_few_values(served, good, dataset, tmp_path):
    img, lab = good
    many = np.arange(16**3, dtype=np.int32).reshape(16, 16, 16) % 251  # 251 label values
    label = encode_nrrd(many, Grid.from_zyx_shape(many.shape))
    r = served.post_case(dataset, ("img.nrrd", img), ("many.nrrd", label))
    detail = r.json()["detail"]
    assert r.status_code == 422 and "label values [2, 3, 4, 5, 6, ...] (249 values)" in detail, detail
    assert str(served.data) not in detail and "upload-" not in detail
    broken = mha_pointer("LOCAL", size=(16, 16, 16)) + b"\x00" * 100  # the header promises 8 KB, 100 bytes follow
    r = served.post_image("broken.mha", broken)
    assert r.status_code == 422 and str(served.data) not in r.text and "upload-" not in r.text, r.text


def test_dataset_names_are_cleaned_and_inert_in_cards(served):
    r = requests.post(
        served.url + "/datasets", json={"name": "a\x00b\r\nc\u202e<script>alert(1)</script>"}, headers=AUTH, timeout=10
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "a?b??c?<script>alert(1)</script>"
    r = requests.post(served.url + "/datasets", json={"name": "\u202e\x00"}, headers=AUTH, timeout=10)
    assert r.status_code == 201 and r.json()["name"] == "??"
    r = requests.post(served.url + "/datasets", json={"name": "   "}, headers=AUTH, timeout=10)
    assert r.status_code == 422

    from acecal.bundles import BundleConfig
    from acecal.bundles.card import model_card

    bc = BundleConfig(
        id="x",
        labels={"0": "background", "1": "sphere"},
        description="fine-tuned on dataset '<script>alert(1)</script> [x](javascript:alert(1))'",
        training={"data": {"source": "dataset '<img src=x onerror=alert(1)>'\r\n# injected"}},
    )
    card = model_card(bc)
    assert "<script>" not in card and "<img" not in card and "\n# injected" not in card
    assert "&lt;script&gt;" in card and "\\[x\\](javascript:alert(1))" in card


def test_retry_after_is_robust_to_outliers():
    from acecal.api.queue import InferenceQueue

    q = InferenceQueue(queue_size=0, workers=1)
    try:
        q._durations.extend([2.0, 2.1, 1.9, 3600.0, 0.001])  # one hour-long request, one instant refusal
        q._in_flight = 1
        assert q._retry_after() == pytest.approx(2.0)
        q._durations.clear()
        q._durations.extend([5000.0] * 5)
        assert q._retry_after() == 600.0
    finally:
        q.shutdown()


# --- out of memory ----------------------------------------------------------------------------------------------------
def test_running_out_of_memory_is_413_and_leaves_nothing(tiny_bundle, tmp_path, good):
    """With the model-space budget off, 4^3 voxels of 10 m resample to ~6e13 voxels: the allocation fails, the reply
    is 413 and the server carries on."""
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent], max_model_voxels=10**18)
    with LiveServer(settings) as s:
        arr = np.random.default_rng(1).random((4, 4, 4)).astype(np.float32)
        blob = encode_nrrd(arr, Grid((4, 4, 4), (1e4,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
        r = requests.post(s.url + "/infer/tiny-sphere", files={"image": ("far.nrrd", blob)}, timeout=60)
        assert r.status_code == 413 and "too large for this server's memory" in r.json()["detail"], r.text
        assert list((settings.data_dir / "results").iterdir()) == []
        assert list(settings.tmp_dir.iterdir()) == []
        r = requests.post(s.url + "/infer/tiny-sphere", files={"image": ("img.nrrd", good[0])}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_memory_error_releases_the_failed_attempt_before_the_413():
    """The 413 holds no reference to the MemoryError's traceback, so the arrays of the failed attempt are freed while
    the reply is still being sent (a 413 raised inside the except clause would keep them alive through its context)."""
    import weakref

    from acecal.errors import PayloadTooLargeError
    from acecal.inference.memory import memory_bounded

    refs = []

    def attempt():
        partial = np.ones(1 << 20)  # what the failed attempt had allocated
        refs.append(weakref.ref(partial))
        raise RuntimeError("applying transform Spacingd") from RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 864086402880032 bytes"
        )

    with pytest.raises(PayloadTooLargeError) as e:
        memory_bounded(attempt, "the image 'far.nrrd'")
    assert e.value.__context__ is None and e.value.__cause__ is None
    assert refs[0]() is None  # freed while the 413 is alive
    assert "the image 'far.nrrd' is too large for this server's memory" in e.value.detail
