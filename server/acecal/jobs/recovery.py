"""Settling a job whose process ended (or whose server died): from what is on disk, never from memory alone.

:class:`JobSettler` decides a job's final state once its process is gone, in this order:

1. a published bundle under the job's model id -> ``succeeded`` (also when the server died between the engine's
   atomic rename and ``result.json``, or a cancel came too late to stop the publishing);
2. a cancel was requested -> ``cancelled`` (nothing was published);
3. stopped by a server stop, or the server died while it ran (no result, no exit status) -> queued again to resume
   from its last checkpoint, at most :data:`MAX_ATTEMPTS` starts (``job_resume``), else ``failed`` with the reason;
4. ``result.json`` says ``error`` -> ``failed`` with its message;
5. otherwise a post-mortem (:func:`post_mortem`): a full disk, a signal (SIGKILL: out of memory?), an exit status, with
   the last lines of the job's log.

:func:`recover` runs once the server owns a data directory: every job a dead server left ``running`` is settled this
way (its leftover process killed first, :func:`kill_leftover`), so no job stays ``running`` without a process.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

from acecal.bundles import CONFIG_NAME, Bundle
from acecal.errors import BundleError
from acecal.jobs.folder import EXIT_DISK_FULL, JobFolder, TrainProgress, history_metrics
from acecal.jobs.launcher import kill_process_group
from acecal.protocol import FINAL_JOB_STATUSES, JOB_CANCELLED, JOB_FAILED, JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED
from acecal.storage.db import Database, JobRow, now_iso
from acecal.storage.files import nearly_full

__all__ = ["MAX_ATTEMPTS", "JobSettler", "kill_leftover", "post_mortem", "published_bundle", "recover"]

log = logging.getLogger("acecal.jobs")

#: how many times a job process is started before an interrupted job is given up (1 run + 2 resumes)
MAX_ATTEMPTS = 3
SERVER_STOPPED = "the server stopped while the job was running"


def published_bundle(models_dir: Path, model_id: Optional[str]) -> Optional[Bundle]:
    """The bundle published as ``model_id`` under ``models_dir``, None when there is none (or it is unreadable)."""
    if not model_id:
        return None
    p = models_dir / model_id
    if not (p / CONFIG_NAME).is_file():
        return None
    try:
        return Bundle.load(p)
    except (BundleError, OSError, ValueError):
        return None


def remove_partial_bundle(models_dir: Path, model_id: Optional[str]) -> None:
    """Remove the temporary folder of a bundle whose publishing was interrupted (``.<model_id>.*``)."""
    if not model_id or not models_dir.is_dir():
        return
    for p in models_dir.glob(f".{model_id}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # not a signal this platform names
        return str(signum)


def post_mortem(rc: Optional[int], folder: JobFolder, models_dir: Path, *, have_result: bool) -> str:
    """Why a job process ended without a result of its own: a full disk, a signal, an exit status; with the last
    lines of its log."""
    if rc == EXIT_DISK_FULL or (not have_result and nearly_full(folder.path, models_dir)):
        err = "the disk is full: free space in the server's data directory and submit the job again"
    elif rc is not None and rc < 0:
        err = f"the job process was killed by {_signal_name(-rc)}" + (
            " (out of memory?)" if -rc == signal.SIGKILL else ""
        )
    else:
        err = f"the job process ended unexpectedly (exit status {rc})"
    tail = folder.tail(3)
    if tail:
        err += "; last log lines: " + " | ".join(tail)
    return err


def kill_leftover(job: JobRow) -> None:
    """Kill a dead server's job process that still runs (identified by pid and start time)."""
    if job.pid and kill_process_group(job.pid, job.pid_started):
        log.warning("killed the leftover process %d of job %s", job.pid, job.id)


