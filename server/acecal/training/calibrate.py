"""``acecal calibrate``: fit a calibrator for a bundle on cases its network never trained on, measure it
cross-fitted, and publish a new bundle carrying it (bundles are immutable).

Steps:

1. The cases: by default the bundle's own validation split (``training.split.val`` in ``bundle.json``); cases the
   network trained on (``training.split.train``) are refused.
2. Their raw model-space logits (cached, :func:`acecal.training.calibration_cases.model_space_cases`).
3. Cross-fitted figures (:func:`acecal.calibration.cross_fit`: fitted on one half, measured on the other, and vice
   versa, fixed seed): the honest estimate of what the calibrator does on unseen cases.
4. The calibrator to ship, fitted on all the cases; its figures on them are in-sample and labelled so.
5. A new bundle: the same network weights, the ``calibrator`` record (kind, parameters, what it was fitted on, raw /
   cross-fitted / in-sample figures) and its weights file, and a card that states all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from acecal.bundles import Bundle, CalibratorConfig, ModelRegistry, resolve_bundle
from acecal.bundles.bundle import valid_id
from acecal.bundles.card import model_card
from acecal.calibration.crossfit import change_pct, cross_fit, summarise_cases
from acecal.calibration.fitting import (
    CalibrationCase,
    case_metrics,
    fit_ace_temperature,
    fit_local_temperature,
    served_threshold,
)
from acecal.calibration.store import calibrated_parent, calibrator_config, publish_calibrated
from acecal.data.datasets import Case, DatasetInfo, discover_dataset, validate_cases
from acecal.errors import InvalidInputError
from acecal.training.calibration_cases import model_space_cases

__all__ = ["METHODS", "calibrate_bundle", "fit_method"]

#: CLI method name -> calibrator kind
METHODS = {"ace-temperature": "temperature", "local-temperature": "local_temperature"}
LTS_SETTINGS = (
    "hidden",
    "layers",
    "kernel_size",
    "dilation",
    "use_image",
    "logit_scale",
    "epochs",
    "lr",
    "weight_decay",
    "loss_bins",
    "nll_weight",
    "seed",
    "keep_best",
    "clip_grad",
    "ranking_tolerance",
)


def fit_method(method: str, settings: Optional[dict[str, Any]] = None) -> Callable:
    """``cases -> (calibrator, info)`` for a method name of :data:`METHODS` (``settings``: LTS keyword arguments)."""
    settings = dict(settings or {})
    if method == "ace-temperature":
        if settings:
            raise InvalidInputError(f"ace-temperature takes no settings, got {sorted(settings)}")
        return lambda cases: fit_ace_temperature(cases)
    if method == "local-temperature":
        unknown = sorted(set(settings) - set(LTS_SETTINGS))
        if unknown:
            raise InvalidInputError(f"unknown local-temperature settings {unknown}; known: {list(LTS_SETTINGS)}")
        return lambda cases: fit_local_temperature(cases, **settings)
    raise InvalidInputError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def _select_cases(bundle: Bundle, info: DatasetInfo, names: Optional[Sequence[str]]) -> tuple[list[Case], str]:
    split = (bundle.config.training or {}).get("split") or {}
    if names is None:
        names = split.get("val") or []
        if not names:
            raise InvalidInputError(
                f"model {bundle.id!r} records no validation split (training.split.val); "
                "name the cases to fit on with --cases"
            )
        source = "the network's validation split (training.split.val)"
    else:
        source = "cases named by the caller"
    names = list(dict.fromkeys(names))
    trained = set(split.get("train") or [])
    seen = sorted(set(names) & trained)
    if seen:
        raise InvalidInputError(
            f"the network of {bundle.id!r} trained on {len(seen)} of these cases (e.g. "
            f"{seen[0]!r}); a calibrator must be fitted on cases it never saw"
        )
    by_name = {c.name: c for c in info.cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidInputError(f"{len(missing)} case(s) are not in the dataset, e.g. {missing[0]!r}")
    cases = [by_name[n] for n in names]
    if any(c.label is None for c in cases):
        raise InvalidInputError("every case needs a label map")
    return cases, source


def calibrate_bundle(
    model: str | Path,
    *,
    method: str,
    data: Optional[str | Path] = None,
    images: Optional[str | Path] = None,
    labels: Optional[str | Path] = None,
    cases: Optional[Sequence[str]] = None,
    out_dir: str | Path,
    model_id: Optional[str] = None,
    overwrite: bool = False,
    settings: Optional[dict[str, Any]] = None,
    seed: int = 0,
    uncertainty_accuracy: float = 0.9,
    cache_dir: Optional[Path] = None,
    registry: Optional[ModelRegistry] = None,
    device: str = "cpu",
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[Bundle, dict]:
    """Fit, cross-fit and publish; returns the new bundle and the calibrator's metrics record.

    Args:
        model: bundle id or folder.
        method: ``ace-temperature`` or ``local-temperature``.
        data / images + labels: the dataset holding the cases (a ``dataset.json`` or folders).
        cases: case names to fit on; None = the bundle's validation split.
        out_dir, model_id, overwrite: where the new bundle goes (default id ``<model>-<method>``).
        settings: local-temperature settings (see :func:`acecal.calibration.fit_local_temperature`).
        seed: seed of the cross-fitting split.
        uncertainty_accuracy: target accuracy of the rule that sets the new bundle's default uncertainty threshold
            from the calibrated confidence on the fitting cases (the rule training uses on the raw one).
        cache_dir: logits cache (None: no cache).
    """
    say = progress or (lambda msg: None)
    fit = fit_method(method, settings)
    base = resolve_bundle(model, registry)
    model_id = model_id or f"{base.id}-{method}"
    if not valid_id(model_id):
        raise InvalidInputError(f"invalid model id {model_id!r}: lower-case letters, digits, '.', '_', '-'")
    if base.config.calibrator is not None:
        raise InvalidInputError(
            f"model {base.id!r} already has a calibrator; calibrate the network it was made from "
            f"({base.config.parent or 'its parent'})"
        )
    info = discover_dataset(data, images=images, labels=labels)
    chosen, source = _select_cases(base, info, cases)
    validate_cases(chosen, base.config.num_classes, in_channels=base.config.in_channels)
    say(f"{len(chosen)} cases from {source}; computing model-space logits")
    items = model_space_cases(base, chosen, cache_dir=cache_dir, device=device)

    say("cross-fitting (fit on one half, measure on the other, and vice versa)")
    crossed = cross_fit(
        items, fit, seed=seed, progress=lambda f: say(f"fold {f['fold'] + 1}/2: fitting on {len(f['fitted_on'])} cases")
    )
    say(f"fitting the calibrator to ship on all {len(items)} cases")
    calibrator, fit_info = fit(items)
    in_sample = summarise_cases(case_metrics(items, calibrator))
    threshold = round(float(served_threshold(items, calibrator, target=uncertainty_accuracy)), 4)
    rule = (
        f"recomputed for the calibrated confidence on the calibrator's {len(items)} fitting cases: the lowest "
        f"top-label confidence bin edge from which every populated bin (>= 100 voxels) was right >= "
        f"{uncertainty_accuracy:.0%} of the time (the network's own: {base.config.uncertainty_threshold:g})"
    )
    raw = crossed["raw"]
    folds = []
    for f in crossed["folds"]:
        entry = {"fitted_on": f["fitted_on"], "measured_on": f["measured_on"]}
        if "temperature" in f["info"]:
            entry["temperature"] = f["info"]["temperature"]
        elif f["info"].get("init_temperature") is not None:
            entry["init_temperature"] = f["info"]["init_temperature"]
        folds.append(entry)
    metrics = {
        "num_bins": 20,
        "note": "macro over cases of the per-case mean over the foreground classes present; hard binning, 20 bins; "
        "model space. Dice is the network's (a calibrator never changes the label map).",
        "raw": {"ace": raw["ace"], "dice": raw["dice"]},
        "cross_fitted": {
            **{k: crossed["calibrated"][k] for k in ("ace", "dice")},
            "change_pct": crossed["change_pct"],
            "seed": seed,
            "folds": folds,
            "per_case": {n: {"raw_ace": r["raw_ace"], "ace": r["ace"]} for n, r in crossed["per_case"].items()},
        },
        "in_sample": {
            "ace": in_sample["ace"],
            "dice": in_sample["dice"],
            "change_pct": change_pct(raw["ace"], in_sample["ace"]),
        },
    }
    fitted_on = {
        "source": source,
        "dataset": str(data) if data is not None else f"{images} + {labels}",
        "num_cases": len(items),
        "cases": [c.name for c in items],
        "cross_fitted": False,
        "method": method,
        "objective": (
            "macro hard ACE (20 bins), bounded 1-D search"
            if method == "ace-temperature"
            else "soft-binned L1-ACE loss (SoftL1ACELoss) on softmax(logits / T(x))"
        ),
        "settings": fit_info.get("settings"),
        "uncertainty_threshold": {
            "value": threshold,
            "base_value": base.config.uncertainty_threshold,
            "target_accuracy": uncertainty_accuracy,
        },
        "note": "the shipped calibrator is fitted on all these cases (its in-sample figures are optimistic); the "
        "cross-fitted figures come from calibrators fitted on one half and measured on the other",
    }
    record = calibrator_config(calibrator, fitted_on=fitted_on, metrics=metrics)
    description = (
        f"{base.config.description} + {record.kind.replace('_', ' ')} calibrator"
        if base.config.description
        else f"{base.id} + {record.kind.replace('_', ' ')} calibrator"
    )
    updates = {
        "uncertainty_threshold": threshold,
        "training": {**(base.config.training or {}), "uncertainty_threshold_rule": rule},
    }
    draft = base.config.model_copy(
        update={
            "id": model_id,
            "calibrator": record,
            "parent": calibrated_parent(base, model_id),
            "description": description,
            **updates,
        }
    )
    card = model_card(draft)
    bundle = publish_calibrated(
        base,
        calibrator,
        record,
        Path(out_dir),
        model_id=model_id,
        card=card,
        description=description,
        updates=updates,
        overwrite=overwrite,
    )
    return bundle, metrics


def refit_ace_temperature(
    cases: Sequence[CalibrationCase], *, source: str, uncertainty_accuracy: float = 0.9, seed: int = 0
) -> tuple[CalibratorConfig, float, float]:
    """An ACE temperature calibrator for a new network (a fine-tuned model whose base carried a calibrator: the base's
    calibrator was fitted to other logits), fitted on that network's validation ``cases``.

    Returns ``(CalibratorConfig, temperature, threshold)``: the record (in-sample figures, and cross-fitted ones when
    there are at least 4 cases), T, and the uncertainty threshold for the calibrated confidence by the training rule.
    """
    calibrator, _ = fit_ace_temperature(cases)
    raw = summarise_cases(case_metrics(cases))
    ins = summarise_cases(case_metrics(cases, calibrator))
    metrics: dict[str, Any] = {
        "num_bins": 20,
        "raw": {"ace": raw["ace"], "dice": raw["dice"]},
        "in_sample": {"ace": ins["ace"], "dice": ins["dice"], "change_pct": change_pct(raw["ace"], ins["ace"])},
    }
    if len(cases) >= 4:
        crossed = cross_fit(cases, fit_ace_temperature, seed=seed)
        metrics["cross_fitted"] = {
            "ace": crossed["calibrated"]["ace"],
            "dice": crossed["calibrated"]["dice"],
            "change_pct": crossed["change_pct"],
            "seed": seed,
        }
    threshold = round(float(served_threshold(cases, calibrator, target=uncertainty_accuracy)), 4)
    fitted_on = {
        "source": source,
        "num_cases": len(cases),
        "cases": [c.name for c in cases],
        "cross_fitted": False,
        "method": "ace-temperature",
        "objective": "macro hard ACE (20 bins), bounded 1-D search",
        "uncertainty_threshold": {"value": threshold, "target_accuracy": uncertainty_accuracy},
    }
    return calibrator_config(calibrator, fitted_on=fitted_on, metrics=metrics), calibrator.value, threshold
