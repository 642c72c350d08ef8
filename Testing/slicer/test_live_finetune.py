"""Fine-tuning and evaluation from the scene, through a real server (real job processes, the tiny bundle)."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, torch, monai) is needed")

from oblique import oblique_grid, sphere_on_grid

from ACECalibrationLib import nodes, segmentation
from ACECalibrationLib.client.errors import InvalidInputError
from ACECalibrationLib.finetune import evaluate_case, start_finetune, training_pair, upload_pairs
from ACECalibrationLib.worker import Cancelled

MODEL = "tiny-sphere"
LABELS = {"0": "background", "1": "sphere"}


def _pair(scene, seed: int):
    """A volume and a 'corrected' segmentation (the truth) in the scene, turned into a training pair."""
    grid = oblique_grid()
    image, label, _ = sphere_on_grid(grid, radius_mm=5.0, seed=seed, centre_offset_mm=(seed - 1.5, 0.0, 0.0))
    volume = nodes.add_volume_from_array(scene, image, grid, f"case {seed}")
    seg, _ = segmentation.create_segmentation_node(scene, volume, label, LABELS, name=f"case {seed} corrected")
    pair = training_pair(volume, seg, LABELS)
    assert np.array_equal(pair.label, label)
    return pair


def _run(task, timeout=180.0):
    task.wait(timeout)
    return task.result(0), task.messages


def test_finetune_from_scene_pairs_publishes_a_new_model(scene, client):
    pairs = [_pair(scene, s) for s in (1, 2)]
    task = start_finetune(client, pairs, MODEL, "hardl1ace_dice_ce", epochs=1, val_fraction=0.5, poll_s=1.0)
    job, messages = _run(task)  # the final job view, typed (JobInfo)
    assert job.status == "succeeded", job
    assert job.model_id in {m.id for m in client.models()}
    assert any(m.startswith("Uploading case") for m in messages) and any("epoch" in m for m in messages), messages
    assert "validation dice" in messages[-1], messages[-1]  # the latest validation metrics are shown
    dataset = client.dataset(job.dataset)
    assert dataset["num_cases"] == 2
    # node names (often patient names) never leave the computer: cases and dataset have neutral names
    assert (
        sorted(c["name"] for c in dataset["cases"]) == ["case 1", "case 2"] and dataset["name"] == "Slicer corrections"
    )


def test_cancel_stops_the_job_on_the_server(scene, client):
    pairs = [_pair(scene, s) for s in (1, 2)]
    task = start_finetune(client, pairs, MODEL, "baseline_dice_ce", epochs=500, val_fraction=0.5, poll_s=0.5)
    deadline = time.monotonic() + 60
    while not task.progress[1].startswith(("queued", "running")) and time.monotonic() < deadline:
        assert not task.done(), task.exception()
        time.sleep(0.05)
    assert task.cancel()
    with pytest.raises(Cancelled):
        task.result(0)
    assert task.worker_finished(30)
    job = next(j for j in client.jobs() if j["epochs"] == 500)
    deadline = time.monotonic() + 30
    while job["status"] not in ("cancelled", "failed") and time.monotonic() < deadline:
        job = client.job(job["id"], wait=2.0, after=job["rev"])
    assert job["status"] == "cancelled" and job["model_id"] is None


def test_bad_pairs_are_refused_and_leave_no_dataset(scene, client):
    pair = _pair(scene, 1)
    pair.label[pair.label > 0] = 7  # a value the model does not have
    before = {d["id"] for d in client.datasets()}
    with pytest.raises(InvalidInputError, match="case 1"):
        upload_pairs(client, [pair], MODEL, "bad")
    assert {d["id"] for d in client.datasets()} == before


def test_evaluate_case_returns_metrics_and_the_reliability_diagram(scene, client):
    pair = _pair(scene, 3)
    before = {d["id"] for d in client.datasets()}
    reply, png = evaluate_case(client, pair, MODEL)
    assert reply["num_cases"] == 1 and reply["aggregate"]["dice"] > 0.7
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert {d["id"] for d in client.datasets()} == before  # the one-case dataset was deleted again
