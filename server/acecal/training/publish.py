"""Turn a finished run into a bundle: final validation pass with the chosen weights, optional temperature fit, the
uncertainty threshold, the model card, and an atomic :func:`acecal.bundles.write_bundle`."""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from acecal.bundles import Bundle, BundleConfig, write_bundle
from acecal.bundles.card import model_card
from acecal.calibration import CalibrationCase, fit_temperature
from acecal.calibration.threshold import uncertainty_threshold
from acecal.data.datasets import Case, DatasetInfo
from acecal.networks import is_two_head, split_heads
from acecal.training.calibrate import refit_ace_temperature
from acecal.training.checkpoints import BEST, load_checkpoint
from acecal.training.config import TrainConfig
from acecal.training.progress import CancelToken
from acecal.training.validation import run_pass, summarise


def _calibration_logits(logits: torch.Tensor, bc: BundleConfig) -> torch.Tensor:
    """The logits a calibrator acts on: a two-head network's calibration head, else all of them (B, C, ...)."""
    return split_heads(logits, bc.num_classes)[1] if is_two_head(bc) else logits


def _served_labels(logits: torch.Tensor, bc: BundleConfig) -> Optional[torch.Tensor]:
    """A two-head network's served label map (segmentation head's argmax, (x, y, z)); None for one head."""
    return split_heads(logits, bc.num_classes)[0].argmax(1)[0] if is_two_head(bc) else None


def publish(
    cfg: TrainConfig,
    bc: BundleConfig,
    network: torch.nn.Module,
    *,
    work_dir: Path,
    out_dir: Path,
    info: DatasetInfo,
    train_cases: list[Case],
    val_cases: list[Case],
    val_items: Optional[Callable[[], Iterable[dict]]],
    history: list[dict],
    best: dict,
    base: Optional[Bundle] = None,
    cancel: CancelToken = None,
    world_size: int = 1,
) -> Bundle:
    """Publish the run's chosen weights (``best.pt`` when a validated epoch was best, else the last) as a bundle
    ``out_dir/<bc.id>``; ``val_items`` yields the validation cases for the final pass (None: no validation data)."""
    t0 = time.time()
    chosen = "last"
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    if best.get("epoch") is not None and (work_dir / BEST).is_file():
        ck = load_checkpoint(work_dir / BEST)
        state = ck["model"]
        chosen = f"best (epoch {ck['epoch']}, by validation Dice)"
    device = next(network.parameters()).device
    evalnet = copy.deepcopy(network)  # leave the live module untouched
    evalnet.load_state_dict(state)
    evalnet.to(device).eval()

    metrics: dict[str, Any] = {}
    temperature = None
    calibrator = None
    # the base's calibrator was fitted to the base network's logits: a fine-tuned network gets its own (an ACE
    # temperature fitted on its validation cases), so its outputs stay calibrated by default
    base_calibrator = base.config.calibrator if base is not None else None
    refit = base_calibrator is not None
    threshold = bc.uncertainty_threshold
    threshold_note = "inherited from the base model" if base is not None else "default (no validation data)"
    if val_items is not None:
        vp = run_pass(evalnet, val_items(), bc, collect_logits=cfg.fit_temperature or refit, cancel=cancel)
        m = summarise(vp)
        metrics = {"split": "validation", "num_cases": len(vp.cases), "weights": chosen, **m}
        threshold = uncertainty_threshold(
            vp.top_counts, vp.top_correct, target=cfg.uncertainty_accuracy, num_classes=bc.num_classes
        )
        threshold_note = (
            f"lowest top-label confidence bin edge from which every populated validation bin "
            f"(>= 100 voxels) was right >= {cfg.uncertainty_accuracy:.0%} of the time"
        )
        if cfg.fit_temperature:
            # a two-head network's temperature scales its calibration head only
            pairs = [
                (split_heads(z, bc.num_classes, two_head=is_two_head(bc))[1][0], y[0])
                for z, y in zip(vp.logits, vp.labels, strict=True)
            ]
            fitted = float(fit_temperature(pairs))
            vt = run_pass(evalnet, val_items(), bc, temperature=fitted, cancel=cancel)
            mt = summarise(vt)
            # Stored (and so applied at inference) only when it makes the served confidence better calibrated bin by
            # bin: NLL-optimal temperatures can lower NLL and ECE yet raise ACE/MCE (an under-confident network).
            applied = mt["ace"] is not None and m["ace"] is not None and mt["ace"] < m["ace"]
            metrics["with_temperature"] = {"temperature": fitted, "applied": applied, **mt}
            if applied:
                temperature = fitted
                threshold = uncertainty_threshold(
                    vt.top_counts, vt.top_correct, target=cfg.uncertainty_accuracy, num_classes=bc.num_classes
                )
        metrics["top_label_bins"] = {"counts": vp.top_counts.tolist(), "correct": vp.top_correct.tolist()}
        if base is not None and base_calibrator is not None and vp.cases:
            cal_cases = [
                CalibrationCase(n, _calibration_logits(z, bc)[0], y[0, 0], prediction=_served_labels(z, bc))
                for n, z, y in zip(vp.cases, vp.logits, vp.labels, strict=True)
            ]
            calibrator, temperature, threshold = refit_ace_temperature(
                cal_cases,
                source=f"the fine-tuned network's validation cases (base {base.id} had a "
                f"{base_calibrator.kind} calibrator)",
                uncertainty_accuracy=cfg.uncertainty_accuracy,
            )
            threshold_note = f"for the calibrated confidence (ACE temperature), {threshold_note}"
            if "with_temperature" in metrics:
                metrics["with_temperature"]["applied"] = False
    epoch_seconds = sum(float(h.get("seconds") or 0.0) for h in history)
    wall = epoch_seconds + (time.time() - t0)
    training = {
        "data": {
            **info.record(),
            "source_note": cfg.data_source or info.name or info.source,
            "licence": cfg.data_licence or info.licence,
        },
        "split": {
            "seed": cfg.seed if cfg.split_seed is None else cfg.split_seed,
            "val_fraction": cfg.val_fraction if cfg.val_cases is None else None,
            "train": [c.name for c in train_cases],
            "val": [c.name for c in val_cases],
        },
        "loss": {"name": cfg.loss, "params": cfg.loss_params, "warmup_epochs": cfg.loss_warmup_epochs},
        "epochs": len(history),
        "patch_size": list(cfg.patch_size or bc.roi_size),
        "batch_size": cfg.batch_size,
        "num_samples": cfg.num_samples,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup_epochs": cfg.warmup_epochs,
        "val_every": cfg.val_every,
        "seed": cfg.seed,
        "augment": cfg.augment,
        "wall_time_seconds": round(wall, 1),
        "weights": chosen,
        "best_epoch": best.get("epoch"),
        "world_size": world_size,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.machine(),
        "command": cfg.command,
        "base": base.id if base else None,
        "freeze_encoder": cfg.freeze_encoder,
        "uncertainty_threshold_rule": threshold_note,
        "history": [{k: h.get(k) for k in ("epoch", "epochs", "train_loss", "val", "seconds", "lr")} for h in history],
    }
    final = bc.model_copy(
        update={
            "metrics": metrics,
            "training": training,
            "temperature": temperature,
            "uncertainty_threshold": round(float(threshold), 4),
            "calibrator": calibrator,
        }
    )
    final = BundleConfig.model_validate(final.model_dump())
    card = model_card(final, base_id=base.id if base else None)
    return write_bundle(out_dir, final, state, card, half_precision=cfg.half_precision, overwrite=cfg.overwrite)
