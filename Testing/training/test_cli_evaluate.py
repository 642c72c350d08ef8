"""`acecal train` / `acecal evaluate` through typer's CliRunner, and the evaluation report."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from synthetic import make_dataset
from tiny_training import train_tiny_bundle
from typer.testing import CliRunner

from acecal.bundles import Bundle, NetworkConfig
from acecal.cli.main import _register, app
from acecal.inference.pipeline import run_inference
from acecal.inference.predictor import Predictor
from acecal.metrics import calibration_errors
from acecal.training.evaluate import evaluate

_register()
runner = CliRunner()


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval") / "ds", 3, shape_zyx=(24, 24, 24), seed=21)


def test_cli_module_imports_without_torch():
    code = (
        "import sys, acecal.cli.main as m; m._register(); "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_report(tmp_path, tiny_bundle, eval_data):
    out = tmp_path / "report"
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(tiny_bundle),
            "--images",
            str(eval_data / "images"),
            "--labels",
            str(eval_data / "labels"),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "floor" in r.stdout and "auroc" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "tiny-sphere" and rep["raw"] is False and rep["space"] == "input grid"
    assert set(rep["aggregate"]) == {"dice", "ace", "ece", "mce"}
    assert rep["aggregate"]["dice"] > 0.9
    assert set(rep["per_class"]) == {"sphere"}
    assert {"dice", "ace", "ece", "mce", "floor_ace", "removable_ace", "micro_ace"} <= set(rep["per_class"]["sphere"])
    assert [c["case"] for c in rep["cases"]] == ["case_000", "case_001", "case_002"]
    assert all(
        set(c) == {"case", "dice", "ace", "ece", "mce", "floor_ace", "auroc", "recall", "flagged_over_wrong"}
        for c in rep["cases"]
    )
    assert "per case over the foreground classes present" in rep["note"].replace("for each case, the mean", "per case")
    # macro = mean over cases of the per-case values
    assert rep["aggregate"]["ace"] == pytest.approx(sum(c["ace"] for c in rep["cases"]) / 3)
    fl = rep["floor"]
    assert 0 < fl["ace"] and fl["removable_ace"] == pytest.approx(rep["aggregate"]["ace"] - fl["ace"])
    assert fl["ace"] == pytest.approx(sum(c["floor_ace"] for c in rep["cases"]) / 3)
    assert 0 < fl["micro"]["ace"] and fl["micro"]["removable_ace"] == pytest.approx(
        rep["micro"]["ace"] - fl["micro"]["ace"]
    )
    ed = rep["error_detection"]
    assert {
        "auroc",
        "auroc_max_error",
        "recall",
        "flagged_over_wrong",
        "precision",
        "wrong_ml",
        "flagged_ml",
        "per_class",
        "roi_radius_voxels",
        "flags",
    } <= set(ed)
    assert ed["wrong_voxels"] > 0 and 0 <= ed["recall"] <= 1 and 0.5 < ed["auroc"] <= 1
    assert ed["flags"]["uncertainty_threshold"] == Bundle.load(tiny_bundle).config.uncertainty_threshold
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [
        "dataset_reliability_histogram.png",
        "figures/reliability_case_000.png",
        "figures/reliability_case_001.png",
        "figures/reliability_case_002.png",
    ]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "report.md").read_text()
    assert all(f"]({p})" in md for p in pngs) and "macro" in md
    assert "floor" in md and "Do the flags find the errors?" in md and "input grid" in md


def test_evaluate_judges_exactly_what_inference_serves(tmp_path, tiny_bundle, eval_data):
    """Per case, the report's numbers are those of the served volumes: ACE of the probabilities the predictor
    returns on the input grid, recall and flagged volume of the flags `acecal infer` writes."""
    rep = evaluate(
        str(tiny_bundle), eval_data / "images", eval_data / "labels", tmp_path / "r", plots=False, device="cpu"
    )
    predictor = Predictor(Bundle.load(tiny_bundle), "cpu")
    for case in ("case_000", "case_002"):
        image = eval_data / "images" / f"{case}.nii.gz"
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(eval_data / "labels" / f"{case}.nii.gz"))).astype(np.int64)
        served = run_inference(predictor, image)
        wrong = served.labels != truth
        flagged = served.flags != 0
        row = next(c for c in rep["cases"] if c["case"] == case)
        probs = predictor.predict(image).probs
        ace = calibration_errors(
            torch.from_numpy(probs)[None], torch.from_numpy(truth)[None, None], include_background=False
        )["ace"][0, 0]
        assert row["ace"] == pytest.approx(float(ace), rel=1e-6)
        if wrong.any():
            assert row["recall"] == pytest.approx((wrong & flagged).sum() / wrong.sum())
            assert row["flagged_over_wrong"] == pytest.approx(flagged.sum() / wrong.sum())


def test_evaluate_raw_switches_the_post_hoc_step_off(tmp_path, tiny_bundle, eval_data):
    """A bundle with a temperature: served and --raw share the label map (same Dice, same wrong voxels) but not the
    probabilities; --temperature insists on the post-hoc step."""
    bundle = tmp_path / "tiny-t"
    shutil.copytree(tiny_bundle, bundle)
    cfg = json.loads((bundle / "bundle.json").read_text())
    cfg.update(id="tiny-t", temperature=3.0)
    (bundle / "bundle.json").write_text(json.dumps(cfg))
    args = ["--images", str(eval_data / "images"), "--labels", str(eval_data / "labels"), "--no-plots", "-q"]
    reps = {}
    for mode in ("served", "raw", "temperature"):
        extra = {"served": [], "raw": ["--raw"], "temperature": ["--temperature"]}[mode]
        r = runner.invoke(app, ["evaluate", "--model", str(bundle), "--out", str(tmp_path / mode), *args, *extra])
        assert r.exit_code == 0, r.output
        reps[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    served, raw = reps["served"], reps["raw"]
    assert served["temperature"] == 3.0 and served["calibrator"] == "temperature" and not served["raw"]
    assert raw["temperature"] is None and raw["calibrator"] is None and raw["raw"]
    assert served["aggregate"]["dice"] == raw["aggregate"]["dice"]
    assert served["error_detection"]["wrong_voxels"] == raw["error_detection"]["wrong_voxels"]
    assert served["aggregate"]["ace"] != pytest.approx(raw["aggregate"]["ace"], rel=1e-3)
    assert served["floor"]["ace"] != pytest.approx(raw["floor"]["ace"], rel=1e-3)
    assert reps["temperature"]["aggregate"] == served["aggregate"]
    r = runner.invoke(
        app, ["evaluate", "--model", str(bundle), "--out", str(tmp_path / "x"), *args, "--raw", "--temperature"]
    )
    assert r.exit_code == 2 and "contradict" in r.output


def test_evaluate_bad_input_is_a_clear_error(tmp_path, tiny_bundle, eval_data):
    args = ["--images", str(eval_data / "images"), "--labels", str(eval_data / "labels"), "--out", str(tmp_path / "o")]
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_bundle), "--temperature", *args])
    assert r.exit_code == 2 and "has no fitted temperature" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", "--model", "no-such-model", *args])
    assert r.exit_code == 2 and "unknown model 'no-such-model'" in r.output
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(tiny_bundle),
            "--images",
            str(tmp_path / "none"),
            "--labels",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_bundle), "--roi-radius", "-1", *args])
    assert r.exit_code == 2


def test_train_cli_with_yaml_config(tmp_path, eval_data):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"""
data: {eval_data}
network: {{name: SegResNet, args: {{init_filters: 8, blocks_down: [1, 1], blocks_up: [1]}}}}
roi_size: [24, 24, 24]
epochs: 1
batch_size: 1
num_samples: 1
val_fraction: 0.34
""")
    r = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(cfg),
            "--id",
            "cli-model",
            "--out",
            str(tmp_path / "models"),
            "--work-dir",
            str(tmp_path / "work"),
            "--lr",
            "0.005",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "cli-model" in r.stdout.split()
    b = Bundle.load(tmp_path / "models" / "cli-model")
    assert b.config.training["lr"] == 0.005 and b.config.network.args["init_filters"] == 8
    assert b.config.training["command"].startswith("acecal ")

    # --no-publish keeps the checkpoints only; a later --resume with more --epochs extends the run and publishes
    common = [
        "--config",
        str(cfg),
        "--id",
        "cli-two",
        "--out",
        str(tmp_path / "models"),
        "--work-dir",
        str(tmp_path / "work2"),
        "--lr",
        "0.005",
        "--quiet",
        "--resume",
    ]
    r = runner.invoke(app, ["train", *common, "--no-publish"])
    assert r.exit_code == 0 and "not published" in r.output and not (tmp_path / "models" / "cli-two").exists()
    r = runner.invoke(app, ["train", *common, "--epochs", "2"])
    assert r.exit_code == 0, r.output
    b = Bundle.load(tmp_path / "models" / "cli-two")
    assert b.config.training["epochs"] == 2 and len(b.config.training["history"]) == 2
    assert "extended from 1 to 2 epochs after epoch 1" in b.card_path.read_text()


def test_train_cli_bad_input(tmp_path):
    root = make_dataset(tmp_path / "ds", 3, shape_zyx=(12, 12, 12))
    (root / "labels" / "case_001.nii.gz").unlink()
    r = runner.invoke(app, ["train", str(root), "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "case_001: missing label" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["train", str(root), "--loss", "nope"])
    assert r.exit_code == 2 and "unknown loss 'nope'" in r.output
    r = runner.invoke(app, ["train", str(root), "--roi", "1,2"])
    assert r.exit_code == 2 and "--roi needs 3 integers" in r.output
    r = runner.invoke(app, ["train", str(root), "--freeze-encoder"])
    assert r.exit_code == 2 and "--freeze-encoder needs --base" in r.output
    r = runner.invoke(app, ["train", str(root), "--base", "no-such-base"])
    assert r.exit_code == 2 and "unknown model 'no-such-base'" in r.output
    r = runner.invoke(app, ["train", str(root), "--id", "Bad Id"])
    assert r.exit_code == 2 and "model_id" in r.output
    assert not (tmp_path / "m").exists()


def test_evaluate_two_head_bundle_scores_the_segmentation_head_labels(tmp_path_factory, tiny_bundle, eval_data):
    """Two heads with the calibration loss kept off the trunk: the segmentation is the one-head baseline's, so Dice
    and the wrong voxels equal the baseline's while the probabilities (ACE, floor) are the calibration head's."""
    root = tmp_path_factory.mktemp("twohead_eval")
    two = train_tiny_bundle(
        root,
        model_id="tiny-twohead-eval",
        loss="twohead_dice_ce_softace",
        network=NetworkConfig(
            name="SegResNetTwoHead",
            args={"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1], "trunk_grad": 0.0},
        ),
    )
    reps = [
        evaluate(str(b), eval_data / "images", eval_data / "labels", root / f"r{i}", plots=False, device="cpu")
        for i, b in enumerate((tiny_bundle, two))
    ]
    one, both = reps
    assert both["aggregate"]["dice"] == pytest.approx(one["aggregate"]["dice"], abs=1e-12)
    assert both["error_detection"]["wrong_voxels"] == one["error_detection"]["wrong_voxels"]
    assert both["aggregate"]["ace"] != pytest.approx(one["aggregate"]["ace"], abs=1e-6)
    assert both["floor"]["ace"] != pytest.approx(one["floor"]["ace"], abs=1e-6)
