"""acecal.jobs.launcher + acecal.jobs.worker: a real job process, started the way the scheduler starts one, that
cannot run its job says why in result.json and its exit status, and its output goes to the job's log."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from acecal.jobs.folder import EXIT_FAILED, JobFolder
from acecal.jobs.launcher import process_started, signal_group, start_job_process
from acecal.storage.files import atomic_write_json


def test_a_job_whose_data_is_missing_fails_with_its_reason(tmp_path):
    folder = JobFolder(tmp_path / "jobs", "job_0123456789ab")
    folder.path.mkdir(parents=True)
    config = {
        "data": str(folder.dataset_json),
        "epochs": 1,
        "out_dir": str(tmp_path / "models"),
        "work_dir": str(folder.work),
        "model_id": "never-published",
        "num_workers": 0,
    }
    atomic_write_json(
        folder.spec,
        {
            "job_id": folder.job_id,
            "config": config,
            "threads": 1,
            "nice": 0,
            "server_pid": os.getpid(),
            "server_started": process_started(os.getpid()),
            "cancel_grace_s": 5.0,
        },
    )
    proc = start_job_process("subprocess", folder, threads=1, data_dir=tmp_path)
    assert proc.wait(timeout=120) == EXIT_FAILED
    result = json.loads(folder.result.read_text())
    assert result["status"] == "error" and result["code"] != "internal_error", result
    assert "dataset.json" in result["error"], result
    assert "failed:" in folder.log.read_text()
    assert not (tmp_path / "models" / "never-published").exists()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_signal_group_reaches_the_whole_group_and_ignores_an_ended_process(tmp_path):
    child_pid = tmp_path / "child.pid"
    # a process group leader with a child, like a job process with its data-loader workers
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not child_pid.exists() or not child_pid.read_text():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        child = int(child_pid.read_text())
        signal_group(leader, signal.SIGTERM)
        assert leader.wait(timeout=10) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while not _gone(child):  # the child went with it
            assert time.monotonic() < deadline, "the group's child survived"
            time.sleep(0.05)
        signal_group(leader, signal.SIGKILL)  # ended: nothing happens
    finally:
        if leader.poll() is None:
            leader.kill()
