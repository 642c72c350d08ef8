"""The FastAPI application factory: ``create_app(settings)``.

Layout ("bigger applications"): one router per resource under :mod:`acecal.api.routers`, shared services in
:class:`acecal.api.deps.ServerState`, errors mapped in :mod:`acecal.api.errors`, authentication in
:mod:`acecal.api.auth` (ASGI middleware: the key is checked before any body is read). A later resource (datasets, jobs, evaluation) adds its router to :data:`ROUTERS` or passes
it to ``create_app(extra_routers=...)``; it is then authenticated like the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterable, Optional

from fastapi import APIRouter, Depends, FastAPI

from acecal import __version__
from acecal.api.auth import APIKeyMiddleware, require_api_key
from acecal.api.deps import ServerState
from acecal.api.errors import install_error_handlers
from acecal.api.middleware import UploadLimitMiddleware
from acecal.api.queue import InferenceQueue
from acecal.api.settings import Settings
from acecal.api.store import ResultStore
from acecal.bundles import ModelRegistry

log = logging.getLogger("acecal.api")

#: routers that need the API key when one is set (every one but /health)
ROUTERS = ("acecal.api.routers.models", "acecal.api.routers.infer", "acecal.api.routers.results",
           "acecal.api.routers.datasets", "acecal.api.routers.jobs", "acecal.api.routers.evaluate")

#: documented on every route: FastAPI's default 422 schema is replaced by ours
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
COMMON_RESPONSES = {422: {"content": _ERROR_JSON, "description": "invalid request"}}
AUTH_RESPONSES = {401: {"content": _ERROR_JSON, "description": "missing or wrong API key"}}

DESCRIPTION = """
Calibrated segmentation server: each volume gets a label map **and** a calibrated voxel-wise confidence, a normalised
entropy map and the uncertain boundary regions, all on the input's exact grid.

Errors are `{"error": code, "detail": message}`. With an API key configured, every endpoint except `/health` (and
these docs) needs `Authorization: Bearer <key>`, checked before the request body is read. Results expire (see
`/health` `result_ttl_s`). Uploads are checked from their headers before they are read: voxel data must be in the
file itself, and the image must fit the server's voxel budgets (`/health` `max_voxels`, `max_model_voxels`).
"""


def _sweep_interval(ttl_s: float) -> float:
    return max(1.0, min(60.0, ttl_s / 4.0))


def create_app(settings: Optional[Settings] = None, *, extra_routers: Iterable[APIRouter] = ()) -> FastAPI:
    """Build the server. ``settings`` default: :class:`Settings` from the environment."""
    import importlib

    from acecal.inference.predictor import PredictorCache, describe_device

    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry([*settings.models_dirs, settings.user_models_dir])
    predictors = PredictorCache(settings.device, capacity=settings.max_loaded_models)
    state = ServerState(
        settings=settings,
        registry=registry,
        predictors=predictors,
        queue=InferenceQueue(settings.queue_size, settings.inference_workers),
        results=ResultStore(settings.results_dir, settings.result_ttl_s),
        device=describe_device(predictors.device),
    )
    from acecal.api.jobs import install as install_finetuning

    finetuning = install_finetuning(state)  # datasets, fine-tuning jobs, evaluations (SQLite state + job runner)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # leftovers of a previous run: temporary uploads and half-written results
        for f in settings.tmp_dir.glob("upload-*"):
            f.unlink(missing_ok=True)
        await asyncio.to_thread(state.results.sweep, partial_older_than_s=0.0)
        await asyncio.to_thread(finetuning.start)  # settles jobs a dead server left running, starts the scheduler
        models = await asyncio.to_thread(registry.list)
        log.info("acecal %s serving %d model(s) on %s from %s; data in %s", __version__, len(models), state.device,
                 ", ".join(str(d) for d in registry.search_dirs), settings.data_dir)
        for problem in registry.problems():
            log.warning("model bundle problem: %s", problem)
        if not models:
            log.warning("no model bundles found in %s: /models is empty until one is published there",
                        ", ".join(str(d) for d in registry.search_dirs))

        async def sweeper():
            while True:
                await asyncio.sleep(_sweep_interval(settings.result_ttl_s))
                try:
                    n = await asyncio.to_thread(state.results.sweep)
                    if n:
                        log.info("removed %d expired result(s)", n)
                except Exception:  # pragma: no cover - keep sweeping
                    log.exception("result sweep failed")

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            state.queue.shutdown()
            await asyncio.to_thread(finetuning.stop)  # running jobs stop and resume at the next start

    app = FastAPI(title="ACECalibration server", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.acecal = state
    install_error_handlers(app)
    # the last added runs first: CORS (preflights), then the key (before any body is read), then the size caps
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(APIKeyMiddleware, key=settings.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    from acecal.api.routers import health

    app.include_router(health.router, responses=COMMON_RESPONSES)
    # the key dependency (and the OpenAPI security scheme) only when a key is set, so the schema tells the truth
    secured = [Depends(require_api_key)] if settings.api_key is not None else []
    responses = {**COMMON_RESPONSES, **(AUTH_RESPONSES if secured else {})}
    for name in ROUTERS:
        app.include_router(importlib.import_module(name).router, dependencies=secured, responses=responses)
    for r in extra_routers:
        app.include_router(r, dependencies=secured, responses=responses)
    return app
