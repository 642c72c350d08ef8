"""FastAPI dependencies: the app's services as ``Annotated`` types, so a route declares what it uses.

``services: ServicesDep`` is everything (:class:`acecal.api.services.AppServices`); the narrower ones name one
service each. Routers never build services: :func:`acecal.api.services.build_services` does, once per app.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from acecal.api.queue import InferenceQueue
from acecal.api.services import AppServices
from acecal.api.settings import Settings
from acecal.bundles import ModelRegistry
from acecal.inference.predictor import PredictorCache
from acecal.jobs.evaluations import EvaluationService
from acecal.jobs.service import JobService
from acecal.storage.datasets import DatasetStore
from acecal.storage.results import ResultStore

__all__ = [
    "DatasetsDep",
    "EvaluationsDep",
    "JobsDep",
    "PredictorsDep",
    "QueueDep",
    "RegistryDep",
    "ResultsDep",
    "ServicesDep",
    "SettingsDep",
    "get_services",
]


def get_services(request: Request) -> AppServices:
    return request.app.state.acecal


def _settings(request: Request) -> Settings:
    return get_services(request).settings


def _registry(request: Request) -> ModelRegistry:
    return get_services(request).registry


def _predictors(request: Request) -> PredictorCache:
    return get_services(request).predictors


def _queue(request: Request) -> InferenceQueue:
    return get_services(request).queue


def _results(request: Request) -> ResultStore:
    return get_services(request).results


def _datasets(request: Request) -> DatasetStore:
    return get_services(request).datasets


def _jobs(request: Request) -> JobService:
    return get_services(request).jobs


def _evaluations(request: Request) -> EvaluationService:
    return get_services(request).evaluations


ServicesDep = Annotated[AppServices, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
PredictorsDep = Annotated[PredictorCache, Depends(_predictors)]
QueueDep = Annotated[InferenceQueue, Depends(_queue)]
ResultsDep = Annotated[ResultStore, Depends(_results)]
DatasetsDep = Annotated[DatasetStore, Depends(_datasets)]
JobsDep = Annotated[JobService, Depends(_jobs)]
EvaluationsDep = Annotated[EvaluationService, Depends(_evaluations)]
