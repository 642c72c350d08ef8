"""Stored datasets over HTTP: good cases are kept, every bad case is refused on arrival with a 4xx naming the problem,
files get server-chosen names, deletion removes rows and files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from synthetic import make_case, write_case

from acecal.client import ACEClient, InvalidInputError, NotFoundError


def _post_case(url, ds, image: tuple, label: tuple, **form):
    r = requests.post(f"{url}/datasets/{ds}/cases", files={"image": image, "label": label}, data=form, timeout=60)
    return r


def _files(tmp_path, case=None, img_name="img.nii.gz", lab_name="lab.nii.gz"):
    case = case or make_case((16, 16, 16), seed=3)
    write_case(case, tmp_path / img_name, tmp_path / lab_name)
    return (tmp_path / img_name).read_bytes(), (tmp_path / lab_name).read_bytes()


def _write(tmp_path, name, array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    p = tmp_path / name
    sitk.WriteImage(img, str(p))
    return p.read_bytes()


def test_good_case_is_stored_under_a_server_chosen_name(ft_server, tmp_path):
    url = ft_server.url
    r = requests.post(f"{url}/datasets", json={"name": "upload checks"}, timeout=10)
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    img, lab = _files(tmp_path)
    r = _post_case(url, ds, ("../../../etc/evil name.nii.gz", img), ("..\\x.nii.gz", lab))
    assert r.status_code == 201, r.text
    case = r.json()
    assert case["name"] == "evil name" and case["label_values"] == [0, 1] and case["size"] == [16, 16, 16]
    stored = list((ft_server.settings.data_dir / "datasets" / ds).rglob("*.nii.gz"))
    assert sorted(p.name for p in stored) == [f"{case['case_id']}.nii.gz"] * 2  # images/ and labels/
    got = requests.get(f"{url}/datasets/{ds}", timeout=10).json()
    assert (
        got["id"] == ds and got["name"] == "upload checks" and [c["case_id"] for c in got["cases"]] == [case["case_id"]]
    )
    assert ds in [d["id"] for d in requests.get(f"{url}/datasets", timeout=10).json()["datasets"]]
    assert requests.get(f"{url}/datasets/{ds}/cases/{case['case_id']}", timeout=10).json()["name"] == "evil name"


def _bad_cases(tmp_path):
    good = make_case((16, 16, 16), seed=4)
    img, lab = _files(tmp_path, good)
    nan = good.image.copy()
    nan[2, 2, 2] = np.nan
    float_label = good.label.astype(np.float32) * 0.5
    three = good.label.copy()
    three[0, 0, 0] = 2
    yield "not an image", ("notes.txt", b"hello, I am not a volume"), ("lab.nii.gz", lab), "not a recognised image type"
    yield "empty label", ("img.nii.gz", img), ("lab.nii.gz", b""), "label file 'lab.nii.gz' is empty"
    yield (
        "2-D image",
        ("flat.nii.gz", _write(tmp_path, "flat.nii.gz", np.zeros((16, 16), np.float32))),
        ("lab.nii.gz", lab),
        "2-D",
    )
    yield "truncated", ("cut.nii", _write(tmp_path, "cut.nii", good.image)[:-500]), ("lab.nii.gz", lab), "truncated"
    yield "NaN voxels", ("nan.mha", _write(tmp_path, "nan.mha", nan)), ("lab.nii.gz", lab), "NaN"  # NIfTI drops NaN
    yield (
        "grids differ in size",
        ("img.nii.gz", img),
        ("small.nii.gz", _write(tmp_path, "small.nii.gz", good.label[:8])),
        "grids differ",
    )
    yield (
        "grids differ in spacing",
        ("img.nii.gz", img),
        ("sp.nii.gz", _write(tmp_path, "sp.nii.gz", good.label, spacing=(1.0, 1.0, 2.0))),
        "differ in spacing",
    )
    yield (
        "non-integer labels",
        ("img.nii.gz", img),
        ("f.nii.gz", _write(tmp_path, "f.nii.gz", float_label)),
        "non-integer",
    )
    yield (
        "label unknown to the model",
        ("img.nii.gz", img),
        ("three.nii.gz", _write(tmp_path, "three.nii.gz", three)),
        "label values [2] are unknown to the model",
    )


def test_bad_cases_are_refused_with_a_message_naming_the_problem(ft_server, tmp_path):
    url = ft_server.url
    ds = requests.post(f"{url}/datasets", json={"name": "bad", "model": "tiny-sphere"}, timeout=10).json()["id"]
    for what, image, label, message in _bad_cases(tmp_path):
        r = _post_case(url, ds, image, label)
        assert r.status_code == 422, (what, r.status_code, r.text)
        body = r.json()
        assert body["error"] in ("invalid_input", "invalid_case") and message in body["detail"], (what, body)
        assert "upload-" not in body["detail"], body  # the user's file names, not the server's
    # a label missing from the form, an unknown dataset, an unknown model
    img, lab = _files(tmp_path)
    r = requests.post(f"{url}/datasets/{ds}/cases", files={"image": ("img.nii.gz", img)}, timeout=10)
    assert r.status_code == 422 and "label" in r.json()["detail"]
    r = _post_case(url, "ds_000000000000", ("img.nii.gz", img), ("lab.nii.gz", lab))
    assert r.status_code == 404 and r.json()["error"] == "dataset_not_found"
    r = requests.post(f"{url}/datasets", json={"name": "x", "model": "no-such-model"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "model_not_found"
    r = _post_case(url, ds, ("img.nii.gz", img), ("lab.nii.gz", lab), model="no-such-model")
    assert r.status_code == 404
    # nothing of the refused cases was kept, and no temporary upload is left
    assert requests.get(f"{url}/datasets/{ds}", timeout=10).json()["cases"] == []
    assert not list((ft_server.settings.data_dir / "datasets" / ds).rglob("*.*"))
    assert list(ft_server.settings.tmp_dir.glob("upload-*")) == []


def test_label_values_are_checked_against_a_model_given_with_the_upload(ft_server, tmp_path):
    url = ft_server.url
    ds = requests.post(f"{url}/datasets", json={"name": "no model"}, timeout=10).json()["id"]
    case = make_case((16, 16, 16), num_classes=3, seed=5)
    img, lab = _files(tmp_path, case)
    r = _post_case(url, ds, ("img.nii.gz", img), ("lab.nii.gz", lab))
    assert r.status_code == 201 and r.json()["label_values"] == [0, 1, 2]  # no model: any class numbers 0..255
    r = _post_case(url, ds, ("img.nii.gz", img), ("lab.nii.gz", lab), model="tiny-sphere")
    assert r.status_code == 422 and "label values [2]" in r.json()["detail"] and "1=sphere" in r.json()["detail"]


def test_client_uploads_arrays_and_folders_and_deletes(ft_server, tmp_path, cases_dir):
    root = ft_server.settings.data_dir / "datasets"
    with ACEClient(ft_server.url) as c:
        ds = c.create_dataset("from arrays", model="tiny-sphere")
        case = make_case((16, 16, 16), seed=6)
        from acecal.geometry import Grid

        grid = Grid((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
        added = c.add_case(ds["id"], (case.image, grid), (case.label, grid), name="slicer pair")
        assert added["name"] == "slicer pair" and added["label_values"] == [0, 1]
        with pytest.raises(InvalidInputError, match="grids differ"):
            c.add_case(
                ds["id"],
                (case.image, grid),
                (case.label[:8], Grid((16, 16, 8), grid.spacing, grid.origin, grid.direction)),
            )
        # a folder pair: a label without an image is reported before anything is sent
        bad = tmp_path / "bad"
        (bad / "images").mkdir(parents=True)
        (bad / "labels").mkdir()
        (bad / "labels" / "orphan.nii.gz").write_bytes(b"x")
        with pytest.raises(InvalidInputError, match="orphan.nii.gz: a label without an image"):
            c.upload_dataset(bad / "images", bad / "labels", name="never created")
        assert "never created" not in [d["name"] for d in c.datasets()]
        full = c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="folders")
        assert full["num_cases"] == 4 and sorted(x["name"] for x in full["cases"]) == [f"case_00{i}" for i in range(4)]
        # delete a case, then the dataset: rows and files go
        c.delete_case(full["id"], full["cases"][0]["case_id"])
        assert c.dataset(full["id"])["num_cases"] == 3
        assert len(list((root / full["id"] / "images").iterdir())) == 3
        c.delete_dataset(full["id"])
        with pytest.raises(NotFoundError):
            c.dataset(full["id"])
        assert not (root / full["id"]).exists()
        with pytest.raises(NotFoundError):
            c.delete_dataset(full["id"])


def test_orphans_of_an_interrupted_upload_are_removed_at_start(tiny_bundle, tmp_path):
    """A file moved into place whose row was never committed (a crash in between) is not a case, and goes."""
    from live_server import LiveServer, make_settings

    settings = make_settings(tmp_path / "data", [tiny_bundle.parent])
    with LiveServer(settings) as s:
        with ACEClient(s.url) as c:
            ds = c.create_dataset("survivor")["id"]
            img, lab = _files(tmp_path)
            c.add_case(ds, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    orphan = settings.data_dir / "datasets" / ds / "images" / "c_deadbeef0000.nii.gz"
    orphan.write_bytes(gzip.compress(b"half a case"))
    ghost = settings.data_dir / "datasets" / "ds_0123456789ab"
    ghost.mkdir()
    with LiveServer(settings) as s:
        with ACEClient(s.url) as c:
            assert c.dataset(ds)["num_cases"] == 1
    assert not orphan.exists() and not ghost.exists()
    assert len(list((settings.data_dir / "datasets" / ds / "images").iterdir())) == 1
