"""``POST /finetune`` and ``/jobs``: fine-tuning jobs (queued, run in their own process, kept in the database).

The work is :class:`acecal.jobs.service.JobService`'s. Poll ``GET /jobs/{id}``; to long-poll pass ``wait`` (seconds,
at most 30) and ``after`` (the ``rev`` of the reply you have): the reply comes as soon as the job changes (a
finished epoch, a new status) or when ``wait`` runs out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import JobsDep, SettingsDep
from acecal.api.finetune_schemas import FinetuneRequest, JobAccepted, JobInfo, JobsResponse, JobStatus
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, Responses, busy_response
from acecal.protocol import FINAL_JOB_STATUSES

router = APIRouter(tags=["fine-tuning"])
_400: Responses = {400: {"model": ErrorResponse, "description": "the body is not valid JSON"}}

MAX_WAIT_S = 30.0
_404: Responses = {404: {"model": ErrorResponse, "description": "unknown job"}}


@router.post(
    "/finetune",
    response_model=JobAccepted,
    status_code=202,
    summary="Fine-tune a model on a stored dataset (a queued job; poll GET /jobs/{job_id})",
    responses={
        **_400,
        404: {"model": ErrorResponse, "description": "unknown base model or dataset"},
        413: {
            "model": ErrorResponse,
            "description": "a case too large once resampled to the base model's spacing (max_model_voxels)",
        },
        409: {"model": ErrorResponse, "description": "a model with the requested model_id exists or is being trained"},
        422: {
            "model": ErrorResponse,
            "description": "invalid settings (e.g. a patch size the base model's network "
            "cannot take), a dataset with fewer than 2 cases, or label "
            "values the base model does not know",
        },
        **busy_response("job queue"),
        **DISK_FULL_RESPONSE,
    },
)
def finetune(body: FinetuneRequest, response: Response, jobs: JobsDep, settings: SettingsDep) -> dict[str, Any]:
    job = jobs.submit(body, settings.image_limits())
    response.headers["Location"] = f"/jobs/{job.id}"
    return {"job_id": job.id, "status": job.status, "model_id": job.model_id, "url": f"/jobs/{job.id}"}


@router.get("/jobs", response_model=JobsResponse, summary="All fine-tuning jobs, newest first")
def list_jobs(
    jobs: JobsDep,
    status: Optional[JobStatus] = Query(None, description="only jobs in this state"),
    limit: int = Query(100, ge=1, le=1000, description="at most this many jobs"),
) -> dict[str, Any]:
    return jobs.overview(status, limit)


@router.get(
    "/jobs/{job_id}", response_model=JobInfo, summary="One job: status, progress, metrics, log tail", responses=_404
)
async def get_job(
    job_id: str,
    jobs: JobsDep,
    wait: float = Query(
        0.0,
        ge=0.0,
        le=MAX_WAIT_S,
        description="long-poll: wait up to this many seconds for a change (0 = answer at once)",
    ),
    after: Optional[int] = Query(
        None, ge=0, description="long-poll: the rev you already have (default: the current one)"
    ),
) -> dict[str, Any]:
    job = await run_in_threadpool(jobs.get, job_id)
    if wait > 0:
        ref = job.rev if after is None else after
        deadline = time.monotonic() + wait
        while job.rev <= ref and job.status not in FINAL_JOB_STATUSES and time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            job = await run_in_threadpool(jobs.get, job_id)
    return await run_in_threadpool(jobs.view, job)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobInfo,
    summary="Cancel a job (a running one stops within seconds and publishes nothing)",
    responses=_404,
)
def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    return jobs.view(jobs.cancel(job_id))
