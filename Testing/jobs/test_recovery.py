"""acecal.jobs.recovery and acecal.jobs.folder: how a job is settled from what its process left on disk.

Real files, a real state database and a real published bundle (the tiny trained one); no job process here (the
fine-tuning tests in Testing/finetune run those end to end)."""

import json
import shutil
import signal

import pytest

from acecal.jobs.folder import EXIT_DISK_FULL, JobFolder, TrainProgress
from acecal.jobs.recovery import MAX_ATTEMPTS, JobSettler, post_mortem, recover
from acecal.protocol import JOB_CANCELLED, JOB_FAILED, JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED
from acecal.storage.db import Database, JobRow, new_id, now_iso


@pytest.fixture
def ledger(tmp_path):
    db = Database(tmp_path)
    settler = JobSettler(db, tmp_path / "jobs", tmp_path / "models", tmp_path, resume=True)
    yield db, settler
    db.close()


def _running_job(db: Database, **kw) -> JobRow:
    job = db.add_job(
        JobRow(
            id=new_id("job"),
            status=JOB_RUNNING,
            request={},
            config={},
            epochs=4,
            created=now_iso(),
            model_id="tiny-ft",
            base_model="tiny-sphere",
            dataset_id="ds_x",
            attempts=1,
            **kw,
        )
    )
    JobFolder(db.data_dir / "jobs", job.id).path.mkdir(parents=True)
    return job


def _write_log(folder: JobFolder, records: list[dict], tail: str = "") -> None:
    with open(folder.train_log, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_train_progress_reads_whole_records_and_restarts_after_a_resume(tmp_path):
    folder = JobFolder(tmp_path, "job_a")
    folder.path.mkdir()
    p = TrainProgress()
    assert not p.read(folder)  # nothing yet
    _write_log(
        folder,
        [
            {"event": "start", "start_epoch": 0},
            {"event": "epoch", "epoch": 1, "train_loss": 0.9, "val": {"dice": 0.5}},
            {"event": "epoch", "epoch": 2, "train_loss": 0.8},
        ],
        tail='{"event": "epoch", "ep',
    )
    assert p.read(folder) and p.epoch == 2 and [m["epoch"] for m in p.metrics] == [1, 2]
    assert p.metrics[0]["dice"] == 0.5 and p.metrics[1]["dice"] is None
    folder.progress.write_text(json.dumps({"epoch": 2, "step": 3, "steps": 10}))
    assert p.read(folder) and (p.step, p.steps) == (3, 10)
    assert not p.read(folder)  # the half-written line is not read until it is whole
    with open(folder.train_log, "a") as fh:  # the line completed, then a resumed run after epoch 1
        fh.write('och": 3}\n' + json.dumps({"event": "start", "start_epoch": 1}) + "\n")
    assert p.read(folder) and p.epoch == 1 and [m["epoch"] for m in p.metrics] == [1]


def test_post_mortem_names_signals_and_a_full_disk(tmp_path):
    folder = JobFolder(tmp_path, "job_a")
    folder.path.mkdir()
    folder.note("starting")
    assert post_mortem(-signal.SIGKILL, folder, tmp_path, have_result=True).startswith(
        "the job process was killed by SIGKILL (out of memory?); last log lines: "
    )
    assert post_mortem(-signal.SIGTERM, folder, tmp_path, have_result=True).startswith(
        "the job process was killed by SIGTERM;"
    )
    assert "killed by 200" in post_mortem(-200, folder, tmp_path, have_result=True)  # not a signal this OS names
    assert post_mortem(EXIT_DISK_FULL, folder, tmp_path, have_result=False).startswith("the disk is full")
    assert "ended unexpectedly (exit status 1)" in post_mortem(1, folder, tmp_path, have_result=True)
    assert "[server] starting" in post_mortem(1, folder, tmp_path, have_result=True)


def test_a_published_bundle_makes_the_job_succeed_even_without_a_result(ledger, tiny_bundle):
    db, settler = ledger
    job = _running_job(db)
    shutil.copytree(tiny_bundle, settler.models_dir / "tiny-ft")  # the engine's rename happened; result.json did not
    (settler.models_dir / ".tiny-ft.tmp123").mkdir()  # and a half-written copy of an earlier attempt
    settler.settle(job.id, None, TrainProgress())
    done = db.get_job(job.id)
    assert done.status == JOB_SUCCEEDED and done.published and done.error is None
    assert done.epoch == len(done.metrics) > 0 and done.final_metrics  # from the bundle's training history
    assert db.get_model("tiny-ft").path == "models/tiny-ft"
    assert not (settler.models_dir / ".tiny-ft.tmp123").exists()
    assert "job succeeded: published model tiny-ft" in settler.folder(job.id).log.read_text()


def test_cancelled_interrupted_and_failed_jobs(ledger):
    db, settler = ledger
    cancelled = _running_job(db, cancel_requested=True)
    settler.settle(cancelled.id, 3, TrainProgress())
    assert db.get_job(cancelled.id).status == JOB_CANCELLED

    interrupted = _running_job(db)
    _write_log(settler.folder(interrupted.id), [{"event": "epoch", "epoch": 1}, {"event": "epoch", "epoch": 2}])
    settler.settle(interrupted.id, -15, TrainProgress(), interrupted=True)
    again = db.get_job(interrupted.id)
    assert again.status == JOB_QUEUED and again.epoch == 2 and again.pid is None  # resumes from its checkpoint
    assert "queued again" in settler.folder(interrupted.id).log.read_text()

    worn_out = _running_job(db)
    db.update_job(worn_out.id, attempts=MAX_ATTEMPTS)
    settler.settle(worn_out.id, None, TrainProgress())
    assert f"it was already started {MAX_ATTEMPTS} times" in db.get_job(worn_out.id).error

    refused = _running_job(db)
    settler.folder(refused.id).result.write_text(json.dumps({"status": "error", "error": "no cases"}))
    settler.settle(refused.id, 2, TrainProgress())
    assert (db.get_job(refused.id).status, db.get_job(refused.id).error) == (JOB_FAILED, "no cases")

    killed = _running_job(db)
    settler.settle(killed.id, -signal.SIGKILL, TrainProgress())
    assert "killed by SIGKILL" in db.get_job(killed.id).error

    settler.settle(killed.id, 0, TrainProgress())  # a final job is never settled again
    assert db.get_job(killed.id).status == JOB_FAILED


def test_recover_settles_every_running_job_and_cancels_queued_ones_asked_to(ledger):
    db, settler = ledger
    left_running = _running_job(db, pid=2**22 + 12345, pid_started=1.0)  # a pid no process has: nothing to kill
    asked = db.add_job(
        JobRow(
            id=new_id("job"),
            status=JOB_QUEUED,
            request={},
            config={},
            epochs=1,
            created=now_iso(),
            cancel_requested=True,
        )
    )
    waiting = db.add_job(
        JobRow(id=new_id("job"), status=JOB_QUEUED, request={}, config={}, epochs=1, created=now_iso())
    )
    recover(db, settler)
    assert db.get_job(left_running.id).status == JOB_QUEUED  # queued again to resume
    assert db.get_job(asked.id).status == JOB_CANCELLED
    assert db.get_job(waiting.id).status == JOB_QUEUED
    assert db.jobs_with_status(JOB_RUNNING) == []
