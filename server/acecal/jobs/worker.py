"""The process of one fine-tuning job.

Started by :class:`acecal.jobs.scheduler.JobScheduler` through :mod:`acecal.jobs.launcher`: either forked from a
fork server that has torch and MONAI imported (:func:`child_main`, the default: a job starts in about a second) or
as ``python -m acecal.jobs.worker <job_dir>/spec.json`` (``ACECAL_JOB_START_METHOD=subprocess``; also how to run a
job by hand). Either way it runs in its own session (process group) with a low CPU priority and thread count,
stdout/stderr appended to ``<job_dir>/job.log``. It runs :class:`acecal.training.engine.Engine` (resuming from the
last checkpoint in its work directory when there is one) and talks to the server through the files of its job
folder only (:mod:`acecal.jobs.folder`: ``train.jsonl``, ``progress.json``, ``result.json``).

Stopping: SIGTERM (or SIGINT) sets the engine's cancel token, so training stops within one step, keeps the last
finished epoch's checkpoint and publishes nothing (publishing itself is an atomic rename). A watchdog thread exits
the process hard if a cancel has not finished within the grace period (e.g. while caching a large dataset), and
cancels the run when the server that started it has died (its pid and start time are in the spec), so an orphan
never trains on or publishes behind the back of a restarted server.

Exit status (:mod:`acecal.jobs.folder`): 0 published, 3 cancelled, 2 refused/failed with a message in
``result.json``, 28 disk full (even when ``result.json`` could not be written), 1 unexpected error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import forkserver
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import psutil

from acecal.errors import ACECalError, ProtocolError
from acecal.jobs.folder import (
    EXIT_CANCELLED,
    EXIT_DISK_FULL,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_PUBLISHED,
    JobFolder,
)
from acecal.protocol import EVENT_EPOCH, EVENT_PUBLISHED, EVENT_START, EVENT_STEP, EVENT_STOPPED, JobEvent
from acecal.storage.files import atomic_write_json, disk_full

__all__ = ["child_main", "main", "run"]


def _say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    try:
        print(f"{stamp} {text}", flush=True)
    except OSError:  # a full disk must not turn a clean failure into a crash
        pass


def _n(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


class _Progress:
    """The engine's progress hook: human lines to stdout (job.log) and the current step to progress.json."""

    def __init__(self, folder: JobFolder, epochs: int):
        self.path = folder.progress
        self.epochs = epochs
        self.last_write = 0.0
        self.state: dict[str, Any] = {"epoch": 0, "epochs": epochs, "step": None, "steps": None}

    def _flush(self, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last_write < 0.5:
            return
        self.last_write = t
        try:
            atomic_write_json(self.path, self.state, durable=False)
        except OSError:
            pass

    def __call__(self, raw: dict[str, Any]) -> None:
        try:
            ev = JobEvent.from_json(raw)
        except ProtocolError:  # an event this version does not know how to read: the log has it anyway
            return
        if ev.event == EVENT_STEP:
            self.state.update(step=ev.step, steps=ev.steps)
            self._flush()
        elif ev.event == EVENT_START:
            self.state.update(epoch=ev.start_epoch or 0, epochs=ev.epochs or self.epochs, step=0)
            how = f"resuming after epoch {ev.start_epoch}" if ev.resumed else "starting"
            _say(f"{how}: {ev.train_cases} training case(s), {ev.val_cases} validation case(s), {ev.epochs} epoch(s)")
            self._flush(force=True)
        elif ev.event == EVENT_EPOCH:
            self.state.update(epoch=ev.epoch, step=0)
            self._flush(force=True)
            v = ev.val or {}
            val = (
                (f"  val dice {_n(v.get('dice'))} ace {_n(v.get('ace'))} ece {_n(v.get('ece'))} mce {_n(v.get('mce'))}")
                if v
                else ""
            )
            _say(f"epoch {ev.epoch}/{ev.epochs}  loss {_n(ev.train_loss)}{val}  ({ev.seconds or 0:.1f} s)")
        elif ev.event == EVENT_PUBLISHED:
            m = ev.metrics or {}
            _say(f"published model {ev.model_id} (validation dice {_n(m.get('dice'))}, ace {_n(m.get('ace'))})")
        elif ev.event == EVENT_STOPPED:
            _say(f"stopped after epoch {ev.epoch} ({ev.reason})")


def _server_alive(pid: int, started: Optional[float]) -> bool:
    """Whether the server process that started this job still runs (pid + creation time: a reused pid is not it)."""
    if not pid:
        return True
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (started is None or abs(p.create_time() - started) < 0.5)
    except psutil.Error:  # NoSuchProcess, AccessDenied...
        return False


def _watchdog(cancel: threading.Event, server_pid: int, server_started: Optional[float], grace_s: float) -> None:
    cancelled_at = None
    last_check = 0.0
    while True:
        time.sleep(0.25)
        if not cancel.is_set() and time.monotonic() - last_check >= 0.5:
            last_check = time.monotonic()
            if not _server_alive(server_pid, server_started):
                _say("the server that started this job is gone: stopping (it resumes when the server restarts)")
                cancel.set()
        if cancel.is_set():
            cancelled_at = cancelled_at or time.monotonic()
            if time.monotonic() - cancelled_at > grace_s:
                _say(f"did not stop within {grace_s:g} s of the cancel: exiting now (nothing was published)")
                os._exit(EXIT_CANCELLED)


def _failure(e: BaseException, folder: JobFolder, out_dir: Path) -> tuple[dict[str, Any], int]:
    """The result.json and exit status of a run that raised ``e``."""
    if disk_full(e, folder.path, out_dir):
        return {
            "status": "error",
            "code": "storage_error",
            "error": f"the disk is full (writing checkpoints, logs or the model failed: {str(e)[:200]}); "
            "free space in the server's data directory and submit the job again",
        }, EXIT_DISK_FULL
    if isinstance(e, ACECalError):
        return {"status": "error", "code": e.code, "error": e.detail}, EXIT_FAILED
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return {
            "status": "error",
            "code": "out_of_memory",
            "error": "out of memory: use a smaller batch_size, num_samples or patch_size",
        }, EXIT_FAILED
    traceback.print_exc()
    return {"status": "error", "code": "internal_error", "error": f"{type(e).__name__}: {str(e)[:500]}"}, EXIT_ERROR


def run(spec_path: Path) -> int:
    """Run the job described by ``spec_path``; returns the exit status (result.json written when possible)."""
    spec = json.loads(spec_path.read_text())
    folder = JobFolder(spec_path.parent.parent, spec_path.parent.name)
    cancel = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if not cancel.is_set():
            _say(f"received {signal.Signals(signum).name}: stopping after the current step")
        cancel.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(
        target=_watchdog,
        args=(
            cancel,
            int(spec.get("server_pid") or 0),
            spec.get("server_started"),
            float(spec.get("cancel_grace_s", 10.0)),
        ),
        name="acecal-job-watchdog",
        daemon=True,
    ).start()
    if spec.get("nice"):
        try:
            os.nice(int(spec["nice"]))
        except OSError:
            pass
    result: dict[str, Any] = {"status": "error", "error": "the job did not finish"}
    code = EXIT_ERROR
    cfg_dict = dict(spec["config"])
    out_dir = Path(cfg_dict.get("out_dir") or folder.path)
    try:
        # torch boundary: imported here (after the signal handlers) so a hand-run job answers Ctrl-C at once
        import torch

        from acecal.training.config import TrainConfig
        from acecal.training.engine import Engine

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        cfg = TrainConfig.model_validate(cfg_dict)
        frac = spec.get("gpu_memory_fraction")
        if frac and torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda"):
            dev = torch.device(cfg.device or "cuda")
            torch.cuda.set_per_process_memory_fraction(float(frac), dev.index or 0)
        res = Engine(cfg, progress=_Progress(folder, cfg.epochs), cancel=cancel, show_progress=False).run()
        result = {
            "status": res.status,
            "model_id": res.model_id,
            "epochs_done": res.epochs_done,
            "bundle_path": str(res.bundle_path) if res.bundle_path else None,
            "metrics": res.metrics,
            "seconds": round(res.seconds, 2),
        }
        code = (
            EXIT_PUBLISHED
            if res.status == "published"
            else EXIT_CANCELLED
            if res.status == "cancelled"
            else EXIT_FAILED
        )
        if res.status not in ("published", "cancelled"):
            result["error"] = f"training ended without publishing ({res.status})"
    except BaseException as e:  # noqa: BLE001 - every failure becomes a result the server can show
        result, code = _failure(e, folder, out_dir)
        _say(f"failed: {result['error']}")
    try:
        atomic_write_json(folder.result, result)
    except OSError:
        pass  # the exit status still says what happened
    return code


def _exit(code: int) -> None:
    """Exit without the interpreter's slow teardown of torch and MONAI (everything that matters is on disk)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def child_main(spec_path: str, log_path: str) -> None:
    """Entry point of a job process forked by the server's fork server (``multiprocessing`` "forkserver", with torch
    and MONAI already imported, so a job starts in about a second): own session, output to the job's log."""
    os.setsid()  # own process group: the server signals the whole group; a terminal's Ctrl-C does not reach it
    try:  # the fork server's "alive" pipe: holding it would keep the fork server up after the server dies
        fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
        if fd is not None:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort
        pass
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    code = EXIT_ERROR
    try:
        code = run(Path(spec_path))
    except BaseException:  # noqa: BLE001 - e.g. an unreadable spec: say why in the job's log
        traceback.print_exc()
    finally:
        _exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m acecal.jobs.worker <job_dir>/spec.json", file=sys.stderr)
        return 64
    _exit(run(Path(args[0])))
    return EXIT_ERROR  # not reached


if __name__ == "__main__":
    main()
