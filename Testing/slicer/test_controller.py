"""The module's state machine (ACECalibrationLib.controller) headless, on real MRML, against a real server: every
flow the widget binds a button to, and the ways they go wrong (scene closed mid-task, cancel then segment again,
server down, wrong key, a result for a deleted volume, a hung server), with the GUI thread never blocked."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, torch, monai) is needed")

from oblique import oblique_grid, sphere_on_grid

from ACECalibrationLib import (
    controller as ctl,
    display,
    logic,
    nodes,
    regions,
    segmentation,
    settings,
)

MODEL = "tiny-sphere"
LABELS = {"0": "background", "1": "sphere"}
FAST = 0.75  # s: the longest any controller call may take on the GUI thread (network timeouts here are >= 2 s)


class RecordingView(ctl.View):
    """Records what the controller tells the GUI; answers questions from a script (default: no)."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.questions, self.errors, self.results, self.evaluations, self.regions = [], [], [], [], []
        self.changes = 0

    def changed(self):
        self.changes += 1

    def error(self, title, message, details=""):
        self.errors.append((title, message))

    def confirm(self, title, question, details=""):
        self.questions.append(title)
        return self.answers.pop(0) if self.answers else False

    def result_ready(self, result):
        self.results.append(result)

    def region_selected(self, row):
        self.regions.append(row)

    def evaluation_ready(self, text, png_path):
        self.evaluations.append((text, png_path))


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    elapsed = time.monotonic() - t0
    assert elapsed < FAST, f"{fn.__name__} blocked the GUI thread for {elapsed:.2f} s"
    return out


