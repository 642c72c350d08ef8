"""Sliding-window logits in model space: the one place that turns a bundle's network into logits.

Training validation, ``acecal evaluate`` and the server's predictor all call :func:`sliding_window_logits`, so the
numbers a model card states are produced by the same code that serves the model.
"""

from __future__ import annotations

from typing import Optional

import torch
from monai.inferers import SlidingWindowInferer

from acecal.bundles import BundleConfig


def make_inferer(config: BundleConfig, *, overlap: Optional[float] = None, sw_batch_size: Optional[int] = None,
                 progress: bool = False) -> SlidingWindowInferer:
    """MONAI's sliding-window inferer with the bundle's ROI, overlap and blending mode."""
    return SlidingWindowInferer(
        roi_size=tuple(config.roi_size),
        sw_batch_size=sw_batch_size or config.sw_batch_size,
        overlap=config.sw_overlap if overlap is None else overlap,
        mode=config.sw_mode,
        padding_mode="constant",
        progress=progress,
    )


@torch.no_grad()
def sliding_window_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    config: BundleConfig,
    *,
    temperature: Optional[float] = None,
    overlap: Optional[float] = None,
    inferer: Optional[SlidingWindowInferer] = None,
) -> torch.Tensor:
    """Logits (B, num_classes, x, y, z) for a normalised model-space image (B, in_channels, x, y, z).

    Args:
        temperature: divide the logits by this (post-hoc temperature scaling); None or 1 leaves them unchanged.
        overlap: override the bundle's sliding-window overlap.

    Runs under autocast on CUDA (the logits come back as float32).
    """
    if image.ndim != 5:
        raise ValueError(f"expected an image of shape (B, C, x, y, z), got {tuple(image.shape)}")
    device = next(network.parameters()).device
    image = image.to(device)
    inferer = inferer or make_inferer(config, overlap=overlap)
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        out = inferer(image, network)
    if isinstance(out, (list, tuple)):  # SegResNetDS with deep supervision returns the full-resolution head first
        out = out[0]
    out = out.float()
    if temperature is not None and temperature != 1.0:
        out = out / float(temperature)
    return out
