"""Flip test-time augmentation on the tiny trained bundle: the softmax averaged over flips, stored in the bundle and
overridable per call."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from synthetic import make_case, write_case

from acecal.bundles import Bundle
from acecal.inference.pipeline import InferenceOptions, run_inference
from acecal.inference.predictor import Predictor
from acecal.inference.window import TTA_FLIPS, sliding_window_logits


@pytest.fixture(scope="module")
def model(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    return bundle, bundle.load_network()


def _image(seed: int = 3) -> torch.Tensor:
    """A model-space image the size of the tiny bundle's ROI (one window: flipping commutes with the window)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, 24, 24, 24, generator=gen)


def test_tta_is_the_mean_softmax_over_the_flips(model):
    bundle, net = model
    x = _image()
    assert len(TTA_FLIPS["axis_flips"]) == 4 and len(TTA_FLIPS["all_flips"]) == 8
    assert len(set(TTA_FLIPS["all_flips"])) == 8
    for tta, flips in TTA_FLIPS.items():
        got = torch.softmax(sliding_window_logits(net, x, bundle.config, tta=tta), 1)
        expected = torch.stack(
            [
                torch.softmax(sliding_window_logits(net, x.flip(d), bundle.config, tta="none"), 1).flip(d)
                if d
                else torch.softmax(sliding_window_logits(net, x, bundle.config, tta="none"), 1)
                for d in flips
            ]
        ).mean(0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = sliding_window_logits(net, x, bundle.config, tta="none")
    assert not torch.allclose(
        torch.softmax(plain, 1),
        torch.softmax(sliding_window_logits(net, x, bundle.config, tta="all_flips"), 1),
        atol=1e-4,
    )


def test_all_flips_makes_the_prediction_flip_equivariant(model):
    """The 8 flips form a group: TTA(flip(x)) = flip(TTA(x)) for any network; one pass is not equivariant."""
    bundle, net = model
    x = _image(seed=9)
    for dims in ((2,), (3, 4), (2, 3, 4)):
        tta = sliding_window_logits(net, x, bundle.config, tta="all_flips")
        tta_flipped = sliding_window_logits(net, x.flip(dims), bundle.config, tta="all_flips")
        torch.testing.assert_close(tta_flipped, tta.flip(dims), atol=1e-5, rtol=1e-5)
        one = sliding_window_logits(net, x, bundle.config, tta="none")
        one_flipped = sliding_window_logits(net, x.flip(dims), bundle.config, tta="none")
        assert (one_flipped - one.flip(dims)).abs().max() > 1e-3
    # a flip-symmetric image gets a flip-symmetric prediction
    sym = x + x.flip(2)
    sym = sym + sym.flip(3)
    sym = sym + sym.flip(4)
    p = torch.softmax(sliding_window_logits(net, sym, bundle.config, tta="all_flips"), 1)
    for dims in ((2,), (3,), (4,)):
        torch.testing.assert_close(p, p.flip(dims), atol=1e-5, rtol=1e-5)


def test_bundle_setting_and_per_call_override(model, tmp_path):
    bundle, _ = model
    folder = tmp_path / "tiny-tta"
    shutil.copytree(bundle.path, folder)
    raw = json.loads((folder / "bundle.json").read_text())
    raw.update(id="tiny-tta", tta="all_flips")
    (folder / "bundle.json").write_text(json.dumps(raw))
    with_tta = Predictor(Bundle.load(folder))
    without = Predictor(bundle)
    case = make_case((24, 24, 24), seed=12)
    write_case(case, tmp_path / "c.nii.gz")
    served = with_tta.predict(tmp_path / "c.nii.gz")
    np.testing.assert_allclose(served.probs, without.predict(tmp_path / "c.nii.gz", tta="all_flips").probs, atol=1e-6)
    np.testing.assert_allclose(
        with_tta.predict(tmp_path / "c.nii.gz", tta="none").probs,
        without.predict(tmp_path / "c.nii.gz").probs,
        atol=1e-6,
    )
    assert np.abs(served.probs - without.predict(tmp_path / "c.nii.gz").probs).max() > 1e-4
    np.testing.assert_allclose(served.probs.sum(0), 1.0, atol=1e-5)
    out = run_inference(with_tta, tmp_path / "c.nii.gz", InferenceOptions(tta="axis_flips"))
    assert out.report["params"]["tta"] == "axis_flips"
    assert run_inference(with_tta, tmp_path / "c.nii.gz").report["params"]["tta"] == "all_flips"
    with pytest.raises(ValueError, match="test-time augmentation"):
        without.predict(tmp_path / "c.nii.gz", tta="rotations")
