"""Dice per (image, class) from label maps, as additive counts.

Predictions are the **argmax** over the probability channels (the segmentation a user sees), not a per-channel
0.5 threshold (which can mark a voxel as two classes, or none). Dice = 2 TP / (|pred| + |target|) per image and class,
computed from three int64 counts that add up over tiles and images (so the streaming accumulator can pool them).

Empty classes:

* absent from both prediction and target: **NaN** (nothing to score; excluded from every mean). MONAI's ``DiceMetric``
  gives 1 here with ``ignore_empty=False`` and NaN with ``ignore_empty=True``.
* absent from the target but predicted: **0** (every predicted voxel is a false positive). MONAI with
  ``ignore_empty=True`` gives NaN here; its ``ignore_empty=False`` gives 0, as we do.
* present in the target: the usual Dice (identical to MONAI's ``compute_dice``).

The accumulator's macro Dice averages only classes *present in the target* (so the second case does not enter it);
the per-case rows keep the 0 so a false-positive class stays visible.
"""

from __future__ import annotations

from typing import Tuple

import torch

from acecal.errors import InvalidInputError
from acecal.tensor_checks import check_batched, check_count, fused_values, label_checks, raise_if_bad, range_checks

__all__ = ["dice_counts", "dice_from_counts", "dice_scores"]


def _as_labels(x: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """(B, spatial...) int64 labels from a label map (B, 1, spatial...) or from (B, num_classes, spatial...) scores."""
    check_batched(x, name=name, shape=f"(B, 1, spatial...) (a label map) or (B, {num_classes}, spatial...)")
    x = x.detach()
    if x.shape[1] == 1:
        if x.numel():
            raise_if_bad(None, fused_values(label_checks(x)), label_name=name, num_classes=num_classes)
        return x[:, 0].to(torch.int64)
    if x.shape[1] != num_classes:
        raise InvalidInputError(
            f"{name} has {x.shape[1]} channels; expected 1 (label map) or {num_classes} (one per class)"
        )
    if x.is_floating_point() and x.numel():
        raise_if_bad(None, fused_values(range_checks("input", x)), input_name=name)
    return x.argmax(1)


@torch.no_grad()
def dice_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, predicted and target voxel counts per (image, class).

    Args:
        pred: label map (B, 1, spatial...) of class indices, or probabilities/logits (B, num_classes, spatial...)
            (argmax over channels is taken).
        target: label map (B, 1, spatial...), or one-hot (B, num_classes, spatial...) (argmax taken).
        num_classes: C (background included).

    Returns:
        ``(tp, n_pred, n_target)``, each (B, C) int64. All three add up over disjoint tiles.

    Raises:
        ValueError: shapes that differ, labels outside [0, C), NaN.
    """
    check_count(num_classes, "num_classes")
    p = _as_labels(pred, num_classes, "pred")
    t = _as_labels(target, num_classes, "target")
    if p.shape != t.shape:
        raise InvalidInputError(
            f"prediction and target label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}"
        )
    b = p.shape[0]
    p = p.reshape(b, -1)
    t = t.reshape(b, -1)
    base = (torch.arange(b, device=p.device, dtype=torch.int64) * num_classes).view(b, 1)
    size = b * num_classes
    n_pred = torch.bincount((p + base).reshape(-1), minlength=size)
    n_target = torch.bincount((t + base).reshape(-1), minlength=size)
    hit = (p == t).reshape(-1).to(torch.int64)
    tp = torch.bincount((t + base).reshape(-1), weights=hit.to(torch.float64), minlength=size).round().to(torch.int64)
    shape = (b, num_classes)
    return tp.view(shape), n_pred.view(shape), n_target.view(shape)


def dice_from_counts(tp: torch.Tensor, n_pred: torch.Tensor, n_target: torch.Tensor) -> torch.Tensor:
    """Dice = 2 TP / (|pred| + |target|), float64, NaN where the class is in neither (any shape)."""
    denom = (n_pred + n_target).to(torch.float64)
    nan = torch.full_like(denom, float("nan"))
    return torch.where(denom > 0, 2.0 * tp.to(torch.float64) / denom.clamp(min=1), nan)


def dice_scores(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool = False
) -> torch.Tensor:
    """Dice per (image, class), (B, C) or (B, C - 1) without background; see the module docstring for empty classes."""
    tp, n_pred, n_target = dice_counts(pred, target, num_classes)
    d = dice_from_counts(tp, n_pred, n_target)
    return d if include_background else d[:, 1:]
