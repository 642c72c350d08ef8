"""The FastAPI application factory: ``create_app(settings)``.

Layout ("bigger applications"): one router per resource under :mod:`acecal.api.routers` (listed in :data:`ROUTERS`),
the services they use built once (:func:`acecal.api.services.build_services`) and handed to them as dependencies
(:mod:`acecal.api.deps`), errors mapped in :mod:`acecal.api.errors`, authentication in :mod:`acecal.api.auth` (ASGI
middleware: the key is checked before any body is read). ``create_app(extra_routers=...)`` adds routers that are
authenticated like the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Iterable, Optional

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from acecal import __version__
from acecal.api.auth import APIKeyMiddleware, require_api_key
from acecal.api.errors import install_error_handlers
from acecal.api.middleware import UploadLimitMiddleware
from acecal.api.routers import datasets, evaluate, health, infer, jobs, models, results
from acecal.api.schemas import Responses
from acecal.api.services import build_services
from acecal.api.settings import Settings

log = logging.getLogger("acecal.api")

#: routers that need the API key when one is set (every one but /health)
ROUTERS = (models.router, infer.router, results.router, datasets.router, jobs.router, evaluate.router)

#: documented on every route: FastAPI's default 422 schema is replaced by ours
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
COMMON_RESPONSES: Responses = {422: {"content": _ERROR_JSON, "description": "invalid request"}}
AUTH_RESPONSES: Responses = {401: {"content": _ERROR_JSON, "description": "missing or wrong API key"}}

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
    settings = settings or Settings()
    services = build_services(settings)
    registry = services.registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        models = await asyncio.to_thread(registry.list)
        log.info(
            "acecal %s serving %d model(s) on %s from %s; data in %s",
            __version__,
            len(models),
            services.device,
            ", ".join(str(d) for d in registry.search_dirs),
            settings.data_dir,
        )
        for problem in registry.problems():
            log.warning("model bundle problem: %s", problem)
        await asyncio.to_thread(services.default_model)  # logs which model POST /infer runs without an id
        if not models:
            log.warning(
                "no model bundles found in %s: /models is empty until one is published there",
                ", ".join(str(d) for d in registry.search_dirs),
            )

        async def sweeper():
            while True:
                await asyncio.sleep(_sweep_interval(settings.result_ttl_s))
                try:
                    n = await asyncio.to_thread(services.results.sweep)
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
            await services.stop()  # running jobs stop and resume at the next start

    app = FastAPI(title="ACECalibration server", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.acecal = services
    install_error_handlers(app)
    # the last added runs first: CORS (preflights), then the key (before any body is read), then the size caps
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(APIKeyMiddleware, key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    app.include_router(health.router, responses=COMMON_RESPONSES)
    # the key dependency (and the OpenAPI security scheme) only when a key is set, so the schema tells the truth
    secured = [Depends(require_api_key)] if settings.api_key is not None else []
    responses = {**COMMON_RESPONSES, **(AUTH_RESPONSES if secured else {})}
    for router in (*ROUTERS, *extra_routers):
        app.include_router(router, dependencies=secured, responses=responses)
    return app
