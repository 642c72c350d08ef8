"""A two-head network trained by the real engine: published, validated and served as designed.

Labels (and Dice) from the segmentation head, probabilities (ACE, confidence, flags) from the calibration head; with
``trunk_grad=0`` the segmentation is exactly the one-head baseline's (same seed, same data, same schedule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from live_server import LiveServer, make_settings
from synthetic import make_case, write_case
from tiny_training import TINY_NETWORK_ARGS, train_tiny_bundle
from typer.testing import CliRunner

from acecal.bundles import Bundle, NetworkConfig
from acecal.cli.main import _register, app
from acecal.client import ACEClient
from acecal.data.datasets import discover_dataset
from acecal.data.transforms import model_space_transforms
from acecal.errors import ACECalError, InvalidInputError
from acecal.inference.pipeline import InferenceOptions, analyse, run_inference
from acecal.inference.predictor import Predictor
from acecal.inference.window import sliding_window_logits
from acecal.metrics import CalibrationAccumulator
from acecal.networks import split_heads
from acecal.training.config import TrainConfig
from acecal.training.engine import Engine


@pytest.fixture(scope="module")
def twohead(tmp_path_factory):
    """The tiny bundle's recipe (Testing/conftest.py) with two heads and the calibration loss kept off the trunk."""
    root = tmp_path_factory.mktemp("twohead")
    path = train_tiny_bundle(
        root,
        model_id="tiny-twohead",
        loss="twohead_dice_ce_softace",
        network=NetworkConfig(name="SegResNetTwoHead", args={**TINY_NETWORK_ARGS, "trunk_grad": 0.0}),
    )
    return root, Bundle.load(path)


def test_trunk_grad_zero_trains_the_baseline_segmentation(twohead, tiny_bundle):
    _, bundle = twohead
    base = Bundle.load(tiny_bundle)  # same recipe, one head, baseline_dice_ce
    assert bundle.config.network.name == "SegResNetTwoHead" and bundle.config.loss.name == "twohead_dice_ce_softace"
    two, one = bundle.state_dict(), base.state_dict()
    assert set(two) - set(one) and all(k.startswith("calibration_head.") for k in set(two) - set(one))
    for k, v in one.items():  # trunk and segmentation head: the baseline's weights
        torch.testing.assert_close(two[k], v, msg=k)
    assert bundle.config.metrics["dice"] == pytest.approx(base.config.metrics["dice"], abs=1e-12)
    assert bundle.config.metrics["ace"] != pytest.approx(base.config.metrics["ace"], abs=1e-6)


def test_validation_scores_segmentation_labels_and_calibration_probabilities(twohead):
    root, bundle = twohead
    cfg = bundle.config
    net = bundle.load_network()
    info = discover_dataset(str(root / "data"))
    val = [c for c in info.cases if c.name in cfg.training["split"]["val"]]
    assert val
    chain = model_space_transforms(cfg)
    served = CalibrationAccumulator(cfg.num_classes)
    wrong = CalibrationAccumulator(cfg.num_classes)  # probabilities of the segmentation head: not what is served
    for c in val:
        d = chain(c.as_dict())
        image, label = d["image"].as_tensor()[None], d["label"].as_tensor()[None].long()
        seg, cal = split_heads(sliding_window_logits(net, image, cfg), cfg.num_classes)
        served.update(torch.softmax(cal, 1), label, case_id=c.name, predicted=seg.argmax(1, keepdim=True))
        wrong.update(torch.softmax(seg, 1), label, case_id=c.name)
    m = served.aggregate().macro
    assert cfg.metrics["dice"] == pytest.approx(m["dice"], abs=1e-9)
    assert cfg.metrics["ace"] == pytest.approx(m["ace"], abs=1e-9)
    assert cfg.metrics["ace"] != pytest.approx(wrong.aggregate().macro["ace"], abs=1e-6)
    assert cfg.metrics["dice"] > 0.8


