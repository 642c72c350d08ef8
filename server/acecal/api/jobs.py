"""Fine-tuning jobs: a bounded queue in the database, one job process per device slot, crash-safe bookkeeping.

- ``POST /finetune`` checks everything it can at once (dataset, base model, label values, case count, epochs, loss
  parameters, the new model id) and inserts a ``queued`` row; more than ``job_queue_size`` queued jobs get 503.
- A scheduler thread starts the oldest queued job whenever fewer than ``job_slots`` run (one per device by default):
  ``python -m acecal.api.jobproc <job_dir>/spec.json`` in its own process group, low CPU priority and
  ``job_threads`` torch threads, so inference keeps serving. It tails the job's JSON-lines log into the row
  (progress, per-epoch losses and validation metrics) and reads ``result.json`` when the process ends.
- Cancel (``DELETE /jobs/{id}``): a queued job is cancelled at once; a running one gets SIGTERM (the engine stops
  within one step and publishes nothing), SIGKILL to the whole group after ``cancel_grace_s``.
- The engine publishes the bundle into ``<data_dir>/models`` by an atomic rename; the registry rescans that folder,
  so ``/models`` lists the new model at once.
- One server owns a data directory's jobs (an ``flock`` on ``<data_dir>/jobs/owner.lock``, released by the kernel
  however the server dies). At start the owner recovers: a job left ``running`` by a dead server is settled from
  what is on disk: its ``result.json``, or its published bundle; otherwise it is queued again and resumes from its
  last checkpoint (``job_resume``, at most :data:`MAX_ATTEMPTS` starts), or marked failed. Never left running.
  A leftover job process of the dead server is killed first (it also stops by itself when it sees its parent die).
- A full disk fails the job (with that message); the server keeps running. Before a job starts, at least
  ``job_min_free_mb`` must be free in the data directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from acecal.api import jobproc
from acecal.api.datastore import DatasetStore, new_id, unknown_labels
from acecal.api.jobproc import dumps_finite
from acecal.api.state import ACTIVE_STATUSES, FINAL_STATUSES, StateDB, atomic_write_text, now_iso
from acecal.errors import ACECalError, ConflictError, InvalidInputError, NotFoundError, ServerBusyError

log = logging.getLogger("acecal.api.jobs")

JOBS_DIR = "jobs"
LOCK_NAME = "owner.lock"
SPEC, DATASET_JSON, JOB_LOG, TRAIN_LOG = "spec.json", "dataset.json", "job.log", "train.jsonl"
#: how many times a job process is started before an interrupted job is given up (1 run + 2 resumes)
MAX_ATTEMPTS = 3
LOG_TAIL_LINES = 20
#: at least this many cases: one to train on, one held out for validation
MIN_CASES = 2


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"unknown job {job_id!r}; list them with GET /jobs (or `acecal jobs`)", code="job_not_found")


def default_job_threads() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, max_bytes: int = 32768) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return [ln[:500] for ln in lines if ln.strip()][-n:]


def epoch_entry(rec: dict) -> dict:
    v = rec.get("val") or {}
    return {"epoch": int(rec.get("epoch", 0)), "train_loss": rec.get("train_loss"), "lr": rec.get("lr"),
            "seconds": rec.get("seconds"), "dice": v.get("dice"), "ace": v.get("ace"), "ece": v.get("ece"),
            "mce": v.get("mce")}


@dataclass
class _Running:
    job_id: str
    proc: Optional[subprocess.Popen] = None
    offset: int = 0
    metrics: list = field(default_factory=list)
    epoch: int = 0
    step: Optional[int] = None
    steps: Optional[int] = None
    term_sent_at: Optional[float] = None
    interrupt: bool = False  # stopped by the server shutting down (not by the user): resume later


class JobRunner:
    TICK_S = 0.5

    def __init__(self, settings, registry, db: StateDB, datasets: DatasetStore):
        self.settings = settings
        self.registry = registry
        self.db = db
        self.datasets = datasets
        self.data_dir = Path(settings.data_dir)
        self.jobs_dir = self.data_dir / JOBS_DIR
        self.models_dir = Path(settings.user_models_dir)
        self.slots = int(getattr(settings, "job_slots", 1))
        self.queue_size = int(getattr(settings, "job_queue_size", 16))
        self.threads = getattr(settings, "job_threads", None) or default_job_threads()
        self.max_epochs = int(getattr(settings, "job_max_epochs", 1000))
        self.resume = bool(getattr(settings, "job_resume", True))
        self.min_free_mb = float(getattr(settings, "job_min_free_mb", 200.0))
        self.cancel_grace_s = float(getattr(settings, "job_cancel_grace_s", 10.0))
        method = getattr(settings, "job_start_method", "forkserver")
        if method == "forkserver" and "forkserver" not in _mp_methods():
            method = "subprocess"
        self.start_method = method
        self._procs: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock_fh = None
        self.owner = False

    # --- life cycle ----------------------------------------------------------------------------------------------
    def _acquire(self) -> bool:
        import fcntl

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
        self.recover()
        self.datasets.reconcile()

    def start(self) -> None:
        if self._acquire():
            self._become_owner()
        else:
            log.warning("another ACECal server owns the jobs of %s: this one queues jobs but does not run them "
                        "(it takes over when that server stops)", self.data_dir)
        self._thread = threading.Thread(target=self._loop, name="acecal-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler; running jobs are stopped and queued again to resume at the next start."""
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
                self._finalize(r, r.proc.returncode if r.proc else None)
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
        self._wake.set()

    # --- the scheduler -------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        with self._lock:
            running = list(self._procs.values())
        for r in running:
            rc = r.proc.poll() if r.proc else -1
            self._follow(r)
            if rc is None:
                self._check_cancel(r)
            else:
                self._finalize(r, rc)
        while len(self._procs) < self.slots and not self._stop.is_set():
            nxt = self.db.one("SELECT id FROM jobs WHERE status = 'queued' ORDER BY rowid LIMIT 1")
            if nxt is None:
                break
            self._launch(nxt["id"])

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _log(self, job_id: str, text: str) -> None:
        """A line from the server into the job's log (best effort: a full disk must not stop anything)."""
        try:
            with open(self.job_dir(job_id) / JOB_LOG, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} [server] {text}\n")
        except OSError:
            pass

    def _launch(self, job_id: str) -> None:
        job = self.db.get_job(job_id)
        if job is None or job["status"] != "queued":
            return
        d = self.job_dir(job_id)
        try:
            d.mkdir(parents=True, exist_ok=True)
            free_mb = shutil.disk_usage(self.data_dir).free / 2**20
            if free_mb < self.min_free_mb:
                raise _JobRefused(f"not enough free disk space to start: {free_mb:.0f} MB free in the data directory, "
                                  f"a job needs at least {self.min_free_mb:g} MB (ACECAL_JOB_MIN_FREE_MB); free "
                                  "space and submit the job again")
            for stale in ("result.json", "progress.json"):
                (d / stale).unlink(missing_ok=True)
            self._write_dataset_json(job)
            spec = {"job_id": job_id, "config": job["config"], "threads": self.threads, "nice": 10,
                    "server_pid": os.getpid(), "server_started": _process_started(os.getpid()),
                    "cancel_grace_s": max(1.0, self.cancel_grace_s - 2.0),
                    "gpu_memory_fraction": getattr(self.settings, "job_gpu_memory_fraction", None)}
            atomic_write_text(d / SPEC, dumps_finite(spec, indent=2))
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                       ACECAL_DATA_DIR=str(self.data_dir), PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
            pkg_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
            attempt = int(job["attempts"]) + 1
            method = self.start_method
            # running from now on (the first fork-server start takes a while: torch is being imported)
            fields: dict[str, Any] = {"status": "running", "pid": None, "attempts": attempt, "step": None,
                                      "steps": None, **({} if job.get("started") else {"started": now_iso()})}
            if not self.db.update_job(job_id, only_if_status=("queued",), **fields):
                return  # cancelled meanwhile
            self._log(job_id, f"starting the job process (attempt {attempt}, {self.threads} CPU thread(s), "
                              f"{method})")
            if method == "forkserver":
                proc = _start_forked(d / SPEC, d / JOB_LOG, job_id)
            else:
                with open(d / JOB_LOG, "ab") as out:
                    proc = subprocess.Popen([sys.executable, "-m", "acecal.api.jobproc", str(d / SPEC)], cwd=str(d),
                                            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, close_fds=True)
        except _JobRefused as e:
            self._set_final(job_id, "failed", error=str(e))
            return
        except ACECalError as e:  # e.g. a case deleted from under a queued job
            self._set_final(job_id, "failed", error=f"could not start: {e.detail}")
            return
        except Exception as e:  # noqa: BLE001 - e.g. disk full writing the spec: the job fails, not the server
            from acecal.api.state import is_disk_error

            msg = (f"the disk is full: {e}; free space in the data directory and submit the job again"
                   if is_disk_error(e) else f"could not start the job process: {type(e).__name__}: {e}")
            log.warning("job %s: %s", job_id, msg)
            self._set_final(job_id, "failed", error=msg)
            return
        r = _Running(job_id, proc)
        with self._lock:
            self._procs[job_id] = r
        self.db.update_job(job_id, pid=proc.pid, pid_started=_process_started(proc.pid))
        log.info("job %s started (pid %d, attempt %d)", job_id, proc.pid, attempt)
        self._check_cancel(r)  # a cancel that came while the process was starting

    def _write_dataset_json(self, job: dict) -> None:
        req = job["request"]
        files = self.datasets.case_files(job["dataset_id"], req.get("cases"))
        ds = self.db.get_dataset(job["dataset_id"]) or {"name": job["dataset_id"]}
        base_labels = req.get("labels") or {}
        doc = {"name": f"{ds['name']} ({job['dataset_id']})", "description": "cases uploaded to the ACECal server",
               "licence": "local data", "labels": base_labels,
               "training": [{"image": str(img), "label": str(lab)} for _, img, lab in files]}
        atomic_write_text(self.job_dir(job["id"]) / DATASET_JSON, dumps_finite(doc, indent=1))

    def _signal(self, r: _Running, sig: int) -> None:
        if r.proc is None or r.proc.poll() is not None:
            return
        try:
            os.killpg(r.proc.pid, sig)  # the whole group: loader workers too
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(OSError):
                r.proc.send_signal(sig)
        if sig == signal.SIGTERM and r.term_sent_at is None:
            r.term_sent_at = time.monotonic()

    def _check_cancel(self, r: _Running) -> None:
        job = self.db.get_job(r.job_id)
        if job is not None and job["cancel_requested"] and r.term_sent_at is None:
            self._log(r.job_id, "cancel requested: stopping the job process")
            self._signal(r, signal.SIGTERM)
        if r.term_sent_at is not None and time.monotonic() - r.term_sent_at > self.cancel_grace_s:
            self._log(r.job_id, f"the job process did not stop within {self.cancel_grace_s:g} s: killing it")
            self._signal(r, signal.SIGKILL)

    # --- following a job -----------------------------------------------------------------------------------------
    def _follow(self, r: _Running) -> None:
        """Read new records of the job's JSON-lines log and its step counter into the row."""
        d = self.job_dir(r.job_id)
        changed = False
        try:
            with open(d / TRAIN_LOG, "rb") as fh:
                fh.seek(r.offset)
                data = fh.read()
        except OSError:
            data = b""
        end = data.rfind(b"\n")
        if end >= 0:
            r.offset += end + 1
            for line in data[: end + 1].decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                ev = rec.get("event")
                if ev == "start":
                    r.epoch = int(rec.get("start_epoch") or 0)
                    r.metrics = [m for m in r.metrics if m["epoch"] <= r.epoch]
                    changed = True
                elif ev == "epoch":
                    e = epoch_entry(rec)
                    r.metrics = [m for m in r.metrics if m["epoch"] < e["epoch"]] + [e]
                    r.epoch = e["epoch"]
                    r.step = 0
                    changed = True
        try:
            p = json.loads((d / "progress.json").read_text())
            step, steps = p.get("step"), p.get("steps")
            if int(p.get("epoch") or 0) == r.epoch and (step, steps) != (r.step, r.steps):
                r.step, r.steps = step, steps
                changed = True
        except (OSError, ValueError, TypeError):
            pass
        if changed:
            self.db.update_job(r.job_id, epoch=r.epoch, metrics=r.metrics, step=r.step, steps=r.steps)

    # --- settling a finished (or dead) job process ---------------------------------------------------------------
    def _read_result(self, job_id: str) -> Optional[dict]:
        try:
            res = json.loads((self.job_dir(job_id) / "result.json").read_text())
            return res if isinstance(res, dict) else None
        except (OSError, ValueError):
            return None

    def _cleanup_partial_bundle(self, model_id: Optional[str]) -> None:
        if not model_id or not self.models_dir.is_dir():
            return
        for p in self.models_dir.glob(f".{model_id}.*"):  # write_bundle's temporary folder
            shutil.rmtree(p, ignore_errors=True)

    def _published_bundle(self, model_id: Optional[str]):
        if not model_id:
            return None
        from acecal.bundles import CONFIG_NAME, Bundle
        from acecal.errors import BundleError

        p = self.models_dir / model_id
        if not (p / CONFIG_NAME).is_file():
            return None
        try:
            return Bundle.load(p)
        except (BundleError, OSError, ValueError):
            return None

    def _set_final(self, job_id: str, status: str, *, error: Optional[str] = None, **fields: Any) -> None:
        self.db.update_job(job_id, status=status, error=error, finished=now_iso(), pid=None, **fields)
        self._log(job_id, f"job {status}" + (f": {error}" if error else ""))
        log.info("job %s %s%s", job_id, status, f": {error}" if error else "")

    def _finalize(self, r: _Running, rc: Optional[int]) -> None:
        with self._lock:
            self._procs.pop(r.job_id, None)
        self._follow(r)
        job = self.db.get_job(r.job_id)
        if job is None or job["status"] in FINAL_STATUSES:
            return
        res = self._read_result(r.job_id)
        model_id = job["model_id"]
        self._cleanup_partial_bundle(model_id)
        bundle = self._published_bundle(model_id)
        status = (res or {}).get("status")
        if bundle is not None:
            # published (also when the server died between the rename and result.json, or a cancel came too late)
            history = (bundle.config.training or {}).get("history") or []
            metrics = [epoch_entry(h) for h in history] or r.metrics
            m = dict(bundle.config.metrics or {})
            m.pop("top_label_bins", None)
            self.db.update_job(job["id"], status="succeeded", published=1, finished=now_iso(), pid=None,
                               epoch=max(len(history), r.epoch), metrics=metrics, error=None, step=None, steps=None,
                               final_metrics=m)
            try:
                self.db.add_model(model_id, str(bundle.path.relative_to(self.data_dir)), job_id=job["id"],
                                  parent=job["base_model"], dataset_id=job["dataset_id"])
            except Exception:  # pragma: no cover - the index is a convenience; the folder is the registry
                log.exception("could not index model %s", model_id)
            self._log(job["id"], f"job succeeded: published model {model_id}")
            log.info("job %s succeeded: model %s", job["id"], model_id)
            return
        if job["cancel_requested"]:
            self._set_final(job["id"], "cancelled", error=f"cancelled on request after epoch {r.epoch} of "
                                                         f"{job['epochs']}; nothing was published", step=None)
            return
        if r.interrupt or status == "cancelled" or (res is None and rc is None):
            self._requeue_or_fail(job, r, "the server stopped while the job was running")
            return
        if status == "error":
            self._set_final(job["id"], "failed", error=res.get("error") or "the job failed")
            return
        if rc == 28 or (res is None and jobproc.nearly_full(self.job_dir(job["id"]), self.models_dir)):
            err = "the disk is full: free space in the server's data directory and submit the job again"
        elif rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            err = (f"the job process was killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else ""))
        else:
            err = f"the job process ended unexpectedly (exit status {rc})"
        tail = tail_lines(self.job_dir(job["id"]) / JOB_LOG, 3)
        if tail:
            err += "; last log lines: " + " | ".join(tail)
        self._set_final(job["id"], "failed", error=err)

    def _requeue_or_fail(self, job: dict, r: _Running, reason: str) -> None:
        epoch = max(r.epoch, int(job.get("epoch") or 0))
        if self.resume and int(job["attempts"]) < MAX_ATTEMPTS:
            self.db.update_job(job["id"], status="queued", pid=None, step=None, steps=None, epoch=epoch,
                               metrics=r.metrics or job["metrics"])
            self._log(job["id"], f"{reason} (after epoch {epoch}); queued again: it resumes from its last "
                                 "checkpoint")
            log.info("job %s re-queued to resume after epoch %d", job["id"], epoch)
        else:
            why = "job_resume is off" if not self.resume else f"it was already started {job['attempts']} times"
            self._set_final(job["id"], "failed", error=f"{reason} (after epoch {epoch} of {job['epochs']}); not "
                                                       f"resumed: {why}. Submit it again.")

    def recover(self) -> None:
        """Settle the jobs a dead server left ``running`` (called once the data directory is ours)."""
        for job in self.db.jobs_with_status("running"):
            self._kill_leftover(job)
            r = _Running(job["id"])
            self._finalize(r, None)
        for job in self.db.jobs_with_status("queued"):
            if job["cancel_requested"]:
                self._set_final(job["id"], "cancelled", error="cancelled before it started")

    def _kill_leftover(self, job: dict) -> None:
        pid = job.get("pid")
        if not pid:
            return
        try:
            import psutil

            p = psutil.Process(int(pid))
            started = job.get("pid_started")
            if started is None or abs(p.create_time() - float(started)) > 0.5:
                return  # the pid was reused by another process
            log.warning("killing the leftover process %d of job %s", pid, job["id"])
            with contextlib.suppress(OSError):
                os.killpg(int(pid), signal.SIGKILL)
            p.kill()
            p.wait(timeout=10)
        except Exception:  # noqa: BLE001 - gone already, or not ours
            pass

    # --- the API's operations ------------------------------------------------------------------------------------
    def submit(self, req) -> dict:
        """Validate a :class:`~acecal.api.finetune_schemas.FinetuneRequest` and queue the job."""
        from acecal.training.finetune import finetune_config

        ds = self.datasets.get(req.dataset)
        base = self.registry.get(req.base_model)
        bc = base.config
        if req.epochs > self.max_epochs:
            raise InvalidInputError(f"epochs must be at most {self.max_epochs} on this server (ACECAL_JOB_MAX_EPOCHS)")
        cases = self.db.list_cases(ds["id"])
        if len(cases) < MIN_CASES:
            raise InvalidInputError(
                f"dataset {ds['id']!r} has {len(cases)} case(s); fine-tuning needs at least {MIN_CASES}: one to train "
                "on and one held out for validation. Upload more cases (POST /datasets/{id}/cases)",
                code="dataset_too_small")
        bad_labels = unknown_labels(cases, base)
        if bad_labels is not None:
            raise bad_labels
        if bc.in_channels != 1 and ds.get("model") is None:
            raise InvalidInputError(f"model {bc.id!r} takes {bc.in_channels} channels: create the dataset with "
                                    f"\"model\": \"{bc.id}\" so its cases are checked for that on upload")
        ids = [c["id"] for c in cases]
        if req.val_cases is not None:
            unknown = [v for v in req.val_cases if v not in ids]
            if unknown:
                raise InvalidInputError(f"val_cases not in dataset {ds['id']!r}: {', '.join(unknown[:20])}")
            if not req.val_cases or len(set(req.val_cases)) >= len(ids):
                raise InvalidInputError("val_cases must hold at least one case and leave at least one to train on")
        if req.loss_params:
            from acecal.training.engine import build_loss

            build_loss(req.loss, bc.num_classes, dict(req.loss_params))  # InvalidInputError (422) when bad
        job_id = new_id("job")
        model_id = req.model_id or f"{bc.id[:40].rstrip('-._')}-ft-{job_id[4:12]}"
        if model_id in self.registry.ids() or (self.models_dir / model_id).exists() \
                or self.db.model_id_reserved(model_id):
            raise ConflictError(f"a model with id {model_id!r} exists or is being trained; choose another model_id",
                                code="model_exists")
        queued = self.db.count_jobs("queued")
        if queued >= self.queue_size:
            raise ServerBusyError(f"the fine-tuning queue is full ({queued} job(s) waiting, at most "
                                  f"{self.queue_size}); retry later or cancel a job", retry_after=60.0)
        d = self.job_dir(job_id)
        settings: dict[str, Any] = {
            "data": str(d / DATASET_JSON), "loss": req.loss, "loss_params": dict(req.loss_params),
            "epochs": req.epochs, "lr": req.lr, "val_fraction": req.val_fraction, "val_cases": req.val_cases,
            "val_every": req.val_every or max(1, round(req.epochs / 20)), "batch_size": req.batch_size,
            "num_samples": req.num_samples, "patch_size": tuple(req.patch_size) if req.patch_size else None,
            "fit_temperature": req.fit_temperature, "seed": req.seed, "model_id": model_id,
            "out_dir": str(self.models_dir), "work_dir": str(d / "work"), "log_file": str(d / TRAIN_LOG),
            "resume": True, "num_threads": self.threads, "num_workers": 0,
            "device": None if self.settings.device in ("auto", "", None) else self.settings.device,
            "data_source": f"dataset '{ds['name']}' ({ds['id']}) uploaded to an ACECal server",
            "data_licence": "local data (not redistributed)",
            "command": f"POST /finetune (job {job_id})",
            "description": req.description or f"{bc.id} fine-tuned on dataset '{ds['name']}'",
        }
        try:
            cfg = finetune_config(str(base.path), freeze_encoder=req.freeze_encoder, **settings)
        except ValueError as e:  # pydantic: a setting the engine refuses
            raise InvalidInputError(f"invalid fine-tuning settings: {e}") from None
        request = {**req.model_dump(mode="json"), "lr": cfg.lr, "val_every": cfg.val_every,
                   "batch_size": cfg.batch_size, "num_samples": cfg.num_samples, "seed": cfg.seed,
                   "model_id": model_id, "cases": ids, "labels": dict(bc.labels)}
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from acecal.api.state import storage_error

            raise storage_error(e, "the job folder") from None
        job = self.db.add_job({"id": job_id, "status": "queued", "request": request,
                               "config": cfg.model_dump(mode="json"), "base_model": bc.id, "dataset_id": ds["id"],
                               "model_id": model_id, "epochs": req.epochs})
        self._log(job_id, f"queued: fine-tune {bc.id} on dataset {ds['id']} ({len(ids)} cases), loss {req.loss}, "
                          f"{req.epochs} epoch(s) -> model {model_id}")
        self.wake()
        return job

    def get(self, job_id: str) -> dict:
        job = self.db.get_job(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if job is None:
            raise job_not_found(job_id)
        return job

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] == "queued" and self.db.update_job(
                job_id, only_if_status=("queued",), status="cancelled", cancel_requested=1, finished=now_iso(),
                error="cancelled before it started"):
            self._log(job_id, "cancelled before it started")
            return self.get(job_id)
        if job["status"] in ACTIVE_STATUSES:
            self.db.update_job(job_id, only_if_status=ACTIVE_STATUSES, cancel_requested=1)
            with self._lock:
                r = self._procs.get(job_id)
            if r is not None:
                self._log(job_id, "cancel requested: stopping the job process")
                self._signal(r, signal.SIGTERM)
            self.wake()
        return self.get(job_id)

    def queue_positions(self) -> dict[str, int]:
        rows = self.db.query("SELECT id FROM jobs WHERE status = 'queued' ORDER BY rowid")
        return {r["id"]: i + 1 for i, r in enumerate(rows)}

    def view(self, job: dict, positions: Optional[dict[str, int]] = None) -> dict:
        """The API's description of a job (:class:`~acecal.api.finetune_schemas.JobInfo`)."""
        req = job.get("request") or {}
        epochs = int(job["epochs"])
        epoch = int(job.get("epoch") or 0)
        step, steps = job.get("step"), job.get("steps")
        frac = 1.0 if job["status"] == "succeeded" else \
            min(1.0, (epoch + ((step or 0) / steps if steps else 0.0)) / max(epochs, 1))
        if job["status"] == "queued" and positions is None:
            positions = self.queue_positions()
        public_req = {k: v for k, v in req.items() if k not in ("labels", "cases")}
        public_req["num_cases"] = len(req.get("cases") or [])
        return {
            "id": job["id"], "kind": job.get("kind") or "finetune", "status": job["status"],
            "base_model": job.get("base_model"), "dataset": job.get("dataset_id"), "loss": req.get("loss"),
            "epochs": epochs,
            "progress": {"epoch": epoch, "epochs": epochs, "step": step, "steps": steps, "fraction": round(frac, 4)},
            "metrics": job.get("metrics") or [],
            "final_metrics": job.get("final_metrics") if job["status"] == "succeeded" else None,
            "model_id": job["model_id"] if job["status"] == "succeeded" else None,
            "target_model_id": job.get("model_id"), "error": job.get("error"),
            "log_tail": tail_lines(self.job_dir(job["id"]) / JOB_LOG),
            "queue_position": (positions or {}).get(job["id"]) if job["status"] == "queued" else None,
            "attempts": int(job.get("attempts") or 0), "cancel_requested": bool(job.get("cancel_requested")),
            "pid": job.get("pid") if job["status"] == "running" else None,
            "created": job["created"], "started": job.get("started"), "finished": job.get("finished"),
            "rev": int(job.get("rev") or 0), "request": public_req,
        }

    def stats(self) -> dict:
        return {"running": self.db.count_jobs("running"), "queued": self.db.count_jobs("queued"),
                "slots": self.slots, "queue_size": self.queue_size}


class _JobRefused(Exception):
    pass


# --- starting job processes ----------------------------------------------------------------------------------------
def _mp_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def _process_started(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001
        return None


#: imported once by the fork server, so that every job process starts with them loaded
FORKSERVER_PRELOAD = ["acecal.api.jobproc", "acecal.training.engine", "acecal.training.validation",
                      "acecal.training.publish", "acecal.losses.registry", "monai.data", "monai.transforms",
                      "safetensors.torch"]
_preload_lock = threading.Lock()
_preload_set = False


class _ForkedProc:
    """A ``multiprocessing`` process with the bits of the ``subprocess.Popen`` interface the runner uses."""

    def __init__(self, p):
        self._p = p
        self.pid = p.pid

    def poll(self) -> Optional[int]:
        return self._p.exitcode

    @property
    def returncode(self) -> Optional[int]:
        return self._p.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired("job process", timeout)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def _start_forked(spec: Path, log_file: Path, job_id: str) -> _ForkedProc:
    global _preload_set
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    with _preload_lock:
        if not _preload_set:  # only has an effect before the fork server starts (the first job)
            ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
            _preload_set = True
    p = ctx.Process(target=jobproc.child_main, args=(str(spec), str(log_file)), name=f"acecal-{job_id}")
    p.start()
    return _ForkedProc(p)


# --- wiring into the app -------------------------------------------------------------------------------------------
class FinetuneServices:
    """Everything the dataset, job and evaluation routers share: the database, the dataset store, the job runner."""

    def __init__(self, settings, registry):
        self.settings = settings
        self.registry = registry
        self.db = StateDB(settings.data_dir)
        self.datasets = DatasetStore(settings.data_dir, self.db, registry)
        self.runner = JobRunner(settings, registry, self.db, self.datasets)
        self.evaluations_dir = Path(settings.data_dir) / "evaluations"

    def start(self) -> None:
        self.evaluations_dir.mkdir(parents=True, exist_ok=True)
        for p in self.evaluations_dir.glob(".tmp-*"):  # half-written evaluations of a previous run
            shutil.rmtree(p, ignore_errors=True)
        self.runner.start()

    def stop(self) -> None:
        try:
            self.runner.stop()
        finally:
            self.db.close()


def install(state) -> FinetuneServices:
    """Create the services for ``state`` (an :class:`acecal.api.deps.ServerState`) and keep them in its extras."""
    svc = FinetuneServices(state.settings, state.registry)
    state.extras["finetune"] = svc
    return svc


def services(state) -> FinetuneServices:
    return state.extras["finetune"]
