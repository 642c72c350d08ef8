"""L1-ACE combined with Dice and/or cross-entropy, as trained in the papers.

The paper configurations (``bundle_templates/configs/loss/{hard,soft}l1ace_dice_ce.yaml`` of the published code) are
``0.33 * ACE + 0.33 * Dice + 0.33 * CE`` with a label-map target one-hot encoded (``to_onehot_y=True``), softmax,
ACE with 20 bins including background and ``ignore_empty_classes=True``, MONAI ``DiceLoss(include_background=True,
squared_pred=True, smooth_nr=0, smooth_dr=1e-5)`` and ``torch.nn.CrossEntropyLoss`` on the logits. Note that the
ACE runs therefore scale Dice and CE down about three times relative to the ``DiceCELoss`` baseline.

References:
    Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
    IEEE TMI, arXiv:2506.03942. Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
    Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

from .ace import HardL1ACELoss, SoftL1ACELoss, _L1ACELoss
from .binning import _plain

__all__ = [
    "HardL1ACEandCELoss",
    "HardL1ACEandDiceCELoss",
    "HardL1ACEandDiceLoss",
    "SoftL1ACEandCELoss",
    "SoftL1ACEandDiceCELoss",
    "SoftL1ACEandDiceLoss",
]

# arguments the combined loss owns: they must not be set again inside ace_params / dice_params
_RESERVED = ("to_onehot_y", "softmax", "sigmoid", "other_act")
_ACE_DEFAULTS: dict[str, Any] = {
    "num_bins": 20,
    "include_background": True,
    "reduction": "mean",
    "ignore_empty_classes": True,
}
_DICE_DEFAULTS: dict[str, Any] = {
    "include_background": True,
    "squared_pred": True,
    "smooth_nr": 0.0,
    "smooth_dr": 1e-5,
    "reduction": "mean",
}
_CE_DEFAULTS: dict[str, Any] = {"reduction": "mean"}


class _ACECombinedLoss(_Loss):
    """``ace_weight * ACE + dice_weight * Dice + ce_weight * CE`` with one softmax shared by ACE and Dice."""

    _ace_class: type[_L1ACELoss] = HardL1ACELoss
    _ace_extra_defaults: dict[str, Any] = {}
    _terms: tuple[str, ...] = ("dice", "ce")

    def __init__(
        self,
        *,
        ace_weight: float,
        dice_weight: float = 0.0,
        ce_weight: float = 0.0,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        for name, value in (("ace_weight", ace_weight), ("dice_weight", dice_weight), ("ce_weight", ce_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{who}: {name} must be a finite number >= 0, got {value!r}.")
        for name, params in (("ace_params", ace_params), ("dice_params", dice_params), ("ce_params", ce_params)):
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"{who}: {name} must be a dict of keyword arguments or None, got {type(params)}.")
            bad = [k for k in _RESERVED if k in (params or {})] if name != "ce_params" else []
            if bad:
                raise ValueError(
                    f"{who}: set {', '.join(bad)} on the combined loss itself, not in {name} "
                    "(the ACE and Dice terms share one activation and one target format)."
                )
        self.ace_weight = float(ace_weight)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.to_onehot_y = bool(to_onehot_y)
        self.softmax = bool(softmax)
        # the inner losses receive probabilities: the softmax is applied once here
        self.ace = self._ace_class(**{**_ACE_DEFAULTS, **self._ace_extra_defaults, **(ace_params or {})},
                                   to_onehot_y=self.to_onehot_y, softmax=False)
        self.dice = (
            DiceLoss(**{**_DICE_DEFAULTS, **(dice_params or {})}, to_onehot_y=False, softmax=False)
            if "dice" in self._terms
            else None
        )
        ce_kwargs = {**_CE_DEFAULTS, **(ce_params or {})}
        self.cross_entropy = torch.nn.CrossEntropyLoss(**ce_kwargs) if "ce" in self._terms else None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits of shape ``(B, C, spatial...)`` (with ``softmax=True``; otherwise probabilities for the ACE
                and Dice terms; the CE term always treats ``input`` as logits, as MONAI's ``DiceCELoss`` does).
            target: label map ``(B, 1, spatial...)`` with ``to_onehot_y=True``, else one-hot / probabilities
                ``(B, C, spatial...)``.

        Returns:
            0-d tensor ``ace_weight * ACE + dice_weight * Dice + ce_weight * CE`` (terms absent from this class
            are left out).

        Raises:
            ValueError: as :class:`~acecal.losses.HardL1ACELoss` (NaN/inf, range, shapes, labels).
        """
        ace = self.ace
        input, target = _plain(input), _plain(target)
        use_labels = ace._check_shapes(input, target)
        probs = input
        activated = False
        if self.softmax and input.shape[1] > 1:
            probs = torch.softmax(input, 1)
            activated = True
        ace._validate(input, probs, activated, target, use_labels)

        total = self.ace_weight * ace._loss_from_probs(probs, target, use_labels, input.dtype)
        onehot = None
        if self.dice is not None:
            onehot = one_hot(target, num_classes=input.shape[1], dtype=probs.dtype) if use_labels else target
            total = total + self.dice_weight * self.dice(probs, onehot)
        if self.cross_entropy is not None:
            total = total + self.ce_weight * self._ce(input, target, onehot, use_labels)
        return total

    def _ce(
        self, logits: torch.Tensor, target: torch.Tensor, onehot: torch.Tensor | None, use_labels: bool
    ) -> torch.Tensor:
        """CE on logits. With probability targets as the published code; the class-index form (same value, less
        memory) is used for a label map when no one-hot tensor exists and no class ``weight`` is given."""
        assert self.cross_entropy is not None
        if use_labels:
            if onehot is None and self.cross_entropy.weight is None:
                return self.cross_entropy(logits, target[:, 0].long())
            if onehot is None:
                onehot = one_hot(target, num_classes=logits.shape[1], dtype=logits.dtype)
            return self.cross_entropy(logits, onehot.to(logits.dtype))
        if logits.shape[1] == 1:  # single channel: binary cross-entropy on the logit, like MONAI's DiceCELoss
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return self.cross_entropy(logits, target.to(logits.dtype))


