"""The decoupled loss of a two-head network (``acecal.networks.SegResNetTwoHead``): each head its own objective.

    loss = segmentation_loss(seg_logits, y) + calibration_weight * (ce_weight * CE(cal_logits, y)
                                                                   + ace_weight * L1-ACE(softmax(cal_logits), y))

The segmentation head keeps the baseline's MONAI ``DiceCELoss`` (exactly ``baseline_dice_ce``), so the label map is
trained as the baseline's; the calibration head gets CE plus a heavy L1-ACE term (hard or soft binned, Barfoot et al.
2024/2025), a weight at which ACE would cost Dice if it shared the segmentation's softmax. Whether the calibration
loss also trains the shared trunk is the network's ``trunk_grad``, not the loss's: the loss only sees outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.loss import _Loss

from acecal.errors import InvalidInputError
from acecal.networks.twohead import split_heads
from acecal.tensor_checks import check_term_weight

from .combined import HardL1ACEandCELoss, SoftL1ACEandCELoss

__all__ = ["TwoHeadLoss"]


class TwoHeadLoss(_Loss):
    """Segmentation loss on channels ``[0, C)``, CE + L1-ACE on the calibration channels ``[C, 2C)``.

    Args:
        segmentation_loss: the loss of the segmentation head, ``loss(logits (B, C, ...), label_map (B, 1, ...))``
            (the registry passes the baseline's ``DiceCELoss``).
        num_classes: C.
        binning: "soft" (:class:`~acecal.losses.SoftL1ACELoss`) or "hard" (:class:`~acecal.losses.HardL1ACELoss`).
        ace_weight: weight of the ACE term of the calibration head. Defaults to 2.0.
        ce_weight: weight of the CE term of the calibration head. Defaults to 1.0.
        calibration_weight: weight of the whole calibration loss against the segmentation loss. Defaults to 1.0.
        num_bins: ACE bins. Defaults to 20 (the paper's).
        ace_params: further ACE arguments (``include_background``, ``ignore_empty_classes``, ``empty_weight``...).

    Shapes:
        ``logits`` ``(B, 2C, spatial...)``; ``label_map`` ``(B, 1, spatial...)``; output ``()``.
    """

    def __init__(
        self,
        segmentation_loss: torch.nn.Module,
        num_classes: int,
        *,
        binning: str = "soft",
        ace_weight: float = 2.0,
        ce_weight: float = 1.0,
        calibration_weight: float = 1.0,
        num_bins: int = 20,
        ace_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if binning not in ("soft", "hard"):
            raise InvalidInputError(f"TwoHeadLoss: binning must be 'soft' or 'hard', got {binning!r}.")
        cls = SoftL1ACEandCELoss if binning == "soft" else HardL1ACEandCELoss
        self.num_classes = int(num_classes)
        self.binning = binning
        self.calibration_weight = check_term_weight(calibration_weight, "calibration_weight", "TwoHeadLoss")
        self.segmentation = segmentation_loss
        self.calibration = cls(
            ace_weight=ace_weight,
            ce_weight=ce_weight,
            to_onehot_y=True,
            softmax=True,
            ace_params={"num_bins": num_bins, **(ace_params or {})},
        )

    def forward(self, logits: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        seg, cal = split_heads(logits, self.num_classes)
        total = self.segmentation(seg, label_map)
        if self.calibration_weight:
            total = total + self.calibration_weight * self.calibration(cal, label_map)
        return total
