"""The calibration study: every trained hippocampus model on the same held-out validation split.

Rows: Dice+CE baseline, baseline + temperature scaling, label smoothing, NACL, hL1-ACE, sL1-ACE (same architecture,
seed, split and schedule; see models/train_hippocampus.sh). Per row: macro Dice / ACE / ECE / MCE (mean +- SD over
cases; macro = per case over the foreground classes, then over cases), relative change against the baseline, and
paired per-case tests against the baseline (Wilcoxon signed-rank and paired t-test).

Temperature scaling is *cross-fitted*: the validation cases are split in two halves by a fixed seed, the temperature
fitted on one half (LBFGS on the NLL) is applied to the other and vice versa, so the row is not evaluated on the data
its temperature was fitted on. (The bundle's own stored temperature is fitted on the whole validation split, for use
at inference.)

Every other hL1-/sL1-ACE bundle found in the --models folders that was trained on the same split (the settings
tried: ACE weight, number of soft bins) gets a row in a second table, so what was tried is on the page too.

Writes docs/calibration-study.md, docs/calibration-study.json and dataset reliability histograms per model under
docs/images/study/; with --update-cards it also rewrites the "Against the baseline" section of the shipped cards.

    .venv/bin/python docs/calibration_study.py --models models --models ~/.acecal/study-models --update-cards
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
from acecal.training.card import schedule_extensions

ROWS = [  # (label, bundle id, cross-fitted temperature)
    ("Dice+CE (baseline)", "hippocampus-baseline", False),
    ("Dice+CE + temperature scaling", "hippocampus-baseline", True),
    ("Dice+CE with label smoothing 0.1", "hippocampus-labelsmooth", False),
    ("NACL + Dice", "hippocampus-nacl", False),
    ("hL1-ACE + Dice + CE", "hippocampus-hardace", False),
    ("sL1-ACE + Dice + CE", "hippocampus-softace", False),
]
METRICS = ("dice", "ace", "ece", "mce")
ACE_LOSSES = {"hardl1ace_dice_ce": "hL1-ACE + Dice + CE", "softl1ace_dice_ce": "sL1-ACE + Dice + CE"}
TARGET_BY_LOSS = {"hardl1ace_dice_ce": 20, "softl1ace_dice_ce": 30}  # required macro ACE cut, % (issue 3)
TARGETS = {"hippocampus-hardace": TARGET_BY_LOSS["hardl1ace_dice_ce"],  # the shipped ACE bundles
           "hippocampus-softace": TARGET_BY_LOSS["softl1ace_dice_ce"]}
CARD_SECTION = "## Against the baseline"
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


def ace_settings(config) -> tuple[float, int]:
    """(lambda, M): the ACE weight relative to the Dice weight (the paper's sensitivity parameter; 1 = the paper's
    0.33 / 0.33 / 0.33) and the number of bins of the ACE loss."""
    p = config.loss.params or {}
    lam = float(p.get("ace_weight", 0.33)) / float(p.get("dice_weight", 0.33))
    return round(lam, 3), int((p.get("ace_params") or {}).get("num_bins", 20))


def row_label(label: str, config) -> str:
    if config.loss.name not in ACE_LOSSES:
        return label
    lam, bins = ace_settings(config)
    return f"{ACE_LOSSES[config.loss.name]} (lambda {lam:g}, {bins} bins)"


def meets_target(r: dict, base_dice: float, want: float) -> bool:
    cut = -r["vs_baseline"]["ace"]["relative_percent"]
    return cut >= want and r["macro"]["dice"] >= 0.85 and r["macro"]["dice"] >= base_dice - 0.01


def compare(results: dict, base_key: str = "hippocampus-baseline") -> None:
    """Relative change and paired per-case tests of every entry against the baseline, in place."""
    base_rows, base_macro = results[base_key]["cases"], results[base_key]["macro"]
    for key, r in results.items():
        r["vs_baseline"] = {}
        for m in METRICS:
            rel = (r["macro"][m] - base_macro[m]) / base_macro[m] * 100 if base_macro[m] else float("nan")
            w, t, n = paired_tests(base_rows, r["cases"], m) if key != base_key else (
                float("nan"), float("nan"), len(base_rows))
            r["vs_baseline"][m] = {"relative_percent": rel, "wilcoxon_p": w, "ttest_p": t, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", action="append", default=None, help="folder(s) holding the bundles")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/msd_hippocampus/dataset.json"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite calibration-study.md from calibration-study.json without recomputing")
    ap.add_argument("--update-cards", action="store_true",
                    help="rewrite the 'Against the baseline' section of the shipped hippocampus cards")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reg = ModelRegistry(args.models or [HERE.parent / "models"])
    base = reg.get("hippocampus-baseline")
    if args.markdown_only:
        saved = json.loads((Path(args.out) / "calibration-study.json").read_text())
        write_markdown(Path(args.out) / "calibration-study.md", saved["results"], [tuple(m) for m in saved["missing"]],
                       len(saved["validation_cases"]), base, saved.get("sweep", {}))
        if args.update_cards:
            update_cards(reg, saved["results"])
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

    def evaluate(bundle, label: str, ts: bool, plot: bool) -> dict:
        if bundle.id not in cache:
            cache[bundle.id] = case_logits(bundle, cases)
        items = cache[bundle.id]
        temps, fitted = cross_fitted_temperatures(items) if ts else ({}, [])
        rows, rep = per_case(accumulate(bundle.config, items, temps))
        macro = {m: float(rep.macro[m]) for m in METRICS}
        key = f"{bundle.id}{'+ts' if ts else ''}"
        if plot:
            plot_dataset_reliability_histogram(rep.histogram, bundle.config.class_names[1:] if len(
                bundle.config.class_names) - 1 == rep.histogram.shape[0] else bundle.config.class_names,
                img_dir / f"{key}_histogram.png", title=label)
        print(f"{label:52s} dice {macro['dice']:.4f} ace {macro['ace']:.4f} ece {macro['ece']:.5f} "
              f"mce {macro['mce']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
        lam, bins = ace_settings(bundle.config)
        return {"label": label, "model": bundle.id, "loss": bundle.config.loss.name,
                "loss_params": bundle.config.loss.params or {}, "lambda": lam, "bins": bins,
                "temperature_folds": fitted, "macro": macro,
                "sd": {m: float(rep.macro.get(f"{m}_std", float("nan"))) for m in METRICS},
                "micro": {m: float(rep.micro[m]) for m in ("ace", "ece", "mce") if m in rep.micro},
                "cases": rows, "epochs": bundle.config.training.get("epochs"), "lr": bundle.config.training.get("lr"),
                "best_epoch": bundle.config.training.get("best_epoch")}

    for label, model_id, ts in ROWS:
        try:
            bundle = reg.get(model_id)
        except Exception:
            missing.append((label, model_id))
            continue
        results[f"{model_id}{'+ts' if ts else ''}"] = evaluate(bundle, row_label(label, bundle.config), ts, plot=True)

    # every ACE setting tried on this split, shipped or not, each against the baseline trained for as many epochs
    same_split = [b for b in reg.list() if list(b.config.training.get("split", {}).get("val", [])) == val_names]
    baselines = {b.config.training.get("epochs"): b for b in same_split if b.config.loss.name == "baseline_dice_ce"}
    sweep, refs = {}, {}
    for bundle in sorted((b for b in same_split if b.config.loss.name in ACE_LOSSES),
                         key=lambda b: (bool(b.config.training.get("base")), b.config.training.get("epochs"),
                                        b.config.loss.name, ace_settings(b.config), b.id)):
        base_id = bundle.config.training.get("base")  # fine-tuned: against the model it started from
        ref = (next((b for b in same_split if b.id == base_id), None) if base_id
               else baselines.get(bundle.config.training.get("epochs")))
        if ref is None:
            print(f"{bundle.id}: no reference (same-epochs baseline or base model) on this split, left out")
            continue
        if ref.id not in results and ref.id not in refs:
            refs[ref.id] = evaluate(ref, f"Dice+CE ({ref.id})", False, plot=False)
        group = {ref.id: results.get(ref.id) or refs[ref.id],
                 # a main row (same bundle, same label) is reused, not evaluated again
                 bundle.id: dict(results[bundle.id]) if bundle.id in results
                 else evaluate(bundle, row_label("", bundle.config), False, plot=False)}
        compare(group, base_key=ref.id)
        entry = group[bundle.id]
        entry.update(baseline=ref.id, baseline_macro=group[ref.id]["macro"], base=base_id,
                     base_epochs=ref.config.training.get("epochs") if base_id else None)
        del entry["cases"]  # per-case numbers are kept for the main rows only
        sweep[bundle.id] = entry
    compare(results)

    (out / "calibration-study.json").write_text(json.dumps({"validation_cases": val_names, "results": results,
                                                             "sweep": sweep, "missing": missing},
                                                            indent=1, default=float))
    write_markdown(out / "calibration-study.md", results, missing, len(val_names), base, sweep)
    print(f"wrote {out / 'calibration-study.md'}")
    if args.update_cards:
        update_cards(reg, results)


def card_section(key: str, results: dict) -> str:
    """The "Against the baseline" section of a shipped card, from the study's numbers."""
    b = results["hippocampus-baseline"]
    if key == "hippocampus-baseline":
        ts = results.get("hippocampus-baseline+ts")
        if not ts:
            return ""
        folds = ", ".join(f"{t:.3f}" for t in ts["temperature_folds"])
        verdict = "raises" if ts["macro"]["ace"] > b["macro"]["ace"] else "lowers"
        return (f"The reference model of the study. Post-hoc temperature scaling (cross-fitted on the validation "
                f"split, T = {folds}) {verdict} macro ACE from {b['macro']['ace']:.4f} to {ts['macro']['ace']:.4f}.")
    r, want = results[key], TARGETS[key]
    v = r["vs_baseline"]
    cut = -v["ace"]["relative_percent"]
    ok = meets_target(r, b["macro"]["dice"], want)
    why = []
    if cut < want:
        why.append(f"ACE cut {cut:.1f} % < {want} %")
    if r["macro"]["dice"] < b["macro"]["dice"] - 0.01:
        why.append(f"Dice {b['macro']['dice'] - r['macro']['dice']:.4f} below the baseline")
    if r["macro"]["dice"] < 0.85:
        why.append("Dice below 0.85")
    return (f"Macro ACE {r['macro']['ace']:.4f} vs {b['macro']['ace']:.4f} for the Dice+CE baseline: "
            f"**{cut:.1f} % lower** (paired Wilcoxon p = {fmt_p(v['ace']['wilcoxon_p'])}); MCE "
            f"{-v['mce']['relative_percent']:.1f} % lower; Dice {r['macro']['dice']:.4f} vs {b['macro']['dice']:.4f} "
            f"(p = {fmt_p(v['dice']['wilcoxon_p'])}).\n\n"
            f"Project target: ACE at least {want} % lower with Dice >= 0.85 and no more than 0.01 below the baseline: "
            + ("**met**." if ok else f"**missed** ({'; '.join(why)}).")
            + " The loss settings tried on this split and how they fared are in the study's second table.")


