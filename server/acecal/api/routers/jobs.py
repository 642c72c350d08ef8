"""``POST /finetune`` and ``/jobs``: fine-tuning jobs (queued, run in their own process, kept in the database).

Poll ``GET /jobs/{id}``; to long-poll pass ``wait`` (seconds, at most 30) and ``after`` (the ``rev`` of the reply you
have): the reply comes as soon as the job changes (a finished epoch, a new status) or when ``wait`` runs out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import APIRouter, Depends, Query, Response
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import ServerState, get_state
from acecal.api.finetune_schemas import FinetuneRequest, JobAccepted, JobInfo, JobsResponse, JobStatus
from acecal.api.jobs import services
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, busy_response
from acecal.api.state import FINAL_STATUSES

router = APIRouter(tags=["fine-tuning"])
_400 = {400: {"model": ErrorResponse, "description": "the body is not valid JSON"}}

MAX_WAIT_S = 30.0
_404 = {404: {"model": ErrorResponse, "description": "unknown job"}}


def check_job_inputs(state: ServerState, body: FinetuneRequest) -> None:
    """Refuse at submission what would only fail in the job process: a patch the base model's network cannot take
    (422), a case too large once resampled to the base model's spacing (413, ``max_model_voxels``)."""
    from acecal.data.headers import check_model_space_budget
    from acecal.training.engine import _check_sizes

    svc = services(state)
    svc.datasets.get(body.dataset)  # 404 first
    base = state.registry.get(body.base_model)
    if body.patch_size is not None:
        _check_sizes(base.config, tuple(body.patch_size))
    limits = state.settings.image_limits()
    for c in svc.db.list_cases(body.dataset):
        info = c.get("info") or {}
        if info.get("size") and info.get("spacing"):
            check_model_space_budget(info["size"], info["spacing"], base.config.spacing, name=c["name"],
                                     model_id=f"model {base.id!r}", limits=limits)


@router.post(
    "/finetune",
    response_model=JobAccepted,
    status_code=202,
    summary="Fine-tune a model on a stored dataset (a queued job; poll GET /jobs/{job_id})",
    responses={
        **_400,
        404: {"model": ErrorResponse, "description": "unknown base model or dataset"},
        413: {"model": ErrorResponse, "description": "a case too large once resampled to the base model's spacing "
                                                     "(max_model_voxels)"},
        409: {"model": ErrorResponse, "description": "a model with the requested model_id exists or is being trained"},
        422: {"model": ErrorResponse, "description": "invalid settings (e.g. a patch size the base model's network "
                                                     "cannot take), a dataset with fewer than 2 cases, or label "
                                                     "values the base model does not know"},
        **busy_response("job queue"),
        **DISK_FULL_RESPONSE,
    },
)
def finetune(body: FinetuneRequest, response: Response, state: ServerState = Depends(get_state)) -> dict:
    check_job_inputs(state, body)
    job = services(state).runner.submit(body)
    response.headers["Location"] = f"/jobs/{job['id']}"
    return {"job_id": job["id"], "status": job["status"], "model_id": job["model_id"], "url": f"/jobs/{job['id']}"}


@router.get("/jobs", response_model=JobsResponse, summary="All fine-tuning jobs, newest first")
def list_jobs(status: Optional[JobStatus] = Query(None, description="only jobs in this state"),
              limit: int = Query(100, ge=1, le=1000, description="at most this many jobs"),
              state: ServerState = Depends(get_state)) -> dict:
    runner = services(state).runner
    positions = runner.queue_positions()
    jobs = [runner.view(j, positions) for j in runner.db.list_jobs(status, limit)]
    return {"jobs": jobs, **runner.stats()}


@router.get("/jobs/{job_id}", response_model=JobInfo, summary="One job: status, progress, metrics, log tail",
            responses=_404)
async def get_job(
    job_id: str,
    wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S, description="long-poll: wait up to this many seconds for a "
                                                                "change (0 = answer at once)"),
    after: Optional[int] = Query(None, ge=0, description="long-poll: the rev you already have (default: the "
                                                         "current one)"),
    state: ServerState = Depends(get_state),
) -> dict:
    runner = services(state).runner
    job = await run_in_threadpool(runner.get, job_id)
    if wait > 0:
        ref = job["rev"] if after is None else after
        deadline = time.monotonic() + wait
        while job["rev"] <= ref and job["status"] not in FINAL_STATUSES and time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            job = await run_in_threadpool(runner.get, job_id)
    return await run_in_threadpool(runner.view, job)


@router.delete("/jobs/{job_id}", response_model=JobInfo,
               summary="Cancel a job (a running one stops within seconds and publishes nothing)", responses=_404)
def cancel_job(job_id: str, state: ServerState = Depends(get_state)) -> dict:
    runner = services(state).runner
    return runner.view(runner.cancel(job_id))
