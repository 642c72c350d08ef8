"""The DSC++ (Dice++) loss: a Dice loss that penalises confident mistakes more, for better calibrated Dice training.

Yeung, Rundo, Nan, Sala, Schönlieb, Yang, "Calibrating the Dice loss to handle neural network overconfidence for
biomedical image segmentation", Journal of Digital Imaging 36, 739-752 (2023), doi:10.1007/s10278-022-00735-3.

Per image b and class c, with p the softmax probabilities and y the one-hot target, sums over voxels::

    TP   = sum p y
    FN++ = sum (y (1 - p))^gamma
    FP++ = sum ((1 - y) p)^gamma
    DSC++[b, c] = (TP + eps) / (TP + 0.5 FN++ + 0.5 FP++ + eps)

and the loss is ``1 - DSC++`` averaged over images and classes. With ``gamma = 1`` it is the plain soft Dice
``2 TP / (2 TP + FN + FP)``; ``gamma > 1`` shrinks the penalty of small (uncertain) errors relative to confident ones,
so the network is no longer pushed to saturate its probabilities (the paper uses gamma = 2). Unlike the authors'
Keras code the one-hot target is not clipped to [eps, 1 - eps] (it only moves the loss by O(eps)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

from acecal.errors import InvalidInputError
from acecal.tensor_checks import check_prediction, check_term_weight, plain_tensor

__all__ = ["DicePlusPlusLoss", "DicePlusPlusCELoss"]


class DicePlusPlusLoss(_Loss):
    """DSC++ loss (Yeung et al. 2023) on logits or probabilities, MONAI ``DiceLoss``-style arguments.

    Args:
        gamma: focal exponent on the false-positive and false-negative terms (>= 1). Defaults to 2 (the paper's).
        include_background: keep channel 0 in the mean. Defaults to True (as the project's Dice terms).
        to_onehot_y: the target is a label map ``(B, 1, spatial...)``. Defaults to False.
        softmax: apply a softmax to the input first. Defaults to False.
        smooth: ``eps`` in numerator and denominator. Defaults to 1e-5.
        batch: sum over the batch before dividing (one score per class). Defaults to False (per image).

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` (``to_onehot_y``) or
        ``(B, C, spatial...)``; output ``()``.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        include_background: bool = True,
        to_onehot_y: bool = False,
        softmax: bool = False,
        smooth: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 1:
            raise InvalidInputError(f"DicePlusPlusLoss: gamma must be a finite number >= 1, got {gamma!r}.")
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not smooth > 0:
            raise InvalidInputError(f"DicePlusPlusLoss: smooth must be a number > 0, got {smooth!r}.")
        self.gamma = float(gamma)
        self.include_background = bool(include_background)
        self.to_onehot_y = bool(to_onehot_y)
        self.softmax = bool(softmax)
        self.smooth = float(smooth)
        self.batch = bool(batch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = plain_tensor(input), plain_tensor(target)
        check_prediction(input, "DicePlusPlusLoss")
        n_classes = input.shape[1]
        probs = torch.softmax(input, 1) if self.softmax and n_classes > 1 else input
        if self.to_onehot_y:
            target = one_hot(target, num_classes=n_classes, dtype=probs.dtype)
        else:
            target = target.to(probs.dtype)
        if target.shape != probs.shape:
            raise InvalidInputError(
                f"DicePlusPlusLoss: target shape {tuple(target.shape)} does not match the input {tuple(probs.shape)}."
            )
        if not self.include_background and n_classes > 1:
            probs, target = probs[:, 1:], target[:, 1:]
        dims = tuple(range(2, probs.ndim))
        if self.batch:
            dims = (0, *dims)
        tp = (probs * target).sum(dims)
        fn = ((target * (1.0 - probs)) ** self.gamma).sum(dims)
        fp = (((1.0 - target) * probs) ** self.gamma).sum(dims)
        score = (tp + self.smooth) / (tp + 0.5 * fn + 0.5 * fp + self.smooth)
        return (1.0 - score).mean()


class DicePlusPlusCELoss(_Loss):
    """The baseline Dice + CE with the Dice replaced by DSC++: ``dice_weight * DSC++ + ce_weight * CE``.

    CE is MONAI ``DiceCELoss``'s cross-entropy on the logits (class indices of the label map), so with ``gamma = 1``
    and squared predictions off this is the baseline's composition.

    Args:
        gamma, include_background, smooth: as :class:`DicePlusPlusLoss`.
        dice_weight, ce_weight: term weights. Default to 1.0 each (as the baseline ``DiceCELoss``).
        ce_params: ``torch.nn.CrossEntropyLoss`` arguments (e.g. ``label_smoothing``).

    Shapes:
        ``logits`` ``(B, C, spatial...)``; ``label_map`` ``(B, 1, spatial...)``; output ``()``.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        include_background: bool = True,
        smooth: float = 1e-5,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dice_weight = check_term_weight(dice_weight, "dice_weight", "DicePlusPlusCELoss")
        self.ce_weight = check_term_weight(ce_weight, "ce_weight", "DicePlusPlusCELoss")
        self.dice = DicePlusPlusLoss(
            gamma=gamma, include_background=include_background, to_onehot_y=True, softmax=True, smooth=smooth
        )
        self.cross_entropy = torch.nn.CrossEntropyLoss(**(ce_params or {}))

    def forward(self, logits: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        ce = self.cross_entropy(logits, label_map[:, 0].long())
        return self.dice_weight * self.dice(logits, label_map) + self.ce_weight * ce
