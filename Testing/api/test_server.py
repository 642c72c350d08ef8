"""The server over real HTTP: health, models, inference on an oblique grid, results lifecycle, OpenAPI."""

import json
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from live_server import LiveServer, make_settings
from oblique import oblique_case
from slow_model import copy_bundle
from synthetic import dice, make_case, write_case

from acecal import __version__
from acecal.api.schemas import InferResponse
from acecal.data.io import grid_of, write_volume
from acecal.geometry import lps_to_ras
from acecal.nrrd import read_nrrd


def post_image(url, path, model="tiny-sphere", params=None, name=None, **kw):
    data = {"params": json.dumps(params)} if params is not None else None
    with open(path, "rb") as fh:
        return requests.post(
            f"{url}/infer/{model}", files={"image": (name or path.name, fh)}, data=data, timeout=120, **kw
        )


def test_health_is_open_and_describes_the_server(server):
    r = requests.get(server.url + "/health", timeout=5)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["version"] == __version__ and h["device"] == "cpu"
    assert h["auth_required"] is False and h["result_ttl_s"] == 3600
    assert h["queue"]["capacity"] == 9 and h["queue"]["workers"] == 1


def test_models_lists_the_bundle(server):
    r = requests.get(server.url + "/models", timeout=5)
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m["id"] == "tiny-sphere" and m["labels"] == {"0": "background", "1": "sphere"}
    assert m["loss"] == "baseline_dice_ce" and m["metrics"]["dice"] > 0.9
    assert 0 < m["uncertainty_threshold"] <= 1
    one = requests.get(server.url + "/models/tiny-sphere", timeout=5).json()
    assert one == m
    card = requests.get(server.url + "/models/tiny-sphere/card", timeout=5)
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
    assert "tiny-sphere" in card.text