class HardL1ACEandDiceCELoss(_ACECombinedLoss):
    """Hard-binned L1-ACE plus Dice plus cross-entropy: ``0.33 * hL1-ACE + 0.33 * Dice + 0.33 * CE``.

    The defaults reproduce the paper's ``hardl1ace_dice_ce`` configuration: :class:`~acecal.losses.HardL1ACELoss`
    with 20 bins, background included and ``ignore_empty_classes=True`` (classes absent from an image are left out of
    the ACE mean); MONAI ``DiceLoss(include_background=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)``;
    ``torch.nn.CrossEntropyLoss`` (mean) on the logits. One softmax is shared by the ACE and Dice terms; a label-map
    target is used directly by ACE and one-hot encoded once for Dice and CE. The paper trains with
    ``to_onehot_y=True, softmax=True`` (what :func:`~acecal.losses.build_loss` builds).

    Args (keyword only; the published classes order them differently):
        ace_weight, dice_weight, ce_weight: term weights. Default to 0.33 each.
        to_onehot_y: the target is a label map ``(B, 1, spatial...)`` of class indices. Defaults to False.
        softmax: apply a softmax to ``input`` for the ACE and Dice terms (CE always takes the logits).
            Defaults to False, MONAI's convention.
        ace_params: overrides of the :class:`~acecal.losses.HardL1ACELoss` arguments (``num_bins``,
            ``include_background``, ``reduction``, ``weight``, ``ignore_empty_classes``, ``right``).
        dice_params: overrides of the ``monai.losses.DiceLoss`` arguments.
        ce_params: ``torch.nn.CrossEntropyLoss`` arguments (e.g. ``weight``, ``label_smoothing``).

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = HardL1ACELoss
    _terms = ("dice", "ce")

    def __init__(
        self,
        *,
        ace_weight: float = 0.33,
        dice_weight: float = 0.33,
        ce_weight: float = 0.33,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, dice_weight=dice_weight, ce_weight=ce_weight, to_onehot_y=to_onehot_y,
            softmax=softmax, ace_params=ace_params, dice_params=dice_params, ce_params=ce_params,
        )


class SoftL1ACEandDiceCELoss(_ACECombinedLoss):
    """Soft-binned L1-ACE plus Dice plus cross-entropy: ``0.33 * sL1-ACE + 0.33 * Dice + 0.33 * CE``.

    The paper's ``softl1ace_dice_ce`` configuration: as :class:`HardL1ACEandDiceCELoss` with
    :class:`~acecal.losses.SoftL1ACELoss` (``empty_weight=0.01``) as the ACE term.

    Args (keyword only):
        ace_weight, dice_weight, ce_weight: term weights. Default to 0.33 each.
        to_onehot_y, softmax, dice_params, ce_params: as :class:`HardL1ACEandDiceCELoss`.
        ace_params: overrides of the :class:`~acecal.losses.SoftL1ACELoss` arguments (``num_bins``,
            ``include_background``, ``reduction``, ``weight``, ``ignore_empty_classes``, ``empty_weight``).

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = SoftL1ACELoss
    _ace_extra_defaults = {"empty_weight": 0.01}
    _terms = ("dice", "ce")

    def __init__(
        self,
        *,
        ace_weight: float = 0.33,
        dice_weight: float = 0.33,
        ce_weight: float = 0.33,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, dice_weight=dice_weight, ce_weight=ce_weight, to_onehot_y=to_onehot_y,
            softmax=softmax, ace_params=ace_params, dice_params=dice_params, ce_params=ce_params,
        )


