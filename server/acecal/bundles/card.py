"""The model card (``README.md`` of a bundle): what the model is, what it was trained on, how, and how well it is
calibrated on held-out data (measured, not claimed)."""

from __future__ import annotations

import html
import json
import re
from typing import Any, Optional

from acecal.bundles.bundle import BundleConfig
from acecal.formatting import duration, number, signed_percent

_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|])")


def markdown_text(v: Any) -> str:
    """Text from users (descriptions, dataset names) as inert Markdown: one printable line, HTML and the characters
    that make links, code or tables escaped, so ``<script>`` or ``[x](javascript:...)`` stay text in a card."""
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in str(v)).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(line, quote=False))


def _temperature_note(bc: BundleConfig) -> str:
    if bc.calibrator is not None:
        return "see the calibrator below"
    if bc.temperature:
        return f"{number(bc.temperature, 3)} (applied at inference)"
    wt = (bc.metrics or {}).get("with_temperature")
    if wt:
        return (
            f"fitted {number(wt.get('temperature'), 3)} on the validation split but not applied: it raised the "
            f"validation ACE from {number((bc.metrics or {}).get('ace'))} to {number(wt.get('ace'))}"
        )
    return "not fitted"


def calibrator_section(bc: BundleConfig) -> list[str]:
    """The card's "Calibrator" section: what rescales the served confidence, what it was fitted on, and its raw,
    cross-fitted and in-sample figures."""
    c = bc.calibrator
    if c is None:
        return []
    f, m = c.fitted_on or {}, c.metrics or {}
    if c.kind == "temperature":
        what = f"one global temperature T = {number(c.params.get('temperature'), 3)}, fitted to minimise the macro ACE"
    else:
        p = c.params
        what = (
            f"local temperature scaling (Ding et al., ICCV 2021): a {p.get('layers')}-layer 3-D CNN "
            f"({p.get('hidden')} channels, dilation {p.get('dilation')}"
            f"{', logits and image' if p.get('use_image') else ', logits only'}) predicting a temperature per "
            f"voxel, initialised at T = {number(p.get('init_temperature'), 3)}, trained with the soft-binned L1-ACE "
            "loss"
            + (
                f" + {(f.get('settings') or {}).get('nll_weight')} x NLL"
                if (f.get("settings") or {}).get("nll_weight")
                else ""
            )
        )
    lines = [
        "",
        "## Calibrator",
        "",
        f"The served confidence is the network's softmax after a post-hoc calibrator: {what}. It divides the "
        "logits by a positive temperature per voxel, so the label map (and Dice) is the network's own. It is "
        "applied by default; `use_calibrator=false` (or the older `use_temperature=false`) serves the raw "
        "softmax.",
        "",
    ]
    if f:
        lines.append(
            f"- Fitted on: {f.get('num_cases')} cases, {f.get('source')} ({f.get('method')}); the case "
            "names are in `bundle.json` (`calibrator.fitted_on.cases`)."
        )
    cf, ins, raw = m.get("cross_fitted") or {}, m.get("in_sample") or {}, m.get("raw") or {}
    if raw:
        lines += [
            "",
            "| | Dice | macro ACE | change |",
            "|---|---|---|---|",
            f"| raw network | {number(raw.get('dice'))} | {number(raw.get('ace'))} | |",
        ]
        if cf:
            lines.append(
                f"| calibrated, cross-fitted (fit on one half, measured on the other; seed {cf.get('seed')}) "
                f"| {number(cf.get('dice'))} | {number(cf.get('ace'))} | "
                f"{signed_percent(cf.get('change_pct'))} |"
            )
        if ins:
            lines.append(
                f"| calibrated, in-sample (the shipped calibrator on the cases it was fitted on) | "
                f"{number(ins.get('dice'))} | {number(ins.get('ace'))} | "
                f"{signed_percent(ins.get('change_pct'))} |"
            )
        lines += ["", "The cross-fitted row is the estimate for unseen cases; the in-sample row is optimistic."]
    return lines


def schedule_extensions(history: list[dict]) -> list[tuple[int, int, int]]:
    """``(after_epoch, old_total, new_total)`` wherever the run was resumed with more ``--epochs``, read from the
    per-epoch history (each record carries the total it was trained under)."""
    out = []
    for prev, cur in zip(history, history[1:], strict=False):
        if prev.get("epochs") and cur.get("epochs") and cur["epochs"] != prev["epochs"]:
            out.append((prev["epoch"], prev["epochs"], cur["epochs"]))
    return out


_TTA_NOTE = {
    "none": "none (one pass)",
    "axis_flips": "softmax averaged over the identity and the 3 single-axis flips (served and measured so)",
    "all_flips": "softmax averaged over all 8 flip combinations (served and measured so)",
}


