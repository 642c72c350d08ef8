"""Dataset discovery, validation (each problem names its case) and the deterministic split."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_case, make_dataset, write_case

from acecal.data.datasets import (
    Case,
    DatasetError,
    discover_dataset,
    discover_folders,
    split_cases,
    validate_cases,
)


def _write(arr_zyx, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_folder_dataset_in_every_format_validates(tmp_path, suffix):
    root = make_dataset(tmp_path, 3, shape_zyx=(12, 12, 12), suffix=suffix, num_classes=3)
    info = discover_dataset(root)
    assert info.kind == "folders" and [c.name for c in info.cases] == ["case_000", "case_001", "case_002"]
    summ = validate_cases(info.cases, 3)
    assert [s.shape_xyz for s in summ] == [(12, 12, 12)] * 3
    assert all(set(s.label_values) <= {0, 1, 2} for s in summ)


def test_msd_dataset_json(tmp_path):
    js = make_dataset(tmp_path, 2, layout="msd", shape_zyx=(12, 12, 12))
    for arg in (js, tmp_path):  # the file or its folder
        info = discover_dataset(arg)
        assert info.kind == "msd" and info.labels == {"0": "background", "1": "sphere"} and info.licence == "CC0"
        assert all(c.label and c.label.endswith(".nii.gz") for c in info.cases)
    validate_cases(info.cases, 2)


def test_msd_json_problems(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DatasetError, match="no 'training' list"):
        discover_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        discover_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]})
    )
    with pytest.raises(DatasetError, match="a: the image file 'a.nii.gz' is empty or missing"):
        validate_cases(discover_dataset(tmp_path).cases, 2)


def test_every_problem_is_reported_with_its_case(tmp_path):
    root = make_dataset(tmp_path, 6, shape_zyx=(12, 12, 12))
    img, lab = root / "images", root / "labels"
    (lab / "case_000.nii.gz").unlink()  # missing label
    bad = sitk.GetArrayFromImage(sitk.ReadImage(str(lab / "case_001.nii.gz")))
    bad[0, 0, 0] = 3
    _write(bad, lab / "case_001.nii.gz")  # unknown label value
    _write(np.zeros((10, 12, 12), np.uint8), lab / "case_002.nii.gz")  # grid size differs
    _write(np.zeros((12, 12, 12), np.uint8), lab / "case_003.nii.gz", spacing=(1.0, 1.0, 2.0))  # spacing differs
    _write(np.zeros((12, 12, 12), np.uint8), lab / "case_004.nii.gz", origin=(0.0, 5.0, 0.0))  # origin differs
    flat = sitk.GetImageFromArray(np.zeros((12, 12), np.float32))
    sitk.WriteImage(flat, str(img / "case_005.nii.gz"))  # 2-D image
    info = discover_dataset(root)
    with pytest.raises(DatasetError) as e:
        validate_cases(info.cases, 2)
    probs = e.value.problems
    assert len(probs) == 6, probs
    msg = str(e.value)
    assert "case_000: missing label" in msg
    assert "case_001: label values [3] are unknown to the model (it knows 0..1)" in msg
    assert "case_002: image and label grids differ: image size 12x12x12, label size 12x12x10" in msg
    assert "case_003: image and label grids differ in spacing" in msg
    assert "case_004: image and label grids differ in origin" in msg
    assert "case_005:" in msg and "2-D" in msg
    assert e.value.code == "invalid_dataset" and e.value.http_status == 422


def test_empty_dataset_and_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    info = discover_dataset(tmp_path)
    with pytest.raises(DatasetError, match="the dataset is empty"):
        validate_cases(info.cases, 2)
    with pytest.raises(DatasetError, match="does not exist"):
        discover_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no dataset.json and no images/"):
        discover_dataset(tmp_path / "images")
    with pytest.raises(DatasetError, match="images folder"):
        discover_folders(tmp_path / "x", tmp_path / "labels")


def test_label_without_image_and_label_types(tmp_path):
    root = make_dataset(tmp_path, 2, shape_zyx=(12, 12, 12))
    case = make_case((12, 12, 12), seed=1)
    write_case(case, tmp_path / "elsewhere.nii.gz", root / "labels" / "orphan.nii.gz")
    with pytest.raises(DatasetError, match="orphan: label orphan.nii.gz has no image"):
        discover_dataset(root)
    (root / "labels" / "orphan.nii.gz").unlink()
    # float labels holding whole numbers are fine (two MSD hippocampus labels are float32); fractions are not
    _write(case.label.astype(np.float32), root / "labels" / "case_000.nii.gz")
    validate_cases(discover_dataset(root).cases, 2)
    _write(case.label.astype(np.float32) * 0.5, root / "labels" / "case_000.nii.gz")
    with pytest.raises(DatasetError, match="case_000: the label map has non-integer values"):
        validate_cases(discover_dataset(root).cases, 2)


def test_split_is_deterministic_and_recorded():
    cases = [Case(f"c{i:02d}", f"/x/c{i:02d}.nii.gz", f"/y/c{i:02d}.nii.gz") for i in range(10)]
    tr1, va1 = split_cases(cases, val_fraction=0.2, seed=7)
    tr2, va2 = split_cases(list(reversed(cases)), val_fraction=0.2, seed=7)
    assert [c.name for c in va1] == [c.name for c in va2] and len(va1) == 2 and len(tr1) == 8
    assert not {c.name for c in va1} & {c.name for c in tr1}
    _, va3 = split_cases(cases, val_fraction=0.2, seed=8)
    assert [c.name for c in va3] != [c.name for c in va1]
    tr, va = split_cases(cases, val_cases=["c03", "c01"])
    assert [c.name for c in va] == ["c01", "c03"] and len(tr) == 8
    assert split_cases(cases, val_fraction=0.0)[1] == []
    with pytest.raises(DatasetError, match="not in the dataset: c99"):
        split_cases(cases, val_cases=["c99"])
    with pytest.raises(DatasetError, match="no training cases"):
        split_cases(cases[:1], val_cases=["c00"])
