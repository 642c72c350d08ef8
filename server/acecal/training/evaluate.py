"""``acecal evaluate``: a bundle on a labelled folder -> ``report.json``, reliability PNGs and ``report.md``.

It judges what the server serves. Each case goes through :meth:`acecal.inference.predictor.Predictor.predict` (model
space, sliding window, the bundle's post-hoc calibrator, softmax, back onto the input grid) and
:func:`acecal.inference.pipeline.analyse` (labels, confidence, flags with the bundle's threshold, band and minimum
region): exactly the code behind ``/infer``. On the image's own grid (the input grid) it then measures

* calibration (:class:`acecal.metrics.CalibrationAccumulator`): Dice of the served label map, ECE / ACE / MCE of the
  served probabilities with 20 hard bins, background excluded, macro (per case over the classes present, then over
  cases) and micro (voxels pooled);
* the floor (:class:`acecal.metrics.floor.FloorAccumulator`): the expected ECE / ACE / MCE of a perfectly calibrated
  model with the same probabilities (labels drawn from them), exact, and ``removable`` = ACE - floor;
* error detection (:class:`acecal.metrics.error_detection.ErrorDetectionAccumulator`): AUROC of 1 - confidence for
  "voxel is wrong" within the dilated foreground, recall of the wrong voxels by the flags, flagged / wrong volume.

``raw=True`` evaluates the network's own softmax (the predictor's calibrator switch off). :class:`EvaluationAccumulator`
is the per-case part, shared with docs/calibration_study.py. Memory: one case's volumes at a time, plus a few numbers
per case and fixed-size histograms.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from acecal.bundles import BundleConfig, ModelRegistry, resolve_bundle
from acecal.bundles.registry import default_data_dir, default_models_dir
from acecal.data.datasets import discover_folders, validate_cases
from acecal.data.io import read_volume
from acecal.errors import InvalidInputError
from acecal.formatting import finite_or_none, number, percent, ratio
from acecal.geometry import Grid
from acecal.inference.pipeline import InferenceOptions, InferenceOutput, analyse
from acecal.inference.predictor import Predictor
from acecal.metrics import CalibrationAccumulator
from acecal.metrics.error_detection import DEFAULT_ROI_RADIUS, ErrorDetectionAccumulator
from acecal.metrics.floor import FloorAccumulator
from acecal.plots import plot_dataset_reliability_histogram, plot_reliability_diagram
from acecal.protocol import EVAL_FIGURES_CASES, EVAL_FIGURES_DATASET, METRIC_NAMES
from acecal.storage.files import atomic_write, dumps_finite
from acecal.training.progress import Cancelled, is_cancelled

MACRO_NOTE = (
    "macro: for each case, the mean over the foreground classes present in that case's label map "
    "(background excluded), then the mean over cases. Per class: the mean over the cases in which the class "
    "is present. Hard binning with 20 equal-width confidence bins; Dice of the served label map. "
    "Computed on each image's own grid (the input grid), from the probabilities the server serves for it."
)
FLOOR_NOTE = (
    "floor: the expected ECE / ACE / MCE of a perfectly calibrated model with the same probabilities "
    "(every voxel's label drawn from its own served probabilities), with the metric's binning, macro and "
    "micro as the metric; exact per bin (Poisson-binomial; normal law beyond 65536 voxels in a bin, error "
    "< 1.5e-6). removable_ace = ACE - floor: what better calibration can remove."
)
ERRORS_NOTE = (
    "error detection: a voxel is wrong when the served label differs from the true one. ROI = predicted "
    "or true foreground dilated by {r:g} voxel steps (every wrong voxel lies in it). auroc: of "
    "1 - confidence for wrong vs right voxels within the ROI, ties counted half (auroc_max_error bounds the "
    "histogram pooling). recall: wrong volume inside the served flags mask / wrong volume. "
    "flagged_over_wrong: flagged volume / wrong volume. precision: wrong volume inside the flags / flagged "
    "volume. Per class c (one against the rest): ROI = voxels predicted or true c, dilated alike; wrong = c "
    "in exactly one of prediction and truth; flagged = flags inside that ROI. Pooled over cases by volume."
)

REPORT_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HISTOGRAM_NAME = "dataset_reliability_histogram.png"
#: the metrics a perfectly calibrated model has a floor of
FLOOR_METRICS = ("ace", "ece", "mce")


def _finite(values: Any, names: tuple[str, ...] = METRIC_NAMES, key: str = "{}") -> dict[str, Optional[float]]:
    """``{name: values[key.format(name)]}`` as finite floats or None, for each metric name."""
    return {m: finite_or_none(values[key.format(m)]) for m in names}


def _diff(a: Any, b: Any) -> Optional[float]:
    a, b = finite_or_none(a), finite_or_none(b)
    return None if a is None or b is None else a - b


def _file_safe(name: str) -> str:
    """A case id as a file name part: letters, digits, '.', '_' and '-' only, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "case"


