"""The session fixture ``tiny_bundle``: trained by the real engine, a valid bundle the registry lists, and it
segments a fresh synthetic case."""

import json

import numpy as np
import torch
from synthetic import dice, make_case, to_sitk

from acecal.bundles import Bundle, ModelRegistry
from acecal.data.io import to_metatensor
from acecal.data.transforms import model_space_transforms
from acecal.inference.window import sliding_window_logits


def test_tiny_bundle_is_listed_and_valid(tiny_bundle):
    reg = ModelRegistry([tiny_bundle.parent])
    assert reg.ids() == ["tiny-sphere"]
    b = reg.get("tiny-sphere")
    assert b.config.labels == {"0": "background", "1": "sphere"}
    cfg = json.loads((tiny_bundle / "bundle.json").read_text())
    assert cfg["metrics"]["dice"] > 0.9
    for k in ("ace", "ece", "mce"):
        assert 0.0 <= cfg["metrics"][k] <= 1.0
    assert cfg["training"]["epochs"] == 12 and len(cfg["training"]["split"]["val"]) == 2
    assert 0.5 <= cfg["uncertainty_threshold"] <= 0.95
    card = (tiny_bundle / "README.md").read_text()
    assert "Validation metrics" in card and "CC0" in card and "baseline_dice_ce" in card


def test_tiny_bundle_segments_a_fresh_case(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    net = b.load_network()
    for seed in (4242, 4243):
        case = make_case((24, 24, 24), seed=seed)
        d = model_space_transforms(b.config, load=False)(
            {"image": to_metatensor(to_sitk(case.image, case)), "label": to_metatensor(to_sitk(case.label, case))}
        )
        logits = sliding_window_logits(net, d["image"][None], b.config)
        pred = logits.argmax(1)[0].numpy()
        assert dice(pred, np.asarray(d["label"][0]), 1) > 0.9
        assert torch.isfinite(logits).all()
