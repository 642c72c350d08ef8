"""A calibrator fitted with ``acecal calibrate``, stored in a new bundle, applied by the predictor and the server by
default, and switched off on request; hostile calibrator records are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from live_server import LiveServer, make_settings
from safetensors.torch import load_file, save_file
from synthetic import make_case, make_dataset, write_case
from typer.testing import CliRunner

from acecal.bundles import Bundle, NetworkConfig, build_network, write_bundle
from acecal.calibration import LocalTemperatureCalibrator, TemperatureCalibrator, load_calibrator, macro_ace
from acecal.cli.main import _register, app
from acecal.data.datasets import discover_dataset
from acecal.errors import BundleError, InvalidInputError
from acecal.inference.pipeline import InferenceOptions, run_inference
from acecal.inference.predictor import Predictor
from acecal.networks import split_heads
from acecal.training.calibrate import calibrate_bundle
from acecal.training.calibration_cases import model_space_cases
from acecal.training.finetune import finetune

HELD = [f"held_{i:03d}" for i in range(6)]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Six labelled cases the tiny network never trained on (its training cases are named case_NNN)."""
    return make_dataset(tmp_path_factory.mktemp("held"), 6, layout="msd", prefix="held", seed=7)


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, held_out, tmp_path_factory):
    """{"ace-temperature": bundle folder made by the CLI, "local-temperature": one made by calibrate_bundle}."""
    out = tmp_path_factory.mktemp("calibrated-models")
    _register()
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(tiny_bundle),
            "--method",
            "ace-temperature",
            "--data",
            str(held_out),
            "--cases",
            ",".join(HELD),
            "--id",
            "tiny-acet",
            "--out",
            str(out),
            "--no-cache",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == "tiny-acet"
    lts, metrics = calibrate_bundle(
        tiny_bundle,
        method="local-temperature",
        data=held_out,
        cases=HELD,
        out_dir=out,
        model_id="tiny-lts",
        settings={"epochs": 2, "hidden": 2, "layers": 1, "nll_weight": 0.1},
    )
    return {"ace-temperature": out / "tiny-acet", "local-temperature": lts.path, "lts_metrics": metrics}


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    case = make_case((24, 24, 24), seed=99)
    write_case(case, d / "img.nii.gz", d / "lab.nii.gz")
    return d / "img.nii.gz"


def test_the_bundle_records_the_calibrator_and_its_figures(calibrated, tiny_bundle):
    b = Bundle.load(calibrated["ace-temperature"])
    c = b.config.calibrator
    assert c.kind == "temperature" and c.weights is None
    assert b.config.temperature == pytest.approx(c.params["temperature"])  # older readers apply the same T
    assert b.config.parent == "tiny-sphere"
    assert c.fitted_on["cases"] == HELD and c.fitted_on["cross_fitted"] is False
    assert c.fitted_on["source"] == "cases named by the caller"
    m = c.metrics
    assert set(m["cross_fitted"]["per_case"]) == set(HELD)
    folds = m["cross_fitted"]["folds"]
    assert sorted(folds[0]["fitted_on"] + folds[0]["measured_on"]) == sorted(HELD)
    assert folds[0]["fitted_on"] == folds[1]["measured_on"]
    assert m["cross_fitted"]["dice"] == pytest.approx(m["raw"]["dice"], abs=1e-12)  # the label map is unchanged
    # the default flags threshold is recomputed for the calibrated confidence by the training rule
    assert b.config.uncertainty_threshold == c.fitted_on["uncertainty_threshold"]["value"]
    assert "recomputed for the calibrated confidence" in b.config.training["uncertainty_threshold_rule"]
    card = b.card_path.read_text()
    assert "## Calibrator" in card and "cross-fitted" in card and "in-sample" in card
    # the network is the base bundle's, unchanged
    base = Bundle.load(tiny_bundle)
    for k, v in base.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_local_temperature_bundle_round_trip(calibrated, held_out):
    b = Bundle.load(calibrated["local-temperature"])
    assert b.config.calibrator.kind == "local_temperature" and b.config.temperature is None
    assert b.calibrator_path.is_file()
    cal = load_calibrator(b)
    assert isinstance(cal, LocalTemperatureCalibrator)
    assert cal.spec() == b.config.calibrator.params
    assert b.config.calibrator.fitted_on["settings"]["epochs"] == 2
    # the stored calibrator reproduces the recorded in-sample figure
    info = discover_dataset(held_out)
    cases = model_space_cases(b, [c for c in info.cases if c.name in HELD])
    assert macro_ace(cases, cal) == pytest.approx(b.config.calibrator.metrics["in_sample"]["ace"], abs=1e-9)


