"""A calibrator in a bundle: built from ``bundle.json`` (``calibrator``, or the older ``temperature`` field) and its
weights file, and published as a new bundle next to the network it calibrates.

Everything read here may come from anyone: the architecture is bounded by the calibrator's constructor, the weights
must fit it exactly (strict load) and be finite.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acecal.bundles import Bundle, BundleConfig, CalibratorConfig, write_bundle
from acecal.bundles.bundle import CALIBRATOR_WEIGHTS_NAME
from acecal.calibration.calibrators import Calibrator, TemperatureCalibrator, build_calibrator
from acecal.errors import ACECalError, BundleError

__all__ = ["load_calibrator", "calibrated_parent", "calibrator_config", "publish_calibrated"]


def load_calibrator(bundle: Bundle, device: Any = "cpu") -> Optional[Calibrator]:
    """The bundle's calibrator in eval mode on ``device``; None when it has none.

    ``bundle.json``'s ``calibrator`` entry wins; otherwise a stored ``temperature`` (other than 1) becomes a
    :class:`TemperatureCalibrator`, so bundles written before calibrators existed are served as they were.
    """
    cfg = bundle.config
    rec = cfg.calibrator
    if rec is None:
        t = cfg.temperature
        return None if t is None or t == 1.0 else TemperatureCalibrator(float(t)).to(device).eval()
    try:
        cal = build_calibrator(rec.kind, dict(rec.params))
    except ACECalError as e:
        raise BundleError(f"bundle {bundle.id}: its calibrator cannot be built: {e.detail}") from None
    if cal.has_weights:
        path = bundle.calibrator_path
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors has its own error types for a damaged file
            raise BundleError(f"cannot read the calibrator weights of bundle {bundle.id} ({path}): {e}") from None
        for k, v in state.items():
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise BundleError(f"bundle {bundle.id}: calibrator weight {k!r} is not a finite float tensor")
        try:
            cal.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise BundleError(f"bundle {bundle.id}: the calibrator weights do not fit its parameters: {e}") from None
    return cal.to(device).eval()


def calibrator_config(calibrator: Calibrator, *, fitted_on: dict, metrics: dict) -> CalibratorConfig:
    """The ``bundle.json`` record of a fitted calibrator."""
    return CalibratorConfig.model_validate(  # validated: ``kind`` is a plain string on the calibrator classes
        {
            "kind": calibrator.kind,
            "params": calibrator.spec(),
            "weights": CALIBRATOR_WEIGHTS_NAME if calibrator.has_weights else None,
            "fitted_on": fitted_on,
            "metrics": metrics,
        }
    )


def _half_precision(bundle: Bundle) -> bool:
    with safe_open(str(bundle.weights_path), framework="pt") as f:
        return any(f.get_slice(k).get_dtype() in ("F16", "BF16") for k in f.keys())


def calibrated_parent(base: Bundle, model_id: str) -> Optional[str]:
    """The parent of ``base`` plus a calibrator published as ``model_id``: ``base`` itself, or, when the bundle is
    replaced in place (same id, how the shipped models get theirs), the network's own parent."""
    return base.config.parent if model_id == base.id else base.id


def publish_calibrated(
    base: Bundle,
    calibrator: Calibrator,
    record: CalibratorConfig,
    out_dir: Path,
    *,
    model_id: str,
    card: str,
    description: Optional[str] = None,
    updates: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> Bundle:
    """Publish a new bundle ``out_dir/model_id``: ``base``'s network (weights copied unchanged, same precision) with
    ``calibrator``. The record's ``temperature`` field is set for a global temperature (older readers apply it the
    same way) and cleared otherwise. ``updates``: further ``BundleConfig`` fields to set (e.g. the threshold)."""
    t = calibrator.value if isinstance(calibrator, TemperatureCalibrator) else None
    if t is not None and not math.isfinite(t):  # pragma: no cover - the calibrator refuses such values
        raise BundleError("non-finite temperature")
    update = {
        "id": model_id,
        "calibrator": record,
        "temperature": t,
        "parent": calibrated_parent(base, model_id),
        "description": description if description is not None else base.config.description,
        **(updates or {}),
    }
    config = BundleConfig.model_validate(base.config.model_copy(update=update).model_dump())
    state = base.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if calibrator.has_weights:
            p = Path(tmp) / CALIBRATOR_WEIGHTS_NAME
            save_file({k: v.detach().cpu().float().contiguous() for k, v in calibrator.state_dict().items()}, str(p))
            extra[CALIBRATOR_WEIGHTS_NAME] = p
        return write_bundle(
            out_dir, config, state, card, half_precision=_half_precision(base), overwrite=overwrite, extra_files=extra
        )
