"""The process of one fine-tuning job.

Started by :class:`acecal.api.jobs.JobRunner`, either forked from a fork server that has torch and MONAI imported
(:func:`child_main`, the default: a job starts in about a second) or as ``python -m acecal.api.jobproc
<job_dir>/spec.json`` (``ACECAL_JOB_START_METHOD=subprocess``; also how to run a job by hand). Either way it runs in
its own session (process group) with a low CPU priority and thread count, stdout/stderr appended to
``<job_dir>/job.log``. It runs :class:`acecal.training.engine.Engine` (resuming from
the last checkpoint in its work directory when there is one) and talks to the server through files only:

- ``train.jsonl``: the engine's JSON-lines log (one record per epoch; the server tails it);
- ``progress.json``: the current step within the epoch (overwritten at most twice a second);
- ``result.json``: written atomically at the end: ``{"status": "published" | "cancelled" | "error", ...}``.

Stopping: SIGTERM (or SIGINT) sets the engine's cancel token, so training stops within one step, keeps the last
finished epoch's checkpoint and publishes nothing (publishing itself is an atomic rename). A watchdog thread exits
the process hard if a cancel has not finished within the grace period (e.g. while caching a large dataset), and
cancels the run when the server that started it has died (its pid and start time are in the spec), so an orphan
never trains on or publishes behind the back of a restarted server.

Exit status: 0 published, 3 cancelled, 2 refused/failed with a message in ``result.json``, 28 disk full (even when
``result.json`` could not be written), 1 unexpected error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

EXIT_PUBLISHED, EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED, EXIT_DISK_FULL = 0, 1, 2, 3, 28
RESULT = "result.json"
PROGRESS = "progress.json"


def json_finite(obj):
    """``obj`` with every NaN/infinite float replaced by None: what the server stores is always valid JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def dumps_finite(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`json_finite` (``allow_nan=False``: a non-finite number can never be written)."""
    return json.dumps(json_finite(obj), allow_nan=False, **kwargs)


def _write_json(path: Path, obj: dict, *, durable: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dumps_finite(obj))
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    try:
        print(f"{stamp} {text}", flush=True)
    except OSError:  # a full disk must not turn a clean failure into a crash
        pass


def _n(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def disk_full(e: BaseException, *paths: Path) -> bool:
    """Whether ``e`` is (most likely) a full disk: ENOSPC/EDQUOT, or a failed write with (almost) no space left."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(e).lower()
    if "no space left" in text or "disk quota" in text:
        return True
    # torch.save reports a short write as e.g. "[enforce fail at inline_container.cc] . unexpected pos 62848 vs 62736"
    writing = isinstance(e, OSError) or any(s in text for s in ("write", "unexpected pos", "inline_container"))
    return nearly_full(*paths, limit=(16 if writing else 1) * 1024 * 1024)


def nearly_full(*paths: Path, limit: int = 1 << 20) -> bool:
    """Whether any of ``paths`` (that exists) has less than ``limit`` bytes free."""
    for p in paths:
        try:
            if shutil.disk_usage(p).free < limit:
                return True
        except OSError:
            continue
    return False


class _Progress:
    """The engine's progress hook: human lines to stdout (job.log) and the current step to progress.json."""

    def __init__(self, job_dir: Path, epochs: int):
        self.path = job_dir / PROGRESS
        self.epochs = epochs
        self.last_write = 0.0
        self.state = {"epoch": 0, "epochs": epochs, "step": None, "steps": None}

    def _flush(self, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last_write < 0.5:
            return
        self.last_write = t
        try:
            _write_json(self.path, self.state, durable=False)
        except OSError:
            pass

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "step":
            self.state.update(step=ev.get("step"), steps=ev.get("steps"))
            self._flush()
        elif kind == "start":
            self.state.update(epoch=ev.get("start_epoch", 0), epochs=ev.get("epochs", self.epochs), step=0)
            how = f"resuming after epoch {ev.get('start_epoch')}" if ev.get("resumed") else "starting"
            _say(f"{how}: {ev.get('train_cases')} training case(s), {ev.get('val_cases')} validation case(s), "
                 f"{ev.get('epochs')} epoch(s)")
            self._flush(force=True)
        elif kind == "epoch":
            self.state.update(epoch=ev.get("epoch"), step=0)
            self._flush(force=True)
            v = ev.get("val") or {}
            val = (f"  val dice {_n(v.get('dice'))} ace {_n(v.get('ace'))} ece {_n(v.get('ece'))} "
                   f"mce {_n(v.get('mce'))}") if v else ""
            _say(f"epoch {ev.get('epoch')}/{ev.get('epochs')}  loss {_n(ev.get('train_loss'))}{val}  "
                 f"({ev.get('seconds', 0):.1f} s)")
        elif kind == "published":
            m = ev.get("metrics") or {}
            _say(f"published model {ev.get('model_id')} (validation dice {_n(m.get('dice'))}, ace {_n(m.get('ace'))})")
        elif kind == "stopped":
            _say(f"stopped after epoch {ev.get('epoch')} ({ev.get('reason')})")


def _server_alive(pid: int, started: float | None) -> bool:
    """Whether the server process that started this job still runs (pid + creation time: a reused pid is not it)."""
    if not pid:
        return True
    try:
        import psutil

        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (started is None or abs(p.create_time() - started) < 0.5)
    except ImportError:  # pragma: no cover - psutil is a server dependency
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied...
        return False


def _watchdog(cancel: threading.Event, server_pid: int, server_started: float | None, grace_s: float) -> None:
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


def run(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    job_dir = spec_path.parent
    cancel = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        if not cancel.is_set():
            _say(f"received {signal.Signals(signum).name}: stopping after the current step")
        cancel.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_watchdog, args=(cancel, int(spec.get("server_pid") or 0), spec.get("server_started"),
                                             float(spec.get("cancel_grace_s", 10.0))),
                     name="acecal-job-watchdog", daemon=True).start()
    if spec.get("nice"):
        try:
            os.nice(int(spec["nice"]))
        except OSError:
            pass
    result: dict = {"status": "error", "error": "the job did not finish"}
    code = EXIT_ERROR
    cfg_dict = dict(spec["config"])
    out_dir = Path(cfg_dict.get("out_dir") or job_dir)
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        from acecal.training.config import TrainConfig
        from acecal.training.engine import Engine

        cfg = TrainConfig.model_validate(cfg_dict)
        frac = spec.get("gpu_memory_fraction")
        if frac and torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda"):
            dev = torch.device(cfg.device or "cuda")
            torch.cuda.set_per_process_memory_fraction(float(frac), dev.index or 0)
        res = Engine(cfg, progress=_Progress(job_dir, cfg.epochs), cancel=cancel, show_progress=False).run()
        result = {"status": res.status, "model_id": res.model_id, "epochs_done": res.epochs_done,
                  "bundle_path": str(res.bundle_path) if res.bundle_path else None, "metrics": res.metrics,
                  "seconds": round(res.seconds, 2)}
        code = EXIT_PUBLISHED if res.status == "published" else EXIT_CANCELLED if res.status == "cancelled" \
            else EXIT_FAILED
        if res.status not in ("published", "cancelled"):
            result["error"] = f"training ended without publishing ({res.status})"
    except BaseException as e:  # noqa: BLE001 - every failure becomes a result the server can show
        from acecal.errors import ACECalError

        if disk_full(e, job_dir, out_dir):
            result = {"status": "error", "code": "storage_error",
                      "error": f"the disk is full (writing checkpoints, logs or the model failed: {str(e)[:200]}); "
                               "free space in the server's data directory and submit the job again"}
            code = EXIT_DISK_FULL
        elif isinstance(e, ACECalError):
            result = {"status": "error", "code": e.code, "error": e.detail}
            code = EXIT_FAILED
        elif isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            result = {"status": "error", "code": "out_of_memory",
                      "error": "out of memory: use a smaller batch_size, num_samples or patch_size"}
            code = EXIT_FAILED
        else:
            traceback.print_exc()
            result = {"status": "error", "code": "internal_error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
            code = EXIT_ERROR
        _say(f"failed: {result['error']}")
    try:
        _write_json(job_dir / RESULT, result, durable=True)
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
        from multiprocessing import forkserver

        fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
        if fd is not None:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m acecal.api.jobproc <job_dir>/spec.json", file=sys.stderr)
        return 64
    _exit(run(Path(args[0])))
    return EXIT_ERROR  # not reached


if __name__ == "__main__":
    main()