def model_card(bc: BundleConfig, *, base_id: Optional[str] = None) -> str:
    t, m = bc.training or {}, bc.metrics or {}
    data = t.get("data", {})
    split = t.get("split", {})
    lines = [f"# {bc.id}", ""]
    if bc.description:
        lines += [markdown_text(bc.description), ""]
    lines += [
        f"3-D segmentation of **{', '.join(n for k, n in bc.labels.items() if k != '0')}** in {bc.modality}, "
        f"MONAI {bc.network.name} trained with the `{bc.loss.name}` loss"
        + (f", fine-tuned from `{base_id}`" if base_id else "")
        + ".",
        "",
        "## Model",
        "",
        f"- Network: `{bc.network.name}` {bc.network.args}; {bc.in_channels} input channel(s), "
        f"{bc.num_classes} classes."
        + (
            " Two heads on one decoder: the label map is the segmentation head's argmax; the probabilities, confidence "
            "(the calibration head's probability of the served label), uncertainty and flags are the calibration "
            "head's (`acecal.networks.SegResNetTwoHead`)."
            if bc.network.name == "SegResNetTwoHead"
            else ""
        ),
        f"- Test-time augmentation: {_TTA_NOTE.get(bc.tta, bc.tta)}.",
        "- Labels: " + ", ".join(f"{k} = {v}" for k, v in bc.labels.items()),
        f"- Model space: orientation {bc.orientation}, spacing {tuple(bc.spacing)} mm, "
        f"intensity `{bc.intensity.mode}`.",
        f"- Sliding window: ROI {tuple(bc.roi_size)}, overlap {bc.sw_overlap}, {bc.sw_mode} blending.",
        f"- Temperature: {_temperature_note(bc)}; default uncertainty threshold "
        f"{number(bc.uncertainty_threshold, 2)} ({t.get('uncertainty_threshold_rule', '')}).",
        "",
        "## Data",
        "",
        f"- Source: {markdown_text(data.get('source_note') or data.get('source', 'n/a'))} "
        f"({data.get('num_cases', '?')} cases).",
        f"- Licence: {data.get('licence') or 'not stated'}.",
        f"- Split: {len(split.get('train', []))} training / {len(split.get('val', []))} validation cases, "
        + (
            f"drawn with seed {split.get('seed')} (fraction {split.get('val_fraction')})"
            if split.get("val_fraction") is not None
            else "explicit validation list"
        )
        + "; the validation case names are in `bundle.json` "
        "(`training.split.val`).",
        "",
        "## Training",
        "",
        f"- Loss: `{bc.loss.name}`"
        + (
            " with " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in bc.loss.params.items())
            if bc.loss.params
            else " (default weights)"
        )
        + (
            f", switched on after {(t.get('loss') or {}).get('warmup_epochs')} epochs of `baseline_dice_ce` (warm-up)"
            if (t.get("loss") or {}).get("warmup_epochs")
            else ""
        ),
        f"- Epochs: {t.get('epochs')} (batch {t.get('batch_size')} volumes x {t.get('num_samples')} patches, AdamW lr "
        f"{t.get('lr')}, weight decay {t.get('weight_decay')}, warm-up cosine, seed {t.get('seed')}); weights: "
        f"{t.get('weights')}.",
    ]
    for after, old_total, new_total in schedule_extensions(t.get("history") or []):
        lines.append(
            f"- Schedule: extended from {old_total} to {new_total} epochs after epoch {after} (resumed with "
            "more `--epochs`): the cosine restarts there and spans the new total, a warm restart."
        )
    lines += [
        f"- Wall time: {duration(t.get('wall_time_seconds'))} on {t.get('device')} x {t.get('world_size', 1)} "
        f"(torch {t.get('torch')}).",
    ]
    if t.get("base"):
        lines.append(
            f"- Fine-tuned from `{t['base']}`" + (" with the encoder frozen." if t.get("freeze_encoder") else ".")
        )
    if t.get("command"):
        lines += ["- Command:", "", "```", t["command"], "```"]
    lines += ["", "## Validation metrics", ""]
    if m:
        lines += [
            f"Measured on the {m.get('num_cases')} held-out validation cases in model space, hard binning with 20 "
            "bins; macro = per case over the foreground classes (background excluded), then mean over cases.",
            "",
            "| | Dice | ACE | ECE | MCE |",
            "|---|---|---|---|---|",
            f"| {bc.id}{' (raw network, no calibrator)' if bc.calibrator else ''} | {number(m.get('dice'))} | "
            f"{number(m.get('ace'))} | {number(m.get('ece'))} | {number(m.get('mce'))} |",
        ]
        wt = m.get("with_temperature")
        if wt:
            lines.append(
                f"| + temperature {number(wt.get('temperature'), 3)}{'' if bc.temperature else ' (not applied)'} | "
                f"{number(wt.get('dice'))} | "
                f"{number(wt.get('ace'))} | {number(wt.get('ece'))} | {number(wt.get('mce'))} |"
            )
    else:
        lines.append("No validation data was held out; the model's calibration has not been measured.")
    lines += calibrator_section(bc)
    lines += [
        "",
        "## Limitations",
        "",
        "- Validated only on the data above; performance and calibration on other scanners, protocols or populations "
        "are unknown. Not a medical device; for research use.",
        "",
    ]
    return "\n".join(lines)
