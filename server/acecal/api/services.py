"""The services one server app uses, built once by :func:`build_services` and handed to routers by
:mod:`acecal.api.deps`.

=================  ====================================================================================
``registry``       the model bundles (:class:`acecal.bundles.ModelRegistry`: shipped folders + published ones)
``predictors``     loaded networks (:class:`acecal.inference.predictor.PredictorCache`)
``queue``          the bounded device queue shared by inference and evaluation (:mod:`acecal.api.queue`)
``results``        inference results on disk, with expiry (:class:`acecal.storage.results.ResultStore`)
``db``             the state database (:class:`acecal.storage.db.Database`)
``datasets``       stored datasets and cases (:class:`acecal.storage.datasets.DatasetStore`)
``jobs``           fine-tuning jobs (:class:`acecal.jobs.service.JobService`)
``scheduler``      the thread running them (:class:`acecal.jobs.scheduler.JobScheduler`)
``evaluations``    evaluations of a model on a stored dataset (:class:`acecal.jobs.evaluations.EvaluationService`)
=================  ====================================================================================

:meth:`AppServices.default_model` says which model ``POST /infer`` runs without an id: the configured
``default_model`` when it is served, else the first model ``/models`` lists (published models come and go, so it is
decided on each call and logged whenever the answer changes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Optional

from acecal.api.queue import InferenceQueue
from acecal.api.settings import Settings
from acecal.bundles import ModelRegistry
from acecal.inference.predictor import PredictorCache, describe_device
from acecal.jobs.evaluations import EvaluationService
from acecal.jobs.scheduler import JobScheduler
from acecal.jobs.service import JobService
from acecal.storage.datasets import DatasetStore
from acecal.storage.db import Database
from acecal.storage.evaluations import EvaluationStore
from acecal.storage.results import ResultStore

__all__ = ["AppServices", "DefaultModel", "build_services"]

log = logging.getLogger("acecal.api")


@dataclass(frozen=True)
class DefaultModel:
    """The model run when a request names none: ``configured`` is the setting, ``served`` the id actually used
    (None when the server has no model at all)."""

    configured: str
    served: Optional[str]

    @property
    def fallback(self) -> bool:
        """True when the configured model is not served and another one stands in."""
        return self.served != self.configured

    def describe(self) -> str:
        """One line for the log."""
        if not self.fallback:
            return f"default model: {self.served}"
        if self.served is None:
            return f"default model {self.configured!r} is not served and there is no other model"
        return f"default model {self.configured!r} is not served: using {self.served!r} (the first model /models lists)"


def choose_default_model(configured: str, model_ids: list[str]) -> DefaultModel:
    """``configured`` when it is among ``model_ids`` (in ``/models`` order), else the first of them (None if none)."""
    if configured in model_ids:
        return DefaultModel(configured, configured)
    return DefaultModel(configured, model_ids[0] if model_ids else None)


@dataclass
class AppServices:
    settings: Settings
    registry: ModelRegistry
    predictors: PredictorCache
    queue: InferenceQueue
    results: ResultStore
    device: str  # a human description, e.g. "cpu" or "cuda:0 (NVIDIA H200)"
    db: Database
    datasets: DatasetStore
    jobs: JobService
    scheduler: JobScheduler
    evaluations: EvaluationService
    _logged_default: Optional[DefaultModel] = field(default=None, repr=False)

    def default_model(self) -> DefaultModel:
        """The model a request without a model id runs, now (file-system work: call it off the event loop)."""
        chosen = choose_default_model(self.settings.default_model, [b.id for b in self.registry.list()])
        if chosen != self._logged_default:  # said once per change, not on every request
            self._logged_default = chosen
            (log.warning if chosen.fallback else log.info)("%s", chosen.describe())
        return chosen

    async def start(self) -> None:
        """Clear what a previous run left half-done, settle its jobs and start the scheduler (app start-up)."""
        for f in self.settings.tmp_dir.glob("upload-*"):  # temporary uploads
            f.unlink(missing_ok=True)
        await asyncio.to_thread(self.results.sweep, partial_older_than_s=0.0)  # half-written results
        await asyncio.to_thread(self.evaluations.store.clean)
        await asyncio.to_thread(self.scheduler.start)  # settles jobs a dead server left running

    async def stop(self) -> None:
        """Stop the device queue and the scheduler (running jobs stop and resume at the next start)."""
        self.queue.shutdown()
        try:
            await asyncio.to_thread(self.scheduler.stop)
        finally:
            self.db.close()


def build_services(settings: Settings) -> AppServices:
    """Create every service for ``settings`` (folders made; nothing started: see :meth:`AppServices.start`)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry([*settings.models_dirs, settings.user_models_dir])
    predictors = PredictorCache(settings.device, capacity=settings.max_loaded_models)
    db = Database(settings.data_dir)
    datasets = DatasetStore(settings.data_dir, db, registry)
    scheduler = JobScheduler(settings, db, datasets)
    return AppServices(
        settings=settings,
        registry=registry,
        predictors=predictors,
        queue=InferenceQueue(settings.queue_size, settings.inference_workers),
        results=ResultStore(settings.results_dir, settings.result_ttl_s),
        device=describe_device(predictors.device),
        db=db,
        datasets=datasets,
        jobs=JobService(settings, registry, db, datasets, scheduler),
        scheduler=scheduler,
        evaluations=EvaluationService(
            registry, datasets, EvaluationStore(settings.data_dir), device=str(predictors.device)
        ),
    )
