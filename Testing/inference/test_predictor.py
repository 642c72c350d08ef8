"""Predictor and pipeline in-process on the tiny trained bundle: exact input grid, segmentation, temperature."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from oblique import oblique_case
from synthetic import dice, make_case, to_sitk, write_case

from acecal.bundles import Bundle
from acecal.data.io import grid_of, write_volume
from acecal.errors import InvalidInputError
from acecal.inference.pipeline import VOLUMES, InferenceOptions, run_inference, write_volumes
from acecal.inference.predictor import Predictor, PredictorCache


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(Bundle.load(tiny_bundle), "cpu")


def test_probabilities_on_the_input_grid_and_a_good_segmentation(predictor, tmp_path):
    case = make_case((24, 24, 24), seed=777, spacing=(1.0, 1.0, 1.0), origin=(5.0, -3.0, 12.0))
    write_case(case, tmp_path / "c.nii.gz")
    pred = predictor.predict(tmp_path / "c.nii.gz")
    assert pred.probs.shape == (2, 24, 24, 24) and pred.probs.dtype == np.float32
    np.testing.assert_allclose(pred.probs.sum(0), 1.0, atol=1e-5)
    assert pred.grid.same_as(grid_of(to_sitk(case.image, case)))
    assert dice(pred.probs.argmax(0), case.label) > 0.9


def test_oblique_anisotropic_offset_volume_comes_back_on_its_grid(predictor, tmp_path):
    image, label, grid, _ = oblique_case(seed=3)
    write_volume(image, grid, tmp_path / "oblique.nrrd")
    out = run_inference(predictor, tmp_path / "oblique.nrrd")
    assert out.grid.same_as(grid, atol=1e-9)
    for name, arr in out.volumes().items():
        assert arr.shape == grid.shape_zyx, name
    assert dice(out.labels, label) > 0.85
    # written volumes read back by SimpleITK on exactly the same grid
    paths = write_volumes(tmp_path / "out", out)
    for name in VOLUMES:
        img = sitk.ReadImage(str(paths[name]))
        assert grid_of(img).same_as(grid, atol=1e-9), name
    assert sitk.ReadImage(str(paths["labels"])).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(paths["confidence"])).GetPixelID() == sitk.sitkFloat32


def test_report_is_consistent_with_the_volumes(predictor, tmp_path):
    case = make_case((24, 24, 24), seed=5, spacing=(1.2, 0.9, 1.1))
    write_case(case, tmp_path / "c.nrrd")
    out = run_inference(
        predictor, tmp_path / "c.nrrd", InferenceOptions(uncertainty_threshold=0.95, band_voxels=1, min_region_voxels=1)
    )
    rep = out.report
    json.dumps(rep)  # JSON-able
    assert rep["params"]["uncertainty_threshold"] == 0.95 and rep["params"]["band_voxels"] == 1.0
    s = rep["summary"]
    voxel_ml = 1.2 * 0.9 * 1.1 / 1000
    for c in s["classes"]:
        assert c["voxels"] == int((out.labels == c["value"]).sum())
        assert c["volume_ml"] == pytest.approx(c["voxels"] * voxel_ml)
    assert s["uncertain_voxels"] == int(out.flags.sum()) == sum(r["voxels"] for r in rep["regions"])
    assert s["region_count"] == len(rep["regions"]) > 0
    assert ((out.confidence >= 0.5 - 1e-6) & (out.confidence <= 1 + 1e-6)).all()
    assert ((out.uncertainty >= 0) & (out.uncertainty <= 1)).all()
    assert (out.confidence[out.flags > 0] < 0.95).all()


def test_temperature_from_the_bundle_softens_confidence(tiny_bundle, tmp_path):
    hot = tmp_path / "models" / "tiny-hot"
    shutil.copytree(tiny_bundle, hot)
    cfg = json.loads((hot / "bundle.json").read_text())
    cfg.update(id="tiny-hot", temperature=3.0)
    (hot / "bundle.json").write_text(json.dumps(cfg))
    p = Predictor(Bundle.load(hot), "cpu")
    case = make_case((24, 24, 24), seed=11)
    img = to_sitk(case.image, case)
    with_t = p.predict(img)
    without = p.predict(img, use_temperature=False)
    assert with_t.temperature == 3.0 and without.temperature is None
    np.testing.assert_array_equal(with_t.probs.argmax(0), without.probs.argmax(0))  # T never changes the argmax
    assert with_t.probs.max(0).mean() < without.probs.max(0).mean()


def test_wrong_channel_count_is_refused(predictor, tmp_path):
    case = make_case((12, 12, 12), seed=1)
    img = sitk.Compose([to_sitk(case.image, case)] * 3)
    sitk.WriteImage(img, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InvalidInputError, match="3 channel"):
        predictor.load_image(tmp_path / "rgb.nrrd", name="rgb.nrrd")


def test_predictor_cache_loads_each_model_once(tiny_bundle):
    cache = PredictorCache("cpu", capacity=1)
    b = Bundle.load(tiny_bundle)
    p1 = cache.get(b)
    assert cache.get(Bundle.load(tiny_bundle)) is p1
    assert cache.loaded() == []  # networks load lazily
    assert p1.network is not None
    assert cache.loaded() == ["tiny-sphere"]
