"""``POST /evaluate/{model_id}``: a model on a stored dataset -> Dice/ACE/ECE/MCE and reliability diagrams.

The evaluation is :func:`acecal.training.evaluate.evaluate` (the code behind ``acecal evaluate``): the served
probabilities and flags on each image's own grid, 20 hard bins, macro over cases, per class and pooled, the ACE floor,
the flags' error detection, plus one reliability diagram per case and the dataset reliability histogram. It runs on
the device queue shared with inference (so the two take turns on the device, and a full queue answers 503). Reports are kept under ``<data_dir>/evaluations/<evaluation_id>/`` (written
aside and renamed into place); ``GET /evaluations/{id}`` returns the reply again and the figures are PNGs at
``GET /evaluations/{id}/figures/{name}``. For large datasets run ``acecal evaluate`` offline instead.

Every stored file is checked from its header before the job is queued (a regular file with its voxel data attached,
within the server's budgets) and read under the server's image limits (:mod:`acecal.data.headers`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from acecal.api.datastore import new_id, unknown_labels
from acecal.api.deps import ServerState, get_state
from acecal.api.finetune_schemas import Deleted, EvaluateRequest, EvaluationResponse
from acecal.api.jobs import services
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, busy_response
from acecal.api.state import now_iso
from acecal.api.store import storage_guard
from acecal.data.headers import check_model_space_budget, image_limits, inspect_image
from acecal.errors import ACECalError, InvalidInputError, NotFoundError

router = APIRouter(tags=["evaluation"])
_400 = {400: {"model": ErrorResponse, "description": "the body is not valid JSON"}}

REPLY = "evaluation.json"
_EV_ID = re.compile(r"^ev_[0-9a-f]{12}$")
_PNG = re.compile(r"^[A-Za-z0-9._-]{1,200}\.png$")
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def evaluation_not_found(ev_id: str) -> NotFoundError:
    return NotFoundError(f"unknown evaluation {ev_id!r}", code="evaluation_not_found")


def _folder(state: ServerState, ev_id: str) -> Path:
    if not isinstance(ev_id, str) or not _EV_ID.match(ev_id):
        raise evaluation_not_found(ev_id)
    d = services(state).evaluations_dir / ev_id
    if not (d / REPLY).is_file():
        raise evaluation_not_found(ev_id)
    return d


def _link(src: Path, dst: Path) -> None:
    """``dst`` names the file ``src``: a hard link (same data directory), never a symlink (the server's readers
    refuse those), a copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def check_stored_cases(state: ServerState, bundle, files: list, names: dict, infos: dict) -> None:
    """Check each stored case's files from their headers and its model-space size, before the device queue: a case
    stored by an older server (as uploaded, perhaps pointing to another file) is refused here, never read."""
    limits = state.settings.image_limits()
    for cid, img, lab in files:
        shown = f"{names.get(cid, cid)} ({cid})"
        try:
            for path, what in ((img, "image"), (lab, "label")):
                inspect_image(path, name=path.name, what=what, limits=limits)
            info = infos.get(cid) or {}
            if info.get("size") and info.get("spacing"):
                check_model_space_budget(info["size"], info["spacing"], bundle.config.spacing, name=shown,
                                         model_id=f"model {bundle.id!r}", limits=limits)
        except ACECalError as e:
            e.detail = f"case {shown} cannot be evaluated: {e.detail}"
            raise


