"""The two-head loss (baseline Dice+CE on the segmentation head, CE + L1-ACE on the calibration head) and DSC++."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from acecal.losses import (
    DicePlusPlusCELoss,
    DicePlusPlusLoss,
    HardL1ACEandCELoss,
    SoftL1ACEandCELoss,
    TwoHeadLoss,
    build_loss,
)

BASELINE = dict(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)


def _case(c=3, spatial=(6, 5, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2 * c, *spatial, generator=gen), torch.randint(0, c, (2, 1, *spatial), generator=gen)


def test_twohead_loss_is_baseline_on_segmentation_plus_ce_ace_on_calibration():
    logits, labels = _case()
    seg, cal = logits[:, :3], logits[:, 3:]
    soft = build_loss("twohead_dice_ce_softace", 3)
    expected = DiceCELoss(**BASELINE)(seg, labels) + SoftL1ACEandCELoss(
        ace_weight=2.0, ce_weight=1.0, to_onehot_y=True, softmax=True, ace_params={"num_bins": 20}
    )(cal, labels)
    torch.testing.assert_close(soft(logits, labels), expected)
    hard = build_loss("twohead_dice_ce_hardace", 3, ace_weight=4.0, num_bins=10, calibration_weight=0.5)
    expected = DiceCELoss(**BASELINE)(seg, labels) + 0.5 * HardL1ACEandCELoss(
        ace_weight=4.0, ce_weight=1.0, to_onehot_y=True, softmax=True, ace_params={"num_bins": 10}
    )(cal, labels)
    torch.testing.assert_close(hard(logits, labels), expected)


def test_each_head_gets_only_its_own_loss_gradient():
    logits, labels = _case()
    x = logits.clone().requires_grad_()
    build_loss("twohead_dice_ce_softace", 3)(x, labels).backward()
    seg = logits[:, :3].clone().requires_grad_()
    DiceCELoss(**BASELINE)(seg, labels).backward()
    torch.testing.assert_close(x.grad[:, :3], seg.grad)  # the segmentation head sees exactly the baseline's gradient
    cal = logits[:, 3:].clone().requires_grad_()
    SoftL1ACEandCELoss(ace_weight=2.0, ce_weight=1.0, to_onehot_y=True, softmax=True)(cal, labels).backward()
    torch.testing.assert_close(x.grad[:, 3:], cal.grad)
    # ACE weight 0 leaves plain CE on the calibration head (the warm-up loss of a two-head network)
    warm = build_loss("twohead_dice_ce_softace", 3, ace_weight=0.0)
    torch.testing.assert_close(
        warm(logits, labels),
        DiceCELoss(**BASELINE)(logits[:, :3], labels) + torch.nn.functional.cross_entropy(logits[:, 3:], labels[:, 0]),
    )


def test_twohead_loss_errors():
    logits, labels = _case()
    with pytest.raises(ValueError, match=r"\(B, 6, spatial"):
        build_loss("twohead_dice_ce_softace", 3)(logits[:, :3], labels)
    with pytest.raises(ValueError, match="binning"):
        TwoHeadLoss(DiceCELoss(**BASELINE), 3, binning="medium")
    with pytest.raises(ValueError, match="calibration_weight"):
        build_loss("twohead_dice_ce_softace", 3, calibration_weight=-1)
    with pytest.raises(ValueError, match="bad override"):
        build_loss("twohead_dice_ce_softace", 3, dice_weight=1)


def test_dicepp_hand_computed():
    """One image, 2 classes, 4 voxels, probabilities given (no softmax)."""
    p1 = torch.tensor([0.9, 0.6, 0.2, 0.1])  # class 1 probability; class 0 = 1 - p1
    y1 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    probs = torch.stack([1 - p1, p1])[None, :, :, None]  # (1, 2, 4, 1)
    target = torch.stack([1 - y1, y1])[None, :, :, None]
    # class 1: TP = 0.9 + 0.6 = 1.5; FN++ = 0.1^2 + 0.4^2 = 0.17; FP++ = 0.2^2 + 0.1^2 = 0.05
    # class 0: TP = 0.8 + 0.9 = 1.7; FN++ = 0.2^2 + 0.1^2 = 0.05; FP++ = 0.1^2 + 0.4^2 = 0.17
    eps = 1e-5
    d1 = (1.5 + eps) / (1.5 + 0.5 * 0.17 + 0.5 * 0.05 + eps)
    d0 = (1.7 + eps) / (1.7 + 0.5 * 0.05 + 0.5 * 0.17 + eps)
    expected = 1 - (d0 + d1) / 2  # 1 - (1.5 / 1.61 + 1.7 / 1.81) / 2 = 1 - (0.931677 + 0.939227) / 2
    got = DicePlusPlusLoss(gamma=2.0)(probs, target)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(got) == pytest.approx(0.0645478, abs=1e-6)
    only_fg = DicePlusPlusLoss(gamma=2.0, include_background=False)(probs, target)
    assert float(only_fg) == pytest.approx(1 - d1, abs=1e-6)


def test_dicepp_gamma_one_is_soft_dice_and_gamma_two_forgives_uncertain_errors():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 5, 5, generator=gen)
    labels = torch.randint(0, 3, (2, 1, 5, 5, 5), generator=gen)
    eps = 1e-5
    plain = DiceLoss(to_onehot_y=True, softmax=True, smooth_nr=2 * eps, smooth_dr=2 * eps)(logits, labels)
    torch.testing.assert_close(DicePlusPlusLoss(gamma=1.0, to_onehot_y=True, softmax=True)(logits, labels), plain)
    # an uncertain prediction (p = 0.5 everywhere) costs less under gamma = 2 than under gamma = 1
    half = torch.zeros(1, 2, 4, 4, 4)
    y = torch.randint(0, 2, (1, 1, 4, 4, 4), generator=gen)
    assert DicePlusPlusLoss(gamma=2.0, to_onehot_y=True, softmax=True)(half, y) < DicePlusPlusLoss(
        gamma=1.0, to_onehot_y=True, softmax=True
    )(half, y)


def test_dicepp_ce_registry():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=gen)
    loss = build_loss("dicepp_ce", 3)(logits, labels)
    expected = DicePlusPlusLoss(gamma=2.0, to_onehot_y=True, softmax=True)(
        logits, labels
    ) + torch.nn.functional.cross_entropy(logits, labels[:, 0])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    torch.testing.assert_close(
        build_loss("dicepp_ce", 3, gamma=3.0, ce_weight=0.0)(logits, labels),
        DicePlusPlusLoss(gamma=3.0, to_onehot_y=True, softmax=True)(logits, labels),
    )
    with pytest.raises(ValueError, match="gamma"):
        DicePlusPlusCELoss(gamma=0.5)
