"""Fine-tuning jobs as the API sees them: submit, get, list, cancel, and the job's public description.

:meth:`JobService.submit` checks everything it can at once, so that a job fails in its process only for reasons
that need the training itself: the dataset and base model exist, the dataset has at least :data:`MIN_CASES` cases
whose label values the base model knows, validation cases exist, the patch suits the base network, every case fits
the model-space voxel budget at the base model's spacing, the loss parameters build a loss, the new model id is
free, the queue has room (``job_queue_size``; more -> 503). It then builds the job's
:class:`~acecal.training.config.TrainConfig` (:func:`acecal.training.finetune.finetune_config`) and queues the job;
:class:`~acecal.jobs.scheduler.JobScheduler` runs it. Cancelling a queued job is immediate; a running one is
stopped by the scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from acecal.bundles import ModelRegistry
from acecal.data.headers import ImageLimits, check_model_space_budget
from acecal.errors import ConflictError, InvalidInputError, NotFoundError, ServerBusyError
from acecal.jobs.folder import JobFolder
from acecal.jobs.scheduler import JobScheduler
from acecal.protocol import ACTIVE_JOB_STATUSES, JOB_CANCELLED, JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED
from acecal.storage.datasets import DatasetStore, unknown_labels
from acecal.storage.db import Database, JobRow, new_id, now_iso
from acecal.storage.files import storage_guard
from acecal.training.engine import check_heads, check_patch_sizes, loss_for_network, training_loss
from acecal.training.finetune import finetune_config

__all__ = ["MIN_CASES", "JobService", "job_not_found"]

#: at least this many cases: one to train on, one held out for validation
MIN_CASES = 2


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"unknown job {job_id!r}; list them with GET /jobs (or `acecal jobs`)", code="job_not_found")


class JobService:
    """The job operations of the API, over the database, the dataset store and the scheduler."""

    def __init__(
        self, settings: Any, registry: ModelRegistry, db: Database, datasets: DatasetStore, scheduler: JobScheduler
    ):
        self.settings = settings
        self.registry = registry
        self.db = db
        self.datasets = datasets
        self.scheduler = scheduler
        self.models_dir = Path(settings.user_models_dir)
        self.queue_size = int(settings.job_queue_size)
        self.max_epochs = int(settings.job_max_epochs)

    # --- submitting ----------------------------------------------------------------------------------------------
    def check_inputs(self, req: Any, limits: ImageLimits) -> None:
        """Refuse at submission what would only fail in the job process: a patch the base model's network cannot
        take (422), a case too large once resampled to the base model's spacing (413, ``max_model_voxels``)."""
        cases = self.datasets.cases(req.dataset)  # 404 first
        base = self.registry.get(req.base_model)
        if req.patch_size is not None:
            check_patch_sizes(base.config, tuple(req.patch_size))
        for c in cases:
            if c.info.get("size") and c.info.get("spacing"):
                check_model_space_budget(
                    c.info["size"],
                    c.info["spacing"],
                    base.config.spacing,
                    name=c.name,
                    model_id=f"model {base.id!r}",
                    limits=limits,
                )

    def submit(self, req: Any, limits: ImageLimits) -> JobRow:
        """Validate a :class:`~acecal.api.finetune_schemas.FinetuneRequest` and queue the job; returns its row."""
        self.check_inputs(req, limits)
        ds = self.datasets.get(req.dataset)
        base = self.registry.get(req.base_model)
        bc = base.config
        if req.epochs > self.max_epochs:
            raise InvalidInputError(f"epochs must be at most {self.max_epochs} on this server (ACECAL_JOB_MAX_EPOCHS)")
        cases = self.db.list_cases(ds.id)
        if len(cases) < MIN_CASES:
            raise InvalidInputError(
                f"dataset {ds.id!r} has {len(cases)} case(s); fine-tuning needs at least {MIN_CASES}: one to train "
                "on and one held out for validation. Upload more cases (POST /datasets/{id}/cases)",
                code="dataset_too_small",
            )
        bad_labels = unknown_labels(cases, base)
        if bad_labels is not None:
            raise bad_labels
        if bc.in_channels != 1 and ds.model is None:
            raise InvalidInputError(
                f"model {bc.id!r} takes {bc.in_channels} channels: create the dataset with "
                f'"model": "{bc.id}" so its cases are checked for that on upload'
            )
        ids = [c.id for c in cases]
        if req.val_cases is not None:
            unknown = [v for v in req.val_cases if v not in ids]
            if unknown:
                raise InvalidInputError(f"val_cases not in dataset {ds.id!r}: {', '.join(unknown[:20])}")
            if not req.val_cases or len(set(req.val_cases)) >= len(ids):
                raise InvalidInputError("val_cases must hold at least one case and leave at least one to train on")
        loss = loss_for_network(req.loss, bc.network)  # hL1-/sL1-ACE on a two-head model: on its calibration head
        check_heads(bc.network, loss)
        if req.loss_params:
            training_loss(loss, bc.num_classes, dict(req.loss_params))  # InvalidInputError (422) when bad
        job_id = new_id("job")
        model_id = req.model_id or f"{bc.id[:40].rstrip('-._')}-ft-{job_id[4:12]}"
        if (
            model_id in self.registry.ids()
            or (self.models_dir / model_id).exists()
            or self.db.model_id_reserved(model_id)
        ):
            raise ConflictError(
                f"a model with id {model_id!r} exists or is being trained; choose another model_id", code="model_exists"
            )
        queued = self.db.count_jobs(JOB_QUEUED)
        if queued >= self.queue_size:
            raise ServerBusyError(
                f"the fine-tuning queue is full ({queued} job(s) waiting, at most "
                f"{self.queue_size}); retry later or cancel a job",
                retry_after=60.0,
            )
        folder = self.scheduler.folder(job_id)
        threads = self.scheduler.threads
        settings: dict[str, Any] = {
            "data": str(folder.dataset_json),
            "loss": loss,
            "loss_params": dict(req.loss_params),
            "epochs": req.epochs,
            "lr": req.lr,
            "val_fraction": req.val_fraction,
            "val_cases": req.val_cases,
            "val_every": req.val_every or max(1, round(req.epochs / 20)),
            "batch_size": req.batch_size,
            "num_samples": req.num_samples,
            "patch_size": tuple(req.patch_size) if req.patch_size else None,
            "fit_temperature": req.fit_temperature,
            "seed": req.seed,
            "model_id": model_id,
            "out_dir": str(self.models_dir),
            "work_dir": str(folder.work),
            "log_file": str(folder.train_log),
            "resume": True,
            "num_threads": threads,
            "num_workers": 0,
            "device": None if self.settings.device in ("auto", "", None) else self.settings.device,
            "data_source": f"dataset '{ds.name}' ({ds.id}) uploaded to an ACECal server",
            "data_licence": "local data (not redistributed)",
            "command": f"POST /finetune (job {job_id})",
            "description": req.description or f"{bc.id} fine-tuned on dataset '{ds.name}'",
        }
        try:
            cfg = finetune_config(str(base.path), freeze_encoder=req.freeze_encoder, **settings)
        except ValueError as e:  # pydantic: a setting the engine refuses
            raise InvalidInputError(f"invalid fine-tuning settings: {e}") from None
        request = {
            **req.model_dump(mode="json"),
            "loss": loss,  # the loss trained (a two-head base puts the asked ACE loss on its calibration head)
            "lr": cfg.lr,
            "val_every": cfg.val_every,
            "batch_size": cfg.batch_size,
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "model_id": model_id,
            "cases": ids,
            "labels": dict(bc.labels),
        }
        with storage_guard("the job folder"):
            folder.path.mkdir(parents=True, exist_ok=True)
        job = self.db.add_job(
            JobRow(
                id=job_id,
                status=JOB_QUEUED,
                request=request,
                config=cfg.model_dump(mode="json"),
                epochs=req.epochs,
                created=now_iso(),
                base_model=bc.id,
                dataset_id=ds.id,
                model_id=model_id,
            )
        )
        folder.note(
            f"queued: fine-tune {bc.id} on dataset {ds.id} ({len(ids)} cases), loss {loss}, "
            f"{req.epochs} epoch(s) -> model {model_id}"
        )
        self.scheduler.wake()
        return job

    # --- reading -------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRow:
        job = self.db.get_job(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if job is None:
            raise job_not_found(job_id)
        return job

    def queue_positions(self) -> dict[str, int]:
        """Queued job id -> its place in the queue (1 = next to run)."""
        return {job_id: i + 1 for i, job_id in enumerate(self.db.queued_job_ids())}

    def overview(self, status: Optional[str] = None, limit: int = 100) -> dict[str, Any]:
        """The jobs (newest first) as :meth:`view` describes them, with the queue's :meth:`stats` (``JobsResponse``)."""
        positions = self.queue_positions()
        return {"jobs": [self.view(j, positions) for j in self.db.list_jobs(status, limit)], **self.stats()}

    def cancel(self, job_id: str) -> JobRow:
        """Cancel a job: a queued one at once, a running one is stopped (within seconds); a finished one is left."""
        job = self.get(job_id)
        if job.status == JOB_QUEUED and self.db.update_job(
            job_id,
            only_if_status=(JOB_QUEUED,),
            status=JOB_CANCELLED,
            cancel_requested=True,
            finished=now_iso(),
            error="cancelled before it started",
        ):
            JobFolder(self.scheduler.jobs_dir, job_id).note("cancelled before it started")
            return self.get(job_id)
        if job.status in ACTIVE_JOB_STATUSES:
            self.db.update_job(job_id, only_if_status=ACTIVE_JOB_STATUSES, cancel_requested=True)
            self.scheduler.stop_job(job_id)
        return self.get(job_id)

    def view(self, job: JobRow, positions: Optional[dict[str, int]] = None) -> dict[str, Any]:
        """The API's description of a job (:class:`~acecal.api.finetune_schemas.JobInfo`)."""
        req = job.request or {}
        epochs = int(job.epochs)
        epoch = int(job.epoch or 0)
        step, steps = job.step, job.steps
        succeeded = job.status == JOB_SUCCEEDED
        frac = 1.0 if succeeded else min(1.0, (epoch + ((step or 0) / steps if steps else 0.0)) / max(epochs, 1))
        if job.status == JOB_QUEUED and positions is None:
            positions = self.queue_positions()
        public_req = {k: v for k, v in req.items() if k not in ("labels", "cases")}
        public_req["num_cases"] = len(req.get("cases") or [])
        return {
            "id": job.id,
            "kind": job.kind or "finetune",
            "status": job.status,
            "base_model": job.base_model,
            "dataset": job.dataset_id,
            "loss": req.get("loss"),
            "epochs": epochs,
            "progress": {"epoch": epoch, "epochs": epochs, "step": step, "steps": steps, "fraction": round(frac, 4)},
            "metrics": job.metrics or [],
            "final_metrics": job.final_metrics if succeeded else None,
            "model_id": job.model_id if succeeded else None,
            "target_model_id": job.model_id,
            "error": job.error,
            "log_tail": self.scheduler.folder(job.id).tail(),
            "queue_position": (positions or {}).get(job.id) if job.status == JOB_QUEUED else None,
            "attempts": int(job.attempts or 0),
            "cancel_requested": bool(job.cancel_requested),
            "pid": job.pid if job.status == JOB_RUNNING else None,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "rev": int(job.rev or 0),
            "request": public_req,
        }

    def stats(self) -> dict[str, int]:
        return {
            "running": self.db.count_jobs(JOB_RUNNING),
            "queued": self.db.count_jobs(JOB_QUEUED),
            "slots": self.scheduler.slots,
            "queue_size": self.queue_size,
        }