@pytest.mark.parametrize("method", ["ace-temperature", "local-temperature"])
def test_the_predictor_applies_the_calibrator_by_default_and_the_switch_gives_the_raw_softmax(
    calibrated, tiny_bundle, image_path, method
):
    b = Bundle.load(calibrated[method])
    raw_base = Predictor(Bundle.load(tiny_bundle)).predict(image_path)
    served = Predictor(b).predict(image_path)
    off = Predictor(b, use_calibrator=False).predict(image_path)
    alias = Predictor(b).predict(image_path, use_temperature=False)
    np.testing.assert_allclose(off.probs, raw_base.probs, atol=1e-6)
    np.testing.assert_allclose(alias.probs, raw_base.probs, atol=1e-6)
    assert np.abs(served.probs - raw_base.probs).max() > 1e-3
    # the label map is the network's own (1 mm RAS grid: no resampling between model space and the input)
    assert np.array_equal(served.probs.argmax(0), raw_base.probs.argmax(0))
    assert served.calibrator == b.config.calibrator.kind and off.calibrator is None
    if method == "ace-temperature":
        assert served.temperature == pytest.approx(b.config.temperature)
    else:
        assert served.temperature is None
    # the in-process inference report says what was applied
    out = run_inference(Predictor(b), image_path)
    assert out.report["summary"]["calibrator"] == b.config.calibrator.kind
    assert out.report["params"]["use_calibrator"] is True
    out = run_inference(Predictor(b), image_path, InferenceOptions(use_calibrator=False))
    assert out.report["summary"]["calibrator"] is None and out.report["params"]["use_temperature"] is False


def test_a_bundle_with_only_the_older_temperature_field_is_still_calibrated(tiny_bundle, tmp_path, image_path):
    hot = tmp_path / "tiny-hot"
    shutil.copytree(tiny_bundle, hot)
    cfg = json.loads((hot / "bundle.json").read_text())
    cfg.update(id="tiny-hot", temperature=3.0, calibrator=None)
    (hot / "bundle.json").write_text(json.dumps(cfg))
    cal = load_calibrator(Bundle.load(hot))
    assert isinstance(cal, TemperatureCalibrator) and cal.value == 3.0
    p = Predictor(Bundle.load(hot)).predict(image_path)
    raw = Predictor(Bundle.load(hot), use_calibrator=False).predict(image_path)
    assert p.temperature == 3.0 and p.calibrator == "temperature"
    assert p.probs.max(0).mean() < raw.probs.max(0).mean()  # T > 1 softens


def test_a_real_server_serves_the_calibrated_bundle_and_switches_it_off(calibrated, image_path, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(calibrated["local-temperature"], models / "tiny-lts")
    settings = make_settings(tmp_path / "data", [models])
    with LiveServer(settings) as s:
        models_reply = requests.get(s.url + "/models", timeout=30).json()["models"]
        assert [m["id"] for m in models_reply] == ["tiny-lts"]

        def infer(params=None) -> tuple[dict, np.ndarray]:
            with open(image_path, "rb") as f:
                r = requests.post(
                    s.url + "/infer/tiny-lts",
                    files={"image": ("img.nii.gz", f)},
                    data={"params": json.dumps(params)} if params else None,
                    timeout=120,
                )
            assert r.status_code == 200, r.text
            reply = r.json()
            conf = requests.get(s.url + reply["files"]["confidence"], timeout=30)
            assert conf.status_code == 200
            path = tmp_path / f"conf-{len(list(tmp_path.glob('conf-*')))}.nrrd"
            path.write_bytes(conf.content)
            return reply, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

        on, conf_on = infer()
        off, conf_off = infer({"use_temperature": False})
    assert on["summary"]["calibrator"] == "local_temperature" and off["summary"]["calibrator"] is None
    assert on["params"]["use_temperature"] is True and off["params"]["use_temperature"] is False
    assert np.abs(conf_on - conf_off).max() > 1e-3
    # each confidence is flagged at its own default threshold: the calibrated one, or the network's own when off
    cfg = Bundle.load(calibrated["local-temperature"]).config
    base = cfg.calibrator.fitted_on["uncertainty_threshold"]["base_value"]
    assert on["params"]["uncertainty_threshold"] == pytest.approx(cfg.uncertainty_threshold)
    assert off["params"]["uncertainty_threshold"] == pytest.approx(base)
    assert cfg.default_threshold(calibrated=False) == pytest.approx(base)
    # in-process, the same calibrated confidence
    local = run_inference(Predictor(Bundle.load(calibrated["local-temperature"])), image_path)
    np.testing.assert_allclose(local.confidence, conf_on, atol=1e-5)


def test_fitting_on_cases_the_network_trained_on_is_refused(tiny_bundle, held_out, tmp_path):
    train = Bundle.load(tiny_bundle).config.training["split"]["train"]
    data = tiny_bundle.parent.parent / "data" / "dataset.json"
    with pytest.raises(InvalidInputError, match="trained on"):
        calibrate_bundle(tiny_bundle, method="ace-temperature", data=data, cases=train[:4], out_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="at least 4"):  # its own validation split has 2 cases
        calibrate_bundle(tiny_bundle, method="ace-temperature", data=data, out_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="unknown calibration method"):
        calibrate_bundle(tiny_bundle, method="isotonic", data=held_out, cases=HELD, out_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="already has a calibrator"):
        calibrate_bundle(
            _with_calibrator(tiny_bundle, tmp_path),
            method="ace-temperature",
            data=held_out,
            cases=HELD,
            out_dir=tmp_path,
        )


def _with_calibrator(tiny_bundle, tmp_path):
    d = tmp_path / "has-cal"
    shutil.copytree(tiny_bundle, d)
    cfg = json.loads((d / "bundle.json").read_text())
    cfg["calibrator"] = {"kind": "temperature", "params": {"temperature": 1.5}}
    (d / "bundle.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda cfg, d: cfg["calibrator"].update(weights="../model.safetensors"), "load"),
        (lambda cfg, d: cfg["calibrator"].update(weights="missing.safetensors"), "load"),
        (lambda cfg, d: cfg["calibrator"].update(kind="isotonic"), "load"),
        (lambda cfg, d: cfg["calibrator"]["params"].update(hidden=10**6), "calibrator"),
        (lambda cfg, d: cfg["calibrator"]["params"].update(hidden=3), "calibrator"),  # weights no longer fit
        (lambda cfg, d: shutil.copyfile(d / "model.safetensors", d / "calibrator.safetensors"), "calibrator"),
        (lambda cfg, d: (d / "calibrator.safetensors").write_bytes(b"\x00" * 64), "calibrator"),
    ],
)
def test_broken_or_hostile_calibrator_records_are_refused(calibrated, tmp_path, change, where):
    d = tmp_path / "b"
    shutil.copytree(calibrated["local-temperature"], d)
    cfg = json.loads((d / "bundle.json").read_text())
    change(cfg, d)
    (d / "bundle.json").write_text(json.dumps(cfg))
    if where == "load":
        with pytest.raises(BundleError):
            Bundle.load(d)
    else:
        b = Bundle.load(d)
        with pytest.raises(BundleError):
            load_calibrator(b)


