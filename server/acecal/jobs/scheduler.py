"""The job scheduler: one thread that starts queued jobs in their own processes, follows them and settles them.

- Slots: whenever fewer than ``job_slots`` jobs run (one per device by default) the oldest queued job starts
  (:func:`acecal.jobs.launcher.start_job_process`: low CPU priority, ``job_threads`` torch threads, so inference keeps
  serving). Before it starts, at least ``job_min_free_mb`` must be free in the data directory.
- Following: every tick the job's JSON-lines log and step counter go into its row (progress, per-epoch losses and
  validation metrics); when the process ends, :class:`acecal.jobs.recovery.JobSettler` settles the job from disk.
- Cancel: a running job gets SIGTERM (the engine stops within one step and publishes nothing), SIGKILL to the whole
  group after ``cancel_grace_s``.
- Ownership: one server runs a data directory's jobs, the one holding the ``flock`` on ``<data_dir>/jobs/owner.lock``
  (released by the kernel however the server dies). Another server on the same directory serves and queues jobs,
  and takes over when the owner stops. The new owner first recovers (:func:`acecal.jobs.recovery.recover`) and
  removes what interrupted uploads left (:meth:`acecal.storage.datasets.DatasetStore.reconcile`).
- Stop: running jobs get SIGTERM and are queued again to resume at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from acecal.errors import ACECalError
from acecal.jobs.folder import JOBS_DIR, JobFolder, TrainProgress
from acecal.jobs.launcher import JobProcess, available_method, process_started, signal_group, start_job_process
from acecal.jobs.recovery import JobSettler, recover
from acecal.protocol import JOB_FAILED, JOB_QUEUED, JOB_RUNNING
from acecal.storage.datasets import DatasetStore
from acecal.storage.db import Database, JobRow, now_iso
from acecal.storage.files import atomic_write_json, is_disk_error

__all__ = ["LOCK_NAME", "JobScheduler", "default_job_threads"]

log = logging.getLogger("acecal.jobs")

LOCK_NAME = "owner.lock"


def default_job_threads() -> int:
    """Torch threads of a job process: half the CPU cores, at most 4 (the rest serve inference)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _Refused(Exception):
    """A job that cannot start (the message says why); it fails."""


@dataclass
class _Running:
    job_id: str
    proc: Optional[JobProcess] = None
    progress: TrainProgress = field(default_factory=TrainProgress)
    term_sent_at: Optional[float] = None
    interrupt: bool = False  # stopped by the server shutting down (not by the user): resume later