class EvaluationAccumulator:
    """Calibration, floor and error detection of one model, one case at a time (the served outputs, input grid).

    Args:
        config: the bundle's config (classes, threshold, two heads).
        options: the inference options of the flags (None: the bundle's threshold, the default band and minimum
            region, as ``/infer``).
        roi_radius: error-detection ROI margin in voxel steps.
    """

    def __init__(
        self, config: BundleConfig, options: Optional[InferenceOptions] = None, roi_radius: float = DEFAULT_ROI_RADIUS
    ) -> None:
        self.config = config
        self.options = options or InferenceOptions()
        names = config.class_names
        self.calibration = CalibrationAccumulator(config.num_classes, include_background=False, class_names=names)
        self.floor = FloorAccumulator(config.num_classes, class_names=names)
        self.errors = ErrorDetectionAccumulator(names, roi_radius=roi_radius)

    def add(
        self,
        case_id: str,
        probs: np.ndarray,
        grid: Grid,
        truth: np.ndarray,
        *,
        labels: Optional[np.ndarray] = None,
        temperature: Optional[float] = None,
        options: Optional[InferenceOptions] = None,
    ) -> InferenceOutput:
        """Add one case; returns the :class:`acecal.inference.pipeline.InferenceOutput` (the served volumes).

        Args:
            probs: (C, z, y, x) served probabilities on ``grid`` (``Prediction.probs``).
            truth: (z, y, x) true label map on the same grid.
            labels: the served label map when it is not argmax(probs) (``Prediction.labels``: a two-head network).
            options: this case's flag options when they differ from the accumulator's (a cross-fitted threshold).
        """
        truth = np.asarray(truth)
        if truth.shape != probs.shape[1:]:
            raise InvalidInputError(
                f"case {case_id}: label map {truth.shape} and probabilities {probs.shape[1:]} are on different grids"
            )
        truth = truth.astype(np.int64, copy=False)
        out = analyse(probs, grid, self.config, options or self.options, temperature=temperature, labels=labels)
        served = torch.from_numpy(out.labels.astype(np.int64))[None, None]
        self.calibration.update(
            torch.from_numpy(np.ascontiguousarray(probs))[None],
            torch.from_numpy(truth)[None, None],
            case_id=case_id,
            predicted=served,
        )
        self.floor.update(probs, truth, case_id)
        self.errors.update(out.labels, out.confidence, out.flags, truth, case_id, voxel_ml=grid.voxel_volume_ml)
        return out

    def report(self) -> dict:
        """The numbers of ``report.json`` (everything but the run's identity, figures and timing)."""
        rep = self.calibration.aggregate()
        floor = self.floor.aggregate()
        errors = self.errors.aggregate()
        eff = self.options.effective(self.config)
        macro, micro = _finite(rep.macro), _finite(rep.micro)
        per_class = {}
        for row in rep.per_class:
            name = row["class"]
            fc = floor["per_class"][name]
            per_class[name] = {
                "label": row["index"],
                "cases_present": row["cases_present"],
                **_finite(row, key="macro_{}"),
                "micro_ace": finite_or_none(row["micro_ace"]),
                "floor_ace": finite_or_none(fc["macro_ace"]),
                "removable_ace": _diff(row["macro_ace"], fc["macro_ace"]),
                "micro_floor_ace": finite_or_none(fc["micro_ace"]),
            }
        cases, case_classes = [], {}
        for row in rep.per_case:
            cid = row["case_id"]
            fl, ed = floor["per_case"][cid], errors["per_case"][cid]
            cases.append(
                {
                    "case": cid,
                    **_finite(row),
                    "floor_ace": finite_or_none(fl["ace"]),
                    "auroc": ed["auroc"],
                    "recall": ed["recall"],
                    "flagged_over_wrong": ed["flagged_over_wrong"],
                }
            )
            case_classes[cid] = {
                n: {"present": v["present"], **_finite(v), "floor_ace": finite_or_none(fl["classes"][n]["ace"])}
                for n, v in row["classes"].items()
            }
        floor_out = {
            **_finite(floor["macro"], FLOOR_METRICS),
            "removable_ace": _diff(macro["ace"], floor["macro"]["ace"]),
            "micro": {
                **_finite(floor["micro"], FLOOR_METRICS),
                "removable_ace": _diff(micro["ace"], floor["micro"]["ace"]),
            },
            "note": FLOOR_NOTE,
        }
        error_out = {k: v for k, v in errors.items() if k not in ("per_case", "per_class", "num_cases", "roi_radius")}
        error_out.update(
            {
                "per_class": errors["per_class"],
                "roi_radius_voxels": errors["roi_radius"],
                "flags": {
                    k: eff[k]
                    for k in ("uncertainty_threshold", "band_mm", "band_voxels", "min_region_voxels", "connectivity")
                },
                "note": ERRORS_NOTE.format(r=errors["roi_radius"]),
            }
        )
        return {
            "aggregate": macro,
            "aggregate_std": _finite(rep.macro, key="{}_std"),
            "micro": micro,
            "floor": floor_out,
            "error_detection": error_out,
            "per_class": per_class,
            "cases": cases,
            "case_classes": case_classes,
            "num_cases": len(cases),
            "num_bins": rep.num_bins,
            "note": MACRO_NOTE,
        }


