"""L1-ACE combined with Dice and/or cross-entropy, as trained in the papers: one class and its named variants.

:class:`L1ACEandDiceCELoss` computes ``ace_weight * ACE + dice_weight * Dice + ce_weight * CE`` with one activation
shared by the ACE and Dice terms; the named variants fix the binning and the terms (the names of the authors'
configurations, ``bundle_templates/configs/loss/*.yaml`` of github.com/cai4cai/Average-Calibration-Losses):

==========================  ===================================  ======================================
class                       loss                                 configuration
==========================  ===================================  ======================================
``HardL1ACEandDiceCELoss``  0.33 hL1-ACE + 0.33 Dice + 0.33 CE   ``hardl1ace_dice_ce`` (IEEE TMI paper)
``SoftL1ACEandDiceCELoss``  0.33 sL1-ACE + 0.33 Dice + 0.33 CE   ``softl1ace_dice_ce``
``HardL1ACEandDiceLoss``    0.5 hL1-ACE + 0.5 Dice               ``hardl1ace_dice`` (MICCAI 2024 paper)
``SoftL1ACEandDiceLoss``    0.5 sL1-ACE + 0.5 Dice               ``softl1ace_dice``
``HardL1ACEandCELoss``      0.5 hL1-ACE + 0.5 CE                 ``hardl1ace_ce``
``SoftL1ACEandCELoss``      0.5 sL1-ACE + 0.5 CE                 ``softl1ace_ce``
==========================  ===================================  ======================================

The ``*_dice_ce`` configurations one-hot encode a label-map target (``to_onehot_y=True``), apply a softmax, and use
ACE with 20 bins including background and ``ignore_empty_classes=True`` (the ACE losses' defaults), MONAI
``DiceLoss`` with :data:`PAPER_DICE_PARAMS` (every Dice term here uses them) and ``torch.nn.CrossEntropyLoss`` on the
logits. The ACE runs therefore scale Dice and CE down about three times relative to the ``DiceCELoss`` baseline.

References:
    Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
    IEEE TMI, arXiv:2506.03942. Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
    Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

from acecal.errors import InvalidInputError
from acecal.tensor_checks import check_term_weight, plain_tensor

from .ace import HardL1ACELoss, L1ACELoss, SoftL1ACELoss

__all__ = [
    "PAPER_DICE_PARAMS",
    "HardL1ACEandCELoss",
    "HardL1ACEandDiceCELoss",
    "HardL1ACEandDiceLoss",
    "L1ACEandDiceCELoss",
    "SoftL1ACEandCELoss",
    "SoftL1ACEandDiceCELoss",
    "SoftL1ACEandDiceLoss",
]

#: The papers' Dice term: MONAI ``DiceLoss`` arguments of the ACE combinations and of the ``DiceCELoss`` baseline.
PAPER_DICE_PARAMS: dict[str, Any] = {
    "include_background": True,
    "squared_pred": True,
    "smooth_nr": 0.0,
    "smooth_dr": 1e-5,
}

# arguments the combined loss owns: they must not be set again inside ace_params / dice_params
_RESERVED = ("to_onehot_y", "softmax", "sigmoid", "other_act")

Params = dict[str, Any] | None


class L1ACEandDiceCELoss(_Loss):
    """``ace_weight * L1-ACE + dice_weight * Dice + ce_weight * CE``, one softmax shared by the ACE and Dice terms.

    The ACE term is :attr:`ace_loss_class` (hard-binned here; the ``Soft...`` variants use
    :class:`~acecal.losses.SoftL1ACELoss`): it checks the inputs, applies the softmax and validates the values once
    (:meth:`~acecal.losses.L1ACELoss.prepare`); the Dice term (MONAI ``DiceLoss``) takes the same probabilities; the CE
    term (``torch.nn.CrossEntropyLoss``) the logits. A label-map target is used directly by ACE and one-hot encoded once
    for Dice and CE (for CE alone, without class weights, the class-index form is used: the same value, less memory).

    Args (keyword only; the authors' classes order them differently):
        ace_weight, dice_weight, ce_weight: term weights, finite and >= 0. Default to 0.33 each (the paper's).
            ``None`` leaves the Dice / CE term out.
        to_onehot_y: the target is a label map ``(B, 1, spatial...)`` of class indices. Defaults to False.
        softmax: apply a softmax to ``input`` for the ACE and Dice terms (CE always takes the logits, as MONAI's
            ``DiceCELoss``). Defaults to False, MONAI's convention; the papers train with ``to_onehot_y=True,
            softmax=True`` (what :func:`~acecal.losses.build_loss` builds).
        ace_params: overrides of the ACE loss's arguments (``num_bins``, ``include_background``, ``reduction``,
            ``weight``, ``ignore_empty_classes``, and ``right`` (hard) or ``empty_weight`` (soft)).
        dice_params: overrides of the ``monai.losses.DiceLoss`` arguments (defaults :data:`PAPER_DICE_PARAMS`).
        ce_params: ``torch.nn.CrossEntropyLoss`` arguments (e.g. ``weight``, ``label_smoothing``).

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` (``to_onehot_y=True``) or
        ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., IEEE TMI, arXiv:2506.03942; Barfoot et al., MICCAI 2024, arXiv:2403.06759.
    """

    ace_loss_class: ClassVar[type[L1ACELoss]] = HardL1ACELoss

    def __init__(
        self,
        *,
        ace_weight: float = 0.33,
        dice_weight: float | None = 0.33,
        ce_weight: float | None = 0.33,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: Params = None,
        dice_params: Params = None,
        ce_params: Params = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.ace_weight = check_term_weight(ace_weight, "ace_weight", who)
        self.dice_weight = 0.0 if dice_weight is None else check_term_weight(dice_weight, "dice_weight", who)
        self.ce_weight = 0.0 if ce_weight is None else check_term_weight(ce_weight, "ce_weight", who)
        for name, params in (("ace_params", ace_params), ("dice_params", dice_params), ("ce_params", ce_params)):
            if params is not None and not isinstance(params, dict):
                raise InvalidInputError(
                    f"{who}: {name} must be a dict of keyword arguments or None, got {type(params)}."
                )
            bad = [k for k in _RESERVED if k in (params or {})] if name != "ce_params" else []
            if bad:
                raise InvalidInputError(
                    f"{who}: set {', '.join(bad)} on the combined loss itself, not in {name} "
                    "(the ACE and Dice terms share one activation and one target format)."
                )
        self.to_onehot_y = bool(to_onehot_y)
        self.softmax = bool(softmax)
        # the ACE term owns the activation; Dice receives its probabilities
        self.ace = self.ace_loss_class(**(ace_params or {}), to_onehot_y=self.to_onehot_y, softmax=self.softmax)
        self.dice = (
            DiceLoss(**{**PAPER_DICE_PARAMS, **(dice_params or {})}, to_onehot_y=False, softmax=False)
            if dice_weight is not None
            else None
        )
        self.cross_entropy = torch.nn.CrossEntropyLoss(**(ce_params or {})) if ce_weight is not None else None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits of shape ``(B, C, spatial...)`` (with ``softmax=True``; otherwise probabilities for the ACE
                and Dice terms; the CE term always treats ``input`` as logits).
            target: label map ``(B, 1, spatial...)`` with ``to_onehot_y=True``, else one-hot / probabilities
                ``(B, C, spatial...)``.

        Returns:
            0-d tensor ``ace_weight * ACE + dice_weight * Dice + ce_weight * CE`` (terms left out are not computed).

        Raises:
            ValueError: as :class:`~acecal.losses.HardL1ACELoss` (NaN/inf, range, shapes, labels).
        """
        input = plain_tensor(input)
        probs, target = self.ace.prepare(input, target)
        total = self.ace_weight * self.ace.from_probs(probs, target)
        labels = self.to_onehot_y and input.shape[1] > 1  # as the ACE term reads the target
        onehot = None
        if self.dice is not None:
            onehot = one_hot(target, num_classes=input.shape[1], dtype=probs.dtype) if labels else target
            total = total + self.dice_weight * self.dice(probs, onehot)
        if self.cross_entropy is not None:
            total = total + self.ce_weight * self._ce(input, target, onehot, labels)
        return total

    def _ce(
        self, logits: torch.Tensor, target: torch.Tensor, onehot: torch.Tensor | None, labels: bool
    ) -> torch.Tensor:
        """CE on logits. With probability targets as the authors' code; the class-index form (same value, less
        memory) is used for a label map when no one-hot tensor exists and no class ``weight`` is given."""
        assert self.cross_entropy is not None
        if labels:
            if onehot is None and self.cross_entropy.weight is None:
                return self.cross_entropy(logits, target[:, 0].long())
            if onehot is None:
                onehot = one_hot(target, num_classes=logits.shape[1], dtype=logits.dtype)
            return self.cross_entropy(logits, onehot.to(logits.dtype))
        if logits.shape[1] == 1:  # single channel: binary cross-entropy on the logit, like MONAI's DiceCELoss
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return self.cross_entropy(logits, target.to(logits.dtype))


class _L1ACEandDiceLoss(L1ACEandDiceCELoss):
    """The ACE + Dice signature: ``0.5 * ACE + 0.5 * Dice``, no CE term."""

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        dice_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: Params = None,
        dice_params: Params = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight,
            dice_weight=dice_weight,
            ce_weight=None,
            to_onehot_y=to_onehot_y,
            softmax=softmax,
            ace_params=ace_params,
            dice_params=dice_params,
        )


class _L1ACEandCELoss(L1ACEandDiceCELoss):
    """The ACE + CE signature: ``0.5 * ACE + 0.5 * CE``, no Dice term."""

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        ce_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: Params = None,
        ce_params: Params = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight,
            dice_weight=None,
            ce_weight=ce_weight,
            to_onehot_y=to_onehot_y,
            softmax=softmax,
            ace_params=ace_params,
            ce_params=ce_params,
        )


class HardL1ACEandDiceCELoss(L1ACEandDiceCELoss):
    """``0.33 * hL1-ACE + 0.33 * Dice + 0.33 * CE``, the paper's ``hardl1ace_dice_ce``; see
    :class:`L1ACEandDiceCELoss` for the arguments."""


class SoftL1ACEandDiceCELoss(L1ACEandDiceCELoss):
    """``0.33 * sL1-ACE + 0.33 * Dice + 0.33 * CE``, the paper's ``softl1ace_dice_ce``: as
    :class:`HardL1ACEandDiceCELoss` with :class:`~acecal.losses.SoftL1ACELoss` (``empty_weight=0.01``)."""

    ace_loss_class = SoftL1ACELoss


class HardL1ACEandDiceLoss(_L1ACEandDiceLoss):
    """``0.5 * hL1-ACE + 0.5 * Dice`` (the MICCAI 2024 paper's headline result); arguments as
    :class:`L1ACEandDiceCELoss` without CE."""


class SoftL1ACEandDiceLoss(_L1ACEandDiceLoss):
    """``0.5 * sL1-ACE + 0.5 * Dice``; arguments as :class:`L1ACEandDiceCELoss` without CE."""

    ace_loss_class = SoftL1ACELoss


class HardL1ACEandCELoss(_L1ACEandCELoss):
    """``0.5 * hL1-ACE + 0.5 * CE``; arguments as :class:`L1ACEandDiceCELoss` without Dice."""


class SoftL1ACEandCELoss(_L1ACEandCELoss):
    """``0.5 * sL1-ACE + 0.5 * CE``; arguments as :class:`L1ACEandDiceCELoss` without Dice."""

    ace_loss_class = SoftL1ACELoss
