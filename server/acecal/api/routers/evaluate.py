"""``POST /evaluate/{model_id}``: a model on a stored dataset -> Dice/ACE/ECE/MCE and reliability diagrams.

The evaluation is :func:`acecal.training.evaluate.evaluate` (the code behind ``acecal evaluate``), run by
:class:`acecal.jobs.evaluations.EvaluationService`: the served probabilities and flags on each image's own grid, 20
hard bins, macro over cases, per class and pooled, the ACE floor, the flags' error detection, plus one reliability
diagram per case and the dataset reliability histogram. It runs on the device queue shared with inference (so the
two take turns on the device, and a full queue answers 503). Reports are kept under
``<data_dir>/evaluations/<evaluation_id>/`` (:class:`acecal.storage.evaluations.EvaluationStore`);
``GET /evaluations/{id}`` returns the reply again and the figures are PNGs at ``GET /evaluations/{id}/figures/{name}``.
For large datasets run ``acecal evaluate`` offline instead.

Every stored file is checked from its header before the evaluation is queued (a regular file with its voxel data
attached, within the server's budgets) and read under the server's image limits (:mod:`acecal.data.headers`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import EvaluationsDep, QueueDep, SettingsDep
from acecal.api.finetune_schemas import Deleted, EvaluateRequest, EvaluationResponse
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, Responses, busy_response
from acecal.inference.memory import HOST_MEMORY, memory_bounded

router = APIRouter(tags=["evaluation"])
_400: Responses = {400: {"model": ErrorResponse, "description": "the body is not valid JSON"}}
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@router.post(
    "/evaluate/{model_id}",
    response_model=EvaluationResponse,
    summary="Evaluate a model on a stored dataset: Dice, ACE, ECE, MCE and reliability diagrams",
    responses={
        **_400,
        404: {"model": ErrorResponse, "description": "unknown model or dataset"},
        413: {
            "model": ErrorResponse,
            "description": "a case too large once resampled to the model's spacing (max_model_voxels)",
        },
        422: {
            "model": ErrorResponse,
            "description": "empty dataset, unknown case ids, label values the model does "
            "not know, a stored case whose file is unusable, or temperature "
            "asked of a model without one (or together with raw)",
        },
        **busy_response("device queue"),
        **DISK_FULL_RESPONSE,
    },
)
async def evaluate_model(
    model_id: str, body: EvaluateRequest, evaluations: EvaluationsDep, queue: QueueDep, settings: SettingsDep
) -> dict[str, Any]:
    plan = await run_in_threadpool(
        evaluations.prepare,
        model_id,
        body.dataset,
        cases=body.cases,
        temperature=body.temperature,
        raw=body.raw,
        limits=settings.image_limits(),
    )
    async with queue.slot():
        return await queue.run(
            memory_bounded, lambda: evaluations.run(plan), f"evaluating dataset {plan.dataset.id!r}", HOST_MEMORY
        )


@router.get(
    "/evaluations/{evaluation_id}",
    response_model=EvaluationResponse,
    summary="A stored evaluation",
    responses={404: {"model": ErrorResponse, "description": "unknown evaluation"}},
)
def get_evaluation(evaluation_id: str, evaluations: EvaluationsDep) -> dict[str, Any]:
    return evaluations.store.get(evaluation_id)


@router.get(
    "/evaluations/{evaluation_id}/figures/{name}",
    response_class=FileResponse,
    summary="A reliability figure of an evaluation (PNG)",
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the figure",
        },
        404: {"content": _ERROR_JSON, "description": "unknown evaluation or figure"},
        422: {"content": _ERROR_JSON, "description": "invalid request"},
    },
)
def get_figure(evaluation_id: str, name: str, evaluations: EvaluationsDep) -> FileResponse:
    return FileResponse(evaluations.store.figure(evaluation_id, name), media_type="image/png")


@router.delete(
    "/evaluations/{evaluation_id}",
    response_model=Deleted,
    summary="Delete a stored evaluation",
    responses={404: {"model": ErrorResponse, "description": "unknown evaluation"}},
)
def delete_evaluation(evaluation_id: str, evaluations: EvaluationsDep) -> dict[str, Any]:
    evaluations.store.delete(evaluation_id)
    return {"id": evaluation_id}
