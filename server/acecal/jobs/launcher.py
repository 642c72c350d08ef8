"""Starting job processes: forked from a fork server with torch loaded, or as a fresh Python subprocess.

- ``forkserver`` (the default): ``multiprocessing``'s fork server imports :data:`FORKSERVER_PRELOAD` once (torch,
  MONAI, the engine), and every job process forks from it and runs :func:`acecal.jobs.worker.child_main`: a job
  starts in about a second.
- ``subprocess``: ``python -m acecal.jobs.worker <job_dir>/spec.json`` with the job's environment (where there is
  no fork server, and how to run a job by hand).

Either way the process leads its own process group (so a signal reaches its data-loader workers too), its output is
appended to the job's log, and it is handed back as a :class:`JobProcess`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Optional, Protocol, Union

import psutil

from acecal.jobs import worker
from acecal.jobs.folder import JobFolder

__all__ = [
    "FORKSERVER_PRELOAD",
    "JobProcess",
    "available_method",
    "kill_process_group",
    "process_started",
    "signal_group",
    "start_job_process",
]

#: imported once by the fork server, so that every job process starts with them loaded
FORKSERVER_PRELOAD = [
    "acecal.jobs.worker",
    "acecal.training.engine",
    "acecal.training.validation",
    "acecal.training.publish",
    "acecal.losses.registry",
    "monai.data",
    "monai.transforms",
    "safetensors.torch",
]
_preload_lock = threading.Lock()
_preload_set = False


class JobProcess(Protocol):
    """What the scheduler needs of a running job process (the part of ``subprocess.Popen`` it uses)."""

    pid: int

    def poll(self) -> Optional[int]: ...

    @property
    def returncode(self) -> Optional[int]: ...

    def wait(self, timeout: Optional[float] = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class _ForkedProcess:
    """A ``multiprocessing`` process with the :class:`JobProcess` interface."""

    def __init__(self, p: BaseProcess):
        self._p = p
        self.pid = int(p.pid or 0)

    def poll(self) -> Optional[int]:
        return self._p.exitcode

    @property
    def returncode(self) -> Optional[int]:
        return self._p.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired("job process", timeout or 0.0)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def available_method(method: str) -> str:
    """``method``, or ``subprocess`` where this platform has no fork server."""
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "subprocess"
    return method


def process_started(pid: int) -> Optional[float]:
    """The creation time of process ``pid`` (with the pid it identifies a process: pids are reused), None if gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _start_forked(folder: JobFolder) -> _ForkedProcess:
    global _preload_set
    ctx = multiprocessing.get_context("forkserver")
    with _preload_lock:
        if not _preload_set:  # only has an effect before the fork server starts (the first job)
            ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
            _preload_set = True
    p = ctx.Process(target=worker.child_main, args=(str(folder.spec), str(folder.log)), name=f"acecal-{folder.job_id}")
    p.start()
    return _ForkedProcess(p)


def _start_subprocess(folder: JobFolder, *, threads: int, data_dir: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        ACECAL_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
    )
    pkg_root = str(Path(__file__).resolve().parents[2])  # the folder holding the acecal package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    with open(folder.log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "acecal.jobs.worker", str(folder.spec)],
            cwd=str(folder.path),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def start_job_process(method: str, folder: JobFolder, *, threads: int, data_dir: Path) -> JobProcess:
    """Start the job process for ``folder`` (its ``spec.json`` written) by ``method``: ``forkserver`` or
    ``subprocess``."""
    proc: Union[_ForkedProcess, subprocess.Popen]
    if method == "forkserver":
        proc = _start_forked(folder)
    else:
        proc = _start_subprocess(folder, threads=threads, data_dir=data_dir)
    return proc


def signal_group(proc: JobProcess, sig: int) -> None:
    """Send ``sig`` to the job process's whole group (its loader workers too); to the process alone if that fails.
    Nothing when it has ended."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(OSError):
            proc.send_signal(sig)


def kill_process_group(pid: int, created: Optional[float]) -> bool:
    """SIGKILL the process ``pid`` and its group if it is still the one created at ``created`` (a reused pid is left
    alone); returns whether one was killed."""
    try:
        p = psutil.Process(int(pid))
        if created is None or abs(p.create_time() - float(created)) > 0.5:
            return False
        with contextlib.suppress(OSError):
            os.killpg(int(pid), signal.SIGKILL)
        p.kill()
        p.wait(timeout=10)
        return True
    except psutil.Error:  # gone already, or not ours
        return False
