"""State that survives anything: SIGKILL the server (a real ``acecal serve`` process) while a job trains, restart it
on the same data directory: uploaded cases, finished jobs and their models are all there, and the interrupted job
is not left "running": it resumes from its last checkpoint and finishes. A graceful stop with resuming switched off
marks the job failed instead."""

from __future__ import annotations

from ftutil import pid_gone, wait_for
from live_server import LiveServer, make_settings, start_cli_server, stop_process

from acecal.bundles import Bundle
from acecal.client import ACEClient


def test_sigkill_during_a_job_loses_nothing_and_the_job_resumes(tiny_bundle, cases_dir, tmp_path):
    data = tmp_path / "data"
    args = ["--models", str(tiny_bundle.parent), "--data-dir", str(data), "--device", "cpu", "--log-level", "warning"]
    env = {"ACECAL_JOB_MIN_FREE_MB": "1"}
    proc, url = start_cli_server(args, env=env)
    try:
        c = ACEClient(url, timeout=(5.0, 120.0))
        ds = c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="survives", model="tiny-sphere")
        done = c.wait_job(c.finetune("tiny-sphere", ds["id"], epochs=1)["job_id"], timeout=150)
        assert done["status"] == "succeeded"
        acc = c.finetune("tiny-sphere", ds["id"], epochs=12, val_every=4)
        running = wait_for(
            lambda: (j := c.job(acc["job_id"]))["progress"]["epoch"] >= 2 and j, 150, "two finished epochs"
        )
        assert running["status"] == "running"
        child = running["pid"]
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    # the orphaned job process sees its server gone and stops by itself, publishing nothing
    wait_for(lambda: pid_gone(child), 30, "the orphaned job process to stop")
    assert not (data / "models" / acc["model_id"]).exists()

    proc2, url2 = start_cli_server(args, env=env)
    try:
        c2 = ACEClient(url2, timeout=(5.0, 120.0))
        # everything acknowledged before the crash is there
        again = c2.dataset(ds["id"])
        assert [x["case_id"] for x in again["cases"]] == [x["case_id"] for x in ds["cases"]]
        assert all((data / "datasets" / ds["id"] / "images").glob(f"{x['case_id']}.*") for x in ds["cases"])
        first = c2.job(done["id"])
        assert first["status"] == "succeeded" and first["model_id"] == done["model_id"]
        assert done["model_id"] in [m.id for m in c2.models()]
        # the interrupted job is not stuck: queued again (or already running again) and it finishes
        j = c2.job(acc["job_id"])
        assert j["status"] in ("queued", "running", "succeeded"), j
        assert j["status"] != "running" or j["pid"] != child
        final = c2.wait_job(acc["job_id"], timeout=240)
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        assert [m["epoch"] for m in final["metrics"]] == list(range(1, 13))
        log = (data / "jobs" / acc["job_id"] / "job.log").read_text()
        assert "the server stopped while the job was running" in log and "resuming after epoch" in log, log
        bundle = Bundle.load(data / "models" / final["model_id"])
        assert len(bundle.config.training["history"]) == 12
        assert [x["id"] for x in c2.jobs()] == [acc["job_id"], done["id"]]
    finally:
        stop_process(proc2)


def test_graceful_stop_without_resume_fails_the_job_with_a_reason(tiny_bundle, cases_dir, tmp_path):
    # (and the other way of starting jobs: a fresh `python -m acecal.jobs.worker` process)
    settings = make_settings(
        tmp_path / "data", [tiny_bundle.parent], job_resume=False, job_min_free_mb=1, job_start_method="subprocess"
    )
    with LiveServer(settings) as s, ACEClient(s.url) as c:
        ds = c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="stop")["id"]
        job_id = c.finetune("tiny-sphere", ds, epochs=500, val_every=1000)["job_id"]
        pid = wait_for(lambda: (j := c.job(job_id))["progress"]["epoch"] >= 1 and j["pid"], 150, "an epoch")
    assert pid_gone(pid)  # the server stopped its job process on the way out
    with LiveServer(settings) as s, ACEClient(s.url) as c:
        job = c.job(job_id)
        assert job["status"] == "failed" and "not resumed: job_resume is off" in job["error"], job
        assert c.jobs(status="running") == [] and c.jobs(status="queued") == []


def test_one_server_owns_a_data_directorys_jobs(tiny_bundle, tmp_path):
    """A second server on the same data directory serves (and queues) but runs no jobs until the first one stops."""
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent])
    first = LiveServer(settings).start()
    try:
        with LiveServer(settings) as second:
            assert first.state.scheduler.owner
            assert not second.state.scheduler.owner
            with ACEClient(second.url) as c:  # the second one serves the shared state
                ds = c.create_dataset("shared")["id"]
            with ACEClient(first.url) as c:
                assert c.dataset(ds)["name"] == "shared"
            first.stop()
            wait_for(lambda: second.state.scheduler.owner, 10, "the second server to take over")
    finally:
        first.stop()
