"""Evaluations of a model on a stored dataset: Dice/ACE/ECE/MCE, the ACE floor, error detection, reliability figures.

Unlike fine-tuning jobs they run at once, on the caller's thread (the server puts them on its device queue, so
inference and evaluations take turns on the device). Two steps:

- :meth:`EvaluationService.prepare` checks everything cheaply first: the model and dataset exist, the chosen cases
  exist and have label values the model knows, and each stored file passes its header check and the model-space
  voxel budget (a case stored by an older server, as uploaded and perhaps pointing to another file, is refused
  here, never read);
- :meth:`EvaluationService.run` runs :func:`acecal.training.evaluate.evaluate` (the code behind ``acecal evaluate``)
  on exactly those cases, under the server's image limits, and stores the reply and figures
  (:class:`acecal.storage.evaluations.EvaluationStore`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from acecal.bundles import Bundle, ModelRegistry
from acecal.data.headers import ImageLimits, check_model_space_budget, image_limits, inspect_image
from acecal.errors import ACECalError, InvalidInputError
from acecal.storage.datasets import DatasetStore, unknown_labels
from acecal.storage.db import CaseRow, DatasetRow, now_iso
from acecal.storage.evaluations import EvaluationStore
from acecal.training.evaluate import evaluate

__all__ = ["EvaluationPlan", "EvaluationService"]


@dataclass
class EvaluationPlan:
    """A checked evaluation request, ready to run."""

    bundle: Bundle
    dataset: DatasetRow
    files: list[tuple[str, Path, Path]]  # (case id, image, label) in the order evaluated
    names: dict[str, str]  # case id -> display name
    temperature: bool
    raw: bool
    limits: ImageLimits


def _link(src: Path, dst: Path) -> None:
    """``dst`` names the file ``src``: a hard link (same data directory), never a symlink (the server's readers
    refuse those), a copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def check_stored_cases(
    bundle: Bundle, files: list[tuple[str, Path, Path]], cases: dict[str, CaseRow], limits: ImageLimits
) -> None:
    """Check each stored case's files from their headers and its model-space size, before any reader opens them."""
    for cid, img, lab in files:
        case = cases.get(cid)
        shown = f"{case.name if case else cid} ({cid})"
        try:
            for path, what in ((img, "image"), (lab, "label")):
                inspect_image(path, name=path.name, what=what, limits=limits)
            info = case.info if case else {}
            if info.get("size") and info.get("spacing"):
                check_model_space_budget(
                    info["size"],
                    info["spacing"],
                    bundle.config.spacing,
                    name=shown,
                    model_id=f"model {bundle.id!r}",
                    limits=limits,
                )
        except ACECalError as e:
            e.detail = f"case {shown} cannot be evaluated: {e.detail}"
            raise


class EvaluationService:
    def __init__(self, registry: ModelRegistry, datasets: DatasetStore, store: EvaluationStore, *, device: str):
        self.registry = registry
        self.datasets = datasets
        self.store = store
        self.device = device

    def prepare(
        self,
        model_id: str,
        dataset_id: str,
        *,
        cases: Optional[list[str]],
        temperature: bool,
        raw: bool,
        limits: ImageLimits,
    ) -> EvaluationPlan:
        """Check an evaluation request (404 unknown model or dataset, 422 unusable cases, 413 over budget)."""
        bundle = self.registry.get(model_id)
        ds = self.datasets.get(dataset_id)
        stored = self.datasets.cases(ds.id)
        if not stored:
            raise InvalidInputError(f"dataset {ds.id!r} has no cases to evaluate on; upload some first")
        by_id = {c.id: c for c in stored}
        if cases is not None:
            unknown = [c for c in cases if c not in by_id]
            if unknown:
                raise InvalidInputError(f"dataset {ds.id!r} has no case(s) {', '.join(unknown[:20])}")
        chosen = [c for c in stored if cases is None or c.id in cases]
        bad_labels = unknown_labels(chosen, bundle)
        if bad_labels is not None:
            raise bad_labels
        files = self.datasets.case_files(ds.id, list(dict.fromkeys(cases)) if cases else None)
        check_stored_cases(bundle, files, by_id, limits)
        return EvaluationPlan(bundle, ds, files, {c.id: c.name for c in stored}, temperature, raw, limits)

    def run(self, plan: EvaluationPlan) -> dict[str, Any]:
        """Evaluate and store the report; returns the reply (``EvaluationResponse``)."""

        def build(ev_id: str, folder: Path) -> dict[str, Any]:
            view = folder / "cases"
            (view / "images").mkdir(parents=True)
            (view / "labels").mkdir(parents=True)
            for _, img, lab in plan.files:  # exactly the committed cases, by their server-side names
                _link(img, view / "images" / img.name)
                _link(lab, view / "labels" / lab.name)
            with image_limits(plan.limits):  # the server's budgets; no symlink is followed
                rep = evaluate(
                    str(plan.bundle.path),
                    view / "images",
                    view / "labels",
                    folder,
                    temperature=plan.temperature,
                    raw=plan.raw,
                    registry=self.registry,
                    device=self.device,
                )
            shutil.rmtree(view, ignore_errors=True)
            base = f"/evaluations/{ev_id}/figures/"
            case_figs = {cid: base + Path(p).name for cid, p in (rep.get("figures", {}).get("cases") or {}).items()}
            hist = rep.get("figures", {}).get("dataset_histogram")
            names = plan.names
            return {
                "evaluation_id": ev_id,
                "model_id": plan.bundle.id,
                "dataset": plan.dataset.id,
                "temperature": rep.get("temperature"),
                "num_cases": rep["num_cases"],
                "aggregate": rep["aggregate"],
                "aggregate_std": rep["aggregate_std"],
                "raw": rep["raw"],
                "calibrator": rep["calibrator"],
                "micro": rep["micro"],
                "floor": rep["floor"],
                "error_detection": rep["error_detection"],
                "per_class": rep["per_class"],
                "cases": [
                    {
                        **{k: v for k, v in c.items() if k != "case"},
                        "case_id": c["case"],
                        "name": names.get(c["case"], c["case"]),
                        "figure": case_figs.get(c["case"]),
                    }
                    for c in rep["cases"]
                ],
                "figures": {"dataset_histogram": base + Path(hist).name if hist else None, "cases": case_figs},
                "note": rep["note"],
                "seconds": rep["seconds"],
                "created": now_iso(),
            }

        return self.store.create(build)
