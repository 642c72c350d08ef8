"""GET /health: liveness and basic facts; never needs the key and never waits for inference."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from acecal import __version__
from acecal.api.deps import ServicesDep
from acecal.api.schemas import HealthResponse, QueueStats

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Server status, version and device")
async def health(services: ServicesDep) -> HealthResponse:
    s = services.settings
    default = await asyncio.to_thread(services.default_model)  # a folder rescan at most: off the event loop
    return HealthResponse(
        version=__version__,
        device=services.device,
        auth_required=s.api_key is not None,
        max_upload_mb=s.max_upload_mb,
        max_voxels=s.max_voxels,
        max_model_voxels=s.max_model_voxels,
        result_ttl_s=s.result_ttl_s,
        queue=QueueStats(**services.queue.stats()),
        default_model=default.served,
        default_model_configured=default.configured,
    )
