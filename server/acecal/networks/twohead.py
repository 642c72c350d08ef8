"""A SegResNet with two heads on one decoder: a segmentation head and a calibration head.

Why two heads: one softmax asked to give both the best label map (Dice) and calibrated probabilities (ACE) trades one
for the other. Here the segmentation head keeps the baseline's Dice + CE, and a small calibration head on the same
decoder features is trained with CE + L1-ACE (:class:`acecal.losses.TwoHeadLoss`). Served: labels from the
segmentation head, probabilities / confidence / flags from the calibration head.

Output layout, everywhere (training, validation, serving): ``(B, 2C, spatial...)`` with channels ``[0, C)`` the
segmentation logits and ``[C, 2C)`` the calibration logits. :func:`split_heads` is the one place that splits them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Union

import torch
from monai.networks.blocks.segresnet_block import ResBlock, get_conv_layer
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import SegResNet
from torch import nn

__all__ = ["TWO_HEAD_NETWORKS", "SegResNetTwoHead", "is_two_head", "num_outputs", "split_heads"]

#: bundle network names whose output is (B, 2C, ...) = [segmentation logits, calibration logits]
TWO_HEAD_NETWORKS: tuple[str, ...] = ("SegResNetTwoHead",)


def is_two_head(network: Any) -> bool:
    """True for a two-head network: a name, a ``NetworkConfig``, a ``BundleConfig`` or a module."""
    if isinstance(network, nn.Module):
        return isinstance(network, SegResNetTwoHead)
    if isinstance(network, str):
        return network in TWO_HEAD_NETWORKS
    if hasattr(network, "network"):  # BundleConfig / TrainConfig
        network = network.network
    return getattr(network, "name", None) in TWO_HEAD_NETWORKS


def num_outputs(network: Any, num_classes: int) -> int:
    """Output channels of a network for ``num_classes`` classes: 2C for a two-head network, else C."""
    return 2 * num_classes if is_two_head(network) else num_classes


def split_heads(output: Any, num_classes: int, *, two_head: bool = True, dim: int = 1) -> tuple[Any, Any]:
    """``(segmentation, calibration)`` halves of a two-head output, along ``dim`` (1 for (B, 2C, ...) tensors, 0 for
    (2C, z, y, x) arrays). Works on torch tensors and numpy arrays; returns views.

    With ``two_head=False`` (a one-head network) both are the output itself: the label map and the probabilities come
    from the same softmax, so callers need no second code path.

    Raises:
        ValueError: a two-head output without 2 * num_classes channels along ``dim``.
    """
    if not two_head:
        return output, output
    n = output.shape[dim]
    if n != 2 * num_classes:
        raise ValueError(
            f"a two-head output has 2 x {num_classes} = {2 * num_classes} channels along dim {dim}, got "
            f"{n} (shape {tuple(output.shape)})"
        )
    index_seg = [slice(None)] * output.ndim
    index_cal = [slice(None)] * output.ndim
    index_seg[dim] = slice(0, num_classes)
    index_cal[dim] = slice(num_classes, 2 * num_classes)
    return output[tuple(index_seg)], output[tuple(index_cal)]


#: what the calibration head predicts (see :class:`SegResNetTwoHead`)
CALIBRATION_OUTPUTS = ("logits", "temperature", "residual")


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass (0 = detach)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    d = x.detach()
    return d + scale * (x - d)


class SegResNetTwoHead(SegResNet):
    """MONAI ``SegResNet`` whose decoder output feeds a segmentation head and a calibration head.

    The encoder, decoder and segmentation head (``conv_final``: norm, act, 1x1x1 conv) are exactly MONAI's SegResNet,
    built in the same order, so with the same seed the trunk starts from the same weights as the one-head baseline and
    a trained SegResNet's state dict loads into it (``strict=False``; only ``calibration_head.*`` is new). The
    calibration head is ``calibration_blocks`` SegResNet ``ResBlock`` (norm, act, 3x3x3 conv, twice, residual) on the
    ``init_filters`` decoder channels, then norm, act and a 1x1x1 conv to ``out_channels``.

    Args:
        spatial_dims, init_filters, in_channels, dropout_prob, act, norm, blocks_down, blocks_up, upsample_mode:
            as ``monai.networks.nets.SegResNet``.
        out_channels: C, the number of classes; the network returns 2C channels.
        calibration_blocks: ResBlocks in the calibration head (>= 0). Defaults to 1.
        trunk_grad: factor on the gradient the calibration head sends back into the shared trunk: 1 = the calibration
            loss trains the trunk too, 0 = the trunk learns from the segmentation loss alone (the calibration head is
            then a head on frozen-in-time features and the segmentation is the baseline's). Defaults to 1.
        calibration_sees_segmentation: also feed the (detached) segmentation logits into the calibration head, so it
            can model how right the served labels are. Defaults to False.
        calibration_output: "logits" (default): the calibration head predicts its own C logits; "temperature": it
            predicts a positive temperature per voxel, ``T = min_temperature + softplus(t)`` (starting at T = 1), and
            the calibration logits are the segmentation logits divided by it. Then the calibration probabilities rank
            the classes as the segmentation does (same argmax, so every served label is the calibration head's top
            class), like local temperature scaling (Ding et al., ICCV 2021) trained in the same run. The segmentation
            logits enter with the trunk's gradient factor (``trunk_grad``).
            "residual": it predicts a correction added to the segmentation logits (zero at start, so the calibration
            head begins as the segmentation softmax and keeps its ranking of voxels unless the loss moves it).
        min_temperature: the lowest temperature of the "temperature" output. Defaults to 0.05.

    Shapes:
        input ``(B, in_channels, spatial...)``; output ``(B, 2 * out_channels, spatial...)``: ``[:, :C]``
        segmentation logits, ``[:, C:]`` calibration logits (see :func:`split_heads`).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 8,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout_prob: float | None = None,
        act: Union[tuple, str] = ("RELU", {"inplace": True}),
        norm: Union[tuple, str] = ("GROUP", {"num_groups": 8}),
        blocks_down: tuple = (1, 2, 2, 4),
        blocks_up: tuple = (1, 1, 1),
        upsample_mode: str = "nontrainable",
        calibration_blocks: int = 1,
        trunk_grad: float = 1.0,
        calibration_sees_segmentation: bool = False,
        calibration_output: str = "logits",
        min_temperature: float = 0.05,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            act=act,
            norm=norm,
            use_conv_final=True,
            blocks_down=blocks_down,
            blocks_up=blocks_up,
            upsample_mode=upsample_mode,
        )
        if isinstance(calibration_blocks, bool) or not isinstance(calibration_blocks, int) or calibration_blocks < 0:
            raise ValueError(f"calibration_blocks must be an integer >= 0, got {calibration_blocks!r}")
        if (
            isinstance(trunk_grad, bool)
            or not isinstance(trunk_grad, (int, float))
            or not math.isfinite(trunk_grad)
            or not 0.0 <= trunk_grad <= 1.0
        ):
            raise ValueError(f"trunk_grad must be a number in [0, 1], got {trunk_grad!r}")
        if calibration_output not in CALIBRATION_OUTPUTS:
            raise ValueError(f"calibration_output must be one of {CALIBRATION_OUTPUTS}, got {calibration_output!r}")
        if (
            isinstance(min_temperature, bool)
            or not isinstance(min_temperature, (int, float))
            or not 0.0 < min_temperature < 1.0
        ):
            raise ValueError(f"min_temperature must be a number in (0, 1), got {min_temperature!r}")
        self.calibration_output = calibration_output
        self.min_temperature = float(min_temperature)
        self.out_channels = out_channels
        self.trunk_grad = float(trunk_grad)
        self.calibration_sees_segmentation = bool(calibration_sees_segmentation)
        width = init_filters
        layers: list[nn.Module] = []
        if self.calibration_sees_segmentation:  # back to init_filters channels before the residual blocks
            layers.append(get_conv_layer(spatial_dims, init_filters + out_channels, width, kernel_size=1))
        layers += [ResBlock(spatial_dims, width, norm=norm, act=act) for _ in range(calibration_blocks)]
        layers += [
            get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=width),
            copy.deepcopy(self.act_mod),  # SegResNet shares one activation instance; the head gets its own
            get_conv_layer(
                spatial_dims,
                width,
                1 if calibration_output == "temperature" else out_channels,
                kernel_size=1,
                bias=True,
            ),
        ]
        self.calibration_head = nn.Sequential(*layers)
        if calibration_output != "logits":  # the calibration head begins as the segmentation: T = 1, no correction
            final = self.calibration_head[-1].conv
            assert isinstance(final, nn.Conv3d | nn.Conv2d | nn.Conv1d) and final.bias is not None  # built with bias
            nn.init.zeros_(final.weight)
            start = math.log(math.expm1(1.0 - self.min_temperature)) if calibration_output == "temperature" else 0.0
            nn.init.constant_(final.bias, start)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output before any head, ``(B, init_filters, spatial...)`` (SegResNet.decode without conv_final)."""
        x, down_x = self.encode(x)
        down_x.reverse()
        for i, (up, upl) in enumerate(zip(self.up_samples, self.up_layers, strict=True)):
            x = up(x) + down_x[i + 1]
            x = upl(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        seg = self.conv_final(feats)
        cal_in = _scale_gradient(feats, self.trunk_grad)
        if self.calibration_sees_segmentation:
            cal_in = torch.cat([cal_in, seg.detach()], dim=1)
        cal = self.calibration_head(cal_in)
        if self.calibration_output == "temperature":
            temperature = self.min_temperature + torch.nn.functional.softplus(cal.float())
            cal = _scale_gradient(seg, self.trunk_grad) / temperature
        elif self.calibration_output == "residual":
            cal = _scale_gradient(seg, self.trunk_grad) + cal
        return torch.cat([seg, cal.to(seg.dtype)], dim=1)