def run_until_idle(c: ctl.Controller, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while timed(c.poll):
        assert time.monotonic() < deadline, "the controller never became idle"
        time.sleep(0.02)


def make_controller(scene, url, key, view=None, store=None):
    store = store or settings.MemorySettings()
    settings.remember_server_url(store, url)
    return ctl.Controller(scene, store, view or RecordingView(), api_key=key)


@pytest.fixture
def connected(scene, server, server_key):
    c = make_controller(scene, server.url, server_key)
    timed(c.enter)  # entering the module fetches the models
    run_until_idle(c)
    assert c.connection_state == ctl.CONNECTED, c.connection_text
    c.select_model(MODEL)
    yield c
    c.cleanup()


def sphere_volume(scene, name="Oblique sphere", seed=3, size=(26, 20, 24)):
    grid = oblique_grid(size=size)
    image, label, _ = sphere_on_grid(grid, radius_mm=5.5, seed=seed)
    return nodes.add_volume_from_array(scene, image, grid, name), label


def result_nodes(scene):
    return {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode")}


# ------------------------------------------------------------------------------------------------------ connect
def test_entering_fetches_the_models_and_describes_them(connected):
    c = connected
    assert MODEL in c.models and c.model_id == MODEL and c.can_segment
    assert f"{len(c.models)} model(s)" in c.connection_text and c.connection_text.startswith("Connected to ")
    text = c.model_description()
    assert "Labels: sphere" in text and "Loss:" in text
    assert c.view.questions == []  # a loopback server needs no consent and no key warning


def test_connection_failures_are_messages_and_never_block(scene, server, server_key, monkeypatch):
    from live_server import free_port

    down = f"http://127.0.0.1:{free_port()}"
    c = make_controller(scene, down, server_key)
    assert timed(c.connect)
    run_until_idle(c, 10)
    assert c.connection_state == ctl.CONNECTION_FAILED and c.connection_text.startswith("Cannot reach")
    assert not c.models and not c.can_segment

    c = make_controller(scene, server.url, "wrong-key")
    timed(c.connect)
    run_until_idle(c, 10)
    assert c.connection_state == ctl.CONNECTION_FAILED and "refused the API key" in c.connection_text

    # a hung server (accepts, never answers): the GUI stays free and the interactive timeout ends it
    monkeypatch.setitem(logic.INTERACTIVE, "timeout", (2.0, 2.0))
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        c = make_controller(scene, f"http://127.0.0.1:{hung.getsockname()[1]}", server_key)
        t0 = time.monotonic()
        timed(c.connect)
        run_until_idle(c, 10)
        assert time.monotonic() - t0 < 5.0
    assert c.connection_state == ctl.CONNECTION_FAILED and "did not answer in time" in c.connection_text
    assert logic.INTERACTIVE["retries"] == 0 and logic.TRANSFER["retries"] == 0


def test_changing_the_key_drops_the_connection(connected):
    c = connected
    timed(c.set_api_key, "another-key")
    assert c.connection_state == ctl.NOT_CONNECTED and not c.can_segment
    assert not timed(c.segment, None)
    c.set_server("http://elsewhere:8000")
    assert c.models == {} and c.model_id == ""


def test_the_servers_default_model_is_selected_unless_the_user_chose_one(scene, tiny_bundle, tmp_path):
    from live_server import LiveServer, make_settings
    from slow_model import copy_bundle

    models = tmp_path / "models"
    copy_bundle(tiny_bundle, models, "tiny-second")  # listed after tiny-sphere: the server's setting decides
    live = make_settings(tmp_path / "data", [tiny_bundle.parent, models], default_model="tiny-second")
    with LiveServer(live) as server:
        store = settings.MemorySettings()
        c = make_controller(scene, server.url, None, store=store)
        timed(c.enter)
        run_until_idle(c)
        assert list(c.models) == [MODEL, "tiny-second"] and c.model_id == c.default_model_id == "tiny-second"
        assert "default tiny-second" in c.connection_text
        assert c.model_description().endswith("The server's default model.")
        assert "default" not in c.model_description(MODEL)
        assert c.model_label("tiny-second") == "tiny-second (default)" and c.model_label(MODEL) == MODEL  # the list
        assert settings.last_model(store) == ""  # selected for the user, not by the user: nothing remembered

        timed(c.select_model, MODEL)  # the user's choice...
        assert settings.last_model(store) == MODEL
        again = make_controller(scene, server.url, None, store=store)  # ...wins in the next session
        timed(again.enter)
        run_until_idle(again)
        assert again.model_id == MODEL and again.default_model_id == "tiny-second"

        gone = settings.MemorySettings()
        settings.remember_model(gone, "a-model-this-server-lacks")
        other = make_controller(scene, server.url, None, store=gone)
        timed(other.enter)
        run_until_idle(other)
        assert other.model_id == "tiny-second"  # a remembered model the server does not have: its default


def test_cancel_stops_the_inference_on_the_server(scene, tiny_bundle, tmp_path):
    """Cancel closes the connection; the server sees the client leave, stops the forward pass and frees its slot."""
    from live_server import LiveServer, make_settings
    from slow_model import slow_bundle

    models = tmp_path / "models"
    slow_bundle(tiny_bundle, models, "tiny-slow")  # minutes for this volume if nothing stops it
    with LiveServer(make_settings(tmp_path / "data", [tiny_bundle.parent, models])) as server:
        client = logic.make_client(server.url, None, **logic.INTERACTIVE)
        c = make_controller(scene, server.url, None)
        c.connect()
        run_until_idle(c)
        c.select_model("tiny-slow")
        volume, _ = sphere_volume(scene, size=(48, 48, 48))
        assert timed(c.segment, volume)
        deadline = time.monotonic() + 60
        while client.health()["queue"]["running"] == 0:  # uploaded: the server's forward pass is running
            timed(c.poll)
            assert c.segment_state == ctl.RUNNING and time.monotonic() < deadline, (c.status_text, c.view.errors)
            time.sleep(0.05)
        t0 = time.monotonic()
        timed(c.cancel)
        run_until_idle(c, 10)
        while client.health()["queue"]["in_flight"]:
            assert time.monotonic() - t0 < 2.0, "the server kept the cancelled inference"
            time.sleep(0.05)
        health = client.health()
        assert health["queue"]["running"] == 0 and health["queue"]["cancelled"] == 1
        assert not server.settings.results_dir.exists() or list(server.settings.results_dir.iterdir()) == []
        c.select_model(MODEL)  # the device is free: a new run is served at once
        assert timed(c.segment, volume)
        run_until_idle(c, 30)
        assert c.status_text.startswith("Done:") and c.view.errors == []
        c.cleanup()


# ------------------------------------------------------------------------------------------------------ segment
def test_segment_review_correct_and_statistics(connected, scene):
    c = connected
    volume, truth = sphere_volume(scene)
    assert timed(c.segment, volume, threshold=0.999)  # a high threshold: the tiny model's doubtful voxels get flagged
    assert c.segment_state == ctl.RUNNING and not c.can_segment
    run_until_idle(c)
    assert c.view.errors == [] and c.status_text.startswith("Done:"), c.status_text
    r = c.result
    assert c.view.results == [r] and r.model_id == MODEL
    assert nodes.volume_nodes_share_grid(volume, r.confidence_node)
    mask = segmentation.segment_mask(r.segmentation_node, r.segment_ids[1], volume)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.8
    assert r.regions_table_node.GetNumberOfRows() == len(r.regions) > 0
    assert r.statistics_table_node.GetNumberOfRows() == 1

    # the worklist: go to a region, give a verdict, a correction marks the current region corrected
    timed(c.next_unreviewed)
    assert c.review.current == 0 and c.view.regions == [0] and c.status_text.startswith("Region 1 of")
    timed(c.mark_region, regions.ACCEPTED)
    assert regions.review_state(r.regions_table_node, 0) == regions.ACCEPTED
    grown = mask.astype(bool)
    grown[0] = True  # an edit in the Segment Editor while region 1 is current
    segmentation.set_segment_from_mask(r.segmentation_node, r.segment_ids[1], grown, oblique_grid().ijk_to_ras)
    assert regions.review_state(r.regions_table_node, 0) == regions.CORRECTED
    timed(c.update_statistics)
    voxels = int(r.statistics_table_node.GetCellText(0, 1))
    assert voxels == int(segmentation.segment_mask(r.segmentation_node, r.segment_ids[1], volume).sum())

    # display: only the result's own volumes; the overlay follows the choice
    comp = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    timed(c.set_display, threshold=0.7, opacity=0.3, overlay=ctl.OVERLAY_UNCERTAINTY)
    assert comp.GetForegroundVolumeID() == r.uncertainty_node.GetID() and comp.GetBackgroundVolumeID() == volume.GetID()
    assert r.confidence_node.GetDisplayNode().GetUpperThreshold() == pytest.approx(0.7)
    timed(c.set_display, overlay=ctl.OVERLAY_NONE)
    assert comp.GetForegroundVolumeID() is None

    # a new run on the reviewed result asks first; "no" keeps it and puts the new result in new nodes
    before = result_nodes(scene)
    c.view.answers = [False]
    assert c.segment(volume, threshold=0.999)
    run_until_idle(c)
    assert c.view.questions[-1] == "Replace the reviewed result?"
    assert c.result.segmentation_node is not r.segmentation_node
    assert result_nodes(scene)["vtkMRMLSegmentationNode"] == before["vtkMRMLSegmentationNode"] + 2
    # an unreviewed result is simply refilled: no question, no new nodes
    asked, before = len(c.view.questions), result_nodes(scene)
    assert c.segment(volume)
    run_until_idle(c)
    assert len(c.view.questions) == asked and result_nodes(scene) == before and c.result.reused


def test_cancel_stops_the_request_and_a_new_run_can_follow(connected, scene):
    c = connected
    volume, _ = sphere_volume(scene)
    real = c.server_url
    with socket.socket() as hung:  # the server stops answering mid-session: the upload is taken, no reply ever comes
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        c.server_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        assert timed(c.segment, volume)
        deadline = time.monotonic() + 30
        while c.segment_progress[1] != "Running the model on the server":  # uploaded; waiting for the reply
            timed(c.poll)
            assert c.segment_state == ctl.RUNNING and time.monotonic() < deadline, (c.status_text, c.view.errors)
            time.sleep(0.01)
        time.sleep(0.3)
        t0 = time.monotonic()
        timed(c.cancel)  # the connection is broken: the worker unwinds at once (the read timeout is 600 s)
        assert c.segment_state == ctl.CANCELLING and c.status_text == "Cancelled."
        assert not timed(c.segment, volume) and "still running or being cancelled" in c.status_text
        run_until_idle(c, 10)
        assert time.monotonic() - t0 < 2.0 and c.segment_state == ctl.IDLE
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0 and c.view.errors == []
    c.server_url = real
    assert timed(c.segment, volume)  # a second run starts now and completes
    run_until_idle(c)
    assert c.status_text.startswith("Done:") and c.result is not None


def test_scene_closed_mid_task(connected, scene):
    c = connected
    volume, _ = sphere_volume(scene)
    pair_seg, _ = segmentation.create_segmentation_node(scene, volume, np.zeros((24, 20, 26), np.uint8), LABELS)
    c.add_pair(volume, pair_seg)
    assert timed(c.segment, volume)
    timed(c.scene_closing)  # the widget calls this on StartCloseEvent
    scene.Clear(0)
    assert c.pairs == [] and c.result is None and c.review is None
    run_until_idle(c)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert "scene was closed" in c.status_text and c.view.errors == []
    volume, _ = sphere_volume(scene, "after the close")
    assert c.segment(volume)
    run_until_idle(c)
    assert c.result is not None and c.result.segmentation_node.GetScene() is scene


def test_a_result_for_a_deleted_volume_is_discarded(connected, scene):
    c = connected
    volume, _ = sphere_volume(scene)
    assert c.segment(volume)
    c._segment.task.wait(60)  # the result is in, not yet collected...
    scene.RemoveNode(volume)  # ...when the user deletes the input
    run_until_idle(c)
    assert "deleted" in c.status_text and c.result is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    # deleted while running: the run is cancelled as soon as the deletion is seen
    volume, _ = sphere_volume(scene)
    assert c.segment(volume)
    scene.RemoveNode(volume)
    timed(c.poll)
    assert c.segment_state in (ctl.CANCELLING, ctl.IDLE) and "deleted" in c.status_text
    run_until_idle(c)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0 and c.view.errors == []


def test_server_going_down_mid_session(scene, tiny_bundle, tmp_path):
    from live_server import LiveServer, make_settings

    live = LiveServer(make_settings(tmp_path / "data", [tiny_bundle.parent])).start()
    c = make_controller(scene, live.url, None)
    c.connect()
    run_until_idle(c)
    assert c.connection_state == ctl.CONNECTED
    live.stop()
    volume, _ = sphere_volume(scene)
    assert timed(c.segment, volume)
    run_until_idle(c, 20)
    assert c.view.errors and c.view.errors[-1][0] == "Segmentation failed."
    assert c.view.errors[-1][1].startswith(f"Cannot reach the ACECalibration server at {live.url}")
    assert c.segment_state == ctl.IDLE and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


# ------------------------------------------------------------------------------------------------------ consent
def test_a_key_is_not_sent_in_clear_to_another_computer_without_asking(scene):
    c = make_controller(scene, "http://192.0.2.1:9", "secret", RecordingView(answers=[False]))
    assert not timed(c.connect) and not c.active  # declined: nothing was sent
    assert c.view.questions == ["API key sent unencrypted"] and "unencrypted" in c.status_text
    assert not timed(c.connect, quiet=True) and len(c.view.questions) == 1  # entering the module asks nothing
    https = make_controller(scene, "https://192.0.2.1:9", "secret")
    assert settings.key_sent_in_clear(https.server_url, "secret") is False


def _non_loopback_alias(port: int) -> str | None:
    """An address of this computer that does not *look* local (the machine's name), when it reaches 127.0.0.1."""
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name) != "127.0.0.1" or settings.is_loopback(name):
            return None
    except OSError:
        return None
    return f"http://{name}:{port}"


def test_images_leave_the_computer_only_with_consent_remembered_per_server(scene, server, server_key):
    url = _non_loopback_alias(int(server.url.rsplit(":", 1)[1]))
    if url is None:
        pytest.skip(
            "this machine's name does not resolve to 127.0.0.1: no non-loopback address reaches the test server"
        )
    store = settings.MemorySettings()
    view = RecordingView(answers=[True, False])  # key warning: yes; upload consent: no
    c = make_controller(scene, url, server_key, view, store)
    c.connect()
    run_until_idle(c)
    assert c.connection_state == ctl.CONNECTED and view.questions == ["API key sent unencrypted"]
    c.select_model(MODEL)
    volume, _ = sphere_volume(scene)
    assert not c.segment(volume) and not c.active and "no consent" in c.status_text
    assert view.questions[-1] == "Send images to another computer?"
    assert not settings.has_upload_consent(store, url)
    view.answers = [True]
    assert c.segment(volume)
    run_until_idle(c)
    assert c.result is not None and settings.has_upload_consent(store, url)
    asked = len(view.questions)
    assert c.segment(volume)  # remembered: no second question (and the key warning only once per session)
    run_until_idle(c)
    assert len(view.questions) == asked
    fresh = make_controller(scene, url, server_key, RecordingView(answers=[True]), store)  # a new session
    fresh.connect()
    run_until_idle(fresh)
    fresh.select_model(MODEL)
    assert fresh.segment(volume)
    run_until_idle(fresh)
    assert fresh.view.questions == ["API key sent unencrypted"]  # consent remembered in the settings, not the key


# -------------------------------------------------------------------------------------------------- fine-tune, evaluate
def test_finetune_and_evaluation_through_the_controller(connected, scene):
    c = connected
    assert not timed(c.finetune, "hardl1ace_dice_ce", 1) and "at least one" in c.status_text
    for seed in (1, 2):
        grid = oblique_grid()
        image, label, _ = sphere_on_grid(grid, radius_mm=5.0, seed=seed, centre_offset_mm=(seed - 1.5, 0.0, 0.0))
        volume = nodes.add_volume_from_array(scene, image, grid, f"Patient Doe {seed}")
        seg, _ = segmentation.create_segmentation_node(scene, volume, label, LABELS, f"corrected {seed}")
        c.add_pair(volume, seg)
    assert timed(c.finetune, "hardl1ace_dice_ce", 1, val_fraction=0.5)
    assert c.finetune_state == ctl.RUNNING and not timed(c.finetune, "hardl1ace_dice_ce", 1)
    run_until_idle(c, 240)
    assert any(line.startswith("New model: ") for line in c.finetune_log), c.finetune_log
    new = c.finetune_log[-1].split(": ", 1)[1]
    assert new in c.models and c.model_id == new  # the list was refreshed and the new model selected
    assert any("epoch" in line for line in c.finetune_log)

    # cancelling a job: the follower stops and the job is cancelled on the server
    assert c.finetune("baseline_dice_ce", 500, val_fraction=0.5)
    deadline = time.monotonic() + 60
    while not any(line.startswith(("queued", "running")) for line in c.finetune_log):
        timed(c.poll)
        assert c.finetune_state == ctl.RUNNING and time.monotonic() < deadline, c.finetune_log
        time.sleep(0.05)
    timed(c.cancel_finetune)
    assert c.finetune_state == ctl.CANCELLING
    run_until_idle(c, 60)
    assert c.finetune_state == ctl.IDLE and c.finetune_log[-1] == "Cancelled; the job was cancelled on the server."
    client = logic.make_client(c.server_url, c.api_key, **logic.INTERACTIVE)
    job = next(j for j in client.jobs() if j["epochs"] == 500)
    deadline = time.monotonic() + 30
    while job["status"] not in ("cancelled", "failed") and time.monotonic() < deadline:
        job = client.job(job["id"], wait=2.0, after=job["rev"])
    assert job["status"] == "cancelled" and job["model_id"] is None

    volume, reference = c.pairs[0]
    assert timed(c.evaluate, volume, reference)
    run_until_idle(c, 120)
    ((text, png),) = c.view.evaluations
    assert text.startswith("Dice ") and "ACE" in text and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c.cleanup()
    assert not Path(png).exists()  # temporary figures are removed


def test_a_saved_result_comes_back_with_its_input(connected, scene):
    c = connected
    volume, _ = sphere_volume(scene)
    c.segment(volume, threshold=0.999)
    run_until_idle(c)
    table = c.result.regions_table_node
    c.next_unreviewed()
    c.mark_region(regions.REVIEWED)
    other, _ = sphere_volume(scene, "other")
    c.input_changed(other)
    assert c.result is None and c.review is None
    c.input_changed(volume)  # as after loading the saved scene: the result and its review come back
    assert c.result is not None and c.result.regions_table_node is table
    assert c.review.state(0) == regions.REVIEWED and c.view.results[-1] is c.result
    assert c.result.confidence_node.GetAttribute(display.ROLE_ATTRIBUTE) == display.ROLE_CONFIDENCE