def update_cards(reg, results: dict) -> None:
    for key in ("hippocampus-baseline", *TARGETS):
        if key not in results:
            continue
        text = card_section(key, results)
        card = reg.get(key).card_path
        body = card.read_text().split(f"\n{CARD_SECTION}", 1)[0].rstrip("\n")
        card.write_text(f"{body}\n\n{CARD_SECTION} (docs/calibration-study.md)\n\n{text}\n")
        print(f"updated {card}")


def write_markdown(path: Path, results: dict, missing: list, n_val: int, base, sweep: dict) -> None:
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
        "--models models --models ~/.acecal/study-models --update-cards` (label smoothing, NACL and the other settings "
        "tried are trained with `OUT=~/.acecal/study-models`; only the three named bundles ship). Figures: dataset "
        "reliability histograms at the end.",
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
        ok = meets_target(r, b["dice"], want)
        lines.append(f"- `{key}`: macro ACE cut {cut:.1f} % (target >= {want} %), Dice {r['macro']['dice']:.4f} "
                     f"(target >= 0.85 and >= baseline - 0.01 = {b['dice'] - 0.01:.4f}): **{'met' if ok else 'MISSED'}**.")
    base_t = results.get("hippocampus-baseline+ts", {}).get("temperature_folds") or []
    ext = schedule_extensions(tr.get("history") or [])
    schedule = (f"{tr.get('epochs')} epochs: " + ", then ".join(
        [f"{ext[0][1]} epochs of warm-up cosine"] + [f"extended to {n} after epoch {e} (a second cosine cycle "
                                                      "from the first one's last checkpoint, a warm restart)"
                                                      for e, _, n in ext])
                if ext else f"{tr.get('epochs')} epochs of warm-up cosine")
    lr0 = [h["epoch"] for h in tr.get("history") or [] if h.get("lr") == 0.0]
    hard, soft = results.get("hippocampus-hardace"), results.get("hippocampus-softace")
    lines += ["", "## Reading the results", "",
              f"- Every model was trained for {schedule} on 2 CPU cores (bfloat16 autocast), against the paper's 600 "
              "epochs: the same schedule for every loss, so the comparison is fair, but the absolute numbers are not "
              "the paper's." + (f" (Epoch {', '.join(map(str, lr0))} ran at learning rate 0: the engine of the time "
                                "kept the old schedule's final rate for the first extended epoch; since fixed, so "
                                "rerunning the recipe gives slightly different weights.)" if lr0 else ""),
              ]
    if base_t:
        ts = results["hippocampus-baseline+ts"]
        under = all(t < 1 for t in base_t)
        lines.append(
            f"- The NLL-optimal temperature of the baseline is {'below' if under else 'above'} 1 (cross-fitted folds: "
            + ", ".join(f"{t:.3f}" for t in base_t) + "): the Dice+CE network is, in likelihood terms, "
            + ("*under*-confident, unlike the over-confident long-trained networks of the paper. " if under else
               "over-confident, as in the paper. ")
            + f"Temperature scaling moves macro ACE {ts['vs_baseline']['ace']['relative_percent']:+.1f} % and ECE "
            f"{ts['vs_baseline']['ece']['relative_percent']:+.1f} %: ACE and MCE weight every confidence bin equally, "
            "ECE counts voxels. The engine stores a fitted temperature in a bundle only when it lowers validation "
            "ACE.")
    if hard and soft:
        hc, sc = (-r["vs_baseline"]["ace"]["relative_percent"] for r in (hard, soft))
        lines.append(
            f"- The ACE losses lower ACE (hard {hc:.1f} %, soft {sc:.1f} %) and MCE, at a Dice cost "
            f"({hard['macro']['dice'] - b['dice']:+.4f} and {soft['macro']['dice'] - b['dice']:+.4f}) that grows with "
            "the calibration gain, as in the paper (there: hard -13.9 % ACE on average over four data sets, range "
            "-3 % to -22 %; soft -30.7 %, range -18 % to -41 %, Dice -0.9 %).")
    if "hippocampus-labelsmooth" in results and "hippocampus-nacl" in results:
        ls, nacl = results["hippocampus-labelsmooth"], results["hippocampus-nacl"]
        lines.append(
            f"- The train-time alternatives keep Dice and move ACE less (label smoothing "
            f"{ls['vs_baseline']['ace']['relative_percent']:+.1f} %, NACL "
            f"{nacl['vs_baseline']['ace']['relative_percent']:+.1f} %) while their ECE grows "
            f"{ls['macro']['ece'] / b['ece']:.1f}x and {nacl['macro']['ece'] / b['ece']:.1f}x: softened targets move "
            "the huge, confident background bins away from 1, which the count-weighted ECE punishes and ACE hardly "
            "sees.")
    if sweep:
        met = [k for k, r in sweep.items() if meets_target(r, r["baseline_macro"]["dice"], TARGET_BY_LOSS[r["loss"]])]
        lines.append(
            f"- What was tried (next section): {len(sweep)} ACE settings. A larger ACE weight or a different number "
            "of soft bins moves a model along one Dice-for-ACE curve rather than off it; "
            + (f"these met their bar: {', '.join(f'`{k}`' for k in met)}." if met else
               "none met both bars, so the cards say the targets are missed.")
            + "".join(
                f" Training the paper-default {ACE_LOSSES[r['loss']].split(' ')[0]} model {r['epochs']} instead of "
                f"{o['epochs']} epochs moved its ACE cut from {-o['vs_baseline']['ace']['relative_percent']:.1f} % to "
                f"{-r['vs_baseline']['ace']['relative_percent']:.1f} % and its Dice gap from "
                f"{o['macro']['dice'] - o['baseline_macro']['dice']:+.4f} to "
                f"{r['macro']['dice'] - r['baseline_macro']['dice']:+.4f}."
                for r in sweep.values() for o in sweep.values()
                if r["loss"] == o["loss"] and (r["lambda"], r["bins"]) == (o["lambda"], o["bins"]) == (1, 20)
                and not r.get("base") and not o.get("base")
                and r["epochs"] > o["epochs"])
            + ("".join(
                [" Fine-tuning the trained baseline with an ACE loss instead (what the server's fine-tuning jobs do) "
                 "keeps Dice closer but cuts ACE less: "]
                + ["; ".join(f"`{k}` {r['vs_baseline']['ace']['relative_percent']:+.1f} % ACE, Dice "
                             f"{r['macro']['dice'] - r['baseline_macro']['dice']:+.4f}"
                             for k, r in sweep.items() if r.get("base"))] + ["."])
               if any(r.get("base") for r in sweep.values()) else "")
            + " The paper's own numbers come from 600-1250 epochs on a GPU with a 4x wider network; the next "
            "experiment is longer training on a lent GPU (`models/train_hippocampus.sh` resumes and extends runs).")
    if sweep:
        lines += ["", "## Loss settings tried", "",
                  "Every hL1-/sL1-ACE model trained on this split with the same network, seed and schedule, each against "
                  "the Dice+CE baseline trained for the same number of epochs (a fine-tuned row: against the model it "
                  "was fine-tuned from). lambda = ACE weight / Dice weight (the "
                  "paper's sensitivity parameter: 1 is its 0.33 / 0.33 / 0.33); bins = bins of the ACE *loss* (the "
                  "metrics always use 20 hard bins). Target = the issue's bar for that loss (hard: ACE -20 %, soft: "
                  "ACE -30 %; both: Dice >= 0.85 and within 0.01 of the baseline).", "",
                  "| model | epochs | loss | lambda | bins | Dice | ACE | MCE | baseline Dice / ACE | ACE vs baseline | "
                  "Dice vs baseline | p ACE (W) | p Dice (W) | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in sweep.items():
            v, bm = r["vs_baseline"], r["baseline_macro"]
            ok = meets_target(r, bm["dice"], TARGET_BY_LOSS[r["loss"]])
            shipped = " (shipped)" if key in TARGETS else ""
            lines.append(
                f"| `{key}`{shipped} | "
                + (f"{r['base_epochs']} + {r['epochs']} fine-tune at lr {r.get('lr'):g}" if r.get("base") else f"{r['epochs']}")
                + f" | {ACE_LOSSES[r['loss']].split(' ')[0]} | {r['lambda']:g} | "
                f"{r['bins']} | {fmt(r['macro']['dice'])} | {fmt(r['macro']['ace'])} | {fmt(r['macro']['mce'])} | "
                f"{fmt(bm['dice'])} / {fmt(bm['ace'])} | {v['ace']['relative_percent']:+.1f} % | "
                f"{r['macro']['dice'] - bm['dice']:+.4f} | {fmt_p(v['ace']['wilcoxon_p'])} | "
                f"{fmt_p(v['dice']['wilcoxon_p'])} | {'met' if ok else 'missed'} |")
        lines += ["", "The shipped bundles keep the paper's default setting (lambda 1, 20 bins) at the longest schedule "
                  "trained, a choice fixed before these rows were known. Every row was evaluated on this validation "
                  "split, the only held-out data (all 208 labelled cases are in the training or validation split), so "
                  "a setting picked from this table would carry an optimistic bias; the p-values are per row, not "
                  "corrected for multiple comparisons."]
    lines += ["", "## Dataset reliability histograms", "",
              "Per class and confidence bin (x), the distribution over validation cases of that bin's observed "
              "frequency (y); a calibrated model concentrates on the diagonal.", ""]
    for key, r in results.items():
        lines.append(f"![{r['label']}](images/study/{key}_histogram.png)")
    lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
