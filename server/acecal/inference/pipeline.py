"""From probabilities to the four output volumes and the report; the same code serves ``/infer`` and ``acecal infer``.

The report (a JSON-able dict, :class:`acecal.protocol.InferenceReply` less what the result store adds) is what the
server returns and what ``summary.json`` holds::

    {"model_id", "labels": {"0": "background", ...}, "grid": {size, spacing, origin, direction} (LPS),
     "summary": {"classes": [...], "uncertain_volume_ml", ...}, "regions": [...], "params": {...}, "timings": {...}}

Two-head bundles: the label map is the segmentation head's; confidence is the calibration head's probability of that
label (the probability that the served label is right), uncertainty its normalised entropy (see :func:`split_served`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np

from acecal.bundles import BundleConfig
from acecal.geometry import Grid
from acecal.inference.memory import DEVICE_MEMORY, HOST_MEMORY, memory_bounded
from acecal.inference.uncertainty import (
    DEFAULT_BAND_VOXELS,
    DEFAULT_CONNECTIVITY,
    DEFAULT_MIN_REGION_VOXELS,
    confidence_maps,
    describe_regions,
    label_dtype,
    summarize,
    uncertain_boundary_flags,
)
from acecal.inference.window import CancelToken
from acecal.networks import is_two_head, split_heads
from acecal.nrrd import write_nrrd
from acecal.protocol import VOLUME_FILE_NAMES, VOLUMES

if TYPE_CHECKING:  # the predictor imports this module (split_served)
    from acecal.inference.predictor import DeviceRunner, Predictor


@dataclass
class InferenceOptions:
    """Post-processing options (the server's ``params`` minus transport details). None = the bundle's default."""

    uncertainty_threshold: Optional[float] = None
    overlap: Optional[float] = None
    use_temperature: bool = True  # the older name of use_calibrator (used when that is None)
    band_mm: Optional[float] = None
    band_voxels: float = DEFAULT_BAND_VOXELS
    min_region_voxels: int = DEFAULT_MIN_REGION_VOXELS
    connectivity: int = DEFAULT_CONNECTIVITY
    use_calibrator: Optional[bool] = None  # apply the bundle's calibrator; None = use_temperature

    def calibrate(self) -> bool:
        """Whether the bundle's post-hoc calibrator is applied."""
        return bool(self.use_temperature if self.use_calibrator is None else self.use_calibrator)

    tta: Optional[str] = None  # flip test-time augmentation: none | axis_flips | all_flips; None = the bundle's

    def effective(self, config: BundleConfig) -> dict:
        """The options with the bundle's defaults filled in, as reported back."""
        return {
            "uncertainty_threshold": float(
                self.uncertainty_threshold
                if self.uncertainty_threshold is not None
                else config.default_threshold(self.calibrate())
            ),
            "overlap": float(self.overlap if self.overlap is not None else config.sw_overlap),
            "use_temperature": self.calibrate(),
            "use_calibrator": self.calibrate(),
            "band_mm": None if self.band_mm is None else float(self.band_mm),
            "band_voxels": float(self.band_voxels),
            "min_region_voxels": int(self.min_region_voxels),
            "connectivity": int(self.connectivity),
            "tta": str(self.tta if self.tta is not None else config.tta),
        }


@dataclass
class InferenceOutput:
    """The four volumes ((z, y, x) on ``grid``, the input's grid) and the report."""

    grid: Grid
    labels: np.ndarray
    confidence: np.ndarray
    uncertainty: np.ndarray
    flags: np.ndarray
    report: dict = field(default_factory=dict)

    def volumes(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in VOLUMES}


def split_served(probs: np.ndarray, config: BundleConfig) -> tuple[np.ndarray, np.ndarray]:
    """A two-head bundle's (2C, z, y, x) output on the input grid -> (label map (z, y, x) = argmax of the segmentation
    softmax, the calibration probabilities (C, z, y, x), a view)."""
    seg, cal = split_heads(probs, config.num_classes, dim=0)
    return np.argmax(seg, axis=0).astype(label_dtype(config.num_classes), copy=False), cal


def analyse(
    probs: np.ndarray,
    grid: Grid,
    config: BundleConfig,
    options: InferenceOptions,
    *,
    temperature: Optional[float] = None,
    model_id: Optional[str] = None,
    timings: Optional[dict] = None,
    labels: Optional[np.ndarray] = None,
) -> InferenceOutput:
    """Labels, confidence, uncertainty, flags, per-class summary and regions from probabilities (C, z, y, x).

    ``labels`` (z, y, x): the served label map when it is not ``argmax(probs)``; the confidence is then the probability
    of that label. A two-head bundle's (2C, z, y, x) output (``Predictor.postprocess``) is split here.
    """
    t0 = time.perf_counter()
    eff = options.effective(config)
    names = config.class_names
    if labels is None and is_two_head(config) and probs.shape[0] == 2 * config.num_classes:
        labels, probs = split_served(probs, config)
    if labels is None:
        labels, confidence, uncertainty = confidence_maps(probs)
    else:
        if labels.shape != probs.shape[1:]:
            raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} are on different grids")
        _, _, uncertainty = confidence_maps(probs)
        labels = labels.astype(label_dtype(probs.shape[0]), copy=False)
        confidence = np.take_along_axis(probs, labels[None].astype(np.intp), axis=0)[0].astype(np.float32)
    spacing_zyx = grid.spacing[::-1]
    flags, regions, n = uncertain_boundary_flags(
        labels,
        confidence,
        eff["uncertainty_threshold"],
        spacing_zyx,
        band_mm=eff["band_mm"],
        band_voxels=eff["band_voxels"],
        min_region_voxels=eff["min_region_voxels"],
        connectivity=eff["connectivity"],
    )
    region_list = describe_regions(regions, n, probs, confidence, grid, names)
    summary = summarize(labels, confidence, flags, grid, names)
    summary["region_count"] = n
    summary["temperature"] = temperature
    summary["calibrator"] = _calibrator_kind(config) if options.calibrate() else None
    times = dict(timings or {})
    times["analyse_s"] = time.perf_counter() - t0
    report = {
        "model_id": model_id or config.id,
        "labels": dict(config.labels),
        "grid": grid.to_dict(),
        "summary": summary,
        "regions": region_list,
        "params": eff,
        "timings": {k: round(float(v), 4) for k, v in times.items()},
    }
    return InferenceOutput(grid, labels, confidence, uncertainty, flags, report)