def test_served_labels_from_segmentation_head_probabilities_from_calibration_head(twohead, tmp_path):
    _, bundle = twohead
    predictor = Predictor(bundle)
    case = make_case((24, 24, 24), seed=41)
    write_case(case, tmp_path / "c.nii.gz")
    data = predictor.preprocess(predictor.load_image(tmp_path / "c.nii.gz"))
    stacked = predictor.postprocess(data, predictor.forward(data))  # (2C, z, y, x)
    assert stacked.shape == (4, 24, 24, 24)
    seg, cal = stacked[:2], stacked[2:]
    np.testing.assert_allclose(seg.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(cal.sum(0), 1.0, atol=1e-5)
    pred = predictor.predict(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(pred.labels, seg.argmax(0))
    np.testing.assert_allclose(pred.probs, cal, atol=1e-6)
    out = run_inference(predictor, tmp_path / "c.nii.gz", InferenceOptions())
    np.testing.assert_array_equal(out.labels, seg.argmax(0))
    expected_conf = np.take_along_axis(cal, out.labels[None].astype(np.intp), 0)[0]
    np.testing.assert_allclose(out.confidence, expected_conf, atol=1e-6)
    assert not np.allclose(out.confidence, seg.max(0), atol=1e-3)  # not the segmentation head's confidence
    # the server's path: analyse() on the stacked output gives the same volumes
    again = analyse(stacked, out.grid, bundle.config, InferenceOptions())
    np.testing.assert_array_equal(again.labels, out.labels)
    np.testing.assert_allclose(again.confidence, out.confidence)
    np.testing.assert_array_equal(again.flags, out.flags)
    card = (bundle.path / "README.md").read_text()
    assert "segmentation head" in card and "calibration head" in card


@pytest.mark.parametrize(
    "network,loss,match",
    [
        ("SegResNet", "twohead_dice_ce_softace", "SegResNetTwoHead"),
        ("SegResNetTwoHead", "baseline_dice_ce", "two-head loss"),
    ],
)
def test_network_and_loss_must_agree_on_heads(twohead, tmp_path, network, loss, match):
    root, _ = twohead
    cfg = TrainConfig(
        data=str(root / "data"),
        network=NetworkConfig(name=network, args=TINY_NETWORK_ARGS),
        loss=loss,
        roi_size=(24, 24, 24),
        epochs=1,
        out_dir=str(tmp_path / "m"),
        work_dir=str(tmp_path / "w"),
    )
    with pytest.raises(InvalidInputError, match=match):
        Engine(cfg, show_progress=False).run()
    assert not (tmp_path / "w").exists()


def test_bad_network_argument_is_bad_input(twohead, tmp_path):
    root, _ = twohead
    cfg = TrainConfig(
        data=str(root / "data"),
        loss="twohead_dice_ce_softace",
        roi_size=(24, 24, 24),
        epochs=1,
        network=NetworkConfig(name="SegResNetTwoHead", args={**TINY_NETWORK_ARGS, "trunk_grad": 3}),
        out_dir=str(tmp_path / "m"),
        work_dir=str(tmp_path / "w"),
    )
    with pytest.raises(InvalidInputError, match="trunk_grad"):
        Engine(cfg, show_progress=False).run()


def test_train_cli_network_arguments_loss_parameters_and_tta(twohead, tmp_path):
    _register()  # the commands are registered lazily (the CLI starts without torch)
    root, _ = twohead
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(root / "data"),
            "--loss",
            "twohead_dice_ce_hardace",
            "--network",
            "SegResNetTwoHead",
            "--network-arg",
            "trunk_grad=0.5",
            "--network-arg",
            "calibration_sees_segmentation=true",
            "--init-filters",
            "8",
            "--blocks-down",
            "1,1",
            "--blocks-up",
            "1",
            "--roi",
            "24,24,24",
            "--epochs",
            "1",
            "--loss-param",
            "ace_weight=3",
            "--loss-param",
            "num_bins=10",
            "--tta",
            "axis_flips",
            "--id",
            "cli-twohead",
            "--out",
            str(tmp_path / "models"),
            "--work-dir",
            str(tmp_path / "work"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    cfg = Bundle.load(tmp_path / "models" / "cli-twohead").config
    assert cfg.network.name == "SegResNetTwoHead" and cfg.tta == "axis_flips"
    assert cfg.network.args["trunk_grad"] == 0.5 and cfg.network.args["calibration_sees_segmentation"] is True
    assert cfg.loss.params == {"ace_weight": 3, "num_bins": 10}
    bad = CliRunner().invoke(app, ["train", str(root / "data"), "--network-arg", "trunk_grad", "--id", "x"])
    assert bad.exit_code == 2 and "NAME=VALUE" in bad.output


def test_server_serves_the_two_heads_and_the_tta_parameter(twohead, tmp_path):
    """A real server on loopback: the two-head bundle's labels, confidence and flags over HTTP are the in-process
    ones (segmentation head's labels, calibration head's probability of them); ``tta`` is a per-request parameter."""
    _, bundle = twohead
    case = make_case((24, 24, 24), seed=43)
    write_case(case, tmp_path / "c.nii.gz")
    local = run_inference(Predictor(bundle), tmp_path / "c.nii.gz")
    local_tta = run_inference(Predictor(bundle), tmp_path / "c.nii.gz", InferenceOptions(tta="all_flips"))
    with LiveServer(make_settings(tmp_path / "data", [bundle.path.parent])) as server:
        client = ACEClient(server.url)
        got = client.infer(tmp_path / "c.nii.gz", bundle.id)
        np.testing.assert_array_equal(got.arrays["labels"], local.labels)
        np.testing.assert_allclose(got.arrays["confidence"], local.confidence, atol=1e-6)
        np.testing.assert_array_equal(got.arrays["flags"], local.flags)
        assert got.params["tta"] == "none"
        flipped = client.infer(tmp_path / "c.nii.gz", bundle.id, params={"tta": "all_flips"})
        assert flipped.params["tta"] == "all_flips"
        np.testing.assert_allclose(flipped.arrays["confidence"], local_tta.confidence, atol=1e-6)
        assert np.abs(flipped.arrays["confidence"] - got.arrays["confidence"]).max() > 1e-4
        with pytest.raises(ACECalError, match="tta"):
            client.infer(tmp_path / "c.nii.gz", bundle.id, params={"tta": "rotations"})
