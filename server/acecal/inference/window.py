"""Sliding-window logits in model space: the one place that turns a bundle's network into logits.

Training validation, ``acecal evaluate`` and the server's predictor all call :func:`sliding_window_logits`, so the
numbers a model card states are produced by the same code that serves the model.

Two-head networks (``acecal.networks.SegResNetTwoHead``) give ``(B, 2C, ...)``: segmentation logits, then calibration
logits; split them with :func:`acecal.networks.split_heads`. A temperature or calibrator acts on the calibration half
only; the label map comes from the segmentation half.

Flip test-time augmentation (the bundle's ``tta``, overridable per call): the softmax is averaged over flipped copies
of the whole model-space image (each run through the sliding window and flipped back), per head; the result is
returned as log-probabilities ``log(mean softmax)``, which are valid logits (their softmax is the average). Flipping
changes the label map, so TTA is a property of the served model, not a post-hoc calibration step.

Stopping early: a :class:`CancelToken` passed to :func:`sliding_window_logits` is checked before every batch of
windows goes through the network, so a cancelled forward pass ends as soon as the batch running now is done, with
:class:`InferenceCancelled` (the server cancels the token when the client that asked for the inference disconnects).
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Callable, Optional

import torch
from monai.inferers import SlidingWindowInferer

from acecal.bundles import BundleConfig
from acecal.networks import is_two_head, split_heads

#: test-time augmentation name -> the spatial axes (of a (B, C, x, y, z) tensor) flipped in each pass
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "axis_flips": ((), (2,), (3,), (4,)),
    "all_flips": tuple(c for r in range(4) for c in itertools.combinations((2, 3, 4), r)),
}


class InferenceCancelled(Exception):
    """The inference was cancelled through its :class:`CancelToken` (not an error: nobody waits for a reply)."""


class CancelToken:
    """A thread-safe "stop this inference" flag: set once by :meth:`cancel` (any thread), read by the stages.

    Callbacks registered with :meth:`on_cancel` run once, in the cancelling thread (e.g. dropping queued device work).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Set the flag (the first reason is kept) and run the callbacks; later calls do nothing."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` when the token is cancelled (at once when it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def check(self) -> None:
        """Raise :class:`InferenceCancelled` when the token is cancelled."""
        if self._event.is_set():
            raise InferenceCancelled(self.reason)


def checked_network(network: torch.nn.Module, cancel: Optional[CancelToken]) -> Callable[[torch.Tensor], Any]:
    """``network`` as the sliding window's predictor, checking ``cancel`` before each batch of windows."""
    if cancel is None:
        return network

    def predictor(windows: torch.Tensor) -> Any:  # (sw_batch_size, in_channels, *roi_size)
        cancel.check()
        return network(windows)

    return predictor


def make_inferer(
    config: BundleConfig,
    *,
    overlap: Optional[float] = None,
    sw_batch_size: Optional[int] = None,
    progress: bool = False,
) -> SlidingWindowInferer:
    """MONAI's sliding-window inferer with the bundle's ROI, overlap and blending mode."""
    return SlidingWindowInferer(
        roi_size=tuple(config.roi_size),
        sw_batch_size=sw_batch_size or config.sw_batch_size,
        overlap=config.sw_overlap if overlap is None else overlap,
        mode=config.sw_mode,
        padding_mode="constant",
        progress=progress,
    )


def _log_softmax_heads(logits: torch.Tensor, num_classes: int, two_head: bool) -> torch.Tensor:
    if not two_head:
        return torch.log_softmax(logits, dim=1)
    seg, cal = split_heads(logits, num_classes)
    return torch.cat([torch.log_softmax(seg, dim=1), torch.log_softmax(cal, dim=1)], dim=1)


@torch.no_grad()
def sliding_window_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    config: BundleConfig,
    *,
    temperature: Optional[float] = None,
    overlap: Optional[float] = None,
    inferer: Optional[SlidingWindowInferer] = None,
    tta: Optional[str] = None,
    cancel: Optional[CancelToken] = None,
) -> torch.Tensor:
    """Logits (B, num_classes, x, y, z) for a normalised model-space image (B, in_channels, x, y, z); (B, 2 x
    num_classes, x, y, z) for a two-head network (segmentation, then calibration logits).

    Args:
        temperature: divide the logits by this (post-hoc temperature scaling; a two-head network's calibration logits
            only); None or 1 leaves them unchanged.
        overlap: override the bundle's sliding-window overlap.
        tta: "none", "axis_flips" or "all_flips" (see :data:`TTA_FLIPS`); None = the bundle's ``tta``. With flips
            the result is ``log(mean softmax)`` per head.
        cancel: checked before every batch of windows; :class:`InferenceCancelled` once it is cancelled.

    Runs under autocast on CUDA (the logits come back as float32).
    """
    if image.ndim != 5:
        raise ValueError(f"expected an image of shape (B, C, x, y, z), got {tuple(image.shape)}")
    tta = config.tta if tta is None else tta
    if tta not in TTA_FLIPS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_FLIPS)}")
    device = next(network.parameters()).device
    image = image.to(device)
    inferer = inferer or make_inferer(config, overlap=overlap)
    two_head = is_two_head(config)
    predictor = checked_network(network, cancel)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            y = inferer(x, predictor)
        if isinstance(y, (list, tuple)):  # SegResNetDS with deep supervision returns the full-resolution head first
            y = y[0]
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the network returned {type(y).__name__}, not a tensor of logits")
        return y.float()

    flips = TTA_FLIPS[tta]
    if len(flips) == 1:
        out = run(image)
    else:  # running log-sum-exp of the per-flip log-softmax: no stack of all passes in memory
        total: Optional[torch.Tensor] = None
        for dims in flips:
            y = run(image.flip(dims)).flip(dims) if dims else run(image)
            y = _log_softmax_heads(y, config.num_classes, two_head)
            total = y if total is None else torch.logaddexp(total, y)
        assert total is not None  # at least two flips here
        out = total - math.log(len(flips))
    if temperature is not None and temperature != 1.0:
        if two_head:
            seg, cal = split_heads(out, config.num_classes)
            out = torch.cat([seg, cal / float(temperature)], dim=1)
        else:
            out = out / float(temperature)
    return out