def test_nan_calibrator_weights_are_refused(calibrated, tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(calibrated["local-temperature"], d)
    state = load_file(str(d / "calibrator.safetensors"))
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_file(state, str(d / "calibrator.safetensors"))
    with pytest.raises(BundleError, match="finite"):
        load_calibrator(Bundle.load(d))


def test_a_model_fine_tuned_from_a_calibrated_bundle_gets_its_own_ace_temperature(
    calibrated, held_out, tmp_path, image_path
):
    result = finetune(
        str(calibrated["local-temperature"]),
        data=str(held_out),
        val_cases=HELD[:4],
        epochs=1,
        val_every=1,
        roi_size=(24, 24, 24),
        batch_size=2,
        sw_batch_size=1,
        augment=False,
        out_dir=str(tmp_path / "models"),
        work_dir=str(tmp_path / "work"),
        model_id="tiny-lts-ft",
    )
    assert result.status == "published", result
    b = Bundle.load(result.bundle_path)
    c = b.config.calibrator
    assert b.config.parent == "tiny-lts"
    assert c.kind == "temperature" and b.config.temperature == pytest.approx(c.params["temperature"])
    assert c.fitted_on["cases"] == HELD[:4] and "validation" in c.fitted_on["source"]
    assert c.metrics["in_sample"]["ace"] <= c.metrics["raw"]["ace"] + 1e-12
    assert "cross_fitted" in c.metrics  # 4 validation cases: halves of 2
    served = Predictor(b).predict(image_path)
    assert served.calibrator == "temperature" and served.temperature == pytest.approx(c.params["temperature"])
    assert "## Calibrator" in b.card_path.read_text()


def test_a_two_head_bundle_is_calibrated_on_its_calibration_head(tiny_bundle, held_out, tmp_path, image_path):
    base = Bundle.load(tiny_bundle).config
    config = base.model_copy(
        update={
            "id": "tiny-two-head",
            "network": NetworkConfig(
                name="SegResNetTwoHead", args={"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}
            ),
        }
    )
    torch.manual_seed(0)
    net = build_network(config)  # untrained: enough to check which logits the calibrator sees
    two = write_bundle(tmp_path / "models", config, net.state_dict(), "# two heads\n")
    info = discover_dataset(held_out)
    cases = model_space_cases(two, [c for c in info.cases if c.name in HELD][:2])
    for c in cases:
        z, img, _ = c.batch()
        with torch.no_grad():
            out = net.eval()(img)
        seg, cal = split_heads(out, 2)
        assert c.logits.shape[0] == 2 and torch.allclose(c.logits, cal[0], atol=1e-4)
        assert torch.equal(c.prediction, seg[0].argmax(0))
    b, _ = calibrate_bundle(
        two.path,
        method="ace-temperature",
        data=held_out,
        cases=HELD,
        out_dir=tmp_path / "models",
        model_id="tiny-two-head-acet",
    )
    assert b.config.calibrator.params["temperature"] > 0
    served = Predictor(b).predict(image_path)
    raw = Predictor(b, use_calibrator=False).predict(image_path)
    assert np.array_equal(served.labels, raw.labels)  # labels from the segmentation head, untouched
    assert served.calibrator == "temperature"
