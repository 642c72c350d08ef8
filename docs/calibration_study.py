"""The calibration study: every trained hippocampus model on the same held-out validation split.

Rows: Dice+CE baseline, baseline + temperature scaling, label smoothing, NACL, hL1-ACE, sL1-ACE (same architecture,
seed, split and schedule; see models/train_hippocampus.sh). Per row: macro Dice / ACE / ECE / MCE (mean +- SD over
cases; macro = per case over the foreground classes, then over cases), relative change against the baseline, and
paired per-case tests against the baseline (Wilcoxon signed-rank and paired t-test).

Temperature scaling is *cross-fitted*: the validation cases are split in two halves by a fixed seed, the temperature
fitted on one half (LBFGS on the NLL) is applied to the other and vice versa, so the row is not evaluated on the data
its temperature was fitted on. (The bundle's own stored temperature is fitted on the whole validation split, for use
at inference.)

Writes docs/calibration-study.md, docs/calibration-study.json and dataset reliability histograms per model under
docs/images/study/.

    .venv/bin/python docs/calibration_study.py --models models --models ~/.acecal/study-models
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from acecal.bundles import ModelRegistry
from acecal.calibration import fit_temperature
from acecal.data.datasets import discover_dataset
from acecal.data.transforms import model_space_transforms
from acecal.inference.window import sliding_window_logits
from acecal.metrics import CalibrationAccumulator
from acecal.plots import plot_dataset_reliability_histogram

ROWS = [  # (label, bundle id, cross-fitted temperature)
    ("Dice+CE (baseline)", "hippocampus-baseline", False),
    ("Dice+CE + temperature scaling", "hippocampus-baseline", True),
    ("Dice+CE with label smoothing 0.1", "hippocampus-labelsmooth", False),
    ("NACL + Dice", "hippocampus-nacl", False),
    ("hL1-ACE + Dice + CE", "hippocampus-hardace", False),
    ("sL1-ACE + Dice + CE", "hippocampus-softace", False),
]
METRICS = ("dice", "ace", "ece", "mce")
HERE = Path(__file__).resolve().parent


def case_logits(bundle, cases) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(case, logits (1, C, x, y, z), label (1, 1, x, y, z)) in model space, through the serving sliding window."""
    net = bundle.load_network("cpu")
    chain = model_space_transforms(bundle.config)
    out = []
    for c in cases:
        d = chain(c.as_dict())
        image = d["image"].as_tensor()[None] if hasattr(d["image"], "as_tensor") else d["image"][None]
        label = d["label"].as_tensor()[None] if hasattr(d["label"], "as_tensor") else d["label"][None]
        out.append((c.name, sliding_window_logits(net, image, bundle.config), label.long()))
    return out


def accumulate(config, items, temperatures: dict[str, float] | None = None) -> CalibrationAccumulator:
    acc = CalibrationAccumulator(config.num_classes, include_background=False, class_names=config.class_names)
    for name, logits, label in items:
        t = (temperatures or {}).get(name, 1.0)
        acc.update(torch.softmax(logits / t, dim=1), label, case_id=name)
    return acc