class JobSettler:
    """What happens to jobs, written to their rows: :meth:`follow` their progress, :meth:`finish` with a final state,
    :meth:`settle` a job whose process is gone."""

    def __init__(self, db: Database, jobs_dir: Path, models_dir: Path, data_dir: Path, *, resume: bool):
        self.db = db
        self.jobs_dir = Path(jobs_dir)
        self.models_dir = Path(models_dir)
        self.data_dir = Path(data_dir)
        self.resume = resume

    def folder(self, job_id: str) -> JobFolder:
        return JobFolder(self.jobs_dir, job_id)

    def follow(self, job_id: str, progress: TrainProgress) -> None:
        """Read what the job's process wrote since the last call into ``progress`` and the job's row."""
        if progress.read(self.folder(job_id)):
            self.db.update_job(
                job_id, epoch=progress.epoch, metrics=progress.metrics, step=progress.step, steps=progress.steps
            )

    def finish(self, job_id: str, status: str, *, error: Optional[str] = None, **fields: Any) -> None:
        """Record a final ``status`` (with its reason) in the job's row and log."""
        self.db.update_job(job_id, status=status, error=error, finished=now_iso(), pid=None, **fields)
        self.folder(job_id).note(f"job {status}" + (f": {error}" if error else ""))
        log.info("job %s %s%s", job_id, status, f": {error}" if error else "")

    def settle(self, job_id: str, rc: Optional[int], progress: TrainProgress, *, interrupted: bool = False) -> None:
        """Decide the state of a job whose process ended with exit status ``rc`` (None: unknown, the server died)
        after ``progress`` (read to the end here); ``interrupted``: the server stopped it to resume later."""
        self.follow(job_id, progress)
        job = self.db.get_job(job_id)
        if job is None or job.status in FINAL_JOB_STATUSES:
            return
        folder = self.folder(job_id)
        res = folder.read_result()
        remove_partial_bundle(self.models_dir, job.model_id)
        bundle = published_bundle(self.models_dir, job.model_id)
        status = (res or {}).get("status")
        if bundle is not None:
            self._succeeded(job, bundle, progress)
        elif job.cancel_requested:
            self.finish(
                job.id,
                JOB_CANCELLED,
                error=f"cancelled on request after epoch {progress.epoch} of {job.epochs}; nothing was published",
                step=None,
            )
        elif interrupted or status == "cancelled" or (res is None and rc is None):
            self._requeue_or_fail(job, progress, SERVER_STOPPED)
        elif status == "error":
            self.finish(job.id, JOB_FAILED, error=(res or {}).get("error") or "the job failed")
        else:
            self.finish(job.id, JOB_FAILED, error=post_mortem(rc, folder, self.models_dir, have_result=res is not None))

    def _succeeded(self, job: JobRow, bundle: Bundle, progress: TrainProgress) -> None:
        history = (bundle.config.training or {}).get("history") or []
        metrics = history_metrics(history) or progress.metrics
        final = dict(bundle.config.metrics or {})
        final.pop("top_label_bins", None)
        self.db.update_job(
            job.id,
            status=JOB_SUCCEEDED,
            published=True,
            finished=now_iso(),
            pid=None,
            epoch=max(len(history), progress.epoch),
            metrics=metrics,
            error=None,
            step=None,
            steps=None,
            final_metrics=final,
        )
        try:
            self.db.add_model(
                str(job.model_id),
                str(bundle.path.relative_to(self.data_dir)),
                job_id=job.id,
                parent=job.base_model,
                dataset_id=job.dataset_id,
            )
        except Exception:  # pragma: no cover - the index is a convenience; the folder is the registry
            log.exception("could not index model %s", job.model_id)
        self.folder(job.id).note(f"job succeeded: published model {job.model_id}")
        log.info("job %s succeeded: model %s", job.id, job.model_id)

    def _requeue_or_fail(self, job: JobRow, progress: TrainProgress, reason: str) -> None:
        epoch = max(progress.epoch, job.epoch)
        if self.resume and job.attempts < MAX_ATTEMPTS:
            self.db.update_job(
                job.id,
                status=JOB_QUEUED,
                pid=None,
                step=None,
                steps=None,
                epoch=epoch,
                metrics=progress.metrics or job.metrics,
            )
            self.folder(job.id).note(
                f"{reason} (after epoch {epoch}); queued again: it resumes from its last checkpoint"
            )
            log.info("job %s re-queued to resume after epoch %d", job.id, epoch)
        else:
            why = "job_resume is off" if not self.resume else f"it was already started {job.attempts} times"
            self.finish(
                job.id,
                JOB_FAILED,
                error=f"{reason} (after epoch {epoch} of {job.epochs}); not resumed: {why}. Submit it again.",
            )


def recover(db: Database, settler: JobSettler) -> None:
    """Settle the jobs a dead server left ``running`` and the queued ones it was asked to cancel (called once the
    data directory is ours, before any job starts)."""
    for job in db.jobs_with_status(JOB_RUNNING):
        kill_leftover(job)
        settler.settle(job.id, None, TrainProgress())
    for job in db.jobs_with_status(JOB_QUEUED):
        if job.cancel_requested:
            settler.finish(job.id, JOB_CANCELLED, error="cancelled before it started")