class JobScheduler:
    """Runs the queued jobs of one data directory (when this server owns it). Thread-safe."""

    TICK_S = 0.5

    def __init__(self, settings: Any, db: Database, datasets: DatasetStore):
        self.db = db
        self.datasets = datasets
        self.data_dir = Path(settings.data_dir)
        self.jobs_dir = self.data_dir / JOBS_DIR
        self.models_dir = Path(settings.user_models_dir)
        self.slots = int(settings.job_slots)
        self.threads = settings.job_threads or default_job_threads()
        self.min_free_mb = float(settings.job_min_free_mb)
        self.cancel_grace_s = float(settings.job_cancel_grace_s)
        self.gpu_memory_fraction = settings.job_gpu_memory_fraction
        self.start_method = available_method(settings.job_start_method)
        self.settler = JobSettler(db, self.jobs_dir, self.models_dir, self.data_dir, resume=bool(settings.job_resume))
        self._procs: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock_fh: Optional[IO[str]] = None
        self.owner = False

    def folder(self, job_id: str) -> JobFolder:
        return JobFolder(self.jobs_dir, job_id)

    # --- life cycle ----------------------------------------------------------------------------------------------
    def _acquire(self) -> bool:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.jobs_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._lock_fh = fh
        return True

    def _become_owner(self) -> None:
        self.owner = True
        recover(self.db, self.settler)
        self.datasets.reconcile()

    def start(self) -> None:
        """Own the data directory's jobs if no other server does (recovering first), and start the thread."""
        if self._acquire():
            self._become_owner()
        else:
            log.warning(
                "another ACECal server owns the jobs of %s: this one queues jobs but does not run them "
                "(it takes over when that server stops)",
                self.data_dir,
            )
        self._thread = threading.Thread(target=self._loop, name="acecal-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; running jobs are stopped and queued again to resume at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            running = list(self._procs.values())
        for r in running:
            r.interrupt = True
            self._signal(r, signal.SIGTERM)
        deadline = time.monotonic() + self.cancel_grace_s
        for r in running:
            while r.proc is not None and r.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if r.proc is not None and r.proc.poll() is None:
                self._signal(r, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(timeout=10)
            try:
                self._settle(r, r.proc.returncode if r.proc else None)
            except Exception:  # pragma: no cover - the next start settles it from disk
                log.exception("could not settle job %s at shutdown", r.job_id)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if not self.owner:
                    if not self._acquire():
                        continue
                    log.info("taking over the jobs of %s", self.data_dir)
                    self._become_owner()
                self._tick()
            except Exception:  # the scheduler must survive anything (disk full, a broken row...)
                log.exception("job scheduler step failed")

    def wake(self) -> None:
        """Look at the queue now rather than at the next tick (a job was queued or cancelled)."""
        self._wake.set()

    # --- one tick ------------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        with self._lock:
            running = list(self._procs.values())
        for r in running:
            rc = r.proc.poll() if r.proc else -1
            self.settler.follow(r.job_id, r.progress)
            if rc is None:
                self._check_cancel(r)
            else:
                self._settle(r, rc)
        while len(self._procs) < self.slots and not self._stop.is_set():
            queued = self.db.queued_job_ids()
            if not queued:
                break
            self._launch(queued[0])

    def _write_dataset_json(self, job: JobRow, folder: JobFolder) -> None:
        req = job.request
        files = self.datasets.case_files(str(job.dataset_id), req.get("cases"))
        ds = self.db.get_dataset(str(job.dataset_id))
        doc = {
            "name": f"{ds.name if ds else job.dataset_id} ({job.dataset_id})",
            "description": "cases uploaded to the ACECal server",
            "licence": "local data",
            "labels": req.get("labels") or {},
            "training": [{"image": str(img), "label": str(lab)} for _, img, lab in files],
        }
        atomic_write_json(folder.dataset_json, doc, indent=1)

    def _launch(self, job_id: str) -> None:
        job = self.db.get_job(job_id)
        if job is None or job.status != JOB_QUEUED:
            return
        folder = self.folder(job_id)
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
            free_mb = shutil.disk_usage(self.data_dir).free / 2**20
            if free_mb < self.min_free_mb:
                raise _Refused(
                    f"not enough free disk space to start: {free_mb:.0f} MB free in the data directory, a "
                    f"job needs at least {self.min_free_mb:g} MB (ACECAL_JOB_MIN_FREE_MB); free space and "
                    "submit the job again"
                )
            folder.clear_outcome()
            self._write_dataset_json(job, folder)
            spec = {
                "job_id": job_id,
                "config": job.config,
                "threads": self.threads,
                "nice": 10,
                "server_pid": os.getpid(),
                "server_started": process_started(os.getpid()),
                "cancel_grace_s": max(1.0, self.cancel_grace_s - 2.0),
                "gpu_memory_fraction": self.gpu_memory_fraction,
            }
            atomic_write_json(folder.spec, spec, indent=2)
            attempt = job.attempts + 1
            # running from now on (the first fork-server start takes a while: torch is being imported)
            fields: dict[str, Any] = {
                "status": JOB_RUNNING,
                "pid": None,
                "attempts": attempt,
                "step": None,
                "steps": None,
                **({} if job.started else {"started": now_iso()}),
            }
            if not self.db.update_job(job_id, only_if_status=(JOB_QUEUED,), **fields):
                return  # cancelled meanwhile
            folder.note(
                f"starting the job process (attempt {attempt}, {self.threads} CPU thread(s), {self.start_method})"
            )
            proc = start_job_process(self.start_method, folder, threads=self.threads, data_dir=self.data_dir)
        except _Refused as e:
            self.settler.finish(job_id, JOB_FAILED, error=str(e))
            return
        except ACECalError as e:  # e.g. a case deleted from under a queued job
            self.settler.finish(job_id, JOB_FAILED, error=f"could not start: {e.detail}")
            return
        except Exception as e:  # noqa: BLE001 - e.g. disk full writing the spec: the job fails, not the server
            msg = (
                f"the disk is full: {e}; free space in the data directory and submit the job again"
                if is_disk_error(e)
                else f"could not start the job process: {type(e).__name__}: {e}"
            )
            log.warning("job %s: %s", job_id, msg)
            self.settler.finish(job_id, JOB_FAILED, error=msg)
            return
        r = _Running(job_id, proc)
        with self._lock:
            self._procs[job_id] = r
        self.db.update_job(job_id, pid=proc.pid, pid_started=process_started(proc.pid))
        log.info("job %s started (pid %d, attempt %d)", job_id, proc.pid, attempt)
        self._check_cancel(r)  # a cancel that came while the process was starting

    def _signal(self, r: _Running, sig: int) -> None:
        if r.proc is None:
            return
        signal_group(r.proc, sig)
        if sig == signal.SIGTERM and r.term_sent_at is None:
            r.term_sent_at = time.monotonic()

    def _check_cancel(self, r: _Running) -> None:
        job = self.db.get_job(r.job_id)
        if job is not None and job.cancel_requested and r.term_sent_at is None:
            self.folder(r.job_id).note("cancel requested: stopping the job process")
            self._signal(r, signal.SIGTERM)
        if r.term_sent_at is not None and time.monotonic() - r.term_sent_at > self.cancel_grace_s:
            self.folder(r.job_id).note(f"the job process did not stop within {self.cancel_grace_s:g} s: killing it")
            self._signal(r, signal.SIGKILL)

    def stop_job(self, job_id: str) -> None:
        """Ask a running job's process to stop (SIGTERM now, SIGKILL after the grace period); the next tick settles
        the job. Nothing when it does not run here."""
        with self._lock:
            r = self._procs.get(job_id)
        if r is not None:
            self.folder(job_id).note("cancel requested: stopping the job process")
            self._signal(r, signal.SIGTERM)
        self.wake()

    def _settle(self, r: _Running, rc: Optional[int]) -> None:
        with self._lock:
            self._procs.pop(r.job_id, None)
        self.settler.settle(r.job_id, rc, r.progress, interrupted=r.interrupt)