def evaluate(
    model: str,
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    raw: bool = False,
    temperature: bool = False,
    roi_radius: float = DEFAULT_ROI_RADIUS,
    registry: Optional[ModelRegistry] = None,
    device: Optional[str] = None,
    plots: bool = True,
    progress: Optional[Callable[[dict], None]] = None,
    cancel: Any = None,
) -> dict:
    """Evaluate ``model`` (bundle id or folder) on paired ``images``/``labels`` folders; write the report to ``out``.

    Args:
        raw: evaluate the network's own softmax (no post-hoc calibrator); default: what the server serves.
        temperature: insist on the bundle's post-hoc step (an error when it has none; it is applied anyway unless
            ``raw``). Kept for the callers of the time when it was off by default.
        roi_radius: error-detection ROI margin in voxel steps.
        device: "cpu" (default when no GPU) or "cuda".
        plots: write the per-case reliability diagrams and the dataset reliability histogram.
        progress: called with {"event": "case", "case", "index", "total"} after each case.

    Returns:
        the report dict (also written to ``out/report.json``).
    """
    t0 = time.time()
    reg = registry or ModelRegistry([default_models_dir(), default_data_dir() / "models"])
    bundle = resolve_bundle(model, reg)
    cfg = bundle.config
    predictor = Predictor(
        bundle, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), use_calibrator=not raw
    )
    kind = predictor.calibrator_kind(True)  # the bundle's post-hoc step, None when it has none
    if temperature and raw:
        raise InvalidInputError("--temperature and --raw contradict each other: --raw switches the post-hoc step off")
    if temperature and kind is None:
        raise InvalidInputError(f"model {cfg.id!r} has no fitted temperature or calibrator; run without --temperature")
    info = discover_folders(images, labels)
    validate_cases(info.cases, cfg.num_classes, in_channels=cfg.in_channels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = EvaluationAccumulator(cfg, InferenceOptions(use_calibrator=not raw), roi_radius=roi_radius)
    applied_t = None
    with torch.no_grad():
        for i, c in enumerate(info.cases):
            if is_cancelled(cancel):
                raise Cancelled()
            assert c.label is not None  # validate_cases refused unlabelled cases
            pred = predictor.predict(c.image, use_calibrator=not raw)
            truth = sitk.GetArrayFromImage(read_volume(c.label, what="label"))
            ev.add(c.name, pred.probs, pred.grid, truth, labels=pred.labels, temperature=pred.temperature)
            applied_t = pred.temperature
            if progress:
                progress({"event": "case", "case": c.name, "index": i + 1, "total": len(info.cases)})
    numbers = ev.report()
    names = ev.calibration.class_names
    served = None if raw else kind
    figures: dict[str, str] = {}
    hist_path = None
    if plots:
        tag = "raw softmax" if raw else (f"{served}" + (f" T={applied_t:.3g}" if applied_t else "") if served else "")
        for row in numbers["cases"]:
            cid = row["case"]
            mean_p, mean_y, count = ev.calibration.case_bins(cid)
            p = plot_reliability_diagram(
                mean_p,
                mean_y,
                count,
                names,
                out / "figures" / f"reliability_{_file_safe(cid)}.png",
                title=f"{cid} ({cfg.id}{', ' + tag if tag else ''})",
            )
            figures[cid] = str(p.relative_to(out))
        hist_path = plot_dataset_reliability_histogram(
            ev.calibration.aggregate().histogram,
            names,
            out / HISTOGRAM_NAME,
            title=f"{cfg.id}: dataset reliability histogram",
        )
    report = {
        "model": cfg.id,
        "raw": bool(raw),
        "calibrator": served,
        "temperature": applied_t,
        "space": "input grid",
        **numbers,
        "images": str(images),
        "labels": str(labels),
        "figures": {EVAL_FIGURES_DATASET: HISTOGRAM_NAME if hist_path else None, EVAL_FIGURES_CASES: figures},
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write(out / REPORT_NAME, dumps_finite(report, indent=2) + "\n")
    atomic_write(out / MARKDOWN_NAME, report_markdown(report))
    return report


def _row(*cells: str) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _detection_row(name: str, v: dict) -> str:
    """A row of the error-detection table: AUROC, recall, flagged / wrong, precision, wrong and flagged volume."""
    return _row(
        name,
        number(v["auroc"], 3),
        percent(v["recall"]),
        ratio(v["flagged_over_wrong"]),
        percent(v["precision"]),
        number(v["wrong_ml"], 3),
        number(v["flagged_ml"], 3),
    )


def report_markdown(r: dict) -> str:
    """``report.md``: the tables of a report dict, its notes and its figures."""
    a, mi, fl, ed = r["aggregate"], r["micro"], r["floor"], r["error_detection"]
    what = (
        "the network's own softmax (`--raw`, no post-hoc step)"
        if r.get("raw")
        else "the served probabilities"
        + (
            f" (post-hoc {r['calibrator']}" + (f", T = {r['temperature']:.3g}" if r.get("temperature") else "") + ")"
            if r.get("calibrator")
            else " (the bundle has no post-hoc step)"
        )
    )
    lines = [
        f"# Evaluation of `{r['model']}`",
        "",
        f"{r['num_cases']} cases from `{r['images']}`; {what}, on each image's own grid (the input grid).",
        "",
        "| | Dice | ACE | floor | removable | ECE | MCE |",
        "|---|---|---|---|---|---|---|",
        _row(
            "macro (mean over cases)",
            *map(number, (a["dice"], a["ace"], fl["ace"], fl["removable_ace"], a["ece"], a["mce"])),
        ),
        _row(
            "micro (pooled voxels)",
            *map(
                number, (mi["dice"], mi["ace"], fl["micro"]["ace"], fl["micro"]["removable_ace"], mi["ece"], mi["mce"])
            ),
        ),
    ]
    for name, v in r["per_class"].items():
        lines.append(
            _row(
                f"{name} ({v['cases_present']} cases)",
                *map(number, (v["dice"], v["ace"], v["floor_ace"], v["removable_ace"], v["ece"], v["mce"])),
            )
        )
    lines += [
        "",
        f"*{r['note']}*",
        "",
        f"*{fl['note']}* Floor ECE {number(fl['ece'], 5)}, MCE {number(fl['mce'])}.",
        "",
    ]
    flags = ed["flags"]
    band = f"{flags['band_mm']:g} mm" if flags.get("band_mm") is not None else f"{flags['band_voxels']:g} voxels"
    lines += [
        "## Do the flags find the errors?",
        "",
        f"Flags as served: confidence below {flags['uncertainty_threshold']:g} within {band} of a predicted boundary, "
        f"regions of at least {flags['min_region_voxels']} voxels ({flags['connectivity']}-connected).",
        "",
        "| | AUROC (1 - confidence) | recall of wrong voxels | flagged / wrong volume | precision | wrong ml "
        "| flagged ml |",
        "|---|---|---|---|---|---|---|",
        _detection_row("all classes", ed),
    ]
    lines += [_detection_row(name, v) for name, v in ed["per_class"].items()]
    lines += ["", f"*{ed['note']}*", ""]
    if r["figures"].get("dataset_histogram"):
        lines += [
            "## Dataset reliability histogram",
            "",
            "Column m: the distribution over cases of the observed frequency in confidence bin m; mass on the "
            "diagonal means calibrated, below it over-confident.",
            "",
            f"![dataset reliability histogram]({r['figures']['dataset_histogram']})",
            "",
        ]
    lines += [
        "## Cases",
        "",
        "| case | Dice | ACE | floor | ECE | MCE | AUROC | recall | flagged / wrong |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        lines.append(
            _row(
                c["case"],
                *map(number, (c["dice"], c["ace"], c["floor_ace"], c["ece"], c["mce"])),
                number(c["auroc"], 3),
                percent(c["recall"]),
                ratio(c["flagged_over_wrong"]),
            )
        )
    figs = r["figures"].get("cases") or {}
    if figs:
        lines += ["", "## Reliability diagrams", ""]
        for cid, path in figs.items():
            lines += [f"### {cid}", "", f"![{cid}]({path})", ""]
    return "\n".join(lines) + "\n"
