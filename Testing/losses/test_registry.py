"""build_loss: every registry loss takes (logits (B, C, spatial), label map (B, 1, spatial)) -> scalar."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss, NACLLoss

from acecal.losses import LOSS_NAMES, TWO_HEAD_LOSSES, HardL1ACEandDiceCELoss, SoftL1ACEandDiceCELoss, build_loss

BASELINE = dict(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)


def _case(nch=3, spatial=(6, 5, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, nch, *spatial, generator=gen)
    labels = torch.randint(0, nch, (2, 1, *spatial), generator=gen)
    return logits, labels


def test_loss_names():
    assert LOSS_NAMES == (
        "baseline_dice_ce",
        "hardl1ace_dice_ce",
        "softl1ace_dice_ce",
        "labelsmooth_dice_ce",
        "nacl_dice",
        "dicepp_ce",
        "twohead_dice_ce_softace",
        "twohead_dice_ce_hardace",
    )
    assert set(TWO_HEAD_LOSSES) < set(LOSS_NAMES)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_has_the_same_call_signature(name):
    logits, labels = _case()
    if name in TWO_HEAD_LOSSES:  # segmentation then calibration logits
        logits = torch.cat([logits, logits.flip(1)], dim=1)
    loss_fn = build_loss(name, num_classes=3)
    assert isinstance(loss_fn, torch.nn.Module)
    x = logits.clone().requires_grad_()
    out = loss_fn(x, labels)
    assert out.shape == () and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # float label maps (as MONAI loaders produce) work too
    torch.testing.assert_close(loss_fn(logits, labels.float()), out.detach())
    # and the loss can be wrapped for deep supervision
    ds = DeepSupervisionLoss(loss_fn)
    assert torch.isfinite(ds([logits, logits[:, :, ::2, ::2, ::2]], labels.float()))


def test_registry_values_equal_the_configured_classes():
    logits, labels = _case()
    torch.testing.assert_close(
        build_loss("baseline_dice_ce", 3)(logits, labels), DiceCELoss(**BASELINE)(logits, labels)
    )
    torch.testing.assert_close(
        build_loss("labelsmooth_dice_ce", 3)(logits, labels),
        DiceCELoss(**BASELINE, label_smoothing=0.1)(logits, labels),
    )
    assert not torch.allclose(
        build_loss("labelsmooth_dice_ce", 3)(logits, labels), build_loss("baseline_dice_ce", 3)(logits, labels)
    )
    torch.testing.assert_close(
        build_loss("hardl1ace_dice_ce", 3)(logits, labels),
        HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)(logits, labels),
    )
    torch.testing.assert_close(
        build_loss("softl1ace_dice_ce", 3)(logits, labels),
        SoftL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)(logits, labels),
    )
    nacl = NACLLoss(classes=3, dim=3)(logits, labels[:, 0]) + DiceLoss(**BASELINE)(logits, labels)
    torch.testing.assert_close(build_loss("nacl_dice", 3)(logits, labels), nacl)


def test_overrides():
    logits, labels = _case()
    torch.testing.assert_close(
        build_loss("labelsmooth_dice_ce", 3, label_smoothing=0.2, lambda_dice=0.5)(logits, labels),
        DiceCELoss(**BASELINE, label_smoothing=0.2, lambda_dice=0.5)(logits, labels),
    )
    torch.testing.assert_close(
        build_loss("hardl1ace_dice_ce", 3, ace_weight=1.0, ace_params={"num_bins": 10})(logits, labels),
        HardL1ACEandDiceCELoss(ace_weight=1.0, to_onehot_y=True, softmax=True, ace_params={"num_bins": 10})(
            logits, labels
        ),
    )
    nacl = build_loss("nacl_dice", 3, nacl_params={"alpha": 0.5}, dice_weight=0.0)
    torch.testing.assert_close(nacl(logits, labels), NACLLoss(classes=3, dim=3, alpha=0.5)(logits, labels[:, 0]))
    logits2, labels2 = _case(spatial=(8, 7))
    nacl2 = build_loss("nacl_dice", 3, spatial_dims=2)
    assert torch.isfinite(nacl2(logits2, labels2))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        build_loss("nacl_dice", 3)(logits2, labels2)


def test_registry_errors():
    logits, labels = _case()
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        build_loss("dice", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("baseline_dice_ce", 1)
    with pytest.raises(ValueError, match="bad override"):
        build_loss("baseline_dice_ce", 3, not_an_argument=1)
    for name in LOSS_NAMES:
        loss_fn = build_loss(name, 3)
        channels = 6 if name in TWO_HEAD_LOSSES else 3
        with pytest.raises(ValueError, match=rf"\(B, {channels}, spatial"):
            loss_fn(torch.randn(2, 4, 6, 5, 4), labels)
        logits = _case(nch=channels)[0]
        with pytest.raises(ValueError, match="unsqueeze"):
            loss_fn(logits, labels[:, 0])
        with pytest.raises(ValueError, match="class indices"):
            loss_fn(logits, labels + 3)
        with pytest.raises(ValueError, match="non-integer"):  # every loss: the same fused label check
            loss_fn(logits, labels.float() + 0.5)
        bad = logits.clone()
        bad[0, 0, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or infinite"):
            loss_fn(bad, labels)