class HardL1ACEandDiceLoss(_ACECombinedLoss):
    """Hard-binned L1-ACE plus Dice: ``0.5 * hL1-ACE + 0.5 * Dice`` (the MICCAI 2024 paper's headline result).

    Terms and defaults as in :class:`HardL1ACEandDiceCELoss`, without cross-entropy.

    Args (keyword only):
        ace_weight, dice_weight: term weights. Default to 0.5 each.
        to_onehot_y, softmax, ace_params, dice_params: as :class:`HardL1ACEandDiceCELoss`.

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = HardL1ACELoss
    _terms = ("dice",)

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        dice_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, dice_weight=dice_weight, to_onehot_y=to_onehot_y, softmax=softmax,
            ace_params=ace_params, dice_params=dice_params,
        )


class SoftL1ACEandDiceLoss(_ACECombinedLoss):
    """Soft-binned L1-ACE plus Dice: ``0.5 * sL1-ACE + 0.5 * Dice``.

    Terms and defaults as in :class:`SoftL1ACEandDiceCELoss`, without cross-entropy.

    Args (keyword only):
        ace_weight, dice_weight: term weights. Default to 0.5 each.
        to_onehot_y, softmax, ace_params, dice_params: as :class:`SoftL1ACEandDiceCELoss`.

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = SoftL1ACELoss
    _ace_extra_defaults = {"empty_weight": 0.01}
    _terms = ("dice",)

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        dice_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, dice_weight=dice_weight, to_onehot_y=to_onehot_y, softmax=softmax,
            ace_params=ace_params, dice_params=dice_params,
        )


class HardL1ACEandCELoss(_ACECombinedLoss):
    """Hard-binned L1-ACE plus cross-entropy: ``0.5 * hL1-ACE + 0.5 * CE``.

    Terms and defaults as in :class:`HardL1ACEandDiceCELoss`, without Dice. For a label map without CE class weights
    the CE uses the class-index form (same value as the one-hot form, less memory).

    Args (keyword only):
        ace_weight, ce_weight: term weights. Default to 0.5 each.
        to_onehot_y, softmax, ace_params, ce_params: as :class:`HardL1ACEandDiceCELoss`.

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = HardL1ACELoss
    _terms = ("ce",)

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        ce_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, ce_weight=ce_weight, to_onehot_y=to_onehot_y, softmax=softmax,
            ace_params=ace_params, ce_params=ce_params,
        )


class SoftL1ACEandCELoss(_ACECombinedLoss):
    """Soft-binned L1-ACE plus cross-entropy: ``0.5 * sL1-ACE + 0.5 * CE``.

    Terms and defaults as in :class:`SoftL1ACEandDiceCELoss`, without Dice.

    Args (keyword only):
        ace_weight, ce_weight: term weights. Default to 0.5 each.
        to_onehot_y, softmax, ace_params, ce_params: as :class:`SoftL1ACEandDiceCELoss`.

    Shapes:
        ``input`` ``(B, C, spatial...)``; ``target`` ``(B, 1, spatial...)`` or ``(B, C, spatial...)``; output ``()``.

    References:
        Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation",
        IEEE TMI, arXiv:2506.03942; Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
        Reliability in Image Segmentation", MICCAI 2024, arXiv:2403.06759.
    """

    _ace_class = SoftL1ACELoss
    _ace_extra_defaults = {"empty_weight": 0.01}
    _terms = ("ce",)

    def __init__(
        self,
        *,
        ace_weight: float = 0.5,
        ce_weight: float = 0.5,
        to_onehot_y: bool = False,
        softmax: bool = False,
        ace_params: dict[str, Any] | None = None,
        ce_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ace_weight=ace_weight, ce_weight=ce_weight, to_onehot_y=to_onehot_y, softmax=softmax,
            ace_params=ace_params, ce_params=ce_params,
        )