def test_oblique_anisotropic_offset_volume_round_trip(server, tmp_path, assert_no_temp_files):
    image, label, grid, centre = oblique_case(seed=7)
    path = write_volume(image, grid, tmp_path / "oblique.nii.gz")
    r = post_image(server.url, path)
    assert r.status_code == 200, r.text
    res = r.json()
    InferResponse.model_validate(res)  # replies are sent without re-validation: hold them to the schema here
    assert res["model_id"] == "tiny-sphere" and len(res["result_id"]) == 32
    assert res["labels"] == {"0": "background", "1": "sphere"}
    g = res["grid"]
    assert g["size"] == list(grid.size)
    np.testing.assert_allclose(g["spacing"], grid.spacing, atol=1e-6)
    np.testing.assert_allclose(g["origin"], grid.origin, atol=1e-6)
    np.testing.assert_allclose(g["direction"], grid.direction, atol=1e-6)
    vols = {}
    for name, dtype in (
        ("labels", sitk.sitkUInt8),
        ("confidence", sitk.sitkFloat32),
        ("uncertainty", sitk.sitkFloat32),
        ("flags", sitk.sitkUInt8),
    ):
        f = requests.get(server.url + res["files"][name], timeout=30)
        assert f.status_code == 200 and f.headers["content-type"] == "application/octet-stream"
        (tmp_path / f"{name}.nrrd").write_bytes(f.content)
        img = sitk.ReadImage(str(tmp_path / f"{name}.nrrd"))
        assert img.GetPixelID() == dtype, name
        assert grid_of(img).same_as(grid, atol=1e-6), name  # exactly the input's grid
        vols[name] = sitk.GetArrayFromImage(img)
    assert dice(vols["labels"], label) > 0.85
    conf, unc, flags = vols["confidence"], vols["uncertainty"], vols["flags"]
    assert conf.min() >= 0.5 - 1e-5 and conf.max() <= 1 + 1e-5 and unc.min() >= 0 and unc.max() <= 1
    assert set(np.unique(flags)) <= {0, 1}
    thr = res["params"]["uncertainty_threshold"]
    assert (conf[flags == 1] < thr).all()
    s = res["summary"]
    assert s["uncertain_voxels"] == int(flags.sum()) == sum(reg["voxels"] for reg in res["regions"])
    sphere = s["classes"][1]
    assert sphere["voxels"] == int((vols["labels"] == 1).sum())
    assert sphere["volume_ml"] == pytest.approx(sphere["voxels"] * np.prod(grid.spacing) / 1000)
    for reg in res["regions"]:
        assert reg["class"] == 1 and reg["class_name"] == "sphere"
        np.testing.assert_allclose(reg["centroid_ras"], lps_to_ras(reg["centroid_lps"]))
        # regions lie on the sphere's surface: their centroid is near the sphere, in physical LPS
        assert np.linalg.norm(np.asarray(reg["centroid_lps"]) - centre) < 5.0 + 3.0
    # the numpy reader sees the same thing as SimpleITK
    assert read_nrrd(tmp_path / "labels.nrrd").grid.same_as(grid, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_each_file_type_is_accepted(server, tmp_path, suffix, assert_no_temp_files):
    case = make_case((20, 20, 20), seed=21)
    write_case(case, tmp_path / f"c{suffix}")
    r = post_image(
        server.url,
        tmp_path / f"c{suffix}",
        params={"uncertainty_threshold": 0.99, "band_mm": 2.0, "min_region_voxels": 1, "connectivity": 6},
    )
    assert r.status_code == 200, r.text
    p = r.json()["params"]
    assert p["uncertainty_threshold"] == 0.99 and p["band_mm"] == 2.0 and p["connectivity"] == 6
    requests.delete(server.url + f"/results/{r.json()['result_id']}", timeout=5)


def test_file_type_is_sniffed_and_the_upload_name_never_reaches_the_disk(server, tmp_path, assert_no_temp_files):
    case = make_case((16, 16, 16), seed=2)
    write_case(case, tmp_path / "c.nrrd")
    evil = "../../../../tmp/evil\x00name"
    r = post_image(server.url, tmp_path / "c.nrrd", name=evil)
    assert r.status_code == 200, r.text  # no usable suffix: recognised as NRRD from its first bytes
    data_dir = server.settings.data_dir
    names = [p.name for p in data_dir.rglob("*")]
    assert not any("evil" in n for n in names)
    assert not any("evil" in p.name for p in data_dir.parent.iterdir())


def test_results_can_be_fetched_again_and_deleted(server, tmp_path):
    case = make_case((16, 16, 16), seed=3)
    write_case(case, tmp_path / "c.nrrd")
    res = post_image(server.url, tmp_path / "c.nrrd").json()
    rid = res["result_id"]
    again = requests.get(server.url + f"/results/{rid}", timeout=5)
    assert again.status_code == 200
    body = again.json()
    InferResponse.model_validate(body)
    assert body["summary"] == res["summary"] and body["files"] == res["files"]
    assert 0 < body["expires_in_s"] <= 3600
    d = requests.delete(server.url + f"/results/{rid}", timeout=5)
    assert d.status_code == 200 and d.json() == {"result_id": rid, "deleted": True}
    for path in (f"/results/{rid}", f"/results/{rid}/files/labels"):
        r = requests.get(server.url + path, timeout=5)
        assert r.status_code == 404 and r.json()["error"] == "result_not_found"
    assert requests.delete(server.url + f"/results/{rid}", timeout=5).status_code == 404


def test_results_expire(tiny_bundle, tmp_path):
    case = make_case((16, 16, 16), seed=4)
    write_case(case, tmp_path / "c.nrrd")
    with LiveServer(make_settings(tmp_path / "data", [tiny_bundle.parent], result_ttl_s=1.0)) as s:
        res = post_image(s.url, tmp_path / "c.nrrd").json()
        assert res["expires_in_s"] == pytest.approx(1.0, abs=0.5)
        time.sleep(1.2)
        r = requests.get(s.url + f"/results/{res['result_id']}", timeout=5)
        assert r.status_code == 404 and "expired" in r.json()["detail"]
        deadline = time.monotonic() + 5  # the sweeper removes expired folders on its own
        while s.state.results.count() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.state.results.count() == 0


def test_unknown_endpoints_and_methods_answer_json(server):
    r = requests.get(server.url + "/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = requests.put(server.url + "/health", timeout=5)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = requests.post(server.url + "/results/" + "0" * 32, timeout=5)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}


def test_openapi_documents_every_endpoint_with_models(server):
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    paths = spec["paths"]
    for p in (
        "/health",
        "/models",
        "/models/{model_id}",
        "/infer/{model_id}",
        "/results/{result_id}",
        "/results/{result_id}/files/{name}",
    ):
        assert p in paths, p
    schemas = spec["components"]["schemas"]
    for name in ("HealthResponse", "ModelsResponse", "InferResponse", "Region", "ErrorResponse", "DeleteResponse"):
        assert name in schemas
    infer = paths["/infer/{model_id}"]["post"]
    assert infer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("InferResponse")
    for code in ("404", "413", "422", "503"):
        assert code in infer["responses"], code
    assert "multipart/form-data" in infer["requestBody"]["content"]


def test_the_calibrator_switch_is_use_calibrator_with_use_temperature_as_its_older_name(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    copy_bundle(tiny_bundle, models, "tiny-hot", temperature=2.0)  # a fitted global temperature: the calibrator
    case = make_case((24, 24, 24), seed=21)
    write_case(case, tmp_path / "c.nii.gz")
    with LiveServer(make_settings(tmp_path / "data", [models])) as s:
        replies = {}
        for name, params in {
            "default": None,
            "off": {"use_calibrator": False},
            "off, older name": {"use_temperature": False},
            "on wins": {"use_calibrator": True, "use_temperature": False},
        }.items():
            r = post_image(s.url, tmp_path / "c.nii.gz", model="tiny-hot", params=params)
            assert r.status_code == 200, (name, r.text)
            replies[name] = r.json()
    for name in ("default", "on wins"):
        reply = replies[name]
        assert reply["params"]["use_calibrator"] is reply["params"]["use_temperature"] is True, name
        assert reply["summary"]["calibrator"] == "temperature" and reply["summary"]["temperature"] == 2.0, name
    for name in ("off", "off, older name"):
        reply = replies[name]
        assert reply["params"]["use_calibrator"] is reply["params"]["use_temperature"] is False, name
        assert reply["summary"]["calibrator"] is None and reply["summary"]["temperature"] is None, name
    # T = 2 flattens the softmax: lower confidence, the same label map
    assert replies["default"]["summary"]["mean_confidence"] < replies["off"]["summary"]["mean_confidence"]
    assert [c["voxels"] for c in replies["default"]["summary"]["classes"]] == [
        c["voxels"] for c in replies["off"]["summary"]["classes"]
    ]
