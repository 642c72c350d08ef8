"""CalibrationAccumulator.update(..., predicted=labels): Dice of given labels, calibration of the given probabilities
(a two-head network serves one head's labels with the other head's probabilities)."""

from __future__ import annotations

import pytest
import torch

from acecal.errors import InvalidInputError
from acecal.metrics import CalibrationAccumulator


def test_dice_from_given_labels_calibration_from_probs():
    target = torch.zeros(1, 1, 4, 4, 1, dtype=torch.long)
    target[0, 0, :2] = 1  # 8 voxels of class 1
    probs = torch.full((1, 2, 4, 4, 1), 0.5)
    probs[:, 1] = 0.4  # argmax of probs: background everywhere (Dice of class 1 would be 0)
    probs[:, 0] = 0.6
    predicted = target.clone()
    predicted[0, 0, 0, 0] = 0  # 7 of the 8 voxels: Dice = 14 / 15
    acc = CalibrationAccumulator(2)
    acc.update(probs, target, case_id="a", predicted=predicted)
    ref = CalibrationAccumulator(2)
    ref.update(probs, target, case_id="a")
    got, plain = acc.aggregate().macro, ref.aggregate().macro
    assert got["dice"] == pytest.approx(14 / 15)
    assert plain["dice"] == pytest.approx(0.0)
    assert got["ace"] == pytest.approx(plain["ace"]) and got["ece"] == pytest.approx(plain["ece"])
    with pytest.raises(InvalidInputError, match="differ in shape"):
        acc.update(probs, target, case_id="b", predicted=predicted[..., :2, :])
