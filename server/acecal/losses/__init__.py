"""acecal.losses: marginal L1 average calibration error (mL1-ACE) losses, hard- and soft-binned.

Public API::

    hard_binned_calibration(probs, target, num_bins=20, right=False) -> (mean_p, mean_y, counts)
    soft_binned_calibration(probs, target, num_bins=20, empty_weight=0.01) -> (mean_p, mean_y, counts)
    HardL1ACELoss, SoftL1ACELoss                      the ACE losses (MONAI-style arguments); their base
                                                      L1ACELoss has prepare(input, target) -> (probs, target)
                                                      and from_probs(probs, target) for combined losses
    L1ACEandDiceCELoss                                ace_weight * ACE + dice_weight * Dice + ce_weight * CE
    HardL1ACEandDiceCELoss, SoftL1ACEandDiceCELoss    paper configurations (0.33 ACE + 0.33 Dice + 0.33 CE)
    HardL1ACEandDiceLoss, SoftL1ACEandDiceLoss        0.5 ACE + 0.5 Dice
    HardL1ACEandCELoss, SoftL1ACEandCELoss            0.5 ACE + 0.5 CE
    DicePlusPlusLoss, DicePlusPlusCELoss              DSC++ (Yeung et al. 2023), alone and with CE
    TwoHeadLoss                                       Dice+CE on a segmentation head, CE + L1-ACE on a calibration head
    build_loss(name, num_classes, **overrides), LOSS_NAMES   training losses by name: loss(logits, label_map)

Typical training use::

    loss_fn = HardL1ACEandDiceCELoss(to_onehot_y=True, softmax=True)   # or build_loss("hardl1ace_dice_ce", C)
    loss = loss_fn(model(images), labels)   # logits (B, C, H, W, D), labels (B, 1, H, W, D)
    loss.backward()

The binning rule and sums themselves live in :mod:`acecal.binning` (shared with :mod:`acecal.metrics`), the
argument checks in :mod:`acecal.tensor_checks`.

References: Barfoot et al., IEEE TMI, arXiv:2506.03942; Barfoot et al., MICCAI 2024, arXiv:2403.06759.
"""

from .ace import HardL1ACELoss, L1ACELoss, SoftL1ACELoss
from .binning import hard_binned_calibration, soft_binned_calibration
from .combined import (
    HardL1ACEandCELoss,
    HardL1ACEandDiceCELoss,
    HardL1ACEandDiceLoss,
    L1ACEandDiceCELoss,
    SoftL1ACEandCELoss,
    SoftL1ACEandDiceCELoss,
    SoftL1ACEandDiceLoss,
)
from .dicepp import DicePlusPlusCELoss, DicePlusPlusLoss
from .registry import LOSS_NAMES, TWO_HEAD_LOSSES, NACLandDiceLoss, build_loss
from .twohead import TwoHeadLoss

__all__ = [
    "LOSS_NAMES",
    "TWO_HEAD_LOSSES",
    "DicePlusPlusCELoss",
    "DicePlusPlusLoss",
    "HardL1ACELoss",
    "HardL1ACEandCELoss",
    "HardL1ACEandDiceCELoss",
    "HardL1ACEandDiceLoss",
    "L1ACELoss",
    "L1ACEandDiceCELoss",
    "NACLandDiceLoss",
    "SoftL1ACELoss",
    "SoftL1ACEandCELoss",
    "SoftL1ACEandDiceCELoss",
    "SoftL1ACEandDiceLoss",
    "TwoHeadLoss",
    "build_loss",
    "hard_binned_calibration",
    "soft_binned_calibration",
]
