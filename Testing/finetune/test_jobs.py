"""Fine-tuning jobs over HTTP against a real server: a real job process trains the tiny model on uploaded cases,
publishes a new bundle that serves inference and evaluation at once; submissions are checked up front; the queue is
bounded; cancel stops the process within seconds and publishes nothing; a full disk fails the job, not the server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk
from ftutil import FINAL, pid_gone, wait_for
from live_server import LiveServer, make_settings

from acecal.client import ACEClient, NotFoundError, ServerBusyError
from acecal.errors import ConflictError, InvalidInputError


def test_finetune_end_to_end(ft_server, client, dataset_id, cases_dir, tmp_path):
    acc = client.finetune("tiny-sphere", dataset_id, loss="hardl1ace_dice_ce", epochs=2, val_every=1)
    job_id, new_id = acc["job_id"], acc["model_id"]
    assert acc["status"] == "queued" and acc["url"] == f"/jobs/{job_id}"
    seen: list[dict] = []
    job = client.wait_job(job_id, timeout=150, poll_s=5, on_update=seen.append)
    assert job["status"] == "succeeded", job
    # followed from queued through running to the end, progress never going backwards
    statuses = [s["status"] for s in seen]
    assert "running" in statuses and statuses[-1] == "succeeded", statuses
    fractions = [s["progress"]["fraction"] for s in seen]
    assert fractions == sorted(fractions) and [s["rev"] for s in seen] == sorted({s["rev"] for s in seen})
    assert job["progress"] == {"epoch": 2, "epochs": 2, "step": None, "steps": None, "fraction": 1.0}
    assert [m["epoch"] for m in job["metrics"]] == [1, 2]
    for m in job["metrics"]:
        assert m["train_loss"] > 0 and 0.0 <= m["dice"] <= 1.0 and 0.0 <= m["ace"] <= 1.0
        assert m["ece"] is not None and m["mce"] is not None
    assert job["model_id"] == new_id and job["error"] is None and job["attempts"] == 1
    assert job["final_metrics"]["dice"] > 0.5 and job["final_metrics"]["num_cases"] == 1  # 1 of 4 held out
    assert any("published model" in line for line in job["log_tail"])

    # /models lists the new model at once; it names its parent; its card tells its story
    models = {m.id: m for m in client.models()}
    assert new_id in models and models[new_id].raw["parent"] == "tiny-sphere"
    assert models[new_id].loss == "hardl1ace_dice_ce"
    card = requests.get(f"{ft_server.url}/models/{new_id}/card", timeout=10).text
    assert "tiny-sphere" in card and dataset_id in card
    bundle_dir = ft_server.settings.user_models_dir / new_id
    assert bundle_dir.is_dir() and not list(bundle_dir.parent.glob(f".{new_id}*"))

    # and it serves inference
    img = sorted((cases_dir / "images").iterdir())[0]
    res = client.infer(img, new_id)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cases_dir / "labels" / img.name)))
    assert res.label_map.shape == truth.shape
    assert 2 * ((res.label_map == 1) & (truth == 1)).sum() / ((res.label_map == 1).sum() + (truth == 1).sum()) > 0.8

    # evaluation on the stored dataset: metrics and GET-able reliability PNGs
    ev = client.evaluate(new_id, dataset_id, out_dir=tmp_path / "ev")
    assert ev["num_cases"] == 4 and ev["model_id"] == new_id and ev["dataset"] == dataset_id
    assert set(ev["aggregate"]) == {"dice", "ace", "ece", "mce"} and ev["aggregate"]["dice"] > 0.8
    assert sorted(c["name"] for c in ev["cases"]) == [f"case_00{i}" for i in range(4)]
    # next to ACE: its floor and the removable part; and whether the served flags find the errors
    assert 0 < ev["floor"]["ace"] and ev["floor"]["removable_ace"] == pytest.approx(
        ev["aggregate"]["ace"] - ev["floor"]["ace"], abs=1e-12
    )
    assert ev["floor"]["micro"]["ace"] > 0 and ev["raw"] is False
    det = ev["error_detection"]
    assert {"auroc", "recall", "flagged_over_wrong", "per_class"} <= set(det) and det["roi_radius_voxels"] == 3
    assert det["wrong_voxels"] > 0 and 0 <= det["recall"] <= 1 and 0.5 < det["auroc"] <= 1
    assert set(det["per_class"]) == {"sphere"}
    assert all({"floor_ace", "auroc", "recall"} <= set(c) for c in ev["cases"])
    urls = [ev["figures"]["dataset_histogram"], *ev["figures"]["cases"].values()]
    assert len(urls) == 5
    for url in urls:
        r = requests.get(ft_server.url + url, timeout=10)
        assert (
            r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        )
    assert len(list((tmp_path / "ev" / "figures").glob("*.png"))) == 5
    again = requests.get(f"{ft_server.url}/evaluations/{ev['evaluation_id']}", timeout=10).json()
    assert again["aggregate"] == ev["aggregate"]
    assert (
        requests.get(f"{ft_server.url}/evaluations/{ev['evaluation_id']}/figures/nope.png", timeout=10).status_code
        == 404
    )
    # the job is in the list; the database indexes the model it published
    listing = client.jobs()
    assert job_id in [j["id"] for j in listing]
    assert ft_server.state.db.get_model(new_id).job_id == job_id


def test_submissions_are_checked_up_front(ft_server, client, dataset_id, tmp_path):
    with pytest.raises(NotFoundError) as e:
        client.finetune("tiny-sphere", "ds_000000000000", epochs=1)
    assert e.value.code == "dataset_not_found"
    with pytest.raises(NotFoundError) as e:
        client.finetune("no-such-model", dataset_id, epochs=1)
    assert e.value.code == "model_not_found"
    # one case is not enough: nothing would be held out for validation
    one = client.create_dataset("one case")["id"]
    from synthetic import make_case, write_case

    write_case(make_case((16, 16, 16), seed=1), tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    client.add_case(one, tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    with pytest.raises(InvalidInputError, match="at least 2"):
        client.finetune("tiny-sphere", one, epochs=1)
    # label values the base model does not know (the dataset declared no model, so they were accepted at upload)
    write_case(make_case((16, 16, 16), num_classes=3, seed=2), tmp_path / "i3.nii.gz", tmp_path / "l3.nii.gz")
    client.add_case(one, tmp_path / "i3.nii.gz", tmp_path / "l3.nii.gz", name="three classes")
    with pytest.raises(InvalidInputError, match=r"three classes .*\[2\]"):
        client.finetune("tiny-sphere", one, epochs=1)
    with pytest.raises(ConflictError, match="tiny-sphere"):
        client.finetune("tiny-sphere", dataset_id, epochs=1, model_id="tiny-sphere")
    with pytest.raises(InvalidInputError, match="loss"):
        client.finetune("tiny-sphere", dataset_id, epochs=1, loss_params={"no_such_parameter": 1.0})
    with pytest.raises(InvalidInputError, match="val_cases"):
        client.finetune("tiny-sphere", dataset_id, epochs=1, val_cases=["c_nope"])
    # schema bounds: no huge jobs from a typo (or a fuzzer)
    for bad in ({"epochs": 0}, {"epochs": 10**6}, {"loss": "mse"}, {"lr": -1}, {"unknown": 1}):
        r = requests.post(
            f"{ft_server.url}/finetune", json={"base_model": "tiny-sphere", "dataset": dataset_id, **bad}, timeout=10
        )
        assert r.status_code == 422, (bad, r.text)
    r = requests.post(
        f"{ft_server.url}/finetune", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert r.status_code in (400, 422) and r.json()["error"] == "invalid_input"
    assert client.jobs(status="queued") == [] and client.jobs(status="running") == []  # nothing was queued
    with pytest.raises(NotFoundError):
        client.job("job_000000000000")
    with pytest.raises(NotFoundError):
        client.cancel_job("job_000000000000")


def test_bounded_queue_cancel_and_inference_during_training(ft_server, client, dataset_id, cases_dir):
    long = client.finetune("tiny-sphere", dataset_id, epochs=500, val_every=1000)
    wait_for(lambda: client.job(long["job_id"])["status"] == "running", 30, "the long job to start")
    waiting = client.finetune("tiny-sphere", dataset_id, epochs=1)
    with pytest.raises(ServerBusyError) as e:  # queue of one: the third job is refused, not queued
        client.finetune("tiny-sphere", dataset_id, epochs=1)
    assert e.value.retry_after > 0
    running = wait_for(
        lambda: (j := client.job(long["job_id"]))["progress"]["epoch"] >= 1 and j,
        120,
        "the long job to finish an epoch",
    )
    assert running["status"] == "running"
    pid = running["pid"]
    assert pid and not pid_gone(pid)
    queued = client.job(waiting["job_id"])
    assert queued["status"] == "queued" and queued["queue_position"] == 1  # one job runs per device
    listing = client.jobs()
    assert {long["job_id"], waiting["job_id"]} <= {j["id"] for j in listing}

    # inference keeps serving while the job trains
    img = sorted((cases_dir / "images").iterdir())[1]
    assert client.infer(img, "tiny-sphere").label_map.max() == 1

    # the dataset of an active job cannot be deleted
    with pytest.raises(ConflictError, match=long["job_id"]):
        client.delete_dataset(dataset_id)

    # cancel the queued job: at once, it never starts
    assert client.cancel_job(waiting["job_id"])["status"] == "cancelled"
    # cancel the running one: the process is gone within seconds, nothing is published
    client.cancel_job(long["job_id"])
    wait_for(lambda: pid_gone(pid), 20, "the job process to exit")
    job = wait_for(lambda: (j := client.job(long["job_id"]))["status"] in FINAL and j, 20, "the job to settle")
    assert job["status"] == "cancelled" and "nothing was published" in job["error"]
    assert job["model_id"] is None
    models_dir = ft_server.settings.user_models_dir
    target = job["target_model_id"]
    assert not (models_dir / target).exists() and not list(models_dir.glob(f".{target}*"))
    assert target not in [m.id for m in client.models()]
    assert client.job(waiting["job_id"])["status"] == "cancelled" and client.job(waiting["job_id"])["attempts"] == 0
    # cancelling a finished job changes nothing
    assert client.cancel_job(long["job_id"])["status"] == "cancelled"


def test_long_poll_answers_when_the_job_changes(ft_server, client, dataset_id):
    acc = client.finetune("tiny-sphere", dataset_id, epochs=1)
    first = client.job(acc["job_id"])
    changed = client.job(acc["job_id"], wait=30, after=first["rev"])
    assert changed["rev"] > first["rev"] or changed["status"] in FINAL
    end = client.wait_job(acc["job_id"], timeout=150)
    assert end["status"] == "succeeded"
    t = time.monotonic()
    assert client.job(acc["job_id"], wait=30)["status"] == "succeeded"  # a finished job answers at once
    assert time.monotonic() - t < 10


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def test_a_full_disk_fails_the_job_not_the_server(tiny_bundle, cases_dir, tmp_path):
    """The job folder lives on a tiny file system: checkpoints cannot be written."""
    data = tmp_path / "data"
    jobs = data / "jobs"
    if not _mount_tmpfs(jobs, "96k"):
        pytest.skip("needs permission to mount a small tmpfs (root)")
    try:
        with LiveServer(make_settings(data, [tiny_bundle.parent], job_min_free_mb=0)) as s, ACEClient(s.url) as c:
            ds = c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="disk")["id"]
            job = c.wait_job(c.finetune("tiny-sphere", ds, epochs=3)["job_id"], timeout=150)
            assert job["status"] == "failed" and "disk is full" in job["error"], job
            assert not (s.settings.user_models_dir / job["target_model_id"]).exists()
            # the server carries on: health, listing, inference
            assert requests.get(f"{s.url}/health", timeout=10).json()["status"] == "ok"
            assert c.dataset(ds)["num_cases"] == 4
            assert c.infer(sorted((cases_dir / "images").iterdir())[0], "tiny-sphere").label_map is not None
    finally:
        subprocess.run(["umount", "-l", str(jobs)], capture_output=True, timeout=30)


def test_a_job_needs_free_space_to_start(tiny_bundle, cases_dir, tmp_path):
    settings = make_settings(tmp_path / "data", [tiny_bundle.parent], job_min_free_mb=10**9)
    with LiveServer(settings) as s, ACEClient(s.url) as c:
        ds = c.upload_dataset(cases_dir / "images", cases_dir / "labels", name="space")["id"]
        job = c.wait_job(c.finetune("tiny-sphere", ds, epochs=1)["job_id"], timeout=30)
        assert job["status"] == "failed" and "not enough free disk space" in job["error"]
        assert job["attempts"] == 0


def test_evaluation_refuses_what_it_cannot_do(ft_server, client, dataset_id, tmp_path):
    from synthetic import make_case, write_case

    with pytest.raises(NotFoundError) as e:
        client.evaluate("no-such-model", dataset_id)
    assert e.value.code == "model_not_found"
    with pytest.raises(NotFoundError) as e:
        client.evaluate("tiny-sphere", "ds_000000000000")
    assert e.value.code == "dataset_not_found"
    empty = client.create_dataset("empty")["id"]
    with pytest.raises(InvalidInputError, match="no cases"):
        client.evaluate("tiny-sphere", empty)
    write_case(make_case((16, 16, 16), num_classes=3, seed=9), tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    client.add_case(empty, tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", name="three")
    with pytest.raises(InvalidInputError, match=r"three .*\[2\]"):
        client.evaluate("tiny-sphere", empty)
    with pytest.raises(InvalidInputError, match="no fitted temperature"):
        client.evaluate("tiny-sphere", dataset_id, temperature=True)
    with pytest.raises(InvalidInputError, match="c_nope"):
        client.evaluate("tiny-sphere", dataset_id, cases=["c_nope"])
    one = client.dataset(dataset_id)["cases"][0]["case_id"]
    assert client.evaluate("tiny-sphere", dataset_id, cases=[one])["num_cases"] == 1
    raw = client.evaluate("tiny-sphere", dataset_id, cases=[one], raw=True)
    assert raw["raw"] is True and raw["calibrator"] is None and raw["floor"]["ace"] > 0
    with pytest.raises(InvalidInputError, match="contradict"):
        client.evaluate("tiny-sphere", dataset_id, temperature=True, raw=True)
    for path in (
        "/evaluations/ev_000000000000",
        "/evaluations/../../etc",
        "/evaluations/ev_000000000000/figures/x.png",
    ):
        assert requests.get(ft_server.url + path, timeout=10).status_code == 404