def cross_fitted_temperatures(items, seed: int = 0) -> tuple[dict[str, float], list[float]]:
    names = [n for n, _, _ in items]
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    halves = [set(order[: len(order) // 2]), set(order[len(order) // 2:])]
    temps, fitted = {}, []
    for k in (0, 1):
        fit_on = [(lg[0], lb[0]) for n, lg, lb in items if n in halves[1 - k]]
        t = float(fit_temperature(fit_on))
        fitted.append(t)
        for n in halves[k]:
            temps[n] = t
    return temps, fitted


def per_case(acc) -> dict[str, dict[str, float]]:
    rep = acc.aggregate()
    rows = {}
    for row in rep.per_case:
        rows[row["case_id"]] = {m: row.get(m) for m in METRICS}
    return rows, rep


def paired_tests(base: dict, other: dict, metric: str) -> tuple[float, float, int]:
    from scipy import stats

    common = [c for c in base if c in other and base[c][metric] is not None and other[c][metric] is not None
              and math.isfinite(base[c][metric]) and math.isfinite(other[c][metric])]
    a = np.array([base[c][metric] for c in common])
    b = np.array([other[c][metric] for c in common])
    if len(common) < 3 or np.allclose(a, b):
        return float("nan"), float("nan"), len(common)
    return float(stats.wilcoxon(b, a).pvalue), float(stats.ttest_rel(b, a).pvalue), len(common)


def fmt(v, digits=4):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def fmt_p(p):
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", action="append", default=None, help="folder(s) holding the bundles")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/msd_hippocampus/dataset.json"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite calibration-study.md from calibration-study.json without recomputing")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reg = ModelRegistry(args.models or [HERE.parent / "models"])
    base = reg.get("hippocampus-baseline")
    if args.markdown_only:
        saved = json.loads((Path(args.out) / "calibration-study.json").read_text())
        write_markdown(Path(args.out) / "calibration-study.md", saved["results"], [tuple(m) for m in saved["missing"]],
                       len(saved["validation_cases"]), base)
        return
    val_names = list(base.config.training["split"]["val"])
    info = discover_dataset(args.data)
    by_name = {c.name: c for c in info.cases}
    cases = [by_name[n] for n in val_names]
    out = Path(args.out)
    img_dir = out / "images" / "study"
    img_dir.mkdir(parents=True, exist_ok=True)

    results, cache, missing = {}, {}, []
    t0 = time.time()
    for label, model_id, ts in ROWS:
        try:
            bundle = reg.get(model_id)
        except Exception:
            missing.append((label, model_id))
            continue
        if model_id not in cache:
            cache[model_id] = case_logits(bundle, cases)
        items = cache[model_id]
        temps, fitted = cross_fitted_temperatures(items) if ts else ({}, [])
        acc = accumulate(bundle.config, items, temps)
        rows, rep = per_case(acc)
        macro = {m: float(rep.macro[m]) for m in METRICS}
        sds = {m: float(rep.macro.get(f"{m}_std", float("nan"))) for m in METRICS}
        key = f"{model_id}{'+ts' if ts else ''}"
        results[key] = {"label": label, "model": model_id, "temperature_folds": fitted, "macro": macro, "sd": sds,
                        "micro": {m: float(rep.micro[m]) for m in ("ace", "ece", "mce") if m in rep.micro},
                        "cases": rows, "epochs": bundle.config.training.get("epochs"),
                        "best_epoch": bundle.config.training.get("best_epoch")}
        plot_dataset_reliability_histogram(rep.histogram, bundle.config.class_names[1:] if len(
            bundle.config.class_names) - 1 == rep.histogram.shape[0] else bundle.config.class_names,
            img_dir / f"{key}_histogram.png", title=label)
        print(f"{label:34s} dice {macro['dice']:.4f} ace {macro['ace']:.4f} ece {macro['ece']:.5f} "
              f"mce {macro['mce']:.4f}  ({time.time() - t0:.0f} s)", flush=True)

    base_rows = results["hippocampus-baseline"]["cases"]
    base_macro = results["hippocampus-baseline"]["macro"]
    for key, r in results.items():
        r["vs_baseline"] = {}
        for m in METRICS:
            rel = (r["macro"][m] - base_macro[m]) / base_macro[m] * 100 if base_macro[m] else float("nan")
            w, t, n = paired_tests(base_rows, r["cases"], m) if key != "hippocampus-baseline" else (
                float("nan"), float("nan"), len(base_rows))
            r["vs_baseline"][m] = {"relative_percent": rel, "wilcoxon_p": w, "ttest_p": t, "n": n}

    (out / "calibration-study.json").write_text(json.dumps({"validation_cases": val_names, "results": results,
                                                             "missing": missing}, indent=1, default=float))
    write_markdown(out / "calibration-study.md", results, missing, len(val_names), base)
    print(f"wrote {out / 'calibration-study.md'}")


def write_markdown(path: Path, results: dict, missing: list, n_val: int, base) -> None:
    tr = base.config.training
    lines = [
        "# Calibration study: mL1-ACE on real hippocampus MRI",
        "",
        "The seed paper's comparison (Barfoot et al., MICCAI 2024 / IEEE TMI) redone on data anyone can check:",
        "MSD Task04 Hippocampus (208 labelled MRI crops, CC BY-SA 4.0; Simpson et al. 2019, Antonelli et al. 2022).",
        f"Every model: MONAI SegResNet (init_filters 8, blocks_down 1-2-2-4), patch = sliding-window ROI 32x48x32, "
        f"batch 4, AdamW lr {tr.get('lr')}, warmup-cosine, seed {tr.get('seed')}, the same fixed split "
        f"({len(tr['split']['train'])} training / {n_val} validation cases, seed {tr['split']['seed']}); only the loss "
        "differs. Recipe: `models/train_hippocampus.sh LOSS ID`; this page: `.venv/bin/python docs/calibration_study.py "
        "--models models --models ~/.acecal/study-models` (label smoothing and NACL are trained with `OUT=~/.acecal/study-models`; only the three named bundles ship).",
        "",
        "Metrics on the held-out validation split, in model space, 20 hard bins, background excluded. **Macro**: per "
        "case, the mean over the foreground classes (anterior, posterior), then mean +- SD over cases. Dice of the "
        "argmax segmentation. p-values: paired per-case tests against the baseline (Wilcoxon signed-rank / paired t).",
        "Temperature scaling is cross-fitted (fitted on one half of the validation cases, applied to the other).",
        "",
        "| model | Dice | ACE | ECE | MCE | ACE vs baseline | MCE vs baseline | Dice vs baseline | p ACE (W / t) | p Dice (W / t) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        m, s, v = r["macro"], r["sd"], r["vs_baseline"]
        is_base = key == "hippocampus-baseline"
        rel = (lambda k: "-" if is_base else f"{v[k]['relative_percent']:+.1f} %")
        dd = "-" if is_base else f"{m['dice'] - results['hippocampus-baseline']['macro']['dice']:+.4f}"
        lines.append(
            f"| {r['label']} | {fmt(m['dice'])} +- {fmt(s['dice'], 3)} | {fmt(m['ace'])} +- {fmt(s['ace'], 3)} | "
            f"{fmt(m['ece'], 5)} | {fmt(m['mce'])} | {rel('ace')} | {rel('mce')} | {dd} | "
            f"{'-' if is_base else fmt_p(v['ace']['wilcoxon_p']) + ' / ' + fmt_p(v['ace']['ttest_p'])} | "
            f"{'-' if is_base else fmt_p(v['dice']['wilcoxon_p']) + ' / ' + fmt_p(v['dice']['ttest_p'])} |")
    for label, model_id in missing:
        lines.append(f"| {label} | not trained yet (`{model_id}`) | | | | | | | | |")
    lines += ["", "## Targets", ""]
    b = results.get("hippocampus-baseline", {}).get("macro", {})
    for key, want in (("hippocampus-hardace", 20), ("hippocampus-softace", 30)):
        if key not in results:
            lines.append(f"- `{key}`: not trained yet.")
            continue
        r = results[key]
        cut = -r["vs_baseline"]["ace"]["relative_percent"]
        dice_ok = r["macro"]["dice"] >= 0.85 and r["macro"]["dice"] >= b["dice"] - 0.01
        ok = cut >= want and dice_ok
        lines.append(f"- `{key}`: macro ACE cut {cut:.1f} % (target >= {want} %), Dice {r['macro']['dice']:.4f} "
                     f"(target >= 0.85 and >= baseline - 0.01 = {b['dice'] - 0.01:.4f}): **{'met' if ok else 'MISSED'}**.")
    base_t = results.get("hippocampus-baseline+ts", {}).get("temperature_folds") or []
    lines += ["", "## Reading the results", "",
              f"- All models were trained for {tr.get('epochs')} epochs on 2 CPU cores (bfloat16 autocast), a tenth of "
              "the paper's 600: short runs of the same schedule for every loss, so the comparison is fair but the "
              "absolute numbers are not the paper's.",
              "- The NLL-optimal temperature of the baseline is below 1 (cross-fitted folds: "
              + ", ".join(f"{t:.3f}" for t in base_t) + "): after this short training the Dice+CE network is, in "
              "likelihood terms, *under*-confident, unlike the over-confident long-trained networks of the paper. "
              "Sharpening it lowers the NLL and the ECE but raises ACE and MCE, which weight every confidence bin "
              "equally: temperature scaling is no substitute for the ACE losses here. The engine therefore stores a fitted "
              "temperature in a bundle only when it lowers validation ACE; the shipped bundles carry none.",
              "- The ACE losses lower ACE and MCE significantly (paired tests above), soft more than hard, at a Dice "
              "cost that grows with the calibration gain, as in the paper (there: hard -13.9 % ACE on average over "
              "four data sets, range -3 % to -22 %; soft -30.7 %, range -18 % to -41 %, Dice -0.9 %).",
              ] + ([
              f"- The train-time alternatives keep Dice and lower ACE less (label smoothing "
              f"{results['hippocampus-labelsmooth']['vs_baseline']['ace']['relative_percent']:+.1f} %, NACL "
              f"{results['hippocampus-nacl']['vs_baseline']['ace']['relative_percent']:+.1f} %) while their ECE grows "
              f"{results['hippocampus-labelsmooth']['macro']['ece'] / b['ece']:.1f}x and "
              f"{results['hippocampus-nacl']['macro']['ece'] / b['ece']:.1f}x: softened targets move the huge, "
              "confident background bins away from 1, which the count-weighted ECE punishes and ACE hardly sees."
              ] if "hippocampus-labelsmooth" in results and "hippocampus-nacl" in results else []) + [
              "- When a target is missed the cards say so. What would most likely close the gap: train to convergence "
              "(the engine resumes and extends runs: rerun `models/train_hippocampus.sh` with `--epochs 300`), and the "
              "ACE weight, which the paper's sensitivity analysis shows trades Dice for calibration monotonically.",
              ]
    lines += ["", "## Dataset reliability histograms", "",
              "Per class and confidence bin (x), the distribution over validation cases of that bin's observed "
              "frequency (y); a calibrated model concentrates on the diagonal.", ""]
    for key, r in results.items():
        lines.append(f"![{r['label']}](images/study/{key}_histogram.png)")
    lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
