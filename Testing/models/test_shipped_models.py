"""The bundles shipped in ``models/``: complete, small, honest cards, and they really segment real hippocampus MRI.

The fixture cases (Testing/fixtures/hippocampus, two real MSD Task04 cases) are in the models' held-out validation
split, so these are predictions on unseen data, through ``acecal evaluate`` and through ``acecal serve`` over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from live_server import start_cli_server, stop_process

from acecal.bundles import ModelRegistry
from acecal.client import ACEClient

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hippocampus"
SHIPPED = ("hippocampus-baseline", "hippocampus-hardace", "hippocampus-softace")
LOSSES = {
    "hippocampus-baseline": "baseline_dice_ce",
    "hippocampus-hardace": "hardl1ace_dice_ce",
    "hippocampus-softace": "softl1ace_dice_ce",
}


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry([MODELS])


@pytest.mark.parametrize("model_id", SHIPPED)
def test_bundle_is_complete_small_and_states_measured_calibration(registry, model_id):
    b = registry.get(model_id)
    cfg = b.config
    assert cfg.labels == {"0": "background", "1": "Anterior", "2": "Posterior"}  # as MSD dataset.json names them
    assert cfg.loss.name == LOSSES[model_id]
    wt = cfg.metrics["with_temperature"]  # fitted on validation by training; the shipped calibrator replaces it
    assert 0.05 < wt["temperature"] < 20 and cfg.temperature is None
    for f in b.path.iterdir():
        assert f.stat().st_size < 25 * 2**20, f"{f} is over 25 MiB"
    for m in ("dice", "ace", "ece", "mce"):
        assert 0 <= cfg.metrics[m] <= 1, (m, cfg.metrics)
    split = cfg.training["split"]
    assert len(split["val"]) == 42 and len(split["train"]) == 166 and not set(split["val"]) & set(split["train"])
    card = b.card_path.read_text()
    assert "CC BY-SA 4.0" in card and "Decathlon" in card
    assert f"{cfg.metrics['ace']:.4f}" in card, "the card must state the measured validation ACE"
    # same architecture, seed and schedule for every shipped model: only the loss differs
    ref = registry.get("hippocampus-baseline").config
    assert cfg.network == ref.network and cfg.roi_size == ref.roi_size
    assert cfg.training["seed"] == ref.training["seed"] and cfg.training["epochs"] == ref.training["epochs"]
    assert split == ref.training["split"]


@pytest.mark.parametrize("model_id", SHIPPED)
def test_shipped_calibrator_is_fitted_on_held_out_cases_and_measured_cross_fitted(registry, model_id):
    """Each network ships with local temperature scaling fitted (soft-ACE) on its validation split, never on a
    training case; the card gives the cross-fitted figure (fitted on one half, measured on the other)."""
    b = registry.get(model_id)
    cal = b.config.calibrator
    assert cal is not None and cal.kind == "local_temperature" and (b.path / "calibrator.safetensors").is_file()
    fitted = cal.fitted_on
    assert sorted(fitted["cases"]) == sorted(b.config.training["split"]["val"])
    assert not set(fitted["cases"]) & set(b.config.training["split"]["train"])
    m = cal.metrics
    raw, crossed = m["raw"], m["cross_fitted"]
    assert crossed["ace"] < raw["ace"] and crossed["dice"] == pytest.approx(raw["dice"], abs=1e-6)
    assert {n for f in crossed["folds"] for n in f["measured_on"]} == set(fitted["cases"])
    assert all(not set(f["fitted_on"]) & set(f["measured_on"]) for f in crossed["folds"])
    card = b.card_path.read_text()
    assert "## Calibrator" in card and f"{crossed['ace']:.4f}" in card and "cross-fitted" in card
    assert "**As served**" in card, "the card states what the server serves (the study's served row)"
    assert b.config.parent is None, "calibrated in place: the network keeps its own lineage"


def test_hippocampus_ace_is_two_headed_and_states_its_trade_off(registry):
    b = registry.get("hippocampus-ace")
    cfg, ref = b.config, registry.get("hippocampus-baseline").config
    assert cfg.network.name == "SegResNetTwoHead" and cfg.loss.name == "twohead_dice_ce_softace"
    assert cfg.network.args["trunk_grad"] == 0  # the calibration loss never reaches the segmentation trunk
    assert cfg.training["split"] == ref.training["split"] and cfg.training["seed"] == ref.training["seed"]
    assert cfg.labels == ref.labels and cfg.calibrator is None
    card = b.card_path.read_text()
    assert f"{cfg.metrics['ace']:.4f}" in card and "CC BY-SA 4.0" in card
    assert "Against the raw baseline network" in card and "trade-off" in card
    assert "missed" in card, "the flags target is missed and the card must say so"


def test_fixture_cases_are_held_out(registry):
    val = set(registry.get("hippocampus-baseline").config.training["split"]["val"])
    names = {p.name.replace(".nii.gz", "") for p in (FIXTURES / "images").iterdir()}
    assert names and names <= val


def test_evaluate_a_shipped_model_on_real_cases(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "acecal.cli.main",
            "evaluate",
            "--model",
            str(MODELS / "hippocampus-hardace"),
            "--images",
            str(FIXTURES / "images"),
            "--labels",
            str(FIXTURES / "labels"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "hippocampus-hardace"
    assert {c["case"] for c in rep["cases"]} == {"hippocampus_011", "hippocampus_020"}
    assert rep["aggregate"]["dice"] > 0.75, rep["aggregate"]
    assert 0 < rep["aggregate"]["ace"] < 0.3
    assert set(rep["per_class"]) == {"Anterior", "Posterior"}
    # the noise floor: a perfectly calibrated model with these probabilities would still score about 0.04 on
    # structures of ~1.7k voxels; part of the ACE is removable
    fl = rep["floor"]
    assert 0.01 < fl["ace"] < rep["aggregate"]["ace"] and fl["removable_ace"] > 0
    assert 0 < fl["micro"]["ace"] <= rep["micro"]["ace"]
    assert all(0 < c["floor_ace"] < c["ace"] for c in rep["cases"])
    # the served flags find most of the errors: low confidence ranks wrong voxels above right ones
    ed = rep["error_detection"]
    assert 0.7 < ed["auroc"] <= 1 and ed["auroc_max_error"] < 0.01
    assert 0.5 < ed["recall"] <= 1 and 0.5 < ed["flagged_over_wrong"] < 10 and ed["wrong_voxels"] > 100
    assert set(ed["per_class"]) == {"Anterior", "Posterior"} and all(
        0.5 < v["auroc"] <= 1 for v in ed["per_class"].values()
    )
    assert rep["space"] == "input grid" and rep["raw"] is False
    assert (out / "report.md").is_file() and (out / "dataset_reliability_histogram.png").is_file()
    assert len(list(out.rglob("reliability_*.png"))) == 2


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum())


def test_make_serve_models_segment_real_mri_over_http(tmp_path):
    """What `make serve` runs (acecal serve --models models) answers /models and /infer on a real MRI crop."""
    proc, url = start_cli_server(["--models", str(MODELS), "--data-dir", str(tmp_path / "data")])
    try:
        client = ACEClient(url, timeout=(5, 120))
        ids = {m.id for m in client.models()}
        assert {*SHIPPED, "hippocampus-ace"} <= ids
        assert client.default_model().id == "hippocampus-ace"
        case = "hippocampus_020"
        res = client.infer(FIXTURES / "images" / f"{case}.nii.gz", "hippocampus-softace")
        truth_img = sitk.ReadImage(str(FIXTURES / "labels" / f"{case}.nii.gz"))
        truth = sitk.GetArrayFromImage(truth_img).astype(np.int64)
        labels, conf = res.arrays["labels"], res.arrays["confidence"]
        assert labels.shape == truth.shape and res.grid.size == truth_img.GetSize()
        assert np.allclose(res.grid.origin, truth_img.GetOrigin()) and np.allclose(
            res.grid.spacing, truth_img.GetSpacing()
        )
        assert _dice(labels, truth, 1) > 0.7 and _dice(labels, truth, 2) > 0.7
        assert conf.dtype == np.float32 and 0.0 <= conf.min() and conf.max() <= 1.0
        # calibrated confidence is lower where the model is wrong than where it is right
        wrong = labels != truth
        assert wrong.any() and conf[wrong].mean() < conf[~wrong].mean()
        # the default model (no id): labels from the segmentation head, confidence from the calibration head
        served = client.infer(FIXTURES / "images" / f"{case}.nii.gz")
        assert served.model_id == "hippocampus-ace"
        assert _dice(served.arrays["labels"], truth, 1) > 0.7 and _dice(served.arrays["labels"], truth, 2) > 0.7
        conf = served.arrays["confidence"]
        wrong = served.arrays["labels"] != truth
        assert 0.0 <= conf.min() and conf.max() <= 1.0 and conf[wrong].mean() < conf[~wrong].mean()
    finally:
        stop_process(proc)
