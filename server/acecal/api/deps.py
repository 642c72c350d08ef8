"""Shared server state and the FastAPI dependencies that hand it to routers.

Later resources (datasets, jobs, evaluation) add their own services to :class:`ServerState` and their own router;
routers get the state through :func:`get_state` and never build services themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from acecal.api.queue import InferenceQueue
from acecal.api.settings import Settings
from acecal.api.store import ResultStore
from acecal.bundles import ModelRegistry


@dataclass
class ServerState:
    settings: Settings
    registry: ModelRegistry
    predictors: Any  # acecal.inference.predictor.PredictorCache (imported lazily: torch)
    queue: InferenceQueue
    results: ResultStore
    device: str
    extras: dict[str, Any] = field(default_factory=dict)  # room for services added by later routers


def get_state(request: Request) -> ServerState:
    return request.app.state.acecal


def get_settings(request: Request) -> Settings:
    return request.app.state.acecal.settings
