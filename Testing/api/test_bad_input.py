"""Every kind of bad input gets a 4xx with {"error", "detail"}; the server carries on and leaves no temp files."""

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from live_server import LiveServer, make_settings
from synthetic import make_case, to_sitk, write_case

from acecal.geometry import Grid
from acecal.nrrd import encode_nrrd


def _nrrd(array, grid=None):
    return encode_nrrd(array, grid or Grid.from_zyx_shape(array.shape[:3]))


def _files(tmp_path):
    case = make_case((12, 12, 12), seed=9)
    write_case(case, tmp_path / "good.nii.gz")
    good = (tmp_path / "good.nii.gz").read_bytes()
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 12), np.float32)), str(tmp_path / "flat.nrrd"))
    sitk.WriteImage(sitk.Compose([to_sitk(case.image, case)] * 2), str(tmp_path / "two.nrrd"))
    nan = case.image.copy()
    nan[3, 4, 5] = np.nan
    one_slice = np.ones((1, 12, 12), np.float32)
    return {
        "empty": ("empty.nii.gz", b"", "empty"),
        "corrupt gzip": ("bad.nii.gz", b"\x1f\x8b" + b"garbage" * 20, "could not be read"),
        "truncated": ("cut.nii.gz", good[: len(good) // 2], "truncated"),
        "not an image": ("notes.txt", b"just some text", "not a recognised image type"),
        "detached header": ("x.nhdr", b"NRRD0004\n", "detached header"),
        "2-D": ("flat.nrrd", (tmp_path / "flat.nrrd").read_bytes(), "2-D"),
        "one slice": ("slice.nrrd", _nrrd(one_slice), "single slice"),
        "NaN": ("nan.nrrd", _nrrd(nan), "NaN"),
        "two channels": ("two.nrrd", (tmp_path / "two.nrrd").read_bytes(), "2 channel"),
    }


CASES = [
    "empty",
    "corrupt gzip",
    "truncated",
    "not an image",
    "detached header",
    "2-D",
    "one slice",
    "NaN",
    "two channels",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_images_get_422_with_a_message(server, tmp_path, case, assert_no_temp_files):
    name, blob, message = _files(tmp_path)[case]
    r = requests.post(server.url + "/infer/tiny-sphere", files={"image": (name, blob)}, timeout=60)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "invalid_input"
    assert message in body["detail"]
    assert "upload-" not in body["detail"]  # messages name the user's file, never the server's temp file
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "params, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"uncertainty_threshold": 1.5}', "uncertainty_threshold"),
        ('{"overlap": -0.1}', "overlap"),
        ('{"connectivity": 4}', "connectivity"),
        ('{"min_region_voxels": 0}', "min_region_voxels"),
        ('{"treshold": 0.5}', "treshold"),
    ],
)
def test_bad_params_get_422(server, tmp_path, params, message, assert_no_temp_files):
    case = make_case((12, 12, 12), seed=1)
    write_case(case, tmp_path / "c.nrrd")
    r = requests.post(
        server.url + "/infer/tiny-sphere",
        files={"image": ("c.nrrd", (tmp_path / "c.nrrd").read_bytes())},
        data={"params": params},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input" and message in r.json()["detail"]


def test_missing_image_and_malformed_multipart(server):
    r = requests.post(server.url + "/infer/tiny-sphere", data={"params": "{}"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"] == "invalid_input" and "image" in r.json()["detail"]
    r = requests.post(
        server.url + "/infer/tiny-sphere",
        data=b"--xyz\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        timeout=10,
    )
    assert 400 <= r.status_code < 500 and r.json()["error"] == "invalid_input"


def test_unknown_model_and_result_ids_are_404(server):
    r = requests.post(server.url + "/infer/no-such-model", files={"image": ("c.nrrd", b"x")}, timeout=10)
    assert r.status_code == 404
    assert r.json()["error"] == "model_not_found" and "tiny-sphere" in r.json()["detail"]
    assert requests.get(server.url + "/models/no-such-model", timeout=5).status_code == 404
    for rid in ("0" * 32, "not-an-id", "..%2F..%2Fetc"):
        for path in (f"/results/{rid}", f"/results/{rid}/files/labels"):
            r = requests.get(server.url + path, timeout=5)
            assert r.status_code == 404 and r.json()["error"] in ("result_not_found", "not_found"), path
        assert requests.delete(server.url + f"/results/{rid}", timeout=5).status_code == 404


def test_too_large_uploads_get_413(tiny_bundle, tmp_path):
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent], max_upload_mb=0.05)  # 52 kB
    big = _nrrd(np.zeros((32, 32, 32), np.float32))  # 131 kB
    with LiveServer(settings) as s:
        r = requests.post(s.url + "/infer/tiny-sphere", files={"image": ("big.nrrd", big)}, timeout=30)
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large" and "MB" in r.json()["detail"]

        def chunks():  # no Content-Length: refused while streaming
            body = (
                b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.nrrd"\r\n\r\n'
                + big
                + b"\r\n--b--\r\n"
            )
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        r = requests.post(
            s.url + "/infer/tiny-sphere",
            data=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            timeout=30,
        )
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        small = make_case((12, 12, 12), seed=2)
        write_case(small, tmp_path / "small.nrrd")
        r = requests.post(
            s.url + "/infer/tiny-sphere",
            files={"image": ("small.nrrd", (tmp_path / "small.nrrd").read_bytes())},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert list(s.settings.tmp_dir.iterdir()) == []