def _run(state: ServerState, bundle, ds: dict, files: list, names: dict, temperature: bool, raw: bool = False) -> dict:
    from acecal.training.evaluate import evaluate

    svc = services(state)
    ev_id = new_id("ev")
    root = svc.evaluations_dir
    tmp = root / f".tmp-{ev_id}"
    try:
        with storage_guard("the evaluation report"):
            view = tmp / "cases"
            (view / "images").mkdir(parents=True)
            (view / "labels").mkdir(parents=True)
            for _, img, lab in files:  # exactly the committed cases, by their server-side names
                _link(img, view / "images" / img.name)
                _link(lab, view / "labels" / lab.name)
            with image_limits(state.settings.image_limits()):  # the server's budgets; no symlink is followed
                rep = evaluate(str(bundle.path), view / "images", view / "labels", tmp, temperature=temperature,
                               raw=raw, registry=state.registry, device=str(state.predictors.device))
            shutil.rmtree(view, ignore_errors=True)
            base = f"/evaluations/{ev_id}/figures/"
            case_figs = {cid: base + Path(p).name for cid, p in (rep.get("figures", {}).get("cases") or {}).items()}
            hist = rep.get("figures", {}).get("dataset_histogram")
            reply = {
                "evaluation_id": ev_id, "model_id": bundle.id, "dataset": ds["id"], "temperature": rep.get("temperature"),
                "num_cases": rep["num_cases"], "aggregate": rep["aggregate"], "aggregate_std": rep["aggregate_std"],
                "raw": rep["raw"], "calibrator": rep["calibrator"], "micro": rep["micro"], "floor": rep["floor"],
                "error_detection": rep["error_detection"], "per_class": rep["per_class"],
                "cases": [{**c, "case_id": c["case"], "name": names.get(c["case"], c["case"]),
                           "figure": case_figs.get(c["case"])} for c in rep["cases"]],
                "figures": {"dataset_histogram": base + Path(hist).name if hist else None, "cases": case_figs},
                "note": rep["note"], "seconds": rep["seconds"], "created": now_iso(),
            }
            for c in reply["cases"]:
                c.pop("case", None)
            (tmp / REPLY).write_text(json.dumps(reply, indent=1, allow_nan=False))
            os.rename(tmp, root / ev_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return reply


@router.post(
    "/evaluate/{model_id}",
    response_model=EvaluationResponse,
    summary="Evaluate a model on a stored dataset: Dice, ACE, ECE, MCE and reliability diagrams",
    responses={
        **_400,
        404: {"model": ErrorResponse, "description": "unknown model or dataset"},
        413: {"model": ErrorResponse, "description": "a case too large once resampled to the model's spacing "
                                                     "(max_model_voxels)"},
        422: {"model": ErrorResponse, "description": "empty dataset, unknown case ids, label values the model does "
                                                     "not know, a stored case whose file is unusable, or temperature "
                                                     "asked of a model without one (or together with raw)"},
        **busy_response("device queue"),
        **DISK_FULL_RESPONSE,
    },
)
async def evaluate_model(model_id: str, body: EvaluateRequest, state: ServerState = Depends(get_state)) -> dict:
    svc = services(state)
    bundle = await run_in_threadpool(state.registry.get, model_id)
    ds = await run_in_threadpool(svc.datasets.get, body.dataset)
    cases = await run_in_threadpool(svc.db.list_cases, ds["id"])
    if not cases:
        raise InvalidInputError(f"dataset {ds['id']!r} has no cases to evaluate on; upload some first")
    names = {c["id"]: c["name"] for c in cases}
    if body.cases is not None:
        unknown = [c for c in body.cases if c not in names]
        if unknown:
            raise InvalidInputError(f"dataset {ds['id']!r} has no case(s) {', '.join(unknown[:20])}")
    chosen = [c for c in cases if body.cases is None or c["id"] in body.cases]
    bad_labels = unknown_labels(chosen, bundle)
    if bad_labels is not None:
        raise bad_labels
    files = await run_in_threadpool(svc.datasets.case_files, ds["id"], list(dict.fromkeys(body.cases))
                                    if body.cases else None)
    await run_in_threadpool(check_stored_cases, state, bundle, files, names, {c["id"]: c.get("info") for c in cases})
    from acecal.api.routers.infer import memory_bounded

    async with state.queue.slot():
        return await memory_bounded(
            lambda: state.queue.run(_run, state, bundle, ds, files, names, body.temperature, body.raw),
            ds["id"], "this server's memory", subject=f"evaluating dataset {ds['id']!r}")


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationResponse, summary="A stored evaluation",
            responses={404: {"model": ErrorResponse, "description": "unknown evaluation"}})
def get_evaluation(evaluation_id: str, state: ServerState = Depends(get_state)) -> dict:
    return json.loads((_folder(state, evaluation_id) / REPLY).read_text())


@router.get(
    "/evaluations/{evaluation_id}/figures/{name}",
    response_class=FileResponse,
    summary="A reliability figure of an evaluation (PNG)",
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "the figure"},
               404: {"content": _ERROR_JSON, "description": "unknown evaluation or figure"},
               422: {"content": _ERROR_JSON, "description": "invalid request"}},
)
def get_figure(evaluation_id: str, name: str, state: ServerState = Depends(get_state)) -> FileResponse:
    d = _folder(state, evaluation_id)
    if _PNG.match(name):
        for p in (d / "figures" / name, d / name):
            if p.is_file():
                return FileResponse(p, media_type="image/png")
    raise NotFoundError(f"evaluation {evaluation_id!r} has no figure {name!r}", code="figure_not_found")


@router.delete("/evaluations/{evaluation_id}", response_model=Deleted, summary="Delete a stored evaluation",
               responses={404: {"model": ErrorResponse, "description": "unknown evaluation"}})
def delete_evaluation(evaluation_id: str, state: ServerState = Depends(get_state)) -> dict:
    d = _folder(state, evaluation_id)
    shutil.rmtree(d, ignore_errors=True)
    return {"id": evaluation_id}