def _calibrator_kind(config: BundleConfig) -> Optional[str]:
    """The kind of post-hoc calibrator the bundle applies when switched on (the ``temperature`` field counts)."""
    if config.calibrator is not None:
        return config.calibrator.kind
    return "temperature" if config.temperature not in (None, 1.0) else None


def run_inference(
    predictor: Predictor,
    image: Union[str, os.PathLike],
    options: Optional[InferenceOptions] = None,
    *,
    name: Optional[str] = None,
    run_on_device: Optional[DeviceRunner] = None,
    cancel: Optional[CancelToken] = None,
) -> InferenceOutput:
    """Inference of one image file, as ``acecal infer`` and ``POST /infer`` both run it: read, model space, the
    device stage (through ``run_on_device`` when given: the server's device queue), back to the input grid, analysis.

    Args:
        name: the image's name in messages (the user's file name rather than a server's temporary name).
        run_on_device: see :meth:`acecal.inference.predictor.Predictor.predict`.
        cancel: stop early once it is cancelled (see :meth:`~acecal.inference.predictor.Predictor.predict`); also
            checked before the analysis.

    Raises:
        InferenceCancelled: ``cancel`` was cancelled.
        InvalidInputError: an unusable image (422).
        PayloadTooLargeError: running out of memory (413), on the device or on the host, raised once the failed
            attempt's memory is free.
    """
    options = options or InferenceOptions()
    shown = f"the image {name or Path(image).name!r}"
    device_memory = DEVICE_MEMORY if predictor.device.type != "cpu" else HOST_MEMORY
    run = run_on_device or (lambda stage: stage())

    def on_device(stage: Callable[[], Any]) -> Any:
        return memory_bounded(lambda: run(stage), shown, device_memory)

    t0 = time.perf_counter()
    pred = memory_bounded(
        lambda: predictor.predict(
            image,
            overlap=options.overlap,
            use_calibrator=options.calibrate(),
            tta=options.tta,
            name=name,
            run_on_device=on_device,
            cancel=cancel,
        ),
        shown,
    )
    if cancel is not None:
        cancel.check()
    if run_on_device is None:  # no queue, no wait (on_device only bounds the memory)
        pred.timings.pop("queue_wait_s", None)
    out = memory_bounded(
        lambda: analyse(
            pred.probs,
            pred.grid,
            predictor.config,
            options,
            temperature=pred.temperature,
            model_id=predictor.bundle.id,
            timings=pred.timings,
            labels=pred.labels,
        ),
        shown,
    )
    out.report["timings"]["total_s"] = round(time.perf_counter() - t0, 4)
    return out


def write_volumes(
    out_dir: Union[str, os.PathLike], output: InferenceOutput, *, compress: bool = False
) -> dict[str, Path]:
    """Write the four volumes as NRRD into ``out_dir`` (``labels.nrrd``, ...); returns name -> path.

    Masks (labels, flags) are always gzip-compressed (level 1: fast, and they shrink a lot); the float maps are raw
    unless ``compress``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, arr in output.volumes().items():
        enc = "gzip" if (compress or arr.dtype.kind in "ub") else "raw"
        paths[name] = write_nrrd(out / VOLUME_FILE_NAMES[name], arr, output.grid, encoding=enc, level=1)
    return paths
