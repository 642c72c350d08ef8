"""acecal.metrics.dice: argmax Dice per (image, class) against MONAI, and its empty-class rules."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from acecal.metrics import dice_counts, dice_from_counts, dice_scores


def onehot(labels, c):
    return F.one_hot(labels[:, 0], c).movedim(-1, 1).float()


def test_matches_monai_where_target_present():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 10, 9, 5, generator=g) * 2, 1)
    target = torch.randint(0, 4, (3, 1, 10, 9, 5), generator=g)
    target[1][target[1] == 2] = 0  # class 2 absent from image 1's target
    pred = probs.argmax(1, keepdim=True)
    ours = dice_scores(probs, target, 4, include_background=True)
    ref = compute_dice(onehot(pred, 4), onehot(target, 4), include_background=True, ignore_empty=False)
    torch.testing.assert_close(ours, ref.double(), atol=1e-6, rtol=0)
    # the same from a predicted label map and from a one-hot target
    torch.testing.assert_close(dice_scores(pred, onehot(target, 4), 4, include_background=True), ours)
    torch.testing.assert_close(dice_scores(probs, target, 4), ours[:, 1:])


def test_empty_class_rules():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    pred = torch.zeros_like(target)
    pred[0, 0, 0] = 1  # half of class 1 found
    pred[0, 0, 3, 0] = 2  # class 2 predicted but absent from the target -> 0
    d = dice_scores(pred, target, 4, include_background=True)[0]
    assert d[1].item() == pytest.approx(2 * 4 / (4 + 8))
    assert d[2].item() == 0.0
    assert math.isnan(d[3].item())  # class 3 in neither -> NaN
    tp, n_pred, n_target = dice_counts(pred, target, 4)
    assert tp.dtype == torch.int64 and tp.shape == (1, 4)
    assert n_pred.tolist() == [[11, 4, 1, 0]] and n_target.tolist() == [[8, 8, 0, 0]]


def test_counts_add_up_over_tiles():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 8, 6, generator=g)
    target = torch.randint(0, 3, (2, 1, 8, 6), generator=g)
    whole = dice_counts(probs, target, 3)
    parts = [dice_counts(probs[..., s], target[..., s], 3) for s in (slice(0, 2), slice(2, 6))]
    for k in range(3):
        assert torch.equal(whole[k], parts[0][k] + parts[1][k])
    torch.testing.assert_close(dice_from_counts(*whole), dice_scores(probs, target, 3, include_background=True))


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (torch.zeros(1, 1, 4, dtype=torch.long), torch.full((1, 1, 4), 3), r"\[0, 2\]"),
        (torch.zeros(1, 1, 4, dtype=torch.long), torch.zeros(1, 1, 5, dtype=torch.long), "shape"),
        (torch.zeros(1, 2, 4), torch.zeros(1, 1, 4, dtype=torch.long), "channels"),
        (torch.full((1, 3, 4), float("nan")), torch.zeros(1, 1, 4, dtype=torch.long), "NaN"),
        (torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long), "shape"),
        (torch.full((1, 1, 4), 0.5), torch.zeros(1, 1, 4, dtype=torch.long), "non-integer"),
    ],
)
def test_bad_input(pred, target, match):
    with pytest.raises(ValueError, match=match):
        dice_counts(pred, target, 3)
