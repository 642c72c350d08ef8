"""``acecal evaluate``: a bundle on a labelled folder -> ``report.json``, reliability PNGs and ``report.md``.

Each case goes through the bundle's model-space transforms (the chain shared with training and serving), the one
sliding-window path, optional temperature, softmax, then the streaming :class:`acecal.metrics.CalibrationAccumulator`.
Metrics are computed in model space (the bundle's orientation and spacing), as during validation, with 20 hard bins
and the background excluded.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from acecal.bundles import ModelRegistry, resolve_bundle
from acecal.bundles.registry import default_data_dir, default_models_dir
from acecal.data.datasets import discover_folders, validate_cases
from acecal.errors import InvalidInputError

MACRO_NOTE = ("macro: for each case, the mean over the foreground classes present in that case's label map "
              "(background excluded), then the mean over cases. Per class: the mean over the cases in which the class "
              "is present. Hard binning with 20 equal-width confidence bins; Dice of the argmax segmentation. "
              "Computed in the model's space (its orientation and voxel spacing).")

REPORT_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HISTOGRAM_NAME = "dataset_reliability_histogram.png"


def _f(v: Any) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "case"


def evaluate(
    model: str,
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    temperature: bool = False,
    registry: Optional[ModelRegistry] = None,
    device: Optional[str] = None,
    plots: bool = True,
    progress: Optional[Callable[[dict], None]] = None,
    cancel: Any = None,
) -> dict:
    """Evaluate ``model`` (bundle id or folder) on paired ``images``/``labels`` folders; write the report to ``out``.

    Args:
        temperature: divide the logits by the bundle's fitted temperature (an error when it has none).
        device: "cpu" (default when no GPU) or "cuda".
        plots: write the per-case reliability diagrams and the dataset reliability histogram.
        progress: called with {"event": "case", "case", "index", "total"} after each case.

    Returns:
        the report dict (also written to ``out/report.json``).
    """
    import torch

    from acecal.data.transforms import model_space_transforms
    from acecal.training.validation import run_pass

    t0 = time.time()
    reg = registry or ModelRegistry([default_models_dir(), default_data_dir() / "models"])
    bundle = resolve_bundle(model, reg)
    cfg = bundle.config
    T = None
    if temperature:
        if cfg.temperature is None:
            raise InvalidInputError(f"model {cfg.id!r} has no fitted temperature; run without --temperature")
        T = float(cfg.temperature)
    info = discover_folders(images, labels)
    validate_cases(info.cases, cfg.num_classes, in_channels=cfg.in_channels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = bundle.load_network(dev)
    chain = model_space_transforms(cfg)
    total = len(info.cases)

    def items():
        for c in info.cases:
            d = chain(c.as_dict())
            yield {"image": d["image"][None], "label": d["label"][None], "case": c.name}

    def on_case(name: str) -> None:
        if progress:
            progress({"event": "case", "case": name, "index": len(seen) + 1, "total": total})
        seen.append(name)

    seen: list[str] = []
    vp = run_pass(net, items(), cfg, temperature=T, cancel=cancel, on_case=on_case)
    acc = vp.accumulator
    rep = acc.aggregate()
    names = acc.class_names

    per_class = {}
    for row in rep.per_class:
        per_class[row["class"]] = {"label": row["index"], "cases_present": row["cases_present"],
                                   **{m: _f(row[f"macro_{m}"]) for m in ("dice", "ace", "ece", "mce")}}
    cases: list[dict] = []
    case_classes: dict[str, dict] = {}
    figures: dict[str, str] = {}
    fig_dir = out / "figures"
    for row in rep.per_case:
        cid = row["case_id"]
        entry = {"case": cid, **{m: _f(row[m]) for m in ("dice", "ace", "ece", "mce")}}
        case_classes[cid] = {n: {"present": v["present"], **{m: _f(v[m]) for m in ("dice", "ace", "ece", "mce")}}
                             for n, v in row["classes"].items()}
        if plots:
            from acecal.plots import plot_reliability_diagram

            mean_p, mean_y, count = acc.case_bins(cid)
            p = plot_reliability_diagram(mean_p, mean_y, count, names, fig_dir / f"reliability_{_safe(cid)}.png",
                                         title=f"{cid} ({cfg.id}{', T=%.3g' % T if T else ''})")
            figures[cid] = str(p.relative_to(out))
        cases.append(entry)
    hist_path = None
    if plots:
        from acecal.plots import plot_dataset_reliability_histogram

        hist_path = plot_dataset_reliability_histogram(rep.histogram, names, out / HISTOGRAM_NAME,
                                                       title=f"{cfg.id}: dataset reliability histogram")
    report = {
        "model": cfg.id,
        "temperature": T,
        "aggregate": {m: _f(rep.macro[m]) for m in ("dice", "ace", "ece", "mce")},
        "aggregate_std": {m: _f(rep.macro[f"{m}_std"]) for m in ("dice", "ace", "ece", "mce")},
        "micro": {m: _f(rep.micro[m]) for m in ("dice", "ace", "ece", "mce")},
        "per_class": per_class,
        "cases": cases,
        "note": MACRO_NOTE,
        "case_classes": case_classes,
        "num_cases": len(cases),
        "num_bins": rep.num_bins,
        "images": str(images),
        "labels": str(labels),
        "figures": {"dataset_histogram": HISTOGRAM_NAME if hist_path else None, "cases": figures},
        "seconds": round(time.time() - t0, 2),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / MARKDOWN_NAME).write_text(report_markdown(report))
    return report


def _n(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def report_markdown(r: dict) -> str:
    a = r["aggregate"]
    lines = [
        f"# Evaluation of `{r['model']}`" + (f" with temperature {r['temperature']:.3g}" if r.get("temperature") else ""),
        "",
        f"{r['num_cases']} cases from `{r['images']}`.",
        "",
        "| | Dice | ACE | ECE | MCE |",
        "|---|---|---|---|---|",
        f"| macro (mean over cases) | {_n(a['dice'])} | {_n(a['ace'])} | {_n(a['ece'])} | {_n(a['mce'])} |",
        f"| micro (pooled voxels) | {_n(r['micro']['dice'])} | {_n(r['micro']['ace'])} | {_n(r['micro']['ece'])} | "
        f"{_n(r['micro']['mce'])} |",
    ]
    for name, v in r["per_class"].items():
        lines.append(f"| {name} ({v['cases_present']} cases) | {_n(v['dice'])} | {_n(v['ace'])} | {_n(v['ece'])} | "
                     f"{_n(v['mce'])} |")
    lines += ["", f"*{r['note']}*", ""]
    if r["figures"].get("dataset_histogram"):
        lines += ["## Dataset reliability histogram", "",
                  "Column m: the distribution over cases of the observed frequency in confidence bin m; mass on the "
                  "diagonal means calibrated, below it over-confident.", "",
                  f"![dataset reliability histogram]({r['figures']['dataset_histogram']})", ""]
    lines += ["## Cases", "", "| case | Dice | ACE | ECE | MCE |", "|---|---|---|---|---|"]
    for c in r["cases"]:
        lines.append(f"| {c['case']} | {_n(c['dice'])} | {_n(c['ace'])} | {_n(c['ece'])} | {_n(c['mce'])} |")
    figs = r["figures"].get("cases") or {}
    if figs:
        lines += ["", "## Reliability diagrams", ""]
        for cid, path in figs.items():
            lines += [f"### {cid}", "", f"![{cid}]({path})", ""]
    return "\n".join(lines) + "\n"
