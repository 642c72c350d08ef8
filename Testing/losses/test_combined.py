"""Combined ACE + Dice / CE losses equal the weighted sum of independently computed terms (paper configurations)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from acecal.losses import (
    HardL1ACEandCELoss,
    HardL1ACEandDiceCELoss,
    HardL1ACEandDiceLoss,
    HardL1ACELoss,
    L1ACEandDiceCELoss,
    SoftL1ACEandCELoss,
    SoftL1ACEandDiceCELoss,
    SoftL1ACEandDiceLoss,
    SoftL1ACELoss,
)

PAPER_DICE = dict(include_background=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)


def _case(seed=0, nch=4):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2, nch, 6, 5, 4, generator=gen)
    labels = torch.randint(0, nch, (2, 1, 6, 5, 4), generator=gen)
    labels[0][labels[0] == 2] = 0  # an absent class
    onehot = torch.nn.functional.one_hot(labels[:, 0], nch).movedim(-1, 1).float()
    return logits, labels, onehot


def _terms(ace_cls, logits, labels, onehot):
    ace = ace_cls(to_onehot_y=True, softmax=True)(logits, labels)
    dice = DiceLoss(**PAPER_DICE)(logits, onehot)
    ce = torch.nn.CrossEntropyLoss()(logits, onehot)
    return ace, dice, ce


@pytest.mark.parametrize(
    "combined, ace_cls, weights",
    [
        (HardL1ACEandDiceCELoss, HardL1ACELoss, (0.33, 0.33, 0.33)),
        (SoftL1ACEandDiceCELoss, SoftL1ACELoss, (0.33, 0.33, 0.33)),
        (HardL1ACEandDiceLoss, HardL1ACELoss, (0.5, 0.5, 0.0)),
        (SoftL1ACEandDiceLoss, SoftL1ACELoss, (0.5, 0.5, 0.0)),
        (HardL1ACEandCELoss, HardL1ACELoss, (0.5, 0.0, 0.5)),
        (SoftL1ACEandCELoss, SoftL1ACELoss, (0.5, 0.0, 0.5)),
    ],
)
def test_combined_equals_weighted_sum_of_terms(combined, ace_cls, weights):
    logits, labels, onehot = _case()
    ace, dice, ce = _terms(ace_cls, logits, labels, onehot)
    expected = weights[0] * ace + weights[1] * dice + weights[2] * ce
    x = logits.clone().requires_grad_()
    out = combined(to_onehot_y=True, softmax=True)(x, labels)
    torch.testing.assert_close(out, expected)
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # one-hot target without to_onehot_y gives the same value
    torch.testing.assert_close(combined(softmax=True)(logits, onehot), expected)


def test_gradients_equal_sum_of_term_gradients():
    logits, labels, onehot = _case(1)
    x1 = logits.clone().requires_grad_()
    HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)(x1, labels).backward()
    x2 = logits.clone().requires_grad_()
    ace, dice, ce = _terms(HardL1ACELoss, x2, labels, onehot)
    (0.33 * ace + 0.33 * dice + 0.33 * ce).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_params_overrides_and_weights():
    logits, labels, onehot = _case(2)
    loss = SoftL1ACEandDiceCELoss(
        ace_weight=1.0,
        dice_weight=0.25,
        ce_weight=2.0,
        to_onehot_y=True,
        softmax=True,
        ace_params={"num_bins": 10, "include_background": False, "empty_weight": 0.05},
        dice_params={"include_background": False, "squared_pred": False},
        ce_params={"label_smoothing": 0.1},
    )
    ace = SoftL1ACELoss(num_bins=10, include_background=False, empty_weight=0.05, to_onehot_y=True, softmax=True)
    dice = DiceLoss(**{**PAPER_DICE, "include_background": False, "squared_pred": False})
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    expected = ace(logits, labels) + 0.25 * dice(logits, onehot) + 2.0 * ce(logits, onehot)
    torch.testing.assert_close(loss(logits, labels), expected)
    hard = HardL1ACEandCELoss(to_onehot_y=True, softmax=True, ace_params={"right": True, "weight": [1, 2, 3, 4]})
    expected = 0.5 * HardL1ACELoss(right=True, weight=[1, 2, 3, 4], to_onehot_y=True, softmax=True)(logits, labels)
    expected = expected + 0.5 * torch.nn.CrossEntropyLoss()(logits, labels[:, 0])
    torch.testing.assert_close(hard(logits, labels), expected)


def test_ce_class_weights_follow_the_probability_target_form():
    # with class weights the authors' probability-target CE divides by the voxel count
    logits, labels, onehot = _case(3)
    w = torch.tensor([0.2, 1.0, 2.0, 3.0])
    loss = HardL1ACEandCELoss(ace_weight=0.0, to_onehot_y=True, softmax=True, ce_params={"weight": w})
    torch.testing.assert_close(loss(logits, labels), 0.5 * torch.nn.CrossEntropyLoss(weight=w)(logits, onehot))


def test_combined_errors():
    logits, labels, _ = _case(4)
    with pytest.raises(ValueError, match="ace_weight"):
        HardL1ACEandDiceCELoss(ace_weight=-1.0)
    with pytest.raises(ValueError, match="dice_weight"):
        SoftL1ACEandDiceLoss(dice_weight=float("nan"))
    with pytest.raises(ValueError, match="to_onehot_y on the combined loss"):
        HardL1ACEandDiceCELoss(ace_params={"to_onehot_y": True})
    with pytest.raises(ValueError, match="softmax on the combined loss"):
        HardL1ACEandDiceCELoss(dice_params={"softmax": True})
    with pytest.raises(ValueError, match="dict"):
        HardL1ACEandDiceCELoss(ce_params=[("weight", None)])
    with pytest.raises(TypeError):
        HardL1ACEandDiceCELoss(0.5, 0.25, 0.25)  # keyword only: the published classes order them differently
    loss = HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)
    bad = logits.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        loss(bad, labels)
    with pytest.raises(ValueError, match="class indices"):
        loss(logits, labels + 4)
    with pytest.raises(ValueError, match="label map of shape"):
        loss(logits, labels[:, 0])


@pytest.mark.parametrize("ace_cls", [HardL1ACELoss, SoftL1ACELoss])
def test_prepare_then_from_probs_is_the_loss(ace_cls):
    # the public two-step API the combined losses use: prepare() applies the activation once, from_probs() the rest
    logits, labels, onehot = _case(5)
    for target, to_onehot in ((labels, True), (onehot, False)):
        ace = ace_cls(to_onehot_y=to_onehot, softmax=True, include_background=False)
        probs, prepared = ace.prepare(logits, target)
        torch.testing.assert_close(probs, torch.softmax(logits, 1))
        assert prepared.shape == target.shape
        torch.testing.assert_close(ace.from_probs(probs, prepared), ace(logits, target))


def test_the_general_combined_loss_leaves_out_terms_set_to_none():
    logits, labels, onehot = _case(6)
    ace, dice, ce = _terms(HardL1ACELoss, logits, labels, onehot)
    general = L1ACEandDiceCELoss(ace_weight=1.0, dice_weight=None, ce_weight=0.25, to_onehot_y=True, softmax=True)
    assert general.dice is None
    torch.testing.assert_close(general(logits, labels), ace + 0.25 * ce)
    torch.testing.assert_close(
        L1ACEandDiceCELoss(to_onehot_y=True, softmax=True)(logits, labels),
        HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)(logits, labels),
    )
