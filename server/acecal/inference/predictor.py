"""Predictor: a bundle's network applied to a volume, with the class probabilities returned on the input's exact grid.

The path (one chain shared with training, see :mod:`acecal.data.transforms`)::

    read + validate (SimpleITK)  ->  MetaTensor (C, x, y, z), RAS affine
    -> model space: orientation, spacing, intensity normalisation     (model_space_transforms)
    -> sliding-window logits -> the bundle's calibrator -> softmax    (acecal.inference.window, acecal.calibration)
    -> MONAI Invertd: back through the spacing and orientation steps onto the input grid (bilinear on probabilities)

The three stages are separate methods; :meth:`Predictor.predict` runs them in a row, the device stage through an
optional hook (``run_on_device``: the server's device queue), and is what both the server and ``acecal infer`` call
(through :func:`acecal.inference.pipeline.run_inference`).

Cancelling: ``predict(cancel=token)`` (an :class:`acecal.inference.window.CancelToken`) checks the token between the
stages, when the device stage gets its turn and before every batch of sliding windows; once it is cancelled the call
raises :class:`acecal.inference.window.InferenceCancelled` (the server cancels it when the client disconnects).

The calibrator (``bundle.json``'s ``calibrator``, or its older ``temperature``; see
:func:`acecal.calibration.load_calibrator`) rescales the model-space logits by a positive temperature per voxel right
after the sliding window: the label map is the network's own. It is applied by default; ``use_calibrator=False``
(constructor or per call; ``use_temperature`` is the older name of the same switch) serves the raw softmax.

Two-head bundles (``acecal.networks.SegResNetTwoHead``): :meth:`Predictor.forward` and :meth:`Predictor.postprocess`
carry ``2C`` channels, the segmentation head's softmax then the calibration head's (each sums to 1; both go back to
the input grid the same way); :func:`acecal.inference.pipeline.analyse` and :meth:`Predictor.predict` split them:
labels from the segmentation half, probabilities from the calibration half.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from acecal.bundles import Bundle
from acecal.calibration import Calibrator, TemperatureCalibrator, load_calibrator
from acecal.data.headers import check_model_space_budget
from acecal.data.io import grid_of, read_volume, to_metatensor
from acecal.data.transforms import IMAGE, model_space_transforms
from acecal.errors import ACECalError, InvalidInputError
from acecal.geometry import Grid
from acecal.inference.memory import out_of_memory
from acecal.inference.pipeline import split_served
from acecal.inference.window import CancelToken, InferenceCancelled, sliding_window_logits
from acecal.networks import is_two_head, split_heads

PRED = "pred"
_NOT_LOADED = object()
log = logging.getLogger("acecal.inference")

#: runs a predictor's device stage: ``run_on_device(stage) -> stage()`` (the server's device queue, for one)
DeviceRunner = Callable[[Callable[[], torch.Tensor]], torch.Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; otherwise the named torch device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


@dataclass
class Prediction:
    """Class probabilities on the input grid."""

    probs: np.ndarray  # (C, z, y, x) float32, summing to 1 over C: the served (calibration head's) probabilities
    grid: Grid
    temperature: Optional[float]  # the global temperature applied, None when none was
    timings: dict[str, float] = field(default_factory=dict)
    # (z, y, x) the served label map when it is not argmax(probs): a two-head network's segmentation head; else None
    labels: Optional[np.ndarray] = None
    calibrator: Optional[str] = None  # the kind of calibrator applied, None when none was


class Predictor:
    """Runs one bundle on one device. Create through :class:`PredictorCache` in a server (load once, reuse).

    The network is loaded lazily, on first use, under a lock: constructing a Predictor is cheap.
    """

    def __init__(self, bundle: Bundle, device: Union[str, torch.device] = "cpu", *, use_calibrator: bool = True):
        self.bundle = bundle
        self.config = bundle.config
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.transforms = model_space_transforms(self.config, label_key=None, load=False)
        self.use_calibrator = bool(use_calibrator)  # the default of the per-call switch
        self._network: Optional[torch.nn.Module] = None
        self._calibrator: Any = _NOT_LOADED
        self._lock = threading.Lock()

    @property
    def network(self) -> torch.nn.Module:
        if self._network is None:
            with self._lock:
                if self._network is None:
                    self._network = self.bundle.load_network(self.device)
        return self._network

    @property
    def calibrator(self) -> Optional[Calibrator]:
        """The bundle's calibrator (an ``acecal.calibration.Calibrator`` on the device), None when it has none."""
        if self._calibrator is _NOT_LOADED:
            with self._lock:
                if self._calibrator is _NOT_LOADED:
                    self._calibrator = load_calibrator(self.bundle, self.device)
        return self._calibrator

    def calibrating(self, use_calibrator: Optional[bool] = None, use_temperature: Optional[bool] = None) -> bool:
        """Whether a call applies the calibrator: ``use_calibrator``, else its alias ``use_temperature``, else the
        predictor's default."""
        on = use_calibrator if use_calibrator is not None else use_temperature
        return self.use_calibrator if on is None else bool(on)

    def calibrated_logits(
        self, logits: torch.Tensor, image: Optional[torch.Tensor], *, use_calibrator: bool = True
    ) -> torch.Tensor:
        """(B, C, x, y, z) model-space logits after the bundle's calibrator (unchanged without one or when off).

        ``image`` (B, Cin, x, y, z): the normalised model-space image the logits came from.
        """
        cal = self.calibrator if use_calibrator else None
        return logits if cal is None else cal.calibrate(logits, image)

    # --- stage 1: CPU ------------------------------------------------------------------------------------------
    def load_image(self, path: Union[str, os.PathLike], *, name: Optional[str] = None) -> sitk.Image:
        """Read and validate an image file for this model (3-D, finite, the model's channel count).

        ``name`` is the name to use in messages (the user's file name rather than a server temp name).
        """
        img = read_volume(path, what="image", allow_vector=True) if name is None else _read_named(path, name)
        self.check_channels(img, name or Path(path).name)
        return img

    def check_channels(self, img: sitk.Image, name: str = "image") -> None:
        n = img.GetNumberOfComponentsPerPixel()
        if n != self.config.in_channels:
            raise InvalidInputError(
                f"the image {name!r} has {n} channel(s) per voxel but model {self.bundle.id!r} expects "
                f"{self.config.in_channels}"
            )

    def preprocess(self, img: sitk.Image, *, name: str = "image") -> dict:
        """The image in model space: {"image": MetaTensor (in_channels, x, y, z)} with its transform record.

        Raises:
            PayloadTooLargeError: resampled to the model's spacing it would exceed the model-space voxel budget
                (:func:`acecal.data.headers.current_limits`), checked before resampling.
            InvalidInputError: values that the intensity normalisation turns into NaN or infinity (e.g. +-3e38).
        """
        check_model_space_budget(
            img.GetSize(), img.GetSpacing(), self.config.spacing, name=name, model_id=f"model {self.bundle.id!r}"
        )
        if img.GetNumberOfComponentsPerPixel() == 1:
            mt: torch.Tensor = to_metatensor(img)
        else:  # multi-channel: one MetaTensor per component, stacked on the channel axis
            parts: list[torch.Tensor] = [
                to_metatensor(sitk.VectorIndexSelectionCast(img, c, sitk.sitkFloat32))
                for c in range(img.GetNumberOfComponentsPerPixel())
            ]
            mt = torch.cat(parts, dim=0)
        data = self.transforms({IMAGE: mt})
        if not bool(torch.isfinite(data[IMAGE]).all()):
            peak = float(np.abs(sitk.GetArrayViewFromImage(img)).max())
            raise InvalidInputError(
                f"the image {name!r} has values up to {peak:.3g} in magnitude that the model's intensity "
                f"normalisation ({self.config.intensity.mode}) turns into NaN or infinity; rescale its intensities"
            )
        return data

    # --- stage 2: device ---------------------------------------------------------------------------------------
    def temperature(self, use_temperature: bool = True) -> Optional[float]:
        """The global temperature a call applies (``use_temperature``: the calibrator switch); None when the
        calibrator is off, absent or not a single temperature."""
        cal = self.calibrator if use_temperature else None
        return cal.value if isinstance(cal, TemperatureCalibrator) else None

    def calibrator_kind(self, use_calibrator: bool = True) -> Optional[str]:
        """The kind of calibrator a call applies (``temperature``, ``local_temperature``), None when none is."""
        cal = self.calibrator if use_calibrator else None
        return None if cal is None else cal.kind

    @property
    def two_head(self) -> bool:
        return is_two_head(self.config)

    def forward(
        self,
        data: dict,
        *,
        overlap: Optional[float] = None,
        use_temperature: Optional[bool] = None,
        tta: Optional[str] = None,
        use_calibrator: Optional[bool] = None,
        cancel: Optional[CancelToken] = None,
    ) -> torch.Tensor:
        """Class probabilities in model space, (C, x, y, z) float32 on the CPU; (2C, x, y, z) for a two-head bundle
        (segmentation softmax, then calibration softmax). ``tta``: flip test-time augmentation, None = the bundle's.
        ``cancel``: checked before every batch of sliding windows (:class:`InferenceCancelled` once cancelled)."""
        x = data[IMAGE]
        image = x.as_tensor()[None] if hasattr(x, "as_tensor") else x[None]
        logits = sliding_window_logits(self.network, image, self.config, overlap=overlap, tta=tta, cancel=cancel)
        on = self.calibrating(use_calibrator, use_temperature)
        if self.two_head:  # the calibrator acts on the calibration head's logits
            seg, cal = split_heads(logits, self.config.num_classes)
            cal = self.calibrated_logits(cal, image, use_calibrator=on)
            probs = torch.cat([torch.softmax(seg, dim=1), torch.softmax(cal, dim=1)], dim=1)[0]
        else:
            probs = torch.softmax(self.calibrated_logits(logits, image, use_calibrator=on), dim=1)[0]
        return probs.to("cpu", torch.float32)

    # --- stage 3: CPU ------------------------------------------------------------------------------------------
    def postprocess(self, data: dict, probs_model: torch.Tensor) -> np.ndarray:
        """Model-space probabilities back onto the input grid: (C, z, y, x) float32 numpy, summing to 1 ((2C, z, y, x)
        for a two-head bundle, each half summing to 1)."""
        x = data[IMAGE]
        pred = MetaTensor(probs_model, affine=x.affine.clone())
        inv = Invertd(keys=PRED, transform=self.transforms, orig_keys=IMAGE, nearest_interp=False, to_tensor=True)
        out = inv({IMAGE: x, PRED: pred})[PRED]
        arr = out.as_tensor() if hasattr(out, "as_tensor") else out
        p = arr.permute(0, 3, 2, 1).contiguous().numpy().astype(np.float32, copy=False)  # (C, x, y, z) -> (C, z, y, x)
        np.clip(p, 0.0, 1.0, out=p)
        for half in split_heads(p, self.config.num_classes, two_head=self.two_head, dim=0):
            s = half.sum(axis=0, keepdims=True)
            np.divide(half, s, out=half, where=s > 0)
            if not self.two_head:
                break
        return p

    # --- all three -----------------------------------------------------------------------------------------------
    def predict(
        self,
        image: Union[str, os.PathLike, sitk.Image],
        *,
        overlap: Optional[float] = None,
        use_temperature: Optional[bool] = None,
        tta: Optional[str] = None,
        use_calibrator: Optional[bool] = None,
        name: Optional[str] = None,
        run_on_device: Optional[DeviceRunner] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Prediction:
        """Probabilities on the input's exact grid for a file path or a SimpleITK image (two heads: the calibration
        head's probabilities and the segmentation head's label map).

        Args:
            name: the image's name in messages (the user's file name rather than a server's temporary name).
            run_on_device: runs the device stage, ``run_on_device(stage) -> stage()``; e.g. the server's device
                queue. The time spent waiting in it is reported as ``queue_wait_s``.
            cancel: stop early once it is cancelled: checked between the stages, when the device stage starts and
                before every batch of sliding windows.

        Raises:
            InferenceCancelled: ``cancel`` was cancelled (the work stopped at the next check).
            InvalidInputError: an unreadable or unusable image, one MONAI cannot bring into the model's space, or one
                the model gives non-finite probabilities for.
        """
        shown = name or (Path(image).name if not isinstance(image, sitk.Image) else "image")
        t0 = time.perf_counter()
        if isinstance(image, sitk.Image):
            img = image
            self.check_channels(img)
        else:
            img = self.load_image(image, name=name)
        t1 = time.perf_counter()
        _check(cancel)
        data = self._preprocess_or_refuse(img, shown)
        t2 = time.perf_counter()
        on = self.calibrating(use_calibrator, use_temperature)
        forward_s: list[float] = []

        def device_stage() -> torch.Tensor:
            _check(cancel)  # cancelled while it waited for the device: it never starts
            t = time.perf_counter()
            try:
                return self.forward(data, overlap=overlap, tta=tta, use_calibrator=on, cancel=cancel)
            finally:
                forward_s.append(time.perf_counter() - t)

        probs_model = device_stage() if run_on_device is None else run_on_device(device_stage)
        _check(cancel)
        if not bool(torch.isfinite(probs_model).all()):
            raise InvalidInputError(
                f"model {self.bundle.id!r} gave non-finite probabilities for the image {shown!r}; check its intensities"
            )
        t3 = time.perf_counter()
        probs = self.postprocess(data, probs_model)
        t4 = time.perf_counter()
        labels = None
        if self.two_head:
            labels, probs = split_served(probs, self.config)
        timings = {"read_s": t1 - t0, "preprocess_s": t2 - t1, "inference_s": forward_s[0]}
        if run_on_device is not None:
            timings["queue_wait_s"] = max(0.0, t3 - t2 - forward_s[0])
        timings["invert_s"] = t4 - t3
        return Prediction(
            probs, grid_of(img), self.temperature(on), timings, labels=labels, calibrator=self.calibrator_kind(on)
        )

    def _preprocess_or_refuse(self, img: sitk.Image, name: str) -> dict:
        """:meth:`preprocess`; a valid file MONAI cannot bring into model space is still bad input (422), except when
        it ran out of memory (the caller makes that a 413)."""
        try:
            return self.preprocess(img, name=name)
        except (ACECalError, InferenceCancelled):
            raise
        except Exception as e:
            if out_of_memory(e):
                raise
            log.warning("image %r could not be brought into the model's space: %r", name, e, exc_info=True)
            raise InvalidInputError(
                f"the image {name!r} could not be brought into the model's space "
                f"({type(e).__name__}: {str(e)[:200]}); check that it is a valid 3-D scalar "
                "volume"
            ) from None


def _check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.check()


def _read_named(path: Union[str, os.PathLike], name: str) -> sitk.Image:
    """read_volume on a server temp file, with the user's file name in the messages."""
    try:
        return read_volume(path, what="image", allow_vector=True)
    except InvalidInputError as e:
        detail = e.detail.replace(str(path), name).replace(repr(Path(path).name), repr(name))
        detail = detail.replace(Path(path).name, name)
        raise InvalidInputError(detail, code=e.code) from None


class PredictorCache:
    """Predictors kept per (bundle, device): a model's network is loaded once and reused (LRU, ``capacity``).

    The key includes the weights file's modification time, so a bundle republished under the same id is reloaded.
    """

    def __init__(self, device: Union[str, torch.device] = "auto", capacity: int = 4):
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.capacity = max(int(capacity), 1)
        self._items: OrderedDict[tuple, Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, bundle: Bundle) -> tuple:
        try:
            mtime = bundle.weights_path.stat().st_mtime_ns
        except OSError:
            mtime = None
        return (bundle.id, str(bundle.path), mtime, str(self.device))

    def get(self, bundle: Bundle) -> Predictor:
        key = self._key(bundle)
        with self._lock:
            p = self._items.get(key)
            if p is not None:
                self._items.move_to_end(key)
                return p
            p = Predictor(bundle, self.device)
            self._items[key] = p
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return p

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k, p in self._items.items() if p._network is not None]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def describe_device(device: Any) -> str:
    """A short human description: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    d = torch.device(device)
    if d.type == "cuda":
        try:
            return f"{d} ({torch.cuda.get_device_name(d)})"
        except Exception:  # noqa: BLE001  # pragma: no cover - only a label: a driver problem must not fail it
            return str(d)
    return str(d)
