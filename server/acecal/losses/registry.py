"""Training losses by name, all with one call signature: ``loss(logits, label_map) -> 0-d tensor``.

``logits`` has shape ``(B, C, spatial...)`` and ``label_map`` ``(B, 1, spatial...)`` (integer class indices, any
integer or integer-valued float dtype), so the training engine can swap losses without changing anything else and
can wrap any of them in ``monai.losses.DeepSupervisionLoss``.

=======================  =================================================================================
name                     loss
=======================  =================================================================================
``baseline_dice_ce``     MONAI ``DiceCELoss(include_background=True, to_onehot_y=True, softmax=True,
                         squared_pred=True, smooth_nr=0, smooth_dr=1e-5)`` (the papers' baseline)
``hardl1ace_dice_ce``    :class:`HardL1ACEandDiceCELoss`, 0.33 / 0.33 / 0.33, ``to_onehot_y``, ``softmax``
``softl1ace_dice_ce``    :class:`SoftL1ACEandDiceCELoss`, 0.33 / 0.33 / 0.33, ``to_onehot_y``, ``softmax``
``labelsmooth_dice_ce``  the baseline with ``label_smoothing=0.1`` in its cross-entropy
``nacl_dice``            MONAI ``NACLLoss`` (CE + neighbour-aware logit penalty) plus the baseline's Dice
``dicepp_ce``            :class:`DicePlusPlusCELoss`: the baseline with its Dice replaced by DSC++ (gamma 2;
                         Yeung et al., J Digit Imaging 2023)
``twohead_dice_ce_softace``  two-head networks only (logits ``(B, 2C, ...)``): :class:`TwoHeadLoss`, the baseline
                         Dice+CE on the segmentation head, CE + 2 x soft L1-ACE (20 bins) on the calibration head
``twohead_dice_ce_hardace``  the same with hard-binned L1-ACE
=======================  =================================================================================

The two-head losses take ``(B, 2C, spatial...)`` logits (segmentation then calibration channels, see
:func:`acecal.networks.split_heads`); :data:`TWO_HEAD_LOSSES` lists them.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss, NACLLoss
from torch.nn.modules.loss import _Loss

from acecal.errors import InvalidInputError
from acecal.tensor_checks import check_count, check_term_weight, fused_values, label_checks, raise_if_bad, range_checks

from .combined import PAPER_DICE_PARAMS, HardL1ACEandDiceCELoss, SoftL1ACEandDiceCELoss
from .dicepp import DicePlusPlusCELoss
from .twohead import TwoHeadLoss

__all__ = [
    "BASELINE_DICE_CE_PARAMS",
    "LOSS_NAMES",
    "NACLandDiceLoss",
    "TWO_HEAD_COUNTERPARTS",
    "TWO_HEAD_LOSSES",
    "build_loss",
]

LOSS_NAMES: tuple[str, ...] = (
    "baseline_dice_ce",
    "hardl1ace_dice_ce",
    "softl1ace_dice_ce",
    "labelsmooth_dice_ce",
    "nacl_dice",
    "dicepp_ce",
    "twohead_dice_ce_softace",
    "twohead_dice_ce_hardace",
)
#: losses of two-head networks: logits (B, 2C, spatial...)
TWO_HEAD_LOSSES: tuple[str, ...] = ("twohead_dice_ce_softace", "twohead_dice_ce_hardace")
#: the two-head loss that puts a one-head ACE loss's calibration term on the calibration head (what "fine-tune with
#: hL1-ACE" means for a two-head model: Dice+CE on the segmentation head, CE + hL1-ACE on the calibration head)
TWO_HEAD_COUNTERPARTS: dict[str, str] = {
    "hardl1ace_dice_ce": "twohead_dice_ce_hardace",
    "softl1ace_dice_ce": "twohead_dice_ce_softace",
}

#: The papers' baseline: MONAI ``DiceCELoss`` arguments (its Dice term on a label map, with the softmax).
BASELINE_DICE_CE_PARAMS: dict[str, Any] = {**PAPER_DICE_PARAMS, "to_onehot_y": True, "softmax": True}


class NACLandDiceLoss(_Loss):
    """MONAI ``NACLLoss`` plus MONAI ``DiceLoss`` on a label map: ``nacl_weight * NACL + dice_weight * Dice``.

    ``NACLLoss`` (Murugesan et al., "Trust your neighbours: penalty-based constraints for model calibration",
    MICCAI 2023) is cross-entropy plus ``alpha`` times the mean L1 gap between the logits and a spatially smoothed
    one-hot target. MONAI's class wants an integer target ``(B, spatial...)`` without a channel dimension and the
    number of classes and spatial dimensions up front; this wrapper takes the registry's ``(B, 1, spatial...)``
    label map like every other registry loss.

    Args:
        num_classes: number of output channels C.
        spatial_dims: 2 or 3. Defaults to 3.
        nacl_weight, dice_weight: term weights. Default to 1.0 each.
        nacl_params: overrides of ``NACLLoss`` arguments (``kernel_size=3``, ``kernel_ops="mean"``,
            ``distance_type="l1"``, ``alpha=0.1``, ``sigma=1.0``).
        dice_params: overrides of the baseline Dice arguments (``include_background=True``, ``squared_pred=True``,
            ``smooth_nr=0``, ``smooth_dr=1e-5``).

    Shapes:
        ``logits`` ``(B, C, spatial...)``; ``label_map`` ``(B, 1, spatial...)``; output ``()``.
    """

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int = 3,
        nacl_weight: float = 1.0,
        dice_weight: float = 1.0,
        nacl_params: dict[str, Any] | None = None,
        dice_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InvalidInputError(f"NACLandDiceLoss: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.nacl_weight = check_term_weight(nacl_weight, "nacl_weight", "NACLandDiceLoss")
        self.dice_weight = check_term_weight(dice_weight, "dice_weight", "NACLandDiceLoss")
        self.nacl = NACLLoss(classes=num_classes, dim=spatial_dims, **(nacl_params or {}))
        self.dice = DiceLoss(**{**BASELINE_DICE_CE_PARAMS, **(dice_params or {})})

    def forward(self, logits: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        if logits.ndim != self.spatial_dims + 2:
            raise InvalidInputError(
                f"NACLandDiceLoss: built for {self.spatial_dims}-D images, got logits of shape {tuple(logits.shape)}; "
                f"build it with spatial_dims={logits.ndim - 2}."
            )
        labels = label_map[:, 0].long()
        return self.nacl_weight * self.nacl(logits, labels) + self.dice_weight * self.dice(logits, label_map)


class _RegistryLoss(_Loss):
    """Uniform front door: checks ``(logits (B, C, spatial...), label_map (B, 1, spatial...))`` and the number of
    classes with clear messages, then calls ``self.loss``. Label values are checked by the ACE losses (one fused
    check); for the other losses here, with the same kind of fused check."""

    def __init__(
        self, name: str, num_classes: int, loss: torch.nn.Module, check_labels: bool, channels: int | None = None
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.channels = channels or num_classes  # logit channels: 2C for the two-head losses
        self.loss = loss
        self.check_labels = check_labels

    def forward(self, logits: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        who = f"loss {self.name!r}"
        if not isinstance(logits, torch.Tensor) or not isinstance(label_map, torch.Tensor):
            raise InvalidInputError(f"{who}: logits and label_map must be torch.Tensor.")
        if logits.ndim < 3 or logits.shape[1] != self.channels:
            two = (
                " (a two-head loss: segmentation then calibration logits)" if self.channels != self.num_classes else ""
            )
            raise InvalidInputError(
                f"{who}: logits must have shape (B, {self.channels}, spatial...){two}, got {tuple(logits.shape)}."
            )
        expected = (logits.shape[0], 1, *logits.shape[2:])
        if tuple(label_map.shape) != expected:
            hint = ""
            if label_map.ndim == logits.ndim - 1:
                hint = " Add the channel dimension with label_map.unsqueeze(1)."
            raise InvalidInputError(f"{who}: label_map must have shape {expected}, got {tuple(label_map.shape)}.{hint}")
        if self.check_labels:
            values = fused_values(range_checks("input", logits) + label_checks(label_map))
            raise_if_bad(who, values, input_name="logits", label_name="label_map", num_classes=self.num_classes)
        return self.loss(logits, label_map)


def build_loss(name: str, num_classes: int, **overrides: Any) -> torch.nn.Module:
    """Build a training loss by name (see :data:`LOSS_NAMES`); ``loss(logits, label_map) -> 0-d tensor``.

    Args:
        name: one of :data:`LOSS_NAMES`.
        num_classes: number of output channels C (background included).
        overrides: keyword arguments merged over the defaults of the underlying class:
            ``baseline_dice_ce`` / ``labelsmooth_dice_ce``: ``monai.losses.DiceCELoss`` arguments
            (e.g. ``lambda_dice``, ``label_smoothing``); ``hardl1ace_dice_ce`` / ``softl1ace_dice_ce``: the combined
            loss's arguments (``ace_weight``, ``dice_weight``, ``ce_weight``, ``ace_params``, ``dice_params``,
            ``ce_params``); ``nacl_dice``: :class:`NACLandDiceLoss` arguments (``spatial_dims``, ``nacl_weight``,
            ``dice_weight``, ``nacl_params``, ``dice_params``); ``dicepp_ce``: :class:`DicePlusPlusCELoss`
            arguments (``gamma``, ``dice_weight``, ``ce_weight``, ...); ``twohead_*``: :class:`TwoHeadLoss`
            arguments (``ace_weight``, ``ce_weight``, ``calibration_weight``, ``num_bins``, ``ace_params``).

    Returns:
        a ``torch.nn.Module``; its ``.loss`` attribute is the underlying loss.

    Raises:
        ValueError: unknown name, ``num_classes < 2``, or overrides the underlying class rejects.
    """
    if name not in LOSS_NAMES:
        raise InvalidInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
    check_count(num_classes, "num_classes", 2, hint=" (background included)")
    try:
        if name == "baseline_dice_ce":
            loss: torch.nn.Module = DiceCELoss(**{**BASELINE_DICE_CE_PARAMS, **overrides})
        elif name == "labelsmooth_dice_ce":
            loss = DiceCELoss(**{**BASELINE_DICE_CE_PARAMS, "label_smoothing": 0.1, **overrides})
        elif name in ("hardl1ace_dice_ce", "softl1ace_dice_ce"):
            cls = HardL1ACEandDiceCELoss if name == "hardl1ace_dice_ce" else SoftL1ACEandDiceCELoss
            loss = cls(**{"to_onehot_y": True, "softmax": True, **overrides})
        elif name == "dicepp_ce":
            loss = DicePlusPlusCELoss(**overrides)
        elif name in TWO_HEAD_LOSSES:
            binning = "soft" if name == "twohead_dice_ce_softace" else "hard"
            loss = TwoHeadLoss(DiceCELoss(**BASELINE_DICE_CE_PARAMS), num_classes, binning=binning, **overrides)
        else:
            loss = NACLandDiceLoss(num_classes, **overrides)
    except TypeError as err:  # unexpected keyword argument
        raise InvalidInputError(f"loss {name!r}: bad override: {err}") from None
    channels = 2 * num_classes if name in TWO_HEAD_LOSSES else num_classes
    return _RegistryLoss(
        name, num_classes, loss, check_labels=name not in ("hardl1ace_dice_ce", "softl1ace_dice_ce"), channels=channels
    )
